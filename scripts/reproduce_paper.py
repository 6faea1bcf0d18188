#!/usr/bin/env python
"""Reproduce the WorldLM paper's tables (arXiv:2405.14446) in kind.

Every method runs on the same tree, data, tokenizer, model, token budget and
seeds; only the algorithm differs. A scenario (`--scenario`) picks the tree and
how its clients' data differ. Each method runs `--seeds N` times (one
vectorised program over the seeds). A seed varies everything a separate run
with that seed varies: the document split (and so each client's Dirichlet
mixture in `mixed`), the validation hold-out and the tokenizer trained on that
seed's training text, the initial model, the client sample and the token
windows. Methods are compared paired by seed: seed k of every method has the
same split, tokenizer and initial model. Each run lives in DIR/runs/<method>/seed<k> (a
rerun skips finished methods), and the script writes

    DIR/table.md       methods x (per-federation perplexity, overall mean +- std, bits/byte, ratio to WorldLM
                       with its spread over seeds, and whether the seeds call it a win), then one verdict
                       per mechanism
    DIR/results.json   {"methods": {...}, "verdicts": {...}, "scenario", "seeds", "command", ...}
    DIR/perplexity.png validation perplexity per round per method (mean over seeds)

Usage:
    python scripts/reproduce_paper.py --budget small --scenario mixed --out runs/paper_mixed
    python scripts/reproduce_paper.py --budget small --out runs/paper_small --seeds 1   # the first table (iid)
    python scripts/reproduce_paper.py --summarize runs/paper_mixed runs/paper_families   # verdicts x scenarios
    python scripts/reproduce_paper.py --budget small --out runs/paper_swap --swap
    python scripts/reproduce_paper.py --budget small --out runs/paper_dp --dp
    python scripts/reproduce_paper.py --budget small --out runs/x --methods worldlm,fedavg --set policy.tau=1

Scenarios (`--scenario`, default iid): iid (7 languages x 2 IID clients), mixed
(each language's clients hold Dirichlet(0.3) mixtures of its man pages and
fortunes), many-small (4 languages x 12 clients with ~10 KB each, 4 sampled per
round), families (world -> germanic/romance/slavic -> language -> clients,
residuals between related languages), domains (English man pages, fortunes,
Python code, literature as four federations).

Budgets: small (CPU, < 30 min for the default methods on a 2-core machine),
medium (the `small` preset: 4 clients per language, 128-token windows; hours on
a CPU), paper (the paper-size MPT-style 75M decoder: an accelerator). `tiny` is
for the test suite.

Perplexity is per subword token (SentencePiece trained on the clients' training
text, as in the paper); bits per byte is reported too (tokenizer independent).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from typing import Callable, Sequence

import numpy as np
import yaml

from worldlm_jax.config import Config, apply_overrides, presets as configs

BASELINES = ("worldlm", "fedavg", "hierfavg", "fedper", "local", "centralized")
ABLATIONS = {  # name -> (algorithm, overrides)
    "worldlm_mean": ("worldlm", ["policy.k_agg=mean"]),
    "worldlm_nores": ("worldlm", ["algorithm.residuals=none"]),
    # similarities measured in units of their spread over the children (tau 1 = one spread)
    "worldlm_adaptive": ("worldlm", ["policy.k_agg=adaptive_attention", "policy.tau=1.0"]),
    # each client keeps its own mixture of its siblings' K (a per-client K, like FedPer, that
    # shares with similar siblings); the federation's K is their mean
    "worldlm_personal": ("worldlm", ["policy.k_agg=personalized", "policy.tau=0.5"]),
}
# Not a default method: with k_agg=mean the residual candidates are never used, so it
# is worldlm_mean bit for bit (the first table printed the same row twice).
EXTRA = {"worldlm_mean_nores": ("worldlm", ["policy.k_agg=mean", "algorithm.residuals=none"]),
         # residual candidates with a logit bias: a fixed share of K from related federations
         "worldlm_resbias": ("worldlm", ["policy.residual_bias=5.0"]),
         # the same method without the middle level (families -> languages under the root)
         "worldlm_nofamily": ("worldlm", []),
         "hierfavg_nofamily": ("hierfavg", []),
         # the key layers chosen by a probe (`algorithm.key_layers.auto: probe`): 3 rounds of
         # HierFAVG on seed 0, the most divergent 30% of the parameter groups localised; every
         # seed then trains that split (one vectorised program needs one split)
         "worldlm_probe": ("worldlm", ["algorithm.key_layers.auto=probe", "algorithm.key_layers.probe_rounds=3"])}
FLATTEN_MIDDLE = ("worldlm_nofamily", "hierfavg_nofamily")
METHODS = BASELINES + tuple(ABLATIONS)
KNOWN = METHODS + tuple(EXTRA)
# mechanism -> (with it, without it): the verdicts table compares these pairs seed by seed
MECHANISMS = {
    "WorldLM vs FedAvg": ("worldlm", "fedavg"),
    "WorldLM vs HierFAVG": ("worldlm", "hierfavg"),
    "per-federation K vs per-client K (FedPer)": ("worldlm", "fedper"),
    "attention vs mean": ("worldlm", "worldlm_mean"),
    "adaptive attention vs mean": ("worldlm_adaptive", "worldlm_mean"),
    "personalised attention vs mean": ("worldlm_personal", "worldlm_mean"),
    "personalised attention vs FedPer": ("worldlm_personal", "fedper"),
    "residuals vs none": ("worldlm", "worldlm_nores"),
    "residuals with bias 5 vs none": ("worldlm_resbias", "worldlm_nores"),
    "family level vs none (WorldLM)": ("worldlm", "worldlm_nofamily"),
    "family level vs none (HierFAVG)": ("hierfavg", "hierfavg_nofamily"),
    "sharing vs local": ("worldlm", "local"),
    "probe-chosen K vs the last block": ("worldlm_probe", "worldlm"),
    "probe-chosen K vs FedPer": ("worldlm_probe", "fedper"),
}
DP_METHODS = ("fedavg", "worldlm", "worldlm_mean", "worldlm_nores")
FLAT = ("fedavg", "fedper", "local", "centralized")  # run on topology.flattened() (or pooled)
SWAP = ("man_ru", "man_fr")  # --swap: these two sources trade families


@dataclasses.dataclass(frozen=True)
class Budget:
    preset: str  # configs preset the model/data/policy start from
    clients: int  # clients per language
    overrides: tuple[str, ...]  # applied on top of the preset (before the user's --set)
    note: str


BUDGETS = {
    # The test suite: seconds.
    "tiny": Budget("tiny", 2, ("run.rounds=2", "run.eval_every=1", "run.devices=1",
                            "data.max_bytes_per_source=20000"), "unit tests only"),
    # CPU, 2 cores: measured ~16 min for the 9 default methods (see benchmarks/PAPER.md).
    "small": Budget("demo", 2, (
        "data.tokenizer=spm:1024", "data.seq_len=64", "data.batch_size=4", "data.eval_batches=2",
        "data.eval_batch_size=8", "data.max_bytes_per_source=300000", "run.rounds=30", "run.eval_every=3",
        "policy.local_steps=5", "policy.client_lr=0.002"), "CPU, about 15-25 minutes on 2 cores"),
    # The `small` preset (prototype-size model, 4 IID clients per language, whole sources).
    "medium": Budget("small", 4, ("data.tokenizer=spm:2048", "run.rounds=30", "run.eval_every=3"),
                     "CPU hours, or minutes on one accelerator"),
    # The paper's MPT-style 75M decoder, 8192-piece tokenizer (accelerators).
    "paper": Budget("paper-75m", 4, ("run.eval_every=10",), "accelerator"),
}


# ---- trees ----------------------------------------------------------------------------
FAMILIES = {"germanic": ("en", "de"), "romance": ("fr", "es", "it"), "slavic": ("pl", "ru")}


def family_tree(clients: int, swap: bool = False, languages: Sequence[str] = configs.LANGUAGES) -> dict:
    """Root -> families -> languages -> clients. With swap, man_ru sits under
    romance and man_fr under slavic (a wrong hierarchy; federation names keep the
    language, so per-federation numbers stay comparable)."""
    families = {f: [l for l in ls if l in languages] for f, ls in FAMILIES.items()}
    if swap:
        families = {f: [("ru" if l == "fr" else "fr" if l == "ru" else l) for l in ls] for f, ls in families.items()}
    return {"name": "world", "children": [
        {"name": fam, "children": [{"name": lang, "sources": [f"man_{lang}"], "clients": clients} for lang in langs]}
        for fam, langs in families.items() if langs]}


# ---- scenarios ----------------------------------------------------------------------------
WITH_FORTUNES = ("en", "de", "es", "ru")  # languages with both man pages and fortunes
DP_ORGANISATIONS = tuple(f"man_{lang}" for lang in configs.LANGUAGES) + tuple(
    f"fortunes_{lang}" for lang in ("en", "de", "es", "it", "pl", "ru")) + ("code_py", "lit_en")


def mixed_tree(clients: int, languages: Sequence[str] = WITH_FORTUNES, alpha: float = 0.3) -> dict:
    """Root -> languages -> clients holding Dirichlet(alpha) mixtures of that
    language's man pages and fortunes: the children of one federation differ."""
    return {"name": "world", "children": [
        {"name": lang, "sources": [f"man_{lang}", f"fortunes_{lang}"], "clients": clients,
         "split": "dirichlet", "alpha": alpha} for lang in languages]}


def domains_tree(clients: int) -> dict:
    """Root -> English domain federations (the paper's "industries") -> clients."""
    domains = {"tech": "man_en", "informal": "fortunes_en", "code": "code_py", "literature": "lit_en"}
    return {"name": "world", "children": [{"name": name, "sources": [source], "clients": clients}
                                          for name, source in domains.items()]}


def sampled(tree: dict, clients_per_round: int) -> dict:
    """The tree with `clients_per_round` clients sampled per leaf federation per round."""
    return with_leaf_policy(tree, {"clients_per_round": clients_per_round, "sampling": "fixed"})


def organisations_tree(clients: int, sources: Sequence[str]) -> dict:
    """Root -> one organisation per corpus source -> clients: the unit of
    privacy at the root is an organisation."""
    return {"name": "world", "children": [{"name": f"org_{src}", "sources": [src], "clients": clients}
                                          for src in sources]}


@dataclasses.dataclass(frozen=True)
class Privacy:
    """DP calibrated to (epsilon, delta) over the run: at `level` clients (each
    federation that aggregates clients clips and noises its clients' updates;
    flat baselines the one flat federation: the same per-client guarantee) or
    federations (the root clips and noises its child federations' updates:
    an organisation is the unit)."""
    level: str
    epsilon: float
    delta: float = 1e-5
    clip: float = 1.0


@dataclasses.dataclass(frozen=True)
class Scenario:
    tree: Callable[[bool], dict]  # tiny -> tree
    overrides: tuple[str, ...]  # on top of the budget's (not with --budget tiny)
    note: str
    privacy: Privacy | None = None
    methods: tuple[str, ...] | None = None  # default methods (None: METHODS)


# A tiny byte-level model: DP noise grows with the square root of the parameter count
TINY_MODEL = ("data.tokenizer=byte", "model.d_model=32", "model.n_heads=2", "model.n_layers=2", "model.max_len=64",
              "data.seq_len=32", "data.batch_size=4", "data.eval_batches=1", "data.eval_batch_size=8")


SHRUNK = ("run.rounds=12", "run.eval_every=4")  # 9 methods x 3 seeds in about 15-20 min on 2 cores
SCENARIOS = {
    "iid": Scenario(lambda tiny: configs.language_tree(2, ("en", "de", "ru") if tiny else configs.LANGUAGES), (),
                    "7 languages x 2 IID clients (the first table)"),
    "mixed": Scenario(lambda tiny: mixed_tree(2 if tiny else 4, ("en", "ru") if tiny else WITH_FORTUNES), SHRUNK,
                      "4 languages x 4 clients, each a Dirichlet(0.3) mixture of man pages and fortunes"),
    "many-small": Scenario(
        lambda tiny: sampled(configs.language_tree(2 if tiny else 12, ("en", "ru") if tiny else ("en", "de", "fr", "ru")),
                             1 if tiny else 4),
        SHRUNK + ("data.max_bytes_per_source=160000", "data.eval_batches=1", "data.eval_batch_size=4"),
        "4 languages x 12 clients of ~13 KB (160 KB per language), 4 sampled per language per round"),
    "families": Scenario(lambda tiny: family_tree(2, languages=("en", "de", "fr", "ru") if tiny else configs.LANGUAGES),
                         SHRUNK, "world -> germanic/romance/slavic -> 7 languages -> 2 clients"),
    "domains": Scenario(lambda tiny: domains_tree(2 if tiny else 3), SHRUNK,
                        "English man pages, fortunes, Python code and literature x 3 clients"),
    "dp-clients": Scenario(
        lambda tiny: with_leaf_policy(configs.language_tree(8 if tiny else 96, ("en", "ru") if tiny else ("en", "de", "ru"),
                                                            kind="fortunes"),
                                      {"sampling": "poisson", "clients_per_round": 2 if tiny else 24}),
        SHRUNK + TINY_MODEL + ("data.max_bytes_per_source=600000",),
        "client-level DP, epsilon 8: 3 languages (fortunes) x 96 clients, Poisson-sampled 24 per round, a 2-block "
        "d=32 byte model",
        Privacy("clients", 8.0), ("worldlm", "fedavg", "hierfavg", "fedper", "worldlm_mean")),
    "dp-orgs": Scenario(
        lambda tiny: organisations_tree(2 if tiny else 4, ("man_en", "man_ru") if tiny else DP_ORGANISATIONS),
        SHRUNK + TINY_MODEL + ("data.max_bytes_per_source=200000", "algorithm.residuals=none"),
        "organisation-level DP at the root, epsilon 8: 15 organisations (one per corpus source) x 4 clients",
        Privacy("federations", 8.0), ("worldlm", "hierfavg", "worldlm_mean")),
}


def without_middle_level(tree: dict) -> dict:
    """Root -> families -> languages becomes root -> languages (each family's
    children lifted to the root, their policies unchanged)."""
    if not all("children" in f for f in tree["children"]):
        raise SystemExit("worldlm_nofamily / hierfavg_nofamily need a tree with a middle level (--scenario families)")
    return dict(tree, children=[lang for family in tree["children"] for lang in family["children"]])


def make_tree(kind: str, clients: int, languages: Sequence[str], swap: bool = False) -> dict:
    if kind == "language":
        return configs.language_tree(clients=clients, languages=languages)
    if kind == "family":
        return family_tree(clients, swap, languages)
    raise SystemExit(f"--tree {kind!r}: expected language or family")


def with_leaf_policy(tree: dict, policy: dict) -> dict:
    """A copy of the tree whose client-aggregating federations carry `policy`."""
    node = dict(tree)
    if "children" in node:
        node["children"] = [with_leaf_policy(c, policy) for c in node["children"]]
    else:
        node["policy"] = {**node.get("policy", {}), **policy}
    return node


# ---- configs ----------------------------------------------------------------------------
def privacy_policy(privacy: Privacy, config: Config) -> dict:
    """The DP policy fields that spend at most (epsilon, delta) over the run at
    the sampling rate of the federations that release (the same rate in the
    tree and in its flat version, so the same noise gives the same epsilon)."""
    from worldlm_jax.privacy import accounting, ledger as dp_ledger
    from worldlm_jax.tree.topology import build_topology

    topo = build_topology(config.tree, root_policy=config.policy)
    level = topo.depth - 1 if privacy.level == "clients" else 0
    kinds = {dp_ledger.sampling_of(topo, level, i) for i in range(topo.levels[level].size)}
    if len({(kind, round(rate, 6)) for kind, rate, _ in kinds}) != 1:
        raise SystemExit(f"DP at {privacy.level}: the releasing federations sample differently ({kinds})")
    kind, rate, population = min(kinds)
    fixed = kind == "fixed"  # full participation is Poisson sampling at rate 1
    noise = accounting.calibrate_noise(privacy.epsilon, privacy.delta, rate, config.run.rounds, "rdp",
                                       "fixed" if fixed else "poisson", population if fixed else None)
    return {"dp_noise_multiplier": round(float(noise), 4), "dp_clip": privacy.clip, "dp_delta": privacy.delta}


def method_config(base: Config, method: str, dp: dict | None = None, dp_level: str = "clients") -> Config:
    """The config of one method: `base` plus the algorithm (and DP) overrides only."""
    algorithm, extra = {**ABLATIONS, **EXTRA}.get(method, (method, []))
    config = apply_overrides(base, [f"algorithm.name={algorithm}", *extra])
    if method in FLATTEN_MIDDLE:
        config = dataclasses.replace(config, tree=without_middle_level(config.tree))
    if dp and dp_level == "federations":
        # the root clips and noises its children's updates; nothing below it does
        # (an explicit no-DP policy on the children, which would inherit the root's)
        if algorithm in FLAT:
            raise SystemExit(f"{method}: DP over federations needs a tree; flat methods have none")
        tree = dict(config.tree, policy={**config.tree.get("policy", {}), **dp})
        tree["children"] = [dict(c, policy={**c.get("policy", {}), "dp_noise_multiplier": 0.0,
                                            "dp_clip": math.inf}) for c in tree["children"]]
        return dataclasses.replace(config, tree=tree)
    if dp:
        # Client-level DP at the federation that aggregates clients, same (z, clip)
        # everywhere. Flat baselines train on topology.flattened(), which takes the
        # ROOT policy (a leaf's DP policy would be dropped), so set it there; the
        # tree methods set it on the language federations only (the root and
        # family levels aggregate federations, not clients).
        if algorithm in FLAT:
            config = apply_overrides(config, [f"policy.{k}={v}" for k, v in dp.items()])
        else:
            config = dataclasses.replace(config, tree=with_leaf_policy(dict(config.tree), dp))
    return config


def base_config(budget: str, tree: str, sets: Sequence[str], swap: bool = False,
                clients: int | None = None, scenario: str = "iid") -> Config:
    """The shared config of every method: the budget's preset and overrides,
    then the scenario's tree and overrides (a scenario other than iid replaces
    --tree), then the user's --set."""
    b = BUDGETS[budget]
    config = configs.get(b.preset)
    tiny = budget == "tiny"
    extra: tuple[str, ...] = ()
    if scenario != "iid":
        sc = SCENARIOS[scenario]
        config = dataclasses.replace(config, tree=sc.tree(tiny))
        extra = () if tiny else sc.overrides
    else:
        languages = ("en", "de", "ru") if tiny else configs.LANGUAGES
        if tiny and tree == "family":
            languages = ("en", "de", "fr", "ru")
        config = dataclasses.replace(config, tree=make_tree(tree, clients or b.clients, languages, swap))
    return apply_overrides(config, [*b.overrides, *extra, *sets])


def _config_diff(saved, current, path: str = "") -> list[str]:
    """Differences between a saved run config and the current one. A key the
    saved config lacks (a field added to the library since) is not a difference."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in current:
            if key in saved:
                out += _config_diff(saved[key], current[key], f"{path}.{key}" if path else str(key))
        return out + [f"{path}.{k}: no longer a field" for k in saved if k not in current]
    return [] if saved == current else [f"{path}: {saved!r} -> {current!r}"]


def _plain(config: Config):
    return yaml.safe_load(yaml.safe_dump(config.to_dict(), sort_keys=False))


# ---- running ------------------------------------------------------------------------------
def _finished(config: Config, workdir: str) -> dict | None:
    """The summary of a finished run in `workdir` (None if none); a run there with
    a different config is refused."""
    summary_path = os.path.join(workdir, "summary.json")
    config_path = os.path.join(workdir, "config.yaml")
    if os.path.exists(config_path):
        with open(config_path) as f:
            saved = yaml.safe_load(f)
        changed = _config_diff(saved, _plain(config))
        if changed:
            raise SystemExit(f"{workdir} holds a run with a different config ({'; '.join(changed[:5])}); "
                             f"use another --out (or delete {workdir})")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        if summary.get("rounds_completed") == config.run.rounds:
            return summary
    return None


def run_method(config: Config, workdir: str, log=print) -> dict:
    """Train (or resume, or skip when finished) one method's run; its summary."""
    from worldlm_jax.run.training import train

    done = _finished(config, workdir)
    if done is not None:
        log(f"  {workdir}: finished, skipped")
        return done
    return train(config, workdir, quiet=True, progress=False)


def run_seeds(configs_by_seed: Sequence[Config], workdirs: Sequence[str], log=print) -> list[dict]:
    """One method's runs over seeds: skipped when all are finished, else trained
    together as one vectorised program (one compilation; each seed has its own
    data split, client sample and token windows, as in a separate run). One seed
    is an ordinary (resumable) run."""
    if len(configs_by_seed) == 1:
        return [run_method(configs_by_seed[0], workdirs[0], log)]
    done = [_finished(c, w) for c, w in zip(configs_by_seed, workdirs)]
    if all(d is not None for d in done):
        log(f"  {os.path.dirname(workdirs[0])}: finished, skipped")
        return done
    from worldlm_jax.sweeps import vectorized

    vectorized.run(configs_by_seed, workdirs=workdirs)
    return [_finished(c, w) for c, w in zip(configs_by_seed, workdirs)]


def eval_curve(workdir: str) -> list[tuple[int, float]]:
    """(rounds completed, overall perplexity) of every evaluation in metrics.jsonl."""
    from worldlm_jax.outputs.metrics import read_metrics

    points = {}
    for rec in read_metrics(os.path.join(workdir, "metrics.jsonl")):
        if isinstance(rec, dict) and "eval" in rec:
            points[int(rec["round"]) + 1] = float(rec["eval"]["perplexity"])
    return sorted(points.items())


def diagnostics(workdir: str, config: Config) -> dict:
    """Per level, averaged over rounds: the attention entropy against uniform,
    the weight on residual candidates and on the parent, the cosine between
    children of the same federation and of different ones, and the children's
    K-delta norm (levels that report them: where children's K are scored)."""
    from worldlm_jax.outputs.metrics import read_metrics
    from worldlm_jax.tree.topology import build_topology

    topo = build_topology(config.tree, root_policy=config.policy)
    records = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "train_loss" in r]
    out = {}
    for d in range(topo.depth):
        # a DP federation's attention diagnostics are null (its K leaves only through its release)
        mean = lambda x: float(np.nanmean(np.asarray(x, dtype=np.float64))) if np.size(x) else float("nan")
        entropy = [mean(r[f"level{d}/attention_entropy"]) for r in records if f"level{d}/attention_entropy" in r]
        if not entropy:
            continue
        level = {"attention_entropy": mean(entropy),
                 "residual_weight": mean([mean(r.get(f"level{d}/attention_residual", 0.0)) for r in records]),
                 "parent_weight": mean([mean(r.get(f"level{d}/attention_parent", 0.0)) for r in records]),
                 "k_delta_norm": mean([mean(r[f"level{d}/child_k_delta_norm"]) for r in records
                                       if f"level{d}/child_k_delta_norm" in r])}
        parent = topo.client_parent if d == topo.depth - 1 else topo.levels[d + 1].parent
        sims = [np.asarray(r[f"level{d}/child_similarity"], dtype=np.float64) for r in records
                if f"level{d}/child_similarity" in r]
        if sims and d == topo.depth - 1 and sims[0].shape[0] != len(parent):  # client slots, sampled: by slot
            parent = topo.with_slot_multiple(1).slot_parent
        if sims and sims[0].shape[0] == len(parent):
            sim = np.mean(sims, axis=0)
            live = np.abs(np.diag(sim)) > 0.5  # children that ever took part (cosine with itself: 1; NaN: hidden)
            same = (parent[:, None] == parent[None, :]) & ~np.eye(len(parent), dtype=bool) & live[:, None] & live
            other = (parent[:, None] != parent[None, :]) & live[:, None] & live
            level["cos_same_federation"] = float(sim[same].mean()) if same.any() else None
            level["cos_other_federations"] = float(sim[other].mean()) if other.any() else None
        out[f"level{d}"] = level
    return out


def method_result(summary: dict) -> dict:
    ev = summary["eval"]
    per_level = summary.get("bytes_communicated", {}) or {}
    out = {"perplexity": ev["perplexity"], "bits_per_byte": ev["bits_per_byte"],
           "per_federation": dict(ev["per_federation"]), "wall_seconds": summary["wall_seconds"],
           "bytes_communicated": float(per_level.get("total", sum(v for k, v in per_level.items() if k != "total"))),
           "bytes_per_level": {k: v for k, v in per_level.items() if k != "total"},
           "rounds_completed": summary["rounds_completed"], "parameters": summary.get("parameters"),
           "key_layer_parameters": summary.get("key_layer_parameters")}
    if summary.get("privacy"):
        eps = [p["epsilon"] for p in summary["privacy"].values()]
        out["privacy"] = summary["privacy"]
        out["epsilon"] = max(eps) if eps else None
    return out


# ---- seeds: mean +- std, and when they call a difference ---------------------------------
def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(xs, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def paired_verdict(ppl_a: Sequence[float], ppl_b: Sequence[float], confidence: float = 0.95) -> dict:
    """How many times lower A's perplexity is than B's, seed by seed (the seeds
    are paired: same split, tokenizer and initial model per seed index): the mean and std
    of B/A, and a call: "better" or "worse" only when every seed agrees and a
    paired t-test on log perplexity rejects "no difference" at `confidence`;
    otherwise "no difference" (or "one seed" when there is nothing to test)."""
    a, b = np.log(np.asarray(ppl_a, np.float64)), np.log(np.asarray(ppl_b, np.float64))
    diff = b - a  # > 0: A better
    ratio_mean, ratio_std = _mean_std(np.exp(diff))
    n = len(diff)
    out = {"ratio": ratio_mean, "ratio_std": ratio_std, "seeds": n}
    if n < 2:
        return {**out, "call": "one seed"}
    from scipy import stats

    sd = float(np.std(diff, ddof=1))
    same_sign = bool(np.all(diff > 0) or np.all(diff < 0))
    t_crit = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
    significant = same_sign and abs(float(np.mean(diff))) > t_crit * sd / math.sqrt(n)
    call = ("better" if np.mean(diff) > 0 else "worse") if significant else "no difference"
    return {**out, "call": call, "t_critical": t_crit}


def combine_seeds(per_seed: Sequence[dict]) -> dict:
    """One method's row from its seeds' results: means, stds, and every seed's numbers."""
    ppl, ppl_std = _mean_std([r["perplexity"] for r in per_seed])
    bpb, bpb_std = _mean_std([r["bits_per_byte"] for r in per_seed])
    feds = per_seed[0]["per_federation"]
    out = {**per_seed[0], "perplexity": ppl, "perplexity_std": ppl_std, "bits_per_byte": bpb,
           "bits_per_byte_std": bpb_std,
           "per_federation": {f: float(np.mean([r["per_federation"][f] for r in per_seed])) for f in feds},
           "wall_seconds": max(r["wall_seconds"] for r in per_seed),  # the seeds train together
           "seeds": list(per_seed)}
    if any("epsilon" in r for r in per_seed):
        out["epsilon"] = max((r.get("epsilon") or 0.0) for r in per_seed)
    return out


def verdicts(methods: dict) -> dict:
    """Each mechanism whose two methods ran: its paired verdict."""
    out = {}
    for name, (with_it, without) in MECHANISMS.items():
        if with_it in methods and without in methods:
            ppl = lambda m: [r["perplexity"] for r in methods[m]["seeds"]]
            out[name] = {"with": with_it, "without": without, **paired_verdict(ppl(with_it), ppl(without))}
    return out


# ---- table ------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "nan" if x is None or math.isnan(x) else "inf"
    return f"{x:.2f}" if x < 1000 else f"{x:.4g}"


def _pm(mean: float, std: float, n: int, fmt=_fmt) -> str:
    return fmt(mean) if n < 2 else f"{fmt(mean)} ± {fmt(std)}"


def format_table(results: dict, reference: str = "worldlm") -> str:
    """Methods x federations (mean over seeds), overall perplexity and bits/byte
    (mean ± std), the paired ratio to `reference` (its perplexity / the
    reference's, mean ± std over seeds) and the seeds' call; then the verdicts."""
    methods = results["methods"]
    feds = list(dict.fromkeys(f for m in methods.values() for f in m["per_federation"]))
    show_eps = any("epsilon" in m for m in methods.values())
    head = ["method", *feds, "overall ppl", "bits/byte", f"ppl / {reference} ppl", "call", "MB sent", "wall s"]
    if show_eps:
        head.append("epsilon")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = methods.get(reference)
    for name, m in methods.items():
        n = len(m["seeds"])
        if ref is not None and name != reference:
            # paired_verdict(ref, m) gives m/ref: how many times the reference is better
            v = paired_verdict([r["perplexity"] for r in ref["seeds"]], [r["perplexity"] for r in m["seeds"]])
            ratio = _pm(v["ratio"], v["ratio_std"], n, lambda x: f"{x:.3f}")
            call = {"better": f"{reference} better", "worse": f"{reference} worse"}.get(v["call"], v["call"])
        else:
            ratio, call = "1.000", "-"
        row = [name, *[_fmt(m["per_federation"].get(f, math.nan)) for f in feds],
               _pm(m["perplexity"], m.get("perplexity_std", 0.0), n),
               _pm(m["bits_per_byte"], m.get("bits_per_byte_std", 0.0), n, lambda x: f"{x:.3f}"),
               ratio, call, f"{m['bytes_communicated'] / 1e6:.1f}", f"{m['wall_seconds']:.0f}"]
        if show_eps:
            row.append(_fmt(m["epsilon"]) if m.get("epsilon") is not None else "-")
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines) + "\n"
    diag = {name: m["diagnostics"] for name, m in methods.items() if m.get("diagnostics")}
    if diag:
        table += ("\n| method (seed 0) | level | attention entropy | residual weight | parent weight | "
                  "cos same federation | cos other federations | K-delta norm |\n|---|---|---|---|---|---|---|---|\n")
        f = lambda x: "-" if x is None else f"{x:.3f}"
        for name, levels in diag.items():
            for level, v in levels.items():
                table += (f"| {name} | {level} | {f(v['attention_entropy'])} | {f(v['residual_weight'])} | "
                          f"{f(v['parent_weight'])} | {f(v.get('cos_same_federation'))} | "
                          f"{f(v.get('cos_other_federations'))} | {f(v['k_delta_norm'])} |\n")
    if results.get("verdicts"):
        rows = ["", "| mechanism | with / without | ppl(without) / ppl(with) | call |", "|---|---|---|---|"]
        for name, v in results["verdicts"].items():
            rows.append(f"| {name} | {v['with']} / {v['without']} | "
                        f"{_pm(v['ratio'], v['ratio_std'], v['seeds'], lambda x: f'{x:.3f}')} | {v['call']} |")
        table += "\n".join(rows) + "\n"
    return table


# ---- main ----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=[b for b in BUDGETS if b != "tiny"] + ["tiny"], default="small",
                   help="small (CPU) | medium | paper (accelerator)")
    p.add_argument("--scenario", choices=tuple(SCENARIOS), default="iid",
                   help="; ".join(f"{k}: {v.note}" for k, v in SCENARIOS.items()))
    p.add_argument("--seeds", type=int, default=3, help="runs per method (seeds 0..N-1), one vectorised program")
    p.add_argument("--out", required=True, help="output directory (runs/, table.md, results.json, perplexity.png)")
    p.add_argument("--methods", default="", help=f"comma list from {', '.join(KNOWN)} (default: "
                                                 f"{', '.join(METHODS)}; with --dp: {', '.join(DP_METHODS)}; "
                                                 f"with --swap: worldlm)")
    p.add_argument("--tree", choices=("language", "family"), default=None,
                   help="iid scenario: language (root -> 7 languages -> clients; default) or family "
                        "(root -> families -> languages -> clients; default with --swap)")
    p.add_argument("--swap", action="store_true",
                   help="wrong hierarchy: man_ru under romance, man_fr under slavic; each method runs on the "
                        "correct and the swapped family tree (rows <method> and <method>@swapped)")
    p.add_argument("--no-privacy", action="store_true",
                   help="a privacy scenario's setting without DP (the reference for what DP costs)")
    p.add_argument("--dp", action="store_true", help="client-level DP at the client-aggregating federations")
    p.add_argument("--dp-noise", type=float, default=0.5, help="DP noise multiplier z (with --dp)")
    p.add_argument("--dp-clip", type=float, default=1.0, help="DP per-client L2 clip (with --dp)")
    p.add_argument("--dp-clients", type=int, default=8, help="clients per language with --dp")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every method (e.g. policy.tau=1)")
    return p.parse_args(argv)


def summarize(out_dirs: Sequence[str]) -> str:
    """One verdict per mechanism and scenario, from finished OUT dirs
    (their results.json): ppl(without) / ppl(with), mean ± std over seeds, and the call."""
    scenarios = {}
    for out in out_dirs:
        with open(os.path.join(out, "results.json")) as f:
            r = json.load(f)
        scenarios[r.get("scenario", out)] = r.get("verdicts", {})
    names = [n for n in MECHANISMS if any(n in v for v in scenarios.values())]
    lines = ["| mechanism | " + " | ".join(scenarios) + " |", "|---|" + "---|" * len(scenarios)]
    for name in names:
        cells = []
        for v in scenarios.values():
            if name in v:
                x = v[name]
                mark = {"better": " **helps**", "worse": " **hurts**"}.get(x["call"], "")
                cells.append(f"{x['ratio']:.3f} ± {x['ratio_std']:.3f}{mark}")
            else:
                cells.append("-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    if argv is None and sys.argv[1:2] == ["--summarize"] or argv and argv[0] == "--summarize":
        print(summarize((sys.argv[2:] if argv is None else argv[1:])))
        return {}
    args = parse_args(argv)
    command = "python scripts/reproduce_paper.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.seeds < 1:
        raise SystemExit(f"--seeds {args.seeds}: expected at least 1")
    if args.scenario != "iid" and (args.tree or args.swap):
        raise SystemExit(f"--scenario {args.scenario} brings its own tree: --tree and --swap are for --scenario iid")
    tree = args.tree or ("family" if args.swap else "language")
    if args.swap and tree != "family":
        raise SystemExit("--swap exchanges sources between language families: use --tree family")
    scenario = SCENARIOS[args.scenario]
    default = (DP_METHODS if args.dp else ("worldlm",) if args.swap else scenario.methods or METHODS)
    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip())) or list(default)
    unknown = [m for m in methods if m not in KNOWN]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(KNOWN)}")
    if "worldlm" not in methods:
        methods.insert(0, "worldlm")  # the ratio's reference
    dp = {"dp_noise_multiplier": args.dp_noise, "dp_clip": args.dp_clip} if args.dp else None
    clients = args.dp_clients if args.dp else None

    os.makedirs(args.out, exist_ok=True)
    variants = [("", False)] + ([("@swapped", True)] if args.swap else [])
    seeds = range(args.seeds)
    runs = []  # (row name, [config per seed], [workdir per seed])
    for suffix, swapped in variants:
        base = base_config(args.budget, tree, args.set, swap=swapped, clients=clients, scenario=args.scenario)
        dp_level = "clients"
        if scenario.privacy is not None and not args.no_privacy:
            dp, dp_level = privacy_policy(scenario.privacy, base), scenario.privacy.level
        for m in methods:
            config = method_config(base, m, dp, dp_level)
            if config.algorithm.key_layers.auto:  # chosen once, on seed 0, in the method's own dir
                from worldlm_jax.run import probe, training
                config = probe.resolve_key_layers(config, os.path.join(args.out, "runs", m + suffix), training.train)
            runs.append((m + suffix, [apply_overrides(config, [f"run.seed={k}"]) for k in seeds],
                         [os.path.join(args.out, "runs", m + suffix, f"seed{k}") for k in seeds]))

    results = {"methods": {}, "budget": args.budget, "scenario": args.scenario, "seeds": args.seeds,
               "tree": tree if args.scenario == "iid" else args.scenario, "command": command,
               "swap": args.swap, "dp": dp,
               "privacy": dataclasses.asdict(scenario.privacy) if scenario.privacy and not args.no_privacy else None,
               "overrides": list(BUDGETS[args.budget].overrides) + args.set}
    curves = {}
    t0 = time.perf_counter()
    for name, configs_by_seed, workdirs in runs:
        print(f"[{time.perf_counter() - t0:6.0f} s] {name}: {configs_by_seed[0].run.rounds} rounds x "
              f"{len(workdirs)} seed(s) -> {os.path.dirname(workdirs[0])}", flush=True)
        summaries = run_seeds(configs_by_seed, workdirs)
        results["methods"][name] = combine_seeds([method_result(s) for s in summaries])
        if configs_by_seed[0].algorithm.key_layers.kind == "groups":  # a chosen split: which groups
            results["methods"][name]["key_layer_groups"] = list(configs_by_seed[0].algorithm.key_layers.groups)
        diag = diagnostics(workdirs[0], configs_by_seed[0])
        if diag:
            results["methods"][name]["diagnostics"] = diag  # of seed 0
        curves[name] = mean_curve([eval_curve(w) for w in workdirs])
        m = results["methods"][name]
        print(f"           ppl {m['perplexity']:.3f} ± {m['perplexity_std']:.3f}  bpb {m['bits_per_byte']:.3f}  "
              f"{m['wall_seconds']:.0f} s", flush=True)
    results["wall_seconds"] = sum(m["wall_seconds"] for m in results["methods"].values())  # all runs
    results["invocation_seconds"] = time.perf_counter() - t0  # this call (finished runs are skipped)
    first = runs[0][1][0]
    results["setup"] = {"model": {**first.to_dict()["model"], "vocab_size": "the tokenizer's"},
                        "tokenizer": first.data.tokenizer, "seq_len": first.data.seq_len,
                        "batch_size": first.data.batch_size, "rounds": first.run.rounds,
                        "local_steps": first.policy.local_steps, "client_lr": first.policy.client_lr,
                        "clients": sum(1 for _ in _clients(first.tree))}
    ref = results["methods"]["worldlm"]
    for name, m in results["methods"].items():
        v = paired_verdict([r["perplexity"] for r in ref["seeds"]], [r["perplexity"] for r in m["seeds"]])
        m["ratio_to_worldlm"], m["ratio_to_worldlm_std"] = v["ratio"], v["ratio_std"]
    results["verdicts"] = verdicts(results["methods"])

    table = format_table(results)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(f"<!-- {command} -->\n" + table)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        from worldlm_jax.outputs.plots import plot_methods
        plot_methods(curves, os.path.join(args.out, "perplexity.png"))
    print(table)
    print(f"runs {results['wall_seconds']:.0f} s, this call {results['invocation_seconds']:.0f} s; wrote {args.out}/table.md, results.json, perplexity.png")
    return results


def mean_curve(curves: Sequence[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The seeds' evaluation curves averaged at the rounds all of them evaluated."""
    rounds = sorted(set.intersection(*(set(r for r, _ in c) for c in curves))) if curves else []
    return [(r, float(np.mean([dict(c)[r] for c in curves]))) for r in rounds]


def _clients(tree: dict):
    if "children" in tree:
        for c in tree["children"]:
            yield from _clients(c)
    else:
        yield from range(int(tree.get("clients", 1)))


if __name__ == "__main__":
    main()
