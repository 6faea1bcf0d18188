"""Methods x codecs on a slow wide-area tree: perplexity, bytes and simulated hours.

    .venv/bin/python benchmarks/worldwide.py                  # about 6 min on 2 cores
    .venv/bin/python benchmarks/worldwide.py --rounds 4 --methods worldlm --codecs none,int8

The tree is the `tiny` preset's (world -> en, de, ru -> 2 clients each) with the
world's links made intercontinental and thin (10 Mbit/s, 100 ms one way) and the
language federations' links to their clients a datacentre's (1 Gbit/s, 5 ms);
clients train a fixed 2000 tokens/s, so the simulated clock is the same on
every machine. Each method runs on that tree with the same data, seed and token
budget; the codec is set on the world's edges only (`tree.own_policy.codec_up`
and `codec_down`: what the language federations send up and what the world
broadcasts), so the federations' own links stay uncompressed. FedAvg flattens
the tree: its clients sit directly under the world, every one of them on an
intercontinental link. Perplexity is the final evaluation over every client's
validation text. Prints a table (ratios to the method's uncompressed run) and
one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from worldlm_jax.config import apply_overrides, presets as configs  # noqa: E402
from worldlm_jax.run import training as train  # noqa: E402

METHODS = ("fedavg", "hierfavg", "diloco", "worldlm")
CODECS = {  # name: the world's own policy overrides
    "none": [],
    "bf16": ["tree.own_policy.codec_up=bf16", "tree.own_policy.codec_down=bf16"],
    "int8": ["tree.own_policy.codec_up=int8", "tree.own_policy.codec_down=int8"],
    "int4": ["tree.own_policy.codec_up=int4", "tree.own_policy.codec_down=int4"],
    "topk10": ["tree.own_policy.codec_up=topk", "tree.own_policy.codec_args={fraction: 0.1}"],
    "sign": ["tree.own_policy.codec_up=sign"],
}
WORLD_LINK = ["tree.policy.link_bandwidth_mbps=1000", "tree.policy.link_latency_ms=5",
              "tree.own_policy.link_bandwidth_mbps=10", "tree.own_policy.link_latency_ms=100",
              "tree.policy.client_tokens_per_s=2000"]


def config_for(method: str, codec: str, rounds: int, cache: str):
    return apply_overrides(configs.tiny(), [f"algorithm.name={method}", f"run.rounds={rounds}", "run.devices=1",
                                            "run.eval_every=0", f"run.compilation_cache={cache}",
                                            *WORLD_LINK, *CODECS[codec]])


def run(method: str, codec: str, rounds: int, cache: str) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        summary = train.train(config_for(method, codec, rounds, cache), workdir, quiet=True, progress=False)
    sent = summary["bytes_communicated"]
    return {"perplexity": summary["eval"]["perplexity"], "bytes_world": sent.get("level0", 0.0),
            "bytes_total": sent.get("total", 0.0), "sim_hours": summary["sim_hours"],
            "compute_utilisation": summary["compute_utilisation"]}


def table(results: list[dict]) -> str:
    base = {r["method"]: r for r in results if r["codec"] == "none"}
    lines = ["| method | world's codec | perplexity | vs none | bytes over the world's links | vs none | "
             "all bytes | simulated s | vs none | compute utilisation |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        b = base.get(r["method"])
        ratio = (lambda k: r[k] / b[k] if b and b[k] else float("nan"))
        lines.append(f"| {r['method']} | {r['codec']} | {r['perplexity']:.2f} | {ratio('perplexity'):.3f}x | "
                     f"{r['bytes_world'] / 1e6:.1f} MB | {ratio('bytes_world'):.3f}x | {r['bytes_total'] / 1e6:.1f} MB | "
                     f"{r['sim_hours'] * 3600:.1f} | {ratio('sim_hours'):.3f}x | {r['compute_utilisation']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--codecs", default=",".join(CODECS))
    args = parser.parse_args(argv)
    methods, codecs = args.methods.split(","), args.codecs.split(",")
    unknown = sorted(set(codecs) - set(CODECS)) + sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods or codecs {unknown}; methods: {', '.join(METHODS)}; codecs: {', '.join(CODECS)}")
    cache = tempfile.mkdtemp(prefix="worldwide_xla_cache_")
    results = []
    for method in methods:
        for codec in codecs:
            r = {"method": method, "codec": codec, **run(method, codec, args.rounds, cache)}
            results.append(r)
            print(f"{method:<9} {codec:<7} ppl {r['perplexity']:8.3f}  world {r['bytes_world'] / 1e6:8.1f} MB  "
                  f"sim {r['sim_hours'] * 3600:8.1f} s", flush=True)
    print()
    print(table(results))
    print(json.dumps({"benchmark": "worldwide", "rounds": args.rounds, "results": results}))


if __name__ == "__main__":
    main()
