"""Threshold selection: the value above which a leaf's spectral EMA is kept."""

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Selection = Literal["sample", "exact"]

# Coefficients drawn for the sampled threshold. Leaves with at most this many
# coefficients are handled exactly, because the sample is then the whole leaf.
SAMPLE_SIZE = 4096

# Rounds of the count-and-correct step after the sampled estimate. One round
# brings the kept fraction within about 0.002 of the target on Gaussian and
# heavy-tailed magnitudes; the second is a margin for adversarial shapes.
_CORRECTION_ROUNDS = 2


def _kept_count(keep_fraction: jax.Array, n: int) -> jax.Array:
  """Returns round(keep_fraction * n) clipped to [1, n], as int32."""
  count = jnp.round(jnp.asarray(keep_fraction, jnp.float32) * n)
  return jnp.clip(count, 1, n).astype(jnp.int32)


def _kth_largest(sorted_ascending: jax.Array, k: jax.Array) -> jax.Array:
  """Returns the k-th largest entry (1-based) of an ascending 1-D array."""
  return sorted_ascending[sorted_ascending.shape[0] - k]


def exact_threshold(ema: jax.Array, keep_fraction: jax.Array) -> jax.Array:
  """Returns the k-th largest value of `ema`, k = round(keep_fraction * size).

  Sorts every coefficient, so it costs O(n log n) comparisons per step.
  """
  flat = ema.reshape(-1)
  k = _kept_count(keep_fraction, flat.shape[0])
  return _kth_largest(jnp.sort(flat), k)


def _sample_indices(n: int, sample_size: int) -> np.ndarray:
  # Fixed at trace time: a uniform draw without replacement from a seeded
  # generator, so the same leaf shape always uses the same sample. A strided
  # sample would alias with the row structure of a 2-D spectrum.
  rng = np.random.default_rng(n)
  return np.sort(rng.choice(n, size=sample_size, replace=False)).astype(np.int32)


def sampled_threshold(
    ema: jax.Array,
    keep_fraction: jax.Array,
    sample_size: int = SAMPLE_SIZE,
) -> jax.Array:
  """Returns a threshold that keeps about `keep_fraction` of `ema`.

  The estimate is the matching quantile of a fixed random sample of
  `sample_size` coefficients. Each correction round then counts the
  coefficients the estimate actually keeps over the whole leaf (one fused
  pass) and moves the rank in the sorted sample by the observed error, which
  treats the sample's empirical distribution as a local model of the leaf's.

  Leaves with at most `sample_size` coefficients get the exact threshold.
  """
  flat = ema.reshape(-1)
  n = flat.shape[0]
  if n <= sample_size:
    return exact_threshold(flat, keep_fraction)

  sample = jnp.sort(flat[_sample_indices(n, sample_size)])
  target = jnp.asarray(keep_fraction, jnp.float32)
  level = target
  threshold = _kth_largest(sample, _kept_count(level, sample_size))
  for _ in range(_CORRECTION_ROUNDS):
    kept = jnp.mean((flat >= threshold).astype(jnp.float32))
    level = jnp.clip(level + (target - kept), 0.0, 1.0)
    threshold = _kth_largest(sample, _kept_count(level, sample_size))
  return threshold


def select_threshold(
    ema: jax.Array, keep_fraction: jax.Array, selection: Selection
) -> jax.Array:
  """Returns the threshold of `ema` for `keep_fraction` by `selection`."""
  if selection == "exact":
    return exact_threshold(ema, keep_fraction)
  return sampled_threshold(ema, keep_fraction)
