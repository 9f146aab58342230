"""Decoder-only Transformer (GPT) for character-level language modelling, in Flax NNX.

Layout as in GPT-2: token plus learned position embeddings, pre-LayerNorm
blocks of causal multi-head self-attention and a 4x GELU MLP, a final
LayerNorm and a linear output head. The head is not tied to the token
embedding. Every parameter is a plain 2-D kernel or embedding, a 1-D bias or a
LayerNorm vector: the query, key and value projections form one
(d_model, 3 * d_model) kernel rather than a 3-D per-head array. Dropout acts on the embedding sum and
on the output of each residual branch; the attention weights get none, because
`jax.nn.dot_product_attention` has no dropout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

# GPT-2 initialisation: N(0, 0.02) weights, zero biases, and the projections
# that write into the residual stream scaled by 1 / sqrt(2 * n_layer).
_INIT_STD = 0.02


def _linear(
    in_features: int,
    out_features: int,
    *,
    std: float = _INIT_STD,
    use_bias: bool = True,
    rngs: nnx.Rngs,
):
  return nnx.Linear(
      in_features,
      out_features,
      use_bias=use_bias,
      kernel_init=nnx.initializers.normal(std),
      rngs=rngs,
  )


class CausalSelfAttention(nnx.Module):
  """Multi-head self-attention in which position t attends to positions <= t."""

  def __init__(
      self, d_model: int, n_head: int, dropout: float, residual_std: float, *, rngs: nnx.Rngs
  ):
    self.n_head = n_head
    self.qkv = _linear(d_model, 3 * d_model, rngs=rngs)
    self.proj = _linear(d_model, d_model, std=residual_std, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
    batch, length, d_model = x.shape
    head_shape = (batch, length, self.n_head, d_model // self.n_head)
    query, key, value = jnp.split(self.qkv(x), 3, axis=-1)
    attended = jax.nn.dot_product_attention(
        query.reshape(head_shape),
        key.reshape(head_shape),
        value.reshape(head_shape),
        is_causal=True,
    )
    out = self.proj(attended.reshape(batch, length, d_model))
    return self.dropout(out, deterministic=deterministic, rngs=rngs)


class MLP(nnx.Module):
  """Position-wise feed-forward layer: d_model -> 4 * d_model -> GELU -> d_model."""

  def __init__(self, d_model: int, dropout: float, residual_std: float, *, rngs: nnx.Rngs):
    self.fc = _linear(d_model, 4 * d_model, rngs=rngs)
    self.proj = _linear(4 * d_model, d_model, std=residual_std, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
    out = self.proj(jax.nn.gelu(self.fc(x)))
    return self.dropout(out, deterministic=deterministic, rngs=rngs)


class Block(nnx.Module):
  """Pre-LayerNorm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

  def __init__(
      self, d_model: int, n_head: int, dropout: float, residual_std: float, *, rngs: nnx.Rngs
  ):
    self.attn_norm = nnx.LayerNorm(d_model, rngs=rngs)
    self.attn = CausalSelfAttention(d_model, n_head, dropout, residual_std, rngs=rngs)
    self.mlp_norm = nnx.LayerNorm(d_model, rngs=rngs)
    self.mlp = MLP(d_model, dropout, residual_std, rngs=rngs)

  def __call__(self, x: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), deterministic=deterministic, rngs=rngs)
    return x + self.mlp(self.mlp_norm(x), deterministic=deterministic, rngs=rngs)


class GPT(nnx.Module):
  """GPT language model over a character vocabulary.

  Args:
    vocab_size: number of distinct tokens.
    block_size: maximum context length; the position embedding has this many rows.
    n_layer: number of Transformer blocks.
    n_head: attention heads per block; must divide `d_model`.
    d_model: width of the residual stream.
    dropout: dropout rate in [0, 1), active only when called with `deterministic=False`.
    rngs: random streams for parameter initialisation. Dropout keys come from the
      `rngs` passed at call time, so the model's state contains parameters only.
  """

  def __init__(
      self,
      vocab_size: int,
      block_size: int,
      *,
      n_layer: int,
      n_head: int,
      d_model: int,
      dropout: float,
      rngs: nnx.Rngs,
  ):
    if d_model % n_head:
      raise ValueError(f'n_head={n_head} must divide d_model={d_model}')
    self.block_size = block_size
    embed_init = nnx.initializers.normal(_INIT_STD)
    self.token_embed = nnx.Embed(vocab_size, d_model, embedding_init=embed_init, rngs=rngs)
    self.position_embed = nnx.Embed(block_size, d_model, embedding_init=embed_init, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)
    residual_std = _INIT_STD / (2 * n_layer) ** 0.5
    self.blocks = nnx.List(
        [Block(d_model, n_head, dropout, residual_std, rngs=rngs) for _ in range(n_layer)]
    )
    self.final_norm = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = _linear(d_model, vocab_size, use_bias=False, rngs=rngs)

  def __call__(
      self, tokens: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None
  ) -> jax.Array:
    """Return next-token logits of shape (batch, length, vocab_size) for int tokens (batch, length).

    `length` must be at most `block_size`. Pass `rngs` with a `dropout` stream
    when `deterministic` is False and the dropout rate is above 0.
    """
    length = tokens.shape[-1]
    x = self.token_embed(tokens) + self.position_embed(jnp.arange(length))
    x = self.dropout(x, deterministic=deterministic, rngs=rngs)
    for block in self.blocks:
      x = block(x, deterministic=deterministic, rngs=rngs)
    return self.head(self.final_norm(x))


def cross_entropy_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Return the mean cross-entropy in nats of `logits` (..., vocab) against int `targets` (...)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


@functools.partial(nnx.jit, static_argnames='num_tokens')
def generate(
    model: GPT, prompt: jax.Array, key: jax.Array, temperature: float | jax.Array, num_tokens: int
):
  """Sample `num_tokens` tokens after `prompt`, one at a time.

  The tokens live in a fixed-size buffer and a `lax.fori_loop` fills it, so the
  whole generation is one compiled program: it compiles once per prompt length
  and `num_tokens`, not once per token. Each step runs the model on the last
  `block_size` tokens; no key-value cache is kept.

  Args:
    model: the language model; run without dropout.
    prompt: int tokens of shape (prompt_length,), prompt_length >= 1.
    key: PRNG key; the same key gives the same sample.
    temperature: > 0; logits are divided by it before sampling.
    num_tokens: number of tokens to generate.

  Returns:
    int32 array of shape (num_tokens,) with the generated tokens only.
  """
  block_size = model.block_size
  prompt_length = prompt.shape[0]
  # Padding to at least block_size keeps every window slice in bounds.
  buffer_length = max(prompt_length + num_tokens, block_size)
  buffer = jnp.zeros((buffer_length,), jnp.int32).at[:prompt_length].set(prompt.astype(jnp.int32))

  def sample_next(position, buffer):
    start = jnp.maximum(position - block_size, 0)
    window = jax.lax.dynamic_slice(buffer, (start,), (block_size,))
    # Positions after position - 1 hold padding, which the causal mask hides.
    logits = model(window[None, :], deterministic=True)[0, position - 1 - start]
    token = jax.random.categorical(jax.random.fold_in(key, position), logits / temperature)
    return buffer.at[position].set(token.astype(jnp.int32))

  buffer = jax.lax.fori_loop(prompt_length, prompt_length + num_tokens, sample_next, buffer)
  return buffer[prompt_length : prompt_length + num_tokens]
