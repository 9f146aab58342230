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

`--devices N` trains data-parallel on the first N devices: each batch is split
along its first axis and the parameters and optimizer state are replicated.

Outputs under `--out`: results.json, loss.png, smi_stats.png (with SMI),
samples/<optimizer>.txt and Orbax checkpoints of the training state in
checkpoints/<optimizer>/train_state, saved at every evaluation. `--resume DIR`
continues from the newest of those; checkpointing.py describes their contents.
"""

import dataclasses
import functools
import json
import math
import shlex
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Running this file as a script puts its directory on sys.path already; the
# insert also covers `import train` from elsewhere, as the tests do.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import checkpointing  # noqa: E402
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
  # (step, kept_energy_mean, blend_mean) per evaluation after step 0; SMI runs only.
  stats: list[tuple[int, float, float]]
  last_step: int  # below config.steps when --stop-after or SIGTERM ended the run


def prepare_output_dir(out: str) -> Path:
  """Create `out` if needed and check that files can be written in it.

  Returns:
    The directory as an absolute path.

  Raises:
    ValueError: the directory cannot be created or written.
  """
  path = Path(out).expanduser().resolve()
  if path.exists() and not path.is_dir():
    raise ValueError(f'--out {out} exists and is not a directory; pick another path')
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


def make_mesh(num_devices: int):
  """Return a 1-D `jax.sharding.Mesh` with axis 'data' over the first `num_devices` devices.

  Raises:
    ValueError: fewer than `num_devices` devices are available.
  """
  import jax

  available = jax.device_count()
  if num_devices > available:
    raise ValueError(
        f'--devices {num_devices} is more than jax.device_count() = {available}; on CPU, set '
        f'XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} to get {num_devices} '
        'host devices'
    )
  return jax.sharding.Mesh(np.array(jax.devices()[:num_devices]), ('data',))


def make_schedule(config: config_lib.Config):
  """Return the learning-rate schedule: linear warm-up to `config.lr`, then cosine decay to `config.min_lr`."""
  import optax

  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=config.lr,
      warmup_steps=config.warmup_steps,
      decay_steps=config.steps,
      end_value=config.min_lr,
  )


def decay_mask(params):
  """Return True for the leaves that get weight decay: those with 2 or more dimensions."""
  import jax

  return jax.tree.map(lambda leaf: leaf.ndim >= 2, params)


def make_optimizer(name: str, config: config_lib.Config, mesh=None):
  """Build the optimizer `name` ('smi' or 'adamw') with the shared schedule and clipping.

  Weight decay applies to leaves with 2 or more dimensions (Linear kernels and
  embeddings), not to biases or LayerNorm parameters, for both optimizers.
  With `mesh`, SMI places its state on the mesh, replicated like the
  parameters.
  """
  import jax
  import optax
  import smi_optax
  from jax.sharding import PartitionSpec

  schedule = make_schedule(config)

  if name == 'smi':
    optimizer = smi_optax.smi_adamw(
        schedule,
        keep_fraction=config.keep_fraction,
        beta=config.beta,
        blend=config.blend,
        mask_every=config.mask_every,
        b1=config.b1,
        b2=config.b2,
        weight_decay=config.weight_decay,
        weight_decay_mask=decay_mask,
        mesh=mesh,
        param_specs=None if mesh is None else lambda params: jax.tree.map(
            lambda _: PartitionSpec(), params
        ),
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


def make_train_step(graphdef, optimizer, seed: int, mesh=None):
  """Return the jitted `train_step(params, opt_state, x, y, step) -> (params, opt_state, loss)`.

  The step is a pure function of its arguments; the model is rebuilt inside it
  with `nnx.merge(graphdef, params)`. The dropout key is derived from `seed`
  and the step number, so two runs with the same seed draw the same masks.
  With `mesh`, every output is replicated on it; XLA sums the gradients of
  the batch shards across devices.
  """
  import jax
  import optax
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec

  import model as model_lib

  base_key = jax.random.key(seed)
  out_shardings = None if mesh is None else NamedSharding(mesh, PartitionSpec())

  @functools.partial(jax.jit, out_shardings=out_shardings)
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
    eval_loss,
    params,
    corpus: data_lib.Corpus,
    config: config_lib.Config,
    step: int,
    batch_sharding=None,
):
  """Return the mean (train, val) loss over `config.eval_iters` batches of each split.

  The batches depend on the seed and `step` only, so every optimizer is
  evaluated on the same batches at the same step. With `batch_sharding`, each
  batch is placed with it before the call.
  """
  rng = np.random.default_rng([config.seed, 1, step])
  means = []
  for tokens in (corpus.train, corpus.val):
    losses = []
    for _ in range(config.eval_iters):
      x, y = data_lib.sample_batch(tokens, config.batch_size, config.block_size, rng)
      losses.append(eval_loss(params, *place_batch(x, y, batch_sharding)))
    means.append(float(np.mean([float(loss) for loss in losses])))
  return tuple(means)


def training_batch(corpus: data_lib.Corpus, config: config_lib.Config, step: int):
  """Return the (x, y) batch of training step `step`.

  The draw depends on the seed and `step` only, so a resumed run sees the
  same batches as an unbroken one.
  """
  rng = np.random.default_rng([config.seed, 0, step])
  return data_lib.sample_batch(corpus.train, config.batch_size, config.block_size, rng)


def place_batch(x: np.ndarray, y: np.ndarray, batch_sharding):
  """Put a batch on the devices of `batch_sharding`, split along its first axis."""
  if batch_sharding is None:
    return x, y
  import jax

  return jax.device_put(x, batch_sharding), jax.device_put(y, batch_sharding)


def median_step_ms(step_ms: list[float]) -> float:
  """Return the median step time after the first TIMING_WARMUP_STEPS steps.

  With TIMING_WARMUP_STEPS steps or fewer, only the first (compiling) step is left out,
  and with one step that step is the result.
  """
  skip = TIMING_WARMUP_STEPS if len(step_ms) > TIMING_WARMUP_STEPS else 1
  return statistics.median(step_ms[skip:] or step_ms)


class StopRequest:
  """Flag that a SIGTERM handler sets; the training loop checks it after every step."""

  def __init__(self):
    self.signal_name: str | None = None

  def install(self) -> None:
    """Handle SIGTERM by setting the flag (call from the main thread)."""
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name


@dataclasses.dataclass
class RunContext:
  """Objects that every run of an experiment shares, besides the config."""

  corpus: data_lib.Corpus
  graphdef: object  # the model's nnx.GraphDef
  init_params: dict
  eval_loss: object  # from make_eval_loss
  mesh: object  # jax.sharding.Mesh with axis 'data'
  out_dir: Path
  text_sha256: str
  stop: StopRequest


def smi_means(opt_state) -> tuple[float, float]:
  """Return SMI's (kept_energy_mean, blend_mean) from an optimizer state."""
  import smi_optax

  values = smi_optax.stats(opt_state)
  return float(values['kept_energy_mean']), float(values['blend_mean'])


def train_model(name: str, config: config_lib.Config, context: RunContext) -> RunResult:
  """Train with optimizer `name` up to `config.steps`, saving the state at every evaluation.

  With `config.resume`, the run continues from the newest checkpoint of `name`
  there, if there is one. It stops early after step `config.stop_after` (when
  above 0) or after the step during which SIGTERM arrived, each time saving
  that step first.
  """
  import jax
  from jax.sharding import NamedSharding, PartitionSpec
  from tqdm import tqdm

  mesh = context.mesh
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharding = NamedSharding(mesh, PartitionSpec('data'))
  optimizer = make_optimizer(name, config, mesh)
  train_step = make_train_step(context.graphdef, optimizer, config.seed, mesh)
  params = jax.device_put(context.init_params, replicated)
  opt_state = jax.jit(optimizer.init, out_shardings=replicated)(params)
  tokens_per_step = config.batch_size * config.block_size

  def evaluate(params, step):
    return estimate_losses(
        context.eval_loss, params, context.corpus, config, step, batch_sharding=batch_sharding
    )

  history, stats, step_ms, start_step = [], [], [], 0
  writer_dir = checkpointing.train_state_dir(context.out_dir, name)
  resume_dir = None
  if config.resume is not None:
    resume_dir = checkpointing.train_state_dir(Path(config.resume), name)
  if resume_dir is not None and checkpointing.latest_step(resume_dir) is not None:
    saved = checkpointing.restore_run(resume_dir, params, opt_state)
    params, opt_state, start_step = saved.params, saved.opt_state, saved.step
    history = [tuple(entry) for entry in saved.meta['history']]
    stats = [tuple(entry) for entry in saved.meta['stats']]
    step_ms = list(saved.meta['step_ms'])
    print(f'{name}: resumed at step {start_step} from {resume_dir}', flush=True)
  in_place = resume_dir is not None and resume_dir.resolve() == writer_dir.resolve()
  writer = checkpointing.TrainStateWriter(writer_dir, keep_existing=in_place)

  def save(step):
    meta = {
        'step': step,
        'config': dataclasses.asdict(config),
        'text_sha256': context.text_sha256,
        'history': history,
        'stats': stats,
        'step_ms': step_ms,
    }
    writer.save(step, params, opt_state, meta)

  if start_step == 0:
    history.append((0, *evaluate(params, 0)))
  else:
    # Copies the restored step into --out when it differs from --resume.
    save(start_step)

  stop_at = config.stop_after if config.stop_after else config.steps
  stop_at = max(stop_at, start_step)
  last_step = start_step
  progress = tqdm(
      range(start_step + 1, stop_at + 1),
      desc=name,
      unit='step',
      dynamic_ncols=True,
      initial=start_step,
      total=config.steps,
  )
  for step in progress:
    x, y = place_batch(*training_batch(context.corpus, config, step), batch_sharding)
    start = time.perf_counter()
    params, opt_state, loss = train_step(params, opt_state, x, y, step)
    loss = float(loss)  # waits for the step to finish, so the timing is complete
    step_ms.append((time.perf_counter() - start) * 1e3)
    progress.set_postfix(loss=f'{loss:.3f}', refresh=False)
    last_step = step

    if step % config.eval_interval == 0 or step == config.steps:
      train_loss, val_loss = evaluate(params, step)
      history.append((step, train_loss, val_loss))
      line = f'{name} step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}'
      if name == 'smi':
        kept_energy, blend = smi_means(opt_state)
        stats.append((step, kept_energy, blend))
        line += f', kept energy {kept_energy:.3f}, blend {blend:.3f}'
      recent_ms = statistics.median(step_ms[-config.eval_interval :])
      if len(step_ms) <= config.eval_interval:
        recent_ms = median_step_ms(step_ms)
      progress.write(
          f'{line}, {recent_ms:.1f} ms/step, {tokens_per_step / recent_ms * 1e3:,.0f} tokens/s'
      )
      save(step)
    if context.stop.signal_name is not None:
      save(step)
      break
  progress.close()
  if last_step < config.steps:
    save(last_step)
  writer.close()
  jax.block_until_ready(params)
  return RunResult(params=params, history=history, step_ms=step_ms, stats=stats, last_step=last_step)


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


def plot_smi_stats(stats: list, path: Path) -> None:
  """Plot SMI's mean kept-energy share and mean blend against step."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  figure, axes = plt.subplots(figsize=(7, 3.5))
  if stats:
    steps, kept_energy, blend = zip(*stats)
    axes.plot(steps, kept_energy, marker='.', label='kept energy (mean over leaves)')
    axes.plot(steps, blend, marker='.', label='blend (mean over leaves)')
  axes.set_xlabel('step')
  axes.set_ylim(0, 1.05)
  axes.set_title('SMI statistics at each evaluation')
  axes.grid(alpha=0.3)
  axes.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def summarize(run: RunResult, config: config_lib.Config, sample: str) -> dict:
  """Return the results.json entry of one run."""
  ms_per_step = median_step_ms(run.step_ms)
  val_loss = run.history[-1][2]
  summary = {
      'val_loss': val_loss,
      'best_val_loss': min(entry[2] for entry in run.history),
      'val_bpc': val_loss / math.log(2),
      'ms_per_step': ms_per_step,
      'tokens_per_s': config.batch_size * config.block_size / ms_per_step * 1e3,
      'history': [list(entry) for entry in run.history],
      'sample': sample,
  }
  if run.stats:
    summary['stats'] = [list(entry) for entry in run.stats]
  return summary


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
  """Result of `run_experiment`: the results.json content and the final parameters."""

  results: dict
  params: dict[str, dict]  # optimizer name -> final parameters


def run_experiment(
    config: config_lib.Config,
    text: str,
    corpus: data_lib.Corpus,
    out_dir: Path,
    mesh=None,
    stop: StopRequest | None = None,
) -> Experiment:
  """Train with each optimizer in `config.optimizers` and write all outputs to `out_dir`.

  Args:
    config: the experiment.
    text: the training text, for its statistics and its checksum.
    corpus: the encoded `text`.
    out_dir: an existing, writable directory.
    mesh: the device mesh (`make_mesh`); None builds one of `config.devices`.
    stop: set by a SIGTERM handler; None never stops early.

  Returns:
    The results.json content and the final parameters. When --stop-after or
    a stop request ended the runs early, `results` is empty and only the
    checkpoints are written.
  """
  import jax
  from flax import nnx

  import model as model_lib

  mesh = mesh if mesh is not None else make_mesh(config.devices)
  devices = list(mesh.devices.flat)
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

  context = RunContext(
      corpus=corpus,
      graphdef=graphdef,
      init_params=init_params,
      # One jitted evaluation serves every run, so it compiles once.
      eval_loss=make_eval_loss(graphdef),
      mesh=mesh,
      out_dir=out_dir,
      text_sha256=checkpointing.text_digest(text),
      stop=stop or StopRequest(),
  )
  finished = {}
  for name in config.optimizers:
    finished[name] = train_model(name, config, context)
    if context.stop.signal_name is not None or finished[name].last_step < config.steps:
      break
  final_params = {name: run.params for name, run in finished.items()}

  if context.stop.signal_name is not None:
    name, run = list(finished.items())[-1]
    print(
        f'train.py: stopped by {context.stop.signal_name} after step {run.last_step} of {name}, '
        f'which is saved in {checkpointing.train_state_dir(out_dir, name)}; '
        f'continue with: {resume_command(config, out_dir)}',
        file=sys.stderr,
        flush=True,
    )
    return Experiment(results={}, params=final_params)
  if len(finished) < len(config.optimizers) or any(
      run.last_step < config.steps for run in finished.values()
  ):
    # --stop-after: train the other optimizers up to the same step.
    for name in config.optimizers[len(finished) :]:
      finished[name] = train_model(name, config, context)
      final_params[name] = finished[name].params
    print(
        f'stopped after step {config.stop_after} as --stop-after asks; '
        f'continue with: {resume_command(config, out_dir)}',
        flush=True,
    )
    return Experiment(results={}, params=final_params)

  runs = {}
  for name, run in finished.items():
    sample = sample_text(graphdef, run.params, corpus.vocabulary, config)
    print(f'\n--- {name} sample ---\n{sample}\n', flush=True)
    (out_dir / 'samples').mkdir(exist_ok=True)
    (out_dir / 'samples' / f'{name}.txt').write_text(sample, encoding='utf-8')
    runs[name] = summarize(run, config, sample)

  plot_losses({name: run['history'] for name, run in runs.items()}, out_dir / 'loss.png')
  written = ['results.json', 'loss.png']
  if 'smi' in finished:
    plot_smi_stats(finished['smi'].stats, out_dir / 'smi_stats.png')
    written.append('smi_stats.png')
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
  print(f'wrote {", ".join(written)}, samples/ and checkpoints/ in {out_dir}')
  return Experiment(results=results, params=final_params)


def resume_command(config: config_lib.Config, out_dir: Path) -> str:
  """Return the command line that resumes this run: its non-default flags and --resume."""
  skipped = {'out', 'resume', 'stop_after'}
  parts = ['python', 'examples/char_lm/train.py']
  for field in dataclasses.fields(config_lib.Config):
    value = getattr(config, field.name)
    if field.name in skipped or value == field.default:
      continue
    parts += [config_lib.flag_name(field.name), shlex.quote(str(value))]
  return ' '.join(parts + ['--resume', shlex.quote(str(out_dir))])


def check_resume(config: config_lib.Config, text: str) -> None:
  """Check that --resume names a directory with a checkpoint written with compatible flags.

  Raises:
    ValueError: the directory is missing, contains no complete checkpoint of
      any optimizer in `config.optimizers`, or one was written with a
      different value of a flag outside `checkpointing.RESUMABLE_CHANGES`.
  """
  resume = Path(config.resume).expanduser()
  if not resume.exists():
    raise ValueError(f'--resume {config.resume}: directory not found')
  if not resume.is_dir():
    raise ValueError(f'--resume {config.resume}: not a directory')
  found = False
  for name in config.optimizers:
    directory = checkpointing.train_state_dir(resume, name)
    step = checkpointing.latest_step(directory)
    if step is None:
      continue
    found = True
    meta = checkpointing.read_meta(directory, step)
    try:
      checkpointing.check_compatible(
          meta['config'], meta['text_sha256'], config, checkpointing.text_digest(text)
      )
    except ValueError as error:
      raise ValueError(f'--resume {config.resume}: {error}') from None
  if not found:
    expected = checkpointing.train_state_dir(resume, '{' + ','.join(config.optimizers) + '}')
    raise ValueError(f'--resume {config.resume}: no complete checkpoint in {expected}')


def main(argv: list[str] | None = None) -> Experiment:
  """Run the command line; an invalid flag or input exits with status 2 and one line on stderr.

  SIGTERM stops training after the current step, saves that step and exits
  with status 143.
  """
  parser = config_lib.build_parser(prog='train.py')
  config = config_lib.parse_config(argv, parser=parser)
  try:
    text = load_text(config)
    corpus = data_lib.build_corpus(text, config.block_size)
    if config.resume is not None:
      check_resume(config, text)
    mesh = make_mesh(config.devices)
    out_dir = prepare_output_dir(config.out)
  except ValueError as error:
    parser.error(str(error))
  stop = StopRequest()
  stop.install()
  experiment = run_experiment(config, text, corpus, out_dir, mesh=mesh, stop=stop)
  if stop.signal_name is not None:
    sys.exit(128 + signal.SIGTERM)
  return experiment


if __name__ == '__main__':
  main()
