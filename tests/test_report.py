"""`worldlm report` on run dirs written by hand (no training): seed groups, the config
fields that differ, the sweep plot, warnings and the curves' data."""
import json
import os
import statistics

import pytest
import yaml

from cli_helpers import run_cli
from worldlm_jax.outputs import report

TOKENS_PER_ROUND = 64


def write_run(root, name, *, lr=0.001, seed=0, final_ppl=150.0, rounds=4, evals=(1, 3), tau=0.1, finished=True):
    """A run dir as training leaves it: config.yaml, metrics.jsonl (a line per round, one
    per evaluation after rounds `evals`) and, when finished, summary.json."""
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    config = {"algorithm": {"name": "worldlm"}, "run": {"rounds": 4, "seed": seed, "callbacks": []},
              "policy": {"client_lr": lr, "tau": 0.1},
              "tree": {"name": "world", "children": [
                  {"name": "en", "sources": ["man_en"], "clients": 2, "policy": {"tau": tau}},
                  {"name": "de", "sources": ["man_de"], "clients": 2}]}}
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    records = []
    for r in range(rounds):
        records.append({"round": r, "train_loss": 5.0 - 0.3 * r - seed / 100 - lr, "tokens": TOKENS_PER_ROUND,
                        "bytes_communicated": {"level1": {"total": 1000 + r}, "total": 1000 + r},
                        "sim_seconds": 360.0 * (r + 1)})
        if r in evals:
            ppl = final_ppl + 10 * (rounds - 1 - r)
            records.append({"round": r, "eval": {"perplexity": ppl, "per_federation": {"en": ppl, "de": ppl}}})
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    if finished:
        summary = {"algorithm": "worldlm", "rounds_completed": rounds, "wall_seconds": 1.0,
                   "eval": {"perplexity": final_ppl, "bits_per_byte": final_ppl / 100,
                            "per_federation": {"en": final_ppl, "de": final_ppl}}}
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f)
    return run_dir


# 2 learning rates x 2 seeds, named as `worldlm sweep` names its points
FINAL_PPL = {(0.001, 0): 153.3, (0.001, 1): 139.6, (0.01, 0): 120.0, (0.01, 1): 125.0}


@pytest.fixture(scope="module")
def lr_by_seed(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    dirs = [write_run(root, f"policy.client_lr={lr}__run.seed={seed}", lr=lr, seed=seed, final_ppl=ppl)
            for (lr, seed), ppl in FINAL_PPL.items()]
    out = root / "report"
    result = report.write_report(dirs, str(out))
    return dirs, out, result, json.loads((out / "report.json").read_text())


def test_seeds_of_one_learning_rate_form_a_group_with_mean_std_and_n(lr_by_seed):
    _, out, result, data = lr_by_seed
    groups = data["groups"]
    assert [g["group"] for g in groups] == ["policy.client_lr=0.001 (seeds 0,1)", "policy.client_lr=0.01 (seeds 0,1)"]
    for g, lr in zip(groups, (0.001, 0.01)):
        values = [FINAL_PPL[lr, 0], FINAL_PPL[lr, 1]]
        assert g["n"] == 2 and g["seeds"] == [0, 1] and g["config"] == {"policy.client_lr": lr}
        assert g["perplexity"]["mean"] == pytest.approx(statistics.mean(values))
        assert g["perplexity"]["std"] == pytest.approx(statistics.stdev(values))  # n - 1
        assert (g["perplexity"]["min"], g["perplexity"]["max"]) == (min(values), max(values))
        assert [(s["seed"], s["perplexity"]) for s in g["per_seed"]] == [(0, values[0]), (1, values[1])]
    text = (out / "report.md").read_text()
    assert "| policy.client_lr=0.001 (seeds 0,1) | 2 | 0,1 | 146.450 | 9.687 | 139.600 | 153.300 |" in text
    assert result["warnings"] == [] and "warning" not in text


def test_one_column_per_config_field_that_differs(lr_by_seed):
    _, out, _, data = lr_by_seed
    assert data["differing_fields"] == ["run.seed", "policy.client_lr"]
    assert data["group_fields"] == ["policy.client_lr"]  # the seeds are the group's
    lines = (out / "report.md").read_text().splitlines()
    runs_header = next(line for line in lines if line.startswith("| run |"))
    assert runs_header.endswith("| ppl en | ppl de | run.seed | policy.client_lr |")
    row = next(line for line in lines if line.startswith("| policy.client_lr=0.01__run.seed=1 |"))
    assert row.endswith("| 1 | 0.01 |")
    assert next(line for line in lines if line.startswith("| group |")).endswith("| policy.client_lr |")


def test_config_fields_flatten_the_tree_by_federation_name():
    flat = report.flatten_config({"run": {"seed": 0, "callbacks": [{"name": "a", "args": {}}, {"name": "a"}]},
                                  "tree": {"name": "world", "children": [
                                      {"name": "germanic", "children": [{"name": "de", "clients": 2}]},
                                      {"name": "en", "sources": ["man_en", "lit_en"], "policy": {"tau": 0.5}}]}})
    assert flat == {"run.seed": 0, "run.callbacks.0.name": "a", "run.callbacks.0.args": {},
                    "run.callbacks.1.name": "a",  # names repeat: by index
                    "tree.name": "world", "tree.germanic.de.clients": 2,
                    "tree.en.sources": ["man_en", "lit_en"], "tree.en.policy.tau": 0.5}
    other = dict(flat, **{"tree.en.policy.tau": 1.0})
    del other["run.callbacks.1.name"]
    assert report.differing_fields([flat, other]) == ["run.callbacks.1.name", "tree.en.policy.tau"]
    assert report.differing_fields([flat, dict(flat)]) == []


def test_the_sweep_plot_is_final_perplexity_against_the_one_swept_field(lr_by_seed):
    _, out, result, data = lr_by_seed
    assert str(out / "sweep.png") in result["files"] and (out / "sweep.png").stat().st_size > 5000
    assert data["sweep"]["field"] == "policy.client_lr"
    assert [(p["value"], p["n"], p["low"], p["high"]) for p in data["sweep"]["points"]] == [
        (0.001, 2, 139.6, 153.3), (0.01, 2, 120.0, 125.0)]


def test_no_sweep_plot_when_two_fields_differ_or_the_field_is_not_a_number(tmp_path):
    dirs = [write_run(tmp_path, "a", lr=0.001, tau=0.1, evals=()), write_run(tmp_path, "b", lr=0.01, tau=0.5, evals=())]
    result = report.write_report(dirs, str(tmp_path / "report"))
    assert [g["config"] for g in result["groups"]] == [{"policy.client_lr": 0.001, "tree.en.policy.tau": 0.1},
                                                       {"policy.client_lr": 0.01, "tree.en.policy.tau": 0.5}]
    assert not (tmp_path / "report" / "sweep.png").exists()
    assert json.loads((tmp_path / "report" / "report.json").read_text())["sweep"] is None
    groups = [{"group": "x", "n": 1, "config": {"algorithm.name": "fedavg"}, "perplexity": {}}]
    assert report.sweep_points(groups, ["algorithm.name"]) is None


def test_unequal_round_counts_and_unfinished_runs_warn_one_line_each(tmp_path):
    dirs = [write_run(tmp_path, "seed0", seed=0, evals=()), write_run(tmp_path, "seed1", seed=1, rounds=3, evals=()),
            write_run(tmp_path, "seed2", seed=2, evals=()), write_run(tmp_path, "seed3", seed=3, evals=(3,), finished=False)]
    code, out, err = run_cli(["report", *dirs, "--out", str(tmp_path / "report")])
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == [
        "worldlm report: warning: seed3: unfinished (no summary.json), reported from its evaluation after round 3",
        "worldlm report: warning: seed1: 3 rounds completed, 4 in 3 of 4 runs: its numbers are from another "
        "point of training"]
    text = (tmp_path / "report" / "report.md").read_text()
    assert [line for line in text.splitlines() if line.startswith("- warning: ")] == [
        w.replace("worldlm report: warning: ", "- warning: ") for w in warnings]


def test_no_group_keeps_one_row_and_one_curve_per_seed(tmp_path):
    dirs = [write_run(tmp_path, "seed0", seed=0, evals=()), write_run(tmp_path, "seed1", seed=1, evals=())]
    code, _, err = run_cli(["report", *dirs, "--out", str(tmp_path / "report"), "--no-group"])
    assert code == 0, err
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [(g["group"], g["n"]) for g in data["groups"]] == [("seed0", 1), ("seed1", 1)]
    assert data["group_fields"] == ["run.seed"] and data["sweep"] is None  # seeds are repeats, not a sweep
    assert "## Seed groups" not in (tmp_path / "report" / "report.md").read_text()
    grouped = report.write_report(dirs, str(tmp_path / "grouped"))["groups"]
    assert [(g["group"], g["n"]) for g in grouped] == [("seed (seeds 0,1)", 2)]


def test_curves_hold_every_round_and_every_evaluation(lr_by_seed):
    dirs, _, _, data = lr_by_seed
    records = [json.loads(line) for line in open(os.path.join(dirs[1], "metrics.jsonl"))]
    rounds = [r for r in records if "eval" not in r]
    curves = data["curves"][os.path.basename(dirs[1])]
    train = curves["train_loss"]
    assert train["round"] == [0, 1, 2, 3]
    assert train["train_loss"] == [r["train_loss"] for r in rounds]
    assert train["tokens"] == [TOKENS_PER_ROUND * (r + 1) for r in range(4)]
    assert train["bytes_communicated"] == [1000, 2001, 3003, 4006]
    assert train["sim_hours"] == pytest.approx([0.1, 0.3, 0.6, 1.0])  # 360, 720, 1080, 1440 s summed
    evals = curves["perplexity"]  # each at what the run had spent when it evaluated
    assert evals == {"round": [1, 3], "tokens": [2 * TOKENS_PER_ROUND, 4 * TOKENS_PER_ROUND],
                     "bytes_communicated": [2001, 4006], "sim_hours": pytest.approx([0.3, 1.0]),
                     "perplexity": [r["eval"]["perplexity"] for r in records if "eval" in r]}


def test_a_group_line_is_the_mean_of_its_seeds_at_their_common_rounds():
    a = {"round": [0, 1, 2], "tokens": [1, 2, 3], "bytes_communicated": [10, 20, 30], "sim_hours": [1, 2, 3],
         "train_loss": [3.0, 2.0, 1.0]}
    b = {"round": [0, 1], "tokens": [1, 2], "bytes_communicated": [12, 22], "sim_hours": [3, 4],
         "train_loss": [5.0, 4.0]}
    assert report.mean_curve([a, b], "train_loss") == {
        "round": [0, 1], "tokens": [1.0, 2.0], "bytes_communicated": [11.0, 21.0], "sim_hours": [2.0, 3.0],
        "train_loss": [4.0, 3.0], "low": [3.0, 2.0], "high": [5.0, 4.0]}
    assert report.mean_curve([a], "train_loss") is a
