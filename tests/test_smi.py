"""Tests of `smi_optax.smi` against the NumPy reference and its documented properties."""

import inspect
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import reference
import smi_optax
from smi_optax._src import selection as selection_lib

# Tests of properties that do not depend on how the threshold is chosen use
# selection='exact', which compiles several times faster. The default
# selection runs in the kept-fraction, pattern, jit and inject_hyperparams tests.
DEFAULT_SELECTION = inspect.signature(smi_optax.smi).parameters['selection'].default

# Tolerances for float32 FFTs of unit-scale gradients against the float64 reference.
UPDATE_TOLERANCE = dict(rtol=1e-4, atol=1e-5)
# EMA entries are coefficient magnitudes, up to about sqrt(size) for unit noise.
EMA_TOLERANCE = dict(rtol=1e-4, atol=1e-4)
# Below this relative gap between the k-th and (k + 1)-th EMA values, float32
# rounding could flip the mask, so a reference comparison would test the data.
MIN_THRESHOLD_MARGIN = 1e-5


def run_smi(tx, params, grad_steps, *, jit=False):
  """Apply `tx` to each gradient in turn and return the list of (updates, state)."""
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  history = []
  for grads in grad_steps:
    updates, state = update(grads, state)
    history.append((updates, state))
  return history


def run_reference(params, grad_steps, *, min_size, views=None, **hyperparams):
  """Apply the reference to each gradient and return a list of ({name: update}, state)."""
  names = list(params)
  view_list = [views.get(name) for name in names] if views else None
  state = reference.init([params[name] for name in names], min_size=min_size, views=view_list)
  history = []
  for grads in grad_steps:
    updates, state = reference.update(
        [grads[name] for name in names], state, views=view_list, **hyperparams
    )
    history.append((dict(zip(names, updates)), state))
  return history


def kept_mask(grad, update):
  """Infer which rfft coefficients a blend=1 update kept, under the default view.

  A kept coefficient of the update equals the gradient's, and a dropped one is
  0, so each coefficient is closer to one of the two.
  """
  grad = np.asarray(grad, np.float64)
  update = np.asarray(update, np.float64)
  if grad.ndim > 1:
    grad = grad.reshape(-1, grad.shape[-1])
    update = update.reshape(-1, update.shape[-1])
  fft = np.fft.rfft2 if grad.ndim > 1 else np.fft.rfft
  grad_spectrum = fft(grad)
  update_spectrum = fft(update)
  return np.abs(update_spectrum - grad_spectrum) < np.abs(update_spectrum)


# The tests that compare with the reference share keep_fraction and beta,
# which alone decide the mask. keep_fraction * n is at least 0.1 away from
# a half integer for every leaf here: float32 and float64 products round
# such ties differently (0.3 * 175 is 52.5 in float32 but 52.4999... in float64).
HYPERPARAMS = dict(keep_fraction=0.31, beta=0.8, blend=0.7)


def has_clear_thresholds(reference_history):
  """Whether no step of the reference puts nearly equal EMA values at a threshold."""
  margins = [
      margin for _, state in reference_history for margin in state['margin'] if margin is not None
  ]
  return min(margins) > MIN_THRESHOLD_MARGIN


def draw_clear_steps(
    params, make_grads, *, first_seed, min_size, views=None, steps=3, corrupt=None
):
  """Draw gradients whose thresholds the float32 and float64 masks agree on.

  The rfft coefficients in column 0 (and the Nyquist column) come in
  conjugate pairs of equal magnitude. When such a pair sits at the k-th
  largest EMA value, float32 rounding decides whether one or both are kept,
  so the reference cannot predict the mask. Seeds that do this are skipped.
  `corrupt`, if given, edits the drawn list of gradients in place first.
  """
  for seed in range(first_seed, first_seed + 500, steps):
    grad_steps = [make_grads(params, seed + step) for step in range(steps)]
    if corrupt is not None:
      corrupt(grad_steps)
    history = run_reference(params, grad_steps, min_size=min_size, views=views, **HYPERPARAMS)
    if has_clear_thresholds(history):
      return grad_steps
  raise AssertionError('no seed gave thresholds clear of conjugate ties')


@pytest.fixture(scope='module')
def clear_steps(mixed_params, make_grads, mixed_min_size):
  """Three gradients for `mixed_params` that `draw_clear_steps` accepts."""
  return draw_clear_steps(mixed_params, make_grads, first_seed=100, min_size=mixed_min_size)


@pytest.fixture(scope='module')
def exact_runs(mixed_params, clear_steps, mixed_min_size):
  """SMI with exact selection and the reference, three steps on `mixed_params`."""
  tx = smi_optax.smi(**HYPERPARAMS, min_size=mixed_min_size, selection='exact')
  actual = run_smi(tx, mixed_params, clear_steps)
  expected = run_reference(mixed_params, clear_steps, min_size=mixed_min_size, **HYPERPARAMS)
  return actual, expected


# Reference match.


def test_exact_matches_reference_updates(exact_runs, mixed_params):
  actual, expected = exact_runs
  filtered = [name for name, ema in actual[0][1].spectral_ema.items() if ema is not None]
  assert sorted(filtered) == sorted(['vector', 'matrix', 'rank3', 'rank4', 'wide'])
  for step, ((updates, _), (expected_updates, _)) in enumerate(zip(actual, expected)):
    for name in filtered:
      np.testing.assert_allclose(
          updates[name], expected_updates[name], **UPDATE_TOLERANCE,
          err_msg=f'update of {name!r} at step {step}',
      )


def test_exact_matches_reference_ema(exact_runs, mixed_params):
  actual, expected = exact_runs
  names = list(mixed_params)
  for step, ((_, state), (_, expected_state)) in enumerate(zip(actual, expected)):
    for name, expected_ema in zip(names, expected_state['spectral_ema']):
      if expected_ema is None:
        continue
      ema = np.asarray(state.spectral_ema[name])
      assert ema.size == expected_ema.size, f'EMA size of {name!r}'
      np.testing.assert_allclose(
          ema.reshape(expected_ema.shape), expected_ema, **EMA_TOLERANCE,
          err_msg=f'spectral_ema of {name!r} at step {step}',
      )


def test_exact_matches_reference_kept_energy(exact_runs, mixed_params):
  actual, expected = exact_runs
  names = list(mixed_params)
  for step, ((_, state), (_, expected_state)) in enumerate(zip(actual, expected)):
    for name, expected_energy in zip(names, expected_state['kept_energy']):
      if expected_energy is None:
        continue
      np.testing.assert_allclose(
          state.kept_energy[name], expected_energy, rtol=1e-5,
          err_msg=f'kept_energy of {name!r} at step {step}',
      )


def test_count_increments(exact_runs):
  actual, _ = exact_runs
  counts = [int(state.count) for _, state in actual]
  assert counts == [1, 2, 3]


def test_pass_through_leaves_unchanged(exact_runs, clear_steps):
  actual, _ = exact_runs
  for step, ((updates, _), grads) in enumerate(zip(actual, clear_steps)):
    for name in ('small', 'steps', 'scale'):
      np.testing.assert_array_equal(
          updates[name], grads[name], err_msg=f'update of {name!r} at step {step}'
      )


def test_int_leaf_keeps_dtype(exact_runs):
  actual, _ = exact_runs
  updates, _ = actual[-1]
  assert np.asarray(updates['steps']).dtype == np.int32


@pytest.mark.parametrize('tree', ['spectral_ema', 'kept_energy', 'blend'])
def test_pass_through_leaves_hold_none(exact_runs, tree):
  actual, _ = exact_runs
  _, state = actual[-1]
  leaf_states = {name: getattr(state, tree)[name] for name in ('small', 'steps', 'scale')}
  assert leaf_states == {'small': None, 'steps': None, 'scale': None}


def test_mask_false_passes_through(mixed_params, grad_steps, mixed_min_size):
  mask = {name: name != 'matrix' for name in mixed_params}
  tx = smi_optax.smi(**HYPERPARAMS, min_size=mixed_min_size, mask=mask, selection='exact')
  updates, state = run_smi(tx, mixed_params, grad_steps[:1])[0]
  assert state.spectral_ema['matrix'] is None
  np.testing.assert_array_equal(updates['matrix'], grad_steps[0]['matrix'])


def test_views_match_reference(make_grads):
  params = {
      'batched': np.zeros((4, 6, 10), np.float32),  # axis 0 is a batch axis
      'transposed': np.zeros((9, 8), np.float32),
      'flat_cols': np.zeros((6, 5, 8), np.float32),  # 1-D FFT over axes 0 and 2
  }
  views = {
      'batched': reference.View(row_axes=(1,), col_axes=(2,)),
      'transposed': reference.View(row_axes=(1,), col_axes=(0,)),
      'flat_cols': reference.View(row_axes=(), col_axes=(0, 2)),
  }
  smi_views = {
      name: smi_optax.SpectralView(row_axes=view.row_axes, col_axes=view.col_axes)
      for name, view in views.items()
  }
  grad_steps = draw_clear_steps(params, make_grads, first_seed=200, min_size=16, views=views)
  tx = smi_optax.smi(**HYPERPARAMS, min_size=16, views=smi_views, selection='exact')
  actual = run_smi(tx, params, grad_steps)
  expected = run_reference(params, grad_steps, min_size=16, views=views, **HYPERPARAMS)
  for step, ((updates, _), (expected_updates, _)) in enumerate(zip(actual, expected)):
    for name in params:
      np.testing.assert_allclose(
          updates[name], expected_updates[name], **UPDATE_TOLERANCE,
          err_msg=f'update of {name!r} at step {step}',
      )


# Properties.


def test_blend_zero_returns_gradient(mixed_params, grad_steps, mixed_min_size):
  tx = smi_optax.smi(
      keep_fraction=0.2, beta=0.9, blend=0.0, min_size=mixed_min_size, selection='exact'
  )
  for step, (updates, _) in enumerate(run_smi(tx, mixed_params, grad_steps)):
    for name in mixed_params:
      np.testing.assert_array_equal(
          updates[name], grad_steps[step][name], err_msg=f'{name!r} at step {step}'
      )


def test_keep_fraction_one_returns_gradient(mixed_params, grad_steps, mixed_min_size):
  tx = smi_optax.smi(
      keep_fraction=1.0, beta=0.9, blend=1.0, min_size=mixed_min_size, selection='exact'
  )
  for step, (updates, _) in enumerate(run_smi(tx, mixed_params, grad_steps)):
    for name in mixed_params:
      np.testing.assert_array_equal(
          updates[name], grad_steps[step][name], err_msg=f'{name!r} at step {step}'
      )


@pytest.fixture(scope='module')
def blend_sweep(mixed_params, grad_steps, mixed_min_size):
  """Final-step updates for several blends, with the same gradients and EMA."""
  sweep = {}
  for blend in (0.25, 0.5, 0.75, 1.0):
    tx = smi_optax.smi(
        keep_fraction=0.3, beta=0.8, blend=blend, min_size=mixed_min_size, selection='exact'
    )
    sweep[blend] = run_smi(tx, mixed_params, grad_steps)[-1][0]
  return sweep


def test_update_affine_in_blend(blend_sweep, grad_steps):
  grads = grad_steps[-1]
  for blend in (0.25, 0.5, 0.75):
    for name in ('vector', 'matrix', 'rank3', 'rank4', 'wide'):
      expected = (1 - blend) * grads[name] + blend * blend_sweep[1.0][name]
      np.testing.assert_allclose(
          blend_sweep[blend][name], expected, rtol=1e-5, atol=1e-6,
          err_msg=f'{name!r} at blend {blend}',
      )


def test_update_offset_proportional_to_blend(blend_sweep, grad_steps):
  grads = grad_steps[-1]
  for blend in (0.25, 0.5, 0.75):
    for name in ('vector', 'matrix', 'rank3', 'rank4', 'wide'):
      offset = (blend_sweep[blend][name] - grads[name]) / blend
      full_offset = blend_sweep[1.0][name] - grads[name]
      np.testing.assert_allclose(
          offset, full_offset, rtol=1e-4, atol=1e-5, err_msg=f'{name!r} at blend {blend}'
      )


def test_recovers_smooth_pattern_in_noise():
  rows, cols = 64, 48
  y, x = np.meshgrid(np.arange(rows), np.arange(cols), indexing='ij')
  # Two half-spectrum coefficients, (+-2, 3), carry the whole pattern.
  pattern = (np.cos(2 * np.pi * 2 * y / rows) * np.cos(2 * np.pi * 3 * x / cols)).astype(np.float32)
  rng = np.random.default_rng(5)
  noise_scale = 2.0  # noise energy is 16 times the pattern's
  grad_steps = [
      {'w': pattern + noise_scale * rng.standard_normal((rows, cols)).astype(np.float32)}
      for _ in range(8)
  ]
  # k = round(0.0025 * 64 * 25) = 4: the pattern's two coefficients and two others.
  tx = smi_optax.smi(keep_fraction=0.0025, beta=0.9, blend=1.0, min_size=16)
  updates, _ = run_smi(tx, {'w': np.zeros((rows, cols), np.float32)}, grad_steps, jit=True)[-1]

  filtered = np.asarray(updates['w'])
  noisy = grad_steps[-1]['w']
  filtered_error = np.linalg.norm(filtered - pattern) / np.linalg.norm(pattern)
  noisy_error = np.linalg.norm(noisy - pattern) / np.linalg.norm(pattern)
  correlation = np.corrcoef(filtered.ravel(), pattern.ravel())[0, 1]
  assert filtered_error < 0.3
  assert filtered_error < noisy_error / 10
  assert correlation > 0.95


@pytest.mark.parametrize('length', [64, 999])
@pytest.mark.parametrize('keep_fraction', [1e-4, 0.1, 0.37, 0.62, 0.9])
def test_exact_keeps_requested_count(length, keep_fraction):
  # A real vector's rfft has no conjugate pairs, so its magnitudes are distinct.
  grad = np.random.default_rng(length).standard_normal(length).astype(np.float32)
  tx = smi_optax.smi(keep_fraction, beta=0.0, blend=1.0, min_size=1, selection='exact')
  updates, _ = run_smi(tx, {'v': np.zeros(length, np.float32)}, [{'v': grad}])[0]
  n = length // 2 + 1
  expected = min(max(round(keep_fraction * n), 1), n)
  assert int(kept_mask(grad, updates['v']).sum()) == expected


def _magnitudes(kind, shape, rng):
  """EMA-like nonnegative arrays of a given shape (rows, cols // 2 + 1)."""
  if kind == 'gaussian':
    return np.abs(rng.standard_normal(shape))
  if kind == 'cauchy':
    return np.abs(rng.standard_cauchy(shape))
  if kind == 'narrow':
    # The EMA of white-noise spectra: with beta = 0.999 its entries have a
    # relative spread of about 0.52 * sqrt((1 - beta) / (1 + beta)) = 1.2%.
    return 1.0 + 0.012 * rng.standard_normal(shape)
  # Magnitudes falling as 1 / frequency, with lognormal scatter: large at
  # low frequencies, as in the spectra of smooth gradients.
  rows, half = shape
  row_freq = np.minimum(np.arange(rows), rows - np.arange(rows))[:, None]
  col_freq = np.arange(half)[None, :]
  decay = 1.0 / (1.0 + np.hypot(row_freq, col_freq))
  return decay * rng.lognormal(0.0, 1.0, shape)


@pytest.mark.parametrize('shape', [(40, 25), (256, 257), (1000, 501), (2048, 1025)])
@pytest.mark.parametrize('kind', ['gaussian', 'cauchy', 'power_law', 'narrow'])
def test_default_kept_fraction_within_tolerance(shape, kind):
  # The default selection is approximate, and the documented bound (0.01 on
  # leaves of 1,000 coefficients or more) holds for the threshold that
  # select_threshold returns, so this calls it on EMA-like arrays directly.
  # test_default_update_kept_fraction checks the public path end to end.
  select = jax.jit(selection_lib.select_threshold, static_argnames='selection')
  for seed in (0, 1):
    magnitudes = _magnitudes(kind, shape, np.random.default_rng(seed)).astype(np.float32)
    for keep_fraction in (0.05, 0.3, 0.5, 0.95):
      threshold = select(magnitudes, jnp.float32(keep_fraction), selection=DEFAULT_SELECTION)
      kept_fraction = float(np.mean(magnitudes >= np.asarray(threshold)))
      assert abs(kept_fraction - keep_fraction) <= 0.01, f'{seed=} {keep_fraction=} {kept_fraction=}'


@pytest.mark.parametrize('keep_fraction', [0.05, 0.5, 0.95])
def test_default_update_kept_fraction(keep_fraction):
  shape = (512, 1022)  # 512 * 512 coefficients
  grad = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
  tx = smi_optax.smi(keep_fraction, beta=0.0, blend=1.0)
  updates, _ = run_smi(tx, {'w': np.zeros(shape, np.float32)}, [{'w': grad}], jit=True)[0]
  kept_fraction = float(kept_mask(grad, updates['w']).mean())
  assert abs(kept_fraction - keep_fraction) <= 0.01


# Optax integration.


def test_jit_matches_eager(float_params, make_grads):
  # One filtered leaf, because eager runs compile every operation separately.
  params = {'w': float_params['w'], 'b': float_params['b']}
  grad_steps = [make_grads(params, seed) for seed in (1, 2, 3)]
  tx = smi_optax.smi(**HYPERPARAMS, min_size=16)
  eager = run_smi(tx, params, grad_steps)
  jitted = run_smi(tx, params, grad_steps, jit=True)
  for step, ((eager_updates, _), (jit_updates, _)) in enumerate(zip(eager, jitted)):
    for name in params:
      np.testing.assert_allclose(
          jit_updates[name], eager_updates[name], rtol=1e-5, atol=1e-6,
          err_msg=f'{name!r} at step {step}',
      )


@pytest.fixture(scope='module')
def float_params():
  """A float-only tree (optimizers such as adamw need float parameters)."""
  rng = np.random.default_rng(7)
  return {
      'w': rng.standard_normal((24, 40)).astype(np.float32),
      'v': rng.standard_normal((45,)).astype(np.float32),
      'b': rng.standard_normal((6,)).astype(np.float32),
  }


def _manual_chain(transforms, grad_steps, params):
  """Apply transforms one after another by hand, as optax.chain should."""
  states = [tx.init(params) for tx in transforms]
  history = []
  for grads in grad_steps:
    updates = grads
    for index, tx in enumerate(transforms):
      updates, states[index] = tx.update(updates, states[index], params)
    history.append(updates)
  return history


def test_chain_before_adam(float_params, make_grads):
  grad_steps = [make_grads(float_params, seed) for seed in (1, 2, 3)]
  transforms = [smi_optax.smi(**HYPERPARAMS, min_size=16, selection='exact'), optax.adam(1e-2)]
  chained = optax.chain(*transforms)
  state = chained.init(float_params)
  for step, expected in enumerate(_manual_chain(transforms, grad_steps, float_params)):
    updates, state = chained.update(grad_steps[step], state, float_params)
    for name in float_params:
      np.testing.assert_allclose(
          updates[name], expected[name], rtol=1e-6, atol=1e-7, err_msg=f'{name!r} at step {step}'
      )


def test_chain_after_clip(float_params, make_grads):
  grad_steps = [make_grads(float_params, seed) for seed in (1, 2, 3)]
  transforms = [
      optax.clip_by_global_norm(1.0),
      smi_optax.smi(**HYPERPARAMS, min_size=16, selection='exact'),
      optax.sgd(0.1),
  ]
  chained = optax.chain(*transforms)
  state = chained.init(float_params)
  for step, expected in enumerate(_manual_chain(transforms, grad_steps, float_params)):
    updates, state = chained.update(grad_steps[step], state, float_params)
    for name in float_params:
      np.testing.assert_allclose(
          updates[name], expected[name], rtol=1e-6, atol=1e-7, err_msg=f'{name!r} at step {step}'
      )


@pytest.fixture(scope='module')
def large_params():
  """Leaves at and below the default min_size of 1024 elements."""
  return {'w': np.zeros((40, 64), np.float32), 'b': np.zeros((64,), np.float32)}


def test_inject_hyperparams_matches_plain(large_params, make_grads):
  grad_steps = [make_grads(large_params, seed) for seed in (1, 2, 3)]
  injected = optax.inject_hyperparams(smi_optax.smi)(**HYPERPARAMS)
  plain = smi_optax.smi(**HYPERPARAMS)
  injected_history = run_smi(injected, large_params, grad_steps, jit=True)
  plain_history = run_smi(plain, large_params, grad_steps, jit=True)
  for step, ((updates, _), (expected, _)) in enumerate(zip(injected_history, plain_history)):
    for name in large_params:
      np.testing.assert_allclose(
          updates[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=f'{name!r} at step {step}'
      )


def test_inject_hyperparams_blend_change(large_params, make_grads):
  grads = make_grads(large_params, 1)
  tx = optax.inject_hyperparams(smi_optax.smi)(**HYPERPARAMS)
  update = jax.jit(tx.update)
  state = tx.init(large_params)
  filtered, state = update(grads, state)
  state.hyperparams['blend'] = jnp.float32(0.0)
  unfiltered, state = update(grads, state)
  assert not np.allclose(filtered['w'], grads['w'])
  np.testing.assert_array_equal(unfiltered['w'], grads['w'])


def test_blend_schedule_uses_count(mixed_params, clear_steps, mixed_min_size):
  schedule = optax.linear_schedule(0.0, 1.0, transition_steps=4)
  hyperparams = dict(HYPERPARAMS, blend=schedule)
  tx = smi_optax.smi(**hyperparams, min_size=mixed_min_size, selection='exact')
  actual = run_smi(tx, mixed_params, clear_steps)
  expected = run_reference(mixed_params, clear_steps, min_size=mixed_min_size, **hyperparams)
  for step, ((updates, state), (expected_updates, _)) in enumerate(zip(actual, expected)):
    np.testing.assert_allclose(state.blend['matrix'], step / 4, err_msg=f'alpha at step {step}')
    np.testing.assert_allclose(
        updates['matrix'], expected_updates['matrix'], **UPDATE_TOLERANCE,
        err_msg=f'update at step {step}',
    )


def test_adaptive_blend_matches_reference(mixed_params, clear_steps, mixed_min_size):
  hyperparams = dict(HYPERPARAMS, blend=smi_optax.adaptive_blend(0.8))
  tx = smi_optax.smi(**hyperparams, min_size=mixed_min_size, selection='exact')
  actual = run_smi(tx, mixed_params, clear_steps)
  expected = run_reference(
      mixed_params, clear_steps, min_size=mixed_min_size,
      **dict(HYPERPARAMS, blend=reference.Adaptive(0.8)),
  )
  names = list(mixed_params)
  for step, ((updates, state), (expected_updates, expected_state)) in enumerate(
      zip(actual, expected)
  ):
    for name, expected_alpha in zip(names, expected_state['blend']):
      if expected_alpha is None:
        continue
      np.testing.assert_allclose(
          state.blend[name], 0.8 * np.asarray(state.kept_energy[name]), rtol=1e-6,
          err_msg=f'alpha of {name!r} at step {step} is not max_blend * kept_energy',
      )
      np.testing.assert_allclose(
          state.blend[name], expected_alpha, rtol=1e-5, err_msg=f'alpha of {name!r} at step {step}'
      )
      np.testing.assert_allclose(
          updates[name], expected_updates[name], **UPDATE_TOLERANCE,
          err_msg=f'update of {name!r} at step {step}',
      )


def test_smi_adamw_matches_chain(float_params, make_grads):
  grad_steps = [make_grads(float_params, seed) for seed in (1, 2, 3)]
  combined = smi_optax.smi_adamw(
      1e-2, 0.3, 0.8, 0.7, weight_decay=1e-3, min_size=16, selection='exact'
  )
  chained = optax.chain(
      smi_optax.smi(0.3, 0.8, 0.7, min_size=16, selection='exact'),
      optax.adamw(1e-2, weight_decay=1e-3),
  )
  combined_state = combined.init(float_params)
  chained_state = chained.init(float_params)
  for step, grads in enumerate(grad_steps):
    updates, combined_state = combined.update(grads, combined_state, float_params)
    expected, chained_state = chained.update(grads, chained_state, float_params)
    for name in float_params:
      np.testing.assert_allclose(
          updates[name], expected[name], rtol=1e-6, atol=1e-8, err_msg=f'{name!r} at step {step}'
      )


# Dtypes.


LOW_PRECISION = {'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


@pytest.fixture(scope='module', params=list(LOW_PRECISION))
def low_precision_runs(request, float_params, make_grads):
  """Updates for low-precision gradients and for the same values in float32."""
  dtype = LOW_PRECISION[request.param]
  grad_steps = [
      {name: jnp.asarray(g, dtype) for name, g in make_grads(float_params, seed).items()}
      for seed in (1, 2, 3)
  ]
  upcast_steps = [{name: g.astype(jnp.float32) for name, g in grads.items()} for grads in grad_steps]
  params = {name: jnp.asarray(p, dtype) for name, p in float_params.items()}
  tx = smi_optax.smi(**HYPERPARAMS, min_size=16, selection='exact')
  low = run_smi(tx, params, grad_steps)
  full = run_smi(tx, params, upcast_steps)
  return dtype, low, full


def test_low_precision_keeps_dtype(low_precision_runs):
  dtype, low, _ = low_precision_runs
  updates, _ = low[-1]
  assert {name: u.dtype for name, u in updates.items()} == {'w': dtype, 'v': dtype, 'b': dtype}


def test_low_precision_is_finite(low_precision_runs):
  _, low, _ = low_precision_runs
  for step, (updates, _) in enumerate(low):
    for name, update in updates.items():
      assert np.all(np.isfinite(np.asarray(update, np.float32))), f'{name!r} at step {step}'


def test_low_precision_close_to_float32(low_precision_runs):
  dtype, low, full = low_precision_runs
  # The FFTs run in float32 either way, so only the final cast rounds.
  eps = float(ml_dtypes.finfo(dtype).eps)
  for step, ((updates, _), (expected, _)) in enumerate(zip(low, full)):
    for name in updates:
      np.testing.assert_allclose(
          np.asarray(updates[name], np.float32), expected[name], rtol=eps, atol=eps,
          err_msg=f'{name!r} at step {step}',
      )


def test_low_precision_ema_is_float32(low_precision_runs):
  _, low, _ = low_precision_runs
  _, state = low[-1]
  assert state.spectral_ema['w'].dtype == jnp.float32


def test_ema_dtype_bfloat16(float_params, make_grads):
  grad_steps = [make_grads(float_params, seed) for seed in (1, 2, 3)]
  bf16 = smi_optax.smi(**HYPERPARAMS, min_size=16, ema_dtype='bfloat16', selection='exact')
  f32 = smi_optax.smi(**HYPERPARAMS, min_size=16, selection='exact')
  _, bf16_state = run_smi(bf16, float_params, grad_steps)[-1]
  _, f32_state = run_smi(f32, float_params, grad_steps)[-1]
  assert bf16_state.spectral_ema['w'].dtype == jnp.bfloat16
  np.testing.assert_allclose(
      np.asarray(bf16_state.spectral_ema['w'], np.float32), f32_state.spectral_ema['w'],
      rtol=2e-2,
  )


# Non-finite gradients.


@pytest.fixture(scope='module', params=[np.nan, np.inf])
def nonfinite_runs(request, float_params, make_grads):
  """Three steps where 'w' contains one NaN or Inf at the second step."""

  def corrupt(grad_steps):
    grad_steps[1]['w'][3, 5] = request.param

  grad_steps = draw_clear_steps(
      float_params, make_grads, first_seed=300, min_size=16, corrupt=corrupt
  )
  tx = smi_optax.smi(**HYPERPARAMS, min_size=16, selection='exact')
  actual = run_smi(tx, float_params, grad_steps)
  expected = run_reference(float_params, grad_steps, min_size=16, **HYPERPARAMS)
  return grad_steps, actual, expected


def test_nonfinite_leaf_keeps_ema(nonfinite_runs):
  _, actual, _ = nonfinite_runs
  np.testing.assert_array_equal(actual[1][1].spectral_ema['w'], actual[0][1].spectral_ema['w'])


def test_nonfinite_leaf_keeps_kept_energy(nonfinite_runs):
  _, actual, _ = nonfinite_runs
  np.testing.assert_array_equal(actual[1][1].kept_energy['w'], actual[0][1].kept_energy['w'])


def test_nonfinite_leaf_passes_gradient(nonfinite_runs):
  grad_steps, actual, _ = nonfinite_runs
  np.testing.assert_array_equal(actual[1][0]['w'], grad_steps[1]['w'])


def test_nonfinite_leaf_spares_others(nonfinite_runs):
  _, actual, expected = nonfinite_runs
  np.testing.assert_allclose(actual[1][0]['v'], expected[1][0]['v'], **UPDATE_TOLERANCE)


def test_finite_step_after_nonfinite(nonfinite_runs):
  _, actual, expected = nonfinite_runs
  updates = actual[2][0]
  for name in updates:
    assert np.all(np.isfinite(updates[name])), name
  # The EMA skipped the bad step in both, so the third step still matches.
  np.testing.assert_allclose(updates['w'], expected[2][0]['w'], **UPDATE_TOLERANCE)


# Invalid hyperparameters.


@pytest.mark.parametrize(
    'argument, value, valid_range',
    [
        ('keep_fraction', 0, r'\(0, 1\]'),
        ('keep_fraction', -0.1, r'\(0, 1\]'),
        ('keep_fraction', 1.5, r'\(0, 1\]'),
        ('beta', -0.1, r'\[0, 1\)'),
        ('beta', 1.0, r'\[0, 1\)'),
        ('beta', 1.2, r'\[0, 1\)'),
        ('blend', -0.1, r'\[0, 1\]'),
        ('blend', 1.1, r'\[0, 1\]'),
        ('min_size', 0, r'(>= ?1|at least 1)'),
        ('min_size', -3, r'(>= ?1|at least 1)'),
    ],
)
def test_invalid_hyperparameter_raises(argument, value, valid_range):
  # Lookaheads accept the argument, the value and the range in any order.
  pattern = (
      rf'(?s)^(?=.*\b{argument}\b)(?=.*{re.escape(repr(value))})(?=.*{valid_range})'
  )
  with pytest.raises(ValueError, match=pattern):
    smi_optax.smi(**{argument: value})
