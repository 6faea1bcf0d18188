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
