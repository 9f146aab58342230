"""Tests of the character-level language model example in examples/char_lm."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = REPO_ROOT / 'examples' / 'char_lm'
TRAIN_SCRIPT = EXAMPLE_DIR / 'train.py'
sys.path.insert(0, str(EXAMPLE_DIR))

import config as config_lib  # noqa: E402
import data as data_lib  # noqa: E402

# A model small enough that a run of both optimizers takes seconds.
TINY_FLAGS = [
    '--steps', '20', '--n-layer', '1', '--d-model', '32', '--n-head', '2',
    '--block-size', '16', '--batch-size', '4', '--eval-interval', '10', '--eval-iters', '2',
    '--warmup-steps', '2', '--sample-length', '40', '--lr', '1e-3', '--min-lr', '1e-4',
]  # fmt: skip
RUN_KEYS = {
    'val_loss',
    'best_val_loss',
    'val_bpc',
    'ms_per_step',
    'tokens_per_s',
    'history',
    'sample',
}
# XLA's backend optimisation level 0 compiled these tiny models about 3x faster
# on a 2-core CPU. The checks below compare runs made with the same flag.
FAST_COMPILE_ENV = {'XLA_FLAGS': '--xla_backend_optimization_level=0'}
# Runs with the same flags share compiled programs through JAX's persistent
# cache, which halved the time of a repeated tiny run. A cached program is the
# one the compiler would build again, so results do not change.
COMPILE_CACHE_ENV = {
    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
    'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
}
_compile_cache_dir: list[Path] = []

PLAY_SNIPPET = r"""# The Tragedy of Example

## ACT I

### SCENE I. A room.

_Enter KING and QUEEN, with
Attendants_

**KING**  
Now is the _winter_ of our discontent  
Made glorious summer\-time.

**QUEEN**  
_\[Aside]_  
Twice being _\[by the people chosen]_  
And ever _\[ ]_ more.

_Exit KING_

Farewell, my lord.

### SCENE II. Another room.

**FIRST LORD**  
_\[Within]_

**SECOND LORD**  
*[To FIRST LORD]*  
Speak!
"""

PLAY_SNIPPET_TEXT = """KING:
Now is the winter of our discontent
Made glorious summer-time.

QUEEN:
Twice being by the people chosen
And ever  more.
Farewell, my lord.

SECOND LORD:
Speak!
"""


def make_text(num_lines: int = 600) -> str:
  """Return a deterministic play-like text of a few thousand characters."""
  rng = np.random.default_rng(0)
  words = 'the king queen lord good night day love sweet death blood crown fair'.split()
  speakers = ['KING', 'QUEEN', 'LORD']
  lines = []
  for _ in range(num_lines // 3):
    lines.append(f'{speakers[rng.integers(len(speakers))]}:')
    lines.append(' '.join(words[i] for i in rng.integers(len(words), size=8)))
    lines.append('')
  return '\n'.join(lines)


def train_env(xla_flags: str = '') -> dict[str, str]:
  """Return the environment of a train.py subprocess, with extra `xla_flags` appended."""
  env = {**os.environ, **FAST_COMPILE_ENV, **COMPILE_CACHE_ENV}
  env['XLA_FLAGS'] = f"{FAST_COMPILE_ENV['XLA_FLAGS']} {xla_flags}".strip()
  if _compile_cache_dir:
    env['JAX_COMPILATION_CACHE_DIR'] = str(_compile_cache_dir[0])
  return env


def start_train(args: list[str], xla_flags: str = '') -> subprocess.Popen:
  """Start train.py from the repository root without waiting for it."""
  return subprocess.Popen(
      [sys.executable, str(TRAIN_SCRIPT), *args],
      cwd=REPO_ROOT,
      env=train_env(xla_flags),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )


def run_train(
    args: list[str], timeout: float = 300, xla_flags: str = ''
) -> subprocess.CompletedProcess:
  """Run train.py from the repository root as a user would."""
  return subprocess.run(
      [sys.executable, str(TRAIN_SCRIPT), *args],
      cwd=REPO_ROOT,
      env=train_env(xla_flags),
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
  )


@pytest.fixture(scope='session', autouse=True)
def compile_cache(tmp_path_factory):
  """Give every train.py subprocess of the session one JAX compilation cache."""
  _compile_cache_dir[:] = [tmp_path_factory.mktemp('jax_compile_cache')]
  yield _compile_cache_dir[0]
  _compile_cache_dir.clear()


@pytest.fixture(scope='module')
def text_file(tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp('text') / 'play.txt'
  path.write_text(make_text(), encoding='utf-8')
  return path


@pytest.fixture(scope='module')
def shakespeare() -> str:
  return data_lib.load_shakespeare()


# Data.


def test_markdown_to_text_snippet():
  assert data_lib.markdown_to_text(PLAY_SNIPPET) == PLAY_SNIPPET_TEXT


def test_markdown_to_text_without_speech():
  assert data_lib.markdown_to_text('# Title\n\n## ACT I\n\n_Enter KING_\n') == ''


def test_shakespeare_is_plain_text(shakespeare):
  lines = shakespeare.splitlines()
  assert len(shakespeare) > 4_000_000
  assert shakespeare.startswith('THESEUS:\nNow, fair Hippolyta, our nuptial hour\n')
  assert '**' not in shakespeare
  assert '_' not in shakespeare
  assert '\\' not in shakespeare
  assert not [line for line in lines if line.startswith('#')]
  assert not [line for line in lines if line != line.rstrip()]


def test_shakespeare_speeches_start_with_speaker(shakespeare):
  speeches = shakespeare.split('\n\n')
  first_lines = [speech.split('\n', 1)[0] for speech in speeches]
  assert [line for line in first_lines if not line.endswith(':')] == []


def test_shakespeare_is_deterministic(shakespeare):
  assert data_lib.load_shakespeare() == shakespeare


def test_read_text_file_unreadable(tmp_path, monkeypatch):
  path = tmp_path / 'locked.txt'
  path.write_text('text', encoding='utf-8')

  def deny(self):
    raise PermissionError(13, 'Permission denied')

  # Root can read any file, so the permission error is simulated.
  monkeypatch.setattr(Path, 'read_bytes', deny)
  with pytest.raises(ValueError, match=r'cannot read .*locked\.txt: Permission denied'):
    data_lib.read_text_file(path)


def test_build_corpus_splits_90_10():
  text = make_text()
  corpus = data_lib.build_corpus(text, block_size=16)
  assert len(corpus.train) == int(len(text) * 0.9)
  assert len(corpus.train) + len(corpus.val) == len(text)
  assert corpus.vocabulary.decode(np.concatenate([corpus.train, corpus.val])) == text
  assert corpus.vocabulary.chars == ''.join(sorted(set(text)))


def test_build_corpus_too_short():
  needed = data_lib.min_text_length(16)
  data_lib.build_corpus('x' * needed, block_size=16)
  with pytest.raises(ValueError, match=f'needs at least {needed}'):
    data_lib.build_corpus('x' * (needed - 1), block_size=16)


def test_sample_batch_shapes_and_targets():
  tokens = np.arange(1000, dtype=np.int32)
  x, y = data_lib.sample_batch(tokens, 4, 16, np.random.default_rng(0))
  assert x.shape == (4, 16)
  assert y.shape == (4, 16)
  assert x.dtype == np.int32
  assert y.dtype == np.int32
  np.testing.assert_array_equal(y, x + 1)


def test_sample_batch_same_seed_same_batches():
  tokens = np.arange(1000, dtype=np.int32)
  first, second = np.random.default_rng(7), np.random.default_rng(7)
  for _ in range(3):
    np.testing.assert_array_equal(
        data_lib.sample_batch(tokens, 4, 16, first)[0],
        data_lib.sample_batch(tokens, 4, 16, second)[0],
    )


def test_unigram_entropy():
  assert data_lib.unigram_entropy('abab') == pytest.approx(math.log(2))
  assert data_lib.unigram_entropy('aaaa') == 0.0


# Configuration.


@pytest.mark.parametrize(
    'overrides, message',
    [
        ({'steps': 0}, r'--steps must be an integer >= 1, got 0'),
        ({'batch_size': -1}, r'--batch-size must be an integer >= 1, got -1'),
        ({'block_size': 0}, r'--block-size must be an integer >= 1'),
        ({'n_layer': 0}, r'--n-layer must be an integer >= 1'),
        ({'eval_interval': 0}, r'--eval-interval must be an integer >= 1'),
        ({'eval_iters': -5}, r'--eval-iters must be an integer >= 1'),
        ({'n_head': 3}, r'--n-head 3 does not divide --d-model 64'),
        ({'warmup_steps': 1500}, r'--warmup-steps must be in \[0, --steps\)'),
        ({'lr': 0.0}, r'--lr must be a finite number > 0, got 0.0'),
        ({'lr': float('nan')}, r'--lr must be a finite number > 0, got nan'),
        ({'min_lr': 0.1}, r'--min-lr must be in \[0, --lr\] = \[0, 0.01\], got 0.1'),
        ({'min_lr': -1e-4}, r'--min-lr must be in \[0, --lr\]'),
        ({'keep_fraction': 0.0}, r'--keep-fraction must be in \(0, 1\], got 0.0'),
        ({'keep_fraction': 1.5}, r'--keep-fraction must be in \(0, 1\], got 1.5'),
        ({'beta': 1.0}, r'--beta must be in \[0, 1\), got 1.0'),
        ({'blend': -0.1}, r'--blend must be in \[0, 1\], got -0.1'),
        ({'dropout': 1.0}, r'--dropout must be in \[0, 1\), got 1.0'),
        ({'b2': 1.0}, r'--b2 must be in \[0, 1\)'),
        ({'weight_decay': -0.1}, r'--weight-decay must be a finite number >= 0'),
        ({'temperature': 0.0}, r'--temperature must be a finite number > 0'),
        ({'optimizer': 'sgd'}, r"--optimizer must be one of smi, adamw, both, got 'sgd'"),
        ({'out': ' '}, r'--out must be a non-empty directory path'),
        ({'devices': 0}, r'--devices must be an integer >= 1, got 0'),
        ({'devices': 3}, r'--batch-size 32 does not divide by --devices 3'),
        ({'stop_after': -1}, r'--stop-after must be in \[0, --steps\] = \[0, 800\], got -1'),
        ({'stop_after': 801}, r'--stop-after must be in \[0, --steps\]'),
        ({'resume': ''}, r'--resume must be a non-empty directory path'),
    ],
)
def test_config_rejects(overrides, message):
  with pytest.raises(ValueError, match=message):
    config_lib.Config(**overrides)


def test_config_defaults_valid():
  assert config_lib.Config().optimizers == ('smi', 'adamw')


# Command line: bad input.


# Each case: flags, with {dir} standing for a folder containing the files that
# `bad_input_dir` writes, and a phrase the one-line error must contain.
BAD_INPUT_CASES = {
    'missing text': (['--text', '{dir}/missing.txt'], 'file not found'),
    'directory text': (['--text', '{dir}/texts'], 'is a directory'),
    'empty text': (['--text', '{dir}/empty.txt'], 'is empty'),
    'binary text': (['--text', '{dir}/binary.bin'], 'contains NUL bytes'),
    'non-UTF-8 text': (['--text', '{dir}/latin1.txt'], 'is not valid UTF-8'),
    'text too short': (['--text', '{dir}/short.txt'], '--block-size 64 needs at least'),
    'zero steps': (['--steps', '0'], '--steps must be an integer >= 1'),
    'negative batch': (['--batch-size', '-2'], '--batch-size must be an integer >= 1'),
    'zero eval interval': (['--eval-interval', '0'], '--eval-interval must be'),
    'zero eval iters': (['--eval-iters', '0'], '--eval-iters must be'),
    'zero mask every': (['--mask-every', '0'], '--mask-every must be an integer >= 1'),
    'non-integer steps': (['--steps', '1.5'], "argument --steps: invalid int value: '1.5'"),
    'head not dividing': (['--n-head', '5'], '--n-head 5 does not divide --d-model 64'),
    'zero lr': (['--lr', '0'], '--lr must be a finite number > 0'),
    'min lr above lr': (['--min-lr', '0.1'], '--min-lr must be in [0, --lr]'),
    'keep fraction zero': (['--keep-fraction', '0'], '--keep-fraction must be in (0, 1]'),
    'beta one': (['--beta', '1'], '--beta must be in [0, 1)'),
    'blend above one': (['--blend', '2'], '--blend must be in [0, 1]'),
    'dropout one': (['--dropout', '1'], '--dropout must be in [0, 1)'),
    'unknown optimizer': (['--optimizer', 'sgd'], "argument --optimizer: invalid choice: 'sgd'"),
    'zero d-model': (['--d-model', '0'], '--d-model must be an integer >= 1'),
    'negative block size': (['--block-size', '-16'], '--block-size must be an integer >= 1'),
    'zero devices': (['--devices', '0'], '--devices must be an integer >= 1'),
    'non-integer devices': (['--devices', 'two'], "argument --devices: invalid int value: 'two'"),
    'devices not dividing batch': (['--devices', '3'], '--batch-size 32 does not divide by'),
    'more devices than exist': (
        ['--text', '{dir}/play.txt', '--devices', '4'],
        'XLA_FLAGS=--xla_force_host_platform_device_count=4',
    ),
    'stop after beyond steps': (['--stop-after', '900'], '--stop-after must be in [0, --steps]'),
    'missing resume dir': (['--resume', '{dir}/no-run'], 'directory not found'),
    'resume from a file': (
        ['--text', '{dir}/play.txt', '--resume', '{dir}/plain-file'],
        'not a directory',
    ),
    'resume without checkpoint': (
        ['--text', '{dir}/play.txt', '--resume', '{dir}/texts'],
        'no complete checkpoint in',
    ),
    'out is a file': (['--text', '{dir}/play.txt', '--out', '{dir}/plain-file'], 'exists and is not a directory'),
    'out under a file': (
        ['--text', '{dir}/play.txt', '--out', '{dir}/plain-file/run'],
        'cannot create or write',
    ),
}


@pytest.fixture
def bad_input_dir(tmp_path) -> Path:
  (tmp_path / 'texts').mkdir()
  (tmp_path / 'empty.txt').write_bytes(b'')
  (tmp_path / 'binary.bin').write_bytes(bytes(range(256)) * 8)
  (tmp_path / 'latin1.txt').write_bytes('caf\u00e9 cr\u00e8me\n'.encode('latin-1') * 100)
  (tmp_path / 'short.txt').write_text('To be, or not to be\n', encoding='utf-8')
  (tmp_path / 'play.txt').write_text(make_text(), encoding='utf-8')
  (tmp_path / 'plain-file').write_text('x', encoding='utf-8')
  return tmp_path


@pytest.mark.parametrize('case', BAD_INPUT_CASES)
def test_cli_bad_input_exits_with_one_line(case, bad_input_dir):
  flags, expected = BAD_INPUT_CASES[case]
  args = [flag.format(dir=bad_input_dir) for flag in flags]
  if '--out' not in args:
    args += ['--out', str(bad_input_dir / 'out')]
  result = run_train(args)
  stderr_lines = result.stderr.strip().splitlines()
  assert result.returncode != 0
  assert len(stderr_lines) == 1, result.stderr
  assert expected in stderr_lines[0]
  assert 'Traceback' not in result.stderr
  assert not (bad_input_dir / 'out').exists()
  assert not (bad_input_dir / 'texts' / 'checkpoints').exists()


# End-to-end runs.


@pytest.fixture(scope='module')
def both_runs(text_file, tmp_path_factory):
  """Start the two runs below at once, so that they share the CPU cores."""
  blend_zero_out = tmp_path_factory.mktemp('blend_zero')
  shakespeare_out = tmp_path_factory.mktemp('shakespeare')
  # Both optimizers on a small text with blend 0, so SMI-AdamW must equal AdamW.
  blend_zero = start_train(
      ['--text', str(text_file), '--blend', '0', '--out', str(blend_zero_out), *TINY_FLAGS]
  )
  # Both optimizers on the default corpus with the default blend.
  shakespeare = start_train(['--out', str(shakespeare_out), *TINY_FLAGS])
  results = {}
  for name, process, out in (
      ('blend_zero', blend_zero, blend_zero_out),
      ('shakespeare', shakespeare, shakespeare_out),
  ):
    stdout, stderr = process.communicate(timeout=300)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert result.returncode == 0, f'{name}: {result.stderr[-3000:]}'
    results[name] = (out, result)
  return results


@pytest.fixture(scope='module')
def blend_zero_run(both_runs):
  return both_runs['blend_zero']


@pytest.fixture(scope='module')
def shakespeare_run(both_runs):
  return both_runs['shakespeare']


@pytest.mark.parametrize('run_name', ['blend_zero_run', 'shakespeare_run'])
def test_run_writes_outputs(run_name, request):
  out, result = request.getfixturevalue(run_name)
  results = json.loads((out / 'results.json').read_text(encoding='utf-8'))
  assert set(results['runs']) == {'smi', 'adamw'}
  assert results['config']['steps'] == 20
  assert set(results['config']) == {field.name for field in dataclasses.fields(config_lib.Config)}
  assert results['unigram_entropy'] > 0
  for name, run in results['runs'].items():
    assert RUN_KEYS <= set(run), name
    assert [entry[0] for entry in run['history']] == [0, 10, 20]
    assert run['val_bpc'] == pytest.approx(run['val_loss'] / math.log(2))
    assert len(run['sample']) == 40
    assert (out / 'samples' / f'{name}.txt').read_text(encoding='utf-8') == run['sample']
    assert sorted(os.listdir(out / 'checkpoints' / name / 'train_state')) == ['10', '20']
  assert [entry[0] for entry in results['runs']['smi']['stats']] == [10, 20]
  assert 'stats' not in results['runs']['adamw']
  assert (out / 'loss.png').read_bytes().startswith(b'\x89PNG')
  assert (out / 'smi_stats.png').read_bytes().startswith(b'\x89PNG')
  assert 'JAX devices:' in result.stdout
  assert 'unigram entropy of the text' in result.stdout
  assert 'smi step 20: train loss' in result.stdout
  assert ', kept energy 0.' in result.stdout


def test_smi_stats_in_range(shakespeare_run):
  out, _ = shakespeare_run
  stats = json.loads((out / 'results.json').read_text(encoding='utf-8'))['runs']['smi']['stats']
  for step, kept_energy, blend in stats:
    assert 0 < kept_energy <= 1, step
    # A constant --blend gives every filtered leaf that blend.
    assert blend == pytest.approx(0.5), step


def test_blend_zero_smi_equals_adamw(blend_zero_run):
  out, _ = blend_zero_run
  runs = json.loads((out / 'results.json').read_text(encoding='utf-8'))['runs']
  np.testing.assert_allclose(runs['smi']['history'], runs['adamw']['history'], rtol=1e-6)
  assert runs['smi']['sample'] == runs['adamw']['sample']


def test_both_start_from_same_weights(shakespeare_run):
  out, _ = shakespeare_run
  runs = json.loads((out / 'results.json').read_text(encoding='utf-8'))['runs']
  # Same initial weights and evaluation batches give the same step-0 losses.
  # With blend 0.5 the SMI updates then differ from AdamW's.
  assert runs['smi']['history'][0] == runs['adamw']['history'][0]
  assert runs['smi']['history'][-1] != runs['adamw']['history'][-1]


def test_checkpoint_restores_params(blend_zero_run, text_file):
  import jax
  from flax import nnx

  import checkpointing
  import model as model_lib
  import train

  out, _ = blend_zero_run
  results = json.loads((out / 'results.json').read_text(encoding='utf-8'))
  config = config_lib.Config(**results['config'])
  corpus = data_lib.build_corpus(text_file.read_text(encoding='utf-8'), config.block_size)
  abstract_model = nnx.eval_shape(
      lambda: model_lib.GPT(
          corpus.vocabulary.size,
          config.block_size,
          n_layer=config.n_layer,
          n_head=config.n_head,
          d_model=config.d_model,
          dropout=config.dropout,
          rngs=nnx.Rngs(0),
      )
  )
  graphdef, abstract_state = nnx.split(abstract_model)
  like = nnx.to_pure_dict(abstract_state)
  smi_params = checkpointing.restore_params(out / 'checkpoints' / 'smi', like)
  adamw_params = checkpointing.restore_params(out / 'checkpoints' / 'adamw', like)

  # The restored parameters reproduce the losses recorded after the last step.
  losses = train.estimate_losses(
      train.make_eval_loss(graphdef), smi_params, corpus, config, step=config.steps
  )
  np.testing.assert_allclose(losses, results['runs']['smi']['history'][-1][1:], rtol=1e-5)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), smi_params, adamw_params
  )
