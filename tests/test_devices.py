"""Tests of `smi_optax.smi` under pmap and sharded jit on several host CPU devices.

One script runs every case in a fresh interpreter with four forced host
devices (see the `run_with_host_devices` fixture). It prints a JSON object
that maps each case to its maximum absolute differences from the
single-device update, and each test checks one case.
"""

import json

import pytest

DEVICE_COUNT = 4

# Shared by the scripts: a tree with a matrix, a vector and a pass-through
# leaf, and the single-device updates of the mean gradient over two steps.
SETUP = """
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import smi_optax

assert jax.device_count() == {device_count}, jax.devices()
devices = jax.device_count()
params = {{
    'w': np.zeros((24, 40), np.float32),
    'v': np.zeros((1500,), np.float32),
    'b': np.zeros((8,), np.float32),
}}
tx = smi_optax.smi(keep_fraction=0.31, beta=0.8, blend=0.7, min_size=16)
rng = np.random.default_rng(0)
# Per step, one gradient per device, as if each device had its own batch.
per_device = [
    {{name: rng.standard_normal((devices,) + p.shape).astype(np.float32) for name, p in params.items()}}
    for _ in range(2)
]
mean_grads = [{{name: g.mean(axis=0) for name, g in grads.items()}} for grads in per_device]

single_update = jax.jit(tx.update)
state = tx.init(params)
single = []
for grads in mean_grads:
  updates, state = single_update(grads, state)
  single.append(updates)
results = {{}}


# Stacks a copy per device along a new leading axis, as pmap expects.
def replicate(tree):
  return jax.tree.map(lambda x: np.stack([np.asarray(x)] * devices), tree)


def max_differences(actual_steps, expected_steps):
  return {{
      f'{{name}}@{{step}}': float(np.max(np.abs(np.asarray(actual[name]) - np.asarray(expected[name]))))
      for step, (actual, expected) in enumerate(zip(actual_steps, expected_steps))
      for name in params
  }}
"""

PMAP_PMEAN = """
def step(grads, state):
  grads = jax.lax.pmean(grads, axis_name='devices')
  return tx.update(grads, state)

pmapped = jax.pmap(step, axis_name='devices')
state = replicate(tx.init(params))
device_updates = []
for grads in per_device:
  updates, state = pmapped(grads, state)
  device_updates.append(updates)

# Every device must hold the single-device update.
differences = {}
for device in range(devices):
  per_step = [{name: u[name][device] for name in params} for u in device_updates]
  for key, value in max_differences(per_step, single).items():
    differences[f'{key}/device{device}'] = value
results['pmean'] = differences
"""

PMAP_REPLICATED = """
# Identical inputs on every device, without a collective.
pmapped = jax.pmap(tx.update)
state = replicate(tx.init(params))
device_updates = []
for grads in mean_grads:
  replicated = {name: np.stack([g] * devices) for name, g in grads.items()}
  updates, state = pmapped(replicated, state)
  device_updates.append(updates)

differences = {}
for device in range(devices):
  per_step = [{name: u[name][device] for name in params} for u in device_updates]
  for key, value in max_differences(per_step, single).items():
    differences[f'{key}/device{device}'] = value
results['replicated'] = differences
"""

SHARDED_JIT = """
from jax.sharding import Mesh, NamedSharding, PartitionSpec

mesh = Mesh(np.array(jax.devices()), ('data',))
# Shard the first axis of the matrix and the vector, and replicate 'b'.
specs = {'w': PartitionSpec('data'), 'v': PartitionSpec('data'), 'b': PartitionSpec()}
shardings = {name: NamedSharding(mesh, spec) for name, spec in specs.items()}
sharded_update = jax.jit(tx.update)
state = tx.init(params)
sharded = []
for grads in mean_grads:
  grads = {name: jax.device_put(g, shardings[name]) for name, g in grads.items()}
  updates, state = sharded_update(grads, state)
  sharded.append(updates)
results['sharded'] = max_differences(sharded, single)
print(json.dumps(results))
"""


# The mean over devices may sum in another order than NumPy, so the EMA and
# the updates can differ by float32 rounding.
TOLERANCE = 1e-5


@pytest.fixture(scope='module')
def device_differences(run_with_host_devices):
  """Run every multi-device case once; return {case: {leaf@step: difference}}."""
  script = SETUP.format(device_count=DEVICE_COUNT) + PMAP_PMEAN + PMAP_REPLICATED + SHARDED_JIT
  result = run_with_host_devices(script, device_count=DEVICE_COUNT)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('case', ['pmean', 'replicated'])
def test_pmap_matches_single_device(device_differences, case):
  differences = device_differences[case]
  assert len(differences) == 2 * 3 * DEVICE_COUNT
  for key, difference in differences.items():
    assert difference <= TOLERANCE, f'{key}: {difference}'


def test_sharded_jit_matches_single_device(device_differences):
  differences = device_differences['sharded']
  assert len(differences) == 2 * 3
  for key, difference in differences.items():
    assert difference <= TOLERANCE, f'{key}: {difference}'
