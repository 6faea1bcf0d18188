"""Chunked client execution with streamed reductions, and what it buys: a round
whose working memory does not grow with the number of client slots."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_helpers import assert_close_up_to_summation_order, flat_tree, make_batches, make_spec, to_device, topo
from worldlm_jax import engine
from worldlm_jax.engine import parallel

N_SLOTS, N_FEDS = 16, 3


def chunk_fn(shared, parent_N, x_N):
    """Per slot: x * shared; sums: per federation, sum of x^2 (rows of 2 columns)."""
    out = x_N * shared
    sums = {"sq": jax.ops.segment_sum(jnp.square(x_N), parent_N, num_segments=N_FEDS)}
    return {"out": out}, sums


def inputs():
    rng = np.random.default_rng(0)
    parent = jnp.asarray(rng.integers(0, N_FEDS, N_SLOTS), jnp.int32)
    x = jnp.asarray(rng.normal(size=(N_SLOTS, 2)), jnp.float32)
    return jnp.float32(3.0), parent, x


@pytest.mark.parametrize("chunk", [0, 1, 3, 5, 16, 40])
def test_chunks_with_a_remainder_equal_one_vmap(chunk):
    """Any chunk size (dividing the slots or not, larger than them or 0) gives
    the same per-slot outputs and the same totals as all slots at once."""
    shared, parent, x = inputs()
    out, sums = jax.jit(parallel.map_reduce_clients(chunk_fn, None, chunk, n_shared=1))(shared, parent, x)
    np.testing.assert_allclose(out["out"], x * 3.0, rtol=1e-6)
    ref = np.zeros((N_FEDS, 2), np.float32)
    np.add.at(ref, np.asarray(parent), np.square(np.asarray(x)))
    # sums of N_SLOTS squares (no cancellation: sum|t| = the sum) in other orders
    assert_close_up_to_summation_order(sums["sq"], ref, ref, N_SLOTS)


@pytest.mark.parametrize("chunk", [0, 1, 2])
def test_sums_are_all_reduced_over_devices(chunk):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake CPU) devices: conftest sets XLA_FLAGS before JAX starts")
    shared, parent, x = inputs()
    mesh = parallel.make_mesh(8)
    one = jax.jit(parallel.map_reduce_clients(chunk_fn, None, chunk, n_shared=1))(shared, parent, x)
    eight = jax.jit(parallel.map_reduce_clients(chunk_fn, mesh, chunk, n_shared=1))(shared, parent, x)
    # all-reduced sums of N_SLOTS squares: equal up to float32 summation order
    assert_close_up_to_summation_order(eight, one, jax.tree.map(np.abs, one), N_SLOTS)


def test_map_clients_is_a_per_client_map():
    shared, parent, x = inputs()
    f = parallel.map_clients(lambda s, p, xi: xi * s + p, None, chunk=3, n_shared=1)
    np.testing.assert_allclose(jax.jit(f)(shared, parent, x), x * 3.0 + parent[:, None], rtol=1e-6, atol=1e-6)


# ---- memory: streamed aggregation ------------------------------------------------
WIDE = 256  # a 256 KiB weight matrix, so per-client copies would dominate the round's memory


def wide_params():
    return {"w": jnp.full((WIDE, WIDE), 0.01, jnp.float32), "embed": jnp.full((11, WIDE), 0.1, jnp.float32)}


def wide_loss(params, tokens_BxLp1):
    h = jnp.take(params["embed"], tokens_BxLp1 % 11, axis=0)  # (B, L+1, WIDE)
    return jnp.mean(jnp.square(h @ params["w"])), jnp.asarray(tokens_BxLp1.size, jnp.int32)


def round_temp_bytes(n_clients: int, chunk: int) -> int:
    t = topo(flat_tree(n_clients, local_steps=1, client_lr=0.1))
    strategy = engine.make_strategy(make_spec(t, loss_fn=wide_loss, chunk=chunk, client_optimizer="test_sgd"))
    batch = to_device(make_batches(t, 1, seed=0)[0])
    compiled = strategy.run_round.lower(strategy.init(wide_params()), batch, jax.random.PRNGKey(0)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_round_memory_does_not_grow_with_clients():
    """FedAvg with clients two at a time: each client's final parameters are
    summed into the federation's total inside its chunk, so going from 4 to 32
    clients must not add 28 model copies (~7 MiB here) of working memory."""
    model_bytes = sum(x.size * 4 for x in jax.tree.leaves(wide_params()))
    few, many = round_temp_bytes(4, chunk=2), round_temp_bytes(32, chunk=2)
    assert many - few < 2 * model_bytes, (few, many, model_bytes)
    # ...whereas all clients at once (vmap) holds them all: the measurement can see the difference
    assert round_temp_bytes(32, chunk=0) - many > 16 * model_bytes


def test_configure_cpu_bf16_matmuls_sets_the_flag_only_where_it_takes_effect(monkeypatch):
    import importlib.util

    from jax._src import xla_bridge

    from worldlm_jax import model
    flag = model.CPU_BF16_XLA_FLAG
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {flag}")
    assert parallel.configure_cpu_bf16_matmuls()  # already there
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    jax.devices()  # backends started: too late for XLA to read a new flag
    assert not parallel.configure_cpu_bf16_matmuls()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    monkeypatch.setenv("JAX_PLATFORMS", "")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "jax_cuda12_plugin" else real_find_spec(name, *a))
    assert not parallel.configure_cpu_bf16_matmuls()  # a GPU is reachable: its compiler needs folding
    assert flag not in os.environ["XLA_FLAGS"]
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert parallel.configure_cpu_bf16_matmuls()
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {flag}"
