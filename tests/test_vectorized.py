"""A vectorised sweep is one compiled program, equals separate runs, and spreads
its points over the devices (a sweep x clients mesh).

Tolerances (`summation_rtol`): a vectorised point and its separate run compute
the same function, only with their float32 sums in another order (the point's
clients are summed over another number of devices, and vmapped products may
accumulate in another order). By Higham's bound, a sum of n terms computed in
any order is within (n - 1) u sum|x_i| of the exact sum (u = eps / 2), so two
orders are within n eps of each other, relative to the summed magnitudes. An
entry of a parameter update is a product of factors, each made by a chain of
such sums (the step's B L tokens; per block the d_model, seq_len and d_ff
contractions, forwards and backwards; the vocabulary's softmax; the weighted
sums over clients and children); relative errors of factors add, so one update
is within (chain length) eps, and the rounds x local_steps updates (plus the
evaluation's pass) add theirs. That is a worst case: every rounding aligned.

It assumes the training does not amplify differences between steps, so these
tests train with plain SGD at moderate rates (lr |H| < 1: at rates <= 0.2 the
measured gaps are 1e-7 to 1e-5, at 0.4 already 1e-4, so the dynamics start to
amplify there). Adam is left out on purpose: its first steps move each entry by
lr * g / (|g| + eps_adam), about +-lr for any gradient entry above 1e-8, so an
entry whose gradient cancels to the rounding noise moves by +-lr depending on
the last bit of a sum. No bound in units of eps covers that (on an Intel Xeon a
leaf of the old Adam version of the 4-point test differed by 0.0051 in norm, 1%
of its norm), and the program being tested is the same for every client optimizer.
"""
import contextlib
import dataclasses
import io
import json

import jax
import numpy as np
import pytest

from worldlm_jax import engine
from worldlm_jax.cli import parser as cli
from worldlm_jax.config import apply_overrides, presets as configs
from worldlm_jax.engine import parallel
from worldlm_jax.run import experiment as experiment_lib, records as records_lib
from worldlm_jax.sweeps import vectorized
from worldlm_jax.tree.topology import build_topology

EPS32 = float(np.finfo(np.float32).eps)
GENTLE_SGD = ["algorithm.client_optimizer=sgd"]  # the argument above; rates set per test
# the slowest comparisons run the tiny model with one block: it compiles in about half the
# time, and what they compare (sums over devices and points, the draws) does not depend on depth
ONE_BLOCK = ["model.n_layers=1"]


def summation_rtol(config) -> float:
    """Relative gap two float32 summation orders of `config`'s run may show
    (module docstring): chain length x (updates + the evaluation) x eps."""
    m, d = config.model, config.data
    topo = build_topology(config.tree, root_policy=config.policy)
    chain = (d.batch_size * d.seq_len + 2 * m.n_layers * (m.d_model + d.seq_len + (m.d_ff or 4 * m.d_model))
             + m.vocab_size + topo.n_clients)
    updates = config.run.rounds * int(np.prod(engine.level_rounds(topo))) * engine.local_steps(topo)
    return chain * (updates + 1) * EPS32


def assert_states_close(a_tree, b_tree, rtol: float) -> None:
    """Per leaf, the gap's norm within rtol of the leaf's norm (equal infinities,
    e.g. clip norms without DP, are no gap)."""
    for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
        assert a.shape == b.shape
        with np.errstate(invalid="ignore"):
            gap = np.where(a == b, 0.0, a - b)
        assert np.linalg.norm(gap) <= rtol * max(np.linalg.norm(np.where(np.isfinite(b), b, 0.0)), 1e-6)


def assert_evals_close(got: dict, want: dict, rtol: float) -> None:
    """Log perplexity (the mean NLL, one more pass of the chain) within rtol."""
    np.testing.assert_allclose(np.log(got["perplexity"]), np.log(want["perplexity"]), rtol=rtol)
    for name in want["per_federation"]:
        np.testing.assert_allclose(np.log(got["per_federation"][name]), np.log(want["per_federation"][name]),
                                   rtol=rtol)


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
    state = experiment_lib.place_state(exp, exp.strategy.init(exp.init_params))
    key = jax.random.PRNGKey(config.run.seed + 1)
    for r in range(config.run.rounds):
        state, _ = exp.strategy.run_round(state, experiment_lib._put(exp, experiment_lib.make_batch(exp, r)), key, policies)
    evaluation = records_lib.describe_eval(exp, np.asarray(exp.eval_fn(state)))
    return evaluation, jax.device_get(engine.unpad_state(exp.spec, state))


def test_four_points_on_a_4x2_mesh_equal_separate_runs_in_one_program(tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake CPU) devices: conftest sets XLA_FLAGS before JAX starts")
    # shard_state_mb=0: the language level's small state is sharded too, so its placement shows
    base = apply_overrides(configs.tiny(), ["run.rounds=2", "algorithm.name=worldlm", "run.shard_state_mb=0",
                                            *GENTLE_SGD, *ONE_BLOCK])
    points = [apply_overrides(base, [f"policy.client_lr={lr}"]) for lr in (0.025, 0.05, 0.1, 0.2)]
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
    alone = experiment_lib.build_experiment(base)
    assert alone.mesh.shape == {parallel.AXIS: 8}
    # Not bit-exact: a separate run sums its clients' updates over 8 devices, a
    # point over 2, and vmapped products may accumulate in another order: equal
    # up to summation order, bounded as the module docstring says.
    rtol = summation_rtol(base)
    for i, config in enumerate(points):
        evaluation, state = separate_run(alone, config)
        assert_evals_close(evals[i], evaluation, rtol)
        assert_states_close(engine.unpad_state(sweep_exp.spec, jax.tree.map(lambda x: np.asarray(x)[i], states)),
                            state, rtol)
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
        assert summary["sim_hours"] == pytest.approx(sum(r["sim_seconds"] for r in records if "train_loss" in r)
                                                     / 3600) and summary["sim_hours"] > 0  # each point's own clock
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
    base = apply_overrides(configs.tiny(), ["run.rounds=2", "policy.client_lr=0.3", *GENTLE_SGD, *ONE_BLOCK,
                                            "policy.client_lr_schedule=warmup_cosine"])
    points = [apply_overrides(base, [f"policy.warmup_rounds={w}"]) for w in (0, 4)]
    evals, _, compiles = vectorized.run(points)
    assert compiles == 1
    assert evals[0]["perplexity"] != evals[1]["perplexity"]
    alone = experiment_lib.build_experiment(base)
    evaluation, _ = separate_run(alone, points[1])
    assert_evals_close(evals[1], evaluation, summation_rtol(base))


def test_vectorised_seeds_draw_their_own_sample_and_windows_and_equal_separate_runs():
    """Three seeds, 1 of each language's 2 clients sampled per round: every point
    draws its own data split, client sample and token windows from its own seed,
    as the separate run with that seed does, so each point equals that run (to
    the summation-order bound). 8 devices, 3 points: a 2 x 4 mesh with a padding
    point, which shares the last point's draws. Before the fix every point drew
    the first seed's batch, and seeds 1 and 2 were off by the whole sample."""
    base = apply_overrides(configs.tiny(), ["run.rounds=2", "algorithm.name=worldlm", *GENTLE_SGD, *ONE_BLOCK,
                                            "policy.client_lr=0.2", "policy.sampling=fixed",
                                            "policy.clients_per_round=1"])
    points = [apply_overrides(base, [f"run.seed={seed}"]) for seed in (0, 1, 2)]
    evals, states, compiles = vectorized.run(points)
    assert compiles == 1
    sweep_exp = vectorized.sweep_experiment(base, 8, 2)
    rtol = summation_rtol(base)
    samples = []
    for i, config in enumerate(points):
        alone = experiment_lib.build_experiment(config)
        evaluation, state = separate_run(alone, config)
        assert_evals_close(evals[i], evaluation, rtol)
        assert_states_close(engine.unpad_state(sweep_exp.spec, jax.tree.map(lambda x: np.asarray(x)[i], states)),
                            state, rtol)
        batches = [experiment_lib.make_batch(alone, r) for r in range(config.run.rounds)]
        samples.append(tuple(tuple(sorted(b.slot_client[b.slot_weight > 0].tolist())) for b in batches))
    # the test has power: each seed samples other clients (over the two rounds)
    assert len(set(samples)) == len(points), samples


def test_sweep_rejects_points_that_change_a_named_rule():
    base = apply_overrides(configs.tiny(), ["run.rounds=1"])
    with pytest.raises(ValueError, match="aggregator"):
        vectorized.run([base, apply_overrides(base, ["policy.aggregator=median"])])


def test_sweep_rejects_points_whose_batch_the_first_points_round_cannot_take():
    """Each point draws its own batch, so the compiled round must fit it: the
    same client slots, batch shape and clients (data); one-line errors."""
    base = apply_overrides(configs.tiny(), ["run.rounds=1", "policy.sampling=fixed", "policy.clients_per_round=1"])
    exp = experiment_lib.build_experiment(base)
    more_clients = dataclasses.replace(base, tree=configs.language_tree(clients=3, languages=("en", "de", "ru")))
    for point, field in [(apply_overrides(base, ["policy.clients_per_round=2"]), "clients_per_round"),
                         (apply_overrides(base, ["policy.local_steps=3"]), "local_steps"),
                         (more_clients, "clients")]:
        with pytest.raises(ValueError, match=field) as caught:
            vectorized._point_topology(exp, point)
        assert "\n" not in str(caught.value)
    vectorized._point_topology(exp, apply_overrides(base, ["run.seed=3", "policy.client_lr=0.01"]))  # accepted


class Killed(Exception):
    """The process dying between rounds (only its files outlive it)."""


def test_a_killed_vectorised_sweep_resumes_from_its_checkpoint_and_ends_as_if_uninterrupted(tmp_path, monkeypatch):
    def sweep(workdir, *extra):
        # (under DP: the points' privacy ledgers are saved with the states and restored)
        return run_cli(["sweep", "--config", "tiny", "--set", "run.rounds=3", "--set", "run.devices=2",
                        "--set", "run.checkpoint_every=1", "--set", "run.eval_every=2", "--set",
                        "algorithm.name=fedavg", "--set", "policy.dp_clip=1.0", "--set",
                        "policy.dp_noise_multiplier=1.0", *extra, "--grid", "policy.client_lr=1e-3,1e-2",
                        "--vectorized", "--workdir", str(workdir)])

    code, _, err = sweep(tmp_path / "whole")
    assert code == 0, err
    get = vectorized._Prefetcher.get

    def dies_at_round_2(self, r):
        if r == 2:
            raise Killed
        return get(self, r)

    with monkeypatch.context() as m:  # killed after round 2's checkpoint, before round 3 (index 2) trains
        m.setattr(vectorized._Prefetcher, "get", dies_at_round_2)
        with pytest.raises(Killed):
            sweep(tmp_path / "resumed")
    names = [f"policy.client_lr={v}" for v in ("1e-3", "1e-2")]
    assert not any((tmp_path / "resumed" / n / "summary.json").exists() for n in names)
    code, out, err = sweep(tmp_path / "resumed")  # the same command again
    assert code == 0, err
    assert "resumed the sweep from round 2" in out

    timing = ("seconds", "tokens_per_s", "sim_seconds", "sim_compute_seconds")
    def records(d):
        lines = (d / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]
    for n in names:
        whole, resumed = (json.loads((tmp_path / d / n / "summary.json").read_text()) for d in ("whole", "resumed"))
        assert resumed["rounds_completed"] == whole["rounds_completed"] == 3
        assert resumed["eval"] == whole["eval"]  # the same program on the same devices: bit for bit
        assert resumed["privacy"] == whole["privacy"] and whole["privacy"]  # the ledgers went on from round 2
        assert records(tmp_path / "resumed" / n) == records(tmp_path / "whole" / n)
    # a sweep of other points (here: another local_steps) is refused, not resumed
    code, _, err = sweep(tmp_path / "resumed", "--set", "policy.local_steps=1")
    assert code != 0 and "policy.local_steps" in err and "another --workdir" in err
