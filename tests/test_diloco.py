"""DiLoCo (Douillard et al. 2023): the `nesterov` outer optimizer, clients that keep
their inner AdamW state across rounds (not their parameters), the root's outer step,
the strategy's policy defaults beneath the config's, how it composes (sampling, a
diverged client, padding, DP, a vectorised sweep, resume, a mesh) and a real run."""
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_helpers import run_cli
from engine_helpers import (EPS32, MARK, W3, assert_trained_close, assert_tree_equal, flat_tree, make_batches,
                            make_spec, nan_loss, run, to_device, toy_loss, toy_params, topo, ulp_perturbed)
from worldlm_jax import engine
from worldlm_jax.cli.commands import describe_config
from worldlm_jax.config import ConfigError, apply_overrides, from_dict, presets as configs
from worldlm_jax.config.schema import Config
from worldlm_jax.engine import client, parallel, strategies
from worldlm_jax.outputs.checkpoint import Checkpointer
from worldlm_jax.plugins import optimizers
from worldlm_jax.run import blueprint
from worldlm_jax.tree.provenance import with_root_defaults
from worldlm_jax.tree.topology import build_topology

H, LR = 3, 0.05  # inner steps per round, client learning rate
OUTER_LR = 0.7  # DiLoCo's outer learning rate (Douillard et al. 2023)


# ---- the outer optimizer ----------------------------------------------------------
def test_nesterov_is_sgd_with_nesterov_momentum_in_float64():
    """optax's `nesterov` entry against the update written out: trace <- g + 0.9 trace,
    step = -(g + 0.9 trace) at lr 1 (the engine scales it by server_lr)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        params = {"a": jnp.asarray(rng.normal(size=3)), "b": {"c": jnp.asarray(rng.normal(size=(2, 2)))}}
        tx = optimizers.get("nesterov")
        state = tx.init(params)
        trace = jax.tree.map(np.zeros_like, jax.tree.map(np.asarray, params))
        for _ in range(5):
            grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
            updates, state = tx.update(grads, state, params)
            g = jax.tree.map(np.asarray, grads)
            trace = jax.tree.map(lambda t, gi: gi + 0.9 * t, trace, g)
            expected = jax.tree.map(lambda t, gi: -(gi + 0.9 * t), trace, g)
            for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
                assert got.dtype == np.float64
                # a few float64 operations per element: a few ulps of the magnitudes involved
                np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=8 * np.finfo(np.float64).eps
                                           * (1 + np.max(np.abs(want))))
        assert "nesterov" in optimizers.names()


# ---- the engine: clients keep their inner state, the root steps with Nesterov -------
def diloco_tree(n_clients: int, **policy):
    """A flat tree whose root runs DiLoCo's outer rule, written there by the strategy's
    defaults exactly as a config's tree gets them (`with_root_defaults`)."""
    spec = flat_tree(n_clients, local_steps=H, client_lr=LR, **policy)
    resolved, applied = with_root_defaults(spec, None, strategies.policy_defaults("diloco"))
    assert set(applied) == set(strategies.policy_defaults("diloco")) - set(policy)  # the tree's own win
    return resolved


@pytest.fixture(scope="module")
def diloco_rounds():
    """Three clients with data weights 1, 2, 3 on four slots (one padding slot), AdamW
    inside. Round 1: everyone trains; round 2: client 1 diverges (a NaN loss), client 2
    is not sampled (weight 0); client 0 trains alone."""
    t = topo(diloco_tree(3), weights=W3, slot_multiple=4)
    strategy = engine.make_strategy(make_spec(t, strategies.diloco_plan(1), loss_fn=nan_loss))
    batches = make_batches(t, 2, seed=5)
    tokens = batches[1].tokens.copy()
    tokens[1, 0, 0, 0] = MARK  # client 1's loss is NaN in round 2
    weight = batches[1].slot_weight.copy()
    weight[2] = 0.0  # client 2 is not sampled in round 2
    batches[1] = engine.RoundBatch(tokens, batches[1].slot_client, weight)
    params = toy_params(1)
    after_1, m1 = run(strategy, params, batches[:1])
    after_2, m2 = run(strategy, params, batches)
    return t, params, batches, after_1, after_2, m1 + m2[1:]


def reference(params, batches):
    """DiLoCo written out client by client: AdamW from its kept state, then the root's
    weighted mean delta through optax's nesterov at lr 0.7. Returns per round
    (root params, root nesterov state, each client's AdamW state)."""
    tx, outer = optimizers.get("adamw"), optimizers.get("nesterov")
    local = jax.jit(client.make_local_update(toy_loss, tx))
    root, outer_state = params, outer.init(params)
    opt = [tx.init(params) for _ in range(3)]
    out = []
    for r, b in enumerate(batches):
        trains = [0, 1, 2] if r == 0 else [0]  # round 2: client 1 diverged, client 2 not sampled
        total = jax.tree.map(jnp.zeros_like, root)
        for c in trains:
            res = local(root, opt[c], jnp.asarray(b.tokens[c]), LR, H)
            opt[c] = res.opt_state
            total = jax.tree.map(lambda s, p, q: s + W3[c] * (p - q), total, res.params, root)
        mean = jax.tree.map(lambda s: s / W3[trains].sum(), total)
        updates, outer_state = outer.update(jax.tree.map(jnp.negative, mean), outer_state, root)
        root = jax.tree.map(lambda p, u: p + OUTER_LR * u, root, updates)
        out.append((root, outer_state, list(opt)))
    return out


def rows(tree, i):
    return jax.tree.map(lambda x: np.asarray(x)[i], tree)


def test_a_client_keeps_its_inner_adamw_state_across_rounds_not_its_parameters(diloco_rounds):
    t, params, batches, after_1, after_2, metrics = diloco_rounds
    ref = reference(params, batches)
    noisy = reference(ulp_perturbed(params), batches)  # how much the program magnifies one rounding
    sensitivity = lambda a, b: jax.tree.map(lambda x, y: np.abs(np.asarray(x, np.float64) - np.asarray(y)), a, b)
    close = dict(local_steps=H, children=3)
    fresh = optimizers.get("adamw").init(params)
    # client 0 after round 2: 2H AdamW steps with its state carried (from the root's broadcast each round)
    for r, state in ((0, after_1), (1, after_2)):
        ref_opt, noisy_opt = ref[r][2][0], noisy[r][2][0]
        assert_trained_close(rows(state.clients.opt, 0), ref_opt, fresh, rounds=r + 1,
                             sensitivity=sensitivity(noisy_opt, ref_opt), err=f"client 0 round {r + 1}", **close)
        assert int(jax.tree.leaves(rows(state.clients.opt, 0))[0]) == H * (r + 1)  # the step count went on
    # the clients hold no parameters of their own: DiLoCo starts each round from the broadcast
    assert state.clients.B == {} and state.clients.K == {}
    assert metrics[1]["diverged"] == 1
    # client 1 (diverged) and client 2 (not sampled) keep their round-1 state exactly
    for c in (1, 2):
        assert_tree_equal(rows(after_2.clients.opt, c), rows(after_1.clients.opt, c), err=f"client {c}")
        assert int(jax.tree.leaves(rows(after_2.clients.opt, c))[0]) == H


def test_the_outer_step_is_nesterov_at_lr_0_7_on_the_mean_delta(diloco_rounds):
    t, params, batches, after_1, after_2, _ = diloco_rounds
    assert t.levels[0].policies[0].server_optimizer == "nesterov" and t.levels[0].policies[0].server_lr == OUTER_LR
    ref = reference(params, batches)
    noisy = reference(ulp_perturbed(params), batches)
    sens = lambda a, b: jax.tree.map(lambda x, y: np.abs(np.asarray(x, np.float64) - np.asarray(y)), a, b)
    for r, state in ((0, after_1), (1, after_2)):
        root, trace = rows(state.levels[0].B, 0), rows(state.levels[0].server, 0)[0]  # the one kind: nesterov
        assert_trained_close(root, ref[r][0], params, rounds=r + 1, local_steps=H, children=3,
                             sensitivity=sens(noisy[r][0], ref[r][0]), err=f"root round {r + 1}")
        assert_trained_close(trace, ref[r][1], optimizers.get("nesterov").init(params), rounds=r + 1,
                             local_steps=H, children=3, sensitivity=sens(noisy[r][1], ref[r][1]),
                             err=f"momentum round {r + 1}")
        assert max(float(np.max(np.abs(x))) for x in jax.tree.leaves(trace)) > 0  # the momentum moved
    # Nesterov is not plain averaging: in round 1 (trace 0) the step is 1.9 * 0.7 = 1.33 x the mean delta
    mean_1 = jax.tree.map(lambda a, b: (np.asarray(a) - b) / (1.9 * OUTER_LR), rows(after_1.levels[0].B, 0), params)
    averaged = jax.tree.map(lambda p, d: p + d, params, mean_1)
    moved = max(float(np.max(np.abs(np.asarray(x) - y))) for x, y in zip(jax.tree.leaves(rows(after_1.levels[0].B, 0)),
                                                                          jax.tree.leaves(averaged)))
    assert moved > 1e3 * EPS32


def test_the_padding_slot_trains_nothing_and_writes_no_state(diloco_rounds):
    t, params, batches, after_1, _, metrics = diloco_rounds
    assert t.n_slots == 4 and t.n_clients == 3  # one padding slot, garbage tokens, client id -1
    assert metrics[0]["diverged"] == 0 and metrics[0]["level0/participants"][0] == 3
    # its garbage tokens would make a NaN loss: nothing of it reached a client's state or the model
    for part in (after_1.clients.opt, after_1.levels[0].B, after_1.levels[0].server):
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(part))
    # (client 0, whose row the padding slot gathers, has the state of its own training: the test above)


# ---- the strategy by name: its defaults beneath the config's --------------------------
def root_policy(config: Config, level: int = 0):
    return build_topology(config.run_tree(), root_policy=config.policy).levels[level].policies[0]


def test_diloco_brings_the_roots_outer_rule_and_the_config_overrides_it():
    tiny = configs.tiny()  # world -> en, de, ru: hierarchical DiLoCo
    diloco = apply_overrides(tiny, ["algorithm.name=diloco"])
    root, fed = root_policy(diloco), root_policy(diloco, 1)
    assert (root.server_optimizer, root.server_lr) == ("nesterov", 0.7)
    assert (fed.server_optimizer, fed.server_lr) == ("sgd", 1.0)  # the root's alone: federations below average
    assert diloco.tree == tiny.tree  # config.yaml keeps the tree as written
    assert apply_overrides(tiny, ["algorithm.name=hierfavg"]).run_tree() is tiny.tree  # no defaults: unchanged
    # at the root, any value wins, the Policy default included
    at_root = apply_overrides(diloco, ["tree.policy.server_lr=1.0"])
    assert (root_policy(at_root).server_optimizer, root_policy(at_root).server_lr) == ("nesterov", 1.0)
    own = apply_overrides(diloco, ["tree.own_policy.server_optimizer=momentum"])
    assert (root_policy(own).server_optimizer, root_policy(own).server_lr) == ("momentum", 0.7)
    # the config-level policy section: a value other than the default wins (and is inherited)
    section = apply_overrides(diloco, ["policy.server_lr=0.4"])
    assert root_policy(section).server_lr == root_policy(section, 1).server_lr == 0.4
    assert root_policy(section).server_optimizer == "nesterov"
    # config.yaml's round trip resolves the same tree
    again = from_dict(Config, json.loads(json.dumps(section.to_dict()))).validate()
    assert again.run_tree() == section.run_tree()
    # what the run builds (no data): the outer rule at the root, the clients' state kept
    built = blueprint.abstract_run(dataclasses.replace(diloco, run=dataclasses.replace(diloco.run, devices=1)))
    assert built.spec.plan == strategies.diloco_plan(2) and not built.spec.key_paths
    assert built.run_topology.levels[0].policies[0].server_optimizer == "nesterov"
    # the provenance table names the strategy as the source
    table = describe_config(diloco, short=True)
    assert "server_optimizer  nesterov  default of strategy diloco (not inherited)" in table
    assert "server_lr         0.7       default of strategy diloco (not inherited)" in table
    assert "default of strategy" not in describe_config(at_root, short=True).split("server_lr", 2)[-1]


def test_a_policy_field_written_at_its_default_is_refused_where_the_strategy_would_replace_it(tmp_path):
    """The config-level `policy:` section cannot tell a written 1.0 from the default
    1.0, so diloco's root would silently take 0.7: refused by every way of writing it
    (an override in either order, a YAML then an override, a grid point), and the
    spelling the error names works."""
    from worldlm_jax.cli.commands import load_config
    from worldlm_jax.sweeps.grid import point_config

    message = "policy.server_lr=1.0 is the Policy default, which strategy 'diloco' replaces at the root with 0.7"
    for order in (["policy.server_lr=1.0", "algorithm.name=diloco"], ["algorithm.name=diloco", "policy.server_lr=1.0"]):
        with pytest.raises(ConfigError, match=message):
            load_config("tiny", order)
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("base: tiny\npolicy: {server_lr: 1.0}\n")
    assert load_config(str(yaml_path)).policy.server_lr == 1.0  # fedavg: nothing replaces it
    with pytest.raises(ConfigError, match=message):
        load_config(str(yaml_path), ["algorithm.name=diloco"])
    with pytest.raises(ConfigError, match=message):
        point_config(load_config("tiny", ["algorithm.name=diloco"]), [("policy.server_lr", "1.0")])
    # not refused: a value other than the default, a field the strategy leaves alone, the root's own field
    diloco = load_config("tiny", ["algorithm.name=diloco"])
    assert apply_overrides(diloco, ["policy.server_lr=0.5"]).policy.server_lr == 0.5
    assert apply_overrides(diloco, ["policy.local_steps=1"]).policy.local_steps == 1
    fixed = load_config("tiny", ["algorithm.name=diloco", "tree.policy.server_lr=1.0", "policy.server_lr=1.0"])
    assert build_topology(fixed.run_tree(), root_policy=fixed.policy).levels[0].policies[0].server_lr == 1.0


def test_a_strategys_policy_defaults_must_name_policy_fields():
    with pytest.raises(ValueError, match=r"policy_defaults names unknown policy field\(s\) \['server_rate'\]"):
        strategies.StrategyDef(plan=lambda depth, algo: strategies.diloco_plan(depth),
                               policy_defaults={"server_rate": 0.7})
    with pytest.raises(ConfigError, match="algorithm.name='dilocco' is not a registered strategy"):
        apply_overrides(configs.tiny(), ["algorithm.name=dilocco"])


# ---- composition ----------------------------------------------------------------------
MOMENTUM = "momentum"  # a stateful client optimizer that magnifies no rounding (linear in the gradients)


def test_under_dp_the_release_is_that_of_hierfavg_and_the_inner_state_stays_on_the_client():
    """Round 1 starts every client from a fresh optimizer state, so a DP DiLoCo round 1
    releases what HierFAVG's does (same clip, same noise, the same sums); afterwards each
    client's momentum carries on, on the client."""
    t = topo(diloco_tree(3, dp_noise_multiplier=0.5, dp_clip=0.5), weights=W3, slot_multiple=4)
    batches = make_batches(t, 2, seed=2)
    params = toy_params(2)
    diloco = engine.make_strategy(make_spec(t, strategies.diloco_plan(1), client_optimizer=MOMENTUM))
    hierfavg = engine.make_strategy(make_spec(t, strategies.averaging_plan(1), client_optimizer=MOMENTUM))
    d1, _ = run(diloco, params, batches[:1])
    h1, _ = run(hierfavg, params, batches[:1])
    # two programs (one gathers the clients' kept state): the same sums, up to summation order
    assert_trained_close(d1.levels, h1.levels, jax.tree.map(np.asarray, hierfavg.init(params).levels), rounds=1,
                         local_steps=H, children=3, err="DP round 1")
    d2, m2 = run(diloco, params, batches)
    h2, _ = run(hierfavg, params, batches)
    assert m2[1]["level0/participants"][0] == 3
    assert not np.allclose(d2.levels[0].B["embed"], h2.levels[0].B["embed"])  # the carried momentum counted
    assert max(float(np.max(np.abs(x))) for x in jax.tree.leaves(d2.clients.opt)) > 0


def test_a_vectorised_sweep_over_the_outer_rate_equals_separate_runs():
    """The round vmapped over stacked states (the clients' optimizer rows included) and
    policies, as sweeps/vectorized.py runs it."""
    rates = (OUTER_LR, 0.3)
    tops = [topo(diloco_tree(3, server_lr=lr), weights=W3) for lr in rates]
    spec = make_spec(tops[0], strategies.diloco_plan(1), client_optimizer=MOMENTUM)
    strategy = engine.make_strategy(spec)
    params = toy_params(4)
    batches = make_batches(tops[0], 2, seed=4)
    policies = jax.tree.map(lambda *x: jnp.stack(x), *[engine.round_policies(t_) for t_ in tops])
    step = jax.jit(jax.vmap(engine.make_round(spec), in_axes=(0, 0, None, 0)))
    states = jax.tree.map(lambda x: jnp.stack([x, x]), strategy.init(params))
    for b in batches:
        stacked = jax.tree.map(lambda x: jnp.stack([jnp.asarray(x)] * 2), b)
        states, _ = step(states, stacked, jax.random.PRNGKey(0), policies)
    for i, t_ in enumerate(tops):
        alone, _ = run(engine.make_strategy(make_spec(t_, strategies.diloco_plan(1), client_optimizer=MOMENTUM)),
                       params, batches)
        # vmapped vs not: the same sums, possibly in another order; momentum and Nesterov are linear
        assert_trained_close(rows(states, i), alone, jax.tree.map(np.asarray, strategy.init(params)), rounds=2,
                             local_steps=H, children=3, err=f"point {i}")
    assert not np.allclose(np.asarray(states.levels[0].B["embed"][0]), np.asarray(states.levels[0].B["embed"][1]))


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """The clients' AdamW states and the root's momentum are engine state, so a
    checkpoint holds them: save after round 2, restore, run round 3."""
    t = topo(diloco_tree(3), weights=W3)
    strategy = engine.make_strategy(make_spec(t, strategies.diloco_plan(1)))
    batches = make_batches(t, 3, seed=6)
    params = toy_params(5)
    whole, _ = run(strategy, params, batches)
    state = strategy.init(params)
    for r, b in enumerate(batches[:2]):
        state, _ = strategy.run_round(state, to_device(b), jax.random.PRNGKey(0))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    with Checkpointer(tmp_path) as ck:
        assert ck.save(2, state, {"round": 2})
    del state
    with Checkpointer(tmp_path) as ck:
        restored, host = ck.restore(abstract_state=abstract)
    assert host["round"] == 2 and int(jax.tree.leaves(restored.clients.opt)[0][0]) == 2 * H
    resumed, _ = strategy.run_round(restored, to_device(batches[2]), jax.random.PRNGKey(0))
    assert_tree_equal(jax.tree.map(np.asarray, resumed), whole, err="resumed")


def test_on_a_mesh_the_clients_optimizer_rows_shard_and_the_round_is_the_same():
    """What several processes run: one program on a mesh spanning the devices, the
    clients' optimizer state a per-client row like every client-level state."""
    if jax.device_count() < 2:
        pytest.skip("needs 2 (fake CPU) devices: conftest sets XLA_FLAGS before JAX starts")
    t = topo(diloco_tree(4), slot_multiple=2)
    params = toy_params(6)
    batches = make_batches(t, 2, seed=7)
    single = engine.make_strategy(make_spec(t, strategies.diloco_plan(1), client_optimizer=MOMENTUM))
    meshed = engine.make_strategy(make_spec(t, strategies.diloco_plan(1), client_optimizer=MOMENTUM,
                                            mesh=parallel.make_mesh(2)))
    state = meshed.init(params)
    trace = jax.tree.leaves(state.clients.opt)[-1]
    assert len(trace.sharding.device_set) == 2 and not trace.sharding.is_fully_replicated
    a, _ = run(meshed, params, batches)
    b, _ = run(single, params, batches)
    # the same sums over other devices: equal up to summation order (momentum and Nesterov are linear)
    assert_trained_close(a, b, jax.tree.map(np.asarray, single.init(params)), rounds=2, local_steps=H, children=4)


# ---- a real run -----------------------------------------------------------------------
def test_worldlm_train_with_diloco_learns(tmp_path):
    code, out, err = run_cli(["train", "--config", "tiny", "--workdir", str(tmp_path), "--quiet",
                              "--set", "algorithm.name=diloco", "--set", "run.rounds=3", "--set", "run.devices=1"])
    assert code == 0, err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["algorithm"] == "diloco" and summary["rounds_completed"] == 3
    assert math.isfinite(summary["eval"]["perplexity"]) and summary["eval"]["perplexity"] < 256
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    per_round = [r for r in records if "train_loss" in r]
    assert per_round[-1]["train_loss"] < per_round[0]["train_loss"]
    assert all(r["server_lr"]["world"] == pytest.approx(OUTER_LR) for r in per_round)
    assert all(r["server_lr"]["en"] == pytest.approx(1.0) for r in per_round)
