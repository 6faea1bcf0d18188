"""`run.compilation_cache`: on by default ('auto'), a directory, or off; a second
run of the same config loads what the first compiled and trains the same numbers.
(conftest hands the session's cache back after each test.)"""
import json

import jax

from worldlm_jax.config import apply_overrides, presets
from worldlm_jax.run import training

ONE_LEAF = "tree={name: w, children: [{name: en, clients: 2, sources: [man_en]}]}"


def test_the_setting_names_a_directory_or_none(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
    assert training.compilation_cache_dir("auto") == str(tmp_path / "env")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    assert training.compilation_cache_dir("auto").endswith("/.cache/worldlm_jax/xla")
    assert training.compilation_cache_dir("") == ""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert training.compilation_cache_dir("~/xla") == str(tmp_path / "xla")
    assert presets.get("tiny").run.compilation_cache == "auto"  # on unless a config turns it off


def _metrics(workdir):
    keep = ("round", "train_loss", "tokens")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, (workdir / "metrics.jsonl").open())]


def test_a_second_run_loads_the_first_runs_programs_and_trains_the_same(tmp_path):
    cache = tmp_path / "xla"
    config = apply_overrides(presets.tiny(), [ONE_LEAF, "run.rounds=1", f"run.compilation_cache={cache}"])
    training.train(config, str(tmp_path / "first"), quiet=True, progress=False)
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "the first run cached nothing"
    training.train(config, str(tmp_path / "second"), quiet=True, progress=False)
    assert sorted(p.name for p in cache.iterdir()) == entries  # every program found, none compiled anew
    assert _metrics(tmp_path / "second") == _metrics(tmp_path / "first")
    # the tree's rules are an input of the round, not part of it: other rates, another
    # temperature and another round count (where a decay ends) run the same programs
    other = apply_overrides(config, ["policy.client_lr=0.01", "policy.server_lr=0.5", "policy.tau=0.3",
                                     "run.rounds=2"])
    training.train(other, str(tmp_path / "other"), quiet=True, progress=False)
    assert sorted(p.name for p in cache.iterdir()) == entries
    assert _metrics(tmp_path / "other")[0]["train_loss"] != _metrics(tmp_path / "first")[0]["train_loss"]  # its rates
    assert [r["round"] for r in _metrics(tmp_path / "other") if "train_loss" in r] == [0, 1]


def test_an_empty_setting_turns_the_cache_off(tmp_path):
    training.enable_compilation_cache("")
    assert not jax.config.jax_enable_compilation_cache
    training.enable_compilation_cache(str(tmp_path / "xla"))
    assert jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
