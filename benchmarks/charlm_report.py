"""Summaries, tables and plots of the character-level study's runs (charlm_study.py)."""

from __future__ import annotations

import math
import pathlib
from typing import Callable

import numpy as np

# Returns the display name of a variant from its record's "variant" dict.
Describe = Callable[[dict], str]


def mean_std(values: list[float]) -> tuple[float, float]:
  """Returns the mean and the sample standard deviation (0 for one value)."""
  values = [float(v) for v in values]
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


# Two-sided 95% quantiles of Student's t distribution for 1 to 10 degrees of freedom.
T_QUANTILE_95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def confidence_interval_95(values: list[float]) -> tuple[float, float] | None:
  """Returns the t-based 95% confidence interval of the mean, or None for fewer than 2 values.

  Past 10 degrees of freedom it uses the normal quantile 1.96 instead of t's.
  """
  if len(values) < 2:
    return None
  mean, std = mean_std(values)
  degrees = len(values) - 1
  quantile = T_QUANTILE_95[degrees - 1] if degrees <= len(T_QUANTILE_95) else 1.96
  half_width = quantile * std / math.sqrt(len(values))
  return mean - half_width, mean + half_width


def time_to_target(curve: list, target: float) -> tuple[float, float] | None:
  """Returns (step, seconds) where the val curve first reaches `target`, interpolated linearly.

  None when the curve stays above the target.
  """
  for (s0, v0, t0), (s1, v1, t1) in zip(curve, curve[1:]):
    if v1 <= target:
      share = 1.0 if v0 == v1 else min(max((v0 - target) / (v0 - v1), 0.0), 1.0)
      return s0 + share * (s1 - s0), t0 + share * (t1 - t0)
  return None


def summarize_group(records: list[dict], baseline: dict[int, dict], target: float) -> dict:
  """Aggregates the seed runs of one variant; `baseline` maps seed -> tuned AdamW run."""
  finals = [r["final_val_loss"] for r in records]
  reached = [time_to_target(r["curve"], target) for r in records]
  hits = [hit for hit in reached if hit is not None]
  paired = [
      r["final_val_loss"] - baseline[r["seed"]]["final_val_loss"]
      for r in records
      if r["seed"] in baseline
  ]
  summary = {
      "variant": records[0]["variant"],
      "lr": records[0]["lr"],
      "seeds": [r["seed"] for r in records],
      "final_val_loss": mean_std(finals),
      "final_val_bpc": mean_std([v / math.log(2) for v in finals]),
      "best_val_loss": mean_std([r["best_val_loss"] for r in records]),
      "final_minus_adamw": mean_std(paired) if paired else None,
      "final_minus_adamw_ci95": confidence_interval_95(paired) if paired else None,
      "ms_per_step": mean_std([r["ms_per_step"] for r in records]),
      "reached_target": len(hits),
      "steps_to_target": mean_std([h[0] for h in hits]) if hits else None,
      "seconds_to_target": mean_std([h[1] for h in hits]) if hits else None,
  }
  if all("kept_energy_mean" in r for r in records):
    summary["kept_energy_mean"] = mean_std([r["kept_energy_mean"] for r in records])
    summary["blend_mean"] = mean_std([r["blend_mean"] for r in records])
  return summary


def format_mean_std(pair, digits: int = 4) -> str:
  if pair is None:
    return "n/a"
  return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def _paired(group: dict) -> str:
  text = format_mean_std(group["final_minus_adamw"])
  interval = group["final_minus_adamw_ci95"]
  if interval is not None and group["final_minus_adamw"][1] > 0:
    text += f" [{interval[0]:+.4f}, {interval[1]:+.4f}]"
  return text


def markdown_table(groups: list[dict], target: float, num_seeds: int, describe: Describe) -> str:
  """Returns the study's Markdown table, one row per variant."""
  lines = [
      f"| variant | peak lr | final val loss | final val bpc | best val loss | "
      f"final − AdamW (paired) | steps to {target:.3f} | seconds to {target:.3f} | ms/step |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for group in groups:
    reached = f"{group['reached_target']}/{len(group['seeds'])}"
    steps = "not reached" if group["steps_to_target"] is None else format_mean_std(group["steps_to_target"], 0)
    seconds = "" if group["seconds_to_target"] is None else format_mean_std(group["seconds_to_target"], 1)
    lines.append(
        f"| {describe(group['variant'])} | {group['lr']:g} | {format_mean_std(group['final_val_loss'])} | "
        f"{format_mean_std(group['final_val_bpc'], 3)} | {format_mean_std(group['best_val_loss'])} | "
        f"{_paired(group)} | {steps} ({reached}) | {seconds} | "
        f"{format_mean_std(group['ms_per_step'], 1)} |"
    )
  lines.append("")
  lines.append(
      f"Mean ± sample standard deviation over {num_seeds} seeds. \"final − AdamW\" is each "
      "seed's final val loss minus tuned AdamW's at the same seed (same initial weights and "
      "batches), with the t-based 95% confidence interval of its mean in brackets; below 0 "
      "favours the row. Steps and seconds to the target are interpolated "
      "between evaluations and averaged over the seeds that reached it (count in brackets); "
      "seconds count training steps only, compile excluded."
  )
  return "\n".join(lines)


def plot_curves(
    groups: dict[str, list[dict]], path: pathlib.Path, title: str, describe: Describe
) -> None:
  """Plots the mean val-loss curve of each variant with a band of ± one standard deviation."""
  import common  # pylint: disable=import-outside-toplevel

  plt = common.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for records in groups.values():
    # A diverged run stops early, so the curves are cut to the shortest one.
    length = min(len(r["curve"]) for r in records)
    curves = np.array([r["curve"][:length] for r in records], dtype=np.float64)
    steps, vals = curves[0, :, 0], curves[:, :, 1]
    secs = curves[:, :, 2].mean(axis=0)
    mean = vals.mean(axis=0)
    std = vals.std(axis=0, ddof=1) if len(records) > 1 else np.zeros_like(mean)
    label = f"{describe(records[0]['variant'])}, lr {records[0]['lr']:g}"
    for axis, x in zip(axes, (steps, secs)):
      (line,) = axis.plot(x[1:], mean[1:], label=label)
      axis.fill_between(x[1:], (mean - std)[1:], (mean + std)[1:], color=line.get_color(), alpha=0.2)
  axes[0].set_xlabel("step")
  axes[1].set_xlabel("training seconds (compile excluded)")
  for axis in axes:
    axis.set_ylabel("val loss (nats/char)")
    axis.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle(title, fontsize=10)
  common.save_figure(fig, path)


def plot_sweep(sweeps: dict[str, list[dict]], path: pathlib.Path) -> None:
  import common  # pylint: disable=import-outside-toplevel

  plt = common.pyplot()
  fig, axis = plt.subplots(figsize=(5.5, 4))
  for name, records in sweeps.items():
    rates = [r["lr"] for r in records]
    axis.plot(rates, [r["final_val_loss"] for r in records], marker="o", label=name)
  axis.set_xscale("log")
  axis.set_xlabel("peak learning rate")
  axis.set_ylabel("final val loss, seed 0 (nats/char)")
  axis.grid(alpha=0.3)
  axis.legend()
  common.save_figure(fig, path)


def sweep_table(sweeps: dict[str, list[dict]], best_rate: dict[str, float]) -> str:
  """Returns the learning-rate sweep as a Markdown table, marking each name's chosen rate."""
  lines = ["| optimizer | peak lr | final val loss (seed 0) |", "|---|---|---|"]
  for name, records in sweeps.items():
    for record in records:
      mark = " (best)" if record["lr"] == best_rate[name] else ""
      lines.append(f"| {name} | {record['lr']:g}{mark} | {record['final_val_loss']:.4f} |")
  return "\n".join(lines)

