"""Plug-ins that report metrics (`metrics` on an Aggregator or a ClientObjective)
and per-client metrics (`run.client_metrics`).

Two toy rounds, compiled once each and shared: one with per-client metrics,
a stacked and a streamed aggregator and an objective that report metrics,
a NaN attacker and padding slots (recorded through `records.round_record`
into metrics.jsonl); one with a DP federation, on two devices in chunks of
one slot. The rest is traced (`jax.eval_shape`) or refused before tracing.
"""
import dataclasses
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_helpers import documented_form
from engine_helpers import make_batches, make_spec, run, toy_params, topo, tree2
from worldlm_jax import engine, tree_ops
from worldlm_jax.engine import parallel, releases
from worldlm_jax.outputs import metrics as metrics_lib
from worldlm_jax.plugins import aggregators, objectives
from worldlm_jax.run import records

W = np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)  # F0: clients 0-2 (client 0 attacks with NaN), F1: 3-4
STEPS = 2
KEPT = "plugin/aggregator/counting_median/kept"
NORM = "plugin/aggregator/counting_median/mean_norm"
CLIPPED = "plugin/aggregator/clipped_mean/clipped"
OBJ = "plugin/objective/reporting/"


def counted_norms(delta_N, weight_N, parent_N, n_parents, args_P):
    """How many children each federation aggregates, and their mean update norm
    (a NaN row's norm is NaN: selected away, never multiplied by its weight 0)."""
    member = aggregators.members(weight_N, parent_N, n_parents)
    norm = jnp.sqrt(tree_ops.row_sq_norms(delta_N))
    kept = jnp.sum(member, axis=1).astype(jnp.float32)
    return {"kept": kept, "mean_norm": jnp.sum(jnp.where(member, norm[None], 0.0), axis=1) / jnp.maximum(kept, 1.0)}


def moved(ctx, params, steps, lr):
    return {"steps": steps, "moved": objectives.squared_distance(params, ctx.start)}


@pytest.fixture(scope="module", autouse=True)
def registered():
    """A stacked aggregator and an objective that report metrics, for this module only."""
    entries = [(aggregators.AGGREGATORS, "counting_median",
                aggregators.Aggregator(combine=aggregators.get("median").combine, metrics=counted_norms)),
               (objectives.OBJECTIVES, "reporting", objectives.ClientObjective(metrics=moved))]
    for registry, name, entry in entries:
        registry.register(name, entry)
    yield
    for registry, name, _ in entries:
        del registry._entries[name]


def tree(fed_policies, root="counting_median"):
    return topo(tree2([3, 2], root_policy={"aggregator": root, "local_steps": STEPS}, fed_policies=fed_policies),
                weights=W, slot_multiple=8)  # 5 clients in 8 slots: 3 padding slots


def spec_of(t, **fields):
    return dataclasses.replace(make_spec(t), client_objective="reporting", **fields)


NAN_ATTACKER = {"attack": "nan", "attackers": 1}
CLIP_ALL = {"aggregator": "clipped_mean", "aggregator_args": {"clip": 1e-6}}  # every real update is clipped


@functools.cache
def metered():
    """(topology, spec, strategy, metrics) of one round: F0 counts with the test
    aggregator and holds a NaN attacker, F1 clips every update, per-client metrics on."""
    t = tree([dict(NAN_ATTACKER, aggregator="counting_median"), CLIP_ALL])
    spec = spec_of(t, client_metrics=True)
    strategy = engine.make_strategy(spec)
    return t, spec, strategy, run(strategy, toy_params(), make_batches(t, 1))[1][0]


def test_an_aggregator_metric_counts_the_participants_whatever_the_other_rows_hold():
    _, _, _, m = metered()
    np.testing.assert_array_equal(m["level1/participants"], [2.0, 2.0])  # the NaN attacker does not count
    np.testing.assert_array_equal(m[f"level1/{KEPT}"], [2.0, np.nan])  # F1 runs clipped_mean: no value
    np.testing.assert_array_equal(m[f"level0/{KEPT}"], m["level0/participants"])
    norms = m["clients/update_norm"]
    np.testing.assert_allclose(m[f"level1/{NORM}"][0], np.mean(norms[1:3]), rtol=1e-5)  # finite: NaN row unread
    np.testing.assert_array_equal(m[f"level1/{CLIPPED}"], [np.nan, 1.0])  # a streamed metric, averaged


def test_an_objective_metric_is_its_participating_clients_mean():
    _, _, _, m = metered()
    np.testing.assert_array_equal(m[f"level1/{OBJ}steps"], [STEPS, STEPS])
    sq = m["clients/update_norm"] ** 2  # no key layers: the backbone is the whole model
    np.testing.assert_allclose(m[f"level1/{OBJ}moved"], [np.mean(sq[1:3]), np.mean(sq[3:5])], rtol=1e-4)


def test_client_metrics_agree_with_the_federation_metrics():
    t, _, _, m = metered()
    loss, weight = m["clients/train_loss"], m["clients/weight"]
    assert loss.shape == weight.shape == (t.n_clients,)
    assert np.isnan(loss[0]) and np.isnan(weight[0]) and np.isnan(m["clients/update_norm"][0])  # diverged
    np.testing.assert_array_equal(weight[1:], W[1:])
    per_federation = m["train_loss_sum"] / m["train_clients"]
    np.testing.assert_allclose([np.mean(loss[1:3]), np.mean(loss[3:5])], per_federation, rtol=1e-6)


def recorded(t, m, tmp_path):
    """The round's per-node metrics as metrics.jsonl holds them (`records.node_metrics`)."""
    with metrics_lib.MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write({"round": 0, **records.node_metrics(t, m)})
    assert "NaN" not in open(tmp_path / metrics_lib.METRICS_FILE).read()  # strict JSON: null, not NaN
    return metrics_lib.read_metrics(tmp_path / metrics_lib.METRICS_FILE)[0]


def test_the_record_names_federations_and_writes_null_where_there_is_no_value(tmp_path):
    t, _, _, m = metered()
    record = recorded(t, m, tmp_path)
    assert record[f"level1/{KEPT}"] == {"F0": 2.0, "F1": None}
    assert record[f"level0/{KEPT}"] == {"root": 2.0}
    assert record["clients/train_loss"][0] is None and all(isinstance(v, float) for v in record["clients/weight"][1:])
    tags = dict(metrics_lib.flatten_scalars(record))  # what TensorBoard gets
    assert tags[f"level1/{KEPT}/F0"] == 2.0 and f"level1/{KEPT}/F1" not in tags
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "metrics.md")).read()
    documented = set(re.findall(r"`([a-z_{}/0-9]+)`", doc))
    assert {documented_form(k) for k in record} - documented == set()


def test_a_vectorised_sweep_records_each_points_metrics(tmp_path):
    """The round vmapped over two points gives every metric a leading point
    axis; each point's slice (as `records.RoundLogger` takes it) is recorded."""
    t, spec, strategy, m = metered()
    state = jax.eval_shape(strategy.init, toy_params())
    batch = engine.RoundBatch(*(jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in make_batches(t, 1)[0]))
    stack = lambda tree: jax.tree.map(lambda s: jax.ShapeDtypeStruct((2,) + s.shape, s.dtype), tree)
    keys = jax.ShapeDtypeStruct((2, 2), jnp.uint32)
    _, shapes = jax.eval_shape(jax.vmap(engine.make_round(spec)), stack(state), stack(batch), keys)
    assert shapes[f"level1/{KEPT}"].shape == (2, 2) and shapes["clients/weight"].shape == (2, t.n_clients)
    stacked = {k: np.stack([v, v]) for k, v in m.items()}
    for i in range(2):
        record = recorded(t, {k: v[i] for k, v in stacked.items()}, tmp_path / str(i))
        assert record[f"level1/{KEPT}"] == {"F0": 2.0, "F1": None}


def test_a_dp_federation_reports_no_plugin_metric_on_a_mesh_in_chunks():
    """F1 is DP: the objective's metric is null there; F0's streamed metric is
    summed over chunks of one slot and two devices, the NaN attacker left out."""
    if len(jax.devices()) < 2:
        pytest.skip("needs two devices")
    t = topo(tree2([3, 2], root_policy={"local_steps": STEPS},
                   fed_policies=[dict(NAN_ATTACKER, **CLIP_ALL), {"dp_clip": 1.0, "dp_noise_multiplier": 0.5}]),
             weights=W, slot_multiple=2)
    spec = spec_of(t, mesh=parallel.make_mesh(2), chunk=1)
    m = run(engine.make_strategy(spec), toy_params(), make_batches(t, 1))[1][0]
    np.testing.assert_array_equal(m[f"level1/{OBJ}steps"], [STEPS, np.nan])
    np.testing.assert_array_equal(m[f"level1/{CLIPPED}"], [1.0, np.nan])
    with pytest.raises(releases.ReleaseError) as refused:
        engine.make_round(dataclasses.replace(spec, client_metrics=True))
    message = str(refused.value)
    assert "\n" not in message and "federation 'F1'" in message and "run.client_metrics" in message, message


def test_client_metrics_off_add_no_output():
    t = tree([{}, {}], root="mean")
    shapes = {}
    for on in (False, True):
        strategy = engine.make_strategy(dataclasses.replace(make_spec(t), client_metrics=on), jit=False)
        state = jax.eval_shape(strategy.init, toy_params())
        batch = engine.RoundBatch(*(jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
                                    for x in make_batches(t, 1)[0]))
        shapes[on] = jax.eval_shape(strategy.run_round, state, batch, jax.random.PRNGKey(0))[1]
    extra = {"clients/train_loss", "clients/update_norm", "clients/weight"}
    assert not any(k.startswith("clients/") or "/plugin/" in k for k in shapes[False])
    assert set(shapes[True]) - set(shapes[False]) == extra
    assert {k: v for k, v in shapes[True].items() if k not in extra} == shapes[False]
    assert all(shapes[True][k].shape == (t.n_clients,) for k in extra)


def test_nested_rounds_average_what_has_a_value():
    from worldlm_jax.engine.round import _reduce_rounds

    out = _reduce_rounds({"level1/rounds": jnp.array([[1.0], [1.0]]),
                          "level1/plugin/aggregator/x/kept": jnp.array([[2.0], [jnp.nan]]),
                          "clients/weight": jnp.array([[jnp.nan, 1.0], [jnp.nan, 3.0]])})
    np.testing.assert_array_equal(out["level1/plugin/aggregator/x/kept"], [2.0])
    np.testing.assert_array_equal(out["clients/weight"], [np.nan, 2.0])  # a client that never counted: NaN
