"""Cost of one SMI-AdamW update against AdamW and against its FFT floor.

Three jitted functions are timed in alternation in one process:

* ``adamw``: ``optax.adamw(...).update``.
* ``floor``: the AdamW update plus one ``rfft2``/``irfft2`` round trip of
  every leaf SMI filters, which is the work SMI cannot avoid.
* ``smi_adamw``: ``smi_optax.smi_adamw(...).update``.
* ``smi_adamw_reused_threshold``: the same with ``mask_every=8``, timed at
  an update that reuses the last threshold (7 in 8 do).

The script reports ``smi_adamw / floor`` (how close SMI is to its cost
floor) and ``smi_adamw / adamw``, each the median of per-round ratios, for
the example model's parameters and for a 6-layer, 384-wide GPT-shaped tree.
It also reports SMI's state bytes over parameter bytes.

Usage:
  python benchmarks/update_cost.py [--rounds 7] [--exact]
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # pylint: disable=wrong-import-position
import trees  # pylint: disable=wrong-import-position

import smi_optax  # pylint: disable=wrong-import-position
from smi_optax._src import views as views_lib  # pylint: disable=wrong-import-position


def fft_round_trip(grads, min_size: int):
  """Runs the forward and inverse real FFT SMI would run on each leaf."""

  def one_leaf(g):
    if g.ndim == 0 or g.size < min_size:
      return g
    layout = views_lib.make_layout(g.shape, views_lib.default_view(g.ndim))
    return views_lib.inverse(views_lib.forward(g, layout), layout)

  return jax.tree.map(one_leaf, grads)


def state_bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def measure_tree(name: str, params, rounds: int, repeats: int, exact: bool) -> dict:
  """Times the three updates on `params` and returns the figures."""
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  adamw = optax.adamw(1e-3)
  smi_adamw = smi_optax.smi_adamw(1e-3)
  adamw_state = adamw.init(params)
  smi_state = smi_adamw.init(params)

  @jax.jit
  def adamw_update(g, state, p):
    return adamw.update(g, state, p)

  @jax.jit
  def floor_update(g, state, p):
    updates, state = adamw.update(g, state, p)
    return updates, state, fft_round_trip(g, smi_optax.DEFAULT_MIN_SIZE)

  @jax.jit
  def smi_update(g, state, p):
    return smi_adamw.update(g, state, p)

  # With mask_every=8 the threshold is selected at one update in 8; starting
  # from count 1 times the updates that reuse it.
  every_tx = smi_optax.smi_adamw(1e-3, mask_every=8)
  _, every_state = jax.jit(every_tx.update)(grads, every_tx.init(params), params)
  every_update = jax.jit(every_tx.update)

  fns = {
      "adamw": lambda: adamw_update(grads, adamw_state, params),
      "floor": lambda: floor_update(grads, adamw_state, params),
      "smi_adamw": lambda: smi_update(grads, smi_state, params),
      "smi_adamw_reused_threshold": lambda: every_update(grads, every_state, params),
  }
  if exact:
    exact_tx = smi_optax.smi_adamw(1e-3, selection="exact")
    exact_state = exact_tx.init(params)
    exact_update = jax.jit(exact_tx.update)
    fns["smi_adamw_exact"] = lambda: exact_update(grads, exact_state, params)

  timings = common.time_alternating(fns, rounds=rounds, repeats=repeats)
  param_bytes = state_bytes(params)
  smi_only = smi_state[0]
  bf16_state = smi_optax.smi(ema_dtype="bfloat16").init(params)
  result = {
      "parameters": int(sum(x.size for x in jax.tree.leaves(params))),
      "timings": timings,
      "smi_over_floor": common.paired_ratio(timings, "smi_adamw", "floor"),
      "smi_over_adamw": common.paired_ratio(timings, "smi_adamw", "adamw"),
      "floor_over_adamw": common.paired_ratio(timings, "floor", "adamw"),
      "reused_threshold_over_floor": common.paired_ratio(
          timings, "smi_adamw_reused_threshold", "floor"
      ),
      "state_over_param_bytes_f32": state_bytes(smi_only.spectral_ema) / param_bytes,
      "state_over_param_bytes_bf16": state_bytes(bf16_state.spectral_ema) / param_bytes,
  }
  if exact:
    result["exact_over_sample"] = common.paired_ratio(timings, "smi_adamw_exact", "smi_adamw")
  print(
      f"{name}: {result['parameters'] / 1e6:.2f}M params | adamw"
      f" {timings['adamw']['median_ms']:.2f} ms | floor"
      f" {timings['floor']['median_ms']:.2f} ms | smi_adamw"
      f" {timings['smi_adamw']['median_ms']:.2f} ms | smi/floor"
      f" {result['smi_over_floor']:.3f} | reused threshold/floor"
      f" {result['reused_threshold_over_floor']:.3f} | smi/adamw {result['smi_over_adamw']:.2f}"
      f" | EMA bytes/param bytes {result['state_over_param_bytes_f32']:.3f} (f32),"
      f" {result['state_over_param_bytes_bf16']:.3f} (bf16)"
  )
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=7, help="alternating rounds")
  parser.add_argument("--repeats", type=int, default=5, help="calls per timing")
  parser.add_argument("--exact", action="store_true", help="also time selection='exact'")
  parser.add_argument("--out", type=pathlib.Path, default=common.RESULTS_DIR, help="output folder")
  args = parser.parse_args()

  print(f"JAX devices: {jax.devices()}")
  results = {}
  for name, params in (
      ("example_model", trees.example_model_params()),
      ("gpt_6x384", trees.gpt_params(n_layer=6, d_model=384, vocab=65, block=256)),
  ):
    results[name] = measure_tree(name, params, args.rounds, args.repeats, args.exact)

  path = common.write_json("update_cost", {"target_smi_over_floor": 1.25, "trees": results}, args.out)
  plot(results, args.out / "update_cost.png")
  print(f"wrote {path}")


def plot(results: dict, path: pathlib.Path) -> None:
  """Draws a bar chart of the median update times per tree."""
  plt = common.pyplot()

  names = list(results)
  kinds = ["adamw", "floor", "smi_adamw"]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  width = 0.8 / len(kinds)
  for i, kind in enumerate(kinds):
    values = [results[n]["timings"][kind]["median_ms"] for n in names]
    ax.bar(np.arange(len(names)) + i * width, values, width, label=kind)
  ax.set_xticks(np.arange(len(names)) + width, names)
  ax.set_ylabel("update time (ms, median)")
  ax.set_title(f"Update cost on {jax.default_backend()}")
  ax.legend()
  common.save_figure(fig, path)


if __name__ == "__main__":
  main()
