"""Preset experiments. Each returns a `Config`; `get(name)` looks one up.

Trees follow the paper's setting in miniature: the root federates very
different populations (languages, domains: the paper's Dirichlet ~1e-4
between the root's children) and each federation's clients are near-IID
shards of its own data (Dirichlet ~1e3 inside).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from worldlm_jax.config.schema import Config, ConfigError, DataConfig, RunConfig
from worldlm_jax.model import preset as model_preset
from worldlm_jax.tree.policy import Policy

LANGUAGES = ("en", "de", "fr", "es", "it", "pl", "ru")


def language_tree(clients: int = 4, languages: Sequence[str] = LANGUAGES, kind: str = "man") -> dict:
    """Root -> one federation per language (its man pages) -> IID clients."""
    return {"name": "world", "children": [
        {"name": lang, "sources": [f"{kind}_{lang}"], "clients": clients} for lang in languages]}


def family_tree(clients: int = 2) -> dict:
    """Root -> language families -> languages -> clients (a depth-3 tree)."""
    families = {"germanic": ("en", "de"), "romance": ("fr", "es", "it"), "slavic": ("pl", "ru")}
    return {"name": "world", "children": [
        {"name": family, "children": [{"name": lang, "sources": [f"man_{lang}"], "clients": clients}
                                      for lang in langs]}
        for family, langs in families.items()]}


def domain_tree(clients: int = 2) -> dict:
    """English domains plus languages, with clients that mix two sources inside a
    federation (Dirichlet-skewed), so attention has different children to weigh."""
    return {"name": "world", "children": [
        {"name": "en_tech", "sources": ["man_en"], "clients": clients},
        {"name": "en_informal", "sources": ["fortunes_en"], "clients": clients},
        {"name": "en_code", "sources": ["code_py"], "clients": clients},
        {"name": "en_lit", "sources": ["lit_en"], "clients": clients},
        {"name": "de", "sources": ["man_de", "fortunes_de"], "clients": clients, "split": "dirichlet", "alpha": 0.3},
        {"name": "ru", "sources": ["man_ru", "fortunes_ru"], "clients": clients, "split": "dirichlet", "alpha": 0.3},
    ]}


def tiny() -> Config:
    """Unit tests and smoke runs: seconds on a CPU."""
    return Config(model=model_preset("tiny"),
                  data=DataConfig(seq_len=32, batch_size=2, eval_batches=1, eval_batch_size=2,
                                  max_bytes_per_source=40_000),
                  run=RunConfig(rounds=2),
                  policy=Policy(local_steps=2, client_lr=3e-3),
                  tree=language_tree(clients=2, languages=("en", "de", "ru")))


def demo() -> Config:
    """The README's main job: 7 language federations x 2 clients, small model,
    a few minutes on a 2-core CPU."""
    return Config(model=model_preset("small"),
                  data=DataConfig(seq_len=128, batch_size=8, eval_batches=4, eval_batch_size=8,
                                  max_bytes_per_source=300_000),
                  run=RunConfig(rounds=15, eval_every=5),
                  policy=Policy(local_steps=5, client_lr=2e-3),
                  tree=language_tree(clients=2))


def small() -> Config:
    """The paper-table experiment at CPU scale (scripts/reproduce_paper.py)."""
    # evaluates every 5 rounds, as demo does: a perplexity curve of 6 points, not 1
    return dataclasses.replace(demo(), run=RunConfig(rounds=30, eval_every=5), tree=language_tree(clients=4),
                               data=dataclasses.replace(demo().data, max_bytes_per_source=0))


def _paper(size: str) -> Callable[[], Config]:
    def build() -> Config:
        return Config(model=model_preset(size),
                      data=DataConfig(tokenizer="spm:8192", seq_len=512, batch_size=16, eval_batches=8),
                      run=RunConfig(rounds=100, eval_every=10),  # a perplexity curve of 10 points
                      # LM pre-training rates: linear warmup over the first tenth of the
                      # root rounds, then a cosine decay to a tenth of the peak
                      policy=Policy(local_steps=50, client_lr=3e-4, client_lr_schedule="warmup_cosine",
                                    warmup_rounds=10, min_lr_ratio=0.1),
                      tree=language_tree(clients=4))
    build.__doc__ = f"The paper's {size} MPT-style decoder on the language tree (accelerators)."
    return build


PRESETS: dict[str, Callable[[], Config]] = {
    "tiny": tiny, "demo": demo, "small": small,
    "paper-75m": _paper("75m"), "paper-125m": _paper("125m"), "paper-400m": _paper("400m"),
    "paper-1b": _paper("1b"), "paper-3b": _paper("3b"),
}


def get(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)} (or a path to a YAML file)")
    return PRESETS[name]()
