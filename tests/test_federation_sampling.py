"""Federations of federations sample their child federations per round, each by
its own rule (`federations_per_round`, `sampling`): the draw, the engine's
masking of unsampled federations, and the privacy ledger's sampling rate."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_helpers import POLICY, assert_tree_close, assert_tree_equal, make_batches, make_spec, run, toy_params, topo, tree2
from worldlm_jax import engine
from worldlm_jax.engine import strategies
from worldlm_jax.privacy import ledger as dp_ledger


def test_fixed_sampling_draws_k_of_each_nodes_children_uniformly():
    parent = jnp.asarray([0, 0, 0, 0, 1, 1, 2])
    k, n = jnp.asarray([2, 5, 1]), np.asarray([4, 2, 1])
    draws = np.stack([np.asarray(engine.sample_children(jax.random.PRNGKey(i), parent, k, jnp.zeros(3, bool), n))
                      for i in range(400)])
    assert np.all(draws[:, :4].sum(1) == 2) and np.all(draws[:, 4:])  # k >= n: all take part
    np.testing.assert_allclose(draws[:, :4].mean(0), 0.5, atol=0.08)  # each child equally likely


def test_poisson_sampling_takes_each_child_with_probability_k_over_n():
    parent = jnp.zeros(8, jnp.int32)
    draws = np.stack([np.asarray(engine.sample_children(jax.random.PRNGKey(i), parent, jnp.asarray([2]),
                                                        jnp.asarray([True]), np.asarray([8]))) for i in range(1000)])
    np.testing.assert_allclose(draws.mean(), 2 / 8, atol=0.02)
    assert len(set(draws.sum(1))) > 3  # the count varies (it is not a fixed-size draw)


def hier_run(k, seed=3, chunk=0):
    policy = dict(POLICY, federations_per_round=k)
    t = topo(tree2([2, 2, 2, 2], root_policy=policy), weights=[1, 2, 3, 1, 2, 1, 1, 3])
    strategy = engine.make_strategy(make_spec(t, strategies.averaging_plan(2), client_optimizer="test_sgd",
                                                            chunk=chunk))
    return t, strategy, make_batches(t, 4, seed=seed)


@pytest.mark.parametrize("chunk", [0, 2])  # 2: the unsampled federations' chunks are skipped
def test_unsampled_federations_neither_train_nor_count(chunk):
    t, strategy, batches = hier_run(2, chunk=chunk)
    state = strategy.init(toy_params())
    chosen = set()
    for r, b in enumerate(batches):
        before = jax.tree.map(np.asarray, state.levels[1].B)
        state, m = strategy.run_round(state, jax.tree.map(jnp.asarray, b), jax.random.PRNGKey(0))
        ran = np.asarray(m["level1/rounds"]) > 0
        assert ran.sum() == 2 and np.asarray(m["level0/participants"])[0] == 2
        after = jax.tree.map(np.asarray, state.levels[1].B)
        for f in range(4):  # only the sampled federations' models moved
            moved = any(not np.array_equal(before[k][f], after[k][f]) for k in before)
            assert moved == ran[f], (r, f)
        np.testing.assert_array_equal(np.asarray(m["train_clients"]), 2 * ran)  # their clients sat out
        chosen.add(tuple(np.flatnonzero(ran)))
    assert len(chosen) > 1  # a new draw every round


def test_sampling_all_children_equals_no_sampling():
    _, every, batches = hier_run(4)
    _, unset, _ = hier_run(None)
    assert_tree_equal(run(every, toy_params(), batches)[0], run(unset, toy_params(), batches)[0])


def test_ledger_uses_the_federations_sampling_rate():
    t = topo(tree2([1, 1, 1, 1], root_policy={"federations_per_round": 1, "sampling": "poisson"}))
    assert dp_ledger.sampling_of(t, 0, 0) == ("poisson", 0.25, 4)
    t = topo(tree2([1, 1, 1, 1], root_policy={"federations_per_round": 2}))
    assert dp_ledger.sampling_of(t, 0, 0) == ("fixed", 0.5, 4)
    assert dp_ledger.sampling_of(topo(tree2([1, 1])), 0, 0) == ("full", 1.0, 2)


def test_skipping_the_unsampled_chunks_equals_masking_their_work():
    _, masked, batches = hier_run(2, chunk=0)
    _, skipped, _ = hier_run(2, chunk=2)
    assert_tree_close(run(masked, toy_params(), batches)[0], run(skipped, toy_params(), batches)[0],
                      atol=1e-6, rtol=1e-5)
