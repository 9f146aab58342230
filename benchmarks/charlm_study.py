"""Multi-seed study of SMI-AdamW against tuned AdamW on the character-level example.

Run from the repository root after `pip install -e '.[example]'`::

  python benchmarks/charlm_study.py --quick    # under 15 minutes on 2 CPU cores
  python benchmarks/charlm_study.py            # the full study, about 1 hour

The model, corpus, schedule shape, clipping, Adam betas and weight decay are
the example's defaults (examples/char_lm). The study has four stages:

1. A learning-rate sweep on seed 0 for AdamW and for SMI-AdamW. In the full
   study, when the best rate is at an end of the grid, the grid grows by one
   rate at that end (at most twice), so neither optimizer is tuned on a grid
   that cuts off its optimum. The quick mode keeps its 3 rates. The schedule
   decays to a tenth of the peak rate.
2. More seeds of both at their own best rate.
3. Ablations of SMI at its best rate, over the same seeds: no spectral
   momentum (beta=0), a blend schedule, the adaptive blend and other
   keep_fraction values; and a time-domain filter in front of AdamW (an EMA
   of the gradient added back, as Grokfast does) as a second baseline, at
   the better of the two tuned rates on the first seed.
4. The inference measurements of `charlm_inference.py` on the final weights
   of the tuned runs.

Seed s fixes the initial weights, the batch order and the evaluation batches.
So every optimizer at seed s starts from the same weights and trains on the
same batches, and differences against AdamW are reported per seed (paired).

Each finished run is written to OUT/runs/<key>.json, and its final weights to
PARAMS_DIR/<key>.npz. Running the command again skips the runs on file, so an
interrupted study continues where it stopped. The summary (study.json), the
Markdown table (study.md) and the plots are rewritten from the run files at
the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import statistics
import sys
import time
from typing import Any

import numpy as np

BENCHMARKS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
sys.path.insert(0, str(REPO_ROOT / "examples" / "char_lm"))
sys.path.insert(0, str(BENCHMARKS_DIR))

import charlm_report as report  # noqa: E402  pylint: disable=wrong-import-position
import config as config_lib  # noqa: E402  pylint: disable=wrong-import-position
import data as data_lib  # noqa: E402  pylint: disable=wrong-import-position

# Steps left out of the ms/step median and replaced by it in the elapsed time:
# the first call compiles the step.
TIMING_WARMUP_STEPS = 5


@dataclasses.dataclass(frozen=True)
class Settings:
  """Settings of a study mode: the runs it trains and how often it evaluates them."""

  steps: int
  rates: tuple[float, ...]  # initial learning-rate grid, ascending
  rate_factor: float  # ratio between neighbouring rates when the grid grows
  max_extensions: int  # grid growths per optimizer
  seeds: tuple[int, ...]  # seeds of the tuned runs and the ablations
  eval_interval: int
  curve_iters: int  # val batches per point of the loss curve
  final_iters: int  # train and val batches of the final evaluation
  keep_fractions: tuple[float, ...]  # keep_fraction ablation (besides the default)
  target_margin: float  # target val loss = tuned AdamW's mean final val loss + this
  # Changes to the example's default Config (field name, value); the study
  # modes keep the defaults, the tests shrink the model.
  config_overrides: tuple[tuple[str, Any], ...] = ()


FULL = Settings(
    steps=800,
    rates=(1e-3, 3e-3, 1e-2),
    rate_factor=3.0,
    max_extensions=2,
    seeds=(0, 1, 2),
    eval_interval=50,
    curve_iters=10,
    final_iters=40,
    keep_fractions=(0.25, 0.75),
    target_margin=0.05,
)
QUICK = Settings(
    steps=200,
    rates=(1e-3, 3e-3, 1e-2),
    rate_factor=3.0,
    max_extensions=0,
    seeds=(0, 1),
    eval_interval=25,
    curve_iters=4,
    final_iters=10,
    keep_fractions=(0.25,),
    target_margin=0.05,
)

# Defaults of gradfilter_ema in github.com/ironjr/grokfast: EMA decay 0.98, amplification 2.
GROKFAST_ALPHA = 0.98
GROKFAST_LAMB = 2.0


@dataclasses.dataclass(frozen=True)
class Variant:
  """One optimizer setting of the study.

  kind is 'adamw', 'smi' (SMI-AdamW) or 'grokfast' (the gradient EMA filter
  in front of AdamW). blend is a number, 'linear' (1 to 0 over the run, the
  same mean as 0.5) or 'adaptive' (`smi_optax.adaptive_blend(0.5)`).
  """

  name: str
  kind: str
  keep_fraction: float = 0.5
  beta: float = 0.9
  blend: float | str = 0.5

  def describe(self) -> str:
    if self.kind == "adamw":
      return "AdamW"
    if self.kind == "grokfast":
      return f"Grokfast-EMA (alpha {GROKFAST_ALPHA}, lamb {GROKFAST_LAMB}) + AdamW"
    return f"SMI-AdamW (keep {self.keep_fraction}, beta {self.beta}, blend {self.blend})"


def describe_variant(fields: dict) -> str:
  """Returns the display name of the variant stored as `fields` in a run record."""
  return Variant(**fields).describe()


ADAMW = Variant("adamw", "adamw")
SMI = Variant("smi", "smi")


def ablations(settings: Settings) -> list[Variant]:
  """Returns the SMI ablations and the Grokfast baseline of a study mode."""
  variants = [
      Variant("smi_beta0", "smi", beta=0.0),
      Variant("smi_blend_linear", "smi", blend="linear"),
      Variant("smi_blend_adaptive", "smi", blend="adaptive"),
  ]
  variants += [Variant(f"smi_keep{kf:g}", "smi", keep_fraction=kf) for kf in settings.keep_fractions]
  variants.append(Variant("grokfast", "grokfast"))
  return variants


def grokfast_ema(alpha: float = GROKFAST_ALPHA, lamb: float = GROKFAST_LAMB):
  """Returns the Grokfast-EMA filter as an optax transform: g + lamb * EMA_alpha(g).

  As in the reference implementation (github.com/ironjr/grokfast, grokfast.py),
  the EMA starts at the first gradient, and each update first folds the new
  gradient in, ``ema = alpha * ema + (1 - alpha) * g``, then returns
  ``g + lamb * ema``.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  def init_fn(params):
    return (jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    count, ema = state
    ema = jax.tree.map(lambda e, g: jnp.where(count == 0, g, e), ema, updates)
    ema = jax.tree.map(lambda e, g: alpha * e + (1 - alpha) * g, ema, updates)
    updates = jax.tree.map(lambda g, e: g + lamb * e, updates, ema)
    return updates, (count + 1, ema)

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(variant: Variant, lr: float, steps: int, base: config_lib.Config):
  """Builds `variant` at peak rate `lr` with the example's schedule shape, clipping and decay.

  The schedule decays to `lr / 10` over `steps`.
  """
  import optax  # pylint: disable=import-outside-toplevel

  import smi_optax  # pylint: disable=import-outside-toplevel
  import train  # pylint: disable=import-outside-toplevel

  schedule = train.make_schedule(dataclasses.replace(base, lr=lr, min_lr=lr / 10, steps=steps))
  decay_mask = train.decay_mask
  adam_options = dict(b1=base.b1, b2=base.b2, weight_decay=base.weight_decay)
  if variant.kind == "smi":
    blend = variant.blend
    if blend == "linear":
      blend = optax.linear_schedule(1.0, 0.0, steps)
    elif blend == "adaptive":
      blend = smi_optax.adaptive_blend(0.5)
    optimizer = smi_optax.smi_adamw(
        schedule,
        keep_fraction=variant.keep_fraction,
        beta=variant.beta,
        blend=blend,
        weight_decay_mask=decay_mask,
        **adam_options,
    )
  elif variant.kind in ("adamw", "grokfast"):
    optimizer = optax.adamw(schedule, mask=decay_mask, **adam_options)
    if variant.kind == "grokfast":
      optimizer = optax.chain(grokfast_ema(), optimizer)
  else:
    raise ValueError(f"unknown variant kind {variant.kind!r}, expected adamw, smi or grokfast")
  return optax.chain(optax.clip_by_global_norm(base.grad_clip), optimizer)


def run_key(variant: Variant, lr: float, seed: int) -> str:
  return f"{variant.name}_lr{lr:.0e}_s{seed}".replace("+", "").replace("-0", "-")


def flatten_params(params) -> dict[str, np.ndarray]:
  """Returns {path: array} of a parameter tree, for np.savez."""
  import jax  # pylint: disable=import-outside-toplevel

  return {
      jax.tree_util.keystr(path): np.asarray(leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  }


def unflatten_params(arrays: dict[str, np.ndarray], like):
  """Rebuilds a tree shaped like `like` from `flatten_params`' output."""
  import jax  # pylint: disable=import-outside-toplevel

  leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
  missing = [jax.tree_util.keystr(path) for path, _ in leaves if jax.tree_util.keystr(path) not in arrays]
  if missing:
    raise ValueError(f"saved weights lack {len(missing)} leaves, the first is {missing[0]}")
  return jax.tree_util.tree_unflatten(
      treedef, [arrays[jax.tree_util.keystr(path)] for path, _ in leaves]
  )


def write_atomic(path: pathlib.Path, text: str) -> None:
  """Writes `text` to `path` through a temporary file, so a crash leaves no partial file."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


class Study:
  """Trains and records the runs of one study; skips runs already on file."""

  def __init__(self, settings: Settings, out_dir: pathlib.Path, params_dir: pathlib.Path):
    from flax import nnx  # pylint: disable=import-outside-toplevel

    import model as model_lib  # pylint: disable=import-outside-toplevel
    import train  # pylint: disable=import-outside-toplevel

    self.settings = settings
    self.out_dir = out_dir
    self.params_dir = params_dir
    self.runs_dir = out_dir / "runs"
    self.runs_dir.mkdir(parents=True, exist_ok=True)
    self.params_dir.mkdir(parents=True, exist_ok=True)
    self.base = config_lib.Config(steps=settings.steps, **dict(settings.config_overrides))
    self.text = data_lib.load_shakespeare()
    self.corpus = data_lib.build_corpus(self.text, self.base.block_size)
    self._train = train
    self._models = {}  # seed -> (graphdef, init_params)
    self._model_lib = model_lib
    self._nnx = nnx
    self.eval_loss = None

  def model(self, seed: int):
    """Returns (graphdef, initial params) of the example's model for `seed`."""
    if seed not in self._models:
      base = self.base
      model = self._model_lib.GPT(
          self.corpus.vocabulary.size,
          base.block_size,
          n_layer=base.n_layer,
          n_head=base.n_head,
          d_model=base.d_model,
          dropout=base.dropout,
          rngs=self._nnx.Rngs(params=seed),
      )
      graphdef, state = self._nnx.split(model)
      self._models[seed] = (graphdef, self._nnx.to_pure_dict(state))
      if self.eval_loss is None:
        self.eval_loss = self._train.make_eval_loss(graphdef)
    return self._models[seed]

  def num_params(self) -> int:
    """Returns the number of parameters of the example's model."""
    import jax  # pylint: disable=import-outside-toplevel

    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(self.model(0)[1])))

  def config(self, seed: int) -> config_lib.Config:
    return dataclasses.replace(self.base, seed=seed)

  def mean_val_loss(self, params, rng_seed: list[int], num_batches: int) -> float:
    """Returns the mean val loss over `num_batches` batches drawn with `rng_seed`.

    The batches depend on `rng_seed` only, so every model evaluated with the
    same seed is evaluated on the same batches.
    """
    rng = np.random.default_rng(rng_seed)
    losses = []
    for _ in range(num_batches):
      x, y = data_lib.sample_batch(self.corpus.val, self.base.batch_size, self.base.block_size, rng)
      losses.append(float(self.eval_loss(params, x, y)))
    return float(np.mean(losses))

  def curve_val_loss(self, params, seed: int, step: int) -> float:
    """Returns the val loss of a loss-curve point: `curve_iters` batches fixed by seed and step."""
    return self.mean_val_loss(params, [seed, 2, step], self.settings.curve_iters)

  def load(self, key: str) -> dict | None:
    """Returns the record of run `key` if it is on file for these settings.

    A file that is not valid JSON, or that was made with other settings, is
    renamed with the suffix .invalid or .other-settings (so nothing is lost)
    and None is returned, so that the run trains again.
    """
    path = self.runs_dir / f"{key}.json"
    if not path.exists():
      return None
    try:
      record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
      self._set_aside(path, "invalid", f"is not valid JSON ({error})")
      return None
    if record.get("settings") != json.loads(json.dumps(dataclasses.asdict(self.settings))):
      self._set_aside(path, "other-settings", "was made with other study settings")
      return None
    return record

  @staticmethod
  def _set_aside(path: pathlib.Path, suffix: str, reason: str) -> None:
    kept = path.with_name(f"{path.name}.{suffix}")
    os.replace(path, kept)
    print(f"{path} {reason}; moved it to {kept.name} and training the run again", flush=True)

  def params_path(self, key: str) -> pathlib.Path:
    return self.params_dir / f"{key}.npz"

  def load_params(self, key: str, seed: int):
    """Returns the final weights of run `key`, or None if they are not on file."""
    path = self.params_path(key)
    if not path.exists():
      return None
    with np.load(path) as arrays:
      return unflatten_params(dict(arrays), self.model(seed)[1])

  def run(self, variant: Variant, lr: float, seed: int, need_params: bool = False) -> dict:
    """Trains `variant` at `lr` and `seed`, or returns its record from file.

    With `need_params`, a run whose record is on file but whose final weights
    are not trains again to save its weights, and the record on file is kept.
    A fresh clone is such a case, because it has the records only.
    """
    key = run_key(variant, lr, seed)
    record = self.load(key)
    if record is not None and (not need_params or self.params_path(key).exists()):
      return record
    if record is not None:
      print(f"{key}: training again for its final weights, keeping its record", flush=True)
      self._train_run(key, variant, lr, seed)
      return record
    record = self._train_run(key, variant, lr, seed)
    write_atomic(self.runs_dir / f"{key}.json", json.dumps(record, indent=1) + "\n")
    return record

  def _train_run(self, key: str, variant: Variant, lr: float, seed: int) -> dict:
    import jax  # pylint: disable=import-outside-toplevel

    import smi_optax  # pylint: disable=import-outside-toplevel

    settings, train = self.settings, self._train
    config = self.config(seed)
    graphdef, params = self.model(seed)
    optimizer = make_optimizer(variant, lr, settings.steps, self.base)
    train_step = train.make_train_step(graphdef, optimizer, seed)
    opt_state = jax.jit(optimizer.init)(params)

    curve = [(0, self.curve_val_loss(params, seed, 0), 0.0)]
    step_ms = []
    started = time.time()
    for step in range(1, settings.steps + 1):
      x, y = train.training_batch(self.corpus, config, step)
      start = time.perf_counter()
      params, opt_state, loss = train_step(params, opt_state, x, y, step)
      loss = float(loss)  # waits for the step, so the time is complete
      step_ms.append((time.perf_counter() - start) * 1e3)
      if not math.isfinite(loss):
        print(f"{key}: loss {loss} at step {step}; the run diverged", flush=True)
        break
      if step % settings.eval_interval == 0 or step == settings.steps:
        curve.append((step, self.curve_val_loss(params, seed, step), None))
    ms_per_step = statistics.median(step_ms[TIMING_WARMUP_STEPS:] or step_ms)
    # Elapsed training time at each curve point, with the compiling first step
    # counted at the median step time.
    elapsed = np.cumsum([ms_per_step] + step_ms[1:]) / 1e3
    curve = [(step, val, float(elapsed[step - 1]) if step else 0.0) for step, val, _ in curve]
    train_loss, val_loss = train.estimate_losses(
        self.eval_loss,
        params,
        self.corpus,
        dataclasses.replace(config, eval_iters=settings.final_iters),
        settings.steps,
    )
    record = {
        "key": key,
        "variant": dataclasses.asdict(variant),
        "lr": lr,
        "seed": seed,
        "settings": dataclasses.asdict(self.settings),
        "steps_run": len(step_ms),
        "curve": curve,  # (step, val loss over curve_iters batches, training seconds)
        "final_train_loss": train_loss,
        "final_val_loss": val_loss if len(step_ms) == settings.steps else math.nan,
        "best_val_loss": min(val for _, val, _ in curve),
        "ms_per_step": ms_per_step,
        "wall_seconds": time.time() - started,
    }
    if variant.kind == "smi":
      values = smi_optax.stats(opt_state)
      record["kept_energy_mean"] = float(values["kept_energy_mean"])
      record["blend_mean"] = float(values["blend_mean"])
    np.savez(self.params_path(key), **flatten_params(params))
    print(
        f"{key}: final val loss {record['final_val_loss']:.4f}, best {record['best_val_loss']:.4f}, "
        f"{ms_per_step:.1f} ms/step, {record['wall_seconds']:.0f} s",
        flush=True,
    )
    return record

  def sweep(self, variant: Variant) -> tuple[float, list[dict]]:
    """Runs the rate sweep of `variant` on the first seed; returns the best rate and the runs."""
    settings = self.settings
    rates = list(settings.rates)
    seed = settings.seeds[0]
    records = {lr: self.run(variant, lr, seed) for lr in rates}
    for _ in range(settings.max_extensions):
      best = min(rates, key=lambda lr: _final_or_inf(records[lr]))
      if best == rates[-1]:
        rates.append(rates[-1] * settings.rate_factor)
        new = rates[-1]
      elif best == rates[0]:
        rates.insert(0, rates[0] / settings.rate_factor)
        new = rates[0]
      else:
        break
      print(f"{variant.name}: best rate {best:g} is at the grid's end; adding {new:g}", flush=True)
      records[new] = self.run(variant, new, seed)
    best = min(rates, key=lambda lr: _final_or_inf(records[lr]))
    return best, [records[lr] for lr in rates]


def _final_or_inf(record: dict) -> float:
  value = record["final_val_loss"]
  return value if math.isfinite(value) else math.inf


@dataclasses.dataclass
class StudyRuns:
  """Records of every run of a study, grouped by stage."""

  best_rate: dict[str, float]  # optimizer or filter name -> chosen peak rate
  sweeps: dict[str, list[dict]]  # name -> first-seed runs over its rates, ascending
  tuned: dict[str, list[dict]]  # 'adamw' and 'smi' -> one run per seed at the best rate
  same_rate: dict[str, list[dict]]  # 'adamw_at_smi_rate' when the best rates differ
  ablation_runs: dict[str, list[dict]]  # ablation name -> one run per seed


def run_stages(study: Study, settings: Settings) -> StudyRuns:
  """Runs (or reads from file) stages 1 to 3 of the study."""
  # Stage 1 and 2: tune each baseline's rate, then run every seed at it.
  best_rate, sweeps, tuned = {}, {}, {}
  for variant in (ADAMW, SMI):
    best_rate[variant.name], sweeps[variant.name] = study.sweep(variant)
    print(f"{variant.name}: best peak rate {best_rate[variant.name]:g}", flush=True)
    tuned[variant.name] = [
        study.run(variant, best_rate[variant.name], seed, need_params=True) for seed in settings.seeds
    ]

  # AdamW at SMI's rate as well, so that SMI is also compared at an equal rate.
  same_rate = {}
  if best_rate["adamw"] != best_rate["smi"]:
    same_rate["adamw_at_smi_rate"] = [
        study.run(ADAMW, best_rate["smi"], seed) for seed in settings.seeds
    ]

  # Stage 3: the SMI ablations run at SMI's rate. The Grokfast baseline runs
  # at whichever of the two tuned rates gives it the lower final val loss on
  # the first seed.
  ablation_runs = {}
  for variant in ablations(settings):
    rate = best_rate["smi"]
    if variant.kind == "grokfast":
      candidates = sorted(set(best_rate.values()))
      trials = {lr: study.run(variant, lr, settings.seeds[0]) for lr in candidates}
      rate = min(candidates, key=lambda lr: _final_or_inf(trials[lr]))
      best_rate["grokfast"] = rate
      sweeps["grokfast"] = [trials[lr] for lr in candidates]
    ablation_runs[variant.name] = [study.run(variant, rate, seed) for seed in settings.seeds]

  return StudyRuns(best_rate, sweeps, tuned, same_rate, ablation_runs)


def _machine_line(machine: dict) -> str:
  return (
      f"Machine: {machine['cpu_count']} CPUs ({machine['processor']}), {machine['platform']}, "
      f"Python {machine['python']}, JAX {machine['jax']} on {machine['backend']} "
      f"({machine['device_count']} x {machine['device']})."
  )


def main(argv: list[str] | None = None) -> dict:
  """Runs the study from the command line and returns the content of study.json."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument(
      "--quick", action="store_true", help="short runs, fewer seeds and ablations (< 15 min on 2 cores)"
  )
  parser.add_argument(
      "--out",
      default=None,
      help="directory for the run files, study.json, study.md and plots "
      "(default: benchmarks/results/charlm_study, or runs/charlm_study_quick with --quick)",
  )
  parser.add_argument(
      "--params-dir",
      default=None,
      help="directory for the final weights of each run (default: runs/charlm_study[_quick]_params)",
  )
  parser.add_argument(
      "--skip-inference", action="store_true", help="leave out stage 4 (charlm_inference.py)"
  )
  args = parser.parse_args(argv)
  settings = QUICK if args.quick else FULL
  suffix = "_quick" if args.quick else ""
  out_dir = pathlib.Path(
      args.out or (REPO_ROOT / "runs" / "charlm_study_quick" if args.quick else BENCHMARKS_DIR / "results" / "charlm_study")
  )
  params_dir = pathlib.Path(args.params_dir or REPO_ROOT / "runs" / f"charlm_study{suffix}_params")
  for flag, path in (("--out", out_dir), ("--params-dir", params_dir)):
    if path.exists() and not path.is_dir():
      parser.error(f"{flag} {path} exists and is not a directory; pick another path")
    try:
      path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
      parser.error(f"{flag} {path}: cannot create the directory: {error.strerror or error}")

  import common  # pylint: disable=import-outside-toplevel

  started = time.time()
  study = Study(settings, out_dir, params_dir)
  print(
      f"study: {'quick' if args.quick else 'full'} mode, {settings.steps} steps per run, "
      f"seeds {list(settings.seeds)}, out {out_dir}",
      flush=True,
  )

  runs = run_stages(study, settings)
  best_rate, sweeps, tuned = runs.best_rate, runs.sweeps, runs.tuned
  same_rate, ablation_runs = runs.same_rate, runs.ablation_runs

  baseline = {r["seed"]: r for r in tuned["adamw"]}
  target = round(report.mean_std([r["final_val_loss"] for r in tuned["adamw"]])[0] + settings.target_margin, 3)
  all_groups = {**tuned, **same_rate, **ablation_runs}
  groups = [report.summarize_group(records, baseline, target) for records in all_groups.values()]
  equal_rate_baseline = {r["seed"]: r for r in same_rate.get("adamw_at_smi_rate", tuned["adamw"])}
  smi_minus_equal_rate = [
      r["final_val_loss"] - equal_rate_baseline[r["seed"]]["final_val_loss"] for r in tuned["smi"]
  ]
  table = report.markdown_table(groups, target, len(settings.seeds), describe_variant)
  if len(smi_minus_equal_rate) > 1:
    interval = report.confidence_interval_95(smi_minus_equal_rate)
    table += (
        f"\n\nTuned SMI-AdamW minus AdamW at SMI's rate {best_rate['smi']:g}, same seed: "
        f"{report.format_mean_std(report.mean_std(smi_minus_equal_rate))} [{interval[0]:+.4f}, {interval[1]:+.4f}] nats/char."
    )

  report.plot_curves(
      {**tuned, **same_rate},
      out_dir / "curves.png",
      "AdamW and SMI-AdamW at their tuned rates, mean ± 1 std over seeds",
      describe_variant,
  )
  report.plot_curves(
      {"smi": tuned["smi"], **ablation_runs},
      out_dir / "ablations.png",
      f"SMI ablations at lr {best_rate['smi']:g}, mean ± 1 std over seeds",
      describe_variant,
  )
  report.plot_sweep(sweeps, out_dir / "sweep.png")

  payload = {
      "mode": "quick" if args.quick else "full",
      "settings": dataclasses.asdict(settings),
      "base_config": dataclasses.asdict(study.base),
      "num_params": study.num_params(),
      "best_rate": best_rate,
      "target_val_loss": target,
      # Tuned SMI's final val loss minus AdamW's at the same seed and SMI's rate.
      "smi_minus_adamw_equal_rate": {
          "mean_std": report.mean_std(smi_minus_equal_rate),
          "ci95": report.confidence_interval_95(smi_minus_equal_rate),
      },
      "sweep": {name: [[r["lr"], r["final_val_loss"]] for r in records] for name, records in sweeps.items()},
      "groups": {name: group for name, group in zip(all_groups, groups)},
  }
  if not args.skip_inference:
    import charlm_inference  # pylint: disable=import-outside-toplevel

    payload["inference"] = charlm_inference.analyze(study, tuned)
    inference_md = charlm_inference.markdown(payload["inference"])
  else:
    inference_md = "(inference stage skipped)"
  payload["study_wall_seconds_this_invocation"] = time.time() - started
  common.write_json("study", payload, out_dir)
  write_atomic(
      out_dir / "study.md",
      "\n\n".join(
          [
              f"# Character-level study ({payload['mode']} mode)",
              "Command: `python " + " ".join(sys.argv) + "`",
              _machine_line(common.machine()),
              "## Learning-rate sweep\n\n" + report.sweep_table(sweeps, best_rate),
              "## Tuned baselines and ablations\n\n" + table,
              "## Inference\n\n" + inference_md,
          ]
      )
      + "\n",
  )
  print(table, flush=True)
  print(inference_md, flush=True)
  print(f"study: wrote {out_dir / 'study.md'} in {time.time() - started:.0f} s", flush=True)
  return payload


if __name__ == "__main__":
  main()
