"""Threshold selection: the value above which a leaf's spectral EMA is kept."""

from typing import Literal

import jax
import jax.numpy as jnp

Selection = Literal["histogram", "exact"]

# Mantissa bits that, with the 8 exponent bits, name a histogram bucket: 2**13
# buckets, each spanning a factor of 1 + 2**-5 (about 3%) in value.
_MANTISSA_BITS = 5
_BUCKET_SHIFT = 23 - _MANTISSA_BITS
_NUM_BUCKETS = 1 << (31 - _BUCKET_SHIFT)
_INFINITY_BITS = 0x7F800000


def _kept_count(keep_fraction: jax.Array, n: int) -> jax.Array:
  """Returns round(keep_fraction * n) clipped to [1, n], as int32."""
  count = jnp.round(jnp.asarray(keep_fraction, jnp.float32) * n)
  return jnp.clip(count, 1, n).astype(jnp.int32)


def _kth_largest(sorted_ascending: jax.Array, k: jax.Array) -> jax.Array:
  """Returns the k-th largest entry (1-based) of an ascending 1-D array."""
  return sorted_ascending[sorted_ascending.shape[0] - k]


def exact_threshold(ema: jax.Array, keep_fraction: jax.Array) -> jax.Array:
  """Returns the k-th largest value of `ema`, k = round(keep_fraction * size).

  Sorts every coefficient, so it costs O(n log n) comparisons per step. The
  sort runs on the int32 bit patterns, which order non-negative floats as
  their values do and sort several times faster on XLA's CPU backend.
  """
  flat = ema.reshape(-1).astype(jnp.float32)
  k = _kept_count(keep_fraction, flat.shape[0])
  kth_bits = _kth_largest(jnp.sort(_float32_bits(flat)), k)
  return jax.lax.bitcast_convert_type(kth_bits, jnp.float32)


def _float32_bits(x: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)


def histogram_threshold(ema: jax.Array, keep_fraction: jax.Array) -> jax.Array:
  """Returns a threshold that keeps about `keep_fraction` of `ema`, without sorting.

  A non-negative float32's bit pattern, read as an int32, grows with its
  value, so its top bits (exponent and the first `_MANTISSA_BITS` mantissa
  bits) name a bucket of relative width 2**-_MANTISSA_BITS. One scatter pass
  counts the coefficients per bucket, a suffix sum over the buckets finds the
  bucket holding the k-th largest value, and the threshold is interpolated
  linearly (in bit space) inside that bucket by the share of it still to
  keep. The kept count is then off by at most a part of one bucket's count.
  The threshold is capped at the leaf's maximum, so at least one coefficient
  is kept.
  """
  flat = ema.reshape(-1).astype(jnp.float32)
  n = flat.shape[0]
  k = _kept_count(keep_fraction, n)

  # NaN and Inf land in the last bucket. Their update is discarded anyway.
  buckets = jnp.clip(jnp.right_shift(_float32_bits(flat), _BUCKET_SHIFT), 0, _NUM_BUCKETS - 1)
  counts = jnp.zeros((_NUM_BUCKETS,), jnp.int32).at[buckets].add(1)
  at_or_above = jnp.cumsum(counts[::-1])[::-1]  # count in this bucket or higher

  bucket = jnp.sum(at_or_above >= k) - 1  # holds the k-th largest value
  above = at_or_above[bucket] - counts[bucket]
  share_to_keep = (k - above).astype(jnp.float32) / jnp.maximum(counts[bucket], 1)
  threshold_bits = (bucket.astype(jnp.float32) + 1.0 - share_to_keep) * float(1 << _BUCKET_SHIFT)
  threshold_bits = jnp.minimum(threshold_bits, float(_INFINITY_BITS)).astype(jnp.int32)
  threshold = jax.lax.bitcast_convert_type(threshold_bits, jnp.float32)
  return jnp.minimum(threshold, jnp.max(flat))


def select_threshold(
    ema: jax.Array, keep_fraction: jax.Array, selection: Selection
) -> jax.Array:
  """Returns the threshold of `ema` for `keep_fraction` by `selection`."""
  if selection == "exact":
    return exact_threshold(ema, keep_fraction)
  return histogram_threshold(ema, keep_fraction)
