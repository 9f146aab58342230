"""Shared helpers for the benchmarks: timing, machine description, output."""

import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def cpu_model() -> str:
  """Returns the CPU model name from /proc/cpuinfo, or platform.processor() where it is missing."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
      for line in cpuinfo:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
  """Describes the machine and software a benchmark ran on."""
  device = jax.devices()[0]
  return {
      "platform": platform.platform(),
      "processor": cpu_model(),
      "cpu_count": os.cpu_count(),
      "python": sys.version.split()[0],
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "device": getattr(device, "device_kind", str(device)),
      "device_count": jax.device_count(),
  }


def time_call(fn: Callable[[], Any], repeats: int) -> float:
  """Returns the median seconds of `repeats` calls of `fn` (already compiled)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def time_alternating(
    fns: dict[str, Callable[[], Any]], rounds: int, repeats: int
) -> dict[str, dict[str, float]]:
  """Times several compiled functions in alternation, to share machine noise.

  Each round times every function once (the median of `repeats` calls), in
  turn, so that a slow patch of the shared machine hits all of them alike.

  Returns:
    Per name: the median over rounds in milliseconds, and the per-round
    figures.
  """
  for fn in fns.values():  # Compile and warm up.
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
  per_round = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      per_round[name].append(time_call(fn, repeats) * 1e3)
  return {
      name: {"median_ms": statistics.median(values), "rounds_ms": values}
      for name, values in per_round.items()
  }


def paired_ratio(
    timings: dict[str, dict[str, float]], numerator: str, denominator: str
) -> float:
  """Returns the median over rounds of numerator / denominator, round by round."""
  ratios = [
      a / b
      for a, b in zip(timings[numerator]["rounds_ms"], timings[denominator]["rounds_ms"])
  ]
  return float(np.median(ratios))


def write_json(name: str, payload: dict[str, Any], out_dir: pathlib.Path) -> pathlib.Path:
  """Writes `payload` with the command line and machine to OUT_DIR/NAME.json."""
  out_dir.mkdir(parents=True, exist_ok=True)
  payload = {
      "command": " ".join(["python"] + sys.argv),
      "machine": machine(),
      **payload,
  }
  path = out_dir / f"{name}.json"
  path.write_text(json.dumps(payload, indent=2) + "\n")
  return path


def pyplot():
  """Returns matplotlib.pyplot on the non-interactive Agg backend."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  return plt


def save_figure(fig, path: pathlib.Path) -> None:
  """Writes `fig` to `path` as a PNG and closes it."""
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  pyplot().close(fig)
