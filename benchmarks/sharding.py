"""Global against shard-local SMI on a mesh of 8 host CPU devices.

Shards a 6-layer, 384-wide GPT-shaped tree over a (data=4, model=2) mesh,
kernels as ``P("data", "model")``, and compares three jitted updates:
AdamW alone, SMI-AdamW filtering whole leaves (``shard_local=False``; XLA
gathers a leaf for its FFT) and SMI-AdamW filtering each device's block
(``shard_local=True``). For each it reports the median update time
(alternating rounds in one process) and the bytes that collectives produce
per device, read from the compiled HLO: the summed result sizes of
all-gather, all-reduce, all-to-all, reduce-scatter and collective-permute
operations.

Host CPU "devices" share the same cores and memory, so the times show the
cost of the extra work and copies, not of a real interconnect. The bytes
are what would cross one.

Usage:
  python benchmarks/sharding.py [--rounds 5]
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

# pylint: disable=wrong-import-position
import argparse
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common
import trees

import smi_optax

_COLLECTIVE = re.compile(
    r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|all-to-all|reduce-scatter|collective-permute)"
    r"(-start)?\("
)
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|c64|c128)\[([0-9,]*)\]")
_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Sums the result bytes of each kind of collective in compiled HLO text."""
  totals: dict[str, int] = {}
  for match in _COLLECTIVE.finditer(hlo_text):
    result_type, kind = match.group(1), match.group(2)
    size = 0
    for dtype, dims in _SHAPE.findall(result_type):
      count = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
      size += count * _BYTES[dtype]
    totals[kind] = totals.get(kind, 0) + size
  return totals


def spec_for(leaf) -> P:
  if leaf.ndim == 2 and leaf.shape[0] % 4 == 0 and leaf.shape[1] % 2 == 0:
    return P("data", "model")
  if leaf.ndim == 1 and leaf.shape[0] % 4 == 0:
    return P("data")
  return P()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
  parser.add_argument("--repeats", type=int, default=3, help="calls per timing")
  parser.add_argument("--out", type=pathlib.Path, default=common.RESULTS_DIR, help="output folder")
  args = parser.parse_args()
  print(f"JAX devices: {jax.devices()}")

  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  params = trees.gpt_params(n_layer=6, d_model=384, vocab=64, block=256)
  specs = jax.tree.map(spec_for, params)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  rng = np.random.default_rng(0)
  params = jax.device_put(params, shardings)
  grads = jax.device_put(
      jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params), shardings
  )

  optimizers = {
      "adamw": optax.adamw(1e-3),
      "smi_global": smi_optax.smi_adamw(1e-3, mesh=mesh, param_specs=specs),
      "smi_shard_local": smi_optax.smi_adamw(
          1e-3, mesh=mesh, param_specs=specs, shard_local=True
      ),
  }
  fns, hlo_bytes = {}, {}
  for name, tx in optimizers.items():
    state = jax.jit(tx.init)(params)
    update = jax.jit(tx.update)
    hlo_bytes[name] = collective_bytes(update.lower(grads, state, params).compile().as_text())
    fns[name] = lambda update=update, state=state: update(grads, state, params)

  timings = common.time_alternating(fns, rounds=args.rounds, repeats=args.repeats)
  result = {
      "mesh": {"data": 4, "model": 2},
      "parameters": int(sum(x.size for x in jax.tree.leaves(params))),
      "optimizers": {},
  }
  for name in optimizers:
    total = sum(hlo_bytes[name].values())
    result["optimizers"][name] = {
        "median_ms": timings[name]["median_ms"],
        "collective_bytes": hlo_bytes[name],
        "collective_bytes_total": total,
    }
    print(
        f"{name:16s} {timings[name]['median_ms']:9.2f} ms/update, collectives"
        f" {total / 2**20:9.2f} MiB {hlo_bytes[name]}"
    )
  result["shard_local_over_global_time"] = common.paired_ratio(
      timings, "smi_shard_local", "smi_global"
  )
  result["timings"] = timings
  path = common.write_json("sharding", result, args.out)
  print(
      f"shard-local / global time: {result['shard_local_over_global_time']:.3f}; wrote {path}"
  )


if __name__ == "__main__":
  main()
