#!/usr/bin/env python
"""Reproduce the WorldLM paper's tables (arXiv:2405.14446) in kind.

Every method runs on the same tree, data, tokenizer, model, token budget and
seed; only the algorithm differs. Each run lives in DIR/runs/<method> (a rerun
skips finished runs and resumes unfinished ones), and the script writes

    DIR/table.md       methods x (per-federation perplexity, overall, bits/byte, ratio to WorldLM)
    DIR/results.json   {"methods": {...}, "budget", "tree", "command", ...}
    DIR/perplexity.png validation perplexity per round per method

Usage:
    python scripts/reproduce_paper.py --budget small --out runs/paper_small
    python scripts/reproduce_paper.py --budget small --out runs/paper_swap --swap
    python scripts/reproduce_paper.py --budget small --out runs/paper_dp --dp
    python scripts/reproduce_paper.py --budget small --out runs/x --methods worldlm,fedavg --set policy.tau=1

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
from typing import Sequence

import yaml

from worldlm_jax import configs
from worldlm_jax.config import Config, apply_overrides

BASELINES = ("worldlm", "fedavg", "hierfavg", "fedper", "local", "centralized")
ABLATIONS = {  # name -> (algorithm, overrides)
    "worldlm_mean": ("worldlm", ["policy.k_agg=mean"]),
    "worldlm_nores": ("worldlm", ["algorithm.residuals=none"]),
    "worldlm_mean_nores": ("worldlm", ["policy.k_agg=mean", "algorithm.residuals=none"]),
}
METHODS = BASELINES + tuple(ABLATIONS)
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
def method_config(base: Config, method: str, dp: dict | None = None) -> Config:
    """The config of one method: `base` plus the algorithm (and DP) overrides only."""
    algorithm, extra = ABLATIONS.get(method, (method, []))
    config = apply_overrides(base, [f"algorithm.name={algorithm}", *extra])
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
                clients: int | None = None) -> Config:
    b = BUDGETS[budget]
    config = configs.get(b.preset)
    languages = ("en", "de", "ru") if budget == "tiny" else configs.LANGUAGES
    if budget == "tiny" and tree == "family":
        languages = ("en", "de", "fr", "ru")
    config = dataclasses.replace(config, tree=make_tree(tree, clients or b.clients, languages, swap))
    return apply_overrides(config, [*b.overrides, *sets])


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
def run_method(config: Config, workdir: str, log=print) -> dict:
    """Train (or resume, or skip when finished) one method's run; its summary."""
    from worldlm_jax.train import train

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
            log(f"  {workdir}: finished, skipped")
            return summary
    return train(config, workdir, quiet=True, progress=False)


def eval_curve(workdir: str) -> list[tuple[int, float]]:
    """(rounds completed, overall perplexity) of every evaluation in metrics.jsonl."""
    from worldlm_jax.metrics import read_metrics

    points = {}
    for rec in read_metrics(os.path.join(workdir, "metrics.jsonl")):
        if isinstance(rec, dict) and "eval" in rec:
            points[int(rec["round"]) + 1] = float(rec["eval"]["perplexity"])
    return sorted(points.items())


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


# ---- table ------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    if x is None or not math.isfinite(x):
        return "nan" if x is None or math.isnan(x) else "inf"
    return f"{x:.2f}" if x < 1000 else f"{x:.4g}"


def format_table(results: dict, reference: str = "worldlm") -> str:
    methods = results["methods"]
    feds = list(dict.fromkeys(f for m in methods.values() for f in m["per_federation"]))
    ref = methods.get(reference, {}).get("perplexity")
    show_eps = any("epsilon" in m for m in methods.values())
    head = ["method", *feds, "overall ppl", "bits/byte", f"ppl / {reference} ppl", "MB sent", "wall s"]
    if show_eps:
        head.append("epsilon")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        ratio = m["perplexity"] / ref if ref else math.nan
        row = [name, *[_fmt(m["per_federation"].get(f, math.nan)) for f in feds], _fmt(m["perplexity"]),
               f"{m['bits_per_byte']:.3f}", f"{ratio:.3f}", f"{m['bytes_communicated'] / 1e6:.1f}",
               f"{m['wall_seconds']:.0f}"]
        if show_eps:
            row.append(_fmt(m["epsilon"]) if m.get("epsilon") is not None else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# ---- main ----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=[b for b in BUDGETS if b != "tiny"] + ["tiny"], default="small",
                   help="small (CPU) | medium | paper (accelerator)")
    p.add_argument("--out", required=True, help="output directory (runs/, table.md, results.json, perplexity.png)")
    p.add_argument("--methods", default="", help=f"comma list from {', '.join(METHODS)} (default: all; "
                                                 f"with --dp: {', '.join(DP_METHODS)}; with --swap: worldlm)")
    p.add_argument("--tree", choices=("language", "family"), default=None,
                   help="language (root -> 7 languages -> clients; default) or family "
                        "(root -> families -> languages -> clients; default with --swap)")
    p.add_argument("--swap", action="store_true",
                   help="wrong hierarchy: man_ru under romance, man_fr under slavic; each method runs on the "
                        "correct and the swapped family tree (rows <method> and <method>@swapped)")
    p.add_argument("--dp", action="store_true", help="client-level DP at the client-aggregating federations")
    p.add_argument("--dp-noise", type=float, default=0.5, help="DP noise multiplier z (with --dp)")
    p.add_argument("--dp-clip", type=float, default=1.0, help="DP per-client L2 clip (with --dp)")
    p.add_argument("--dp-clients", type=int, default=8, help="clients per language with --dp")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override applied to every method (e.g. policy.tau=1)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    command = "python scripts/reproduce_paper.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    tree = args.tree or ("family" if args.swap else "language")
    if args.swap and tree != "family":
        raise SystemExit("--swap exchanges sources between language families: use --tree family")
    default = DP_METHODS if args.dp else ("worldlm",) if args.swap else METHODS
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] or list(default)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if "worldlm" not in methods:
        methods.insert(0, "worldlm")  # the ratio's reference
    dp = {"dp_noise_multiplier": args.dp_noise, "dp_clip": args.dp_clip} if args.dp else None
    clients = args.dp_clients if args.dp else None

    os.makedirs(args.out, exist_ok=True)
    variants = [("", False)] + ([("@swapped", True)] if args.swap else [])
    runs = []  # (row name, config, workdir)
    for suffix, swapped in variants:
        base = base_config(args.budget, tree, args.set, swap=swapped, clients=clients)
        for m in methods:
            runs.append((m + suffix, method_config(base, m, dp), os.path.join(args.out, "runs", m + suffix)))

    results = {"methods": {}, "budget": args.budget, "tree": tree, "command": command,
               "swap": args.swap, "dp": dp, "overrides": list(BUDGETS[args.budget].overrides) + args.set}
    curves = {}
    t0 = time.perf_counter()
    for name, config, workdir in runs:
        print(f"[{time.perf_counter() - t0:6.0f} s] {name}: {config.run.rounds} rounds -> {workdir}", flush=True)
        summary = run_method(config, workdir)
        results["methods"][name] = method_result(summary)
        curves[name] = eval_curve(workdir)
        m = results["methods"][name]
        print(f"           ppl {m['perplexity']:.3f}  bpb {m['bits_per_byte']:.3f}  "
              f"{m['wall_seconds']:.0f} s", flush=True)
    results["wall_seconds"] = sum(m["wall_seconds"] for m in results["methods"].values())  # all runs
    results["invocation_seconds"] = time.perf_counter() - t0  # this call (finished runs are skipped)
    first = runs[0][1]
    results["setup"] = {"model": {**first.to_dict()["model"], "vocab_size": "the tokenizer's"},
                        "tokenizer": first.data.tokenizer, "seq_len": first.data.seq_len,
                        "batch_size": first.data.batch_size, "rounds": first.run.rounds,
                        "local_steps": first.policy.local_steps, "client_lr": first.policy.client_lr,
                        "clients": sum(1 for _ in _clients(first.tree))}
    ref = results["methods"]["worldlm"]["perplexity"]
    for m in results["methods"].values():
        m["ratio_to_worldlm"] = m["perplexity"] / ref

    table = format_table(results)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(f"<!-- {command} -->\n" + table)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        from worldlm_jax.plots import plot_methods
        plot_methods(curves, os.path.join(args.out, "perplexity.png"))
    print(table)
    print(f"runs {results['wall_seconds']:.0f} s, this call {results['invocation_seconds']:.0f} s; wrote {args.out}/table.md, results.json, perplexity.png")
    return results


def _clients(tree: dict):
    if "children" in tree:
        for c in tree["children"]:
            yield from _clients(c)
    else:
        yield from range(int(tree.get("clients", 1)))


if __name__ == "__main__":
    main()
