"""Shared fixtures for the smi_optax tests."""

import os
import subprocess
import sys
import textwrap

# The tests run small arrays through many distinct shapes, so compiling
# dominates their time; XLA's unoptimized backend compiles several times
# faster. Subprocesses inherit the flag. Set XLA_FLAGS yourself to override.
os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')

import numpy as np
import pytest

# Sizes that exercise odd lengths, Nyquist columns and every rank up to 4.
FILTERED_SHAPES = {
    'vector': (37,),
    'matrix': (17, 23),
    'rank3': (5, 7, 9),
    'rank4': (3, 4, 5, 6),
    'wide': (64, 129),
}
# min_size used with `mixed_params`: 'small' (6 elements) stays below it.
MIXED_MIN_SIZE = 16


@pytest.fixture(scope='session')
def mixed_params():
  """A parameter tree with filtered leaves and three pass-through leaves.

  'small' is below MIXED_MIN_SIZE, 'steps' is an int32 leaf and 'scale' is a
  scalar, so `smi(min_size=MIXED_MIN_SIZE)` stores None for them in its state.
  """
  params = {name: np.zeros(shape, np.float32) for name, shape in FILTERED_SHAPES.items()}
  params['small'] = np.zeros((2, 3), np.float32)
  params['steps'] = np.arange(40, dtype=np.int32).reshape(5, 8)
  params['scale'] = np.float32(1.0)
  return params


@pytest.fixture(scope='session')
def mixed_min_size():
  """The min_size that makes 'small' in `mixed_params` a pass-through leaf."""
  return MIXED_MIN_SIZE


def _random_grads(params, seed: int):
  rng = np.random.default_rng(seed)
  grads = {}
  for name, leaf in params.items():
    leaf = np.asarray(leaf)
    if np.issubdtype(leaf.dtype, np.floating):
      grads[name] = rng.standard_normal(leaf.shape).astype(leaf.dtype)
    else:
      grads[name] = leaf
  return grads


@pytest.fixture(scope='session')
def make_grads():
  """Return a function (params, seed) -> standard normal gradients.

  Floating leaves get float32 noise of their shape; other leaves are returned
  unchanged.
  """
  return _random_grads


@pytest.fixture(scope='session')
def grad_steps(mixed_params):
  """Three gradients for `mixed_params`, one per update step."""
  return [_random_grads(mixed_params, seed) for seed in (11, 12, 13)]


@pytest.fixture(scope='session')
def run_with_host_devices():
  """Return a function that runs a Python script with several host CPU devices.

  JAX fixes the number of devices when it initializes its backend, so a test
  that needs several devices runs its script in a fresh interpreter with
  `--xla_force_host_platform_device_count`.
  """

  def run(script: str, device_count: int = 4, timeout: float = 120.0):
    env = dict(os.environ)
    env['XLA_FLAGS'] = (
        env.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={device_count}'
    ).strip()
    env['JAX_PLATFORMS'] = 'cpu'
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env['PYTHONPATH'] = os.pathsep.join(
        [repo_root, os.path.dirname(os.path.abspath(__file__)), env.get('PYTHONPATH', '')]
    )
    return subprocess.run(
        [sys.executable, '-c', textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )

  return run
