"""Threshold selection: the value above which a leaf's spectral EMA is kept."""

from typing import Literal, Optional

import jax
import jax.numpy as jnp

Selection = Literal["histogram", "exact"]

# Radix digits of the histogram selection, as (lowest bit, bit count) of the
# float32 bit pattern. The last digit is counted only when the bucket the
# others single out is crowded. Small leaves take the exponent, then the top
# 13 mantissa bits (buckets of relative width 2**-13), then the last 10 bits,
# so the count arrays stay small next to the leaf. Large leaves take the top
# 16 bits at once (relative width 2**-8), then the last 15, saving a pass.
_SMALL_LEAF_DIGITS = ((23, 8), (10, 13), (0, 10))
_LARGE_LEAF_DIGITS = ((15, 16), (0, 15))
_LARGE_LEAF = 1 << 16  # coefficients
_INFINITY_BITS = 0x7F800000
_GROUP = 256  # buckets per group in the two-level search

# A bucket of the second level holding more than this share of the leaf's
# coefficients is counted again by its last bits, so interpolation inside a
# bucket can never miss the kept count by more than this share.
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
  """Returns, per position, the sum of 1-D `counts` from there to the end.

  On XLA's CPU backend a window reduction as wide as the array compiled to
  fewer operations than `jnp.cumsum`, which runs as dozens of small scan
  steps, and the arrays here have at most a few hundred entries.
  """
  size = counts.shape[0]
  return jax.lax.reduce_window(
      counts, 0, jax.lax.add, (size,), (1,), ((0, size - 1),)
  )


def _find_kth_largest_bucket(
    counts: jax.Array, k: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Finds the bucket holding the k-th largest value, from per-bucket counts.

  Searches in two levels (groups of `_GROUP` buckets, then buckets within
  the group), so each suffix sum runs over a few hundred entries.

  Returns:
    The bucket's index, the count of values in higher buckets, and the count
    in the bucket itself.
  """
  group_size = min(_GROUP, counts.shape[0])
  groups = counts.reshape(-1, group_size)
  group_totals = jnp.sum(groups, axis=1)
  group_at_or_above = _suffix_sums(group_totals)
  group = jnp.maximum(jnp.sum(group_at_or_above >= k) - 1, 0)
  above_group = group_at_or_above[group] - group_totals[group]

  in_group = jax.lax.dynamic_index_in_dim(groups, group, keepdims=False)
  at_or_above = _suffix_sums(in_group) + above_group
  offset = jnp.maximum(jnp.sum(at_or_above >= k) - 1, 0)
  in_bucket = in_group[offset]
  return group * group_size + offset, at_or_above[offset] - in_bucket, in_bucket


def histogram_threshold(
    ema: jax.Array,
    keep_fraction: jax.Array,
    axis_names: tuple[str, ...] = (),
    batch_axis: Optional[str] = None,
) -> jax.Array:
  """Returns a threshold that keeps about `keep_fraction` of `ema`, without sorting.

  A non-negative float32's bit pattern, read as an int32, grows with its
  value, so the k-th largest value can be found digit by digit (a radix
  select). Scatter passes count the coefficients by their leading digits
  (see `_SMALL_LEAF_DIGITS` and `_LARGE_LEAF_DIGITS`), each pass within the
  bucket the previous one chose, down to a bucket of relative width 2**-13
  (small leaves) or 2**-8 (large leaves). If that bucket contains at most
  `REFINE_SHARE` of the leaf, the threshold is interpolated linearly (in bit
  space) inside it, so the kept count is off by less than the bucket's
  count. Otherwise one more pass counts the bucket's members by their last
  bits and returns the exact k-th largest value. The threshold is capped at
  the leaf's maximum, so at least one coefficient is kept.

  Inside ``jax.shard_map``, `axis_names` names the mesh axes over which
  `ema` is one shard: counts and maxima are then summed and taken over all
  shards (at most about 2**16 int32 per leaf cross the devices), so every
  shard gets the threshold of the whole leaf.

  Under ``jax.vmap`` over several leaves, `batch_axis` names the mapped axis:
  the third pass then runs for all of them when any leaf needs it, so it
  stays a real branch instead of becoming a select that always runs it.
  """
  flat = ema.reshape(-1).astype(jnp.float32)
  n = flat.shape[0]
  if axis_names:
    n = n * jax.lax.psum(1, axis_names)
  k = _kept_count(keep_fraction, n)
  # -0.0 reads as a negative int and lands in the lowest bucket; NaN and Inf
  # land in the highest, and their update is discarded anyway.
  bits = jnp.maximum(_float32_bits(flat), 0)

  def count_digit(digit, prefix_shift, prefix):
    """Counts by `digit` the values whose bits above `prefix_shift` equal `prefix`."""
    shift, width = digit
    digits = jnp.right_shift(bits, shift) & ((1 << width) - 1)
    if prefix_shift is not None:
      digits = jnp.where(jnp.right_shift(bits, prefix_shift) == prefix, digits, 1 << width)
    counts = jnp.zeros((1 << width,), jnp.int32).at[digits].add(1, mode="drop")
    return jax.lax.psum(counts, axis_names) if axis_names else counts

  *leading, last = _LARGE_LEAF_DIGITS if flat.shape[0] >= _LARGE_LEAF else _SMALL_LEAF_DIGITS
  prefix, prefix_shift, above = jnp.zeros([], jnp.int32), None, jnp.zeros([], jnp.int32)
  for digit in leading:
    value, above_digit, in_bucket = _find_kth_largest_bucket(
        count_digit(digit, prefix_shift, prefix), k - above
    )
    above = above + above_digit
    prefix = jnp.left_shift(prefix, digit[1]) | value
    prefix_shift = digit[0]
  bucket_low_bits = jnp.left_shift(prefix, prefix_shift)
  bucket_width = 1 << prefix_shift

  def interpolate():
    share_to_keep = (k - above).astype(jnp.float32) / jnp.maximum(in_bucket, 1)
    offset = (1.0 - share_to_keep) * float(bucket_width)
    return bucket_low_bits + jnp.clip(offset, 0, bucket_width - 1).astype(jnp.int32)

  def refine():
    value, _, _ = _find_kth_largest_bucket(count_digit(last, prefix_shift, prefix), k - above)
    return bucket_low_bits + value

  needs_refine = in_bucket > jnp.maximum(REFINE_SHARE * n, 1.0)
  if batch_axis is not None:
    needs_refine = jax.lax.pmax(needs_refine.astype(jnp.int32), batch_axis) > 0
  threshold_bits = jax.lax.cond(needs_refine, refine, interpolate)
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
    batch_axis: Optional[str] = None,
) -> jax.Array:
  """Returns the threshold of `ema` for `keep_fraction` by `selection`.

  `axis_names` (mesh axes inside ``jax.shard_map``) requires the histogram
  selection, because an exact selection would gather the whole leaf.
  """
  if selection == "exact":
    if axis_names:
      raise ValueError("selection='exact' is not available shard-locally; use 'histogram'.")
    return exact_threshold(ema, keep_fraction)
  return histogram_threshold(ema, keep_fraction, axis_names, batch_axis)
