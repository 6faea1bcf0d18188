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
    argv = ["--budget", "tiny", "--out", str(out), "--methods", "fedavg,worldlm", "--set", "run.rounds=1",
            "--seeds", "2"]
    results = rp.main(argv)

    on_disk = json.loads((out / "results.json").read_text())
    assert set(on_disk["methods"]) == {"worldlm", "fedavg"}
    assert on_disk["budget"] == "tiny" and on_disk["tree"] == "language" and on_disk["seeds"] == 2
    assert "--methods fedavg,worldlm" in on_disk["command"]
    assert on_disk["methods"]["worldlm"]["ratio_to_worldlm"] == 1.0
    for name, m in on_disk["methods"].items():
        per_seed = [json.loads((out / "runs" / name / f"seed{k}" / "summary.json").read_text()) for k in range(2)]
        assert [s["rounds_completed"] for s in per_seed] == [1, 1]
        assert per_seed[0]["vectorized"]["points"] == 2  # the seeds trained as one program
        ppl = [s["eval"]["perplexity"] for s in per_seed]
        assert ppl[0] != ppl[1]  # the seeds differ
        assert m["perplexity"] == pytest.approx(sum(ppl) / 2)
        assert m["perplexity_std"] == pytest.approx(abs(ppl[0] - ppl[1]) / math.sqrt(2))
        assert [r["perplexity"] for r in m["seeds"]] == ppl
        for f, v in m["per_federation"].items():
            assert v == pytest.approx(sum(s["eval"]["per_federation"][f] for s in per_seed) / 2)
        assert set(m["per_federation"]) == {"en", "de", "ru"}
        assert m["bytes_communicated"] == per_seed[0]["bytes_communicated"]["total"] > 0
        assert math.isfinite(m["perplexity"]) and m["perplexity"] > 1

    table = (out / "table.md").read_text()
    methods_table = table.split("\n\n")[0]  # then diagnostics and verdicts, each its own table
    rows = {line.split("|")[1].strip(): line for line in methods_table.splitlines() if line.startswith("| ")}
    assert {"method", "worldlm", "fedavg"} <= set(rows)
    cells = [c.strip() for c in rows["worldlm"].split("|")[1:-1]]
    header = [c.strip() for c in rows["method"].split("|")[1:-1]]
    assert cells[header.index("ppl / worldlm ppl")] == "1.000"
    w = on_disk["methods"]["worldlm"]
    assert cells[header.index("overall ppl")] == f"{w['perplexity']:.2f} ± {w['perplexity_std']:.2f}"
    fed_cells = [c.strip() for c in rows["fedavg"].split("|")[1:-1]]
    ratios = [f["perplexity"] / r["perplexity"] for f, r in zip(on_disk["methods"]["fedavg"]["seeds"], w["seeds"])]
    assert fed_cells[header.index("ppl / worldlm ppl")].startswith(f"{sum(ratios) / 2:.3f} ± ")
    assert on_disk["verdicts"]["WorldLM vs FedAvg"]["ratio"] == pytest.approx(sum(ratios) / 2)
    v = on_disk["verdicts"]["WorldLM vs FedAvg"]
    row = [line for line in rp.summarize([str(out)]).splitlines() if line.startswith("| WorldLM vs FedAvg")]
    assert row == [f"| WorldLM vs FedAvg | {v['ratio']:.3f} ± {v['ratio_std']:.3f}"
                   + {"better": " **helps**", "worse": " **hurts**"}.get(v["call"], "") + " |"]
    assert (out / "perplexity.png").stat().st_size > 0
    diag = on_disk["methods"]["worldlm"]["diagnostics"]  # the leaf federations attend over their clients
    assert 0 < diag["level1"]["attention_entropy"] <= 1 and "| worldlm | level1 |" in table

    # A rerun skips finished runs and reproduces the same numbers.
    again = rp.main(argv)
    assert again["methods"]["fedavg"]["perplexity"] == results["methods"]["fedavg"]["perplexity"]


def test_paired_verdict_calls_only_what_the_seeds_support(rp):
    better = rp.paired_verdict([100, 110, 90], [150, 160, 140])
    assert better["call"] == "better" and better["ratio"] == pytest.approx((1.5 + 160 / 110 + 140 / 90) / 3)
    assert rp.paired_verdict([150, 160, 140], [100, 110, 90])["call"] == "worse"
    # a big mean difference that one seed contradicts is not a win
    assert rp.paired_verdict([100, 100, 100], [200, 200, 95])["call"] == "no difference"
    # consistent but tiny against noisy seeds: a paired t-test at 95% (t = 4.30 for 3 seeds) decides
    assert rp.paired_verdict([100, 100, 100], [101, 110, 130])["call"] == "no difference"
    assert rp.paired_verdict([100, 100, 100], [101, 101.1, 101.2])["call"] == "better"
    assert rp.paired_verdict([100], [200])["call"] == "one seed"


def test_scenario_trees(rp):
    from worldlm_jax.tree.topology import build_topology

    mixed = rp.SCENARIOS["mixed"].tree(False)
    assert all(f["split"] == "dirichlet" and len(f["sources"]) == 2 for f in mixed["children"])
    small = build_topology(rp.SCENARIOS["many-small"].tree(False))
    assert small.n_clients == 48 and small.n_slots == 16  # 4 of 12 sampled per language
    fam = build_topology(rp.SCENARIOS["families"].tree(False))
    assert fam.depth == 3 and list(fam.levels[1].names) == ["germanic", "romance", "slavic"]
    dom = rp.SCENARIOS["domains"].tree(False)
    assert {c["sources"][0] for c in dom["children"]} == {"man_en", "fortunes_en", "code_py", "lit_en"}
    for name, sc in rp.SCENARIOS.items():  # every scenario builds at both sizes
        for tiny in (True, False):
            build_topology(sc.tree(tiny))
        base = rp.base_config("tiny", "language", [], scenario=name)
        assert base.run.rounds == 2  # the tiny budget keeps its own sizes


def test_default_methods_have_no_duplicate_configs(rp):
    """Two default methods with the same config would print the same row twice
    (as worldlm_mean and worldlm_mean_nores once did)."""
    base = rp.base_config("tiny", "language", [])
    configs = {m: rp.method_config(base, m).to_dict() for m in rp.METHODS}
    assert len({json.dumps(c, sort_keys=True, default=str) for c in configs.values()}) == len(rp.METHODS)
    assert "worldlm_mean_nores" not in rp.METHODS and "worldlm_mean_nores" in rp.KNOWN


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


def test_privacy_scenarios_spend_the_target_epsilon_where_they_say(rp):
    from worldlm_jax.privacy import accounting
    from worldlm_jax.tree.topology import build_topology

    base = rp.base_config("tiny", "language", [], scenario="dp-clients")
    dp = rp.privacy_policy(rp.SCENARIOS["dp-clients"].privacy, base)
    rate = 2 / 8  # 2 of 8 clients per round, Poisson
    eps = accounting.epsilon_after(dp["dp_noise_multiplier"], rate, base.run.rounds, 1e-5, "rdp", "poisson")
    assert 7.5 < eps <= 8.0  # calibrated: the smallest noise within the budget
    # client level: the tree's leaves and the flat baseline's one federation, same noise and rate
    tree = build_topology(rp.method_config(base, "worldlm", dp).tree)
    assert [p.dp_noise_multiplier for p in tree.leaf.policies] == [dp["dp_noise_multiplier"]] * 2
    assert tree.levels[0].policies[0].dp_noise_multiplier == 0.0
    flat_cfg = rp.method_config(base, "fedavg", dp)
    flat = build_topology(flat_cfg.tree, root_policy=flat_cfg.policy).flattened()
    (pol,) = flat.levels[0].policies
    assert pol.dp_noise_multiplier == dp["dp_noise_multiplier"] and pol.sampling == "poisson"
    assert pol.clients_per_round / flat.n_clients == rate
    # organisation level: the root only
    orgs = rp.base_config("tiny", "language", [], scenario="dp-orgs")
    dp = rp.privacy_policy(rp.SCENARIOS["dp-orgs"].privacy, orgs)
    tree = build_topology(rp.method_config(orgs, "hierfavg", dp, "federations").tree)
    assert tree.levels[0].policies[0].dp_noise_multiplier == dp["dp_noise_multiplier"] > 0
    assert all(p.dp_noise_multiplier == 0.0 for p in tree.leaf.policies)
    with pytest.raises(SystemExit, match="needs a tree"):
        rp.method_config(orgs, "fedavg", dp, "federations")


def test_family_level_ablation_lifts_languages_to_the_root(rp):
    from worldlm_jax.tree.topology import build_topology

    base = rp.base_config("tiny", "language", [], scenario="families")
    with_families = build_topology(rp.method_config(base, "worldlm").tree)
    without = build_topology(rp.method_config(base, "worldlm_nofamily").tree)
    assert with_families.depth == 3 and without.depth == 2
    assert list(without.levels[1].names) == list(with_families.levels[2].names)
    assert without.client_names == with_families.client_names  # same clients, same data
    with pytest.raises(SystemExit, match="middle level"):
        rp.method_config(rp.base_config("tiny", "language", []), "worldlm_nofamily")
