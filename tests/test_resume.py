"""Checkpoint/resume: a killed run, resumed, ends exactly like an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from worldlm_jax.config import apply_overrides, presets as configs, save_yaml
from worldlm_jax.outputs.metrics import read_metrics

from cli_helpers import subprocess_env

TIMING = ("seconds", "tokens_per_s", "sim_seconds", "sim_compute_seconds")  # measured (the clock calibrates on it)


def _config(rounds):
    # one block: each fresh process compiles in about half the time; resumption does not depend on depth
    return apply_overrides(configs.tiny(), [f"run.rounds={rounds}", "run.checkpoint_every=1", "model.n_layers=1"])


def _run(workdir, rounds, kill_after_step=None):
    """Train in a fresh process (as a user would); optionally SIGKILL it once
    the checkpoint of `kill_after_step` exists."""
    cfg_path = os.path.join(str(workdir) + ".yaml")
    save_yaml(_config(rounds), cfg_path)
    code = textwrap.dedent(f"""
        import worldlm_jax
        from worldlm_jax.config import load_yaml
        worldlm_jax.train(load_yaml({cfg_path!r}), {str(workdir)!r}, quiet=True)
    """)
    env = subprocess_env(2)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    if kill_after_step is None:
        assert proc.wait(timeout=300) == 0
        return
    marker = os.path.join(workdir, "checkpoints", str(kill_after_step))
    deadline = time.time() + 300
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _comparable(workdir):
    records = [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))]
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    return records, summary["eval"], summary["rounds_completed"]


def _final_params(workdir):
    import jax
    from worldlm_jax.config import load_yaml
    from worldlm_jax.outputs import checkpoint
    from worldlm_jax.run import experiment as experiment_lib
    exp = experiment_lib.build_experiment(load_yaml(os.path.join(workdir, "config.yaml")))
    with checkpoint.Checkpointer(workdir) as ckpt:
        state, host = experiment_lib.restore_state(exp, ckpt)
    return host["round"], [np.asarray(x) for x in jax.tree.leaves(state)]


@pytest.mark.slow  # test_multiprocess kills and resumes a run too (2 processes, equal to 1 uninterrupted)
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    rounds = 4
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(straight, rounds)
    _run(resumed, rounds, kill_after_step=2)  # SIGKILL mid-run, after round 2's checkpoint
    assert not os.path.exists(resumed / "summary.json"), "the kill should have stopped the run"
    _run(resumed, rounds)  # resumes from the latest checkpoint
    assert _comparable(straight) == _comparable(resumed)
    round_a, leaves_a = _final_params(straight)
    round_b, leaves_b = _final_params(resumed)
    assert round_a == round_b == rounds
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(a, b)  # bit-identical on CPU


def test_sigint_checkpoints_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "run"
    cfg_path = str(workdir) + ".yaml"
    save_yaml(_config(50), cfg_path)
    code = textwrap.dedent(f"""
        import worldlm_jax
        from worldlm_jax.config import load_yaml
        worldlm_jax.train(load_yaml({cfg_path!r}), {str(workdir)!r}, quiet=True)
    """)
    env = subprocess_env(2)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    marker = workdir / "checkpoints" / "1"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 0  # no traceback, a clean exit
    summary = json.load(open(workdir / "summary.json"))
    assert summary["interrupted"] and 1 <= summary["rounds_completed"] < 50
    assert (workdir / "checkpoints" / str(summary["rounds_completed"])).exists()


def test_from_step_resumes_from_an_older_step_and_sets_the_later_ones_aside(tmp_path):
    import shutil

    from cli_helpers import run_cli
    args = ["train", "--config", "tiny", "--set", "run.rounds=3", "--set", "run.checkpoint_every=1",
            "--set", "model.n_layers=1", "--set", "run.devices=1", "--quiet", "--skip-memory-check"]
    straight, rerun = tmp_path / "straight", tmp_path / "rerun"
    code, _, err = run_cli(args + ["--workdir", str(straight)])
    assert code == 0, err
    shutil.copytree(straight, rerun)  # a finished run whose step 3 we pretend is bad
    code, _, err = run_cli(args + ["--workdir", str(rerun), "--from-step", "2"])
    assert code == 0, err
    assert (rerun / "checkpoints" / "3.superseded").is_dir()  # set aside, not deleted
    # round 3 ran again from step 2: the same records (metrics.jsonl cut to round 2 first), bit for bit
    assert _comparable(straight) == _comparable(rerun)
    (round_a, leaves_a), (round_b, leaves_b) = _final_params(straight), _final_params(rerun)
    assert round_a == round_b == 3
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(a, b)
    # a step the run does not hold (it keeps its newest two): one line naming the saved ones
    code, _, err = run_cli(args + ["--workdir", str(rerun), "--from-step", "1"])
    assert code == 2 and "--from-step=1" in err and "[2, 3]" in err and err.count("\n") == 1, err
