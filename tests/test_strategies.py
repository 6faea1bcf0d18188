"""The paper's methods as plans: WorldLM / FedPer / HierFAVG relations, key-layer
locality and residuals, heterogeneous federations in one program, a real run."""
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_helpers import strategy_plan
from engine_helpers import (POLICY, STEPS, TOY_KEY_PATHS, W3, assert_trained_close, assert_tree_equal, flat_tree,
                            hier_single, lead, make_batches, make_spec, max_abs_diff, nan_loss, random_tokens, run,
                            toy_loss, toy_params, topo, tree2, MARK)
from worldlm_jax import engine
from worldlm_jax.config import presets as configs
from worldlm_jax.engine import client, strategies
from worldlm_jax.plugins import optimizers
from worldlm_jax.plugins.registry import UnknownNameError
from worldlm_jax.run import training as train


def test_strategy_table():
    t = topo(tree2([2, 3]))
    for name in ("fedavg", "fedper", "local", "centralized"):
        assert strategies.strategy_topology(name, t).depth == 1
    for name in ("worldlm", "hierfavg"):
        assert strategies.strategy_topology(name, t) is t
    assert strategies.uses_key_layers("worldlm") and strategies.uses_key_layers("fedper")
    assert not any(strategies.uses_key_layers(n) for n in ("fedavg", "hierfavg", "local", "centralized"))
    plan = strategy_plan("worldlm", 2, "none", "cos_delta", False)
    assert plan.owner == {"B": 0, "K": 1} and plan.residuals == "none" and not plan.use_parent
    assert plan.broadcast == (frozenset({"B"}), frozenset({"B", "K"}))
    with pytest.raises(UnknownNameError, match="algorithm.name='fedsgd' is not a registered strategy.*worldlm"):
        strategy_plan("fedsgd", 2)


# ---- WorldLM reduces to HierFAVG ------------------------------------------------
def test_worldlm_mean_without_sharing_equals_hierfavg_on_a_single_federation():
    t, hier = hier_single()  # root -> F0 (3 clients), k_agg: mean
    plan = strategies.worldlm_plan(2, residuals="none", use_parent=False)
    spec = make_spec(t, plan, loss_fn=nan_loss, key_paths=TOY_KEY_PATHS, client_optimizer="test_sgd")
    worldlm = engine.make_strategy(spec)
    batches = lead(make_batches(topo(flat_tree(3), slot_multiple=4), 2, seed=11, weights=np.append(W3, 0)))
    hier_state, _ = run(hier, toy_params(), batches)
    w_state, _ = run(worldlm, toy_params(), batches)
    hier_spec = make_spec(t, strategies.averaging_plan(2), loss_fn=nan_loss)
    ids = jnp.arange(3)
    deployed_w = engine.deployed_params(spec, w_state, ids)
    deployed_h = engine.deployed_params(hier_spec, hier_state, ids)
    assert set(deployed_w) == set(deployed_h) == set(toy_params())
    # the same means through the K path: equal up to float32 summation order (plain SGD)
    assert_trained_close(deployed_w, deployed_h, toy_params(), rounds=2, local_steps=STEPS, children=3 + 1, levels=2)
    assert not np.allclose(deployed_w["blocks/0/w"][0], toy_params()["blocks/0/w"], atol=1e-3)  # K trained


@pytest.mark.parametrize("chunk", [0, 2])
def test_client_level_attention_at_infinite_tau_equals_the_streamed_mean(chunk):
    """Leaf federations with k_agg: attention keep every client's K for the
    scores; with k_agg: mean the clients' K are summed chunk by chunk instead.
    At tau -> infinity attention is the mean, so both paths must agree."""
    def worldlm_run(k_agg):
        policy = dict(POLICY, k_agg=k_agg, tau=1e9)
        t = topo(tree2([3, 2], root_policy=policy), weights=[1, 2, 3, 1, 2], slot_multiple=2)
        plan = strategies.worldlm_plan(2, residuals="none", use_parent=False)
        spec = make_spec(t, plan, key_paths=TOY_KEY_PATHS, client_optimizer="test_sgd", chunk=chunk)
        state, _ = run(engine.make_strategy(spec), toy_params(), make_batches(t, 2, seed=12))
        return state

    attention, mean = worldlm_run("attention"), worldlm_run("mean")
    # softmax weights exp(log share + sim / 1e9) are the shares to a few roundings: equal up to
    # float32 summation order (plain SGD, amplification 1)
    close = dict(rounds=2, local_steps=STEPS, children=3 + 2, levels=2)
    assert_trained_close(attention.levels[1].K, mean.levels[1].K, toy_params(), **close)
    assert_trained_close(attention.levels[0].B, mean.levels[0].B, toy_params(), **close)
    assert not np.allclose(mean.levels[1].K["blocks/0/w"][0], mean.levels[1].K["blocks/0/w"][1])


# ---- FedPer: K never leaves the client ---------------------------------------------
@pytest.fixture(scope="module")
def fedper():
    t = topo(flat_tree(3, local_steps=STEPS, client_lr=0.5), weights=W3)
    spec = make_spec(t, strategies.fedper_plan(), loss_fn=nan_loss, key_paths=TOY_KEY_PATHS,
                     client_optimizer="test_sgd")
    return t, spec, engine.make_strategy(spec)


def _fedper_reference(params, batches, weights):
    tx = optimizers.get("test_sgd")
    local = jax.jit(client.make_local_update(toy_loss, tx))
    B = {k: v for k, v in params.items() if k not in TOY_KEY_PATHS}
    K = [{k: v for k, v in params.items() if k in TOY_KEY_PATHS} for _ in range(3)]
    for b in batches:
        deltas = []
        for c in range(3):
            start = {**B, **K[c]}
            out = local(start, tx.init(start), jnp.asarray(b.tokens[c]), 0.5, STEPS).params
            K[c] = {k: out[k] for k in TOY_KEY_PATHS}
            deltas.append({k: np.asarray(out[k]) - np.asarray(B[k]) for k in B})
        B = {k: B[k] + sum(weights[c] * deltas[c][k] for c in range(3)) / sum(weights) for k in B}
    return B, K


def test_fedper_keeps_key_layers_on_clients(fedper):
    t, spec, strategy = fedper
    params = toy_params(4)
    batches = make_batches(t, 2, seed=12)
    state, _ = run(strategy, params, batches)
    B, K = _fedper_reference(params, batches, W3)
    for c in range(3):
        # the same steps and means, in another program: equal up to float32 summation order
        assert_trained_close({k: state.clients.K[k][c] for k in TOY_KEY_PATHS}, K[c], params, rounds=2,
                             local_steps=STEPS, children=3, err=f"client {c}")
    assert_trained_close({k: state.levels[0].B[k][0] for k in B}, B, params, rounds=2, local_steps=STEPS, children=3)
    # the server's K never moved: nothing was sent up
    for k in TOY_KEY_PATHS:
        np.testing.assert_array_equal(state.levels[0].K[k][0], params[k])
    deployed = engine.deployed_params(spec, state, jnp.arange(3))
    for c in range(3):
        for k in TOY_KEY_PATHS:
            np.testing.assert_array_equal(deployed[k][c], state.clients.K[k][c])
        for k in B:
            np.testing.assert_array_equal(deployed[k][c], state.levels[0].B[k][0])
    assert not np.allclose(K[0]["blocks/0/w"], K[1]["blocks/0/w"], atol=1e-4)  # personalised


def test_fedper_client_state_follows_the_client_not_the_slot(fedper):
    t, _, strategy = fedper
    batches = make_batches(t, 2, seed=13)
    perm = np.array([1, 2, 0])
    permuted = [type(b)(b.tokens[perm], b.slot_client[perm], b.slot_weight[perm]) for b in batches]
    state, _ = run(strategy, toy_params(), batches)
    state_p, _ = run(strategy, toy_params(), permuted)
    # the clients summed in another order: equal up to float32 summation order (plain SGD)
    assert_trained_close(state_p, state, jax.tree.map(np.asarray, strategy.init(toy_params())), rounds=2,
                         local_steps=STEPS, children=3)


def test_fedper_diverged_client_keeps_its_previous_key_layers(fedper):
    t, _, strategy = fedper
    batches = make_batches(t, 2, seed=14)
    first, _ = run(strategy, toy_params(), batches[:1])
    tokens = batches[1].tokens.copy()
    tokens[1, 0, 0, 0] = MARK  # client 1 diverges in round 2
    state, metrics = run(strategy, toy_params(), [batches[0], type(batches[1])(tokens, *batches[1][1:])])
    assert metrics[1]["diverged"] == 1
    for k in TOY_KEY_PATHS:
        np.testing.assert_array_equal(state.clients.K[k][1], first.clients.K[k][1])
        assert np.all(np.isfinite(state.clients.K[k])) and np.all(np.isfinite(state.levels[0].B["embed"]))
        assert not np.allclose(state.clients.K[k][0], first.clients.K[k][0])  # the others trained


# ---- key-layer locality and residual embeddings -------------------------------------
ALL_K = frozenset(toy_params())  # every trained parameter is a key layer ...


def _all_key_params():
    return {**toy_params(5), "dummy": jnp.zeros(3)}  # ... and the backbone is an unused dummy


@pytest.fixture(scope="module")
def sharing_runs():
    """WorldLM on root -> F0, F1 (2 clients each) with the backbone out of play, so
    federations can only influence each other through key-layer sharing. Runs
    every plan on data `a` and on data `b` where only F1's tokens differ."""
    t = topo(tree2([2, 2], root_policy=dict(local_steps=STEPS, client_lr=0.5, tau=1.0)))
    a = make_batches(t, 2, seed=15)
    rng = np.random.default_rng(16)
    b = []
    for x in a:
        tokens = x.tokens.copy()
        tokens[:, 2:] = random_tokens(rng, tokens[:, 2:].shape)
        b.append(type(x)(tokens, x.slot_client, x.slot_weight))
    out = {}
    for residuals, use_parent in (("none", False), ("siblings", True)):
        plan = strategies.worldlm_plan(2, residuals=residuals, use_parent=use_parent)
        strategy = engine.make_strategy(make_spec(t, plan, key_paths=ALL_K, client_optimizer="test_sgd"))
        for name, data in (("a", a), ("b", b)):
            for n_rounds in (1, 2):
                out[residuals, use_parent, name, n_rounds] = run(strategy, _all_key_params(), data[:n_rounds])[0]
    return out


def _fed_K(state, f):
    return {k: v[f] for k, v in state.levels[1].K.items()}


def test_backbone_is_out_of_play(sharing_runs):
    state = sharing_runs["none", False, "a", 2]
    assert set(state.levels[0].B) == {"dummy"}
    np.testing.assert_array_equal(state.levels[0].B["dummy"], np.zeros((1, 3)))


def test_without_sharing_a_federation_is_independent_of_the_others_data(sharing_runs):
    a, b = sharing_runs["none", False, "a", 2], sharing_runs["none", False, "b", 2]
    assert_tree_equal(_fed_K(a, 0), _fed_K(b, 0), err="F0 must not see F1's data")
    assert max_abs_diff(_fed_K(a, 1), _fed_K(b, 1)) > 1e-3  # F1 itself did change


def test_sharing_reaches_a_federation_one_parent_round_later(sharing_runs):
    """Residuals (siblings' K) and the parent's K enter F0's attention one root round
    stale: after round 1 F0 cannot depend on F1's data, after round 2 it must.
    (Each candidate kind on its own: test_aggregation.)"""
    residuals, use_parent = "siblings", True
    one_a, one_b = sharing_runs[residuals, use_parent, "a", 1], sharing_runs[residuals, use_parent, "b", 1]
    assert_tree_equal(_fed_K(one_a, 0), _fed_K(one_b, 0), err="round 1")
    two_a, two_b = sharing_runs[residuals, use_parent, "a", 2], sharing_runs[residuals, use_parent, "b", 2]
    assert max_abs_diff(_fed_K(two_a, 0), _fed_K(two_b, 0)) > 1e-6
    # and sharing changed the result compared to no sharing at all
    assert max_abs_diff(_fed_K(two_a, 0), _fed_K(sharing_runs["none", False, "a", 2], 0)) > 1e-6
    # after each root round a federation's residual embedding is its K of that round
    for state in (one_a, two_a):
        assert_tree_equal(state.levels[1].residual_K, state.levels[1].K)
    assert max_abs_diff(one_a.levels[1].residual_K, two_a.levels[1].residual_K) > 1e-4


# ---- autonomous federations: different rules, one program ------------------------------
RULES = [dict(local_steps=1, client_lr=0.05, tau=0.1, server_optimizer="sgd", server_lr=1.0, rounds=1),
         dict(local_steps=3, client_lr=0.02, tau=1.0, server_optimizer="adam", server_lr=0.1, rounds=2)]


def test_heterogeneous_federations_follow_their_own_rules():
    plan = strategies.worldlm_plan(2, residuals="none", use_parent=False)

    def build(rules):
        t = topo(tree2([2, 2], fed_policies=rules), weights=[1, 2, 1, 3])
        spec = make_spec(t, plan, key_paths=TOY_KEY_PATHS)
        return spec, engine.make_strategy(spec)

    spec, mixed = build(RULES)
    t = spec.topology
    assert engine.batch_shape(t, 2, 6)[:3] == (2, 4, 3)  # the most rounds and steps of any federation
    batches = make_batches(t, 1, seed=17)
    mixed_state, metrics = run(mixed, toy_params(), batches)
    assert mixed.run_round._cache_size() == 1
    np.testing.assert_allclose(metrics[0]["level1/rounds"], [1, 2])
    same_states = []
    for f, rule in enumerate(RULES):
        _, same = build([rule, rule])
        R, E = rule["rounds"], rule["local_steps"]
        b = batches[0]  # the same data, cut to this rule's rounds and steps
        same_state, _ = run(same, toy_params(), [type(b)(b.tokens[:R, :, :E], b.slot_client[:R], b.slot_weight[:R])])
        same_states.append(same_state)
        for part in ("B", "K"):
            got = {k: v[f] for k, v in getattr(mixed_state.levels[1], part).items()}
            want = {k: v[f] for k, v in getattr(same_state.levels[1], part).items()}
            # one program or another: equal up to float32 summation order; attention at tau 0.1
            # divides the cosines' rounding by tau (amplification 1 / tau = 10)
            assert_trained_close(got, want, toy_params(), rounds=2, local_steps=3, children=2 + 2, levels=2,
                                 amplification=10, err=f"federation F{f} {part}")
    # the rules matter: under the other federation's rule each would have ended elsewhere
    for f in (0, 1):
        for part in ("B", "K"):
            got = {k: v[f] for k, v in getattr(mixed_state.levels[1], part).items()}
            other_rule = {k: v[f] for k, v in getattr(same_states[1 - f].levels[1], part).items()}
            assert max_abs_diff(got, other_rule) > 1e-4, (f, part)
    # each client deploys the root's backbone with its own federation's key layers
    deployed = engine.deployed_params(spec, mixed_state, jnp.arange(4))
    for c, f in enumerate([0, 0, 1, 1]):
        for k, v in deployed.items():
            source = mixed_state.levels[1].K[k][f] if k in TOY_KEY_PATHS else mixed_state.levels[0].B[k][0]
            np.testing.assert_array_equal(v[c], source, err_msg=f"client {c} {k}")


# ---- a real run ---------------------------------------------------------------------
def test_training_run_learns_and_writes_its_records(tmp_path):
    cfg = configs.tiny()
    rounds = 3
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, rounds=rounds, devices=1))
    summary = train.train(cfg, str(tmp_path), quiet=True)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for s in (summary, on_disk):
        assert {"algorithm", "rounds_completed", "eval", "compiles", "wall_seconds"} <= set(s)
        assert {"perplexity", "per_federation"} <= set(s["eval"])
        assert s["algorithm"] == "worldlm" and s["rounds_completed"] == rounds and s["compiles"] == 1
        assert set(s["eval"]["per_federation"]) == {"en", "de", "ru"}
    ppl = summary["eval"]["perplexity"]
    assert math.isfinite(ppl) and 1 < ppl < 256  # better than uniform over bytes
    assert all(math.isfinite(p) and p < 256 for p in summary["eval"]["per_federation"].values())
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    per_round = [r for r in lines if "train_loss" in r]
    assert [r["round"] for r in per_round] == list(range(rounds))
    losses = [r["train_loss"] for r in per_round]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert all(r["diverged_clients"] == 0 for r in per_round)
    assert per_round[0]["client_lr"] == pytest.approx({name: cfg.policy.client_lr for name in ("en", "de", "ru")})
    # plots: perplexity over rounds, and the attention weights of the language federations
    assert (tmp_path / "plots" / "perplexity.png").stat().st_size > 5000
    assert (tmp_path / "plots" / "attention_level1.png").stat().st_size > 5000
    weights = per_round[-1]["level1/attention_residual_matrix"]
    assert len(weights) == 3 and all(row[i] == 0 for i, row in enumerate(weights))  # never attends to itself


@pytest.mark.slow  # two tiny trainings; test_model's bf16 tests check the same tracking on the model (seconds)
def test_bf16_matmul_run_follows_the_float32_run(tmp_path):
    """model.matmul_dtype=bfloat16 through the whole engine (clients vmapped in chunks,
    sharded over 2 devices, custom VJPs under both): the same losses as float32, to bf16
    rounding, round after round."""
    losses = {}
    for md in ("float32", "bfloat16"):
        cfg = configs.tiny()
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, rounds=3, devices=2),
                                  model=dataclasses.replace(cfg.model, matmul_dtype=md))
        train.train(cfg, str(tmp_path / md), quiet=True)
        lines = (tmp_path / md / "metrics.jsonl").read_text().splitlines()
        losses[md] = [r["train_loss"] for r in map(json.loads, lines) if "train_loss" in r]
    assert len(losses["bfloat16"]) == 3 and losses["bfloat16"] != losses["float32"]
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=5e-4)
