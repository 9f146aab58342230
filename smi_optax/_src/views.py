"""Views: how a gradient leaf is laid out as the matrix (or vector) SMI transforms."""

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp


class SpectralView(NamedTuple):
  """Axes of a leaf that form the rows and the columns of its 2-D spectrum.

  The leaf is transposed to ``batch_axes + row_axes + col_axes`` and reshaped
  to ``batch_shape + (rows, cols)``, where ``rows`` is the product of the row
  axes' sizes and ``cols`` that of the column axes. Axes in neither group are
  batch axes: each batch slice gets its own 2-D transform, but the kept
  fraction is chosen over the whole leaf. With ``row_axes=()`` the transform
  is a 1-D real FFT over the flattened column axes.

  Attributes:
    row_axes: axes flattened into the row dimension (may be empty).
    col_axes: axes flattened into the column dimension (not empty). The real
      FFT halves this dimension to ``cols // 2 + 1`` coefficients.
  """

  row_axes: Sequence[int]
  col_axes: Sequence[int]


def default_view(ndim: int) -> SpectralView:
  """Returns the default view: a vector stays 1-D, else (prod(shape[:-1]), shape[-1])."""
  return SpectralView(row_axes=tuple(range(ndim - 1)), col_axes=(ndim - 1,))


class Layout(NamedTuple):
  """Static facts about one leaf's view, computed once from its shape."""

  permutation: tuple[int, ...]  # to batch + rows + cols order
  batch_shape: tuple[int, ...]
  rows: int  # 0 for a 1-D transform
  cols: int
  permuted_shape: tuple[int, ...]
  num_row_axes: int
  num_col_axes: int

  @property
  def spectrum_shape(self) -> tuple[int, ...]:
    half = self.cols // 2 + 1
    if self.rows:
      return self.batch_shape + (self.rows, half)
    return self.batch_shape + (half,)


def make_layout(shape: tuple[int, ...], view: SpectralView) -> Layout:
  """Checks `view` against a leaf of `shape` and returns its layout.

  Raises:
    ValueError: if an axis is out of range or repeated, or `col_axes` is empty.
  """
  ndim = len(shape)
  row_axes = tuple(int(a) for a in view.row_axes)
  col_axes = tuple(int(a) for a in view.col_axes)
  if not col_axes:
    raise ValueError(f"SpectralView.col_axes must not be empty, got {view}.")
  normalized = []
  for axis in row_axes + col_axes:
    if not -ndim <= axis < ndim:
      raise ValueError(
          f"SpectralView axis {axis} is out of range for a leaf of shape"
          f" {shape}; valid axes are {-ndim}..{ndim - 1}."
      )
    normalized.append(axis % ndim)
  if len(set(normalized)) != len(normalized):
    raise ValueError(f"SpectralView repeats an axis: {view} for shape {shape}.")

  row_axes = tuple(normalized[: len(row_axes)])
  col_axes = tuple(normalized[len(row_axes) :])
  batch_axes = tuple(a for a in range(ndim) if a not in normalized)
  permutation = batch_axes + row_axes + col_axes
  return Layout(
      permutation=permutation,
      batch_shape=tuple(shape[a] for a in batch_axes),
      rows=math.prod(shape[a] for a in row_axes) if row_axes else 0,
      cols=math.prod(shape[a] for a in col_axes),
      permuted_shape=tuple(shape[a] for a in permutation),
      num_row_axes=len(row_axes),
      num_col_axes=len(col_axes),
  )


def forward(x: jax.Array, layout: Layout) -> jax.Array:
  """Returns the real FFT of `x` laid out by `layout`."""
  x = jnp.transpose(x, layout.permutation)
  if layout.rows:
    x = x.reshape(layout.batch_shape + (layout.rows, layout.cols))
    return jnp.fft.rfft2(x)  # (..., rows, cols // 2 + 1)
  x = x.reshape(layout.batch_shape + (layout.cols,))
  return jnp.fft.rfft(x)  # (..., cols // 2 + 1)


def inverse(spectrum: jax.Array, layout: Layout) -> jax.Array:
  """Inverts `forward`: returns the real array in the leaf's original shape."""
  if layout.rows:
    x = jnp.fft.irfft2(spectrum, s=(layout.rows, layout.cols))
  else:
    x = jnp.fft.irfft(spectrum, n=layout.cols)
  x = x.reshape(layout.permuted_shape)
  inverse_permutation = tuple(sorted(range(len(layout.permutation)), key=layout.permutation.__getitem__))
  return jnp.transpose(x, inverse_permutation)
