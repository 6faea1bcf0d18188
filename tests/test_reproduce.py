"""scripts/reproduce_paper.py: a tiny end-to-end run and the pure helpers."""
import importlib.util
import json
import math
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rp():
    spec = importlib.util.spec_from_file_location("reproduce_paper", ROOT / "scripts" / "reproduce_paper.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


def test_tiny_end_to_end(rp, tmp_path):
    out = tmp_path / "out"
    argv = ["--budget", "tiny", "--out", str(out), "--methods", "fedavg,worldlm", "--set", "run.rounds=1"]
    results = rp.main(argv)

    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk["methods"]) == {"worldlm", "fedavg"}
    assert on_disk["budget"] == "tiny" and on_disk["tree"] == "language"
    assert "--methods fedavg,worldlm" in on_disk["command"]
    assert on_disk["methods"]["worldlm"]["ratio_to_worldlm"] == 1.0
    for name, m in on_disk["methods"].items():
        summary = json.loads((out / "runs" / name / "summary.json").read_text())
        assert summary["rounds_completed"] == 1
        assert m["perplexity"] == summary["eval"]["perplexity"]
        assert m["bits_per_byte"] == summary["eval"]["bits_per_byte"]
        assert m["per_federation"] == summary["eval"]["per_federation"]
        assert set(m["per_federation"]) == {"en", "de", "ru"}
        assert m["wall_seconds"] == summary["wall_seconds"]
        assert m["bytes_communicated"] == summary["bytes_communicated"]["total"]
        assert m["bytes_communicated"] == pytest.approx(sum(m["bytes_per_level"].values()))
        assert m["bytes_communicated"] > 0
        assert math.isfinite(m["perplexity"]) and m["perplexity"] > 1

    table = (out / "table.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert {"method", "worldlm", "fedavg"} <= set(rows)
    cells = [c.strip() for c in rows["worldlm"].split("|")[1:-1]]
    header = [c.strip() for c in rows["method"].split("|")[1:-1]]
    assert cells[header.index("ppl / worldlm ppl")] == "1.000"
    assert cells[header.index("overall ppl")] == f"{on_disk['methods']['worldlm']['perplexity']:.2f}"
    fed_cells = [c.strip() for c in rows["fedavg"].split("|")[1:-1]]
    ratio = on_disk["methods"]["fedavg"]["perplexity"] / on_disk["methods"]["worldlm"]["perplexity"]
    assert fed_cells[header.index("ppl / worldlm ppl")] == f"{ratio:.3f}"
    assert (out / "perplexity.png").stat().st_size > 0

    # A rerun skips finished runs and reproduces the same numbers.
    again = rp.main(argv)
    assert again["methods"]["fedavg"]["perplexity"] == results["methods"]["fedavg"]["perplexity"]


def test_method_configs_differ_only_in_algorithm(rp):
    base = rp.base_config("tiny", "language", [])
    mean = rp.method_config(base, "worldlm_mean_nores")
    assert mean.algorithm.name == "worldlm" and mean.policy.k_agg == "mean" and mean.algorithm.residuals == "none"
    fedavg = rp.method_config(base, "fedavg")
    assert fedavg.tree == base.tree and fedavg.model == base.model and fedavg.data == base.data


def test_dp_goes_where_clients_are_aggregated(rp):
    base = rp.base_config("tiny", "language", [], clients=4)
    dp = {"dp_noise_multiplier": 0.5, "dp_clip": 1.0}
    flat = rp.method_config(base, "fedavg", dp)
    assert flat.policy.dp_noise_multiplier == 0.5 and flat.policy.dp_clip == 1.0
    tree = rp.method_config(base, "worldlm", dp)
    assert tree.policy.dp_noise_multiplier == 0.0  # root aggregates federations: no DP there
    assert all(c["policy"] == dp and c["clients"] == 4 for c in tree.tree["children"])


def test_swapped_family_tree(rp):
    right = rp.family_tree(2)
    wrong = rp.family_tree(2, swap=True)
    langs = lambda t: {f["name"]: [c["sources"][0] for c in f["children"]] for f in t["children"]}
    assert langs(right)["romance"] == ["man_fr", "man_es", "man_it"]
    assert langs(wrong)["romance"] == ["man_ru", "man_es", "man_it"]
    assert langs(wrong)["slavic"] == ["man_pl", "man_fr"]
