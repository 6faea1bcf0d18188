"""Round time and memory as clients, tree depth and model size grow.

    .venv/bin/python benchmarks/scaling.py --out /tmp/scaling
    .venv/bin/python benchmarks/scaling.py --clients 8,16,32,64,128,256 --out /tmp/scaling   # long on 2 cores

Every point is a fresh process (benchmarks/throughput.py --quiet), so its peak
RSS is its own. Clients run chunked (default chunk: sequential per device on
CPU), so activation memory does not grow with the number of clients; what
still grows is the per-slot state (start/final parameters, deltas, tokens).
Writes scaling.json and scaling.png (matplotlib, Agg) into --out.

Scaling over processes (1 process x 2 devices vs 2 processes x 1 device, and the
share of a round in cross-process collectives) is benchmarks/multiprocess.py: it
drives its own worker processes side by side, which these one-process points cannot.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def point(extra: list[str], common_args: list[str]) -> dict:
    cmd = [sys.executable, os.path.join(HERE, "throughput.py"), "--quiet", "--no-clients-alone"] + common_args + extra
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-3000:])
        return {"error": out.stderr[-500:], "cmd": " ".join(cmd)}
    rec = json.loads(out.stdout.strip().splitlines()[0])
    rec["cmd"] = " ".join(cmd[1:])
    rec["process_s"] = round(time.perf_counter() - t, 1)
    rec["per_client_step_ms"] = round(1000.0 / rec["client_steps_per_s"], 2)
    rec["per_client_step_ms_best"] = round(1000.0 / rec["client_steps_per_s_best"], 2)
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--clients", default="8,16,32,64")
    ap.add_argument("--depths", default="1,2,3")
    ap.add_argument("--depth-clients", type=int, default=16)
    ap.add_argument("--presets", default="tiny,w,small")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--devices", type=int, default=-1)
    ap.add_argument("--chunk", default="default")
    ap.add_argument("--skip", default="", help="comma list of sweeps to skip: clients,depth,model")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    base = ["--steps", str(args.steps), "--rounds", str(args.rounds), "--devices", str(args.devices),
            "--chunk", args.chunk]
    skip = set(filter(None, args.skip.split(",")))
    results = {"clients": [], "depth": [], "model": []}

    def log(kind, rec):
        results[kind].append(rec)
        keys = ("clients", "depth", "preset", "client_steps_per_s", "client_steps_per_s_best", "round_s",
                "peak_rss_mb", "compiles", "mfu")
        print(kind, {k: rec.get(k) for k in keys} if "error" not in rec else rec, flush=True)
        with open(os.path.join(args.out, "scaling.json"), "w") as f:
            json.dump(results, f, indent=1)

    if "clients" not in skip:
        for n in map(int, args.clients.split(",")):
            log("clients", point(["--clients", str(n)], base))
    if "depth" not in skip:
        for d in map(int, args.depths.split(",")):
            log("depth", point(["--clients", str(args.depth_clients), "--depth", str(d)], base))
    if "model" not in skip:
        for p in args.presets.split(","):
            log("model", point(["--clients", "16", "--preset", p], base))
    plot(results, os.path.join(args.out, "scaling.png"))
    print(f"wrote {args.out}/scaling.json and scaling.png")


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    ok = lambda rs: [r for r in rs if "error" not in r]
    rs = ok(results["clients"])
    if rs:
        x = [r["clients"] for r in rs]
        axes[0].plot(x, [r["per_client_step_ms"] for r in rs], "o-", label="median round")
        axes[0].plot(x, [r["per_client_step_ms_best"] for r in rs], "s--", label="best round")
        axes[0].set(xscale="log", xlabel="clients per round", ylabel="ms per client-step",
                    title="per-client cost vs clients")
        axes[0].set_ylim(bottom=0)
        axes[0].legend()
        axes[1].plot(x, [r["peak_rss_mb"] for r in rs], "o-")
        axes[1].set(xscale="log", xlabel="clients per round", ylabel="peak RSS (MB)", title="memory vs clients")
        axes[1].set_ylim(bottom=0)
    rs = ok(results["depth"])
    if rs:
        axes[2].bar([str(r["depth"]) for r in rs], [r["round_s"] for r in rs])
        axes[2].set(xlabel="tree levels (same clients)", ylabel="round s (median)", title="round time vs depth")
    rs = ok(results["model"])
    if rs:
        axes[3].bar([r["preset"] for r in rs], [r["round_s"] for r in rs])
        for i, r in enumerate(rs):
            axes[3].text(i, r["round_s"], f"{r['gflop_per_client_step']:.2f} GF/step\nMFU {100 * r['mfu']:.0f}%",
                         ha="center", va="bottom", fontsize=8)
        axes[3].set(xlabel="model preset (16 clients)", ylabel="round s (median)", title="round time vs model")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
