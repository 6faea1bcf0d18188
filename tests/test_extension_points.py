"""The round's plug-in points: schedules, client objectives, aggregators, and a
stateful method (SCAFFOLD, from scripts/examples) built from them alone."""
import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_helpers import (LR, STEPS, assert_tree_close, assert_tree_equal, flat_tree, make_batches, make_spec,
                            run, toy_params, topo, tree2)
from worldlm_jax import engine
from worldlm_jax.engine import strategies
from worldlm_jax.plugins import aggregators, schedules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name):
    path = os.path.join(ROOT, "scripts", "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def strategy(tree_spec, weights=None, objective="none", total_rounds=1, **spec_kw):
    t = topo(tree_spec, weights=weights)
    spec = make_spec(t, client_optimizer="test_sgd", **spec_kw)
    return t, engine.make_strategy(dataclasses.replace(spec, client_objective=objective,
                                                           total_rounds=total_rounds))


# ---- schedules ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["constant", "linear_warmup", "cosine", "warmup_cosine"])
def test_schedule_shapes(name):
    fn = schedules.SCHEDULES.get(name)
    f = lambda r: float(fn(jnp.float32(r), jnp.float32(4), jnp.float32(12), jnp.float32(0.1)))
    values = [f(r) for r in range(14)]
    assert all(0.1 - 1e-6 <= v <= 1.0 + 1e-6 for v in values)
    if name in ("linear_warmup", "warmup_cosine"):
        assert values[0] == pytest.approx(0.25) and values[3] == pytest.approx(1.0)
        assert values[:4] == sorted(values[:4])
    if name in ("cosine", "warmup_cosine"):
        assert values[12] == pytest.approx(0.1) and values[13] == pytest.approx(0.1)  # the floor, held
        start = 0 if name == "cosine" else 3
        assert values[start:13] == sorted(values[start:13], reverse=True)
    if name == "constant":
        assert values == [1.0] * 14


def test_warmup_round_equals_a_constant_run_at_the_warmed_rate():
    """Round r of a linear warmup over W rounds trains as a constant run at lr (r+1)/W."""
    warm = flat_tree(2, local_steps=STEPS, client_lr=LR, client_lr_schedule="linear_warmup", warmup_rounds=4)
    quarter = flat_tree(2, local_steps=STEPS, client_lr=LR / 4)
    _, s_warm = strategy(warm)
    t, s_quarter = strategy(quarter)
    batches = make_batches(t, 2)
    state_w, metrics_w = run(s_warm, toy_params(), batches[:1])
    state_q, _ = run(s_quarter, toy_params(), batches[:1])
    assert_tree_close(state_w.levels, state_q.levels, atol=1e-7)
    assert metrics_w[0]["level0/client_lr"][0] == pytest.approx(LR / 4)
    _, metrics_w = run(s_warm, toy_params(), batches)
    assert metrics_w[1]["level0/client_lr"][0] == pytest.approx(LR / 2)  # the rate actually used, per round


def test_server_schedule_per_federation_in_one_program():
    """Federations follow their own server schedules; the root its own."""
    spec = tree2([2, 2], root_policy=dict(local_steps=STEPS, client_lr=LR),
                 fed_policies=[{"server_lr_schedule": "cosine", "decay_rounds": 2}, {}])
    _, s = strategy(spec, total_rounds=3)
    t = topo(spec)
    _, metrics = run(s, toy_params(), make_batches(t, 3))
    lrs = np.array([m["level1/server_lr"] for m in metrics])
    np.testing.assert_allclose(lrs[:, 0], [1.0, 0.5, 0.0], atol=1e-6)  # cosine to 0 by round 2
    np.testing.assert_allclose(lrs[:, 1], [1.0, 1.0, 1.0])
    assert s.run_round._cache_size() == 1


# ---- client objectives ------------------------------------------------------------------
def test_fedprox_with_mu_zero_equals_fedavg():
    plain = flat_tree(3, local_steps=STEPS, client_lr=LR)
    prox = flat_tree(3, local_steps=STEPS, client_lr=LR, objective_args={"mu": 0.0})
    t, s_plain = strategy(plain)
    _, s_prox = strategy(prox, objective="fedprox")
    batches = make_batches(t, 2)
    assert_tree_equal(run(s_plain, toy_params(), batches)[0], run(s_prox, toy_params(), batches)[0])


def test_fedprox_large_mu_keeps_clients_near_their_start():
    """Per-federation mu in one round: the federation with a large mu moves far less."""
    spec = tree2([2, 2], root_policy=dict(local_steps=10, client_lr=0.05),
                 fed_policies=[{"objective_args": {"mu": 0.0}}, {"objective_args": {"mu": 20.0}}])
    t = topo(spec)
    s = engine.make_strategy(dataclasses.replace(
        make_spec(t, strategies.worldlm_plan(2, residuals="none"), client_optimizer="test_sgd"),
        client_objective="fedprox"))
    _, metrics = run(s, toy_params(), make_batches(t, 1))
    free, held = metrics[0]["level1/update_norm"]
    assert held < 0.25 * free  # at most |g| / mu from the start, against 10 lr |g| free


def test_objective_arguments_must_be_declared():
    spec = flat_tree(2, objective_args={"nu": 1.0})
    with pytest.raises(ValueError, match="objective_args.*fedprox.*mu.*nu"):
        strategy(spec, objective="fedprox")


# ---- aggregators ---------------------------------------------------------------------
def _rows(values):
    return {"w": jnp.asarray(values, jnp.float32)}


@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_stacked_rules_ignore_absent_children_and_order(name):
    agg = aggregators.get(name)
    x = _rows([[1.0], [2.0], [100.0], [-50.0], [3.0]])
    weight = jnp.asarray([1.0, 1.0, 1.0, 0.0, 1.0])  # child 3 absent
    parent = jnp.asarray([0, 0, 0, 0, 1])
    args = {"trim": jnp.asarray([0.34, 0.34, 0.34])}  # drops floor(0.34 n) at each end
    out = agg.combine(x, weight, parent, 3, args)["w"][:, 0]
    expected = {"median": 2.0, "trimmed_mean": 2.0}[name]  # of {1, 2, 100}: trimmed drops 1 and 100
    assert float(out[0]) == pytest.approx(expected)
    assert float(out[1]) == pytest.approx(3.0)  # one child: itself
    assert float(out[2]) == 0.0  # no children: no update
    perm = jnp.asarray([4, 2, 0, 3, 1])
    permuted = agg.combine(jax.tree.map(lambda a: a[perm], x), weight[perm], parent[perm], 3, args)
    np.testing.assert_allclose(permuted["w"], agg.combine(x, weight, parent, 3, args)["w"])


def test_trimmed_mean_keeps_at_least_one_value():
    out = aggregators.get("trimmed_mean").combine(_rows([[1.0], [5.0]]), jnp.ones(2), jnp.zeros(2, jnp.int32), 1,
                                                   {"trim": jnp.asarray([0.5])})
    assert float(out["w"][0, 0]) == pytest.approx(3.0)  # n = 2, trim 0.5: nothing left to drop safely


def _client_deltas(tree_spec, n, batches):
    """Each client's own backbone update: FedAvg rounds where only that client
    has weight (one compiled round for all of them)."""
    t, s = strategy(tree_spec)
    batches = make_batches(t, 1)
    deltas = []
    for c in range(n):
        alone = [b._replace(slot_weight=np.where(b.slot_client == c, b.slot_weight, 0.0).astype(np.float32))
                 for b in batches]
        state, _ = run(s, toy_params(), alone)
        deltas.append(jax.tree.map(lambda b, p: b[0] - p, state.levels[0].B, toy_params()))
    return deltas


@pytest.mark.parametrize("chunk", [0, 1])
def test_median_aggregator_is_the_coordinate_median_of_the_client_updates(chunk):
    base = dict(local_steps=STEPS, client_lr=LR)
    deltas = _client_deltas(flat_tree(3, **base), 3, None)
    t, s = strategy(flat_tree(3, aggregator="median", **base), chunk=chunk)
    state, metrics = run(s, toy_params(), make_batches(t, 1))
    expected = jax.tree.map(lambda *d: np.median(np.stack(d), axis=0), *deltas)
    got = jax.tree.map(lambda b, p: b[0] - p, state.levels[0].B, toy_params())
    assert_tree_close(got, expected, atol=1e-6)


def test_trimmed_mean_without_trimming_equals_the_mean_of_equal_weights():
    base = dict(local_steps=STEPS, client_lr=LR)
    t, s_mean = strategy(flat_tree(4, **base))
    _, s_trim = strategy(flat_tree(4, aggregator="trimmed_mean", aggregator_args={"trim": 0.0}, **base))
    batches = make_batches(t, 2)
    assert_tree_close(run(s_mean, toy_params(), batches)[0].levels, run(s_trim, toy_params(), batches)[0].levels,
                      atol=1e-6)


def test_clipped_mean_bounds_each_update():
    base = dict(local_steps=STEPS, client_lr=1.0)
    t, s = strategy(flat_tree(3, aggregator="clipped_mean", aggregator_args={"clip": 1e-3}, **base))
    _, metrics = run(s, toy_params(), make_batches(t, 1))
    assert metrics[0]["level0/update_norm"][0] <= 1e-3 + 1e-7


# ---- a stateful method from the extension points alone: SCAFFOLD ------------------------
def _skewed(batches, n_clients):
    """Client c sees only tokens in [3c, 3c + 3): label-skewed clients."""
    out = []
    for b in batches:
        tokens = b.tokens % 3 + 3 * np.maximum(b.slot_client, 0)[..., :, None, None, None]
        out.append(b._replace(tokens=tokens.astype(np.int32)))
    return out


def test_scaffold_with_zero_control_variates_equals_fedavg_then_drifts_less():
    load_example("scaffold")
    base = dict(local_steps=8, client_lr=0.2)
    t, s_avg = strategy(flat_tree(3, **base))
    _, s_scaffold = strategy(flat_tree(3, **base), objective="scaffold")
    batches = _skewed(make_batches(t, 6), 3)
    first_avg, _ = run(s_avg, toy_params(), batches[:1])
    first_scaffold, _ = run(s_scaffold, toy_params(), batches[:1])
    assert_tree_equal(first_avg.levels[0].B, first_scaffold.levels[0].B)  # c = c_i = 0: plain FedAvg
    assert np.any(np.asarray(jax.tree.leaves(first_scaffold.clients.objective)[0]) != 0)  # and it learned c_i
    _, m_avg = run(s_avg, toy_params(), batches)
    _, m_scaffold = run(s_scaffold, toy_params(), batches)
    drift = lambda ms: np.mean([m["level0/update_spread"][0] for m in ms[2:]])
    assert drift(m_scaffold) < 0.7 * drift(m_avg)


# ---- bad names and arguments: one line, before anything runs ---------------------------
@pytest.mark.parametrize("override, names", [
    ("policy.server_optimizer=nope", ["server_optimizer", "nope", "registered: adagrad"]),
    ("policy.aggregator=medain", ["aggregator", "medain", "median"]),
    ("policy.client_lr_schedule=cosin", ["client_lr_schedule", "cosin", "warmup_cosine"]),
    ("policy.aggregator_args.trim=0.2", ["aggregator_args", "trim", "mean"]),
    ("algorithm.client_objective=fedproxy", ["client_objective", "fedproxy", "fedprox"]),
    ("policy.objective_args.nu=0.2", ["objective_args", "nu", "mu"]),
    ("policy.warmup_rounds=-1", ["warmup_rounds", "-1"]),
])
def test_a_bad_plug_in_name_or_argument_is_one_line_naming_it(override, names):
    import contextlib
    import io

    from worldlm_jax.cli import parser as cli
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["plan", "--config", "tiny", "--set", "algorithm.client_objective=fedprox", "--set", override])
    message = err.getvalue().strip()
    assert code != 0 and "Traceback" not in message and len(message.splitlines()) == 1, message
    assert all(n in message for n in names), message
