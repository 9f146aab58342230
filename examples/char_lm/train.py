"""Train a character-level GPT with SMI-AdamW and with AdamW, and compare them.

Run from the repository root after `pip install -e '.[example]'`::

  python examples/char_lm/train.py                      # both optimizers
  python examples/char_lm/train.py --optimizer smi --steps 300
  python examples/char_lm/train.py --text my_corpus.txt --out runs/mine

With `--optimizer both` the two runs start from the same initial weights and
see the same batches, dropout masks and evaluation batches; only the
optimizer differs. Both use the same learning-rate schedule (linear warm-up,
then cosine decay to `--min-lr`), gradient clipping, Adam betas and weight
decay on matrices only.

Outputs under `--out`: results.json, loss.png, samples/<optimizer>.txt and an
Orbax checkpoint of the final parameters in checkpoints/<optimizer>.
"""

import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Running this file as a script puts its directory on sys.path already; the
# insert also covers `import train` from elsewhere, as the tests do.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import config as config_lib  # noqa: E402
import data as data_lib  # noqa: E402
import numpy as np  # noqa: E402

# JAX, Flax, optax, Orbax, matplotlib and tqdm take seconds to import, so the
# functions that use them import them. An invalid flag or --text file then
# fails at once, before any of them load.

# Steps left out of the ms/step median: the first call compiles the step.
TIMING_WARMUP_STEPS = 5


@dataclasses.dataclass
class RunResult:
  """Outcome of training one model with one optimizer."""

  params: dict  # final parameters, as nnx.to_pure_dict returns them
  history: list[tuple[int, float, float]]  # (step, train loss, val loss) per evaluation
  step_ms: list[float]  # wall time of every training step, compile included


def prepare_output_dir(out: str) -> Path:
  """Create `out` if needed and check that files can be written in it.

  Returns:
    The directory as an absolute path.

  Raises:
    ValueError: the directory cannot be created or written.
  """
  path = Path(out).expanduser().resolve()
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as error:
    raise ValueError(
        f'--out {out}: cannot create or write the directory: {error.strerror or error}'
    ) from None
  return path


def load_text(config: config_lib.Config) -> str:
  """Return the training text: the `--text` file, or the Shakespeare plays."""
  if config.text is None:
    return data_lib.load_shakespeare()
  try:
    return data_lib.read_text_file(config.text)
  except ValueError as error:
    raise ValueError(f'--text: {error}') from None


def make_optimizer(name: str, config: config_lib.Config):
  """Build the optimizer `name` ('smi' or 'adamw') with the shared schedule and clipping.

  Weight decay applies to leaves with 2 or more dimensions (Linear kernels and
  embeddings), not to biases or LayerNorm parameters, for both optimizers.
  """
  import jax
  import optax
  import smi_optax

  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=config.lr,
      warmup_steps=config.warmup_steps,
      decay_steps=config.steps,
      end_value=config.min_lr,
  )

  def decay_mask(params):
    return jax.tree.map(lambda leaf: leaf.ndim >= 2, params)

  if name == 'smi':
    optimizer = smi_optax.smi_adamw(
        schedule,
        keep_fraction=config.keep_fraction,
        beta=config.beta,
        blend=config.blend,
        b1=config.b1,
        b2=config.b2,
        weight_decay=config.weight_decay,
        weight_decay_mask=decay_mask,
    )
  elif name == 'adamw':
    optimizer = optax.adamw(
        schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=decay_mask
    )
  else:
    raise ValueError(f'unknown optimizer {name!r}, expected one of {config_lib.OPTIMIZERS}')
  if config.grad_clip > 0:
    optimizer = optax.chain(optax.clip_by_global_norm(config.grad_clip), optimizer)
  return optimizer


def make_train_step(graphdef, optimizer, seed: int):
  """Return the jitted `train_step(params, opt_state, x, y, step) -> (params, opt_state, loss)`.

  The step is a pure function of its arguments; the model is rebuilt inside it
  with `nnx.merge(graphdef, params)`. The dropout key is derived from `seed`
  and the step number, so two runs with the same seed draw the same masks.
  """
  import jax
  import optax
  from flax import nnx

  import model as model_lib

  base_key = jax.random.key(seed)

  @jax.jit
  def train_step(params, opt_state, x, y, step):
    dropout_rngs = nnx.Rngs(dropout=jax.random.fold_in(base_key, step))

    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      logits = model(x, deterministic=False, rngs=dropout_rngs)
      return model_lib.cross_entropy_loss(logits, y)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def make_eval_loss(graphdef):
  """Return the jitted `eval_loss(params, x, y)`: mean cross-entropy without dropout."""
  import jax
  from flax import nnx

  import model as model_lib

  @jax.jit
  def eval_loss(params, x, y):
    model = nnx.merge(graphdef, params)
    return model_lib.cross_entropy_loss(model(x, deterministic=True), y)

  return eval_loss


def estimate_losses(
    eval_loss, params, corpus: data_lib.Corpus, config: config_lib.Config, step: int
):
  """Return the mean (train, val) loss over `config.eval_iters` batches of each split.

  The batches depend on the seed and `step` only, so every optimizer is
  evaluated on the same batches at the same step.
  """
  rng = np.random.default_rng([config.seed, 1, step])
  means = []
  for tokens in (corpus.train, corpus.val):
    losses = [
        eval_loss(params, *data_lib.sample_batch(tokens, config.batch_size, config.block_size, rng))
        for _ in range(config.eval_iters)
    ]
    means.append(float(np.mean([float(loss) for loss in losses])))
  return tuple(means)


def median_step_ms(step_ms: list[float]) -> float:
  """Return the median step time after the first TIMING_WARMUP_STEPS steps.

  With TIMING_WARMUP_STEPS steps or fewer, only the first (compiling) step is left out,
  and with one step that step is the result.
  """
  skip = TIMING_WARMUP_STEPS if len(step_ms) > TIMING_WARMUP_STEPS else 1
  return statistics.median(step_ms[skip:] or step_ms)


def train_model(
    name: str, config: config_lib.Config, corpus: data_lib.Corpus, graphdef, init_params, eval_loss
) -> RunResult:
  """Train from `init_params` with optimizer `name` for `config.steps` steps."""
  import jax
  from tqdm import tqdm

  optimizer = make_optimizer(name, config)
  train_step = make_train_step(graphdef, optimizer, config.seed)
  params = init_params
  opt_state = optimizer.init(params)
  # The same seed gives both optimizers the same batch order.
  batch_rng = np.random.default_rng([config.seed, 0])
  tokens_per_step = config.batch_size * config.block_size

  train_loss, val_loss = estimate_losses(eval_loss, params, corpus, config, step=0)
  history = [(0, train_loss, val_loss)]
  step_ms = []
  progress = tqdm(range(1, config.steps + 1), desc=name, unit='step', dynamic_ncols=True)
  for step in progress:
    x, y = data_lib.sample_batch(corpus.train, config.batch_size, config.block_size, batch_rng)
    start = time.perf_counter()
    params, opt_state, loss = train_step(params, opt_state, x, y, step)
    loss = float(loss)  # waits for the step to finish, so the timing is complete
    step_ms.append((time.perf_counter() - start) * 1e3)
    progress.set_postfix(loss=f'{loss:.3f}', refresh=False)

    if step % config.eval_interval == 0 or step == config.steps:
      train_loss, val_loss = estimate_losses(eval_loss, params, corpus, config, step)
      history.append((step, train_loss, val_loss))
      if step <= config.eval_interval:
        recent_ms = median_step_ms(step_ms)
      else:
        recent_ms = statistics.median(step_ms[-config.eval_interval :])
      progress.write(
          f'{name} step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, '
          f'{recent_ms:.1f} ms/step, {tokens_per_step / recent_ms * 1e3:,.0f} tokens/s'
      )
  progress.close()
  jax.block_until_ready(params)
  return RunResult(params=params, history=history, step_ms=step_ms)


def sample_text(
    graphdef, params, vocabulary: data_lib.Vocabulary, config: config_lib.Config
) -> str:
  """Generate `config.sample_length` characters after a newline, with a fixed key."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import model as model_lib

  start = '\n' if '\n' in vocabulary.chars else vocabulary.chars[0]
  prompt = jnp.asarray(vocabulary.encode(start))
  tokens = model_lib.generate(
      nnx.merge(graphdef, params),
      prompt,
      jax.random.key(config.seed),
      config.temperature,
      num_tokens=config.sample_length,
  )
  return vocabulary.decode(np.asarray(tokens))


def save_checkpoint(path: Path, params) -> None:
  """Write `params` to the Orbax checkpoint directory `path`, replacing an older one."""
  import orbax.checkpoint as ocp

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path.resolve(), params, force=True)
  checkpointer.wait_until_finished()


def restore_params(path: str | Path, like):
  """Read parameters saved by `save_checkpoint`.

  Args:
    path: the checkpoint directory, e.g. OUT/checkpoints/smi.
    like: parameters (or `jax.ShapeDtypeStruct`s) with the saved tree
      structure, shapes and dtypes, e.g. `nnx.to_pure_dict(nnx.state(model))`
      of a model built with the same flags.

  Returns:
    The saved parameters, in the tree structure of `like`.
  """
  import jax
  import orbax.checkpoint as ocp

  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  return ocp.StandardCheckpointer().restore(Path(path).resolve(), target)


def plot_losses(histories: dict[str, list], path: Path) -> None:
  """Plot train (dashed) and val (solid) loss against step for each optimizer."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  figure, axes = plt.subplots(figsize=(7, 4.5))
  for index, (name, history) in enumerate(histories.items()):
    steps, train_losses, val_losses = zip(*history)
    color = f'C{index}'
    axes.plot(steps, train_losses, linestyle='--', color=color, label=f'{name} train')
    axes.plot(steps, val_losses, linestyle='-', color=color, label=f'{name} val')
  axes.set_xlabel('step')
  axes.set_ylabel('cross-entropy (nats/char)')
  axes.set_title('Character-level GPT: SMI-AdamW and AdamW')
  axes.grid(alpha=0.3)
  axes.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def summarize(run: RunResult, config: config_lib.Config, sample: str) -> dict:
  """Return the results.json entry of one run."""
  ms_per_step = median_step_ms(run.step_ms)
  val_loss = run.history[-1][2]
  return {
      'val_loss': val_loss,
      'best_val_loss': min(entry[2] for entry in run.history),
      'val_bpc': val_loss / math.log(2),
      'ms_per_step': ms_per_step,
      'tokens_per_s': config.batch_size * config.block_size / ms_per_step * 1e3,
      'history': [list(entry) for entry in run.history],
      'sample': sample,
  }


def format_table(runs: dict[str, dict], unigram_entropy: float) -> str:
  """Return the end-of-run comparison table as text."""
  header = f'{"optimizer":<10} {"val loss":>9} {"best val":>9} {"val bpc":>8} {"ms/step":>8} {"tokens/s":>10}'
  lines = [header, '-' * len(header)]
  for name, run in runs.items():
    lines.append(
        f'{name:<10} {run["val_loss"]:>9.4f} {run["best_val_loss"]:>9.4f} {run["val_bpc"]:>8.4f} '
        f'{run["ms_per_step"]:>8.1f} {run["tokens_per_s"]:>10,.0f}'
    )
  lines.append(
      f'unigram entropy of the text: {unigram_entropy:.4f} nats/char '
      f'({unigram_entropy / math.log(2):.4f} bits/char); losses are in nats/char.'
  )
  return '\n'.join(lines)


@dataclasses.dataclass
class Experiment:
  """What `run_experiment` returns: the results.json content and the final parameters."""

  results: dict
  params: dict[str, dict]  # optimizer name -> final parameters


def run_experiment(
    config: config_lib.Config, text: str, corpus: data_lib.Corpus, out_dir: Path
) -> Experiment:
  """Train with each optimizer in `config.optimizers` and write all outputs to `out_dir`."""
  import jax
  from flax import nnx

  import model as model_lib

  devices = jax.devices()
  print(f'JAX devices: {", ".join(str(device) for device in devices)}', flush=True)
  entropy = data_lib.unigram_entropy(text)
  print(
      f'text: {len(text):,} characters, vocabulary {corpus.vocabulary.size}, '
      f'train {len(corpus.train):,}, val {len(corpus.val):,}, unigram entropy {entropy:.4f} nats/char',
      flush=True,
  )

  # Both optimizers start from these parameters; JAX arrays are immutable, so
  # the first run cannot change them for the second.
  model = model_lib.GPT(
      corpus.vocabulary.size,
      config.block_size,
      n_layer=config.n_layer,
      n_head=config.n_head,
      d_model=config.d_model,
      dropout=config.dropout,
      rngs=nnx.Rngs(params=config.seed),
  )
  graphdef, state = nnx.split(model)
  init_params = nnx.to_pure_dict(state)
  num_params = sum(leaf.size for leaf in jax.tree.leaves(init_params))
  print(f'model: {num_params:,} parameters', flush=True)

  # One jitted evaluation serves every run, so it compiles once.
  eval_loss = make_eval_loss(graphdef)
  runs = {}
  final_params = {}
  for name in config.optimizers:
    run = train_model(name, config, corpus, graphdef, init_params, eval_loss)
    sample = sample_text(graphdef, run.params, corpus.vocabulary, config)
    print(f'\n--- {name} sample ---\n{sample}\n', flush=True)
    (out_dir / 'samples').mkdir(exist_ok=True)
    (out_dir / 'samples' / f'{name}.txt').write_text(sample, encoding='utf-8')
    save_checkpoint(out_dir / 'checkpoints' / name, run.params)
    runs[name] = summarize(run, config, sample)
    final_params[name] = run.params

  plot_losses({name: run['history'] for name, run in runs.items()}, out_dir / 'loss.png')
  results = {
      'config': dataclasses.asdict(config),
      'devices': [str(device) for device in devices],
      'num_params': num_params,
      'vocab_size': corpus.vocabulary.size,
      'unigram_entropy': entropy,
      'runs': runs,
  }
  (out_dir / 'results.json').write_text(json.dumps(results, indent=2) + '\n', encoding='utf-8')
  print(format_table(runs, entropy))
  print(
      f'wrote {out_dir / "results.json"}, {out_dir / "loss.png"}, samples/ and checkpoints/ in {out_dir}'
  )
  return Experiment(results=results, params=final_params)


def main(argv: list[str] | None = None) -> Experiment:
  """Run the command line; an invalid flag or input exits with status 2 and one line on stderr."""
  parser = config_lib.build_parser(prog='train.py')
  config = config_lib.parse_config(argv, parser=parser)
  try:
    text = load_text(config)
    corpus = data_lib.build_corpus(text, config.block_size)
    out_dir = prepare_output_dir(config.out)
  except ValueError as error:
    parser.error(str(error))
  return run_experiment(config, text, corpus, out_dir)


if __name__ == '__main__':
  main()
