"""A vectorised sweep is one compiled program, equals separate runs, and spreads
its points over the devices (a sweep x clients mesh)."""
import contextlib
import io
import json

import jax
import numpy as np
import pytest

from worldlm_jax import cli, configs, engine, parallel, train, vectorized
from worldlm_jax.config import apply_overrides


def run_cli(argv):
    """(exit code, stdout, stderr) of cli.main(argv)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def separate_run(exp, config):
    """One point trained alone on all 8 devices (a 1-D `clients` mesh), as
    `train.train` trains it, its policies given to the round as an input (so
    the 4 points share one compilation here too): (evaluation, final state
    with its real rows only)."""
    policies = vectorized._policies(exp, config)
    state = train.place_state(exp, exp.strategy.init(exp.init_params))
    key = jax.random.PRNGKey(config.run.seed + 1)
    for r in range(config.run.rounds):
        state, _ = exp.strategy.run_round(state, train._put(exp, train.make_batch(exp, r)), key, policies)
    evaluation = train.describe_eval(exp, np.asarray(exp.eval_fn(state)))
    return evaluation, jax.device_get(engine.unpad_state(exp.spec, state))


def test_four_points_on_a_4x2_mesh_equal_separate_runs_in_one_program(tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake CPU) devices: conftest sets XLA_FLAGS before JAX starts")
    # shard_state_mb=0: the language level's small state is sharded too, so its placement shows
    base = apply_overrides(configs.tiny(), ["run.rounds=2", "algorithm.name=worldlm", "run.shard_state_mb=0"])
    points = [apply_overrides(base, [f"policy.client_lr={lr}"]) for lr in (3e-4, 1e-3, 3e-3, 1e-2)]
    evals, states, compiles = vectorized.run(points, sweep_devices=4)
    assert compiles == 1

    # Where the points live: point i on devices 2i, 2i+1 (mesh row i), never on all 8.
    mesh = parallel.make_mesh(8, sweep=4)
    group = {d.id: i for i, row in enumerate(mesh.devices) for d in row}
    wide = states.levels[1].B  # 3 language federations, stored as 4 rows: 2 per device of a point
    for leaf in jax.tree.leaves(states):
        assert leaf.sharding.spec[0] == parallel.SWEEP_AXIS
        for shard in leaf.addressable_shards:
            assert shard.data.shape[0] == 1  # one point per device, not 4
            assert shard.index[0] == slice(group[shard.device.id], group[shard.device.id] + 1)
    for leaf in jax.tree.leaves(wide):
        assert tuple(leaf.sharding.spec)[:2] == (parallel.SWEEP_AXIS, parallel.AXIS)
        assert {s.data.shape[:2] for s in leaf.addressable_shards} == {(1, 2)}

    sweep_exp = vectorized.sweep_experiment(base, 8, 4)
    assert sweep_exp.run_topology.n_slots == 6  # slots padded to the 2 devices of a point, not to 8
    alone = train.build_experiment(base)
    assert alone.mesh.shape == {parallel.AXIS: 8}
    for i, config in enumerate(points):
        evaluation, state = separate_run(alone, config)
        # Not bit-exact: a separate run sums its clients' updates over 8 devices,
        # a point over 2 (another order of float additions), and the vmapped
        # matmuls over points may accumulate in another order. Adam's first steps
        # (g / sqrt(v)) turn last-bit noise in near-zero gradients into
        # differences of up to about the learning rate in a few entries, so states
        # compare by relative norm per leaf (measured: <= 5e-4 at lr 1e-2;
        # 2e-7 at lr 3e-4), perplexities element-wise.
        np.testing.assert_allclose(evals[i]["perplexity"], evaluation["perplexity"], rtol=2e-4)
        for name in evaluation["per_federation"]:
            np.testing.assert_allclose(evals[i]["per_federation"][name], evaluation["per_federation"][name],
                                       rtol=2e-4)
        point = engine.unpad_state(sweep_exp.spec, jax.tree.map(lambda x: np.asarray(x)[i], states))
        for a, b in zip(jax.tree.leaves(point), jax.tree.leaves(state)):
            assert a.shape == b.shape
            with np.errstate(invalid="ignore"):  # equal infinities (clip norms without DP) are no gap
                gap = np.where(a == b, 0.0, a - b)
            assert np.linalg.norm(gap) <= 2e-3 * max(np.linalg.norm(np.where(np.isfinite(b), b, 0.0)), 1e-6)
    # the points really differ: the sweep is not four copies of one run
    assert len({round(e["perplexity"], 3) for e in evals}) == 4


def test_sweep_devices_default_to_the_largest_divisor_not_above_the_points():
    assert vectorized.choose_sweep_devices(8, 4) == 4
    assert vectorized.choose_sweep_devices(8, 3) == 2  # 2 x 4, one padding point
    assert vectorized.choose_sweep_devices(8, 16) == 8
    assert vectorized.choose_sweep_devices(1, 4) == 1
    assert vectorized.choose_sweep_devices(8, 3, requested=1) == 1
    with pytest.raises(ValueError, match="divide"):
        vectorized.choose_sweep_devices(8, 4, requested=3)


def test_the_cli_vectorised_sweep_writes_every_point_like_a_grid_sweep(tmp_path):
    """3 points on 4 devices: 2 x 2 by default (a padding point); each point gets
    summary.json and metrics.jsonl, and `worldlm report` reads the sweep dir.
    (FedAvg: its flat round compiles in half the time of WorldLM's.)"""
    code, out, err = run_cli(["sweep", "--config", "tiny", "--set", "run.rounds=2", "--set", "run.devices=4",
                              "--set", "run.eval_every=1", "--set", "algorithm.name=fedavg", "--grid", "policy.client_lr=1e-3,3e-3,1e-2",
                              "--vectorized", "--workdir", str(tmp_path)])
    assert code == 0, err
    assert "2 x 2 device(s)" in out
    table = json.loads((tmp_path / "sweep.json").read_text())["points"]
    assert [p["name"] for p in table] == [f"policy.client_lr={v}" for v in ("1e-3", "3e-3", "1e-2")]
    for point in table:
        run_dir = tmp_path / point["name"]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["algorithm"] == "fedavg" and summary["rounds_completed"] == 2
        assert summary["compiles"] == 1 and summary["vectorized"]["mesh"] == {"sweep": 2, "clients": 2}
        assert summary["eval"]["perplexity"] == point["perplexity"]
        assert summary["bytes_communicated"]["total"] > 0
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records if "train_loss" in r] == [0, 1]
        assert [r["round"] for r in records if "eval" in r] == [0, 1] and records[-1].get("final")
        assert set(records[0]["client_lr"].values()) == {float(point["assignments"]["policy.client_lr"])}
    assert len({p["perplexity"] for p in table}) == 3
    code, out, err = run_cli(["report", str(tmp_path), "--out", str(tmp_path / "report")])
    assert code == 0, err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [r["run"] for r in report["runs"]] == [p["name"] for p in table]


def test_sweep_rejects_points_that_change_shapes():
    base = configs.tiny()
    with pytest.raises(ValueError, match="differ only"):
        vectorized.check_static([base, apply_overrides(base, ["data.batch_size=3"])])


def test_sweep_rejects_points_that_change_the_key_layer_rule():
    """k_agg decides whether the compiled round keeps every client's K (attention)
    or streams their mean, so one program cannot serve both."""
    base = apply_overrides(configs.tiny(), ["run.rounds=1", "algorithm.name=worldlm"])
    with pytest.raises(ValueError, match="k_agg"):
        vectorized.run([base, apply_overrides(base, ["policy.k_agg=mean"])])


def test_a_sweep_over_warmup_lengths_is_one_program_and_each_point_warms_up_as_alone():
    """Schedules are evaluated from the round index inside the round, their
    lengths are policy arrays: points with other warmups share the program."""
    base = apply_overrides(configs.tiny(), ["run.rounds=2", "policy.client_lr=3e-3",
                                            "policy.client_lr_schedule=warmup_cosine"])
    points = [apply_overrides(base, [f"policy.warmup_rounds={w}"]) for w in (0, 4)]
    evals, _, compiles = vectorized.run(points)
    assert compiles == 1
    assert evals[0]["perplexity"] != evals[1]["perplexity"]
    alone = train.build_experiment(base)
    evaluation, _ = separate_run(alone, points[1])
    np.testing.assert_allclose(evals[1]["perplexity"], evaluation["perplexity"], rtol=2e-4)


def test_sweep_rejects_points_that_change_a_named_rule():
    base = apply_overrides(configs.tiny(), ["run.rounds=1"])
    with pytest.raises(ValueError, match="aggregator"):
        vectorized.run([base, apply_overrides(base, ["policy.aggregator=median"])])
