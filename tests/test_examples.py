"""Every example in scripts/examples runs as docs/extending.md shows it
(`worldlm train --plugin FILE --config FILE.yaml`, the tiny preset, two rounds
or until it stops), in one compilation, and does what its docstring claims.

The runs share one persistent compilation cache, so the evaluator and model
initialisation compile once for all of them; each round program is its own.
"""
import contextlib
import csv
import io
import json
import os

import jax
import numpy as np
import pytest

from worldlm_jax import engine, plugins
from worldlm_jax.cli import parser as cli
from worldlm_jax.config import load as load_config
from worldlm_jax.outputs.checkpoint import Checkpointer
from worldlm_jax.outputs.metrics import read_metrics
from worldlm_jax.plugins import aggregators
from worldlm_jax.run import experiment as experiment_lib

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "examples")
NAMES = ("server_optimizer", "fedprox", "median", "scaffold", "schedule", "callback", "family_strategy")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("xla_cache"))


def run_example(name, workdir, cache_dir):
    """(summary, per-round records) of the example's documented command."""
    argv = ["train", "--plugin", os.path.join(EXAMPLES, f"{name}.py"),
            "--config", os.path.join(EXAMPLES, f"{name}.yaml"), "--workdir", str(workdir), "--quiet",
            "--set", f"run.compilation_cache={cache_dir}", "--set", "run.devices=1",
            "--set", "model.n_layers=1"]  # one block: each round compiles in about half the time
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    assert code == 0, err.getvalue()[-2000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["compiles"] == 1
    return summary, [r for r in read_metrics(str(workdir / "metrics.jsonl")) if "train_loss" in r]


def final_state(workdir):
    """The run's last checkpointed engine state (real rows) and its experiment."""
    config = load_config(str(workdir / "config.yaml"))
    exp = experiment_lib.build_experiment(config)
    with contextlib.closing(Checkpointer(str(workdir), max_to_keep=2)) as ckpt:
        state, _ = experiment_lib.restore_state(exp, ckpt)
    return exp, jax.device_get(engine.unpad_state(exp.spec, state))


def nonzero(tree) -> bool:
    return any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(tree))


def check_server_optimizer(workdir, summary, records):
    _, state = final_state(workdir)
    assert nonzero(state.levels[0].server)  # the root stepped with momentum: its trace moved
    assert all(r["server_lr"]["world"] == pytest.approx(0.5) for r in records)


def check_fedprox(workdir, summary, records):
    for r in records:  # German's large mu holds it near what the root sent; English moves freely
        norms = dict(zip(("en", "de", "ru"), r["level1/update_norm"]))
        assert norms["de"] < 0.5 * min(norms["en"], norms["ru"])


def check_median(workdir, summary, records):
    example = plugins.load(os.path.join(EXAMPLES, "median.py"))  # the module the run imported (loaded once)
    rng = np.random.default_rng(0)
    delta = {"w": rng.normal(size=(7, 3, 2)).astype(np.float32)}
    weight, parent = np.array([1, 1, 0, 1, 2, 1, 1], np.float32), np.array([0, 0, 0, 1, 1, 1, 2])
    args = {}
    ours = example.coordinate_median(delta, weight, parent, 4, args)
    built_in = aggregators.get("median").combine(delta, weight, parent, 4, args)
    np.testing.assert_array_equal(np.asarray(ours["w"]), np.asarray(built_in["w"]))
    assert all(r["level1/participants"] == [3.0, 3.0, 3.0] for r in records)


def check_scaffold(workdir, summary, records):
    _, state = final_state(workdir)
    assert nonzero(state.clients.objective) and nonzero(state.levels[-1].objective)  # c_i and c were learned
    assert all(np.isfinite(r["train_loss"]) for r in records)


def check_schedule(workdir, summary, records):
    import optax
    expected = optax.warmup_cosine_decay_schedule(0.0, 1.0, 2, 6, 0.1)
    for r in records:
        assert list(r["client_lr"].values()) == [pytest.approx(0.003 * float(expected(r["round"])), abs=1e-9)] * 3


def check_callback(workdir, summary, records):
    # the config's args (min_delta: 100) reached the factory: it stops the run after its second round
    assert summary["rounds_completed"] == 2 and summary["interrupted"] and summary["stopped_by"] == "early_stopping"
    assert [r["round"] for r in records] == [0, 1]
    with open(workdir / "rounds.csv", newline="") as f:  # the built-in csv logger: rounds, then the final evaluation
        rows = list(csv.DictReader(f))
    assert [(row["round"], row["train_loss"] == "") for row in rows] == [("0", False), ("1", False), ("1", True)]


def check_family_strategy(workdir, summary, records):
    exp, state = final_state(workdir)
    names = exp.topology.client_names
    deployed = jax.device_get(engine.deployed_params(exp.spec, state, np.arange(len(names))))
    row = {name.split("/")[0]: i for i, name in enumerate(names)}
    K = {p: v for p, v in deployed.items() if p in exp.spec.key_paths}
    B = {p: v for p, v in deployed.items() if p not in exp.spec.key_paths}
    same = lambda tree, a, b: all(np.array_equal(v[row[a]], v[row[b]]) for v in tree.values())
    assert K and same(K, "en", "de") and same(K, "ru", "pl") and not same(K, "en", "ru")
    assert same(B, "en", "ru") and same(B, "de", "pl")


@pytest.mark.parametrize("name", NAMES)
def test_example_runs_from_its_documented_command_and_does_what_it_claims(name, tmp_path, cache_dir):
    summary, records = run_example(name, tmp_path, cache_dir)
    globals()[f"check_{name}"](tmp_path, summary, records)
