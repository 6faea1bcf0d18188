"""Faults inside the round (dropout, stragglers, Byzantine clients) and the
robust aggregators that withstand them: each protection fails its test when
removed."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from engine_helpers import (LR, STEPS, assert_tree_close, assert_tree_equal, flat_tree, make_batches, make_spec, tree2,
                            run, toy_params, topo)
from worldlm_jax import engine
from worldlm_jax.engine import strategies
from worldlm_jax.plugins import aggregators

BASE = dict(local_steps=STEPS, client_lr=LR)


def strategy(tree_spec, weights=None):
    t = topo(tree_spec, weights=weights)
    return t, engine.make_strategy(make_spec(t, client_optimizer="test_sgd"))


@functools.cache
def _fedavg(n):
    return strategy(flat_tree(n, **BASE))[1]


def client_deltas(n, batches):
    """Each client's honest backbone update: FedAvg rounds in which only that
    client has weight (one compiled round for all of them)."""
    deltas = []
    for c in range(n):
        alone = [b._replace(slot_weight=np.where(b.slot_client == c, b.slot_weight, 0.0).astype(np.float32))
                 for b in batches]
        deltas.append(root_delta(run(_fedavg(n), toy_params(), alone)[0]))
    return deltas


def root_delta(state):
    return jax.tree.map(lambda b, p: b[0] - p, state.levels[0].B, toy_params())


# ---- dropout and stragglers ---------------------------------------------------------
def test_no_dropout_changes_nothing():
    t, plain = topo(flat_tree(3, **BASE)), _fedavg(3)
    _, zero = strategy(flat_tree(3, dropout=0.0, stragglers=0.0, attackers=0, **BASE))
    batches = make_batches(t, 2)
    assert_tree_equal(run(plain, toy_params(), batches)[0], run(zero, toy_params(), batches)[0])


def test_full_dropout_leaves_the_federation_unchanged_and_is_reported():
    t, s = strategy(flat_tree(3, dropout=1.0, **BASE))
    state, metrics = run(s, toy_params(), make_batches(t, 2))
    assert_tree_equal(state.levels[0].B, jax.tree.map(lambda x: x[None], toy_params()))
    assert all(m["dropped"] == 3 and m["level0/participants"][0] == 0 for m in metrics)


def test_partial_dropout_averages_over_those_who_report():
    t, s = strategy(flat_tree(4, dropout=0.5, **BASE))
    _, metrics = run(s, toy_params(), make_batches(t, 3))
    # who drops is the round key's draw: some round of three drops part of the federation
    assert any(0 < m["dropped"] < 4 for m in metrics)
    assert all(m["level0/participants"][0] == 4 - m["dropped"] for m in metrics)


def test_a_child_late_by_its_parents_deadline_is_left_out_as_if_it_were_not_in_the_tree():
    """EngineSpec.on_time (what the planned clock decides for `deadline_s`): F1 is
    late, so the root trains exactly as a tree of F0 alone on F0's data, F1 and its
    clients do not move, and the root counts F1 as late."""
    with_late = topo(tree2([2, 3], fed_policies=[BASE, BASE]))
    alone = topo(tree2([2], fed_policies=[BASE]))
    late_spec = dataclasses.replace(make_spec(with_late, client_optimizer="test_sgd"), on_time=(None, (True, False)))
    batches = make_batches(with_late, 2)
    f0_batches = [engine.RoundBatch(b.tokens[..., :2, :, :, :], b.slot_client[..., :2], b.slot_weight[..., :2])
                  for b in batches]
    state, metrics = run(engine.make_strategy(late_spec), toy_params(), batches)
    reference, _ = run(engine.make_strategy(make_spec(alone, client_optimizer="test_sgd")), toy_params(), f0_batches)
    assert_tree_equal(state.levels[0].B, reference.levels[0].B)
    assert_tree_equal(jax.tree.map(lambda x: x[:1], state.levels[1].B), reference.levels[1].B)
    assert_tree_equal(jax.tree.map(lambda x: x[1], state.levels[1].B), toy_params())
    assert all(m["level0/late"].tolist() == [1.0] and m["level0/participants"].tolist() == [1.0]
               and m["level1/rounds"].tolist() == [1.0, 0.0] for m in metrics)


def test_stragglers_take_fewer_steps():
    t, full = strategy(flat_tree(4, local_steps=4, client_lr=LR))
    _, slow = strategy(flat_tree(4, local_steps=4, client_lr=LR, stragglers=1.0))
    batches = make_batches(t, 1)
    _, m_full = run(full, toy_params(), batches)
    _, m_slow = run(slow, toy_params(), batches)
    assert m_slow[0]["stragglers"] == 4
    per_step = m_full[0]["tokens"] / 16
    assert 4 * per_step <= m_slow[0]["tokens"] < m_full[0]["tokens"]  # each took 1..4 of its 4 steps


# ---- attacks ----------------------------------------------------------------------
def test_a_sign_flipping_attacker_sends_its_negated_update():
    t, s = strategy(flat_tree(3, attack="sign_flip", attackers=1, **BASE))
    batches = make_batches(t, 1)
    d = client_deltas(3, batches)
    state, metrics = run(s, toy_params(), batches)
    expected = jax.tree.map(lambda a, b, c: (-a + b + c) / 3, *d)
    assert_tree_close(root_delta(state), expected, atol=1e-6)
    assert metrics[0]["attackers"] == 1


def test_attacker_fraction_rounds_up():
    t, s = strategy(flat_tree(4, attack="scale", attacker_fraction=0.3, **BASE))
    _, metrics = run(s, toy_params(), make_batches(t, 1))
    assert metrics[0]["attackers"] == 2  # ceil(0.3 * 4)


@pytest.mark.parametrize("attack", ["scale", "noise", "constant", "sign_flip"])
def test_the_median_keeps_one_attacker_of_five_inside_the_honest_range(attack):
    args = {"scale": {"factor": 1e4}, "noise": {"std": 10.0}, "constant": {"value": 5.0},
            "sign_flip": {"scale": 1e3}}[attack]
    t, s = strategy(flat_tree(5, attack=attack, attackers=1, attack_args=args, aggregator="median", **BASE))
    batches = make_batches(t, 1)
    honest = client_deltas(5, batches)[1:]
    state, _ = run(s, toy_params(), batches)
    lo = jax.tree.map(lambda *d: np.min(np.stack(d), 0), *honest)
    hi = jax.tree.map(lambda *d: np.max(np.stack(d), 0), *honest)
    for x, a, b in zip(jax.tree.leaves(root_delta(state)), jax.tree.leaves(lo), jax.tree.leaves(hi)):
        assert np.all(x >= a - 1e-6) and np.all(x <= b + 1e-6)


def test_a_nan_attacker_cannot_poison_multi_krum_or_attention():
    """Issue 20's CLI case in miniature (the tiny preset with 4 clients per
    language, multi_krum with byzantine 1, one NaN attacker, 3 rounds ended
    with perplexity nan everywhere): WorldLM on two federations of 4 clients,
    multi_krum at every level, key layers by attention. The engine gives a NaN
    update weight 0 but keeps its row among the stacked updates, which the
    rules must select away: every federation's state stays finite and equals
    a run in which the attackers did not take part at all."""
    from engine_helpers import TOY_KEY_PATHS
    policy = dict(aggregator="multi_krum", aggregator_args={"byzantine": 1.0}, attack="nan", attackers=1, **BASE)
    t = topo(tree2([4, 4], root_policy=policy))
    s = engine.make_strategy(make_spec(t, strategies.worldlm_plan(2), key_paths=TOY_KEY_PATHS,
                                           client_optimizer="test_sgd"))
    batches = make_batches(t, 3)
    state, metrics = run(s, toy_params(), batches)
    assert all(m["attackers"] == 2 for m in metrics)
    first = [np.flatnonzero(t.client_parent == leaf)[0] for leaf in range(t.leaf.size)]  # attackers: rank 0
    absent = [b._replace(slot_weight=np.where(np.isin(b.slot_client, first), 0.0, b.slot_weight).astype(np.float32))
              for b in batches]
    reference, _ = run(s, toy_params(), absent)
    for d, (lvl, ref) in enumerate(zip(state.levels, reference.levels)):
        for part in ("B", "K"):
            assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(getattr(lvl, part))), f"level {d} {part}"
        # the same program on the same numbers: the attackers' rows are masked to 0 either way
        assert_tree_equal((lvl.B, lvl.K), (ref.B, ref.K), err=f"level {d}")


# ---- robust aggregators: properties --------------------------------------------------
ROBUST = ["median", "trimmed_mean", "multi_krum", "geometric_median"]
ARGS = {"median": {}, "trimmed_mean": {"trim": 0.25}, "multi_krum": {"byzantine": 1.0}, "geometric_median": {}}


@functools.cache
def _jitted(name, n_parents):
    rule = aggregators.get(name).combine
    return jax.jit(lambda rows, weight, parent, args: rule({"w": rows}, weight, parent, n_parents, args)["w"])


def combine(name, rows, weight, parent, n_parents=1):
    """The rule on one leaf of rows, compiled once per (rule, row count)."""
    args = {a: jnp.full((n_parents,), v, jnp.float32) for a, v in ARGS[name].items()}
    return np.asarray(_jitted(name, n_parents)(jnp.asarray(rows), jnp.asarray(weight, jnp.float32),
                                               jnp.asarray(parent, jnp.int32), args))


updates = st.integers(5, 8).flatmap(lambda n: st.lists(
    st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=3, max_size=3), min_size=n, max_size=n))


@pytest.mark.parametrize("name", ROBUST)
@settings(max_examples=20, deadline=None, derandomize=True)  # the same examples in every CI run
@given(rows=updates, seed=st.integers(0, 1000))
def test_robust_rules_are_permutation_and_padding_invariant(name, rows, seed):
    rows = np.asarray(rows, np.float32)
    n = len(rows)
    weight, parent = np.ones(n, np.float32), np.zeros(n, np.int32)
    out = combine(name, rows, weight, parent)
    # the geometric median is an iterative estimate (Weiszfeld converges slowly onto a
    # data point), so its order-dependent rounding shows at about 1e-3
    tol = 2e-3 if name == "geometric_median" else 1e-4
    perm = np.random.default_rng(seed).permutation(n)
    np.testing.assert_allclose(combine(name, rows[perm], weight, parent), out, rtol=tol, atol=tol)
    for pad in (1e6, np.nan, np.inf):  # absent children may hold anything: a far value, a diverged client's NaN
        padded = np.concatenate([rows, np.full((2, 3), pad, np.float32)])
        np.testing.assert_allclose(combine(name, padded, np.r_[weight, 0, 0], np.r_[parent, 0, 0]), out,
                                   rtol=tol, atol=tol, err_msg=f"padding {pad}")


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "multi_krum"])
@settings(max_examples=20, deadline=None, derandomize=True)  # the same examples in every CI run
@given(rows=updates, attack=st.floats(-1e6, 1e6, allow_nan=False, width=32))
def test_one_attacker_cannot_leave_the_honest_coordinate_range(name, rows, attack):
    """Below each rule's breakdown point (here: 1 attacker of 5-8 children; trim
    0.25 and byzantine 1 tolerate it) the result stays inside the honest range."""
    honest = np.asarray(rows, np.float32)
    rows = np.concatenate([honest, np.full((1, 3), attack, np.float32)])
    out = combine(name, rows, np.ones(len(rows), np.float32), np.zeros(len(rows), np.int32))[0]
    assert np.all(out >= honest.min(0) - 1e-4) and np.all(out <= honest.max(0) + 1e-4)


@settings(max_examples=20, deadline=None, derandomize=True)  # the same examples in every CI run
@given(rows=updates, attack=st.floats(1e3, 1e6, width=32))
def test_the_geometric_median_stays_near_the_honest_points(rows, attack):
    """The geometric median is not bounded per coordinate, but one far attacker
    moves it at most on the order of the honest spread."""
    honest = np.asarray(rows, np.float32)
    rows = np.concatenate([honest, np.full((1, 3), attack, np.float32)])
    out = combine("geometric_median", rows, np.ones(len(rows), np.float32), np.zeros(len(rows), np.int32))[0]
    spread = np.max(np.linalg.norm(honest - honest.mean(0), axis=1)) + 1e-3
    assert np.linalg.norm(out - honest.mean(0)) <= 3 * spread


def test_multi_krum_without_attackers_tolerated_is_the_mean():
    rows = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    args = {"byzantine": jnp.zeros(1)}
    out = aggregators.get("multi_krum").combine({"w": jnp.asarray(rows)}, jnp.ones(6), jnp.zeros(6, jnp.int32), 1, args)
    np.testing.assert_allclose(np.asarray(out["w"])[0], rows.mean(0), rtol=1e-5, atol=1e-6)


# ---- key layers: one attacker cannot take a federation's K ------------------------------
@functools.cache
def _k_runs():
    """K's update at a 5-client federation: clean, and with client 0 sending its
    K delta 100x, under plain and robust attention."""
    from engine_helpers import TOY_KEY_PATHS
    norms = {}
    for name, policy in (("clean", {}), ("attention", {"attack": "key_takeover", "attackers": 1}),
                         ("robust", {"attack": "key_takeover", "attackers": 1, "k_agg": "robust_attention"})):
        t = topo(flat_tree(5, tau=0.1, **BASE, **policy))
        spec = make_spec(t, strategies.worldlm_plan(1, residuals="none", use_parent=False),
                         key_paths=TOY_KEY_PATHS, client_optimizer="test_sgd")
        state, _ = run(engine.make_strategy(spec), toy_params(), make_batches(t, 1))
        moved = [np.asarray(state.levels[0].K[p][0]) - np.asarray(toy_params()[p]) for p in sorted(TOY_KEY_PATHS)]
        norms[name] = float(np.sqrt(sum(np.sum(m ** 2) for m in moved)))
    return norms


def test_a_key_layer_takeover_moves_plain_attention_far():
    norms = _k_runs()
    assert norms["attention"] > 10 * norms["clean"]


def test_robust_attention_bounds_the_attackers_key_layers():
    """Each child's K delta is bounded by its siblings' median norm, so the
    federation's K moves no further than an honest client's update would."""
    norms = _k_runs()
    assert norms["robust"] < 2 * norms["clean"]


def test_a_robust_rule_at_a_federation_of_federations_combines_its_child_federations():
    """Any level: the root's median over its three federations' backbone updates."""
    spec = tree2([2, 2, 2], root_policy=dict(aggregator="median", **BASE),
                 fed_policies=[{"aggregator": "mean"}] * 3)
    t = topo(spec)
    s = engine.make_strategy(make_spec(t, client_optimizer="test_sgd"))
    before = jax.tree.map(lambda x: np.asarray(x)[None], toy_params())
    # the federations' own updates this round: a HierFAVG round's level-1 B (root unchanged while they run)
    plain = engine.make_strategy(make_spec(topo(tree2([2, 2, 2], root_policy=BASE)), client_optimizer="test_sgd"))
    batches = make_batches(t, 1)
    fed_B = run(plain, toy_params(), batches)[0].levels[1].B
    expected = jax.tree.map(lambda f, b: np.median(f - b, axis=0, keepdims=True), fed_B, before)
    state, _ = run(s, toy_params(), batches)
    assert_tree_close(jax.tree.map(lambda x, b: x - b, state.levels[0].B, before), expected, atol=1e-6)
