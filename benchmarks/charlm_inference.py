"""Does training with SMI change the trained model in a way inference can use?

The abstract of the SMI paper (Huang, Chen and Zheng, Frontiers in
Artificial Intelligence 8, 2025) reports faster inference. The inference
cost of a model is set by its architecture. Its weights' values matter only
if inference can exploit them, for example by storing or applying a weight
matrix through a truncated spectrum. This module measures, on the final weights of the study's
tuned AdamW and SMI-AdamW runs (charlm_study.py calls `analyze`):

- generation speed: tokens/s of the example's `generate` with each model's
  weights, timed in alternation in one process;
- spectral concentration: the share of each weight matrix's energy in the
  top k% of its 2-D Fourier coefficients (the transform SMI filters the
  gradient with: the default view, rows = all axes but the last), summed over
  the matrices SMI filters, for the initial weights and both trained models;
- spectral truncation: the val loss after keeping only the top k% of
  coefficients of every such matrix, against the untruncated model.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

FRACTIONS = (0.1, 0.25, 0.5)  # shares of coefficients for the concentration
TRUNCATIONS = (0.5, 0.25)  # shares of coefficients kept by the truncation test
GENERATED_TOKENS = 256
TIMING_ROUNDS = 15


def filtered_matrices(params) -> dict[str, np.ndarray]:
  """Returns {path: 2-D matrix} of the leaves SMI filters by default, in its default view."""
  import jax  # pylint: disable=import-outside-toplevel

  import smi_optax  # pylint: disable=import-outside-toplevel

  matrices = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    leaf = np.asarray(leaf, np.float64)
    if leaf.ndim >= 2 and leaf.size >= smi_optax.DEFAULT_MIN_SIZE:
      matrices[jax.tree_util.keystr(path)] = leaf.reshape(-1, leaf.shape[-1])
  return matrices


def concentration(params, fractions=FRACTIONS) -> dict[float, float]:
  """Returns {k: share of spectral energy in the top k of coefficients}, pooled over matrices.

  Each matrix keeps its own top k share of coefficients, by magnitude of its
  full 2-D FFT. The kept and the total energies are summed over the matrices
  before dividing.
  """
  kept = {k: 0.0 for k in fractions}
  total = 0.0
  for matrix in filtered_matrices(params).values():
    energy = np.sort(np.abs(np.fft.fft2(matrix)).ravel() ** 2)[::-1]
    total += energy.sum()
    for k in fractions:
      kept[k] += energy[: max(1, round(k * energy.size))].sum()
  return {k: float(kept[k] / total) for k in fractions}


def truncate_matrix(matrix: np.ndarray, keep: float) -> np.ndarray:
  """Returns `matrix` rebuilt from the top `keep` share of its 2-D Fourier coefficients.

  Coefficients at or above the magnitude quantile are kept, so the
  conjugate-symmetric pairs of a real matrix are kept or dropped together.
  """
  spectrum = np.fft.fft2(matrix)
  magnitude = np.abs(spectrum)
  threshold = np.quantile(magnitude, 1.0 - keep)
  return np.real(np.fft.ifft2(np.where(magnitude >= threshold, spectrum, 0)))


def truncate(params, keep: float):
  """Returns `params` with every filtered matrix truncated to its top `keep` coefficients."""
  import jax  # pylint: disable=import-outside-toplevel

  import smi_optax  # pylint: disable=import-outside-toplevel

  def one(leaf):
    array = np.asarray(leaf)
    if array.ndim < 2 or array.size < smi_optax.DEFAULT_MIN_SIZE:
      return leaf
    matrix = truncate_matrix(array.reshape(-1, array.shape[-1]).astype(np.float64), keep)
    return matrix.reshape(array.shape).astype(array.dtype)

  return jax.tree.map(one, params)


def val_loss(study, params, seed: int) -> float:
  """Returns the val loss over `final_iters` batches fixed by the seed, the same for every model."""
  return study.mean_val_loss(params, [seed, 3], study.settings.final_iters)


def generation_rates(study, models: dict[str, object], seed: int) -> dict[str, list[float]]:
  """Times `generate` for each model's weights in alternation; returns tokens/s per round."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  import model as model_lib  # pylint: disable=import-outside-toplevel

  graphdef = study.model(seed)[0]
  prompt = jnp.asarray(study.corpus.vocabulary.encode("\n"))
  key = jax.random.key(seed)

  def generate(params):
    return model_lib.generate(
        nnx.merge(graphdef, params), prompt, key, 0.8, num_tokens=GENERATED_TOKENS
    )

  for params in models.values():  # compile and warm up
    jax.block_until_ready(generate(params))
  rates = {name: [] for name in models}
  for _ in range(TIMING_ROUNDS):
    for name, params in models.items():
      start = time.perf_counter()
      jax.block_until_ready(generate(params))
      rates[name].append(GENERATED_TOKENS / (time.perf_counter() - start))
  return rates


def _mean_std(values) -> list[float]:
  values = [float(v) for v in values]
  return [float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0]


def analyze(study, tuned: dict[str, list[dict]]) -> dict:
  """Runs the three measurements on the tuned runs' final weights, per seed."""
  per_seed = []
  for adamw_run, smi_run in zip(tuned["adamw"], tuned["smi"]):
    seed = adamw_run["seed"]
    models = {
        "init": study.model(seed)[1],
        "adamw": study.load_params(adamw_run["key"], seed),
        "smi": study.load_params(smi_run["key"], seed),
    }
    entry = {"seed": seed, "concentration": {}, "truncation": {}}
    for name, params in models.items():
      entry["concentration"][name] = {str(k): v for k, v in concentration(params).items()}
    for name in ("adamw", "smi"):
      full = val_loss(study, models[name], seed)
      entry["truncation"][name] = {"1.0": full}
      for keep in TRUNCATIONS:
        entry["truncation"][name][str(keep)] = val_loss(study, truncate(models[name], keep), seed)
    if not per_seed:
      rates = generation_rates(study, {"adamw": models["adamw"], "smi": models["smi"]}, seed)
      entry["generation_tokens_per_s"] = {
          name: statistics.median(values) for name, values in rates.items()
      }
      entry["generation_smi_over_adamw"] = statistics.median(
          s / a for s, a in zip(rates["smi"], rates["adamw"])
      )
    per_seed.append(entry)
    print(f"inference: seed {seed} done", flush=True)

  summary = {"per_seed": per_seed, "concentration": {}, "truncation_increase": {}}
  for name in ("init", "adamw", "smi"):
    summary["concentration"][name] = {
        str(k): _mean_std(e["concentration"][name][str(k)] for e in per_seed) for k in FRACTIONS
    }
  for name in ("adamw", "smi"):
    summary["truncation_increase"][name] = {
        str(keep): _mean_std(
            e["truncation"][name][str(keep)] - e["truncation"][name]["1.0"] for e in per_seed
        )
        for keep in TRUNCATIONS
    }
  summary["truncation_increase"]["smi_minus_adamw"] = {
      str(keep): _mean_std(
          (e["truncation"]["smi"][str(keep)] - e["truncation"]["smi"]["1.0"])
          - (e["truncation"]["adamw"][str(keep)] - e["truncation"]["adamw"]["1.0"])
          for e in per_seed
      )
      for keep in TRUNCATIONS
  }
  summary["generation_tokens_per_s"] = per_seed[0]["generation_tokens_per_s"]
  summary["generation_smi_over_adamw"] = per_seed[0]["generation_smi_over_adamw"]
  return summary


def markdown(summary: dict) -> str:
  """Returns the inference results as Markdown tables."""

  def pm(pair, digits=4):
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

  n = len(summary["per_seed"])
  lines = [
      f"Share of spectral energy in the top k of 2-D Fourier coefficients of the matrices SMI "
      f"filters (mean ± std over {n} seeds):",
      "",
      "| weights | " + " | ".join(f"top {float(k):.0%}" for k in FRACTIONS) + " |",
      "|---|" + "---|" * len(FRACTIONS),
  ]
  for name, label in (("init", "initial"), ("adamw", "AdamW-trained"), ("smi", "SMI-trained")):
    row = summary["concentration"][name]
    lines.append(f"| {label} | " + " | ".join(pm(row[str(k)], 3) for k in FRACTIONS) + " |")
  lines += [
      "",
      "Increase in val loss (nats/char) when every such matrix keeps only its top k of "
      "coefficients:",
      "",
      "| weights | " + " | ".join(f"keep {keep:.0%}" for keep in TRUNCATIONS) + " |",
      "|---|" + "---|" * len(TRUNCATIONS),
  ]
  for name, label in (
      ("adamw", "AdamW-trained"),
      ("smi", "SMI-trained"),
      ("smi_minus_adamw", "SMI − AdamW (paired)"),
  ):
    row = summary["truncation_increase"][name]
    lines.append(f"| {label} | " + " | ".join(pm(row[str(keep)]) for keep in TRUNCATIONS) + " |")
  rates = summary["generation_tokens_per_s"]
  lines += [
      "",
      f"Generation ({GENERATED_TOKENS} tokens, seed {summary['per_seed'][0]['seed']}, median of "
      f"{TIMING_ROUNDS} alternating rounds): AdamW-trained {rates['adamw']:.0f} tokens/s, "
      f"SMI-trained {rates['smi']:.0f} tokens/s, ratio SMI / AdamW "
      f"{summary['generation_smi_over_adamw']:.3f}.",
  ]
  return "\n".join(lines)
