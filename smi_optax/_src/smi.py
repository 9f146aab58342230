"""Spectral Momentum Integration (SMI) as an optax gradient transformation.

Reference: Huang, Chen and Zheng, "Spectral momentum integration: hybrid
optimization of frequency and time domain gradients", Frontiers in Artificial
Intelligence 8, 2025, doi:10.3389/frai.2025.1628943.
"""

import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from smi_optax._src import selection as selection_lib
from smi_optax._src import sharding as sharding_lib
from smi_optax._src import views as views_lib

DEFAULT_MIN_SIZE = 1024

# A tree shaped like the parameters, or a function of the parameters that
# returns one (the convention of `optax.masked`).
TreeOrFn = Union[Any, Callable[[Any], Any]]


class AdaptiveBlend(NamedTuple):
  """Blend rule ``alpha = max_blend * kept_energy``, one alpha per leaf.

  ``kept_energy`` is the share of the leaf's spectral energy that the mask
  keeps at this step, computed by Parseval's theorem as
  ``||filtered||^2 / ||g||^2``.
  A leaf whose energy sits mostly in the kept coefficients gets nearly
  ``max_blend``. A leaf whose mask would discard much of the gradient's
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

  The four trees have the structure of the parameters; leaves that SMI does
  not filter hold ``None``.

  Attributes:
    count: number of earlier updates, int32 scalar.
    spectral_ema: per leaf, the exponential moving average of the magnitudes
      of its real FFT coefficients, shaped like the half spectrum.
    kept_energy: per leaf, a float32 scalar: the share of spectral energy the
      mask kept at the last finite step.
    blend: per leaf, a float32 scalar: the blend ``alpha`` of the last
      finite step.
    threshold: per leaf, a float32 scalar: the mask threshold of the last
      finite step, reused between recomputations when ``mask_every > 1``.
  """

  count: jax.Array
  spectral_ema: Any
  kept_energy: Any
  blend: Any
  threshold: Any


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


def _resolve_static_int(name: str, value: Any, default: int) -> int:
  """Returns `value` as a Python int of at least 1, or `default` for None.

  Raises:
    ValueError: if `value` is traced, not an integer, or below 1.
  """
  if value is None:
    return default
  if _is_tracer(value):
    raise ValueError(
        f"{name} must be a concrete integer, got a traced value. With"
        f" optax.inject_hyperparams, leave {name} unset or pass"
        f" static_args=('{name}',)."
    )
  number = np.asarray(value)
  if number.ndim != 0 or not np.issubdtype(number.dtype, np.integer) or isinstance(value, bool):
    raise ValueError(f"{name} must be an integer of at least 1, got {name}={value!r}.")
  if int(number) < 1:
    raise ValueError(f"{name} must be at least 1, got {name}={value!r}.")
  return int(number)


def _resolve_tree(tree_or_fn: TreeOrFn, params: Any) -> Any:
  return tree_or_fn(params) if callable(tree_or_fn) else tree_or_fn


def _is_filtered(leaf: Any, min_size: int, selected: bool) -> bool:
  """Returns whether SMI filters `leaf`, decided once at init."""
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


class _LeafState(NamedTuple):
  ema: jax.Array
  kept_energy: jax.Array
  blend: jax.Array
  threshold: jax.Array


def _filter_leaf(
    g: jax.Array,
    previous: _LeafState,
    view: views_lib.SpectralView,
    *,
    keep_fraction: jax.Array,
    beta: jax.Array,
    blend: Union[jax.Array, AdaptiveBlend],
    selection: selection_lib.Selection,
    recompute_threshold: Optional[jax.Array],
    axis_names: tuple[str, ...] = (),
    batch_axis: Optional[str] = None,
) -> tuple[jax.Array, _LeafState]:
  """Runs the six SMI steps on one leaf.

  Args:
    blend: the adaptive rule, or the blend alpha of this step.
    recompute_threshold: ``None`` to select a threshold at every step, else a
      traced bool: select one if True, reuse ``previous.threshold`` if False.
    axis_names: mesh axes over which `g` is one shard of the leaf, inside
      ``jax.shard_map``. Each shard is transformed on its own, but the
      threshold, the kept energy and the finiteness check cover the whole
      leaf. Empty outside ``shard_map``.
    batch_axis: the ``jax.vmap`` axis name when several alike leaves are
      filtered as one stack (see `_filter_alike`).

  Returns:
    The update and the leaf's new state. A non-finite `g` yields ``g`` itself
    and keeps the previous state.
  """
  ema = previous.ema
  layout = views_lib.make_layout(g.shape, view)
  g_compute = g.astype(_compute_dtype(g.dtype))

  spectrum = views_lib.forward(g_compute, layout)
  magnitude = jnp.abs(spectrum)

  new_ema = beta * ema.astype(magnitude.dtype) + (1.0 - beta) * magnitude

  def select():
    return selection_lib.select_threshold(
        new_ema, keep_fraction, selection, axis_names, batch_axis
    )

  if recompute_threshold is None:
    threshold = select()
  else:
    threshold = jax.lax.cond(recompute_threshold, select, lambda: previous.threshold)
  # Compare in float32, the precision the threshold was chosen in.
  mask = new_ema.astype(jnp.float32) >= threshold

  filtered = views_lib.inverse(jnp.where(mask, spectrum, 0), layout)

  # By Parseval's theorem the squared norms of g and of the filtered gradient
  # are their spectral energies, so their ratio is the share of spectral
  # energy the mask keeps. Summing in the spatial domain fuses with passes
  # that run anyway, where sums over the spectrum cost a pass of their own.
  energies = jnp.stack([jnp.sum(g_compute * g_compute), jnp.sum(filtered * filtered)])
  if axis_names:
    energies = jax.lax.psum(energies, axis_names)
  total_energy, kept_total = energies[0], energies[1]
  # NaN or Inf anywhere in g makes the total non-finite. A finite g whose
  # spectrum or energy overflows float32 makes one of the sums infinite, and
  # would otherwise leave an infinite EMA behind.
  finite = jnp.isfinite(total_energy) & jnp.isfinite(kept_total)
  kept_energy = jnp.where(
      total_energy > 0, kept_total / jnp.where(total_energy > 0, total_energy, 1.0), 1.0
  ).astype(jnp.float32)

  alpha = blend.max_blend * kept_energy if isinstance(blend, AdaptiveBlend) else blend
  alpha = jnp.clip(jnp.asarray(alpha, jnp.float32), 0.0, 1.0)
  alpha_compute = alpha.astype(g_compute.dtype)
  blended = (1 - alpha_compute) * g_compute + alpha_compute * filtered

  # keep_fraction 1 keeps every coefficient, so the gradient comes back as
  # it is, without the FFT round trip's rounding.
  update = jnp.where(finite & (keep_fraction < 1.0), blended.astype(g.dtype), g)
  return update, _LeafState(
      ema=jnp.where(finite, new_ema.astype(ema.dtype), ema),
      kept_energy=jnp.where(finite, kept_energy, previous.kept_energy),
      blend=jnp.where(finite, alpha, previous.blend),
      threshold=jnp.where(finite, threshold, previous.threshold),
  )


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
    mask_every: Optional[int] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    param_specs: Optional[TreeOrFn] = None,
    shard_local: bool = False,
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
    views: a `SpectralView` for every leaf, a tree of them (``None`` for the
      default view) shaped like the parameters, or a function of the
      parameters returning either.
      By default a vector is transformed in 1-D and a tensor of rank 2 or
      more as the matrix ``(prod(shape[:-1]), shape[-1])``.
    mask: a tree of booleans shaped like the parameters, or a function of the
      parameters returning one (as in `optax.masked`); leaves marked False
      pass through.
    selection: ``"histogram"`` (default) finds the threshold by a radix
      select over the float32 bit patterns of the spectral EMA. Two or three
      histogram passes narrow it to a bucket of relative width 2**-13
      (2**-8 for leaves of 65,536 coefficients or more), and the threshold
      is interpolated inside it. A bucket with over 0.5% of the leaf is
      counted exactly. The kept fraction stays within 0.005 of
      ``keep_fraction`` on leaves of 1,000 coefficients or more.
      ``"exact"`` sorts every coefficient, several times the cost of the
      FFTs, and is meant for tests and reference runs.
    ema_dtype: dtype of the spectral EMA; ``None`` means float32. Pass
      ``"bfloat16"`` to halve its memory.
    mask_every: select a new threshold at every ``mask_every``-th update
      (counting from the first) and reuse the last one in between, applied
      to the current EMA. At least 1; ``None`` or 1 selects at every update.
    mesh: a ``jax.sharding.Mesh`` on which the parameters are sharded. With
      ``param_specs``, the state is placed and kept on it: the EMA keeps the
      leaf's sharding on its batch dimensions and on the row dimension where
      only the first row axis is sharded, and is replicated otherwise.
    param_specs: a tree of ``PartitionSpec`` shaped like the parameters, or a
      function of the parameters returning one; required with ``mesh``.
    shard_local: with ``mesh``, filter each device's shard of a leaf on its
      own inside ``jax.shard_map``, so no FFT crosses devices. The threshold,
      kept energy and finiteness check still cover the whole leaf: the
      threshold's histograms (at most 2**16 int32 per leaf) and a few
      scalars cross devices. The result differs from the global filter,
      because each shard's spectrum is that of its block, so frequencies are
      those of the block, not the leaf. Requires
      ``selection="histogram"`` and sharded dimensions that divide evenly.

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
  if not _is_tracer(beta) and np.float32(beta) >= 1.0:
    raise ValueError(
        f"beta must be below 1 in float32, the precision of the EMA; got"
        f" beta={beta!r}, which rounds to 1.0."
    )
  if not callable(blend) and not isinstance(blend, AdaptiveBlend):
    _check_range("blend", blend, 0.0, 1.0, closed_high=True)
  if selection not in ("histogram", "exact"):
    raise ValueError(
        f"selection must be 'histogram' or 'exact', got selection={selection!r}."
    )
  if not _is_tracer(min_size):
    _resolve_static_int("min_size", min_size, DEFAULT_MIN_SIZE)
  mask_every = _resolve_static_int("mask_every", mask_every, default=1)
  if mesh is not None and param_specs is None:
    raise ValueError("param_specs is required with mesh: pass the parameters' PartitionSpec tree.")
  if shard_local and mesh is None:
    raise ValueError("shard_local=True needs a mesh and param_specs.")
  if shard_local and selection != "histogram":
    raise ValueError(
        f"shard_local=True needs selection='histogram', got selection={selection!r}."
    )
  ema_dtype = jnp.dtype(jnp.float32 if ema_dtype is None else ema_dtype)
  if not jnp.issubdtype(ema_dtype, jnp.floating):
    raise ValueError(f"ema_dtype must be a floating dtype, got ema_dtype={ema_dtype}.")

  mesh_shape = dict(mesh.shape) if mesh is not None else {}

  def leaf_specs(params, treedef, leaves):
    if mesh is None:
      return [None] * len(leaves)
    return treedef.flatten_up_to(_resolve_tree(param_specs, params))

  def place(x, spec):
    if mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

  def init_fn(params):
    size_floor = _resolve_static_int("min_size", min_size, DEFAULT_MIN_SIZE)
    leaves, treedef = jax.tree.flatten(params)
    if mask is None:
      selected = [True] * len(leaves)
    else:
      selected = treedef.flatten_up_to(_resolve_tree(mask, params))
    view_leaves = _view_leaves(views, params, treedef, leaves)
    spec_leaves = leaf_specs(params, treedef, leaves)

    leaf_states = []
    for leaf, is_selected, view, spec in zip(leaves, selected, view_leaves, spec_leaves):
      if not _is_filtered(leaf, size_floor, bool(is_selected)):
        leaf_states.append(None)
        continue
      shape = tuple(leaf.shape)
      if shard_local:
        shard_layout = views_lib.make_layout(
            sharding_lib.local_shape(shape, spec, mesh_shape), view
        )
        ema_shape, ema_spec = sharding_lib.local_ema_layout(shard_layout, spec, mesh_shape)
      else:
        layout = views_lib.make_layout(shape, view)
        ema_shape = layout.spectrum_shape
        ema_spec = sharding_lib.global_ema_spec(layout, spec) if mesh is not None else None
      scalar = place(jnp.zeros([], jnp.float32), jax.sharding.PartitionSpec())
      leaf_states.append(
          _LeafState(
              ema=place(jnp.zeros(ema_shape, ema_dtype), ema_spec),
              kept_energy=scalar,
              blend=scalar,
              threshold=scalar,
          )
      )
    return _pack_state(jnp.zeros([], jnp.int32), treedef, leaf_states)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    leaves, treedef = jax.tree.flatten(updates)
    leaf_states = _unpack_state(state, treedef)
    like_params = params if params is not None else updates
    view_leaves = _view_leaves(views, like_params, treedef, leaves)
    spec_leaves = leaf_specs(like_params, treedef, leaves)

    options = dict(
        keep_fraction=jnp.clip(jnp.asarray(keep_fraction, jnp.float32), 0.0, 1.0),
        beta=jnp.clip(jnp.asarray(beta, jnp.float32), 0.0, 1.0),
        blend=blend if isinstance(blend, AdaptiveBlend) else jnp.asarray(
            blend(state.count) if callable(blend) else blend, jnp.float32
        ),
        recompute_threshold=None if mask_every == 1 else state.count % mask_every == 0,
    )
    new_updates, new_leaf_states = list(leaves), list(leaf_states)
    if shard_local:
      for i, (g, leaf_state, view, spec) in enumerate(
          zip(leaves, leaf_states, view_leaves, spec_leaves)
      ):
        if leaf_state is not None:
          new_updates[i], new_leaf_states[i] = _filter_shard_local(
              g, leaf_state, view, spec, mesh, mesh_shape, selection, options
          )
    else:
      for indices, view in _group_alike(leaves, leaf_states, view_leaves):
        group_updates, group_states = _filter_alike(
            [leaves[i] for i in indices], [leaf_states[i] for i in indices], view, selection, options
        )
        for i, update, leaf_state in zip(indices, group_updates, group_states):
          if mesh is not None:
            spec = spec_leaves[i]
            layout = views_lib.make_layout(update.shape, view_leaves[i])
            update = place(update, jax.sharding.PartitionSpec(*(spec or ())))
            leaf_state = leaf_state._replace(
                ema=place(leaf_state.ema, sharding_lib.global_ema_spec(layout, spec))
            )
          new_updates[i], new_leaf_states[i] = update, leaf_state

    new_state = _pack_state(optax.safe_increment(state.count), treedef, new_leaf_states)
    return treedef.unflatten(new_updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_LEAF_AXIS = "smi_leaves"

# Leaves up to this many elements are stacked with alike leaves. On XLA's CPU
# backend (JAX 0.10.2, 2-core AMD EPYC), a batched FFT of 6 x (384, 1536) ran
# in 27 ms against 20 ms for six separate FFTs. For small leaves stacking
# saves per-operation overhead (4 x (64, 256): 0.25 ms against 0.39 ms).
_STACK_MAX_SIZE = 1 << 17


def _group_alike(leaves: list, leaf_states: list, view_leaves: list) -> list:
  """Groups the filtered leaves that share shape, dtype, layout and EMA dtype.

  Leaves larger than `_STACK_MAX_SIZE` elements each form their own group.

  Returns:
    (indices, view) per group, in order of first appearance.
  """
  groups: dict[Any, tuple[list[int], views_lib.SpectralView]] = {}
  for i, (g, leaf_state, view) in enumerate(zip(leaves, leaf_states, view_leaves)):
    if leaf_state is None:
      continue
    key = (g.shape, g.dtype, views_lib.make_layout(g.shape, view), leaf_state.ema.dtype)
    if g.size > _STACK_MAX_SIZE:
      key = (i,)
    groups.setdefault(key, ([], view))[0].append(i)
  return list(groups.values())


def _filter_alike(grads: list, leaf_states: list, view, selection, options):
  """Filters leaves of one shape and layout, stacked into one array if several.

  The leaves of a Transformer's repeated blocks share their shapes. Stacking
  them runs each step of the filter as one batched operation instead of one
  per leaf, which cuts the per-operation overhead that dominates the update
  of small leaves on CPU (a 214k-parameter model's update ran about 1.4x
  faster). Each leaf keeps its own threshold, energy and finiteness check.
  """
  if len(grads) == 1:
    update, leaf_state = _filter_leaf(grads[0], leaf_states[0], view, selection=selection, **options)
    return [update], [leaf_state]

  def filter_one(g, leaf_state):
    return _filter_leaf(g, leaf_state, view, selection=selection, batch_axis=_LEAF_AXIS, **options)

  stacked_states = jax.tree.map(lambda *xs: jnp.stack(xs), *leaf_states)
  updates, new_states = jax.vmap(filter_one, axis_name=_LEAF_AXIS)(jnp.stack(grads), stacked_states)
  count = len(grads)
  return (
      [updates[i] for i in range(count)],
      [jax.tree.map(lambda x, i=i: x[i], new_states) for i in range(count)],
  )


def _filter_shard_local(g, leaf_state, view, spec, mesh, mesh_shape, selection, options):
  """Runs `_filter_leaf` on each device's shard of `g` inside ``jax.shard_map``."""
  axis_names = sharding_lib.leaf_mesh_axes(spec, g.ndim)
  if not axis_names:  # A replicated leaf: every device has all of it.
    return _filter_leaf(g, leaf_state, view, selection=selection, **options)

  shard_layout = views_lib.make_layout(sharding_lib.local_shape(g.shape, spec, mesh_shape), view)
  _, ema_spec = sharding_lib.local_ema_layout(shard_layout, spec, mesh_shape)
  replicated = jax.sharding.PartitionSpec()
  grad_spec = jax.sharding.PartitionSpec(*(spec or ()))
  state_specs = _LeafState(ema=ema_spec, kept_energy=replicated, blend=replicated, threshold=replicated)
  adaptive = options["blend"] if isinstance(options["blend"], AdaptiveBlend) else None
  recompute = options["recompute_threshold"]

  def body(g_shard, state_shard, keep_fraction, beta, blend_value, recompute_flag):
    return _filter_leaf(
        g_shard,
        state_shard,
        view,
        keep_fraction=keep_fraction,
        beta=beta,
        blend=adaptive if adaptive is not None else blend_value,
        selection=selection,
        recompute_threshold=None if recompute is None else recompute_flag,
        axis_names=axis_names,
    )

  mapped = jax.shard_map(
      body,
      mesh=mesh,
      in_specs=(grad_spec, state_specs, replicated, replicated, replicated, replicated),
      out_specs=(grad_spec, state_specs),
  )
  return mapped(
      g,
      leaf_state,
      options["keep_fraction"],
      options["beta"],
      jnp.zeros([], jnp.float32) if adaptive is not None else options["blend"],
      jnp.asarray(True) if recompute is None else recompute,
  )


def _pack_state(count: jax.Array, treedef: Any, leaf_states: list) -> SMIState:
  """Builds an `SMIState` from one `_LeafState` (or None) per leaf."""

  def field_tree(name):
    return treedef.unflatten([None if s is None else getattr(s, name) for s in leaf_states])

  return SMIState(
      count=count,
      spectral_ema=field_tree("ema"),
      kept_energy=field_tree("kept_energy"),
      blend=field_tree("blend"),
      threshold=field_tree("threshold"),
  )


def _unpack_state(state: SMIState, treedef: Any) -> list:
  """Splits an `SMIState` into one `_LeafState` (or None) per leaf."""
  columns = [
      treedef.flatten_up_to(tree)
      for tree in (state.spectral_ema, state.kept_energy, state.blend, state.threshold)
  ]
  return [None if row[0] is None else _LeafState(*row) for row in zip(*columns)]


def _view_leaves(views: Optional[TreeOrFn], params: Any, treedef: Any, leaves: list) -> list:
  """Returns one `SpectralView` per leaf, defaults filled in."""
  resolved = None if views is None else _resolve_tree(views, params)
  if resolved is None:
    given = [None] * len(leaves)
  elif isinstance(resolved, views_lib.SpectralView):
    given = [resolved] * len(leaves)
  else:
    given = treedef.flatten_up_to(resolved)
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
    mask_every: Optional[int] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    param_specs: Optional[TreeOrFn] = None,
    shard_local: bool = False,
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
    mask_every: see `smi`.
    mesh: see `smi`.
    param_specs: see `smi`.
    shard_local: see `smi`.

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
          mask_every=mask_every,
          mesh=mesh,
          param_specs=param_specs,
          shard_local=shard_local,
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
