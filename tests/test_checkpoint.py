"""Saving SMI's optimizer state with Orbax and restoring it mid-run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import smi_optax


def _grads(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)


@pytest.mark.parametrize("ema_dtype", [None, "bfloat16"])
def test_restored_state_gives_identical_updates(tmp_path, ema_dtype):
  params = {"w": jnp.ones((64, 48)), "t": jnp.ones((4, 8, 33)), "b": jnp.ones((3,))}
  optimizer = optax.inject_hyperparams(smi_optax.smi_adamw)(
      learning_rate=1e-3, keep_fraction=0.4, ema_dtype=ema_dtype, min_size=16
  )
  update = jax.jit(optimizer.update)
  state = optimizer.init(params)
  for step in range(3):
    _, state = update(_grads(params, step), state, params)

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(
      tmp_path / "state", jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  )

  next_grads = _grads(params, 99)
  expected_updates, expected_state = update(next_grads, state, params)
  updates, new_state = update(next_grads, restored, params)
  for expected, actual in zip(jax.tree.leaves(expected_updates), jax.tree.leaves(updates)):
    np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))
  for expected, actual in zip(jax.tree.leaves(expected_state), jax.tree.leaves(new_state)):
    np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))


def test_restored_state_keeps_dtypes(tmp_path):
  params = {"w": jnp.ones((64, 48))}
  optimizer = smi_optax.smi(ema_dtype="bfloat16", min_size=16)
  state = optimizer.init(params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(
      tmp_path / "state", jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  )
  assert restored.spectral_ema["w"].dtype == jnp.bfloat16
  assert restored.count.dtype == jnp.int32
