"""Parameter trees the benchmarks run on."""

import pathlib
import sys

import jax
import jax.numpy as jnp

_EXAMPLE_DIR = pathlib.Path(__file__).resolve().parent.parent / "examples" / "char_lm"


def gpt_params(n_layer: int, d_model: int, vocab: int, block: int) -> dict:
  """Returns a zero-filled GPT-2-shaped parameter tree (float32).

  Per layer: two LayerNorms, a fused QKV projection (d, 3d), an output
  projection (d, d) and a 4x MLP, each with a bias. With n_layer=6,
  d_model=384, vocab=65 and block=256 it has about 10.75M parameters.
  """

  def layer_norm():
    return {"scale": jnp.zeros((d_model,)), "bias": jnp.zeros((d_model,))}

  def dense(n_in, n_out):
    return {"kernel": jnp.zeros((n_in, n_out)), "bias": jnp.zeros((n_out,))}

  params = {
      "token_embedding": jnp.zeros((vocab, d_model)),
      "position_embedding": jnp.zeros((block, d_model)),
      "final_norm": layer_norm(),
  }
  for i in range(n_layer):
    params[f"block_{i}"] = {
        "norm_1": layer_norm(),
        "qkv": dense(d_model, 3 * d_model),
        "attention_out": dense(d_model, d_model),
        "norm_2": layer_norm(),
        "mlp_in": dense(d_model, 4 * d_model),
        "mlp_out": dense(4 * d_model, d_model),
    }
  return params


def example_model(vocab_size: int, seed: int = 0):
  """Returns the char-LM example's model (a Flax NNX module) at its default config."""
  if str(_EXAMPLE_DIR) not in sys.path:
    sys.path.insert(0, str(_EXAMPLE_DIR))
  import config as config_lib  # pylint: disable=import-outside-toplevel
  import model as model_lib  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  config = config_lib.Config()
  return model_lib.GPT(
      vocab_size,
      config.block_size,
      n_layer=config.n_layer,
      n_head=config.n_head,
      d_model=config.d_model,
      dropout=config.dropout,
      rngs=nnx.Rngs(seed),
  )


def example_model_params(vocab_size: int = 65) -> dict:
  """Returns the parameters of the char-LM example's model at its default config.

  The default corpus's vocabulary size changes only the embedding and output
  rows, so a fixed `vocab_size` replaces reading the corpus.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel

  params = nnx.state(example_model(vocab_size), nnx.Param)
  return jax.tree.map(jnp.asarray, nnx.to_pure_dict(params))
