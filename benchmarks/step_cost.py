"""Training-step cost of SMI-AdamW against AdamW on the char-LM example.

Builds the example's jitted training step twice, once per optimizer, at the
example's default configuration (or the flags given), and times the two in
alternation in one process on the same batch: the ratio is the median of
per-round ratios. A second part runs a short training in a fresh subprocess
per optimizer and reads its peak resident memory (``ru_maxrss``).

Usage:
  python benchmarks/step_cost.py [--rounds 7] [--steps-per-round 20]
"""

import argparse
import json
import pathlib
import resource
import subprocess
import tempfile
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # pylint: disable=wrong-import-position
import trees  # pylint: disable=wrong-import-position

_EXAMPLE_DIR = common.REPO_ROOT / "examples" / "char_lm"
sys.path.insert(0, str(_EXAMPLE_DIR))
import config as config_lib  # pylint: disable=wrong-import-position
import data as data_lib  # pylint: disable=wrong-import-position
import train as train_lib  # pylint: disable=wrong-import-position

_MEMORY_SCRIPT = """
import json, resource, sys
sys.path.insert(0, {example_dir!r})
import train
train.main({argv!r})
print(json.dumps({{"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def build_steps(config: config_lib.Config, vocab_size: int):
  """Returns per-optimizer (train_step, params, opt_state) from one initialization."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  graphdef, params = nnx.split(trees.example_model(vocab_size, config.seed))
  params = nnx.to_pure_dict(params)
  steps = {}
  for name in config_lib.OPTIMIZERS:
    optimizer = train_lib.make_optimizer(name, config)
    train_step = train_lib.make_train_step(graphdef, optimizer, config.seed)
    steps[name] = (train_step, params, optimizer.init(params))
  return steps


def measure_memory(steps: int) -> dict:
  """Runs a short training per optimizer in a subprocess; returns peak RSS in MiB."""
  result = {}
  scratch = pathlib.Path(tempfile.mkdtemp(prefix="step_cost_"))
  for name in config_lib.OPTIMIZERS:
    out = scratch / name
    argv = [
        "--optimizer", name, "--steps", str(steps), "--eval-interval", str(steps),
        "--eval-iters", "2", "--warmup-steps", "0", "--out", str(out),
    ]
    script = _MEMORY_SCRIPT.format(example_dir=str(_EXAMPLE_DIR), argv=argv)
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    result[name] = json.loads(completed.stdout.strip().splitlines()[-1])["peak_rss_mib"]
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=7, help="alternating rounds")
  parser.add_argument("--steps-per-round", type=int, default=20, help="steps timed per round")
  parser.add_argument("--memory-steps", type=int, default=50, help="steps of each memory run; 0 skips it")
  parser.add_argument("--out", type=pathlib.Path, default=common.RESULTS_DIR, help="output folder")
  args = parser.parse_args()
  print(f"JAX devices: {jax.devices()}")

  config = config_lib.Config()
  text = data_lib.load_shakespeare()
  corpus = data_lib.build_corpus(text, config.block_size)
  steps = build_steps(config, corpus.vocabulary.size)
  rng = np.random.default_rng(0)
  x, y = data_lib.sample_batch(corpus.train, config.batch_size, config.block_size, rng)

  def run(name):
    train_step, params, opt_state = steps[name]

    def call():
      nonlocal params, opt_state
      loss = None
      for step in range(args.steps_per_round):
        params, opt_state, loss = train_step(params, opt_state, x, y, step)
      return loss

    return call

  timings = common.time_alternating(
      {name: run(name) for name in config_lib.OPTIMIZERS}, rounds=args.rounds, repeats=1
  )
  per_step = {name: t["median_ms"] / args.steps_per_round for name, t in timings.items()}
  ratio = common.paired_ratio(timings, "smi", "adamw")
  print(
      f"median ms/step: adamw {per_step['adamw']:.2f}, smi {per_step['smi']:.2f};"
      f" smi/adamw {ratio:.3f} (target 1.05)"
  )
  result = {
      "config": {k: v for k, v in vars(config).items()},
      "ms_per_step": per_step,
      "smi_over_adamw": ratio,
      "target_smi_over_adamw": 1.05,
      "timings": timings,
  }
  if args.memory_steps:
    result["peak_rss_mib"] = measure_memory(args.memory_steps)
    print(f"peak RSS (MiB): {result['peak_rss_mib']}")
  result["self_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  path = common.write_json("step_cost", result, args.out)
  plot(per_step, ratio, args.out / "step_cost.png")
  print(f"wrote {path}")


def plot(per_step: dict, ratio: float, path: pathlib.Path) -> None:
  plt = common.pyplot()

  fig, ax = plt.subplots(figsize=(4.5, 3.5))
  names = list(per_step)
  ax.bar(names, [per_step[n] for n in names], color=["tab:blue", "tab:orange"])
  ax.set_ylabel("median ms per training step")
  ax.set_title(f"char-LM step on {jax.default_backend()}: smi/adamw {ratio:.3f}")
  common.save_figure(fig, path)


if __name__ == "__main__":
  main()
