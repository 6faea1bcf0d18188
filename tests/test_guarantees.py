"""Guarantees that hold on every path: every random draw of a round has its own
key, a noised DP release runs at every active round (an empty sum included)
with exactly the noise the accountant assumes, a DP federation whose K is its
own keeps it, a part that is not an update cannot scale another's clip away,
and a clients_per_round that `full` sampling would ignore is refused."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from worldlm_jax import engine
from worldlm_jax.engine import round as engine_round
from worldlm_jax.privacy import ledger as dp_ledger, mechanism as privacy
from worldlm_jax.tree.policy import TopologyError
from worldlm_jax.tree.topology import build_topology

from engine_helpers import strategy_plan
from engine_helpers import TOY_KEY_PATHS, make_spec, toy_params

# Leaves the toy loss never reads: they make the released tree long (a collision
# of a per-leaf noise key with another draw shows) and give the noise many
# coordinates to be measured on (their update is exactly the release).
PAD = {f"pad/{i}": jnp.zeros((2500,), jnp.float32) for i in range(8)}
Z, CLIP = 1.5, 0.4


def params():
    return {**toy_params(), **PAD}


def tree(leaf_policy=None, root_policy=None, clients=3):
    return {"name": "root", "policy": {"local_steps": 2, "client_lr": 0.05, **(root_policy or {})},
            "children": [{"name": f"F{i}", "clients": clients, "sources": ["s"],
                          "policy": dict(leaf_policy or {})} for i in range(2)]}


def one_round(spec, topology, weight=None, key=0, before_round=lambda: None):
    strategy = engine.make_strategy(spec)
    start, state = strategy.init(params()), strategy.init(params())
    shape = engine.batch_shape(topology, 2, 6)
    slot_client = np.broadcast_to(np.arange(topology.n_slots, dtype=np.int32), shape[:-3])
    weight = np.ones(slot_client.shape, np.float32) if weight is None else np.broadcast_to(weight, slot_client.shape)
    batch = engine.RoundBatch(jnp.asarray(np.random.default_rng(0).integers(0, 10, shape), jnp.int32),
                              jnp.asarray(slot_client), jnp.asarray(weight, jnp.float32))
    round_key = jax.random.PRNGKey(key)
    before_round()
    return start, *strategy.run_round(state, batch, round_key)


def worldlm_spec(tree_spec, **plan_kw):
    topology = build_topology(tree_spec)
    plan = strategy_plan("worldlm", topology.depth, **plan_kw)
    return topology, make_spec(topology, plan, key_paths=TOY_KEY_PATHS)


def test_no_two_random_draws_of_a_round_share_a_key(monkeypatch):
    """Every draw (DP noise per leaf, the adaptive clip's count, client and
    federation sampling, faults, attacks) at every level records its key; none
    repeats. With `fold_in(key, 7)` for the count next to `fold_in(key, i)` per
    leaf, leaf 7's noise and the count's were the same numbers."""
    seen, recording = [], []  # recording: on once the round runs (not while the model is initialised)

    def record(k):
        if recording:
            seen.append(tuple(np.asarray(k).ravel().tolist()))

    def recorded(draw):
        def wrapped(key, *args, **kwargs):
            jax.debug.callback(record, key)
            return draw(key, *args, **kwargs)
        return wrapped

    for name in ("normal", "uniform", "bernoulli", "choice", "permutation"):
        monkeypatch.setattr(jax.random, name, recorded(getattr(jax.random, name)))
    dp = {"dp_noise_multiplier": Z, "dp_clip": CLIP, "dp_adaptive_clip": True}
    faults = {"dropout": 0.3, "stragglers": 0.5, "attack": "noise", "attackers": 1}
    topology, spec = worldlm_spec(tree({**dp, **faults}, {**dp, "federations_per_round": 1, "sampling": "poisson"}),
                                  residuals="none")
    _, state, _ = one_round(spec, topology, before_round=lambda: recording.append(True))
    jax.block_until_ready(state)
    assert len(seen) >= 2 * (len(params()) + 1) + 4  # both DP levels' leaves and counts, sampling, faults
    repeated = {k for k in seen if seen.count(k) > 1}
    assert not repeated, f"{len(repeated)} keys drawn from more than once"


def test_a_noised_release_runs_with_no_participant_and_has_the_accounted_noise():
    """A DP federation whose children are all absent still releases: its update
    is the noise alone, N(0, (z clip / m)^2) per coordinate (m its expected
    participants), which the pad leaves measure. Skipping it would release
    "nobody took part" without noise; a wrong std (too small or too large) is
    not the mechanism the accountant analyses. Two-sided: the sample std of
    20,000 coordinates is within 4% of z clip / m (its standard error is 0.5%)."""
    dp = {"dp_noise_multiplier": Z, "dp_clip": CLIP}
    topology, spec = worldlm_spec(tree(dp), residuals="none")
    absent = np.where(np.asarray(topology.slot_parent) == 0, 0.0, 1.0)  # F0 hears from nobody
    start, state, metrics = one_round(spec, topology, absent)
    moved = np.concatenate([np.asarray(state.levels[1].B[p][0] - start.levels[1].B[p][0]).ravel() for p in PAD])
    expected_std = Z * CLIP / 3  # three clients expected, none came; server SGD at lr 1
    assert abs(np.mean(moved)) < 4 * expected_std / np.sqrt(moved.size)
    assert abs(np.std(moved) / expected_std - 1) < 0.04
    assert np.asarray(metrics["level1/participants"])[0] == 0
    # F1 heard from its clients: its pad leaves move by noise of the same law
    moved_f1 = np.concatenate([np.asarray(state.levels[1].B[p][1] - start.levels[1].B[p][1]).ravel() for p in PAD])
    assert abs(np.std(moved_f1) / expected_std - 1) < 0.04


def test_a_dp_federation_whose_key_layers_are_local_keeps_them():
    """k_agg local: the federation's K is its own; under DP its noised K release
    must not move it (nor take clip budget from B)."""
    dp = {"dp_noise_multiplier": Z, "dp_clip": CLIP, "k_agg": "local"}
    topology, spec = worldlm_spec(tree(dp), residuals="none")
    start, state, _ = one_round(spec, topology)
    for p in TOY_KEY_PATHS:
        np.testing.assert_array_equal(np.asarray(state.levels[1].K[p]), np.asarray(start.levels[1].K[p]))
    assert not np.array_equal(np.asarray(state.levels[1].B["embed"]), np.asarray(start.levels[1].B["embed"]))


def test_parts_clipped_apart_keep_the_joint_sensitivity_and_do_not_shrink_each_other():
    """Where K's "delta" is a distance between drifting states (aggregated, never
    broadcast), B and K are clipped apart to clip * sqrt(share): a long K row
    no longer scales B down, and every row's clipped joint norm stays <= clip."""
    rng = np.random.default_rng(0)
    B = {"b": jnp.asarray(rng.normal(size=(4, 30)) * 0.01, jnp.float32)}  # short updates
    K = {"k": jnp.asarray(rng.normal(size=(4, 10)) * 30.0, jnp.float32)}  # states far apart
    parent, weight, clip = jnp.zeros(4, jnp.int32), jnp.ones(4), jnp.full(4, 1.0)
    sums, norms = privacy.clipped_part_sums({"B": B, "K": K}, weight, parent, 1, clip)
    np.testing.assert_allclose(np.asarray(sums["B"]["b"][0]), np.asarray(B["b"]).sum(0), rtol=1e-6)
    share_K = 10 / 40
    clipped_K = np.asarray(K["k"]) * np.minimum(1, np.sqrt(share_K) / np.linalg.norm(K["k"], axis=1))[:, None]
    np.testing.assert_allclose(np.asarray(sums["K"]["k"][0]), clipped_K.sum(0), rtol=1e-5)
    joint = np.sqrt(np.sum(np.asarray(B["b"]) ** 2, 1) + np.sum(clipped_K ** 2, 1))
    assert np.all(joint <= 1.0 + 1e-6)
    assert np.all(np.asarray(norms) > 1.0)  # every row had a part clipped: counted as clipped
    joint_sums, _ = privacy.clipped_sums({"B": B, "K": K}, weight, parent, 1, clip)
    assert np.linalg.norm(joint_sums["B"]["b"]) < 0.05 * np.linalg.norm(sums["B"]["b"])  # what joint clipping did


def test_an_internal_dp_level_releases_the_backbone_unshrunk_by_the_key_layers():
    """At a DP root over federations (clip only, no noise), the backbone that
    reaches the root is the plain mean of the children's B updates when those
    are within their share of the clip, however far the children's K lie."""
    root_dp = {"dp_noise_multiplier": 0.0, "dp_clip": 1.0}
    off = {"dp_noise_multiplier": 0.0, "dp_clip": float("inf")}
    far = tree(off, root_dp)
    topology, spec = worldlm_spec(far, residuals="none")
    _, plain_spec = worldlm_spec(tree(off, off), residuals="none")
    start = engine.make_strategy(spec).init(params())
    offset = {p: v + 50.0 for p, v in start.levels[1].K.items()}  # the children's K far from the root's
    shape = engine.batch_shape(topology, 2, 6)
    slot_client = np.broadcast_to(np.arange(topology.n_slots, dtype=np.int32), shape[:-3])
    batch = engine.RoundBatch(jnp.asarray(np.random.default_rng(0).integers(0, 10, shape), jnp.int32),
                              jnp.asarray(slot_client), jnp.ones(slot_client.shape, jnp.float32))
    out = []
    for s in (spec, plain_spec):
        strategy = engine.make_strategy(s)
        state = strategy.init(params())
        fresh_K = {p: jnp.array(v) for p, v in offset.items()}  # the round donates its state
        state = state._replace(levels=(state.levels[0], state.levels[1]._replace(K=fresh_K)))
        out.append(strategy.run_round(state, batch, jax.random.PRNGKey(0))[0])
    dp_B, plain_B = out[0].levels[0].B["embed"], out[1].levels[0].B["embed"]
    moved = np.asarray(plain_B - start.levels[0].B["embed"])
    assert np.linalg.norm(moved) > 0
    np.testing.assert_allclose(np.asarray(dp_B), np.asarray(plain_B), atol=1e-6 * (1 + np.abs(moved).max()))


def test_clients_per_round_that_full_sampling_would_ignore_is_refused():
    with pytest.raises(TopologyError, match="clients_per_round.*sampling=full"):
        build_topology(tree({"clients_per_round": 2}))
    fixed = build_topology(tree({"clients_per_round": 2, "sampling": "fixed"}))
    assert fixed.clients_per_round() == 4
    build_topology(tree({"clients_per_round": 3}))  # all of them: nothing ignored


@pytest.mark.parametrize("level, protected", [("clients", {1}), ("federations", {0}), ("all", {0, 1})])
def test_target_epsilon_turns_dp_on_at_the_level_it_names(level, protected):
    topology = build_topology(tree())
    calibrated = dp_ledger.calibrate(topology, 8.0, 1e-5, 10, level=level)
    on = {d for d, lvl in enumerate(calibrated.levels) if any(p.dp_noise_multiplier > 0 for p in lvl.policies)}
    assert on == protected
    plan = strategy_plan("worldlm", 2)
    report = dp_ledger.report(calibrated, dp_ledger.make_accountants(calibrated), plan)
    for name, entry in report.items():
        d = 0 if name == "root" else 1
        assert entry["level"] == d and entry["unit"] == ("client" if d == 1 else "federation")
        assert entry["parts"] == "B+K"


def test_a_flat_tree_has_no_federations_level_to_protect():
    flat = build_topology(tree()).flattened()
    with pytest.raises(ValueError, match="privacy.level=federations"):
        dp_ledger.calibrate(flat, 8.0, 1e-5, 10, level="federations")
    calibrated = dp_ledger.calibrate(flat, 8.0, 1e-5, 10, level="clients")
    assert calibrated.levels[0].policies[0].dp_noise_multiplier > 0


def test_per_child_diagnostics_average_over_the_rounds_the_child_took_part_in():
    """Nested rounds: a child absent from a round (its diagnostics are 0 there)
    does not pull its average down."""
    norm = jnp.asarray([[2.0, 4.0, 0.0], [6.0, 0.0, 0.0]])  # (rounds, children)
    present = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    cos = jnp.ones((2, 3, 3)) * present[:, :, None] * present[:, None, :] * 0.5
    out = engine_round._reduce_rounds({"level1/child_k_delta_norm": norm, "level1/child_present": present,
                                 "level1/child_similarity": cos, "level1/rounds": jnp.ones((2, 1))})
    np.testing.assert_allclose(np.asarray(out["level1/child_k_delta_norm"]), [4.0, 4.0, 0.0])
    np.testing.assert_allclose(np.asarray(out["level1/child_similarity"])[:2, :2], 0.5)
    np.testing.assert_allclose(np.asarray(out["level1/child_present"]), [2.0, 1.0, 0.0])
