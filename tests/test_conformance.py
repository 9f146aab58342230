"""The checks that optax runs on its own contrib optimizers, applied to `smi` and `smi_adamw`.

Each test builds the optimizer the way an optax user would: `smi` chained
with `optax.sgd` where a full optimizer is needed, and `smi_adamw` as it is.
Compiling an update takes seconds on CPU, so runs that several tests inspect
are computed once per module by the `cached` helpers below.
"""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import smi_optax

LEARNING_RATE = 0.05
# 'bias' (6 elements) stays below MIN_SIZE, so SMI passes it through.
MIN_SIZE = 32
SHAPES = {
    'kernel': (16, 24),
    'conv': (3, 5, 8),
    'vector': (40,),
    'bias': (6,),
}
FILTERED = ('kernel', 'conv', 'vector')
HYPERPARAMS = dict(keep_fraction=0.3, beta=0.8, blend=0.7)
STEPS = 3
# Float32 FFTs of unit-scale gradients round at about 1e-7 relative.
CLOSE = dict(rtol=1e-5, atol=1e-6)
DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


def make_params(dtype=jnp.float32):
  return {name: jnp.ones(shape, dtype) for name, shape in SHAPES.items()}


def make_grads(seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {
      name: jnp.asarray(rng.standard_normal(shape), dtype) for name, shape in SHAPES.items()
  }


def grad_steps(count=STEPS, dtype=jnp.float32):
  return [make_grads(seed, dtype) for seed in range(count)]


def smi_kwargs(**overrides):
  # Exact selection compiles about three times faster than the default
  # histogram on CPU (measured with jax 0.10.2).
  kwargs = dict(HYPERPARAMS, min_size=MIN_SIZE, selection='exact')
  kwargs.update(overrides)
  return kwargs


def build(name, **overrides):
  """The `name` optimizer: smi chained with sgd, or smi_adamw."""
  if name == 'smi':
    return optax.chain(smi_optax.smi(**smi_kwargs(**overrides)), optax.sgd(LEARNING_RATE))
  return smi_optax.smi_adamw(LEARNING_RATE, **smi_kwargs(**overrides))


def build_injected(name):
  """The `name` optimizer with SMI's numeric hyperparameters in its state."""
  if name == 'smi':
    injected = optax.inject_hyperparams(smi_optax.smi)(**smi_kwargs())
    return optax.chain(injected, optax.sgd(LEARNING_RATE))
  return optax.inject_hyperparams(smi_optax.smi_adamw)(LEARNING_RATE, **smi_kwargs())


optimizer_names = pytest.mark.parametrize('name', ['smi', 'smi_adamw'])


def run_steps(tx, params, steps, update=None):
  """Applies `tx` to each gradient in turn and returns the list of (updates, state)."""
  state = tx.init(params)
  update = update or jax.jit(tx.update)
  history = []
  for grads in steps:
    updates, state = update(grads, state, params)
    history.append((updates, state))
  return history


@functools.cache
def plain_run(name):
  """Runs `build(name)` over `grad_steps()` and returns the list of (updates, state)."""
  return run_steps(build(name), make_params(), grad_steps())


@functools.cache
def injected_run(name):
  """Runs `build_injected(name)` over `grad_steps()` and returns (history, jitted update)."""
  tx = build_injected(name)
  update = jax.jit(tx.update)
  return run_steps(tx, make_params(), grad_steps(), update), update


def assert_trees_close(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, leaf), expected_leaf in zip(
      jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)
  ):
    np.testing.assert_allclose(
        np.asarray(leaf, np.float64),
        np.asarray(expected_leaf, np.float64),
        err_msg=jax.tree_util.keystr(path),
        **CLOSE,
    )


def trees_equal(a, b):
  """Whether two trees have the same structure and bit-identical leaves."""
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(
      np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def dtype_signature(tree):
  """The tree with each leaf replaced by (shape, dtype, weak_type)."""
  return jax.tree.map(
      lambda leaf: (tuple(leaf.shape), jnp.dtype(leaf.dtype), getattr(leaf, 'weak_type', False)),
      tree,
  )


def find_smi_state(opt_state):
  """The first `SMIState` inside an optimizer state."""
  nodes = jax.tree.leaves(opt_state, is_leaf=lambda node: isinstance(node, smi_optax.SMIState))
  return next(node for node in nodes if isinstance(node, smi_optax.SMIState))


# inject_hyperparams.


@optimizer_names
def test_inject_hyperparams_matches_plain(name):
  injected, _ = injected_run(name)
  for step, ((updates, _), (expected, _)) in enumerate(zip(injected, plain_run(name))):
    for leaf in SHAPES:
      np.testing.assert_allclose(
          updates[leaf], expected[leaf], **CLOSE, err_msg=f'{leaf!r} at step {step}'
      )


@optimizer_names
def test_inject_hyperparams_no_recompile(name):
  _, update = injected_run(name)
  assert update._cache_size() == 1


@optimizer_names
def test_inject_hyperparams_state_dtypes(name):
  history, _ = injected_run(name)
  initial = build_injected(name).init(make_params())
  assert dtype_signature(history[-1][1]) == dtype_signature(initial)


# Gradient accumulation.

EVERY_K = 3


@functools.cache
def multisteps_run(name):
  """Runs MultiSteps(build(name), k) over 2k gradients and returns the params after each step."""
  tx = optax.MultiSteps(build(name), every_k_schedule=EVERY_K)
  params = make_params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  trajectory = []
  for grads in grad_steps(2 * EVERY_K):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    trajectory.append(params)
  return trajectory


@optimizer_names
def test_multisteps_updates_every_k(name):
  previous = make_params()
  for step, params in enumerate(multisteps_run(name)):
    changed = not trees_equal(params, previous)
    assert changed == ((step + 1) % EVERY_K == 0), f'step {step}'
    previous = params


@optimizer_names
def test_multisteps_matches_mean_gradient(name):
  steps = grad_steps(2 * EVERY_K)
  means = [
      jax.tree.map(lambda *leaves: sum(leaves) / EVERY_K, *steps[start : start + EVERY_K])
      for start in range(0, len(steps), EVERY_K)
  ]
  tx = build(name)
  update = jax.jit(tx.update)
  params = make_params()
  state = tx.init(params)
  for grads in means:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert_trees_close(multisteps_run(name)[-1], params)


# Wrappers.

SELECTED = {name: name != 'vector' for name in SHAPES}


@functools.cache
def masked_run():
  tx = optax.masked(smi_optax.smi(**smi_kwargs()), SELECTED)
  return run_steps(tx, make_params(), grad_steps(1))[0][0]


def test_masked_passes_other_leaves():
  np.testing.assert_array_equal(masked_run()['vector'], make_grads(0)['vector'])


def test_masked_matches_subtree():
  tx = smi_optax.smi(**smi_kwargs())
  subtree = {name: leaf for name, leaf in make_grads(0).items() if SELECTED[name]}
  params = {name: make_params()[name] for name in subtree}
  expected = run_steps(tx, params, [subtree])[0][0]
  assert_trees_close({name: masked_run()[name] for name in subtree}, expected)


LABELS = {name: 'spectral' if name in ('kernel', 'conv') else 'plain' for name in SHAPES}


@functools.cache
def partition_run():
  transforms = {'spectral': build('smi_adamw'), 'plain': optax.sgd(0.1)}
  # optax 0.2.8 defines multi_transform as an alias of partition.
  tx = optax.partition(transforms, LABELS)
  return run_steps(tx, make_params(), grad_steps(2))


def test_partition_matches_subtree():
  names = [name for name, label in LABELS.items() if label == 'spectral']
  subtree_steps = [{name: grads[name] for name in names} for grads in grad_steps(2)]
  params = {name: make_params()[name] for name in names}
  expected = run_steps(build('smi_adamw'), params, subtree_steps)
  actual = {name: partition_run()[-1][0][name] for name in names}
  assert_trees_close(actual, expected[-1][0])


def test_partition_other_leaves_use_sgd():
  updates = partition_run()[-1][0]
  np.testing.assert_allclose(updates['vector'], -0.1 * grad_steps(2)[-1]['vector'], rtol=1e-6)


def test_partition_stats_skip_other_leaves():
  keys = set(smi_optax.stats(partition_run()[-1][1]))
  assert keys == {'kept_energy/kernel', 'kept_energy/conv', 'blend/kernel', 'blend/conv',
                  'kept_energy_mean', 'blend_mean'}


@functools.cache
def nan_step_run():
  """Runs apply_if_finite(smi_adamw) over gradients 0, NaN, 2 and, separately, over 0, 2."""
  tx = optax.apply_if_finite(build('smi_adamw'), max_consecutive_errors=3)
  update = jax.jit(tx.update)
  nan_grads = make_grads(1)
  nan_grads['kernel'] = nan_grads['kernel'].at[2, 3].set(jnp.nan)
  with_nan = run_steps(tx, make_params(), [make_grads(0), nan_grads, make_grads(2)], update)
  without_nan = run_steps(tx, make_params(), [make_grads(0), make_grads(2)], update)
  return with_nan, without_nan


def test_apply_if_finite_zero_update():
  updates, _ = nan_step_run()[0][1]
  for name, leaf in updates.items():
    np.testing.assert_array_equal(leaf, np.zeros(SHAPES[name]), err_msg=name)


def test_apply_if_finite_keeps_inner_state():
  with_nan, _ = nan_step_run()
  assert trees_equal(with_nan[1][1].inner_state, with_nan[0][1].inner_state)


def test_apply_if_finite_counts_error():
  with_nan, _ = nan_step_run()
  assert int(with_nan[1][1].notfinite_count) == 1


def test_apply_if_finite_resumes():
  with_nan, without_nan = nan_step_run()
  assert trees_equal(with_nan[2][0], without_nan[1][0])


# mask= and views=.


def vector_off(params):
  return {name: name != 'vector' for name in params}


def mask_argument(kind):
  return vector_off if kind == 'callable' else vector_off(SHAPES)


mask_kinds = pytest.mark.parametrize('kind', ['tree', 'callable'])


@mask_kinds
def test_mask_holds_none(kind):
  state = smi_optax.smi(**smi_kwargs(mask=mask_argument(kind))).init(make_params())
  assert state.spectral_ema['vector'] is None
  assert state.threshold['vector'] is None
  assert state.spectral_ema['kernel'] is not None


@mask_kinds
def test_mask_passes_through(kind):
  tx = build('smi', mask=mask_argument(kind))
  updates = run_steps(tx, make_params(), grad_steps(1))[0][0]
  expected = plain_run('smi')[0][0]
  np.testing.assert_array_equal(updates['vector'], -LEARNING_RATE * make_grads(0)['vector'])
  np.testing.assert_array_equal(updates['kernel'], expected['kernel'])


def conv_view(params):
  """Returns views that make axis 1 of 'conv' a batch axis, with defaults elsewhere."""
  view = smi_optax.SpectralView(row_axes=(0,), col_axes=(2,))
  return {name: view if name == 'conv' else None for name in params}


def view_argument(kind):
  return conv_view if kind == 'callable' else conv_view(SHAPES)


@mask_kinds
def test_views_ema_shape(kind):
  state = smi_optax.smi(**smi_kwargs(views=view_argument(kind))).init(make_params())
  rows, batch, cols = SHAPES['conv']
  assert state.spectral_ema['conv'].shape == (batch, rows, cols // 2 + 1)


@functools.cache
def conv_view_update():
  tx = build('smi', views=conv_view)
  return tx, jax.jit(tx.update)


def test_views_change_conv_only():
  tx, update = conv_view_update()
  updates = run_steps(tx, make_params(), grad_steps(1), update)[0][0]
  expected = plain_run('smi')[0][0]
  np.testing.assert_array_equal(updates['kernel'], expected['kernel'])
  assert not np.allclose(updates['conv'], expected['conv'])


def test_views_batch_axis_not_mixed():
  # Each slice conv[:, j, :] gets its own 2-D FFT, so a gradient that is zero
  # outside slice 2 gives an update that is zero outside slice 2. The default
  # view, rows = axes 0 and 1, would spread it over the other slices.
  grads = make_grads(0)
  grads['conv'] = jnp.zeros(SHAPES['conv']).at[:, 2, :].set(grads['conv'][:, 2, :])
  tx, update = conv_view_update()
  updates = run_steps(tx, make_params(), [grads], update)[0][0]
  outside = np.delete(np.asarray(updates['conv']), 2, axis=1)
  np.testing.assert_array_equal(outside, np.zeros_like(outside))


# Extra arguments and compilation.


@functools.cache
def extra_args_run(name):
  """Runs `build(name)` jitted over `grad_steps()` with an extra keyword argument.

  Returns the history and the number of times the update was traced.
  """
  tx = build(name)
  traces = []

  @jax.jit
  def update(grads, state, params):
    traces.append(None)
    return tx.update(grads, state, params, some_extra=jnp.float32(1.0))

  return run_steps(tx, make_params(), grad_steps(), update), len(traces)


@optimizer_names
def test_extra_args_ignored(name):
  history, _ = extra_args_run(name)
  for step, ((updates, _), (expected, _)) in enumerate(zip(history, plain_run(name))):
    assert trees_equal(updates, expected), f'step {step}'


@optimizer_names
def test_jit_traces_once(name):
  _, traces = extra_args_run(name)
  assert traces == 1


# State dtypes. smi_adamw's state contains smi's, so one optimizer covers both.


@functools.cache
def cond_run(name, dtype):
  """Runs `build(name)` on `dtype` leaves through a jitted lax.cond.

  Returns the initial state, the states after two applied updates, and the
  (updates, state) of one skipped update.
  """
  tx = build(name)
  params = make_params(dtype)

  @jax.jit
  def maybe_update(skip, grads, state):
    def apply(grads, state):
      return tx.update(grads, state, params)

    def keep(grads, state):
      return jax.tree.map(jnp.zeros_like, grads), state

    return jax.lax.cond(skip, keep, apply, grads, state)

  initial = tx.init(params)
  states = []
  state = initial
  for grads in grad_steps(2, dtype):
    updates, state = maybe_update(False, grads, state)
    states.append((updates, state))
  skipped = maybe_update(True, make_grads(5, dtype), state)
  return initial, states, skipped


dtypes = pytest.mark.parametrize('dtype', DTYPES, ids=lambda dtype: jnp.dtype(dtype).name)


@dtypes
def test_state_dtypes_stable(dtype):
  initial, states, _ = cond_run('smi_adamw', dtype)
  for step, (_, state) in enumerate(states):
    assert dtype_signature(state) == dtype_signature(initial), f'step {step}'


@dtypes
def test_updates_keep_dtype(dtype):
  _, states, _ = cond_run('smi_adamw', dtype)
  for leaf, value in states[-1][0].items():
    assert value.dtype == jnp.dtype(dtype), leaf


@dtypes
def test_skipped_branch_keeps_state(dtype):
  _, states, (_, skipped_state) = cond_run('smi_adamw', dtype)
  assert trees_equal(skipped_state, states[-1][1])


FLOAT64_SCRIPT = """
import jax
import jax.numpy as jnp
import numpy as np
import smi_optax

assert jax.config.jax_enable_x64
rng = np.random.default_rng(0)
params = {'kernel': jnp.asarray(rng.standard_normal((16, 24))),
          'vector': jnp.asarray(rng.standard_normal(40))}
assert params['kernel'].dtype == jnp.float64

def signature(tree):
  return jax.tree.map(lambda x: (x.shape, x.dtype, x.weak_type), tree)

tx = smi_optax.smi_adamw(0.1, min_size=32, selection='exact')

@jax.jit
def maybe_update(skip, grads, state):
  return jax.lax.cond(
      skip,
      lambda g, s: (jax.tree.map(jnp.zeros_like, g), s),
      lambda g, s: tx.update(g, s, params),
      grads, state)

state = tx.init(params)
updates, new_state = maybe_update(False, params, state)
updates, new_state = maybe_update(False, params, new_state)
assert signature(new_state) == signature(state), (signature(new_state), signature(state))
for leaf in jax.tree.leaves(updates):
  assert leaf.dtype == jnp.float64, leaf.dtype
  assert bool(jnp.all(jnp.isfinite(leaf)))
print('float64 ok')
"""


def test_float64_state_dtypes():
  env = dict(os.environ, JAX_ENABLE_X64='1', JAX_PLATFORMS='cpu')
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env['PYTHONPATH'] = os.pathsep.join([repo_root, env.get('PYTHONPATH', '')])
  result = subprocess.run(
      [sys.executable, '-c', textwrap.dedent(FLOAT64_SCRIPT)],
      env=env, capture_output=True, text=True, timeout=120, check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'float64 ok' in result.stdout


# Initialization from shapes.


def shape_structs(params):
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), params)


@optimizer_names
def test_init_from_shape_structs(name):
  tx = build(name)
  state = tx.init(shape_structs(make_params()))
  assert dtype_signature(state) == dtype_signature(tx.init(make_params()))


@optimizer_names
def test_init_under_eval_shape(name):
  tx = build(name)
  abstract = jax.eval_shape(tx.init, shape_structs(make_params()))
  expected = tx.init(make_params())
  assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(
      lambda x: (x.shape, x.dtype), expected
  )


# Convergence under lax.scan with smi_adamw's default selection. Each bound
# is at least 20x the final loss measured with jax 0.10.2 on CPU, so it
# allows for other XLA versions but still needs real progress.


def minimize(loss, params, tx, steps):
  """Runs `steps` updates of `tx` on `loss` under lax.scan and returns the (first, final) loss."""

  def step(carry, _):
    params, state = carry
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), value

  @jax.jit
  def run(params):
    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return losses[0], loss(params)

  first, final = run(params)
  return float(first), float(final)


def test_converges_parabola():
  center = jnp.linspace(-1.0, 1.0, 64)
  first, final = minimize(
      lambda x: jnp.sum((x - center) ** 2), jnp.zeros(64), smi_optax.smi_adamw(0.1, min_size=1), 200
  )
  assert first > 20.0
  assert final < 1e-6  # measured 3e-8


def test_converges_rosenbrock():
  def rosenbrock(x):
    return (1.0 - x[0]) ** 2 + 100.0 * (x[1] - x[0] ** 2) ** 2

  first, final = minimize(
      rosenbrock, jnp.array([-1.2, 1.0]), smi_optax.smi_adamw(0.02, min_size=1), 2000
  )
  assert first > 24.0
  assert final < 0.05  # measured 1.6e-3


def test_converges_least_squares():
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.standard_normal((128, 16)), jnp.float32)
  weights = jnp.asarray(rng.standard_normal((16, 32)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(32), jnp.float32)
  targets = inputs @ weights + bias

  def loss(params):
    return jnp.mean((inputs @ params['w'] + params['b'] - targets) ** 2)

  params = {'w': jnp.zeros((16, 32)), 'b': jnp.zeros(32)}
  first, final = minimize(loss, params, smi_optax.smi_adamw(0.05, min_size=1), 500)
  assert first > 15.0
  assert final < 1e-6  # measured 1e-8


# stats().

STATS_KEYS = (
    {f'kept_energy/{leaf}' for leaf in FILTERED}
    | {f'blend/{leaf}' for leaf in FILTERED}
    | {'kept_energy_mean', 'blend_mean'}
)


@optimizer_names
def test_stats_keys_in_jit(name):
  values = jax.jit(smi_optax.stats)(plain_run(name)[-1][1])
  assert set(values) == STATS_KEYS


@optimizer_names
def test_stats_inject_hyperparams(name):
  history, _ = injected_run(name)
  values = jax.jit(smi_optax.stats)(history[-1][1])
  np.testing.assert_allclose(values['blend_mean'], HYPERPARAMS['blend'], rtol=1e-6)


@optimizer_names
def test_stats_kept_energy_in_unit_interval(name):
  for step, (_, state) in enumerate(plain_run(name)):
    for key, value in jax.jit(smi_optax.stats)(state).items():
      if key.startswith('kept_energy'):
        assert 0.0 <= float(value) <= 1.0, f'{key} at step {step}'


def test_stats_kept_energy_matches_state():
  state = plain_run('smi_adamw')[-1][1]
  values = jax.jit(smi_optax.stats)(state)
  assert float(values['kept_energy/kernel']) == float(find_smi_state(state).kept_energy['kernel'])


# mask_every.


def test_mask_every_holds_threshold():
  every = 3
  tx = smi_optax.smi(**smi_kwargs(mask_every=every))
  params = make_params()
  previous = tx.init(params).threshold
  for count, (_, state) in enumerate(run_steps(tx, params, grad_steps(7))):
    for leaf in FILTERED:
      old = float(previous[leaf])
      new = float(state.threshold[leaf])
      if count % every == 0:
        assert new != old, f'{leaf!r} kept its threshold at count {count}'
      else:
        assert new == old, f'{leaf!r} changed its threshold at count {count}'
    previous = state.threshold


def test_threshold_changes_each_step():
  thresholds = [float(find_smi_state(state).threshold['kernel']) for _, state in plain_run('smi')]
  assert len(set(thresholds)) == STEPS
