"""Statistics of SMI's state for logging."""

from typing import Any

import jax
import jax.numpy as jnp

from smi_optax._src.smi import SMIState


def _path_name(path: tuple) -> str:
  parts = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def find_smi_states(opt_state: Any) -> list[SMIState]:
  """Returns every `SMIState` inside an optimizer state, in tree order."""
  nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SMIState))
  return [node for node in nodes if isinstance(node, SMIState)]


def stats(opt_state: Any) -> dict[str, jax.Array]:
  """Collects SMI's per-leaf statistics from an optimizer state, for logging.

  Works on the state of `smi` itself or of any chain or wrapper that
  contains it (for example `smi_adamw` or ``optax.inject_hyperparams``), and
  inside ``jax.jit``.

  Args:
    opt_state: an optimizer state containing one or more `SMIState`.

  Returns:
    A flat dict of float32 scalars: ``kept_energy/<leaf path>`` (share of the
    leaf's spectral energy the mask kept at its last finite step),
    ``blend/<leaf path>`` (the blend alpha of the last step), and their means
    over filtered leaves, ``kept_energy_mean`` and ``blend_mean``. With
    several `SMIState` in the tree, keys get a ``smi_<i>/`` prefix.

  Raises:
    ValueError: if `opt_state` contains no `SMIState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import smi_optax
    >>> params = {"w": jnp.ones((64, 32))}
    >>> tx = smi_optax.smi_adamw(1e-3)
    >>> state = tx.init(params)
    >>> _, state = tx.update(params, state, params)
    >>> sorted(smi_optax.stats(state))
    ['blend/w', 'blend_mean', 'kept_energy/w', 'kept_energy_mean']
  """
  found = find_smi_states(opt_state)
  if not found:
    raise ValueError(
        "stats found no SMIState in the optimizer state; pass the state of"
        " smi, smi_adamw or a chain that contains one."
    )
  result = {}
  for index, state in enumerate(found):
    prefix = "" if len(found) == 1 else f"smi_{index}/"
    for field in ("kept_energy", "blend"):
      named = jax.tree_util.tree_leaves_with_path(getattr(state, field))
      for path, value in named:
        result[f"{prefix}{field}/{_path_name(path)}"] = value
      values = [value for _, value in named]
      mean = jnp.mean(jnp.stack(values)) if values else jnp.full([], jnp.nan, jnp.float32)
      result[f"{prefix}{field}_mean"] = mean
  return result
