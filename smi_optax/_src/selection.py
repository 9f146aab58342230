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
_GROUP = 128  # buckets per group in the two-level search


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


def _suffix_sums(counts: jax.Array) -> jax.Array:
  """Returns, per position, the sum of `counts` from there to the end."""
  return jnp.cumsum(counts[::-1])[::-1]


def _find_kth_largest_bucket(
    counts: jax.Array, k: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Finds the bucket holding the k-th largest value, from per-bucket counts.

  Searches in two levels (groups of `_GROUP` buckets, then buckets within
  the group) because XLA lowers a cumulative sum over all 8192 buckets to a
  quadratic-cost window reduction on CPU, slower than the FFTs of a small
  leaf.

  Returns:
    The bucket's index, the count of values in higher buckets, and the count
    in the bucket itself.
  """
  groups = counts.reshape(-1, _GROUP)
  group_totals = jnp.sum(groups, axis=1)
  group_at_or_above = _suffix_sums(group_totals)
  group = jnp.sum(group_at_or_above >= k) - 1
  above_group = group_at_or_above[group] - group_totals[group]

  in_group = jax.lax.dynamic_index_in_dim(groups, group, keepdims=False)
  at_or_above = _suffix_sums(in_group) + above_group
  offset = jnp.sum(at_or_above >= k) - 1
  in_bucket = in_group[offset]
  return group * _GROUP + offset, at_or_above[offset] - in_bucket, in_bucket


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
  bucket, above, in_bucket = _find_kth_largest_bucket(counts, k)
  share_to_keep = (k - above).astype(jnp.float32) / jnp.maximum(in_bucket, 1)
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
