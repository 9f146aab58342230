"""Threshold selection: the value above which a leaf's spectral EMA is kept."""

from typing import Literal

import jax
import jax.numpy as jnp

Selection = Literal["histogram", "exact"]

# Mantissa bits that, with the 8 exponent bits, name a coarse histogram
# bucket: 2**16 buckets, each spanning a factor of 1 + 2**-8 (0.4%) in value.
# The low 15 bits then name one of 2**15 fine buckets inside a coarse one.
_MANTISSA_BITS = 8
_BUCKET_SHIFT = 23 - _MANTISSA_BITS
_NUM_BUCKETS = 1 << (31 - _BUCKET_SHIFT)
_NUM_FINE_BUCKETS = 1 << _BUCKET_SHIFT
_INFINITY_BITS = 0x7F800000
_GROUP = 128  # buckets per group in the two-level search

# A coarse bucket holding more than this share of the leaf's coefficients is
# refined, so interpolation inside a bucket can never miss by more than it.
REFINE_SHARE = 0.005


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


def histogram_threshold(
    ema: jax.Array, keep_fraction: jax.Array, axis_names: tuple[str, ...] = ()
) -> jax.Array:
  """Returns a threshold that keeps about `keep_fraction` of `ema`, without sorting.

  A non-negative float32's bit pattern, read as an int32, grows with its
  value, so its top 16 bits name a bucket of relative width 2**-8. One
  scatter pass counts the coefficients per bucket, and a suffix sum over the
  buckets finds the bucket holding the k-th largest value. If that bucket
  holds at most `REFINE_SHARE` of the leaf, the threshold is interpolated
  linearly (in bit space) inside it, so the kept count is off by less than
  the bucket's count. Otherwise a second pass counts that bucket's members
  by their low 15 bits and returns the exact k-th largest value. The
  threshold is capped at the leaf's maximum, so at least one coefficient is
  kept.

  Inside ``jax.shard_map``, `axis_names` names the mesh axes over which
  `ema` is one shard: counts and maxima are then combined over all shards
  (2**16 int32 per leaf, and 2**15 more when refining, cross the devices), so
  every shard gets the threshold of the whole leaf.
  """
  flat = ema.reshape(-1).astype(jnp.float32)
  n = flat.shape[0]
  if axis_names:
    n = n * jax.lax.psum(1, axis_names)
  k = _kept_count(keep_fraction, n)

  def combine(counts):
    return jax.lax.psum(counts, axis_names) if axis_names else counts

  bits = _float32_bits(flat)
  # -0.0 reads as a negative int and lands in bucket 0; NaN and Inf land at
  # the top, and their update is discarded anyway.
  coarse = jnp.clip(jnp.right_shift(bits, _BUCKET_SHIFT), 0, _NUM_BUCKETS - 1)
  counts = combine(jnp.zeros((_NUM_BUCKETS,), jnp.int32).at[coarse].add(1))
  bucket, above, in_bucket = _find_kth_largest_bucket(counts, k)
  bucket_low_bits = jnp.left_shift(bucket, _BUCKET_SHIFT)

  def interpolate():
    share_to_keep = (k - above).astype(jnp.float32) / jnp.maximum(in_bucket, 1)
    offset = (1.0 - share_to_keep) * float(_NUM_FINE_BUCKETS)
    return bucket_low_bits + jnp.clip(offset, 0, _NUM_FINE_BUCKETS - 1).astype(jnp.int32)

  def refine():
    fine = jnp.where(coarse == bucket, bits & (_NUM_FINE_BUCKETS - 1), _NUM_FINE_BUCKETS)
    fine_counts = jnp.zeros((_NUM_FINE_BUCKETS,), jnp.int32).at[fine].add(1, mode="drop")
    offset, _, _ = _find_kth_largest_bucket(combine(fine_counts), k - above)
    return bucket_low_bits + offset

  refine_above = jnp.maximum(REFINE_SHARE * n, 1.0)
  threshold_bits = jax.lax.cond(in_bucket > refine_above, refine, interpolate)
  threshold_bits = jnp.minimum(threshold_bits, _INFINITY_BITS)
  threshold = jax.lax.bitcast_convert_type(threshold_bits, jnp.float32)

  maximum = jnp.max(flat)
  if axis_names:
    maximum = jax.lax.pmax(maximum, axis_names)
  return jnp.minimum(threshold, maximum)


def select_threshold(
    ema: jax.Array,
    keep_fraction: jax.Array,
    selection: Selection,
    axis_names: tuple[str, ...] = (),
) -> jax.Array:
  """Returns the threshold of `ema` for `keep_fraction` by `selection`.

  `axis_names` (mesh axes inside ``jax.shard_map``) requires the histogram
  selection, because an exact selection would gather the whole leaf.
  """
  if selection == "exact":
    if axis_names:
      raise ValueError("selection='exact' is not available shard-locally; use 'histogram'.")
    return exact_threshold(ema, keep_fraction)
  return histogram_threshold(ema, keep_fraction, axis_names)
