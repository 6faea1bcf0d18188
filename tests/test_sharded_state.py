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

from engine_helpers import (POLICY, STEPS, TOY_KEY_PATHS, assert_close_up_to_summation_order, change, make_batches,
                            make_spec, summation_order_excess, to_device, topo, toy_params, toy_summands, toy_updates,
                            tree2, ulp_perturbed, with_distinct_residuals)
from worldlm_jax import engine
from worldlm_jax.engine import parallel, strategies

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices, see conftest.py")


def wide(n_feds):
    """Root -> n_feds federations of 2 clients each, FedAdam at the federations (server state)."""
    spec = tree2([2] * n_feds, root_policy=dict(POLICY, client_lr=0.5, tau=0.5),
                 fed_policies=[{"server_optimizer": "adam", "server_lr": 0.1}] * n_feds)
    return topo(spec, slot_multiple=8)


def strategy(t, shard_state):
    return engine.make_strategy(make_spec(t, strategies.worldlm_plan(2), key_paths=TOY_KEY_PATHS,
                                              client_optimizer="test_sgd", mesh=parallel.make_mesh(8),
                                              shard_state=shard_state))


def per_device_bytes(tree):
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def run_rounds(run, state, batches):
    for r, b in enumerate(batches):
        state, metrics = run.run_round(state, to_device(b), jax.random.PRNGKey(r))
    return state, metrics


def host(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.mark.parametrize("n_feds", [64, 60])  # 60: rows padded to 64
def test_sharded_state_equals_replicated(n_feds):
    t = wide(n_feds)
    batches = make_batches(t, 2, seed=3)
    results = {}
    for shard in (True, False):
        run = strategy(t, shard)
        spec = run_spec(run, t, shard)
        # distinct residual rows: a well-conditioned round in which every residual row
        # matters (with_distinct_residuals says why a fresh state is neither)
        start = lambda params: with_distinct_residuals(run.init(params), 1, n_feds)
        state = start(toy_params())
        initial = host(engine.unpad_state(spec, state))  # (the round donates its input)
        state, metrics = run_rounds(run, state, batches)
        leaf_K = state.levels[1].K["blocks/0/w"]
        rows = parallel.padded_rows(n_feds, parallel.make_mesh(8)) if shard else n_feds
        assert leaf_K.shape[0] == rows
        assert (leaf_K.sharding.spec == parallel.P(parallel.AXIS)) == shard
        assert run.run_round._cache_size() == 1  # returned where it came from: no recompile
        results[shard] = host((engine.unpad_state(spec, state), metrics))
        if not shard:  # the same program on inputs one rounding away: its own noise (0.7 s)
            p_state, p_metrics = run_rounds(run, start(ulp_perturbed(toy_params())), batches)
            perturbed = host((engine.unpad_state(spec, p_state), p_metrics))
    (sharded, m_sharded), (replicated, m_replicated) = results[True], results[False]
    # Same sums, other reduction order (rows gathered across devices, other vector code per
    # device): equal up to float32 summation order (engine_helpers), 2 rounds of 2 local steps
    # over 2 clients and n_feds federations, plus ten times the noise that the residual
    # attention (a softmax over cosines of K deltas) and the federations' FedAdam make of one
    # rounding of the inputs. Measured here (AMD EPYC): the sharded run uses 0.11-0.13 of the
    # bound (state and metrics, 64 and 60 federations). A broken sharding does not come near
    # it: two federations' rows swapped (a wrong gather) exceed it 3e4 times, federation 9's
    # clients dropped 2e4 times (metrics; the Adam counts differ too), residual rows 0 and 9
    # swapped before round 2 4 times (state) and 13 times (metrics). From a fresh state instead
    # (every residual = the initial K) one ulp of input noise moves the federations' K by 5%
    # of their change in round 1: no tolerance could tell sharding from rounding there.
    n, n_updates = toy_summands(2, STEPS, children=2 + n_feds), toy_updates(2, STEPS, levels=2)
    state_bound = dict(values=jax.tree.map(np.abs, replicated), n_updates=n_updates,
                       sensitivity=change(perturbed[0], replicated))
    assert_close_up_to_summation_order(sharded, replicated, change(replicated, initial), n, **state_bound,
                                       err="state")
    metric_bound = dict(sensitivity=change(perturbed[1], m_replicated))
    assert_close_up_to_summation_order(m_sharded, m_replicated, jax.tree.map(np.abs, m_replicated), n,
                                       **metric_bound, err="metrics")
    # the bound is no blanket: federations 0 and 9 (on devices 0 and 1) swapped exceed it
    K = sharded.levels[1].K["blocks/0/w"]
    assert not np.allclose(K[0], K[9])  # federations did diverge: rows did not mix up
    swapped = sharded._replace(levels=(sharded.levels[0], jax.tree.map(
        lambda x: x[[9, *range(1, 9), 0, *range(10, n_feds)]] if x.ndim else x, sharded.levels[1])))
    assert summation_order_excess(swapped, replicated, change(replicated, initial), n, **state_bound)[0] > 100


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
