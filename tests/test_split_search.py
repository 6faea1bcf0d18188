"""`worldlm split-search`: the candidate splits, the Pareto front, the chosen split
written back as config, resumption and refusals (sweeps/split_search.py)."""
import json
import os
import re

import numpy as np
import pytest
import yaml

from worldlm_jax.config import ConfigError, apply_overrides, from_dict, merge, presets
from worldlm_jax.config.schema import Config
from worldlm_jax.engine import strategies
from worldlm_jax.model import lm, partition
from worldlm_jax.sweeps import grid, split_search


def _key_paths(config):
    """The parameters a config localises (empty when its strategy has no key layers)."""
    if not strategies.uses_key_layers(config.algorithm.name):
        return frozenset()
    _, params = lm.abstract_init(config.model)
    mask = partition.key_layer_mask(params, config.algorithm.key_layers, config.model.n_layers)
    return frozenset(p for p, is_key in mask.items() if is_key)


@pytest.mark.parametrize("n_layers", [1, 2, 4])
def test_each_candidate_localises_what_its_name_says_and_no_two_are_the_same(n_layers):
    base = apply_overrides(presets.tiny(), [f"model.n_layers={n_layers}"])
    _, params = lm.abstract_init(base.model)
    block = lambda p: partition.block_index(p)
    want = {f"top-{k}": {p for p in params if block(p) is not None and block(p) >= n_layers - k}
            for k in range(1, n_layers + 1)}
    want.update({f"bottom-{k}": {p for p in params if block(p) is not None and block(p) < k}
                 for k in range(1, n_layers)})
    want.update(attention={p for p in params if re.search(r"/attn(_norm)?/", p)},
                mlp={p for p in params if re.search(r"/mlp(_norm)?/", p)},
                embeddings={p for p in params if block(p) is None}, none=set())
    got = {c.name: set(_key_paths(grid.point_config(base, c.overrides))) for c in split_search.candidates(n_layers)}
    assert got == want
    assert len({frozenset(v) for v in got.values()}) == len(got)  # distinct splits
    assert got["embeddings"] == {"embed/embedding", "pos_embed/embedding", "final_norm/bias", "final_norm/scale"}


def _rows(values):
    return [{"name": f"c{i}", "perplexity": p, "bytes_communicated": {"total": b}} for i, (p, b) in enumerate(values)]


def test_the_front_holds_exactly_the_rows_nothing_beats_and_the_choice_is_the_lowest_perplexity():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 9))
        values = [(float(rng.integers(1, 5)), float(rng.integers(1, 5))) for _ in range(n)]
        if rng.random() < 0.3:
            values.append((float("nan"), 1.0))  # a candidate without a finite perplexity is never chosen
        rows = _rows(values)
        front = split_search.pareto(rows)
        finite = [r for r in rows if np.isfinite(r["perplexity"])]
        for r in finite:  # on the front iff no row is at least as good on both and better on one
            p, b = r["perplexity"], split_search.total_bytes(r)
            dominated = any(o["perplexity"] <= p and split_search.total_bytes(o) <= b and
                            (o["perplexity"] < p or split_search.total_bytes(o) < b) for o in finite)
            assert (r["name"] in front) == (not dominated)
        best = split_search.choose(rows)
        lowest = min(r["perplexity"] for r in finite)
        assert best["perplexity"] == lowest
        assert split_search.total_bytes(best) == min(split_search.total_bytes(r) for r in finite
                                                     if r["perplexity"] == lowest)
    with pytest.raises(ConfigError, match="no candidate finished"):
        split_search.choose(_rows([(float("nan"), 1.0)]))


def _fake_train(calls):
    """Stands in for a run: perplexity falls with the localised parameters' count, bytes
    grow with it; writes the summary a finished run leaves, so a rerun skips it."""
    def train(config, workdir, quiet=True, progress=False):
        calls.append(workdir)
        n_key = len(_key_paths(config))
        summary = {"rounds_completed": config.run.rounds, "interrupted": False,
                   "eval": {"perplexity": 100.0 - n_key, "bits_per_byte": 1.0, "per_federation": {}},
                   "bytes_communicated": {"total": 1000.0 + 10 * n_key}, "sim_hours": 0.0, "wall_seconds": 0.0}
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f)
        return summary
    return train


def test_the_search_writes_its_table_and_a_split_that_reproduces_the_chosen_candidate(tmp_path):
    base = apply_overrides(presets.tiny(), ["run.rounds=1"])
    calls = []
    result = split_search.search(base, str(tmp_path), train_fn=_fake_train(calls), log=lambda *a: None)
    names = [c.name for c in split_search.candidates(base.model.n_layers)]
    assert [r["name"] for r in result["rows"]] == names and len(calls) == len(names)
    # the fake's trade-off: every candidate is on the front, the most localised one is chosen
    sizes = {r["name"]: 100.0 - r["perplexity"] for r in result["rows"]}
    assert result["chosen"] == max(sizes, key=sizes.get)
    assert set(result["front"]) == set(names)
    # split.yaml under the base's own sections gives the chosen candidate's config
    written = yaml.safe_load(open(tmp_path / "split.yaml"))
    chosen = next(c for c in split_search.candidates(base.model.n_layers) if c.name == result["chosen"])
    merged = from_dict(Config, merge(base.to_dict(), written)).validate()
    assert merged == grid.point_config(base, chosen.overrides)
    assert _key_paths(merged) == _key_paths(grid.point_config(base, chosen.overrides))
    table = open(tmp_path / "split_search.md").read()
    assert all(f"| {n} |" in table for n in names) and "chosen" in table
    assert json.load(open(tmp_path / "split_search.json"))["chosen"] == result["chosen"]
    # a rerun trains nothing and chooses the same
    again = split_search.search(base, str(tmp_path), train_fn=_fake_train(calls), log=lambda *a: None)
    assert len(calls) == len(names) and again["chosen"] == result["chosen"]
    # --candidates: only those
    only = split_search.search(base, str(tmp_path / "two"), only=["top-1", "none"], train_fn=_fake_train([]),
                               log=lambda *a: None)
    assert [r["name"] for r in only["rows"]] == ["top-1", "none"] and only["chosen"] == "top-1"


def test_a_base_without_key_layers_a_dp_federation_or_an_unknown_candidate_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="algorithm.name='fedavg' has no key layers"):
        split_search.check_base(apply_overrides(presets.tiny(), ["algorithm.name=fedavg"]))
    with pytest.raises(ConfigError, match="no DP release covers"):
        split_search.check_base(apply_overrides(presets.tiny(), ["policy.dp_clip=1.0"]))
    with pytest.raises(ConfigError, match=r"--candidates: \['top-9'\] are not candidates"):
        split_search.search(presets.tiny(), str(tmp_path), only=["top-9"], train_fn=_fake_train([]))


# ---- the probe -------------------------------------------------------------------------
@pytest.mark.parametrize("n_layers", [1, 2, 4])
def test_parameter_groups_partition_the_model_and_each_pattern_selects_exactly_its_group(n_layers):
    _, params = lm.abstract_init(apply_overrides(presets.tiny(), [f"model.n_layers={n_layers}"]).model)
    groups = partition.parameter_groups(params)
    assert set(groups) == set(params)
    assert set(groups.values()) == {f"block{b}_{k}" for b in range(n_layers) for k in ("attn", "mlp")} | {"embeddings"}
    for group in set(groups.values()):
        pattern = re.compile(partition.group_pattern(group))
        assert {p for p in params if pattern.search(p)} == {p for p, g in groups.items() if g == group}, group
    # key layers by group name: exactly the named groups' paths (norms included)
    named = sorted(set(groups.values()))[::2]
    mask = partition.key_layer_mask(params, partition.KeyLayers(kind="groups", groups=named), n_layers)
    assert {p for p, is_key in mask.items() if is_key} == {p for p, g in groups.items() if g in named}


def test_group_spreads_decompose_the_update_spread_and_are_null_at_a_dp_federation():
    """The groups are disjoint coordinates, so their squared spreads add up to the
    whole backbone's (float32 sums of squares: a relative 1e-5 of the total); a DP
    federation reports none of them."""
    import jax

    from worldlm_jax.run import experiment as experiment_lib

    def round_metrics(overrides):
        exp = experiment_lib.build_experiment(apply_overrides(presets.tiny(), [
            "algorithm.name=hierfavg", "run.rounds=1", "model.n_layers=1", *overrides]))
        state = experiment_lib.place_state(exp, exp.strategy.init(exp.init_params))
        batch = experiment_lib._put(exp, experiment_lib.make_batch(exp, 0))
        return jax.device_get(exp.strategy.run_round(state, batch, jax.random.PRNGKey(1), exp.policies)[1])

    m = round_metrics([])
    for d in (0, 1):
        groups = [k for k in m if k.startswith(f"level{d}/update_spread_group/")]
        assert len(groups) == 3  # one block's attn and mlp, the embeddings
        total = sum(np.asarray(m[k], np.float64) ** 2 for k in groups)
        np.testing.assert_allclose(total, np.asarray(m[f"level{d}/update_spread"], np.float64) ** 2, rtol=1e-5)
        assert np.all(total > 0)
    private = round_metrics(["tree.children.0.policy.dp_clip=1.0"])
    for k in [k for k in private if k.startswith("level1/update_spread")]:
        assert np.isnan(private[k][0]) and np.all(np.isfinite(private[k][1:])), k


def _probe_records(between, within, rounds=3):
    """Records as a depth-2 probe run writes them: level0 holds the spread between the
    lowest federations, level1 (two federations) within them; one federation null."""
    return [{"round": r, "train_loss": 1.0,
             **{f"level0/update_spread_group/{g}": [v] for g, v in between.items()},
             **{f"level1/update_spread_group/{g}": [v, None] for g, v in within.items()}} for r in range(rounds)]


def test_the_probe_localises_the_groups_whose_federations_differ_most_relative_to_their_clients():
    between = {"block0_attn": 1.0, "block0_mlp": 1.0, "block1_attn": 4.0, "block1_mlp": 3.0, "embeddings": 1.0}
    within = {"block0_attn": 1.0, "block0_mlp": 2.0, "block1_attn": 1.0, "block1_mlp": 1.0, "embeddings": 0.5}
    ranking = split_search.probe_ranking(_probe_records(between, within), depth=2)
    assert ranking == sorted(((g, between[g] / within[g]) for g in between), key=lambda t: -t[1])
    candidate = split_search.probe_candidate(ranking)  # ceil(0.3 x 5) = 2 groups
    base = presets.tiny()
    assert _key_paths(grid.point_config(base, candidate.overrides)) == {
        p for p, g in partition.parameter_groups(lm.abstract_init(base.model)[1]).items()
        if g in ("block1_attn", "block1_mlp")}
    assert split_search.probe_candidate(ranking, share=1.0).overrides != candidate.overrides  # all but one
    with pytest.raises(ConfigError, match="depth >= 2"):
        split_search.probe_ranking(_probe_records(between, within), depth=1)


def test_search_with_a_probe_trains_it_once_and_adds_its_candidate(tmp_path):
    calls = []
    fake = _fake_train(calls)

    def train(config, workdir, quiet=True, progress=False):
        summary = fake(config, workdir)
        if os.path.basename(workdir) == split_search.PROBE_DIR:  # the probe's metrics: block1_mlp diverges
            assert config.algorithm.name == "hierfavg"
            groups = set(partition.parameter_groups(lm.abstract_init(config.model)[1]).values())
            between = {g: 5.0 if g == "block1_mlp" else 1.0 for g in groups}
            with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
                for record in _probe_records(between, {g: 1.0 for g in groups}, rounds=config.run.rounds):
                    f.write(json.dumps(record) + "\n")
        return summary

    base = apply_overrides(presets.tiny(), ["run.rounds=1"])
    result = split_search.search(base, str(tmp_path), only=["probe", "none"], train_fn=train, log=lambda *a: None,
                                 probe_rounds=2)
    assert [os.path.basename(c) for c in calls] == [split_search.PROBE_DIR, "none", "probe"]
    probe = json.load(open(tmp_path / split_search.PROBE_FILE))
    assert probe["ranking"][0][0] == "block1_mlp" and probe["rounds"] == 2
    assert _key_paths(from_dict(Config, merge(base.to_dict(), result["split"])).validate()) == {
        p for p, g in partition.parameter_groups(lm.abstract_init(base.model)[1]).items()
        if g in ("block1_mlp", probe["ranking"][1][0])}


def test_auto_probe_trains_its_probe_then_the_run_with_the_groups_it_ranked_most_divergent(tmp_path):
    from cli_helpers import run_cli
    from worldlm_jax.config import load_yaml
    from worldlm_jax.run import probe

    workdir = tmp_path / "run"
    argv = ["train", "--config", "tiny", "--workdir", str(workdir), "--quiet", "--skip-memory-check",
            "--set", "run.rounds=1", "--set", "algorithm.key_layers.auto=probe",
            "--set", "algorithm.key_layers.probe_rounds=2"]
    code, _, err = run_cli(argv)
    assert code == 0, err
    probe_dir = workdir / probe.PROBE_DIR
    chosen = json.load(open(probe_dir / probe.PROBE_FILE))
    probe_summary = json.load(open(probe_dir / "summary.json"))
    assert probe_summary["algorithm"] == "hierfavg" and probe_summary["rounds_completed"] == 2  # every group shared
    records = [json.loads(line) for line in (probe_dir / "metrics.jsonl").read_text().splitlines()]
    ranking = probe.probe_ranking([r for r in records if "train_loss" in r], depth=2)
    assert chosen["groups"] == list(probe.probe_groups(ranking))  # the most divergent of its own records
    key_layers = load_yaml(str(workdir / "config.yaml")).algorithm.key_layers
    assert (key_layers.kind, list(key_layers.groups), key_layers.auto) == ("groups", chosen["groups"], "")
    assert json.load(open(workdir / "summary.json"))["algorithm"] == "worldlm"
    # the same command again resolves to the same split: the finished run is recognised, nothing retrains
    code, out, err = run_cli(argv)
    assert code == 0 and "already finished" in out, err
