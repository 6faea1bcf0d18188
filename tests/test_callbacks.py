"""Callbacks in the run loop, the Python entry point and the learning rates a round record reports.

Two tiny trainings (3 rounds configured, 1 device) share a persistent XLA
compilation cache: one through `worldlm_jax.train` with callbacks (a registered
one from a plug-in stops it after round 1), one through the CLI without any, so
its metrics are read a round late; their records must agree.
"""
import contextlib
import copy
import dataclasses
import io
import json
import os
import subprocess
import sys
import types
import warnings

import jax
import numpy as np
import pytest

import worldlm_jax
from worldlm_jax import plugins
from worldlm_jax.cli import parser as cli
from worldlm_jax.config import ConfigError, apply_overrides, load_yaml, presets as configs, save_yaml
from worldlm_jax.outputs.metrics import read_metrics
from worldlm_jax.plugins import callbacks
from worldlm_jax.plugins.callbacks import Callback
from worldlm_jax.run import (blueprint, communication, dirs as run_dirs, records as records_lib,
                             training as train_lib)

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


callbacks.register("stop_after_1", lambda config: StopAfter(1))
"""

TIMING = ("seconds", "tokens_per_s")


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


class Recorder(Callback):
    """Keeps what it was shown; never asks to stop."""

    def __init__(self):
        self.rounds, self.evals = [], []

    def on_round_end(self, round_index, record):
        self.rounds.append((round_index, copy.deepcopy(record)))

    def on_eval_end(self, round_index, evaluation):
        self.evals.append((round_index, copy.deepcopy(evaluation)))


@pytest.fixture(scope="module")
def experiment_yaml(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exp")
    (folder / "lab").mkdir()
    (folder / "lab" / "plugin.py").write_text(PLUGIN)
    cache = tmp_path_factory.mktemp("xla_cache")
    (folder / "exp.yaml").write_text(
        "base: tiny\nplugins: [lab/plugin.py]\npolicy: {server_optimizer: callbacks_test_sgd}\n"
        f"run: {{rounds: 3, devices: 1, eval_every: 1, callbacks: [stop_after_1], compilation_cache: '{cache}'}}\n")
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


def test_a_callback_stops_the_run_after_the_round_that_asked(stopped, experiment_yaml):
    workdir, summary, recorder = stopped
    assert summary["rounds_completed"] == 2 and summary["interrupted"]
    assert summary["stopped_by"] == "stop_after_1"
    assert json.load(open(workdir / "summary.json"))["stopped_by"] == "stop_after_1"
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
    assert saved.run.callbacks == ("stop_after_1",) and saved.policy.server_optimizer == "callbacks_test_sgd"


def test_records_are_the_same_when_read_a_round_late(stopped, experiment_yaml, tmp_path):
    """Without callbacks the loop reads round r's metrics after dispatching round r+1;
    the records (all but the timings) must equal those read as each round ended."""
    workdir = tmp_path / "late"
    code, out, err = run_cli(["train", "--config", str(experiment_yaml / "exp.yaml"), "--set", "run.callbacks=[]",
                              "--set", "run.eval_every=0", "--workdir", str(workdir), "--quiet"])
    assert code == 0, err
    strip = lambda path: [{k: v for k, v in r.items() if k not in TIMING}
                          for r in read_metrics(path) if "train_loss" in r]
    late = strip(workdir / "metrics.jsonl")
    assert [r["round"] for r in late] == [0, 1, 2]
    assert late[:2] == strip(stopped[0] / "metrics.jsonl")


def test_a_sweep_goes_on_past_a_point_a_callback_stopped_and_skips_it_when_rerun(stopped, experiment_yaml,
                                                                                  tmp_path):
    """stop_after_1 stops both points after 2 of their 3 rounds: each is finished as
    far as the sweep is concerned (the sweep trains the next one, exits 0, and
    re-running it resumes neither); `worldlm train` would resume one."""
    argv = ["sweep", "--config", str(experiment_yaml / "exp.yaml"), "--set", "run.eval_every=0",
            "--grid", "run.checkpoint_every=0,1", "--workdir", str(tmp_path), "--quiet"]
    code, out, err = run_cli(argv)
    assert code == 0, err
    rows = json.loads((tmp_path / "sweep.json").read_text())["points"]
    assert [(r["status"], r["rounds_completed"]) for r in rows] == [("stopped", 2), ("stopped", 2)]
    assert out.count("stopped by stop_after_1 after 2 rounds") == 2
    run_dir = str(tmp_path / rows[0]["name"])
    assert run_dirs.finished_summary(run_dir, 3)["stopped_by"] == "stop_after_1"
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
                                strategy_for=lambda r: run.strategy, config=config,
                                part_bytes=communication.part_bytes(run.params, run.spec.key_paths))
    topo = run.run_topology
    assert topo.depth == 2 and topo.leaf.names == ("en", "de", "ru")
    metrics = {"train_loss_sum": np.ones(3), "train_clients": np.full(3, 2.0), "tokens": np.float32(10),
               "diverged": np.float32(0), "level0/participants": np.array([3.0]),
               "level1/participants": np.array([2.0, 2.0, 2.0])}
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
    with pytest.raises(TypeError, match="neither on_round_end nor on_eval_end"):
        callbacks.build(config, [object()])
    asked = callbacks.notify([("a", recorder), ("b", types.SimpleNamespace(on_round_end=lambda i, r: True))],
                             "on_round_end", 4, {"round": 4})
    assert asked == ["b"] and recorder.rounds == [(4, {"round": 4})]


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
