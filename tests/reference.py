"""NumPy reference for the SMI update rule, written from the rule alone.

The tests compare `smi_optax.smi` against this module. It works on flat lists of
leaves, computes in float64 with `np.fft`, and always selects exactly: it keeps
the k = clip(round(keep_fraction * n), 1, n) largest EMA magnitudes of a leaf.

Per floating leaf g with g.ndim >= 1 and g.size >= min_size:

  G     = rfft2(view(g))                        (rfft for a 1-D view)
  m_t   = beta * m_{t-1} + (1 - beta) * |G|     (m_0 = 0)
  mask  = m_t >= k-th largest value of m_t
  f     = irfft2(G * mask), reshaped back        (f = g when keep_fraction >= 1)
  alpha = clip(blend, 0, 1)                      (blend(count) for a schedule,
                                                  max_blend * kept_energy if adaptive)
  u     = (1 - alpha) * g + alpha * f

A leaf with a NaN or Inf passes through and keeps its previous state.
"""

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Adaptive:
  """Blend rule alpha = max_blend * kept_energy, as `smi_optax.adaptive_blend`."""

  max_blend: float


@dataclasses.dataclass(frozen=True)
class View:
  """Axes flattened into the FFT rows and columns. The other axes are batch axes."""

  row_axes: tuple[int, ...]
  col_axes: tuple[int, ...]


def default_view(ndim: int) -> View:
  """Return the view that `smi` uses when `views` is None."""
  if ndim == 1:
    return View(row_axes=(), col_axes=(0,))
  return View(row_axes=tuple(range(ndim - 1)), col_axes=(ndim - 1,))


def is_filtered(leaf, min_size: int, enabled: bool = True) -> bool:
  """Return whether `smi` filters this leaf instead of passing it through."""
  leaf = np.asarray(leaf)
  floating = np.issubdtype(leaf.dtype, np.floating) or leaf.dtype.name == 'bfloat16'
  return enabled and floating and leaf.ndim >= 1 and leaf.size >= min_size


def _batch_axes(ndim: int, view: View) -> tuple[int, ...]:
  used = set(view.row_axes) | set(view.col_axes)
  return tuple(axis for axis in range(ndim) if axis not in used)


def to_view(leaf: np.ndarray, view: View) -> np.ndarray:
  """Reshape a leaf to (batch, rows, cols), where rows is 1 for a 1-D view."""
  batch_axes = _batch_axes(leaf.ndim, view)
  order = batch_axes + view.row_axes + view.col_axes
  moved = np.transpose(leaf, order)
  batch = int(np.prod([leaf.shape[a] for a in batch_axes], dtype=np.int64))
  rows = int(np.prod([leaf.shape[a] for a in view.row_axes], dtype=np.int64))
  cols = int(np.prod([leaf.shape[a] for a in view.col_axes], dtype=np.int64))
  return moved.reshape(batch, rows, cols)


def from_view(viewed: np.ndarray, shape: tuple[int, ...], view: View) -> np.ndarray:
  """Invert `to_view` for a leaf of the given shape."""
  batch_axes = _batch_axes(len(shape), view)
  order = batch_axes + view.row_axes + view.col_axes
  moved = viewed.reshape([shape[a] for a in order])
  return np.transpose(moved, np.argsort(order))


def exact_threshold(magnitudes: np.ndarray, keep_fraction: float) -> float:
  """Return the k-th largest value, with k = clip(round(keep_fraction * n), 1, n)."""
  n = magnitudes.size
  k = int(np.clip(np.round(keep_fraction * n), 1, n))
  return float(np.sort(magnitudes, axis=None)[n - k])


def threshold_margin(magnitudes: np.ndarray, keep_fraction: float) -> float:
  """Return the gap between the k-th and (k + 1)-th largest values, over the k-th.

  A float32 implementation and this float64 reference can only disagree on the
  mask when this gap is within rounding error. Conjugate-symmetric rfft
  coefficients (column 0 and the Nyquist column) have equal magnitudes, so a
  test should check that its data does not put such a pair at the threshold.
  """
  n = magnitudes.size
  k = int(np.clip(np.round(keep_fraction * n), 1, n))
  if k == n:
    return np.inf
  ordered = np.sort(magnitudes, axis=None)[::-1]
  return float((ordered[k - 1] - ordered[k]) / max(ordered[k - 1], 1e-300))


def init(params: Sequence, *, min_size: int, mask: Sequence[bool] | None = None,
         views: Sequence[View | None] | None = None) -> dict:
  """Return the state for a flat list of leaves, with None for pass-through leaves."""
  mask = mask if mask is not None else [True] * len(params)
  views = views if views is not None else [None] * len(params)
  spectral_ema, kept_energy, blend = [], [], []
  for leaf, enabled, view in zip(params, mask, views):
    leaf = np.asarray(leaf)
    if not is_filtered(leaf, min_size, enabled):
      spectral_ema.append(None)
      kept_energy.append(None)
      blend.append(None)
      continue
    view = view or default_view(leaf.ndim)
    batch, rows, cols = to_view(leaf, view).shape
    spectral_ema.append(np.zeros((batch, rows, cols // 2 + 1)))
    kept_energy.append(0.0)
    blend.append(0.0)
  return {'count': 0, 'spectral_ema': spectral_ema, 'kept_energy': kept_energy,
          'blend': blend, 'margin': [None] * len(params)}


def _alpha(blend, count: int, kept_energy: float) -> float:
  if isinstance(blend, Adaptive):
    alpha = blend.max_blend * kept_energy
  elif callable(blend):
    alpha = float(blend(count))
  else:
    alpha = blend
  return float(np.clip(alpha, 0.0, 1.0))


def update_leaf(grad: np.ndarray, ema: np.ndarray, *, keep_fraction: float,
                beta: float, blend: float | Callable | Adaptive, count: int,
                view: View) -> tuple[np.ndarray, np.ndarray, float, float, float]:
  """Return (update, new_ema, kept_energy, alpha, margin) for one finite leaf."""
  grad = np.asarray(grad, np.float64)
  viewed = to_view(grad, view)  # (batch, rows, cols)
  spectrum = np.fft.rfft2(viewed)  # (batch, rows, cols // 2 + 1)
  magnitude = np.abs(spectrum)

  new_ema = beta * ema + (1.0 - beta) * magnitude

  threshold = exact_threshold(new_ema, keep_fraction)
  keep = new_ema >= threshold
  margin = threshold_margin(new_ema, keep_fraction)

  if keep_fraction >= 1.0:
    filtered = grad
  else:
    inverse = np.fft.irfft2(spectrum * keep, s=viewed.shape[1:])
    filtered = from_view(inverse, grad.shape, view)

  # The share of spectral energy kept, by Parseval's theorem ||f||^2 / ||g||^2.
  total = float(np.sum(grad**2))
  kept_energy = float(np.sum(filtered**2) / total) if total > 0 else 1.0
  alpha = _alpha(blend, count, kept_energy)
  update = (1.0 - alpha) * grad + alpha * filtered
  return update, new_ema, kept_energy, alpha, margin


def update(grads: Sequence, state: dict, *, keep_fraction: float, beta: float,
           blend: float | Callable | Adaptive,
           views: Sequence[View | None] | None = None) -> tuple[list, dict]:
  """Apply one SMI step to a flat list of leaves and return (updates, new_state).

  Updates of filtered leaves are float64, and pass-through leaves come back as given.
  `state['margin']` stores `threshold_margin` of each leaf at this step.
  """
  views = views if views is not None else [None] * len(grads)
  count = state['count']
  updates = []
  new_state = {'count': count + 1, 'spectral_ema': [], 'kept_energy': [],
               'blend': [], 'margin': []}
  for index, grad in enumerate(grads):
    grad = np.asarray(grad)
    ema = state['spectral_ema'][index]
    if ema is None or not np.all(np.isfinite(grad.astype(np.float64))):
      updates.append(grad)
      new_state['spectral_ema'].append(ema)
      new_state['kept_energy'].append(state['kept_energy'][index])
      new_state['blend'].append(state['blend'][index])
      new_state['margin'].append(None)
      continue
    view = views[index] or default_view(grad.ndim)
    leaf_update, new_ema, kept_energy, alpha, margin = update_leaf(
        grad, ema, keep_fraction=keep_fraction, beta=beta, blend=blend,
        count=count, view=view)
    updates.append(leaf_update)
    new_state['spectral_ema'].append(new_ema)
    new_state['kept_energy'].append(kept_energy)
    new_state['blend'].append(alpha)
    new_state['margin'].append(margin)
  return updates, new_state
