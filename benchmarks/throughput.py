"""Throughput of workload W through the engine's own FedAvg round.

    .venv/bin/python benchmarks/throughput.py                       # recommended CPU set-up
    .venv/bin/python benchmarks/throughput.py --devices 1 --chunk 0 # naive: one device, vmap all

Metric: client-steps/s = clients that trained * local steps / round wall time, median over
--rounds rounds after two warm-up rounds (compile; a recompile shows in `compiles`). Several --chunk /
--dtype / --matmul-dtype / --attention values are measured side by side in one process, rounds interleaved so that
machine noise hits every variant alike, and the matmul peak is re-measured
between rounds (MFU uses the best peak seen: conservative). Prints a table,
then one JSON line per variant.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=common.W["clients"])
    ap.add_argument("--steps", type=int, default=common.W["steps"])
    ap.add_argument("--preset", default=common.W["preset"])
    ap.add_argument("--batch", type=int, default=common.W["batch"])
    ap.add_argument("--seq", type=int, default=common.W["seq"])
    ap.add_argument("--depth", type=int, default=1, help="tree levels (1 = flat FedAvg, >1 = HierFAVG)")
    ap.add_argument("--federations-per-round", type=int, default=None,
                    help="depth > 1: child federations each federation samples per round (default: all)")
    ap.add_argument("--chunk", default="default",
                    help="clients per device at once, comma list: 0 = vmap all, 1 = sequential, "
                         "'default' = parallel.default_chunk()")
    ap.add_argument("--dtype", default="float32", help="compute dtype(s), comma list: float32,bfloat16")
    ap.add_argument("--matmul-dtype", default="float32",
                    help="dense-product operand dtype(s), comma list: float32,bfloat16 (model.ModelConfig."
                         "matmul_dtype: bf16 operands, f32 accumulation and activations). On CPU a bfloat16 "
                         "variant turns XLA's transpose folding off for the whole process (see kernels.py), "
                         "which costs float32 variants in the same run a few percent")
    ap.add_argument("--attention", default="auto",
                    help="attention kernel(s), comma list: auto,explicit,fused (model.ModelConfig.attention)")
    ap.add_argument("--devices", type=int, default=-1,
                    help="host devices (CPU: XLA_FLAGS device count); -1 = one per core on CPU, all on GPU")
    ap.add_argument("--eigen", choices=("auto", "on", "off"), default="auto",
                    help="XLA CPU multi-threaded Eigen (auto: off when devices > 1)")
    ap.add_argument("--xla-flags", default="", help="extra XLA_FLAGS")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per variant (median reported)")
    ap.add_argument("--no-clients-alone", action="store_true", help="skip the clients-only timing")
    ap.add_argument("--quiet", action="store_true", help="JSON lines only")
    return ap.parse_args(argv)


def resolve_devices(requested: int) -> int:
    if requested >= 0:
        return requested
    on_gpu = os.environ.get("JAX_PLATFORMS", "") not in ("cpu",) and _has_gpu()
    return 0 if on_gpu else (os.cpu_count() or 1)


def _has_gpu() -> bool:
    import shutil
    return shutil.which("nvidia-smi") is not None


def run(args) -> list[dict]:
    n_dev = resolve_devices(args.devices)
    if n_dev and n_dev > 0:
        common.configure(devices=n_dev, eigen_threads=args.eigen, extra_flags=args.xla_flags)
    else:
        common.configure(devices=0, eigen_threads="on" if args.eigen == "auto" else args.eigen,
                         extra_flags=args.xla_flags)
    matmul_dtypes = args.matmul_dtype.split(",")
    from worldlm_jax.engine import parallel
    if "bfloat16" in matmul_dtypes:
        parallel.configure_cpu_bf16_matmuls()
    import jax
    import numpy as np

    platform = jax.default_backend()
    devices = len(jax.devices()) if not n_dev else n_dev
    if platform != "cpu" and args.devices < 0:
        devices = 1
    chunks = [parallel.default_chunk(platform) if c == "default" else int(c) for c in args.chunk.split(",")]
    dtypes = args.dtype.split(",")
    t0 = time.perf_counter()
    peak = common.matmul_peak_gflops(devices, n=2048) if platform == "cpu" \
        else _gpu_peak(set(dtypes) | set(matmul_dtypes))
    # bf16 products: their own peak, reported beside the f32-peak MFU the issue defines
    bf16_peak = common.matmul_peak_gflops(devices, n=2048, dtype="bfloat16") \
        if platform == "cpu" and "bfloat16" in matmul_dtypes else None
    variants = []
    for chunk in chunks:
        for dtype, matmul_dtype, attention in itertools.product(dtypes, matmul_dtypes, args.attention.split(",")):
            w = common.build(clients=args.clients, steps=args.steps, preset=args.preset, chunk=chunk,
                             devices=devices, depth=args.depth, dtype=dtype, batch=args.batch, seq=args.seq,
                             federations_per_round=args.federations_per_round, attention=attention,
                             matmul_dtype=matmul_dtype)
            state = w.strategy.init(w.params)  # placed as the round returns it: one compilation
            key = jax.random.PRNGKey(1)
            state, metrics, first = common.time_round(w, state, key)
            state, _, second = common.time_round(w, state, key)  # catches a recompile, if any
            clients_first = 0.0 if args.no_clients_alone else common.time_clients(w)
            loss = float(np.sum(metrics["train_loss_sum"]) / max(np.sum(metrics["train_clients"]), 1))
            variants.append(dict(w=w, state=state, key=key, chunk=chunk, dtype=dtype, matmul_dtype=matmul_dtype,
                                 attention=attention, first=first + second, times=[],
                                 ctimes=[], loss=loss, cfirst=clients_first, trained=[]))
    peaks = [peak] if not isinstance(peak, dict) else []
    for _ in range(args.rounds):  # interleaved: noise hits every variant alike
        if platform == "cpu":  # the peak is re-measured between rounds, under the same load
            peaks.append(common.matmul_peak_gflops(devices, n=2048, reps=2))
        for v in variants:
            v["state"], m, dt = common.time_round(v["w"], v["state"], v["key"])
            v["times"].append(dt)
            v["trained"].append(float(np.sum(m["train_clients"])))  # < clients when federations are sampled
            if not args.no_clients_alone:
                v["ctimes"].append(common.time_clients(v["w"]))
    if platform == "cpu":
        peak = max(peaks)  # conservative: the best the machine showed during the run
    out = []
    for v in variants:
        w = v["w"]
        round_s = common.median(v["times"])
        clients = float(np.mean(v["trained"]))
        cps = clients * w.steps / round_s
        achieved = cps * w.flops_per_client_step / 1e9
        clients_s = common.median(v["ctimes"]) if v["ctimes"] else None
        operand = "bfloat16" if v["matmul_dtype"] == "bfloat16" else v["dtype"]
        peak_v = peak[operand] if isinstance(peak, dict) else peak
        out.append({
            "workload": "W" if _is_w(args) else "custom",
            "client_steps_per_s": round(cps, 2),
            "mfu": round(achieved / peak_v, 4),
            "matmul_peak_gflops": round(peak_v, 1),
            "achieved_gflops": round(achieved, 1),
            "round_s": round(round_s, 4),
            "round_s_all": [round(t, 4) for t in v["times"]],
            "clients_alone_s": None if clients_s is None else round(clients_s, 4),
            "client_steps_per_s_best": round(clients * w.steps / min(v["times"]), 2),
            "mfu_best": round(clients * w.steps / min(v["times"]) * w.flops_per_client_step / 1e9 / peak_v, 4),
            "bf16_matmul_peak_gflops": None if bf16_peak is None else round(bf16_peak, 1),
            "mfu_vs_bf16_peak": round(achieved / bf16_peak, 4)
            if bf16_peak is not None and v["matmul_dtype"] == "bfloat16" else None,
            "clients_trained_per_round": clients,
            "matmul_peak_gflops_all": [round(p, 1) for p in peaks] if platform == "cpu" else None,
            "compile_s": round(v["first"] - 2 * round_s, 2),
            "compiles": int(w.strategy.run_round._cache_size()),
            "aggregation_fraction": round(max(0.0, round_s - clients_s) / round_s, 4) if v["ctimes"] else None,
            "peak_rss_mb": round(common.peak_rss_mb(), 1),
            "platform": platform,
            "device_kind": jax.devices()[0].device_kind,
            "devices": devices, "chunk": v["chunk"], "dtype": v["dtype"], "matmul_dtype": v["matmul_dtype"],
            "attention": v["attention"], "preset": args.preset,
            "clients": args.clients, "steps": args.steps, "batch": args.batch, "seq": args.seq,
            "depth": args.depth, "federations_per_round": args.federations_per_round, "gflop_per_client_step": round(w.flops_per_client_step / 1e9, 4),
            "first_round_loss": round(v["loss"], 5),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "wall_s": round(time.perf_counter() - t0, 1),
        })
    return out


def _gpu_peak(dtypes) -> dict:
    """Accelerator matmul peak per compute dtype (8192^2 matmul)."""
    import jax
    import jax.numpy as jnp
    res = {}
    for name in set(dtypes):
        dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
        n = 8192
        x = jnp.ones((n, n), dt)
        f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
        jax.block_until_ready(f(x, x))
        best = 1e9
        for _ in range(5):
            t = time.perf_counter()
            jax.block_until_ready(f(x, x))
            best = min(best, time.perf_counter() - t)
        res[name] = 2 * n ** 3 / best / 1e9
    return res


def _is_w(args) -> bool:
    return (args.preset, args.clients, args.steps, args.batch, args.seq) == (
        common.W["preset"], common.W["clients"], common.W["steps"], common.W["batch"], common.W["seq"])


def table(rows: list[dict]) -> str:
    head = f"{'devices':>7} {'chunk':>5} {'dtype':>8} {'matmul':>8} {'attn':>8} {'steps/s':>8} {'best':>6} {'MFU':>6} {'round s':>8} " \
           f"{'agg frac':>8} {'compile s':>9} {'RSS MB':>7}"
    lines = [head]
    for r in rows:
        agg = "n/a" if r["aggregation_fraction"] is None else f"{100 * r['aggregation_fraction']:.1f}%"
        lines.append(f"{r['devices']:>7} {r['chunk']:>5} {r['dtype']:>8} {r['matmul_dtype']:>8} {r['attention']:>8} {r['client_steps_per_s']:>8.2f} {r['client_steps_per_s_best']:>6.1f} "
                     f"{100 * r['mfu']:>5.1f}% {r['round_s']:>8.3f} {agg:>8} {r['compile_s']:>9.1f} "
                     f"{r['peak_rss_mb']:>7.0f}")
    if rows[0]["bf16_matmul_peak_gflops"] is not None:
        lines.append(f"peak bf16 matmul {rows[0]['bf16_matmul_peak_gflops']} GFLOP/s (MFU above is against "
                     f"the f32 peak)")
    lines.append(f"peak f32 matmul {rows[0]['matmul_peak_gflops']} GFLOP/s; "
                 f"{rows[0]['gflop_per_client_step']} GFLOP per client-step; platform {rows[0]['platform']}")
    return "\n".join(lines)


def main(argv=None):
    args = parse(argv)
    rows = run(args)
    if not args.quiet:
        print(table(rows))
    for r in rows:
        print(json.dumps(r))
    return rows


if __name__ == "__main__":
    main()
