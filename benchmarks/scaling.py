"""Growth of the SMI update time with leaf size, from 1e3 to 1e7 elements.

For each size the script times, in alternation, the jitted ``smi`` update of
one square-ish float32 leaf and the bare ``rfft2``/``irfft2`` round trip of
the same leaf. It fits ``time = c * n^k`` by least squares in log-log space
for sizes of 1e5 and up (below that, fixed per-call overhead dominates on a
CPU) and compares the SMI curve with ``n log n``.

Usage:
  python benchmarks/scaling.py [--max-exponent 7] [--rounds 5]
"""

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # pylint: disable=wrong-import-position

import smi_optax  # pylint: disable=wrong-import-position
from smi_optax._src import views as views_lib  # pylint: disable=wrong-import-position


def square_shape(n: int) -> tuple[int, int]:
  rows = int(round(np.sqrt(n)))
  return rows, int(round(n / rows))


def fit_exponent(sizes: np.ndarray, times: np.ndarray) -> float:
  slope, _ = np.polyfit(np.log(sizes), np.log(times), 1)
  return float(slope)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--min-exponent", type=int, default=3, help="smallest size is 10^this")
  parser.add_argument("--max-exponent", type=int, default=7, help="largest size is 10^this")
  parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per size")
  parser.add_argument("--out", type=pathlib.Path, default=common.RESULTS_DIR, help="output folder")
  args = parser.parse_args()
  print(f"JAX devices: {jax.devices()}")

  exponents = np.arange(args.min_exponent, args.max_exponent + 0.01, 0.5)
  rows = []
  rng = np.random.default_rng(0)
  for exponent in exponents:
    shape = square_shape(int(round(10**exponent)))
    n = shape[0] * shape[1]
    grad = jnp.asarray(rng.normal(size=shape), jnp.float32)
    tx = smi_optax.smi(min_size=1)
    state = tx.init(grad)
    smi_update = jax.jit(tx.update)
    layout = views_lib.make_layout(shape, views_lib.default_view(2))
    round_trip = jax.jit(lambda g: views_lib.inverse(views_lib.forward(g, layout), layout))
    # Fewer calls per timing for the big leaves keeps the run short.
    if n <= 1e5:
      repeats = 20
    elif n <= 1e6:
      repeats = 5
    else:
      repeats = 2
    timings = common.time_alternating(
        {
            "smi": lambda: smi_update(grad, state),
            "fft_round_trip": lambda: round_trip(grad),
        },
        rounds=args.rounds,
        repeats=repeats,
    )
    row = {
        "elements": n,
        "shape": list(shape),
        "smi_ms": timings["smi"]["median_ms"],
        "fft_round_trip_ms": timings["fft_round_trip"]["median_ms"],
        "smi_over_fft": common.paired_ratio(timings, "smi", "fft_round_trip"),
    }
    rows.append(row)
    print(
        f"n={n:>9d} {str(shape):>14s}: smi {row['smi_ms']:9.3f} ms, FFT round trip"
        f" {row['fft_round_trip_ms']:9.3f} ms, ratio {row['smi_over_fft']:.2f}"
    )

  sizes = np.array([r["elements"] for r in rows], float)
  smi_ms = np.array([r["smi_ms"] for r in rows])
  fft_ms = np.array([r["fft_round_trip_ms"] for r in rows])
  # Fit from 1e5 up, or over every size when fewer than two reach 1e5.
  fit_min_elements = 1e5 if np.sum(sizes >= 1e5) >= 2 else float(sizes.min())
  large = sizes >= fit_min_elements
  result = {
      "rows": rows,
      "fit_min_elements": fit_min_elements,
      "smi_exponent": fit_exponent(sizes[large], smi_ms[large]),
      "fft_round_trip_exponent": fit_exponent(sizes[large], fft_ms[large]),
      # n log n between 1e5 and 1e7 looks like n^k with this k.
      "n_log_n_exponent": fit_exponent(sizes[large], sizes[large] * np.log(sizes[large])),
  }
  print(
      f"fitted exponent (n >= {fit_min_elements:.0e}): smi {result['smi_exponent']:.3f}, FFT round trip"
      f" {result['fft_round_trip_exponent']:.3f}, n log n {result['n_log_n_exponent']:.3f}"
  )
  path = common.write_json("scaling", result, args.out)
  plot(sizes, smi_ms, fft_ms, result, args.out / "scaling.png")
  print(f"wrote {path}")


def plot(sizes, smi_ms, fft_ms, result, path: pathlib.Path) -> None:
  plt = common.pyplot()

  fig, ax = plt.subplots(figsize=(6, 4))
  ax.loglog(sizes, smi_ms, "o-", label=f"smi update (k={result['smi_exponent']:.2f})")
  ax.loglog(sizes, fft_ms, "s-", label=f"rfft2+irfft2 (k={result['fft_round_trip_exponent']:.2f})")
  anchor = smi_ms[-1] / (sizes[-1] * np.log(sizes[-1]))
  ax.loglog(sizes, anchor * sizes * np.log(sizes), "k--", label="n log n (anchored at 1e7)")
  ax.set_xlabel("leaf elements")
  ax.set_ylabel("time per update (ms, median)")
  ax.set_title(f"SMI update scaling on {jax.default_backend()}")
  ax.legend()
  common.save_figure(fig, path)


if __name__ == "__main__":
  main()
