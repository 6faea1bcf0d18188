"""Methods x codecs on a slow wide-area tree: perplexity, bytes, simulated hours, and
the world bandwidth each method needs for 90% compute utilisation.

    .venv/bin/python benchmarks/worldwide.py                  # about 30 min on 2 cores (3 seeds)
    .venv/bin/python benchmarks/worldwide.py --rounds 4 --seeds 0 --methods worldlm --codecs none,int8

The tree: the embedded languages in three regions, world -> germanic (en, de),
romance (fr, es, it), slavic (pl, ru) -> 2 clients each, on the `tiny` preset's
model and data sizes. The world's links to the regions are intercontinental and
thin (10 Mbit/s, 100 ms one way); every link inside a region, to the languages
and to their clients, is a datacentre's (1 Gbit/s, 5 ms); clients train a fixed
2000 tokens/s, so the simulated clock is the same on every machine. Each method
runs on that tree with the same data, seed and token budget; the codec is set on
the world's edges only (`tree.own_policy.codec_up` and `codec_down`: what the
regions send up and what the world broadcasts), so the links inside a region
stay uncompressed. FedAvg flattens the tree: its clients sit directly under the
world, every one of them on an intercontinental link. Perplexity is the final evaluation over every client's
validation text, as the mean and standard deviation over the seeds (bytes and
the clock do not depend on the seed: every client takes part in every round).
Time to target: every run is evaluated after every round; a run's time is the
simulated seconds until its first evaluation at or below the target (by default
1.1x flat FedAvg's final perplexity at float32, its seed mean), averaged over
the seeds that reach it; the headline is flat FedAvg's time over each row's.

Methods: the four strategies, hierarchical DiLoCo (`hdiloco`: the regions step
their languages' mean with the same outer Nesterov rule as the world; the
languages average their clients) and Streaming DiLoCo (`streaming`: DiLoCo with the world syncing the
backbone in two fragments of blocks, one a round, each through the world's codec).

The bandwidth column replays each run's recorded rounds on the network clock
with the world's links at other speeds (the same participants, rounds and
codecs; `network_clock.round_clock`, checked to reproduce the run's own
`sim_hours` first) and bisects for the lowest bandwidth at which the clients'
work is 90% of the simulated time; where latency alone keeps utilisation below
that, the column gives the ceiling at unlimited bandwidth instead. The preset's
2 local steps are 64 ms of work against 200 ms of round trip, so the same
replay is also projected to `--projected-local-steps` (500, DiLoCo's regime) at
the same message sizes: only the clients' work on the clock changes. Prints a
table (ratios to the method's uncompressed run) and one JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from worldlm_jax.config import apply_overrides, presets as configs  # noqa: E402
from worldlm_jax.outputs import metrics as metrics_lib, plots  # noqa: E402
from worldlm_jax.run import blueprint, communication, network_clock, training as train  # noqa: E402

REGIONS = tuple(node["name"] for node in configs.family_tree()["children"])  # germanic, romance, slavic
METHODS = {  # name: overrides
    "fedavg": ["algorithm.name=fedavg"], "hierfavg": ["algorithm.name=hierfavg"],
    "diloco": ["algorithm.name=diloco"],
    "hdiloco": ["algorithm.name=diloco", *(f"tree.{region}.own_policy.{field}" for region in REGIONS
                                           for field in ("server_optimizer=nesterov", "server_lr=0.7"))],
    "streaming": ["algorithm.name=diloco", "tree.own_policy.sync_fragments=2"],
    "worldlm": ["algorithm.name=worldlm"],
}
CODECS = {  # name: the world's own policy overrides
    "none": [],
    "bf16": ["tree.own_policy.codec_up=bf16", "tree.own_policy.codec_down=bf16"],
    "int8": ["tree.own_policy.codec_up=int8", "tree.own_policy.codec_down=int8"],
    "int4": ["tree.own_policy.codec_up=int4", "tree.own_policy.codec_down=int4"],
    "topk10": ["tree.own_policy.codec_up=topk", "tree.own_policy.codec_args={fraction: 0.1}"],
    "sign": ["tree.own_policy.codec_up=sign"],
}
DEFAULT_CODECS = ("none", "bf16", "int8", "int4", "topk10")
TARGET_UTILISATION = 0.9
TARGET_OVER_FLAT = 1.1  # the time-to-target's perplexity, over flat FedAvg's final at float32
WORLD_LINK = ["tree.policy.link_bandwidth_mbps=1000", "tree.policy.link_latency_ms=5",
              "tree.own_policy.link_bandwidth_mbps=10", "tree.own_policy.link_latency_ms=100",
              "tree.policy.client_tokens_per_s=2000"]


def world_tree() -> dict:
    """world -> three regions (the language families) -> seven languages -> 2 clients each."""
    return configs.family_tree(clients=2)


def config_for(method: str, codec: str, rounds: int, seed: int, cache: str, world_mbps: float | None = None,
               local_steps: int | None = None):
    link = [f"tree.own_policy.link_bandwidth_mbps={world_mbps}"] if world_mbps is not None else []
    link += [f"tree.policy.local_steps={local_steps}"] if local_steps is not None else []
    return apply_overrides(dataclasses.replace(configs.tiny(), tree=world_tree()), [*METHODS[method], f"run.rounds={rounds}", f"run.seed={seed}",
                                            "run.devices=1", "run.eval_every=1", f"run.compilation_cache={cache}",
                                            *WORLD_LINK, *CODECS[codec], *link])


def run(config, keep_records: bool) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        summary = train.train(config, workdir, quiet=True, progress=False)
        written = list(metrics_lib.read_metrics(os.path.join(workdir, metrics_lib.METRICS_FILE)))
    rounds = [r for r in written if "sim_seconds" in r]
    spent = {}  # round -> what the run had spent by its end: the plots' x axes
    tokens = sent = seconds = 0.0
    for rec in rounds:
        tokens, sent, seconds = (tokens + rec["tokens"], sent + rec["bytes_communicated"]["total"],
                                 seconds + rec["sim_seconds"])
        spent[rec["round"]] = {"round": rec["round"] + 1, "tokens": tokens, "bytes_communicated": sent,
                               "sim_hours": seconds / 3600}
    evaluated = {e["round"]: e["eval"]["perplexity"] for e in written if "eval" in e}  # the last of a round's
    # (simulated seconds at the end of the round, perplexity then): what time to a target reads
    curve = [(spent[k]["sim_hours"] * 3600, ppl) for k, ppl in sorted(evaluated.items())]
    series = {"perplexity": [(spent[k], ppl) for k, ppl in sorted(evaluated.items())],
              "train_loss": [(spent[rec["round"]], rec["train_loss"]) for rec in rounds]}
    records = rounds if keep_records else None
    sent = summary["bytes_communicated"]
    return {"perplexity": summary["eval"]["perplexity"], "bytes_world": sent.get("level0", 0.0),
            "bytes_total": sent.get("total", 0.0), "sim_hours": summary["sim_hours"],
            "compute_utilisation": summary["compute_utilisation"], "records": records, "curve": curve,
            "series": series}


def replayed_clock(config, records: list[dict]) -> tuple[float, float]:
    """(simulated seconds, the clients' work on them) of a run's recorded rounds, priced
    over the links of `config` (the run's own, or the same tree with other link speeds)."""
    run_ = blueprint.abstract_run(config)
    topo, plan, spec = run_.run_topology, run_.spec.plan, run_.spec
    sizes, leaves = communication.part_bytes(run_.params, spec.key_paths), communication.part_leaves(
        run_.params, spec.key_paths)
    backbone = communication.backbone_leaves(run_.params, spec.key_paths, spec.param_blocks, spec.param_groups)
    work = network_clock.local_work_seconds(topo, run_.batch_size * config.data.seq_len, 0.0)
    seconds = compute = 0.0
    for rec in records:
        per_level = lambda name: {d: np.asarray(rec[f"level{d}/{name}"], np.float64) for d in range(topo.depth)
                                  if f"level{d}/{name}" in rec}
        clock = network_clock.round_clock(topo, plan, sizes, per_level("participants"), per_level("rounds"), work,
                                          leaves, per_level("late"),
                                          communication.partial_sync_bytes(topo, backbone, rec["round"]))
        seconds, compute = seconds + clock["seconds"], compute + clock["compute_seconds"]
    return seconds, compute


def bandwidth_for(utilisation_at, target: float) -> tuple[float | None, float]:
    """(the lowest world bandwidth in Mbit/s at which utilisation reaches `target`, or None
    where latency caps it below; the utilisation at unlimited bandwidth), by bisection on
    a log scale (utilisation rises with bandwidth)."""
    ceiling = utilisation_at(1e9)
    if ceiling < target:
        return None, ceiling
    low, high = -3.0, 9.0  # log10 Mbit/s
    for _ in range(20):  # 12 decades / 2^20: far finer than the table shows
        mid = (low + high) / 2
        low, high = (mid, high) if utilisation_at(10 ** mid) < target else (low, mid)
    return 10 ** high, ceiling


def time_to(curve, target: float) -> float | None:
    """Simulated seconds until the first evaluation at or below `target` (None: never)."""
    return next((t for t, ppl in curve if ppl <= target), None)


def with_time_to_target(results: list[dict], target: float) -> None:
    """Each row's mean simulated time to `target` over the seeds that reach it."""
    for r in results:
        times = [time_to(c, target) for c in r.pop("curves")]
        reached = [t for t in times if t is not None]
        r.update(target=target, seconds_to_target=statistics.mean(reached) if reached else None,
                 seeds_reaching_target=len(reached))


def plot(results: list[dict], codec: str, out_png: str) -> str:
    """Every method's learning curves with the world's `codec`: the seeds' mean, their
    range as a band, against rounds, tokens, bytes and simulated hours (`plots.plot_curves`)."""
    lines = {}
    for r in results:
        if r["codec"] != codec:
            continue
        curves = {}
        for y in ("train_loss", "perplexity"):
            per_seed = [run_series[y] for run_series in r["series"]]
            values = np.array([[v for _, v in points] for points in per_seed], np.float64)
            curves[y] = {x: [spent[x] for spent, _ in per_seed[0]] for x in ("round", "tokens", "bytes_communicated",
                                                                              "sim_hours")}
            curves[y].update({y: values.mean(0).tolist(), "low": values.min(0).tolist(),
                              "high": values.max(0).tolist()})
        lines[r["method"]] = curves
    return plots.plot_curves(lines, out_png)


def table(results: list[dict]) -> str:
    base = {r["method"]: r for r in results if r["codec"] == "none"}
    flat = next((r for r in results if r["method"] == "fedavg" and r["codec"] == "none"), None)
    lines = ["| method | world's codec | perplexity (mean ± sd) | vs none | bytes over the world's links | vs none | "
             "all bytes | simulated s | vs none | simulated s to target | FedAvg's / this | compute utilisation | "
             "world bandwidth for 90% | ... at the projected local steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        b = base.get(r["method"])
        ratio = (lambda k: r[k] / b[k] if b and b[k] else float("nan"))
        to_target = lambda r: (f"{r['seconds_to_target']:.1f} ({r['seeds_reaching_target']}/{len(r['seeds'])})"
                               if r["seconds_to_target"] is not None else f"not reached (0/{len(r['seeds'])})")
        speedup = lambda r: (f"{flat['seconds_to_target'] / r['seconds_to_target']:.2f}x"
                             if flat and flat["seconds_to_target"] and r["seconds_to_target"] else "-")
        needed = lambda key: (f"{r[key][0]:.3g} Mbit/s" if r[key][0] is not None
                              else f"not reached (at most {r[key][1]:.3f})")
        lines.append(f"| {r['method']} | {r['codec']} | {r['perplexity']:.2f} ± {r['perplexity_sd']:.2f} | "
                     f"{ratio('perplexity'):.3f}x | {r['bytes_world'] / 1e6:.1f} MB | {ratio('bytes_world'):.3f}x | "
                     f"{r['bytes_total'] / 1e6:.1f} MB | {r['sim_hours'] * 3600:.1f} | {ratio('sim_hours'):.3f}x | "
                     f"{to_target(r)} | {speedup(r)} | {r['compute_utilisation']:.3f} | {needed('for_target')} | "
                     f"{needed('projected_for_target')} |")
    return "\n".join(lines)


def measure(method: str, codec: str, rounds: int, seeds, cache: str, projected_steps: int) -> dict:
    """One table row: every seed trained; the first one's rounds replayed for the bandwidth."""
    runs = [run(config_for(method, codec, rounds, seed, cache), keep_records=i == 0) for i, seed in enumerate(seeds)]
    first = runs[0]
    seconds, compute = replayed_clock(config_for(method, codec, rounds, seeds[0], cache), first["records"])
    assert math.isclose(seconds, first["sim_hours"] * 3600, rel_tol=1e-9), (seconds, first["sim_hours"])
    def utilisation(mbps, steps=None):
        s, c = replayed_clock(config_for(method, codec, rounds, seeds[0], cache, mbps, steps), first["records"])
        return c / s

    ppl = [r["perplexity"] for r in runs]
    return {"method": method, "codec": codec, "seeds": list(seeds), "perplexity": statistics.mean(ppl),
            "perplexity_sd": statistics.stdev(ppl) if len(ppl) > 1 else 0.0, "perplexity_per_seed": ppl,
            "curves": [r["curve"] for r in runs], "series": [r["series"] for r in runs],
            **{k: first[k] for k in ("bytes_world", "bytes_total", "sim_hours", "compute_utilisation")},
            "for_target": bandwidth_for(utilisation, TARGET_UTILISATION),  # (Mbit/s or None, ceiling)
            "projected_for_target": bandwidth_for(lambda mbps: utilisation(mbps, projected_steps), TARGET_UTILISATION)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--projected-local-steps", type=int, default=500)
    parser.add_argument("--plots", default="benchmarks/results", help="where the curves' PNGs go ('' = none)")
    parser.add_argument("--target", type=float, default=0.0,
                        help=f"perplexity to time (default: {TARGET_OVER_FLAT}x FedAvg's final at float32)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--codecs", default=",".join(DEFAULT_CODECS), help=f"of {', '.join(CODECS)}")
    args = parser.parse_args(argv)
    methods, codecs = args.methods.split(","), args.codecs.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = sorted(set(codecs) - set(CODECS)) + sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods or codecs {unknown}; methods: {', '.join(METHODS)}; codecs: {', '.join(CODECS)}")
    cache = tempfile.mkdtemp(prefix="worldwide_xla_cache_")
    results = []
    for method in methods:
        for codec in codecs:
            r = measure(method, codec, args.rounds, seeds, cache, args.projected_local_steps)
            results.append(r)
            print(f"{method:<9} {codec:<7} ppl {r['perplexity']:8.3f} ± {r['perplexity_sd']:.3f}  "
                  f"world {r['bytes_world'] / 1e6:8.1f} MB  sim {r['sim_hours'] * 3600:8.1f} s", flush=True)
    flat = [r for r in results if r["method"] == "fedavg" and r["codec"] == "none"]
    target = args.target or (TARGET_OVER_FLAT * flat[0]["perplexity"] if flat else math.nan)
    with_time_to_target(results, target)
    if args.plots:
        os.makedirs(args.plots, exist_ok=True)
        for codec in ("none", "int4"):
            if any(r["codec"] == codec for r in results):
                print("wrote", plot(results, codec, os.path.join(args.plots, f"worldwide_{codec}.png")))
    for r in results:
        r.pop("series")
    print()
    print(f"target perplexity {target:.2f}" + ("" if args.target else
                                               f" ({TARGET_OVER_FLAT}x flat FedAvg's final at float32)"))
    print(table(results))
    print(json.dumps({"benchmark": "worldwide", "rounds": args.rounds, "seeds": seeds,
                      "projected_local_steps": args.projected_local_steps, "target_utilisation": TARGET_UTILISATION, "target_perplexity": target,
                      "results": results}))


if __name__ == "__main__":
    main()
