"""Federation state sharded along each wide level's node axis (8 fake CPU devices).

A level with at least as many federations as devices keeps B, K, the server
optimizer state and the residual K split by rows over the devices (padded to a
multiple of the device count); the round computes the same thing as with the
state replicated, and XLA's memory analysis of the compiled round shows the
per-device state shrink with the device count.
"""
import math

import jax
import numpy as np
import pytest

from engine_helpers import POLICY, TOY_KEY_PATHS, assert_tree_close, make_batches, make_spec, to_device, toy_params
from engine_helpers import topo, tree2
from worldlm_jax import engine, parallel, strategies

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices, see conftest.py")


def wide(n_feds):
    """Root -> n_feds federations of 2 clients each, FedAdam at the federations (server state)."""
    spec = tree2([2] * n_feds, root_policy=dict(POLICY, client_lr=0.5, tau=0.5),
                 fed_policies=[{"server_optimizer": "adam", "server_lr": 0.1}] * n_feds)
    return topo(spec, slot_multiple=8)


def strategy(t, shard_state):
    return strategies.make_strategy(make_spec(t, strategies.worldlm_plan(2), key_paths=TOY_KEY_PATHS,
                                              client_optimizer="test_sgd", mesh=parallel.make_mesh(8),
                                              shard_state=shard_state))


def per_device_bytes(tree):
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("n_feds", [64, 60])  # 60: rows padded to 64
def test_sharded_state_equals_replicated(n_feds):
    t = wide(n_feds)
    results = {}
    for shard in (True, False):
        run = strategy(t, shard)
        state = run.init(toy_params())
        for r, b in enumerate(make_batches(t, 2, seed=3)):
            state, metrics = run.run_round(state, to_device(b), jax.random.PRNGKey(r))
        leaf_K = state.levels[1].K["blocks/0/w"]
        rows = parallel.padded_rows(n_feds, parallel.make_mesh(8)) if shard else n_feds
        assert leaf_K.shape[0] == rows
        assert (leaf_K.sharding.spec == parallel.P(parallel.AXIS)) == shard
        assert run.run_round._cache_size() == 1  # returned where it came from: no recompile
        results[shard] = jax.tree.map(np.asarray, (engine.unpad_state(run_spec(run, t, shard), state), metrics))
    # same sums, other reduction order (rows gathered across devices)
    assert_tree_close(results[True][0], results[False][0], atol=1e-5, rtol=1e-5)
    # (the residual attention weights are softmaxes of cosines between small deltas: about
    # 1e-4 absolute, as between 1 and 8 devices in test_engine)
    assert_tree_close(results[True][1], results[False][1], atol=3e-4, rtol=1e-4)
    K = results[True][0].levels[1].K["blocks/0/w"]
    assert not np.allclose(K[0], K[1])  # federations did diverge: rows did not mix up


def run_spec(run, t, shard):
    return make_spec(t, strategies.worldlm_plan(2), key_paths=TOY_KEY_PATHS, mesh=parallel.make_mesh(8),
                     shard_state=shard)


def test_per_device_state_memory_falls_with_the_device_count():
    t = wide(64)
    batch = to_device(make_batches(t, 1, seed=4)[0])
    batch = engine.RoundBatch(jax.device_put(batch.tokens, parallel.NamedSharding(
        parallel.make_mesh(8), parallel.P(*([None] * (batch.tokens.ndim - 4)), parallel.AXIS))),
        *(jax.device_put(x, parallel.replicated(parallel.make_mesh(8))) for x in batch[1:]))
    key = jax.device_put(jax.random.PRNGKey(0), parallel.replicated(parallel.make_mesh(8)))
    state_bytes = {}
    for shard in (True, False):
        run = strategy(t, shard)
        state = run.init(toy_params())
        memory = run.run_round.lower(state, batch, key).compile().memory_analysis()
        # XLA's per-device argument bytes, less the batch and key (placed alike in both)
        state_bytes[shard] = memory.argument_size_in_bytes - per_device_bytes((batch, key))
        assert state_bytes[shard] == pytest.approx(per_device_bytes(state), rel=0.05)
    assert state_bytes[True] <= state_bytes[False] / 4


def test_only_levels_holding_enough_bytes_are_sharded():
    import dataclasses
    t = wide(64)
    spec = run_spec(None, t, True)
    params = toy_params()
    level_bytes = [sum(x.nbytes for x in jax.tree.leaves(level)) for level in engine.init_state(
        dataclasses.replace(spec, mesh=None), params).levels]
    assert level_bytes[1] > level_bytes[0]  # 64 federations vs the root
    for min_bytes, want in ((0, {0, 1}), (level_bytes[1], {1}), (level_bytes[1] + 1, set())):
        chosen = engine.levels_worth_sharding(spec, params, min_bytes)
        assert {d for d in chosen if d < 2} == want
        state = engine.init_state(dataclasses.replace(spec, sharded_levels=chosen), params)
        # the root (1 node) never splits; the 64 federations split only when chosen
        assert state.levels[0].B["embed"].sharding.spec == parallel.P()
        assert (state.levels[1].B["embed"].sharding.spec == parallel.P(parallel.AXIS)) == (1 in want)
