"""Callbacks in the run loop, the Python entry point and the learning rates a round record reports.

Tiny trainings (3 rounds configured, 1 device) share a persistent XLA
compilation cache: one through `worldlm_jax.train` with callbacks (a registered
one from a plug-in, given its argument in the config, stops it after round 1;
the csv and jsonl loggers write its rounds), that run resumed after a
simulated kill, and one through the CLI with only a logger, so its metrics are
read a round late; their records must agree.
"""
import copy
import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types
import warnings

import jax
import numpy as np
import pytest

import worldlm_jax
from worldlm_jax import plugins
from worldlm_jax.config import ConfigError, apply_overrides, load_yaml, presets as configs, save_yaml
from worldlm_jax.outputs.metrics import read_metrics
from worldlm_jax.plugins import callbacks
from worldlm_jax.plugins.callbacks import Callback, RunContext
from worldlm_jax.run import (blueprint, communication, dirs as run_dirs, records as records_lib,
                             training as train_lib)
from worldlm_jax.sweeps import vectorized

from cli_helpers import run_cli

PLUGIN = """
import optax
from worldlm_jax import callbacks, optimizers

# replace=False: importing this file a second time would fail here
optimizers.OPTIMIZERS.register("callbacks_test_sgd", lambda: optax.sgd(1.0), replace=False)


class StopAfter(callbacks.Callback):
    def __init__(self, last_round):
        self.last_round = last_round

    def on_round_end(self, round_index, record):
        return round_index >= self.last_round


# last_round has no default: the run fails unless the config's args reach the factory
callbacks.register("stop_after", lambda config, last_round: StopAfter(last_round))
"""

TIMING = ("seconds", "tokens_per_s", "sim_seconds", "sim_compute_seconds")  # measured (the clock calibrates on it)
LOGGERS = "csv, {name: jsonl, args: {path: logs/rounds.jsonl}}"


class Recorder(Callback):
    """Keeps what it was shown, and the order of the hooks; never asks to stop."""

    def __init__(self):
        self.calls, self.rounds, self.evals = [], [], []

    def on_start(self, context):
        self.calls.append("start")
        self.context = context

    def on_round_end(self, round_index, record):
        self.calls.append("round")
        self.rounds.append((round_index, copy.deepcopy(record)))

    def on_eval_end(self, round_index, evaluation):
        self.calls.append("eval")
        self.evals.append((round_index, copy.deepcopy(evaluation)))

    def on_end(self, context, summary):
        self.calls.append("end")
        self.end_context, self.summary = context, copy.deepcopy(summary)


def shown_to_callbacks(records):
    """metrics.jsonl's lines as the callbacks saw them: without the `final` flag, and
    without a final evaluation that repeats the run.eval_every one of its round."""
    evaluated, lines = set(), []
    for record in records:
        if "eval" in record:
            if record.get("final") and record["round"] in evaluated:
                continue
            evaluated.add(record["round"])
        lines.append({k: v for k, v in record.items() if k != "final"})
    return lines


def check_loggers(workdir, csv_name="rounds.csv", jsonl_name="logs/rounds.jsonl"):
    """The csv and jsonl loggers' files hold what metrics.jsonl holds, line for line."""
    expected = shown_to_callbacks(read_metrics(workdir / "metrics.jsonl"))
    if jsonl_name:
        assert [json.loads(line) for line in open(workdir / jsonl_name)] == expected
    with open(workdir / csv_name, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    flat = [callbacks.flat_row(line) for line in expected]
    assert header == list(dict.fromkeys(column for row in flat for column in row))  # every column, first seen first
    assert rows == [{column: row.get(column, "") for column in header} for row in flat]
    for row, line in zip(rows, expected):  # the cells read back as the values, not only as flat_row writes them
        assert int(row["round"]) == line["round"]
        if "eval" in line:
            assert float(row["eval/perplexity"]) == line["eval"]["perplexity"] and row["train_loss"] == ""
            assert float(row["eval/per_federation/en"]) == line["eval"]["per_federation"]["en"]
        else:
            assert float(row["train_loss"]) == line["train_loss"] and row.get("eval/perplexity", "") == ""
            assert float(row["client_lr/en"]) == line["client_lr"]["en"]
            assert json.loads(row["level1/update_norm"]) == line["level1/update_norm"]  # one per federation
            assert json.loads(row["level0/child_similarity"]) == line["level0/child_similarity"]  # a matrix
    return expected


@pytest.fixture(scope="module")
def experiment_yaml(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exp")
    (folder / "lab").mkdir()
    (folder / "lab" / "plugin.py").write_text(PLUGIN)
    cache = tmp_path_factory.mktemp("xla_cache")
    (folder / "exp.yaml").write_text(
        "base: tiny\nplugins: [lab/plugin.py]\npolicy: {server_optimizer: callbacks_test_sgd}\n"
        "run: {rounds: 3, devices: 1, eval_every: 1, callbacks: [{name: stop_after, args: {last_round: 1}}, "
        f"{LOGGERS}], compilation_cache: '{cache}'}}\n")
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # cache the small jits too
    yield folder
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)


@pytest.fixture(scope="module")
def stopped(experiment_yaml, tmp_path_factory):
    """The Python entry point on a YAML path, with an instance callback after the YAML's."""
    workdir = tmp_path_factory.mktemp("stopped") / "run"
    recorder = Recorder()
    summary = worldlm_jax.train(str(experiment_yaml / "exp.yaml"), str(workdir), quiet=True, callbacks=[recorder])
    return workdir, summary, recorder


@pytest.fixture(scope="module")
def resumed(stopped, experiment_yaml, tmp_path_factory):
    """The stopped run resumed in a copy of its directory after a simulated kill:
    its files hold a round 2, and a torn line, past its checkpoint of round 2,
    which the resumed run trains again (stop_after stops it after round 2, its last)."""
    workdir = tmp_path_factory.mktemp("resumed") / "run"
    shutil.copytree(stopped[0], workdir)
    for name in ("metrics.jsonl", "logs/rounds.jsonl"):
        with open(workdir / name, "a") as f:
            f.write(json.dumps({"round": 2, "train_loss": 999.0}) + '\n{"round": 2, "tr')
    with open(workdir / "rounds.csv", "a") as f:
        f.write("2,999.0\n2,9")
    recorder = Recorder()
    summary = worldlm_jax.train(str(experiment_yaml / "exp.yaml"), str(workdir), quiet=True, callbacks=[recorder])
    return workdir, summary, recorder


def test_a_callback_stops_the_run_after_the_round_that_asked(stopped, experiment_yaml):
    workdir, summary, recorder = stopped
    assert summary["rounds_completed"] == 2 and summary["interrupted"]
    assert summary["stopped_by"] == "stop_after"
    assert json.load(open(workdir / "summary.json"))["stopped_by"] == "stop_after"
    assert (workdir / "checkpoints" / "2").exists()
    assert not (workdir / "checkpoints" / "3").exists()
    records = read_metrics(workdir / "metrics.jsonl")
    assert [r["round"] for r in records if "train_loss" in r] == [0, 1]
    # the callback saw each round as it ended, in order, with exactly what metrics.jsonl holds
    assert [i for i, _ in recorder.rounds] == [0, 1]
    logged = {r["round"]: r for r in records if "train_loss" in r}
    for i, record in recorder.rounds:
        assert record["round"] == i
        assert json.loads(json.dumps(record)) == logged[i]
    # eval_every=1 evaluated after rounds 0 and 1; the final evaluation is that of round 1
    evals = [(r["round"], r["eval"]) for r in records if "eval" in r and not r.get("final")]
    assert [(i, json.loads(json.dumps(e))) for i, e in recorder.evals] == evals
    assert [i for i, _ in evals] == [0, 1]
    assert recorder.evals[-1][1]["perplexity"] == pytest.approx(summary["eval"]["perplexity"])
    # the plug-in's absolute path is saved, so eval and resume import it again
    saved = load_yaml(str(workdir / "config.yaml"))
    assert saved.plugins == (str(experiment_yaml / "lab" / "plugin.py"),)
    assert saved.run.callbacks == (callbacks.CallbackSpec("stop_after", {"last_round": 1}), "csv",
                                   callbacks.CallbackSpec("jsonl", {"path": "logs/rounds.jsonl"}))
    assert saved.policy.server_optimizer == "callbacks_test_sgd"


def test_callbacks_know_their_run_and_hear_its_start_and_end(stopped, resumed):
    workdir, summary, recorder = stopped
    # on_start before the first round, on_end after the summary, also when a callback stopped the run
    assert recorder.calls == ["start", "round", "eval", "round", "eval", "end"]
    assert recorder.context == RunContext(workdir=str(workdir), process_index=0, process_count=1,
                                          config=load_yaml(str(workdir / "config.yaml")), first_round=0,
                                          resumed=False)
    assert recorder.end_context is recorder.context and recorder.summary == summary
    workdir, summary, recorder = resumed
    assert recorder.calls == ["start", "round", "eval", "end"]  # round 2, then the final evaluation
    assert (recorder.context.workdir, recorder.context.first_round, recorder.context.resumed) == (str(workdir), 2, True)
    assert summary["rounds_completed"] == 3 and not summary["interrupted"] and recorder.summary == summary


def test_the_csv_and_jsonl_loggers_hold_what_metrics_jsonl_holds(stopped, resumed):
    """Config args reach them (the jsonl path); each round's line comes before its
    evaluation; a resume drops what a killed run wrote past its checkpoint."""
    before = check_loggers(stopped[0])
    assert [(line["round"], "eval" in line) for line in before] == [(0, False), (0, True), (1, False), (1, True)]
    after = check_loggers(resumed[0])
    assert after[:4] == before  # kept as they were
    assert [(line["round"], "eval" in line) for line in after[4:]] == [(2, False), (2, True)]  # round 2 once
    assert all(line.get("train_loss") != 999.0 for line in after)


def test_records_are_the_same_when_read_a_round_late(stopped, experiment_yaml, tmp_path):
    """With no callback that may stop it (the csv logger only watches) the loop reads
    round r's metrics after dispatching round r+1; the records (all but the timings)
    must equal those read as each round ended, and the logger's those of metrics.jsonl."""
    workdir = tmp_path / "late"
    code, out, err = run_cli(["train", "--config", str(experiment_yaml / "exp.yaml"), "--set", "run.callbacks=[csv]",
                              "--set", "run.eval_every=0", "--workdir", str(workdir), "--quiet"])
    assert code == 0, err
    check_loggers(workdir, jsonl_name=None)
    strip = lambda path: [{k: v for k, v in r.items() if k not in TIMING}
                          for r in read_metrics(path) if "train_loss" in r]
    late = strip(workdir / "metrics.jsonl")
    assert [r["round"] for r in late] == [0, 1, 2]
    assert late[:2] == strip(stopped[0] / "metrics.jsonl")


def test_a_sweep_goes_on_past_a_point_a_callback_stopped_and_skips_it_when_rerun(stopped, experiment_yaml,
                                                                                  tmp_path):
    """stop_after stops both points after 2 of their 3 rounds: each is finished as
    far as the sweep is concerned (the sweep trains the next one, exits 0, and
    re-running it resumes neither); `worldlm train` would resume one."""
    argv = ["sweep", "--config", str(experiment_yaml / "exp.yaml"), "--set", "run.eval_every=0",
            "--grid", "run.checkpoint_every=0,1", "--workdir", str(tmp_path), "--quiet"]
    code, out, err = run_cli(argv)
    assert code == 0, err
    rows = json.loads((tmp_path / "sweep.json").read_text())["points"]
    assert [(r["status"], r["rounds_completed"]) for r in rows] == [("stopped", 2), ("stopped", 2)]
    assert out.count("stopped by stop_after after 2 rounds") == 2
    run_dir = str(tmp_path / rows[0]["name"])
    assert run_dirs.finished_summary(run_dir, 3)["stopped_by"] == "stop_after"
    assert run_dirs.finished_summary(run_dir, 3, stopped=False) is None
    code, out, err = run_cli(argv)
    assert code == 0, err
    assert out.count("finished earlier, skipped") == 2
    assert [r["status"] for r in json.loads((tmp_path / "sweep.json").read_text())["points"]] == ["skipped"] * 2


def test_callbacks_and_plugins_may_change_when_a_run_resumes(experiment_yaml):
    """They change what watches the run and where its code comes from, not the
    numbers of the rounds already run (the names a plug-in registers are compared)."""
    config = load_yaml(str(experiment_yaml / "exp.yaml"))
    changed = dataclasses.replace(apply_overrides(config, ["run.callbacks=[]"]), plugins=())
    assert run_dirs.config_changes(config, changed) == []
    other = apply_overrides(config, ["policy.server_optimizer=sgd"])
    assert run_dirs.config_changes(config, other) == ["policy.server_optimizer"]


def test_train_refuses_a_run_dir_with_another_config(tmp_path):
    config = apply_overrides(configs.get("tiny"), ["run.devices=1"])
    save_yaml(config, str(tmp_path / "config.yaml"))
    (tmp_path / "checkpoints").mkdir()
    before = (tmp_path / "config.yaml").read_text()
    changed = apply_overrides(config, ["policy.client_lr=0.1", "data.seq_len=16"])
    with pytest.raises(ConfigError, match=r"different config \(differs in: data.seq_len, policy.client_lr\)"):
        worldlm_jax.train(changed, str(tmp_path), quiet=True)
    assert (tmp_path / "config.yaml").read_text() == before  # refused before writing anything


def test_round_record_reports_the_learning_rates_the_round_used():
    config = apply_overrides(configs.get("tiny"), ["run.devices=1"])
    run = blueprint.abstract_run(config)
    exp = types.SimpleNamespace(run_topology=run.run_topology, spec=run.spec, strategy=run.strategy,
                                strategy_for=lambda r: run.strategy, config=config, batch_size=run.batch_size,
                                part_bytes=communication.part_bytes(run.params, run.spec.key_paths), init_params=run.params)
    topo = run.run_topology
    assert topo.depth == 2 and topo.leaf.names == ("en", "de", "ru")
    metrics = {"train_loss_sum": np.ones(3), "train_clients": np.full(3, 2.0), "tokens": np.float32(10),
               "diverged": np.float32(0), "level0/participants": np.array([3.0]),
               "level1/participants": np.array([2.0, 2.0, 2.0]), "level0/rounds": np.array([1.0]),
               "level1/rounds": np.array([1.0, 1.0, 1.0])}
    static = records_lib.round_record(exp, 0, dict(metrics), 1.0)
    assert static["client_lr"] == {"en": 3e-3, "de": 3e-3, "ru": 3e-3}
    assert static["server_lr"] == {"world": 1.0, "en": 1.0, "de": 1.0, "ru": 1.0}
    metrics |= {"level1/client_lr": np.array([1e-3, 2e-3, 4e-3], np.float32),
                "level0/server_lr": np.array([0.5], np.float32),
                "level1/server_lr": np.array([0.25, 0.125, 1.0], np.float32)}
    scheduled = records_lib.round_record(exp, 0, metrics, 1.0)
    assert scheduled["client_lr"] == {"en": 1e-3, "de": 2e-3, "ru": 4e-3}  # float32's shortest decimals
    assert scheduled["server_lr"] == {"world": 0.5, "en": 0.25, "de": 0.125, "ru": 1.0}


def test_callbacks_are_built_from_names_and_instances():
    config = configs.get("tiny")
    recorder = Recorder()
    built = callbacks.build(config, [recorder])
    assert built == [("Recorder", recorder)]
    with pytest.raises(ValueError, match="run.callbacks='nope' is not a registered callback"):
        callbacks.build(config, ["nope"])
    with pytest.raises(TypeError, match="has none of on_start, on_round_end, on_eval_end, on_end"):
        callbacks.build(config, [object()])
    # a callback written before on_start and on_end (only on_round_end) works as it did
    old = types.SimpleNamespace(on_round_end=lambda i, r: True)
    context = RunContext("/run", 0, 1, config, 0, False)
    callbacks.start([("a", recorder), ("b", old)], context)
    asked = callbacks.notify([("a", recorder), ("b", old)], "on_round_end", 4, {"round": 4})
    callbacks.end([("a", recorder), ("b", old)], context, {"rounds_completed": 5})
    assert asked == ["b"] and recorder.rounds == [(4, {"round": 4})] and recorder.calls == ["start", "round", "end"]
    with pytest.raises(TypeError, match="'eager': on_start returned True, but a run cannot stop before its first"):
        callbacks.start([("eager", types.SimpleNamespace(on_start=lambda context: True))], context)
    # the loggers only watch: alone they leave the loop reading each round a round late
    loggers = callbacks.build(apply_overrides(config, ["run.callbacks=[csv, jsonl]"]))
    assert not callbacks.may_stop(loggers) and callbacks.may_stop(loggers + built)
    assert callbacks.notify([("csv", types.SimpleNamespace(watch_only=True, on_eval_end=lambda i, e: True))],
                            "on_eval_end", 0, {}) == []


def test_callback_args_come_from_the_config_and_are_checked_when_it_is_read():
    config = configs.get("tiny")
    given = []
    callbacks.register("callbacks_test_args", lambda config, n, scale=1.0: given.append((n, scale)) or Recorder())
    callbacks.register("callbacks_test_plain", lambda config: Recorder())
    built = callbacks.build(apply_overrides(config, ["run.callbacks=[{name: callbacks_test_args, args: {n: 2}}]"]))
    assert given == [(2, 1.0)] and built[0][0] == "callbacks_test_args"
    for entries, message in [
            ("[csv, {name: jsonl, args: {pth: x.jsonl}}]",
             "run.callbacks[1].args={'pth': 'x.jsonl'}: callback 'jsonl' takes path, not ['pth']; correct or remove them"),
            ("[{name: callbacks_test_plain, args: {n: 2}}]",
             "run.callbacks[0].args={'n': 2}: callback 'callbacks_test_plain' takes no arguments, not ['n']; "
             "correct or remove them"),
            ("[{name: callbacks_test_args}]",
             "run.callbacks[0].args={}: callback 'callbacks_test_args' needs n; add them"),
            ("[{name: csv, arg: {}}]", "unknown config key 'run.callbacks[0].arg'. Did you mean run.callbacks[0].args?"),
            ("[{name: nope}]", "run.callbacks[0].name='nope' is not a registered callback; registered: ")]:
        with pytest.raises(ConfigError) as caught:
            apply_overrides(config, [f"run.callbacks={entries}"])
        assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_the_loggers_write_on_process_0_only_and_a_vectorised_sweep_refuses_callbacks(tmp_path):
    config = apply_overrides(configs.get("tiny"), ["run.callbacks=[csv]"])
    for index in (1, 0):
        (_, logger), = callbacks.build(config)
        logger.on_start(RunContext(str(tmp_path), index, 2, config, 0, False))
        logger.on_round_end(0, {"round": 0, "train_loss": 1.5, "client_lr": {"en": 0.1}, "level1/x": [1.0, 2.0]})
        assert os.listdir(tmp_path) == ([] if index else ["rounds.csv"])
    assert (tmp_path / "rounds.csv").read_text() == 'round,train_loss,client_lr/en,level1/x\n0,1.5,0.1,"[1.0, 2.0]"\n'
    with pytest.raises(ValueError, match="a vectorised sweep runs no callbacks"):
        vectorized.check_static([config, config])


def test_on_end_hears_a_run_that_raised():
    """train.train runs the loop inside around_run: on_end follows on_start, with the
    summary, or with None when the run raises (the error propagates after)."""
    recorder = Recorder()
    context = RunContext("/run", 0, 1, configs.get("tiny"), 0, False)
    assert callbacks.around_run([("r", recorder)], context, lambda: {"rounds_completed": 2}) == {"rounds_completed": 2}
    assert recorder.calls == ["start", "end"] and recorder.summary == {"rounds_completed": 2}

    def broken():
        raise RuntimeError("a broken round")

    recorder = Recorder()
    with pytest.raises(RuntimeError, match="a broken round"):
        callbacks.around_run([("r", recorder)], context, broken)
    assert recorder.calls == ["start", "end"] and recorder.summary is None


def test_the_package_entry_point_is_the_train_function_and_importing_it_is_cheap():
    assert worldlm_jax.train is train_lib.train and worldlm_jax.Callback is Callback
    code = "import sys, worldlm_jax; assert 'jax' not in sys.modules and 'worldlm_jax.run' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_devices_warning_when_jax_started_with_fewer_cpu_devices(monkeypatch):
    jax.devices()  # the backends have started (8 fake CPU devices, tests/conftest.py)
    monkeypatch.setattr(train_lib, "_warned_devices", False)
    monkeypatch.setattr(os, "cpu_count", lambda: jax.local_device_count() * 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_lib.configure_devices()  # XLA_FLAGS asked for exactly these devices: no warning
        assert not caught
        monkeypatch.setenv("XLA_FLAGS", "")
        train_lib.configure_devices()
        train_lib.configure_devices()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"--xla_force_host_platform_device_count={jax.local_device_count() * 2}" in message
    assert "worldlm_jax.train before anything uses JAX" in message


def test_loading_a_plugin_twice_runs_it_once(experiment_yaml):
    path = str(experiment_yaml / "lab" / "plugin.py")
    first = plugins.load(path)
    assert plugins.load("lab/plugin.py", base_dir=str(experiment_yaml)) is first  # replace=False did not fire
    assert load_yaml(str(experiment_yaml / "exp.yaml")).plugins == (path,)
