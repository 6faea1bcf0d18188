"""Faults and attackers against robust aggregation: honest perplexity against the
clean run, and the round-time cost of each rule.

    .venv/bin/python benchmarks/faults.py                  # about 10 min on 2 cores
    .venv/bin/python benchmarks/faults.py --rounds 4 --only clean,sign_flip

The tree is the `tiny` preset's three language federations with 10 clients each
(WorldLM, tiny model, 2 local steps), so one attacker per federation is 10% of
its clients. Each scenario is one `worldlm_jax.train` run with the same seed and
data; faults are drawn inside the compiled round (policy `dropout`,
`stragglers`, `attack`, `attackers`). Perplexity is the final evaluation over
every client's validation text: a federation's clients all deploy the same model
(its K, the root's B) and hold shards of the same language, so the attackers'
own shards measure the same model the honest clients get. Round time is the
median of the rounds after the first (which compiles), side by side in one
process. Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from worldlm_jax.config import apply_overrides, presets as configs  # noqa: E402
from worldlm_jax.outputs.metrics import read_metrics  # noqa: E402
from worldlm_jax.run import training as train  # noqa: E402

RULES = ("mean", "median", "trimmed_mean", "multi_krum", "geometric_median")
ATTACKS = {  # name: (attack, its arguments)
    "sign_flip": ("sign_flip", {"scale": 10.0}),
    "scale": ("scale", {"factor": 100.0}),
    "noise": ("noise", {"std": 1.0}),
    "constant": ("constant", {"value": 1.0}),
    "key_takeover": ("key_takeover", {"factor": 100.0}),
}


def scenarios() -> list[tuple[str, str, dict]]:
    """(scenario, aggregator, leaf-federation policy)."""
    out = [("clean", rule, {}) for rule in RULES]
    # NaN clients under every rule: the engine gives them weight 0, but the stacked rules see
    # their rows and must select them away (issue 20: multi_krum and geometric_median did not)
    nan = {"attack": "nan", "attackers": 1}
    out += [("nan_10pct", rule, nan) for rule in RULES]
    out += [("nan_10pct", "multi_krum, robust_attention", {**nan, "k_agg": "robust_attention"})]
    out += [("dropout_10pct", "mean", {"dropout": 0.1}),
            ("stragglers_30pct", "mean", {"stragglers": 0.3})]
    for name, (attack, args) in ATTACKS.items():
        for rule in ("mean", "median", "multi_krum", "median, robust_attention", "multi_krum, robust_attention"):
            # the backbone is defended by the aggregator, the key layers by attention's own rule
            k_agg = {"k_agg": "robust_attention"} if "robust_attention" in rule else {}
            out.append((name, rule, {"attack": attack, "attackers": 1, "attack_args": args, **k_agg}))
    return out


def config_for(rule: str, faults: dict, rounds: int):
    base = configs.tiny()
    tree = {"name": "world", "policy": {"aggregator": "mean"}, "children": [
        {"name": lang, "sources": [f"man_{lang}"], "clients": 10,
         "policy": {"aggregator": rule.split(",")[0], **faults}}
        for lang in ("en", "de", "ru")]}
    config = apply_overrides(base, [f"run.rounds={rounds}", "run.devices=1", "data.max_bytes_per_source=300000"])
    return dataclasses.replace(config, tree=tree).validate()


def run(rule: str, faults: dict, rounds: int, cache: str) -> dict:
    config = apply_overrides(config_for(rule, faults, rounds), [f"run.compilation_cache={cache}"])
    with tempfile.TemporaryDirectory() as workdir:
        summary = train.train(config, workdir, quiet=True, progress=False)
        records = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "train_loss" in r]
    return {"perplexity": summary["eval"]["perplexity"], "round_s": statistics.median(r["seconds"] for r in records[1:]),
            "excluded": sum(r["diverged_clients"] for r in records),
            "attackers": sum(r.get("attackers_clients", 0.0) for r in records),
            "dropped": sum(r.get("dropped_clients", 0.0) for r in records)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--only", default="", help="comma-separated scenarios (default: all)")
    parser.add_argument("--robust-k-only", action="store_true", help="only the rows with robust_attention")
    args = parser.parse_args(argv)
    only = set(filter(None, args.only.split(",")))
    cache = tempfile.mkdtemp(prefix="faults_xla_cache_")
    results = []
    for name, rule, faults in scenarios():
        baseline = name == "clean" and rule == "mean"  # every table's reference row
        if not baseline and ((only and name not in only) or (args.robust_k_only and "robust_attention" not in rule)):
            continue
        r = run(rule, faults, args.rounds, cache)
        results.append({"scenario": name, "aggregator": rule, **r})
        print(f"{name:<18} {rule:<17} ppl {r['perplexity']:8.3f}  round {r['round_s'] * 1e3:7.1f} ms  "
              f"excluded {r['excluded']:.0f}", flush=True)
    clean = {r["aggregator"]: r for r in results if r["scenario"] == "clean"}
    base = clean.get("mean")
    print()
    print("| scenario | aggregator | perplexity | vs clean (mean) | round ms | vs mean's round |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ratio = r["perplexity"] / base["perplexity"] if base else float("nan")
        cost = r["round_s"] / base["round_s"] if base else float("nan")
        print(f"| {r['scenario']} | {r['aggregator']} | {r['perplexity']:.2f} | {ratio:.3f}x | "
              f"{r['round_s'] * 1e3:.0f} | {cost:.2f}x |")
    print(json.dumps({"benchmark": "faults", "rounds": args.rounds, "results": results}))


if __name__ == "__main__":
    main()
