"""Spectral Momentum Integration (SMI) as an optax gradient transformation.

Reference: Huang, Chen and Zheng, "Spectral momentum integration: hybrid
optimization of frequency and time domain gradients", Frontiers in Artificial
Intelligence 8, 2025, doi:10.3389/frai.2025.1628943.
"""

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from smi_optax._src import selection as selection_lib
from smi_optax._src import views as views_lib

DEFAULT_MIN_SIZE = 1024

# A tree shaped like the parameters, or a function of the parameters that
# returns one (the convention of `optax.masked`).
TreeOrFn = Union[Any, Callable[[Any], Any]]


class AdaptiveBlend(NamedTuple):
  """Blend rule ``alpha = max_blend * kept_energy``, one alpha per leaf.

  ``kept_energy`` is the share of the leaf's spectral energy (sum of squared
  coefficient magnitudes, Parseval-weighted) that the mask keeps at this step.
  A leaf whose energy sits mostly in the kept coefficients gets nearly
  ``max_blend``; a leaf where the mask would discard much of the gradient's
  energy leans on the raw gradient instead.
  """

  max_blend: float


def adaptive_blend(max_blend: float = 0.5) -> AdaptiveBlend:
  """Returns the adaptive blend rule ``alpha = max_blend * kept_energy``.

  Args:
    max_blend: the blend used when the mask keeps all spectral energy, in
      [0, 1].

  Returns:
    An `AdaptiveBlend` to pass as ``blend`` to `smi` or `smi_adamw`.

  Example:
    >>> import smi_optax
    >>> tx = smi_optax.smi(blend=smi_optax.adaptive_blend(0.6))
  """
  _check_range("max_blend", max_blend, 0.0, 1.0, closed_high=True)
  return AdaptiveBlend(max_blend=max_blend)


class SMIState(NamedTuple):
  """State of `smi`.

  The three trees have the structure of the parameters; leaves that SMI does
  not filter hold ``None``.

  Attributes:
    count: number of earlier updates, int32 scalar.
    spectral_ema: per leaf, the exponential moving average of the magnitudes
      of its real FFT coefficients, shaped like the half spectrum.
    kept_energy: per leaf, a float32 scalar: the share of spectral energy the
      mask kept at the last finite step.
    blend: per leaf, a float32 scalar: the blend ``alpha`` of the last step.
  """

  count: chex.Array
  spectral_ema: Any
  kept_energy: Any
  blend: Any


def _is_tracer(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def _check_range(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    closed_low: bool = True,
    closed_high: bool = False,
) -> None:
  """Raises ValueError if a concrete `value` lies outside the interval."""
  if _is_tracer(value):
    return  # Traced values are clipped where they are used.
  number = float(np.asarray(value))
  above_low = number >= low if closed_low else number > low
  below_high = number <= high if closed_high else number < high
  if not (above_low and below_high):
    interval = (
        f"{'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
    )
    raise ValueError(f"{name} must be in {interval}, got {name}={value!r}.")


def _resolve_min_size(min_size: Any) -> int:
  if min_size is None:
    return DEFAULT_MIN_SIZE
  if _is_tracer(min_size):
    raise ValueError(
        "min_size must be a concrete integer when init runs, got a traced"
        " value. With optax.inject_hyperparams, pass"
        " static_args=('min_size',)."
    )
  size = int(np.asarray(min_size))
  if size < 1:
    raise ValueError(f"min_size must be at least 1, got min_size={min_size!r}.")
  return size


def _resolve_tree(tree_or_fn: TreeOrFn, params: Any) -> Any:
  return tree_or_fn(params) if callable(tree_or_fn) else tree_or_fn


def _is_filtered(leaf: Any, min_size: int, selected: bool) -> bool:
  """Whether SMI filters `leaf` (decided once, at init)."""
  if not selected or not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
    return False
  return (
      len(leaf.shape) >= 1
      and math.prod(leaf.shape) >= min_size
      and jnp.issubdtype(leaf.dtype, jnp.floating)
  )


def _compute_dtype(dtype: Any) -> jnp.dtype:
  # JAX's FFT rejects bf16 and f16, so work in at least float32.
  return jnp.promote_types(dtype, jnp.float32)


def _filter_leaf(
    g: jax.Array,
    ema: jax.Array,
    previous_kept_energy: jax.Array,
    view: views_lib.SpectralView,
    *,
    keep_fraction: jax.Array,
    beta: jax.Array,
    blend: Any,
    count: jax.Array,
    selection: selection_lib.Selection,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Runs the six SMI steps on one leaf.

  Returns:
    The update, the new spectral EMA, the kept energy share and the blend
    alpha. A non-finite `g` yields ``g`` itself and the previous EMA and
    kept energy.
  """
  layout = views_lib.make_layout(g.shape, view)
  g_compute = g.astype(_compute_dtype(g.dtype))
  finite = jnp.all(jnp.isfinite(g_compute))

  spectrum = views_lib.forward(g_compute, layout)
  magnitude = jnp.abs(spectrum)

  new_ema = beta * ema.astype(magnitude.dtype) + (1.0 - beta) * magnitude

  threshold = selection_lib.select_threshold(new_ema, keep_fraction, selection)
  # Compare in float32, the precision the threshold was chosen in.
  mask = new_ema.astype(jnp.float32) >= threshold

  power = magnitude * magnitude * views_lib.energy_weights(layout)
  total_energy = jnp.sum(power)
  kept_energy = jnp.where(
      total_energy > 0,
      jnp.sum(jnp.where(mask, power, 0.0)) / jnp.where(total_energy > 0, total_energy, 1.0),
      1.0,
  ).astype(jnp.float32)

  filtered = views_lib.inverse(jnp.where(mask, spectrum, 0), layout)
  filtered = jnp.where(keep_fraction >= 1.0, g_compute, filtered)

  if isinstance(blend, AdaptiveBlend):
    alpha = blend.max_blend * kept_energy
  elif callable(blend):
    alpha = blend(count)
  else:
    alpha = blend
  alpha = jnp.clip(jnp.asarray(alpha, jnp.float32), 0.0, 1.0)
  alpha_compute = alpha.astype(g_compute.dtype)
  blended = (1 - alpha_compute) * g_compute + alpha_compute * filtered

  update = jnp.where(finite, blended.astype(g.dtype), g)
  new_ema = jnp.where(finite, new_ema.astype(ema.dtype), ema)
  kept_energy = jnp.where(finite, kept_energy, previous_kept_energy)
  return update, new_ema, kept_energy, alpha


def smi(
    keep_fraction: Union[float, jax.Array] = 0.5,
    beta: Union[float, jax.Array] = 0.9,
    blend: Union[float, jax.Array, optax.Schedule, AdaptiveBlend] = 0.5,
    *,
    min_size: Optional[int] = None,
    views: Optional[TreeOrFn] = None,
    mask: Optional[TreeOrFn] = None,
    selection: selection_lib.Selection = "histogram",
    ema_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Spectral Momentum Integration: filters each gradient leaf in frequency space.

  For each floating-point leaf :math:`g` with at least ``min_size`` elements,
  viewed as a matrix (see `SpectralView`):

  .. math::

    G_t &= \mathrm{rfft2}(g_t) \\
    m_t &= \beta\, m_{t-1} + (1 - \beta)\, |G_t|, \quad m_0 = 0 \\
    M_t &= [\, m_t \ge \tau_t \,], \quad \tau_t = \text{the
           } \lceil \text{keep\_fraction} \cdot n \rfloor
           \text{-th largest entry of } m_t \\
    f_t &= \mathrm{irfft2}(G_t \odot M_t) \\
    u_t &= (1 - \alpha_t)\, g_t + \alpha_t\, f_t

  where :math:`n` is the leaf's number of half-spectrum coefficients and
  :math:`\alpha_t` is ``blend``: a number, an optax schedule evaluated at the
  number of earlier updates, or `adaptive_blend`'s rule
  :math:`\alpha_t = \alpha_{\max} \cdot E_{\text{kept}}` with
  :math:`E_{\text{kept}}` the share of spectral energy that :math:`M_t` keeps.

  The FFTs run in float32 (float64 for float64 leaves) and the update is cast
  back to the gradient's dtype. Leaves that are scalars, smaller than
  ``min_size``, not floating point or masked out pass through unchanged and
  hold no spectral state. A leaf containing NaN or Inf passes through
  unfiltered for that step, and its spectral EMA keeps its previous value.

  Args:
    keep_fraction: share of each leaf's coefficients kept by the mask, in
      (0, 1]. 1 returns the gradient unchanged.
    beta: decay of the spectral EMA, in [0, 1). 0 uses only the current
      gradient's spectrum.
    blend: weight of the filtered gradient, in [0, 1]: a number, an optax
      schedule of the update count (0 at the first update), or
      `adaptive_blend`. 0 returns the gradient unchanged.
    min_size: leaves with fewer elements pass through; at least 1. ``None``
      means `DEFAULT_MIN_SIZE` (1024), which leaves biases and normalization
      scales of small models alone.
    views: a tree of `SpectralView` (or ``None`` for the default view) shaped
      like the parameters, or a function of the parameters returning one.
      By default a vector is transformed in 1-D and a tensor of rank 2 or
      more as the matrix ``(prod(shape[:-1]), shape[-1])``.
    mask: a tree of booleans shaped like the parameters, or a function of the
      parameters returning one (as in `optax.masked`); leaves marked False
      pass through.
    selection: ``"histogram"`` (default) counts the coefficients in 8192
      buckets of about 3% relative width in one pass and interpolates inside
      the bucket that holds the threshold; its kept fraction stays within
      0.01 of ``keep_fraction`` on leaves of 1,000 coefficients or more.
      ``"exact"`` sorts every coefficient, several times the cost of the
      FFTs, and is meant for tests and reference runs.
    ema_dtype: dtype of the spectral EMA; ``None`` means float32. Pass
      ``"bfloat16"`` to halve its memory.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is `SMIState`.

  Raises:
    ValueError: if a concrete hyperparameter is out of range.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import smi_optax
    >>> params = {"w": jnp.ones((64, 32))}
    >>> tx = optax.chain(smi_optax.smi(keep_fraction=0.5), optax.adam(1e-3))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((64, 32))}, state, params)

  .. warning::
    Hyperparameters that arrive traced (``optax.inject_hyperparams`` under
    ``jax.jit``) cannot be checked, so they are clipped: ``keep_fraction``
    and ``blend`` to [0, 1] (a kept count of at least one coefficient) and
    ``beta`` to [0, 1]. ``min_size`` must stay static; with
    ``inject_hyperparams`` leave it unset or list it in ``static_args``.
  """
  _check_range("keep_fraction", keep_fraction, 0.0, 1.0, closed_low=False, closed_high=True)
  _check_range("beta", beta, 0.0, 1.0)
  if not callable(blend) and not isinstance(blend, AdaptiveBlend):
    _check_range("blend", blend, 0.0, 1.0, closed_high=True)
  if selection not in ("histogram", "exact"):
    raise ValueError(
        f"selection must be 'histogram' or 'exact', got selection={selection!r}."
    )
  if min_size is not None and not _is_tracer(min_size):
    _resolve_min_size(min_size)
  ema_dtype = jnp.dtype(jnp.float32 if ema_dtype is None else ema_dtype)
  if not jnp.issubdtype(ema_dtype, jnp.floating):
    raise ValueError(f"ema_dtype must be a floating dtype, got ema_dtype={ema_dtype}.")

  def init_fn(params):
    size_floor = _resolve_min_size(min_size)
    leaves, treedef = jax.tree.flatten(params)
    selected = treedef.flatten_up_to(_resolve_tree(mask, params)) if mask is not None else [True] * len(leaves)
    view_leaves = _view_leaves(views, params, treedef, leaves)

    emas, energies, blends = [], [], []
    for leaf, is_selected, view in zip(leaves, selected, view_leaves):
      if not _is_filtered(leaf, size_floor, bool(is_selected)):
        emas.append(None)
        energies.append(None)
        blends.append(None)
        continue
      layout = views_lib.make_layout(tuple(leaf.shape), view)
      emas.append(jnp.zeros(layout.spectrum_shape, ema_dtype))
      energies.append(jnp.zeros([], jnp.float32))
      blends.append(jnp.zeros([], jnp.float32))
    return SMIState(
        count=jnp.zeros([], jnp.int32),
        spectral_ema=treedef.unflatten(emas),
        kept_energy=treedef.unflatten(energies),
        blend=treedef.unflatten(blends),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    leaves, treedef = jax.tree.flatten(updates)
    emas = treedef.flatten_up_to(state.spectral_ema)
    energies = treedef.flatten_up_to(state.kept_energy)
    blends = treedef.flatten_up_to(state.blend)
    view_leaves = _view_leaves(views, params if params is not None else updates, treedef, leaves)

    clipped_keep = jnp.clip(jnp.asarray(keep_fraction, jnp.float32), 0.0, 1.0)
    clipped_beta = jnp.clip(jnp.asarray(beta, jnp.float32), 0.0, 1.0)
    new_updates, new_emas, new_energies, new_blends = [], [], [], []
    for g, ema, energy, alpha, view in zip(leaves, emas, energies, blends, view_leaves):
      if ema is None:
        new_updates.append(g)
        new_emas.append(None)
        new_energies.append(None)
        new_blends.append(None)
        continue
      update, ema, kept, alpha_used = _filter_leaf(
          g,
          ema,
          energy,
          view,
          keep_fraction=clipped_keep,
          beta=clipped_beta,
          blend=blend,
          count=state.count,
          selection=selection,
      )
      new_updates.append(update)
      new_emas.append(ema)
      new_energies.append(kept)
      new_blends.append(alpha_used)

    new_state = SMIState(
        count=optax.safe_increment(state.count),
        spectral_ema=treedef.unflatten(new_emas),
        kept_energy=treedef.unflatten(new_energies),
        blend=treedef.unflatten(new_blends),
    )
    return treedef.unflatten(new_updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _view_leaves(views: Optional[TreeOrFn], params: Any, treedef: Any, leaves: list) -> list:
  """Returns one `SpectralView` per leaf, defaults filled in."""
  if views is None:
    given = [None] * len(leaves)
  else:
    given = treedef.flatten_up_to(_resolve_tree(views, params))
  result = []
  for leaf, view in zip(leaves, given):
    if view is None:
      view = views_lib.default_view(len(getattr(leaf, "shape", ())))
    result.append(view)
  return result


def smi_adamw(
    learning_rate: optax.ScalarOrSchedule,
    keep_fraction: Union[float, jax.Array] = 0.5,
    beta: Union[float, jax.Array] = 0.9,
    blend: Union[float, jax.Array, optax.Schedule, AdaptiveBlend] = 0.5,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    weight_decay_mask: Optional[TreeOrFn] = None,
    min_size: Optional[int] = None,
    views: Optional[TreeOrFn] = None,
    mask: Optional[TreeOrFn] = None,
    selection: selection_lib.Selection = "histogram",
    ema_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """AdamW on SMI-filtered gradients: ``optax.chain(smi(...), optax.adamw(...))``.

  Args:
    learning_rate: a number or an optax schedule.
    keep_fraction: see `smi`.
    beta: see `smi`.
    blend: see `smi`.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: decoupled weight decay, as in `optax.adamw`.
    weight_decay_mask: which leaves get weight decay, as ``mask`` in
      `optax.adamw`.
    min_size: see `smi`.
    views: see `smi`.
    mask: which leaves SMI filters; see `smi`.
    selection: see `smi`.
    ema_dtype: see `smi`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example:
    >>> import smi_optax
    >>> tx = smi_optax.smi_adamw(1e-3, keep_fraction=0.5, blend=0.5)
  """
  return optax.chain(
      smi(
          keep_fraction,
          beta,
          blend,
          min_size=min_size,
          views=views,
          mask=mask,
          selection=selection,
          ema_dtype=ema_dtype,
      ),
      optax.adamw(
          learning_rate,
          b1=b1,
          b2=b2,
          eps=eps,
          weight_decay=weight_decay,
          mask=weight_decay_mask,
      ),
  )
