"""DP-FedAvg inside the engine, per federation, and communication accounting."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from worldlm_jax import engine, model
from worldlm_jax.engine import strategies
from worldlm_jax.model import partition
from worldlm_jax.privacy import accounting, ledger as dp_ledger
from worldlm_jax.run import communication
from worldlm_jax.tree.topology import build_topology
from engine_helpers import strategy_plan

CFG = model.preset("tiny", max_len=16, d_model=16, n_heads=2, n_layers=1)  # one block: half the compile
MODEL_DEF, PARAMS = model.init(CFG, jax.random.PRNGKey(0))
KEY_PATHS = frozenset(p for p, k in partition.key_layer_mask(PARAMS, partition.KeyLayers(), CFG.n_layers).items() if k)


def _tree(policy_a=None, policy_b=None, clients=2, rounds=1):
    return {"name": "root", "children": [
        {"name": "a", "sources": ["x"], "clients": clients, "policy": {"rounds": rounds, **(policy_a or {})}},
        {"name": "b", "sources": ["x"], "clients": clients, "policy": {"rounds": rounds, **(policy_b or {})}}],
        "policy": {"local_steps": 2, "client_lr": 1e-2}}


def _run(name, tree, tokens_seed=0, rounds=1, residuals="siblings", chunk=0):
    topo = strategies.strategy_topology(name, build_topology(tree))
    plan = strategy_plan(name, topo.depth, residuals=residuals)
    keys = KEY_PATHS if strategies.uses_key_layers(name) else frozenset()
    spec = engine.EngineSpec(topology=topo, plan=plan, loss_fn=MODEL_DEF.loss, key_paths=keys,
                             key_groups=partition.key_groups(keys) if keys else {}, chunk=chunk)
    strategy = engine.make_strategy(spec)
    state = strategy.init(PARAMS)
    shape = engine.batch_shape(topo, 2, 8)
    rng = np.random.default_rng(tokens_seed)
    metrics = []
    for r in range(rounds):
        slot_client = np.broadcast_to(np.arange(topo.n_slots, dtype=np.int32), shape[:-4] + (topo.n_slots,))
        batch = engine.RoundBatch(jnp.asarray(rng.integers(0, 256, shape), jnp.int32), jnp.asarray(slot_client),
                                  jnp.ones(slot_client.shape, jnp.float32))
        state, m = strategy.run_round(state, batch, jax.random.PRNGKey(7))
        metrics.append(jax.tree.map(np.asarray, m))
    return spec, state, metrics


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_dp_with_no_noise_and_a_loose_clip_equals_fedavg():
    loose = {"dp_clip": 1e9}  # DP path on (participant mean, clipping), but nothing is clipped or noised
    spec, plain, _ = _run("fedavg", _tree())
    _, dp, _ = _run("fedavg", {**_tree(), "policy": {**_tree()["policy"], **loose}})
    # the same numbers, maybe added in another order: equal up to float32 summation order
    from engine_helpers import assert_close_up_to_summation_order, change, decoder_step_summands, toy_summands, toy_updates
    pick = lambda s: jax.tree.map(np.asarray, (s.levels[0].B, s.levels[0].server))
    ref = pick(plain)
    assert_close_up_to_summation_order(
        pick(dp), ref, change(ref, pick(engine.init_state(spec, PARAMS))),
        toy_summands(1, 2, children=4, per_step=decoder_step_summands(CFG, 2, 8)),
        values=jax.tree.map(np.abs, ref), n_updates=toy_updates(1, 2, levels=1))


def test_noise_changes_the_private_federation_only():
    noisy = {"dp_noise_multiplier": 1.0, "dp_clip": 0.1}
    _, base, _ = _run("worldlm", _tree())
    _, dp, _ = _run("worldlm", _tree(policy_a=noisy))
    # federation b has no DP: after one root round its K is bit-identical
    for a, b in zip(_leaves({p: v[1] for p, v in base.levels[1].K.items()}),
                    _leaves({p: v[1] for p, v in dp.levels[1].K.items()})):
        np.testing.assert_array_equal(a, b)
    # federation a's K moved by noise of the expected size: std z * clip / expected count per coordinate
    diff = np.concatenate([(dp.levels[1].K[p][0] - base.levels[1].K[p][0]).ravel() for p in sorted(KEY_PATHS)])
    assert np.std(diff) > 0.5 * 1.0 * 0.1 / 2


def test_dp_sums_streamed_over_client_chunks_equal_all_clients_at_once():
    """Clipped sums and norms accumulate chunk by chunk (6 client slots in chunks
    of 4: one full chunk and a remainder); noise, adaptive clip and K must not notice."""
    dp = {"dp_noise_multiplier": 0.8, "dp_clip": 0.05, "dp_adaptive_clip": True}
    tree = _tree(policy_a=dp, clients=3)
    # residuals: none, since a fresh state's residual candidates are scored from rounding
    # noise, which another summation order redraws (engine_helpers.with_distinct_residuals)
    spec, whole, m_whole = _run("worldlm", tree, rounds=2, residuals="none")
    _, chunked, m_chunked = _run("worldlm", tree, rounds=2, chunk=4, residuals="none")
    # summation order differs, the noise (same key) and the clip scales are the same numbers:
    # equal up to float32 summation order (engine_helpers); the clients' AdamW magnifies
    # nothing where |g| >> its eps 1e-8 (amplification 1). A lost or doubled client would
    # move parameters by ~1e-3, far above the bound.
    from engine_helpers import assert_close_up_to_summation_order, change, decoder_step_summands, toy_summands, toy_updates
    host = lambda tree: jax.tree.map(np.asarray, tree)
    ref = host(whole)
    assert_close_up_to_summation_order(
        host(chunked), ref, change(ref, host(engine.init_state(spec, PARAMS))),
        toy_summands(2, 2, children=3 + 2, per_step=decoder_step_summands(CFG, 2, 8)),
        values=jax.tree.map(np.abs, ref), n_updates=toy_updates(2, 2, levels=2))
    np.testing.assert_allclose(m_whole[-1]["level1/dp_clip"], m_chunked[-1]["level1/dp_clip"], rtol=1e-6)
    assert m_whole[-1]["level1/dp_clipped_fraction"][0] > 0  # clipping was active


def test_clipping_bounds_each_child_contribution():
    # one client; its update is clipped to 1e-3 before reaching the federation
    tree = {"name": "root", "clients": 1, "sources": ["x"], "policy": {"local_steps": 2, "client_lr": 1e-2,
                                                                          "dp_clip": 1e-3}}
    _, state, _ = _run("fedavg", tree)
    moved = np.sqrt(sum(np.sum((np.asarray(state.levels[0].B[p][0]) - PARAMS[p]) ** 2) for p in PARAMS))
    assert moved <= 1e-3 * (1 + 1e-4)
    assert moved > 0.5e-3  # and the update was real (clipped, not dropped)


def test_accountant_ledgers_follow_the_tree():
    tree = _tree(policy_a={"dp_noise_multiplier": 1.2, "dp_clip": 1.0, "clients_per_round": 1, "sampling": "poisson"},
                 rounds=3)
    topo = build_topology(tree)
    accountants = dp_ledger.make_accountants(topo)
    assert set(accountants) == {"a"}
    dp_ledger.step_all(topo, accountants)
    dp_ledger.step_all(topo, accountants)
    assert accountants["a"].rounds == 6  # 3 federation rounds per root round
    report = dp_ledger.report(topo, accountants)["a"]
    direct = accounting.epsilon_after(1.2, 0.5, 6, 1e-5, "rdp", "poisson")
    assert report["epsilon"] == pytest.approx(direct)
    assert report["sampling_rate"] == 0.5


def test_calibration_meets_the_target_for_every_federation():
    topo = build_topology(_tree(rounds=2))
    calibrated = dp_ledger.calibrate(topo, target_epsilon=4.0, target_delta=1e-5, root_rounds=5, level="all")
    accountants = dp_ledger.make_accountants(calibrated)
    assert set(accountants) == {"root", "a", "b"}
    for _ in range(5):
        dp_ledger.step_all(calibrated, accountants)
    for name, rep in dp_ledger.report(calibrated, accountants).items():
        assert rep["epsilon"] <= 4.0
        assert rep["epsilon"] > 3.5, f"{name}: noise larger than needed"
    with pytest.raises(ValueError, match="federation 'a'|federation 'root'"):
        dp_ledger.calibrate(topo, target_epsilon=1e-9, target_delta=1e-5, root_rounds=5)


# ---- communication -----------------------------------------------------------
def _bytes(params, paths):
    return sum(int(np.prod(params[p].shape)) * 4 for p in paths)


def test_fedavg_bytes_match_hand_count():
    spec, _, metrics = _run("fedavg", _tree())
    participants = {0: metrics[0]["level0/participants"]}
    got = communication.round_bytes(spec.topology, spec.plan, communication.part_bytes(PARAMS, frozenset()),
                                    participants)
    whole = _bytes(PARAMS, PARAMS)
    assert got["total"] == 4 * (whole + whole)  # 4 clients, model down and up


def test_worldlm_bytes_match_hand_count():
    rounds = 2
    spec, _, metrics = _run("worldlm", _tree(rounds=rounds))
    participants = {d: metrics[0][f"level{d}/participants"] for d in range(2)}
    sizes = communication.part_bytes(PARAMS, KEY_PATHS)
    got = communication.round_bytes(spec.topology, spec.plan, sizes, participants)
    B, K = _bytes(PARAMS, set(PARAMS) - KEY_PATHS), _bytes(PARAMS, KEY_PATHS)
    # level 0: 2 federations get B, send B and K up; each receives 1 sibling K + the root's K
    assert got["level0"]["down"] == 2 * B
    assert got["level0"]["up"] == 2 * (B + K)
    assert got["level0"]["residual"] == 2 * (1 + 1) * K
    # level 1: 2 rounds x 2 federations x 2 clients, whole model both ways
    assert got["level1"]["total"] == rounds * 4 * 2 * (B + K)
    # K never leaves a federation in FedPer: only B moves
    spec_p, _, metrics_p = _run("fedper", _tree())
    got_p = communication.round_bytes(spec_p.topology, spec_p.plan, sizes, {0: metrics_p[0]["level0/participants"]})
    assert got_p["total"] == 4 * 2 * B


def test_adaptive_clip_tracks_the_update_norms():
    tree = {"name": "root", "clients": 4, "sources": ["x"],
            "policy": {"local_steps": 2, "client_lr": 1e-2, "dp_clip": 10.0, "dp_noise_multiplier": 0.5,
                       "dp_adaptive_clip": True, "dp_clip_lr": 0.5, "dp_target_quantile": 0.5}}
    _, state, metrics = _run("fedavg", tree, rounds=3)
    clips = [float(m["level0/dp_clip"][0]) for m in metrics]
    # every update is far below 10, so the clip shrinks geometrically round after round
    assert clips[0] < 10.0 and clips[1] < clips[0] and clips[2] < clips[1]
    assert float(state.levels[0].clip[0]) == pytest.approx(clips[-1])


def test_global_stage_shares_key_layers_and_the_nested_stage_localises_them():
    tree = _tree()
    topo = build_topology(tree)
    spec = engine.EngineSpec(topology=topo, plan=strategies.worldlm_plan(2), loss_fn=MODEL_DEF.loss,
                             key_paths=KEY_PATHS, key_groups=partition.key_groups(KEY_PATHS))
    global_spec = dataclasses.replace(spec, plan=strategies.global_stage_plan(2))
    shape = engine.batch_shape(topo, 2, 8)
    batch = engine.RoundBatch(jnp.asarray(np.random.default_rng(0).integers(0, 256, shape), jnp.int32),
                              jnp.asarray(np.arange(topo.n_slots, dtype=np.int32))[None],
                              jnp.ones((1, topo.n_slots), jnp.float32))
    deployed = {}
    for name, s in (("global", global_spec), ("nested", spec)):
        state, _ = engine.make_strategy(s).run_round(engine.make_strategy(s).init(PARAMS), batch,
                                                          jax.random.PRNGKey(0))
        deployed[name] = engine.deployed_params(s, state, jnp.arange(topo.n_clients))
    k = sorted(KEY_PATHS)[0]
    g, n = np.asarray(deployed["global"][k]), np.asarray(deployed["nested"][k])
    assert np.allclose(g[0], g[-1])  # one global K for clients of different federations
    assert not np.allclose(n[0], n[-1])  # each federation its own K


def test_flat_baselines_keep_the_clients_dp_rules():
    tree = _tree(policy_a={"dp_noise_multiplier": 0.7, "dp_clip": 0.5}, policy_b={"dp_noise_multiplier": 0.7,
                                                                                  "dp_clip": 0.5})
    flat = build_topology(tree).flattened()
    assert flat.levels[0].policies[0].dp_noise_multiplier == 0.7 and flat.levels[0].policies[0].dp_clip == 0.5
    mixed = _tree(policy_a={"dp_noise_multiplier": 0.7, "dp_clip": 0.5})
    with pytest.raises(ValueError, match="different DP rules"):
        build_topology(mixed).flattened()


def test_mean_aggregation_reads_no_residuals():
    tree = _tree()
    tree["children"][0]["policy"]["k_agg"] = "mean"
    tree["children"][1]["policy"]["k_agg"] = "mean"
    spec, _, metrics = _run("worldlm", tree)
    got = communication.round_bytes(spec.topology, spec.plan, communication.part_bytes(PARAMS, KEY_PATHS),
                                    {d: metrics[0][f"level{d}/participants"] for d in range(2)})
    assert got["level0"]["residual"] == 0


def test_training_under_a_target_epsilon_logs_privacy_every_round(tmp_path):
    from worldlm_jax.config import apply_overrides, presets as configs
    from worldlm_jax.run import training as train
    cfg = apply_overrides(configs.tiny(), ["run.rounds=2", "run.devices=1", "privacy.target_epsilon=20"])
    summary = train.train(cfg, str(tmp_path), quiet=True)
    import json
    rounds = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if "train_loss" in r]
    eps = [r["privacy"]["en"]["epsilon"] for r in rounds]
    assert eps[0] < eps[1] <= 20.0  # composes round by round, within the budget
    final = summary["privacy"]["en"]
    assert final["epsilon"] == pytest.approx(eps[-1]) and final["rounds"] == 2
    assert final["epsilon"] > 15.0  # calibrated to the budget, not far below it
    # privacy.level clients (the default): the federations that aggregate clients, and only they
    assert set(summary["privacy"]) == {c["name"] for c in cfg.tree["children"]}
    assert final["level"] == 1 and final["unit"] == "client" and final["parts"] == "B+K"


@pytest.mark.parametrize("chunk", [0, 2])
def test_dp_on_a_federation_that_aggregates_nothing_changes_nothing(chunk):
    """Local training releases nothing, so a DP policy on its federation has
    nothing to clip or noise: the run equals the one without DP (in chunks too)."""
    from engine_helpers import assert_tree_equal, flat_tree, make_batches, make_spec, run, toy_params, topo

    def local_run(**dp):
        t = topo(flat_tree(5, local_steps=2, client_lr=0.3, **dp))
        spec = make_spec(t, strategies.local_plan(), client_optimizer="test_sgd", chunk=chunk)
        return run(engine.make_strategy(spec), toy_params(2), make_batches(t, 2, seed=5))[0]

    with_dp, without = local_run(dp_noise_multiplier=1.0, dp_clip=0.1), local_run()
    assert_tree_equal((with_dp.clients, with_dp.levels[0].B, with_dp.levels[0].K),
                      (without.clients, without.levels[0].B, without.levels[0].K))


def test_a_dp_federation_logs_no_statistic_of_its_childrens_raw_updates():
    """Federations a (fixed clip) and b (adaptive clip) are DP with dp_scope all (B and
    K released), c is not: a's and b's update spread and attention diagnostics are
    null, c's are not; a's exact clipped fraction is null, and b's is the noised one
    its clip moved by (clip' = clip * exp(-lr * (b_hat - target)), so 1 - fraction = b_hat)."""
    fixed = {"dp_noise_multiplier": 0.5, "dp_clip": 0.1}
    adaptive = {**fixed, "dp_adaptive_clip": True, "dp_clip_lr": 0.2, "dp_target_quantile": 0.5}
    tree = {**_tree(), "children": [{"name": n, "sources": ["x"], "clients": 2, "policy": {"rounds": 1, **p}}
                                    for n, p in (("a", fixed), ("b", adaptive), ("c", {}))]}
    _, _, metrics = _run("worldlm", tree, rounds=1)
    m, private = metrics[0], np.array([True, True, False])
    for key in ("update_spread", "attention_entropy", "attention_parent"):
        value = m[f"level1/{key}"]
        assert np.all(np.isnan(value[private])) and np.all(np.isfinite(value[~private])), key
    assert m["level1/update_spread"][2] > 0
    of_private = np.arange(len(m["level1/child_k_delta_norm"])) < 4  # slots 0-3: a's and b's clients
    norms = m["level1/child_k_delta_norm"]
    assert np.all(np.isnan(norms[of_private])) and np.all(np.isfinite(norms[~of_private]))
    similarity = m["level1/child_similarity"]
    assert np.all(np.isnan(similarity[of_private])) and np.all(np.isnan(similarity[:, of_private]))
    assert np.all(np.isfinite(similarity[np.ix_(~of_private, ~of_private)]))
    fraction = m["level1/dp_clipped_fraction"]
    assert np.isnan(fraction[0]) and np.isfinite(fraction[2])
    b_hat = adaptive["dp_target_quantile"] - np.log(m["level1/dp_clip"][1] / adaptive["dp_clip"]) / 0.2
    np.testing.assert_allclose(1.0 - fraction[1], b_hat, rtol=1e-4, atol=1e-5)
