"""Shardings of SMI's state on a device mesh, for global and shard-local filtering."""

import math
from typing import Any, Optional

from jax.sharding import PartitionSpec

from smi_optax._src import views as views_lib


def _axes_of(entry: Any) -> tuple[str, ...]:
  """Returns the mesh axis names of one PartitionSpec entry."""
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def _entry(axes: tuple[str, ...]) -> Any:
  """Returns the PartitionSpec entry for `axes`: None, a name, or a tuple."""
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def dim_axes(spec: Optional[PartitionSpec], ndim: int) -> list[tuple[str, ...]]:
  """Returns the mesh axes of each of `ndim` dimensions under `spec`.

  Raises:
    ValueError: if `spec` has more entries than the leaf has dimensions.
  """
  entries = list(spec or ())
  if len(entries) > ndim:
    raise ValueError(f"PartitionSpec {spec} has more entries than the leaf's {ndim} dimensions.")
  entries += [None] * (ndim - len(entries))
  return [_axes_of(e) for e in entries]


def leaf_mesh_axes(spec: Optional[PartitionSpec], ndim: int) -> tuple[str, ...]:
  """Returns every mesh axis that shards a leaf, in dimension order."""
  return tuple(axis for axes in dim_axes(spec, ndim) for axis in axes)


def local_shape(
    shape: tuple[int, ...], spec: Optional[PartitionSpec], mesh_shape: dict[str, int]
) -> tuple[int, ...]:
  """Returns the shape of one shard of a leaf.

  Raises:
    ValueError: if a dimension does not divide evenly by its shard count.
  """
  result = []
  for size, axes in zip(shape, dim_axes(spec, len(shape))):
    shards = math.prod(mesh_shape[a] for a in axes)
    if size % shards:
      raise ValueError(
          f"shard-local SMI needs each sharded dimension to divide evenly: a leaf"
          f" of shape {shape} has a dimension of {size} over {shards} shards"
          f" ({spec})."
      )
    result.append(size // shards)
  return tuple(result)


def _grouped_axes(
    layout: views_lib.Layout, spec: Optional[PartitionSpec]
) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]], list[tuple[str, ...]]]:
  """Splits a leaf's per-dimension mesh axes into batch, row and column groups."""
  ndim = len(layout.permutation)
  axes = dim_axes(spec, ndim)
  permuted = [axes[a] for a in layout.permutation]
  batch_count = len(layout.batch_shape)
  return (
      permuted[:batch_count],
      permuted[batch_count : batch_count + layout.num_row_axes],
      permuted[batch_count + layout.num_row_axes :],
  )


def _flatten(groups: list[tuple[str, ...]]) -> tuple[str, ...]:
  return tuple(axis for axes in groups for axis in axes)


def global_ema_spec(layout: views_lib.Layout, spec: Optional[PartitionSpec]) -> PartitionSpec:
  """Returns the spectral EMA's spec when the whole leaf is transformed.

  Batch dimensions keep the leaf's sharding. The row dimension keeps it when
  only the first row axis is sharded, because flattening then maps each
  shard to a contiguous block of rows. The half-spectrum column dimension
  (``cols // 2 + 1``, rarely divisible by a mesh axis) is replicated.
  """
  batch, rows, _ = _grouped_axes(layout, spec)
  entries = [_entry(axes) for axes in batch]
  if layout.rows:
    leading_only = all(not axes for axes in rows[1:])
    entries.append(_entry(rows[0]) if rows and leading_only else None)
  entries.append(None)
  return PartitionSpec(*entries)


def local_ema_layout(
    layout_of_shard: views_lib.Layout, spec: Optional[PartitionSpec], mesh_shape: dict[str, int]
) -> tuple[tuple[int, ...], PartitionSpec]:
  """Returns the global shape and spec of a shard-locally filtered EMA.

  Each shard's spectrum has ``layout_of_shard.spectrum_shape``. The global
  array stacks them along every sharded dimension in mesh order, so the row
  and column dimensions carry all mesh axes of the row and column axes.
  """
  batch, rows, cols = _grouped_axes(layout_of_shard, spec)
  groups = [*batch] + ([_flatten(rows)] if layout_of_shard.rows else []) + [_flatten(cols)]
  shape = tuple(
      size * math.prod(mesh_shape[a] for a in axes)
      for size, axes in zip(layout_of_shard.spectrum_shape, groups)
  )
  return shape, PartitionSpec(*[_entry(axes) for axes in groups])
