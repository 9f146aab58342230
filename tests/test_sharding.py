"""SMI on a mesh of 8 host CPU devices: global and shard-local filtering.

JAX fixes the number of host devices when it first initializes, so each
check runs in a subprocess with ``--xla_force_host_platform_device_count=8``
and reports its findings as JSON on its last output line.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

_PRELUDE = textwrap.dedent(
    """
    import json
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import smi_optax

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    rng = np.random.default_rng(0)

    def normal(shape):
      return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def put(tree, specs):
      return jax.device_put(tree, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))

    def specs_of(tree):
      return jax.tree.map(lambda x: x.sharding.spec, tree)

    def max_abs_diff(a, b):
      return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    """
)


def _run(body: str) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  completed = subprocess.run(
      [sys.executable, "-c", _PRELUDE + textwrap.dedent(body)],
      capture_output=True,
      text=True,
      env=env,
      timeout=300,
  )
  assert completed.returncode == 0, completed.stderr[-3000:]
  return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def global_mode() -> dict:
  return _run(
      """
      params = {"w": normal((256, 512)), "v": normal((4096,)), "t": normal((8, 16, 64)), "b": normal((8,))}
      specs = {"w": P("data", "model"), "v": P("data"), "t": P(None, "data", "model"), "b": P()}
      sharded_params = put(params, specs)
      grads = [jax.tree.map(lambda p: normal(p.shape), params) for _ in range(3)]

      tx = smi_optax.smi_adamw(1e-2, mesh=mesh, param_specs=specs, min_size=64)
      state = jax.jit(tx.init)(sharded_params)
      initial_specs = specs_of(state[0].spectral_ema)
      update = jax.jit(tx.update)
      for g in grads:
        updates, state = update(put(g, specs), state, sharded_params)

      plain = smi_optax.smi_adamw(1e-2, min_size=64)
      plain_state = plain.init(params)
      for g in grads:
        plain_updates, plain_state = plain.update(g, plain_state, params)

      print(json.dumps({
          "initial_specs": {k: str(v) for k, v in initial_specs.items()},
          "w_ema_rows_sharded": state[0].spectral_ema["w"].sharding.is_equivalent_to(
              NamedSharding(mesh, P("data", None)), 2),
          "final_specs": {k: str(v) for k, v in specs_of(state[0].spectral_ema).items()},
          "update_specs": {k: str(v) for k, v in specs_of(updates).items()},
          "param_specs": {k: str(v) for k, v in specs.items()},
          "update_diff": max_abs_diff(updates, plain_updates),
          "ema_diff": max_abs_diff(state[0].spectral_ema, plain_state[0].spectral_ema),
      }))
      """
  )


def test_global_ema_sharding_kept(global_mode):
  assert global_mode["final_specs"] == global_mode["initial_specs"]


def test_global_ema_follows_leading_axis(global_mode):
  assert global_mode["w_ema_rows_sharded"]


def test_global_updates_sharded_like_params(global_mode):
  assert global_mode["update_specs"] == global_mode["param_specs"]


def test_global_matches_unsharded_update(global_mode):
  assert global_mode["update_diff"] < 1e-6


def test_global_matches_unsharded_ema(global_mode):
  assert global_mode["ema_diff"] < 1e-4


@pytest.fixture(scope="module")
def shard_local_mode() -> dict:
  return _run(
      """
      # Every (data, model) block of w holds the same 64 x 256 tile, so the
      # leaf's histogram is 8 copies of one block's and the shard-local
      # threshold equals the single block's. Each block's update must then
      # equal smi on that block alone.
      tile = normal((64, 256))
      w = jnp.tile(tile, (4, 2))
      v = normal((4096,))
      params = {"w": w, "v": v}
      specs = {"w": P("data", "model"), "v": P()}
      tx = smi_optax.smi(keep_fraction=0.5, blend=1.0, mesh=mesh, param_specs=specs,
                         shard_local=True, min_size=64)
      sharded = put(params, specs)
      state = jax.jit(tx.init)(sharded)
      initial = specs_of(state.spectral_ema)
      shapes = jax.tree.map(lambda x: list(x.shape), state.spectral_ema)
      update = jax.jit(tx.update)
      updates, state = update(sharded, state)
      updates, state = update(sharded, state)

      block_tx = smi_optax.smi(keep_fraction=0.5, blend=1.0, min_size=64)
      block_state = block_tx.init(tile)
      block_update, block_state = block_tx.update(tile, block_state)
      block_update, block_state = block_tx.update(tile, block_state)
      blocks = np.asarray(updates["w"]).reshape(4, 64, 2, 256).transpose(0, 2, 1, 3)
      block_diff = float(np.max(np.abs(blocks - np.asarray(block_update)[None, None])))

      global_tx = smi_optax.smi(keep_fraction=0.5, blend=1.0, min_size=64)
      global_state = global_tx.init(params)
      global_updates, global_state = global_tx.update(params, global_state)
      global_updates, global_state = global_tx.update(params, global_state)

      print(json.dumps({
          "initial_specs": {k: str(v) for k, v in initial.items()},
          "final_specs": {k: str(v) for k, v in specs_of(state.spectral_ema).items()},
          "shapes": shapes,
          "block_diff": block_diff,
          "replicated_leaf_diff": float(jnp.max(jnp.abs(updates["v"] - global_updates["v"]))),
          "global_vs_local_w": float(jnp.max(jnp.abs(updates["w"] - global_updates["w"]))),
      }))
      """
  )


def test_shard_local_ema_sharding_kept(shard_local_mode):
  assert shard_local_mode["final_specs"] == shard_local_mode["initial_specs"]


def test_shard_local_ema_shape_stacks_blocks(shard_local_mode):
  # Each block is 64 x 256, so its half spectrum is 64 x 129; 4 x 2 blocks.
  assert shard_local_mode["shapes"]["w"] == [256, 2 * 129]


def test_shard_local_block_equals_single_block(shard_local_mode):
  assert shard_local_mode["block_diff"] < 1e-5


def test_shard_local_replicated_leaf_is_global(shard_local_mode):
  assert shard_local_mode["replicated_leaf_diff"] == 0.0


def test_shard_local_differs_from_global(shard_local_mode):
  # The block spectra are not the leaf's spectrum; the modes must differ.
  assert shard_local_mode["global_vs_local_w"] > 1e-3


def test_shard_local_needs_mesh():
  import smi_optax  # pylint: disable=import-outside-toplevel

  with pytest.raises(ValueError, match="shard_local=True needs a mesh"):
    smi_optax.smi(shard_local=True)


def test_mesh_needs_param_specs():
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import smi_optax  # pylint: disable=import-outside-toplevel

  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  with pytest.raises(ValueError, match="param_specs is required"):
    smi_optax.smi(mesh=mesh)
