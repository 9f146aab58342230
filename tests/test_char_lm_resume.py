"""Tests of data-parallel training, checkpoints and --resume in examples/char_lm."""

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from test_char_lm import TINY_FLAGS
from test_char_lm import compile_cache  # noqa: F401  (autouse: the shared compilation cache)
from test_char_lm import make_text
from test_char_lm import run_train
from test_char_lm import start_train

# SMI only, with 8 sequences per batch so that 8 devices get one each.
RUN_FLAGS = [*TINY_FLAGS, '--optimizer', 'smi', '--batch-size', '8']
STEPS = 20
EIGHT_HOST_DEVICES = '--xla_force_host_platform_device_count=8'
# Relative difference of the losses of 8 devices and of 1: 2.6e-7 at most over
# 20 steps (2 CPU cores, jax 0.10.2), from the different order of the sums.
DEVICES_RTOL = 2e-5


@pytest.fixture(scope='module')
def text_file(tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp('resume_text') / 'play.txt'
  path.write_text(make_text(), encoding='utf-8')
  return path


def run_flags(text_file: Path, out: Path, *extra: str) -> list[str]:
  return ['--text', str(text_file), '--out', str(out), *RUN_FLAGS, *extra]


def check_finished(result, out: Path) -> dict:
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads((out / 'results.json').read_text(encoding='utf-8'))['runs']['smi']


@pytest.fixture(scope='module')
def reference_run(text_file, tmp_path_factory):
  """An unbroken run on one device, and one on 8 host devices started alongside it."""
  out = tmp_path_factory.mktemp('reference')
  out_8 = tmp_path_factory.mktemp('eight_devices')
  eight = start_train(run_flags(text_file, out_8, '--devices', '8'), xla_flags=EIGHT_HOST_DEVICES)
  result = run_train(run_flags(text_file, out))
  stdout_8, stderr_8 = eight.communicate(timeout=300)
  assert eight.returncode == 0, stderr_8[-3000:]
  return out, out_8, stdout_8


def saved_steps(out: Path) -> list[int]:
  """Return the complete (renamed) steps in the SMI run's checkpoint directory."""
  directory = out / 'checkpoints' / 'smi' / 'train_state'
  if not directory.is_dir():
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def load_train_state(out: Path) -> list[np.ndarray]:
  """Return the leaves of the parameters and optimizer state at the newest saved step."""
  import jax
  import orbax.checkpoint as ocp

  directory = (out / 'checkpoints' / 'smi' / 'train_state').resolve()
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  restored = manager.restore(
      manager.latest_step(),
      args=ocp.args.Composite(
          params=ocp.args.StandardRestore(), opt_state=ocp.args.StandardRestore()
      ),
  )
  manager.close()
  return [np.asarray(leaf) for leaf in jax.tree.leaves([restored['params'], restored['opt_state']])]


def assert_same_state(out: Path, reference: Path):
  actual, expected = load_train_state(out), load_train_state(reference)
  assert len(actual) == len(expected)
  for index, (a, b) in enumerate(zip(actual, expected)):
    np.testing.assert_array_equal(a, b, err_msg=f'leaf {index}')


def start_and_wait_for_step(args: list[str], out: Path, step: int):
  """Start train.py and return it once a checkpoint at `step` or later is complete."""
  process = start_train(args)
  deadline = time.monotonic() + 240
  while not [s for s in saved_steps(out) if s >= step]:
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.monotonic() < deadline, 'no checkpoint appeared in time'
    time.sleep(0.02)
  return process


def test_devices_8_matches_1_device(reference_run):
  out, out_8, stdout_8 = reference_run
  runs = [json.loads((d / 'results.json').read_text(encoding='utf-8')) for d in (out, out_8)]
  one, eight = runs[0]['runs']['smi'], runs[1]['runs']['smi']
  assert len(runs[1]['devices']) == 8
  assert len(stdout_8.splitlines()[0].removeprefix('JAX devices: ').split(', ')) == 8
  assert [entry[0] for entry in eight['history']] == [0, 10, 20]
  np.testing.assert_allclose(eight['history'], one['history'], rtol=DEVICES_RTOL)
  np.testing.assert_allclose(eight['stats'], one['stats'], rtol=DEVICES_RTOL)


def test_stop_after_then_resume_is_bit_identical(reference_run, text_file, tmp_path):
  reference, _, _ = reference_run
  out = tmp_path / 'run'
  stopped = run_train(run_flags(text_file, out, '--stop-after', '10'))
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  assert 'stopped after step 10' in stopped.stdout
  assert saved_steps(out) == [10]
  assert not (out / 'results.json').exists()

  resumed = run_train(['--resume', str(out), *RUN_FLAGS, '--text', str(text_file)])
  run = check_finished(resumed, out)
  assert 'smi: resumed at step 10' in resumed.stdout
  expected = json.loads((reference / 'results.json').read_text(encoding='utf-8'))['runs']['smi']
  assert run['history'] == expected['history']
  assert run['stats'] == expected['stats']
  assert run['sample'] == expected['sample']
  assert_same_state(out, reference)


def test_sigkill_then_resume_is_bit_identical(reference_run, text_file, tmp_path):
  reference, _, _ = reference_run
  out = tmp_path / 'run'
  # A checkpoint at every step gives the kill a wide window before the end.
  process = start_and_wait_for_step(run_flags(text_file, out, '--eval-interval', '1'), out, 10)
  process.send_signal(signal.SIGKILL)
  process.communicate(timeout=60)
  assert process.returncode == -signal.SIGKILL
  assert 10 <= max(saved_steps(out)) < STEPS
  assert not (out / 'results.json').exists()

  resumed = run_train(['--resume', str(out), *RUN_FLAGS, '--text', str(text_file)])
  check_finished(resumed, out)
  assert [name for name in os.listdir(out / 'checkpoints' / 'smi' / 'train_state')
          if 'tmp' in name] == []  # fmt: skip
  assert_same_state(out, reference)


def test_sigterm_saves_resumable_checkpoint(reference_run, text_file, tmp_path):
  import jax
  from flax import nnx

  import checkpointing
  import config as config_lib
  import data as data_lib
  import model as model_lib
  import train

  reference, _, _ = reference_run
  out = tmp_path / 'run'
  process = start_and_wait_for_step(run_flags(text_file, out, '--eval-interval', '1'), out, 10)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 143, stderr[-3000:]
  last_line = stderr.strip().splitlines()[-1]
  assert last_line.startswith('train.py: stopped by SIGTERM after step ')
  assert last_line.endswith(f'--resume {out}')
  stopped_step = int(last_line.split('after step ')[1].split()[0])
  assert max(saved_steps(out)) == stopped_step

  # The saved parameters load by themselves and reproduce the saved history.
  config = config_lib.parse_config(run_flags(text_file, out))
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
  params = checkpointing.restore_params(out / 'checkpoints' / 'smi', nnx.to_pure_dict(abstract_state))
  assert jax.tree.structure(params) == jax.tree.structure(nnx.to_pure_dict(abstract_state))
  meta = checkpointing.read_meta(out / 'checkpoints' / 'smi' / 'train_state', stopped_step)
  assert meta['step'] == stopped_step
  # With --eval-interval 1 every step, the stopped one included, has an evaluation.
  last_eval = meta['history'][-1]
  assert last_eval[0] == stopped_step
  losses = train.estimate_losses(
      train.make_eval_loss(graphdef), params, corpus, config, step=stopped_step
  )
  np.testing.assert_allclose(losses, last_eval[1:], rtol=1e-5)

  resumed = run_train(['--resume', str(out), *RUN_FLAGS, '--text', str(text_file)])
  check_finished(resumed, out)
  assert f'smi: resumed at step {stopped_step}' in resumed.stdout
  assert_same_state(out, reference)


@pytest.mark.parametrize(
    'flags, expected',
    [
        (['--d-model', '64'], "--d-model is 64 but the checkpoint has 32; pass --d-model 32"),
        (['--steps', '40'], '--steps is 40 but the checkpoint has 20'),
        (['--lr', '0.002'], '--lr is 0.002 but the checkpoint has 0.001'),
        (['--optimizer', 'both'], "--optimizer is 'both' but the checkpoint has 'smi'"),
        (['--text', '{other_text}'], 'which has different content'),
    ],
)
def test_resume_mismatch_exits_with_one_line(reference_run, text_file, tmp_path, flags, expected):
  stopped_run, _, _ = reference_run
  other_text = tmp_path / 'other.txt'
  other_text.write_text(make_text(900), encoding='utf-8')
  args = ['--resume', str(stopped_run), *RUN_FLAGS, '--text', str(text_file)]
  args += [flag.format(other_text=other_text) for flag in flags]
  before = sorted(os.listdir(stopped_run / 'checkpoints' / 'smi' / 'train_state'))
  result = run_train(args)
  stderr_lines = result.stderr.strip().splitlines()
  assert result.returncode == 2
  assert len(stderr_lines) == 1, result.stderr
  assert f'--resume {stopped_run}: ' in stderr_lines[0]
  assert expected in stderr_lines[0]
  assert sorted(os.listdir(stopped_run / 'checkpoints' / 'smi' / 'train_state')) == before
