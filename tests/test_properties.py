"""Property-based tests of `smi_optax.smi` on random trees, shapes, dtypes and hyperparameters.

JAX compiles an update once per tree of shapes, and that takes most of each
example's time, so the strategies draw few, small leaves and each test runs
15 examples. Tests whose property does not depend on the shapes use one fixed
tree and `optax.inject_hyperparams`, so one compilation serves every example.
"""

import functools
import math
import os
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import reference
import smi_optax

FAST = settings(max_examples=15, deadline=None, database=None)
FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
# Axis lengths: empty, length 1, even, odd and prime, with and without a Nyquist column.
AXIS_LENGTHS = (0, 1, 2, 3, 4, 5, 7, 8, 11, 13, 16, 17)
MAX_LEAF_SIZE = 3000
# Machine epsilon per dtype, for tolerances of updates cast back to it.
EPSILON = {jnp.dtype(dtype): float(jnp.finfo(dtype).eps) for dtype in FLOAT_DTYPES}


@st.composite
def shapes(draw, min_rank=0, max_rank=4):
  """A shape of rank `min_rank`..`max_rank` with at most MAX_LEAF_SIZE elements."""
  rank = draw(st.integers(min_rank, max_rank))
  shape = []
  for _ in range(rank):
    size = math.prod(shape)
    allowed = [n for n in AXIS_LENGTHS if n * size <= MAX_LEAF_SIZE]
    shape.append(draw(st.sampled_from(allowed)))
  return tuple(shape)


@st.composite
def float_trees(draw, max_leaves=2):
  """A dict of 1..`max_leaves` floating leaves of random shape and dtype, with seed."""
  count = draw(st.integers(1, max_leaves))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  tree = {}
  for index in range(count):
    shape = draw(shapes())
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    tree[f'leaf{index}'] = jnp.asarray(rng.standard_normal(shape), dtype)
  return tree


hyperparams = st.fixed_dictionaries({
    'keep_fraction': st.floats(0.0, 1.0, exclude_min=True),
    # smi rejects a beta that rounds to 1 in float32, the EMA's precision.
    'beta': st.floats(0.0, float(np.nextafter(np.float32(1), np.float32(0)))),
    'blend': st.floats(0.0, 1.0),
})
min_sizes = st.integers(1, 64)


def is_filtered(leaf, min_size):
  return reference.is_filtered(np.asarray(leaf), min_size)


def random_like(tree, seed):
  """Standard normal gradients shaped and typed like the floating leaves of `tree`."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape), leaf.dtype)
      if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf,
      tree,
  )


def as_float64(leaf):
  return np.asarray(leaf).astype(np.float64)


def assert_bit_equal(actual, expected, message=''):
  assert actual.dtype == expected.dtype, message
  np.testing.assert_array_equal(
      np.asarray(actual).reshape(-1).view(np.uint8),
      np.asarray(expected).reshape(-1).view(np.uint8),
      err_msg=message,
  )


# Shapes, dtypes and finiteness.


@FAST
@given(
    tree=float_trees(max_leaves=1),
    params=hyperparams,
    min_size=min_sizes,
    selection=st.sampled_from(['histogram', 'exact']),
)
def test_update_shape_dtype_finite(tree, params, min_size, selection):
  tx = smi_optax.smi(**params, min_size=min_size, selection=selection)
  update = jax.jit(tx.update)
  state = tx.init(tree)
  for step, grads in enumerate([tree, random_like(tree, 1)]):
    updates, state = update(grads, state)
    for name, grad in grads.items():
      message = f'{name} {grad.shape} {grad.dtype} at step {step}'
      assert updates[name].shape == grad.shape, message
      assert updates[name].dtype == grad.dtype, message
      assert np.all(np.isfinite(as_float64(updates[name]))), message


@FAST
@given(tree=float_trees(max_leaves=1), params=hyperparams, min_size=min_sizes)
def test_blend_zero_returns_gradient(tree, params, min_size):
  tx = smi_optax.smi(**dict(params, blend=0.0), min_size=min_size, selection='exact')
  updates, _ = jax.jit(tx.update)(tree, tx.init(tree))
  for name, grad in tree.items():
    assert_bit_equal(updates[name], grad, f'{name} {grad.shape} {grad.dtype}')


@FAST
@given(tree=float_trees(max_leaves=1), params=hyperparams, min_size=min_sizes)
def test_keep_fraction_one_returns_gradient(tree, params, min_size):
  # The update (1 - alpha) * g + alpha * g is rounded once per operation, so
  # it matches g to within one unit in the last place of the gradient's
  # dtype. test_keep_fraction_one_bit_exact checks the documented exactness.
  tx = smi_optax.smi(**dict(params, keep_fraction=1.0), min_size=min_size, selection='exact')
  updates, _ = jax.jit(tx.update)(tree, tx.init(tree))
  for name, grad in tree.items():
    spacing = np.abs(as_float64(grad)) * EPSILON[grad.dtype]
    error = np.abs(as_float64(updates[name]) - as_float64(grad))
    assert np.all(error <= spacing), f'{name} {grad.shape} {grad.dtype}'


def test_keep_fraction_one_bit_exact():
  grads = jnp.asarray(np.random.default_rng(0).standard_normal(64), jnp.float32)
  tx = smi_optax.smi(keep_fraction=1.0, blend=0.3, min_size=1, selection='exact')
  # Eager only, because under jax.jit (jax 0.10.2) XLA fuses the blend and returns g exactly.
  updates, _ = tx.update(grads, tx.init(grads))
  assert_bit_equal(updates, grads)


# Agreement with the NumPy reference.

# Below this relative gap between the k-th and (k + 1)-th EMA values, float32
# and float64 rounding can disagree on the mask.
MIN_THRESHOLD_MARGIN = 1e-4
# Relative error of float32 FFTs of the sizes drawn here, with headroom.
FLOAT32_RTOL = 2e-5


def has_clear_mask(keep_fraction, coefficient_count, margin):
  """Whether float32 and the float64 reference must agree on this leaf's mask.

  They can disagree when two EMA values tie at the threshold (conjugate
  pairs in column 0 have equal magnitudes) or when keep_fraction * n is a
  near tie between two integers that float32 and float64 round apart.
  """
  product = keep_fraction * coefficient_count
  near_half = abs(product - math.floor(product) - 0.5) < 1e-3
  return margin is not None and margin > MIN_THRESHOLD_MARGIN and not near_half


@FAST
@given(tree=float_trees(), params=hyperparams, min_size=min_sizes)
def test_matches_reference(tree, params, min_size):
  # Round to float32 so both sides start from the same hyperparameters, but
  # stay in range: rounding reaches keep_fraction = 0 from a denormal and
  # beta = 1 from just below 1.
  params = {name: float(np.float32(value)) for name, value in params.items()}
  params['keep_fraction'] = max(params['keep_fraction'], float(np.finfo(np.float32).tiny))
  params['beta'] = min(params['beta'], float(np.nextafter(np.float32(1), np.float32(0))))
  tx = smi_optax.smi(**params, min_size=min_size, selection='exact')
  update = jax.jit(tx.update)
  state = tx.init(tree)
  names = list(tree)
  expected_state = reference.init([np.asarray(tree[name]) for name in names], min_size=min_size)

  for step, grads in enumerate([tree, random_like(tree, 1)]):
    updates, state = update(grads, state)
    expected, expected_state = reference.update(
        [np.asarray(grads[name]) for name in names], expected_state, **params
    )
    for index, name in enumerate(names):
      grad = grads[name]
      message = f'{name} {grad.shape} {grad.dtype} at step {step}'
      ema = expected_state['spectral_ema'][index]
      if ema is None:
        assert state.spectral_ema[name] is None, message
        continue
      np.testing.assert_allclose(
          np.asarray(state.spectral_ema[name]).reshape(-1), ema.reshape(-1),
          rtol=FLOAT32_RTOL, atol=FLOAT32_RTOL * max(np.max(ema), 1.0), err_msg=message,
      )
      if not has_clear_mask(params['keep_fraction'], ema.size, expected_state['margin'][index]):
        continue
      # The update is cast back to the gradient's dtype, which rounds it.
      scale = max(np.max(np.abs(as_float64(grad))), 1.0)
      tolerance = max(EPSILON[grad.dtype], FLOAT32_RTOL) * scale
      np.testing.assert_allclose(
          as_float64(updates[name]), expected[index], rtol=0, atol=4 * tolerance, err_msg=message
      )


# Determinism, finiteness and clipping on one fixed tree with traced hyperparameters.

FIXED_SHAPES = {'vector': (37,), 'matrix': (17, 23), 'rank3': (5, 1, 9)}
FIXED_MIN_SIZE = 16


def fixed_params():
  return {name: jnp.zeros(shape, jnp.float32) for name, shape in FIXED_SHAPES.items()}


@functools.cache
def injected(selection):
  """Builds inject_hyperparams(smi) for the fixed tree and returns (transform, jitted update)."""
  tx = optax.inject_hyperparams(smi_optax.smi, static_args=('min_size', 'selection'))(
      min_size=FIXED_MIN_SIZE, selection=selection
  )
  return tx, jax.jit(tx.update)


def injected_state(params, **hyperparams):
  """The initial inject_hyperparams state with `hyperparams` set after init."""
  tx, _ = injected('exact')
  state = tx.init(fixed_params())
  for name, value in hyperparams.items():
    state.hyperparams[name] = jnp.asarray(value, jnp.float32)
  return state


def run_injected(grad_steps, selection='exact', **hyperparams):
  # Exact selection compiles about three times faster than the histogram.
  _, update = injected(selection)
  state = injected_state(fixed_params(), **hyperparams)
  history = []
  for grads in grad_steps:
    updates, state = update(grads, state)
    history.append((updates, state))
  return history


@FAST
@given(params=hyperparams, seed=st.integers(0, 2**31 - 1))
def test_reruns_bit_identical(params, seed):
  grad_steps = [random_like(fixed_params(), seed + step) for step in range(2)]
  first = run_injected(grad_steps, 'histogram', **params)
  second = run_injected(grad_steps, 'histogram', **params)
  for step, ((updates, state), (rerun_updates, rerun_state)) in enumerate(zip(first, second)):
    for name in FIXED_SHAPES:
      assert_bit_equal(rerun_updates[name], updates[name], f'{name} at step {step}')
      assert_bit_equal(
          rerun_state.inner_state.spectral_ema[name], state.inner_state.spectral_ema[name],
          f'{name} EMA at step {step}',
      )


@FAST
@given(
    params=hyperparams,
    step=st.integers(0, 2),
    name=st.sampled_from(sorted(FIXED_SHAPES)),
    position=st.floats(0.0, 1.0, exclude_max=True),
    value=st.sampled_from([np.nan, np.inf, -np.inf]),
)
def test_nonfinite_keeps_ema(params, step, name, position, value):
  grad_steps = [random_like(fixed_params(), seed) for seed in range(3)]
  flat = np.asarray(grad_steps[step][name]).reshape(-1).copy()
  flat[int(position * flat.size)] = value
  grad_steps[step][name] = jnp.asarray(flat.reshape(FIXED_SHAPES[name]))

  history = run_injected(grad_steps, **params)
  previous = (
      injected_state(fixed_params(), **params) if step == 0 else history[step - 1][1]
  ).inner_state.spectral_ema[name]
  ema = history[step][1].inner_state.spectral_ema[name]
  assert np.all(np.isfinite(ema))
  assert_bit_equal(ema, previous)
  for later, (_, state) in enumerate(history):
    for other, other_ema in state.inner_state.spectral_ema.items():
      assert np.all(np.isfinite(other_ema)), f'{other} at step {later}'


@FAST
@given(params=hyperparams, step=st.integers(0, 1), value=st.sampled_from([np.nan, np.inf]))
def test_nonfinite_passes_gradient(params, step, value):
  grad_steps = [random_like(fixed_params(), seed) for seed in range(2)]
  grad_steps[step]['matrix'] = grad_steps[step]['matrix'].at[3, 4].set(value)
  updates, _ = run_injected(grad_steps, **params)[step]
  np.testing.assert_array_equal(updates['matrix'], grad_steps[step]['matrix'])


def test_large_finite_gradient_keeps_ema_finite():
  grads = jnp.asarray(np.random.default_rng(0).standard_normal(64) * 3e37, jnp.float32)
  tx = smi_optax.smi(min_size=1, selection='exact')
  _, state = jax.jit(tx.update)(grads, tx.init(grads))
  assert np.all(np.isfinite(state.spectral_ema))


# smi's docstring documents that traced out-of-range hyperparameters are
# clipped: keep_fraction to [0, 1] with at least one coefficient kept, blend
# to [0, 1] and beta to [0, 1].


@functools.cache
def plain_updates(**hyperparams):
  """Returns the updates of plain `smi` with in-range `hyperparams` on the clipping gradients."""
  tx = smi_optax.smi(**hyperparams, min_size=FIXED_MIN_SIZE, selection='exact')
  update = jax.jit(tx.update)
  state = tx.init(fixed_params())
  history = []
  for grads in clipping_grads():
    updates, state = update(grads, state)
    history.append(updates)
  return history


@functools.cache
def clipping_grads():
  return tuple(random_like(fixed_params(), seed) for seed in (7, 8))


def assert_clipped_matches(hyperparams, expected):
  history = run_injected(clipping_grads(), **hyperparams)
  for step, ((updates, _), expected_updates) in enumerate(zip(history, expected)):
    for name in FIXED_SHAPES:
      message = f'{name} at step {step} with {hyperparams}'
      assert np.all(np.isfinite(updates[name])), message
      np.testing.assert_allclose(
          updates[name], expected_updates[name], rtol=1e-5, atol=1e-6, err_msg=message
      )


@FAST
@given(value=st.one_of(st.floats(1.0, 10.0, exclude_min=True), st.floats(-10.0, 0.0)))
def test_traced_keep_fraction_clipped(value):
  # Values above 1 clip to 1 and values below 0 clip to 0, which keeps one
  # coefficient, as the smallest valid keep_fraction does.
  keep_fraction = 1.0 if value > 1.0 else 1e-9
  expected = plain_updates(keep_fraction=keep_fraction, beta=0.9, blend=0.5)
  assert_clipped_matches(dict(keep_fraction=value, beta=0.9, blend=0.5), expected)


@FAST
@given(value=st.one_of(
    st.floats(1.0, 10.0, exclude_min=True), st.floats(-10.0, 0.0, exclude_max=True)
))
def test_traced_blend_clipped(value):
  blend = 1.0 if value > 1.0 else 0.0
  expected = plain_updates(keep_fraction=0.5, beta=0.9, blend=blend)
  assert_clipped_matches(dict(keep_fraction=0.5, beta=0.9, blend=value), expected)


@FAST
@given(value=st.floats(1.0, 10.0))
def test_traced_beta_clipped(value):
  # beta clipped to 1 keeps the EMA at its initial zeros.
  history = run_injected(clipping_grads(), keep_fraction=0.5, beta=value, blend=0.5)
  for step, (updates, state) in enumerate(history):
    for name in FIXED_SHAPES:
      message = f'{name} at step {step}'
      assert np.all(np.isfinite(updates[name])), message
      np.testing.assert_array_equal(
          state.inner_state.spectral_ema[name], np.zeros_like(state.inner_state.spectral_ema[name]),
          err_msg=message,
      )


# Trees as optax users pass them.


@st.composite
def mixed_trees(draw):
  """A nested tree of floating leaves mixed with None, MaskedNode, int and bool leaves."""
  kinds = draw(st.lists(
      st.sampled_from(['float', 'none', 'masked', 'int', 'bool', 'scalar', 'empty_dict',
                       'empty_list']),
      min_size=1, max_size=5,
  ))
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  leaves = []
  for kind in kinds:
    if kind == 'float':
      leaves.append(jnp.asarray(rng.standard_normal(draw(shapes(1, 2))), jnp.float32))
    elif kind == 'none':
      leaves.append(None)
    elif kind == 'masked':
      leaves.append(optax.MaskedNode())
    elif kind == 'int':
      leaves.append(jnp.asarray(rng.integers(-5, 5, draw(shapes(0, 2))), jnp.int32))
    elif kind == 'bool':
      leaves.append(jnp.asarray(rng.integers(0, 2, draw(shapes(0, 2))), bool))
    elif kind == 'scalar':
      leaves.append(jnp.float32(rng.standard_normal()))
    elif kind == 'empty_dict':
      leaves.append({})
    else:
      leaves.append([])
  # The first half goes in a tuple, the rest in a list one level down.
  middle = len(leaves) // 2
  return {'top': tuple(leaves[:middle]), 'nested': {'items': leaves[middle:]}}


def filtered_count(tree, min_size):
  return sum(is_filtered(leaf, min_size) for leaf in jax.tree.leaves(tree))


@FAST
@given(tree=mixed_trees(), min_size=st.integers(1, 16))
def test_mixed_tree_structure(tree, min_size):
  tx = smi_optax.smi(min_size=min_size, selection='exact')
  state = tx.init(tree)
  updates, state = jax.jit(tx.update)(tree, state)
  assert jax.tree.structure(updates) == jax.tree.structure(tree)
  assert len(jax.tree.leaves(state.spectral_ema)) == filtered_count(tree, min_size)


@FAST
@given(tree=mixed_trees(), min_size=st.integers(1, 16))
def test_mixed_tree_passes_non_float(tree, min_size):
  tx = smi_optax.smi(min_size=min_size, selection='exact')
  updates, _ = jax.jit(tx.update)(tree, tx.init(tree))
  for (path, leaf), update in zip(
      jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(updates)
  ):
    if not is_filtered(leaf, min_size):
      assert_bit_equal(update, leaf, jax.tree_util.keystr(path))


@pytest.mark.parametrize('tree', [{}, [], ()], ids=['dict', 'list', 'tuple'])
def test_empty_tree(tree):
  tx = smi_optax.smi_adamw(0.1)
  state = tx.init(tree)
  updates, _ = tx.update(tree, state, tree)
  assert updates == tree


def test_float0_gradient_passes():
  # jax.grad(..., allow_int=True) returns float0 gradients for integer leaves.
  params = {'steps': jnp.arange(40, dtype=jnp.int32), 'weight': jnp.ones((8, 8))}
  grads = jax.grad(lambda p: jnp.sum(p['weight'] ** 2), allow_int=True)(params)
  tx = smi_optax.smi(min_size=16, selection='exact')
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert updates['steps'].dtype == jax.dtypes.float0


def test_frozen_dict_params():
  model = flax.linen.Dense(40)
  params = flax.core.freeze(model.init(jax.random.key(0), jnp.ones((2, 30))))
  grads = jax.tree.map(jnp.ones_like, params)
  tx = smi_optax.smi_adamw(0.1, min_size=64, selection='exact')
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert isinstance(updates, flax.core.FrozenDict)
  assert state[0].spectral_ema['params']['kernel'].shape == (30, 21)
  assert state[0].spectral_ema['params']['bias'] is None


class TinyModel(nnx.Module):

  def __init__(self, rngs):
    self.linear = nnx.Linear(3, 40, rngs=rngs)
    self.norm = nnx.BatchNorm(40, rngs=rngs)

  def __call__(self, x):
    return self.norm(self.linear(x))


def test_nnx_state_params():
  model = TinyModel(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  grads = nnx.grad(lambda model: jnp.sum(model.linear(jnp.ones((4, 3))) ** 2))(model)
  tx = smi_optax.smi(min_size=64, selection='exact')
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert jax.tree.structure(updates) == jax.tree.structure(grads)
  assert len(jax.tree.leaves(state.spectral_ema)) == 1  # only the (3, 40) kernel


def test_nnx_optimizer_step():
  model = TinyModel(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, smi_optax.smi_adamw(0.1, min_size=64, selection='exact'),
                            wrt=nnx.Param)
  before = np.asarray(model.linear.kernel[...])

  @nnx.jit
  def step(model, optimizer):
    loss = lambda model: jnp.sum(model.linear(jnp.ones((4, 3))) ** 2)
    optimizer.update(model, nnx.grad(loss)(model))

  step(model, optimizer)
  assert not np.allclose(np.asarray(model.linear.kernel[...]), before)


# float64 in a fresh interpreter, because x64 is fixed at JAX start-up.

FLOAT64_SCRIPT = """
import jax
import jax.numpy as jnp
import numpy as np
import reference
import smi_optax

rng = np.random.default_rng(0)
for shape in [(37,), (5, 1, 9), (2, 1)]:
  grads = jnp.asarray(rng.standard_normal(shape))
  assert grads.dtype == jnp.float64
  tx = smi_optax.smi(keep_fraction=0.37, beta=0.8, blend=0.6, min_size=1, selection='exact')
  updates, state = jax.jit(tx.update)(grads, tx.init(grads))
  expected, expected_state = reference.update(
      [np.asarray(grads)], reference.init([np.asarray(grads)], min_size=1),
      keep_fraction=0.37, beta=0.8, blend=0.6)
  assert updates.dtype == jnp.float64, (shape, updates.dtype)
  assert bool(jnp.all(jnp.isfinite(updates))), shape
  margin = expected_state['margin'][0]
  if margin is not None and margin > 1e-4:
    np.testing.assert_allclose(np.asarray(updates), expected[0], rtol=1e-6, atol=1e-6,
                               err_msg=str(shape))
print('float64 ok')
"""


def test_float64_matches_reference():
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, JAX_ENABLE_X64='1', JAX_PLATFORMS='cpu')
  env['PYTHONPATH'] = os.pathsep.join(
      [os.path.dirname(tests_dir), tests_dir, env.get('PYTHONPATH', '')]
  )
  result = subprocess.run(
      [sys.executable, '-c', textwrap.dedent(FLOAT64_SCRIPT)],
      env=env, capture_output=True, text=True, timeout=120, check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'float64 ok' in result.stdout
