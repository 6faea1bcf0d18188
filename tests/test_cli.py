"""The `worldlm` command, run in-process through cli.main (train, eval, sweep, report, presets).

Three tiny trainings (1 round each) are shared by module-scoped fixtures; they
share a persistent XLA compilation cache, so the second and third compile little.
"""
import json
import math
import os

import jax
import pytest

from worldlm_jax.cli import commands as cli_commands, parser as cli
from worldlm_jax.config import apply_overrides, load_yaml, presets as configs
from worldlm_jax.run import dirs as run_dirs
from worldlm_jax.sweeps import grid as sweep

from cli_helpers import documented_form, run_cli

# One device: the 8 fake CPU devices of conftest.py would triple compile time (sharded
# slices in checkpointing); the CLI does not care how many devices train.
# the root's own rule (not inherited) shows in every record's `rules`
FAST = ["--config", "tiny", "--set", "run.rounds=1", "--set", "run.devices=1", "--set", "model.n_layers=1",
        "--set", "tree.world.own_policy.server_optimizer=momentum"]  # one block: compiles in about half the time


@pytest.fixture(scope="module")
def cache_args(tmp_path_factory):
    cache = tmp_path_factory.mktemp("xla_cache")
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # cache the small jits too
    yield ["--set", f"run.compilation_cache={cache}"]
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_args):
    workdir = str(tmp_path_factory.mktemp("train") / "run")
    code, out, err = run_cli(["train", *FAST, *cache_args, "--workdir", workdir, "--quiet"])
    return workdir, code, out, err


@pytest.fixture(scope="module")
def swept(tmp_path_factory, cache_args):
    workdir = str(tmp_path_factory.mktemp("sweep"))
    argv = ["sweep", *FAST, *cache_args, "--grid", "data.eval_batches=1,2", "--workdir", workdir, "--quiet"]
    code, out, err = run_cli(argv)
    return workdir, argv, code, out, err


# ---- cheap: help, presets, argument errors ---------------------------------------------
def test_help_describes_subcommands_and_an_example():
    code, out, _ = run_cli(["--help"])
    assert code == 0
    for sub in ("train", "eval", "sweep", "report", "presets"):
        assert f"\n  {sub} " in out  # each is listed with a description
    assert "examples:" in out and "worldlm train --config tiny" in out
    assert "--set" in out and "key.path=value" in out
    code, out, _ = run_cli(["sweep", "--help"])
    assert code == 0 and "--grid" in out and "skipped" in out


def test_no_subcommand_prints_help_and_fails():
    code, out, _ = run_cli([])
    assert code == 2 and "subcommands:" in out


def test_presets_lists_every_preset_with_its_docstring():
    code, out, _ = run_cli(["presets"])
    assert code == 0
    for name, build in configs.PRESETS.items():
        assert f"\n{name}\n" in "\n" + out
        assert " ".join(build.__doc__.split())[:30] in " ".join(out.split())


@pytest.mark.parametrize("override, expected", [
    ("run.rounds=abc", "run.rounds='abc': expected an integer"),
    ("run.round=3", "Did you mean run.rounds?"),
    ("algorithm.name=fedsgd", "algorithm.name='fedsgd' is not a registered strategy"),
    ("data.seq_len=4096", "data.seq_len=4096 exceeds model.max_len"),
    ("tree.children=[{name: a, sources: [nope], clients: 2}]", "unknown data source 'nope'"),
])
def test_bad_config_exits_with_one_line_naming_the_key(override, expected, tmp_path):
    workdir = tmp_path / "run"
    code, out, err = run_cli(["train", "--config", "tiny", "--set", override, "--workdir", str(workdir)])
    assert code == 2
    assert expected in err
    assert "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1 and err.startswith("worldlm train: error:")
    assert not workdir.exists()  # failed before touching the disk


def test_unknown_preset_and_missing_yaml(tmp_path):
    code, _, err = run_cli(["train", "--config", "tinny", "--workdir", str(tmp_path)])
    assert code == 2 and "unknown preset 'tinny'" in err and "tiny" in err
    code, _, err = run_cli(["train", "--config", str(tmp_path / "nope.yaml"), "--workdir", str(tmp_path)])
    assert code == 2 and "not found" in err


def test_scientific_notation_and_yaml_config(tmp_path):
    config = cli_commands.load_config("tiny", ["policy.client_lr=1e-3", "run.rounds=4"])
    assert config.policy.client_lr == 0.001 and config.run.rounds == 4
    path = tmp_path / "exp.yaml"
    path.write_text("run: {rounds: 3}\nalgorithm: {name: fedavg}\n"
                    "tree: {name: w, children: [{name: en, sources: [man_en], clients: 2}]}\n")
    config = cli_commands.load_config(str(path), ["run.seed=5"])
    assert (config.run.rounds, config.algorithm.name, config.run.seed) == (3, "fedavg", 5)
    assert cli_commands.preset_name(str(path)) == "exp" and cli_commands.preset_name("demo") == "demo"


def test_target_epsilon_goes_into_the_config_or_fails_clearly():
    base = configs.get("tiny")
    config, extra = cli_commands.apply_privacy_target(base, 3.0, 1e-6)
    if extra:  # train() takes them as keyword arguments
        assert extra == {"target_epsilon": 3.0, "target_delta": 1e-6}
    else:
        flat = run_dirs.flatten_config(config)
        eps_keys = [k for k, v in flat.items() if k.endswith("target_epsilon")]
        assert eps_keys and flat[eps_keys[0]] == 3.0
        assert any(k.endswith("delta") and v == 1e-6 for k, v in flat.items())
    with pytest.raises(cli_commands.CliError, match="--target-delta needs --target-epsilon"):
        cli_commands.apply_privacy_target(base, None, 1e-6)
    with pytest.raises(cli_commands.CliError, match="> 0"):
        cli_commands.apply_privacy_target(base, -1.0, None)


# ---- plugins ----------------------------------------------------------------------------
PLUGIN = ("import optax\nfrom worldlm_jax.plugins import optimizers\n"
          "optimizers.OPTIMIZERS.register('cli_test_sgd', lambda: optax.sgd(1.0), replace=False)\n")


def test_plugin_registers_an_optimizer_the_yaml_names(tmp_path):
    (tmp_path / "opts.py").write_text(PLUGIN)
    path = tmp_path / "exp.yaml"
    path.write_text("base: tiny\npolicy: {server_optimizer: cli_test_sgd}\n")
    plan = ["plan", "--config", str(path), "--no-compile", "--json"]
    code, _, err = run_cli(plan)
    assert code == 2 and "'cli_test_sgd' is not a registered optimizer" in err  # without the plug-in
    for argv in (["--plugin", str(tmp_path / "opts.py"), *plan], [*plan, "--plugin", str(tmp_path / "opts.py")]):
        code, out, err = run_cli(argv)  # before the subcommand or after it; imported once
        assert code == 0, err
        assert json.loads(out)["fits"]


@pytest.mark.parametrize("plugin, expected", [
    ("no_such_module_xyz", "plugin 'no_such_module_xyz' failed to import: ModuleNotFoundError"),
    ("missing/plugin.py", "plugin file '"),
    ("broken.py", "plugin 'broken.py' failed to import: ZeroDivisionError: division by zero"),
])
def test_a_bad_plugin_is_a_one_line_error(plugin, expected, tmp_path, monkeypatch):
    (tmp_path / "broken.py").write_text("x = 1 / 0\n")
    monkeypatch.chdir(tmp_path)
    for argv in (["--plugin", plugin, "plan", "--config", "tiny"], ["train", "--plugin", plugin, *FAST]):
        code, out, err = run_cli(argv)
        assert code == 2 and expected in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + out


def test_train_reports_a_callback_stop_as_done(tmp_path, monkeypatch):
    from worldlm_jax.run import training as train_lib
    stopped = {"algorithm": "worldlm", "rounds_completed": 2, "interrupted": True, "stopped_by": "early_stop"}
    monkeypatch.setattr(train_lib, "train", lambda *args, **kwargs: stopped)
    code, out, err = run_cli(["train", *FAST, "--skip-memory-check", "--workdir", str(tmp_path / "run")])
    assert code == 0, err  # a callback's decision, not Ctrl-C (130)
    assert "stopped by early_stop after 2 rounds" in out


# ---- sweep grid (pure) -------------------------------------------------------------------
def test_parse_grid_and_points():
    grid = sweep.parse_grid(["a.b=1,2,3", "c=0.1,0.2", "k=[0,1],[2]"])
    assert grid == [("a.b", ["1", "2", "3"]), ("c", ["0.1", "0.2"]), ("k", ["[0,1]", "[2]"])]
    points = sweep.grid_points(grid)
    assert len(points) == 12
    assert points[0] == [("a.b", "1"), ("c", "0.1"), ("k", "[0,1]")]
    assert points[1] == [("a.b", "1"), ("c", "0.1"), ("k", "[2]")]  # last axis fastest
    assert len({tuple(p) for p in points}) == 12
    for bad, message in (["a"], "key.path=v1"), (["a=1,,2"], "empty value"), (["a=1", "a=2"], "twice"):
        with pytest.raises(Exception, match=message):
            sweep.parse_grid(bad)


def test_point_names_are_filesystem_safe_and_unique():
    assert sweep.point_name([("run.seed", "1"), ("policy.tau", "0.5")]) == "run.seed=1__policy.tau=0.5"
    odd = [sweep.point_name([("k", v)]) for v in ("[0,1]", "[0 1]", "a/b", "a\\b", "x" * 300)]
    assert len(set(odd)) == len(odd)
    for name in odd:
        assert "/" not in name and "\\" not in name and " " not in name and len(name) < 140


# ---- train / eval -------------------------------------------------------------------------
def test_train_writes_summary_and_prints_the_table(trained):
    workdir, code, out, err = trained
    assert code == 0, err
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["rounds_completed"] == 1 and not summary["interrupted"]
    assert summary["algorithm"] == "worldlm"
    rounds = [r for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))) if "train_loss" in r]
    assert all(r["sim_seconds"] > 0 for r in rounds)  # the network clock: docs/network.md
    assert all(sum(r["sim_seconds_per_level"].values()) + r["sim_compute_seconds"] == pytest.approx(r["sim_seconds"])
               for r in rounds)
    assert summary["sim_hours"] == pytest.approx(sum(r["sim_seconds"] for r in rounds) / 3600)
    assert 0 < summary["compute_utilisation"] <= 1
    ev = summary["eval"]
    assert set(ev["per_federation"]) == {"en", "de", "ru"}
    assert math.isfinite(ev["perplexity"]) and 1 < ev["perplexity"] < 1000  # byte vocab: < 256 untrained
    for name, ppl in ev["per_federation"].items():
        assert f"{ppl:10.3f}" in out and name in out
    assert f"{ev['perplexity']:10.3f}" in out and "bits/byte" in out
    assert f"{summary['sim_hours'] * 3600:.4g} simulated s" in out
    assert f"compute utilisation {100 * summary['compute_utilisation']:.1f}%" in out
    assert f"{summary['bytes_communicated']['total'] / 1e6:.4g} MB communicated" in out
    assert "summary.json" in out
    saved = load_yaml(os.path.join(workdir, "config.yaml"))
    assert saved.run.rounds == 1 and saved.model == apply_overrides(configs.get("tiny"), ["model.n_layers=1"]).model
    assert os.path.isdir(os.path.join(workdir, "checkpoints"))


def test_train_again_on_a_finished_run_does_nothing(trained, cache_args):
    workdir = trained[0]
    mtime = os.path.getmtime(os.path.join(workdir, "summary.json"))
    code, out, _ = run_cli(["train", *FAST, *cache_args, "--workdir", workdir, "--quiet"])
    assert code == 0 and "already finished 1 rounds" in out
    assert os.path.getmtime(os.path.join(workdir, "summary.json")) == mtime


def test_train_refuses_to_resume_with_another_config(trained, cache_args):
    workdir = trained[0]
    code, out, err = run_cli(["train", *FAST, *cache_args, "--set", "policy.client_lr=0.1",
                              "--workdir", workdir, "--quiet"])
    assert code == 2 and "different config" in err and "policy.client_lr" in err
    assert "Traceback" not in err


def test_eval_reproduces_the_final_perplexity(trained):
    workdir = trained[0]
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    code, out, err = run_cli(["eval", "--workdir", workdir])
    assert code == 0, err
    result = json.load(open(os.path.join(workdir, "eval.json")))
    assert result["round"] == 1 and result["split"] == "validation"
    assert result["perplexity"] == pytest.approx(summary["eval"]["perplexity"], rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(summary["eval"]["bits_per_byte"], rel=1e-5)
    for name, ppl in summary["eval"]["per_federation"].items():
        assert result["per_federation"][name] == pytest.approx(ppl, rel=1e-5)
    assert f"{result['perplexity']:10.3f}" in out


def test_eval_without_a_run_fails_clearly(tmp_path):
    code, _, err = run_cli(["eval", "--workdir", str(tmp_path)])
    assert code == 2 and "no config.yaml" in err and "Traceback" not in err


# ---- sweep / report -------------------------------------------------------------------------
# Points that differ only in evaluation: the training step compiles once for all three
# runs (the persistent cache), only the evaluator recompiles for 2 batches.
POINTS = ("data.eval_batches=1", "data.eval_batches=2")


def test_sweep_trains_every_point_and_writes_the_table(swept):
    workdir, _, code, out, err = swept
    assert code == 0, err
    summaries = {}
    for name in POINTS:
        summary = json.load(open(os.path.join(workdir, name, "summary.json")))
        assert summary["rounds_completed"] == 1
        assert load_yaml(os.path.join(workdir, name, "config.yaml")).data.eval_batches == int(name.split("=")[1])
        summaries[name] = summary
    table = open(os.path.join(workdir, "sweep.md")).read()
    assert "| data.eval_batches | perplexity | bits/byte | wall s |" in table
    for name, summary in summaries.items():
        row = next(line for line in table.splitlines() if line.endswith(f"| {name} |"))
        assert f"| {name.split('=')[1]} |" in row
        assert f"{summary['eval']['perplexity']:.3f}" in row and "| trained |" in row
    data = json.load(open(os.path.join(workdir, "sweep.json")))
    assert [p["name"] for p in data["points"]] == list(POINTS)
    assert data["points"][1]["assignments"] == {"data.eval_batches": "2"}
    # twice the validation windows: another estimate of the perplexity
    assert summaries[POINTS[0]]["eval"]["perplexity"] != summaries[POINTS[1]]["eval"]["perplexity"]


def test_sweep_again_skips_finished_points(swept):
    workdir, argv, *_ = swept
    mtimes = {n: os.path.getmtime(os.path.join(workdir, n, "summary.json")) for n in POINTS}
    code, out, err = run_cli(argv)
    assert code == 0, err
    assert out.count("finished earlier, skipped") == 2
    assert {n: os.path.getmtime(os.path.join(workdir, n, "summary.json")) for n in POINTS} == mtimes
    table = open(os.path.join(workdir, "sweep.md")).read()
    assert table.count("| skipped |") == 2


def test_report_compares_runs(swept, tmp_path):
    workdir = swept[0]
    dirs = [os.path.join(workdir, n) for n in POINTS]
    out_dir = tmp_path / "report"
    code, out, err = run_cli(["report", *dirs, "--out", str(out_dir)])
    assert code == 0, err
    text = (out_dir / "report.md").read_text()
    assert "| run | algorithm | rounds | perplexity | bits/byte | ppl / first | ppl en | ppl de | ppl ru |" in text
    ppl = [json.load(open(os.path.join(d, "summary.json")))["eval"] for d in dirs]
    rows = [line for line in text.splitlines() if line.startswith("| data.eval_batches=")]
    assert len(rows) == 2
    assert rows[0].startswith(f"| {POINTS[0]} | worldlm | 1 | {ppl[0]['perplexity']:.3f} |")
    assert "| 1.000 |" in rows[0]
    assert f"| {ppl[1]['perplexity'] / ppl[0]['perplexity']:.3f} |" in rows[1]
    assert f"| {ppl[1]['per_federation']['ru']:.3f} |" in rows[1]
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    # the points differ in one number (data.eval_batches): a sweep plot against it
    assert pngs == sorted(["curves.png", "sweep.png"] + [f"perplexity_{n}.png" for n in POINTS])
    assert all((out_dir / p).stat().st_size > 5000 for p in pngs)
    data = json.load(open(out_dir / "report.json"))
    assert data["runs"][1]["run"] == POINTS[1]
    assert data["differing_fields"] == ["data.eval_batches"]  # nothing else of the saved configs


def test_report_of_a_missing_dir_fails_clearly(tmp_path):
    code, _, err = run_cli(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert code == 2 and "not a directory" in err


def test_vectorized_sweep_runs_all_points_in_one_program(tmp_path):
    code, out, err = run_cli(["sweep", "--config", "tiny", "--set", "run.rounds=1", "--set", "run.devices=1",
                              "--grid", "policy.client_lr=1e-3,3e-3", "--vectorized", "--workdir", str(tmp_path)])
    assert code == 0, err
    table = json.loads((tmp_path / "sweep.json").read_text())["points"]
    assert [p["assignments"]["policy.client_lr"] for p in table] == ["1e-3", "3e-3"]
    assert all(p["status"] == "vectorized (1 compile)" for p in table)
    assert table[0]["perplexity"] != table[1]["perplexity"]
    code, out, err = run_cli(["sweep", "--config", "tiny", "--grid", "data.batch_size=2,3", "--vectorized",
                              "--workdir", str(tmp_path / "bad")])
    assert code == 2 and "differ only" in err and "Traceback" not in err


def test_the_functions_whose_value_errors_are_bad_input_exist():
    """The CLI prints a plain ValueError from these as one line; a renamed one would
    bring the traceback back (as the move into subpackages once did)."""
    import importlib

    for module, name in cli.BUILDING_FUNCTIONS:
        assert callable(getattr(importlib.import_module(module), name, None)), (module, name)


def test_a_value_error_while_building_the_data_is_one_line(tmp_path, monkeypatch):
    from worldlm_jax.data import pipeline

    def refuse(*args, **kwargs):
        raise ValueError("client 'en/0' has 3 bytes of text")

    monkeypatch.setattr(pipeline, "leaf_documents", refuse)  # called by the real pipeline.prepare
    code, out, err = run_cli(["train", "--config", "tiny", "--workdir", str(tmp_path / "run"), "--quiet",
                              "--skip-memory-check"])
    assert code == 2 and err.strip() == "worldlm train: error: client 'en/0' has 3 bytes of text", err


def test_eval_set_changes_how_it_evaluates_and_nothing_else(trained):
    workdir = trained[0]
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    batches = load_yaml(os.path.join(workdir, "config.yaml")).data.eval_batches
    code, _, err = run_cli(["eval", "--workdir", workdir, "--set", f"data.eval_batches={batches}"])
    assert code == 0, err
    same = json.load(open(os.path.join(workdir, "eval.json")))  # the run's own windows, given explicitly
    assert same["perplexity"] == pytest.approx(summary["eval"]["perplexity"], rel=1e-5)
    assert same["overrides"] == [f"data.eval_batches={batches}"]
    code, _, err = run_cli(["eval", "--workdir", workdir, "--set", f"data.eval_batches={batches + 2}"])
    assert code == 0, err
    more = json.load(open(os.path.join(workdir, "eval.json")))
    assert more["perplexity"] != pytest.approx(same["perplexity"], rel=1e-5)  # more windows, another estimate
    code, _, err = run_cli(["eval", "--workdir", workdir, "--set", "model.d_model=64"])
    assert code == 2 and err.count("\n") == 1 and "may change only data.eval_batches" in err, err


def test_every_recorded_key_is_documented(trained):
    """docs/metrics.md names every key a run writes (level numbers as level{d})."""
    import re

    workdir = trained[0]
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "metrics.md")).read()
    documented = set(re.findall(r"`([a-z_{}/0-9]+)`", doc))
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    keys = {documented_form(k) for r in records for k in r}
    keys |= set(json.load(open(os.path.join(workdir, "summary.json"))))
    assert keys - documented == set(), sorted(keys - documented)
    rounds = [r["round"] for r in records if "train_loss" in r]
    assert rounds == list(range(len(rounds))) and records[-1]["round"] == rounds[-1]  # one numbering, from 0
    inherited = configs.get("tiny").policy.server_optimizer
    assert inherited != "momentum"
    for rules in [r["rules"] for r in records if "train_loss" in r] + [json.load(open(
            os.path.join(workdir, "summary.json")))["rules"]]:
        assert {name: r["server_optimizer"] for name, r in rules.items()} == {
            "world": "momentum", "en": inherited, "de": inherited, "ru": inherited}
