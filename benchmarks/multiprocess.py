"""One process with 2 devices vs 2 processes with 1 device each: round time, and the
share of a round spent in collectives.

    .venv/bin/python benchmarks/multiprocess.py                        # workloads tiny and w: 3-5 min on 2 cores
    .venv/bin/python benchmarks/multiprocess.py --workloads tiny --rounds 20

Both set-ups form the same global mesh of 2 CPU devices and run the same compiled
round (`experiment_lib.build_experiment`, `place_state`, `make_batch`, `_put`, the
strategy's `run_round`: what `worldlm train` runs); the only difference is that
(a) one process drives both devices, so the round's collectives are in-process,
while (b) two processes (`distributed.initialize` on localhost) drive one device
each, so the same collectives go through gloo over TCP. Every process gets one
compute thread per device (`--xla_cpu_multi_thread_eigen=false` unless `--eigen on`),
so on a 2-core machine both set-ups run one device per core: what differs is the
runtime (process boundary, gloo), not the compute.

The set-ups are started side by side and kept alive; after their warm-up rounds
(compilation) the launcher asks each in turn for one round, so machine noise hits
both alike (round time: median over --rounds; for (b) the slower process's time).

Collectives are measured with the JAX profiler (`jax.profiler.trace`, Perfetto
JSON): XLA:CPU's thunk executor records every thunk it runs, named by its HLO
instruction, with the device it ran on. Collective instructions (all-reduce,
all-gather, ... in the compiled round's HLO) are picked out by name, and per
device the union of their intervals is the time in collectives. It includes the
time a device waits inside a collective for its peer (the devices reach each
collective at different times); the `exchange` column counts, for every
collective, only the shortest of the devices' times (that of the device that
arrived last: close to the cost of the exchange itself). Profiled rounds are
extra rounds (tracing has a cost of its own, shown as `traced s`); shares are of
the traced round's wall time, median over --profile-rounds. Each set-up also
times one psum alone over the same mesh (a jitted chain of 50 dependent psums of
16 B and of 1 MiB per device): the cost of one collective, in-process vs gloo.

Prints a table, then one JSON line. Internally the script is also the worker:
`--worker` (one process of one set-up, driven over stdin/stdout).

Workloads: `tiny` is the `tiny` preset (WorldLM, 3 language federations x 2
clients, tiny model, seq 32, batch 2, 2 local steps: a round is mostly overhead);
`w` is the same tree with workload W's model and batches (model `w`, seq 128,
batch 8, 5 local steps, client lr 3e-4: a round is mostly compute).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import json
import os
import queue
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MARK = "@@mp "  # worker lines the launcher reads (gloo prints its own lines to stdout)
COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) "
                        r"((?:all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all|"
                        r"collective-broadcast|ragged-all-to-all)(?:-start|-done)?)\(")
BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
         "s8": 1, "u8": 1, "pred": 1}
SETUPS = (("1 process x 2 devices", 1, 2), ("2 processes x 1 device", 2, 1))


# ---------------------------------------------------------------------------- worker
def workload_config(name: str, sets=()):
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from worldlm_jax.config import apply_overrides, presets as configs
    from worldlm_jax.model import preset

    cfg = configs.tiny()
    if name == "w":
        cfg = dataclasses.replace(cfg, model=preset("w"),
                                  data=dataclasses.replace(cfg.data, seq_len=128, batch_size=8),
                                  policy=dataclasses.replace(cfg.policy, local_steps=5, client_lr=3e-4))
    elif name != "tiny":
        raise SystemExit(f"unknown workload {name!r}: tiny or w")
    return apply_overrides(cfg, list(sets))


def collectives_of(hlo_text: str) -> dict:
    """{instruction name: (opcode, bytes of its result)} for every collective of an HLO module."""
    out = {}
    for line in hlo_text.splitlines():
        m = COLLECTIVE.match(line)
        if m:
            size = sum(BYTES.get(t, 4) * _prod(dims) for t, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]",
                                                                               m.group(2)))
            out[m.group(1)] = (m.group(3), size)
    return out


def _prod(dims: str) -> int:
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n


def read_trace(trace_dir: str, module: str, collectives: dict) -> dict:
    """Per local device: the round's thunk span and its collectives, in order, from a Perfetto trace."""
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise RuntimeError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(paths[0]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    devices: dict = {}
    for e in events:
        a = e.get("args") or {}
        if e.get("ph") != "X" or a.get("hlo_module") != module:
            continue
        d = devices.setdefault(str(a.get("device_ordinal", "?")), {"start": float("inf"), "end": 0.0, "ops": [],
                                                                   "thunks": 0})
        ts, dur = float(e["ts"]), float(e.get("dur", 0.0))
        d["start"], d["end"], d["thunks"] = min(d["start"], ts), max(d["end"], ts + dur), d["thunks"] + 1
        op = a.get("hlo_op", e.get("name"))
        if op in collectives:
            d["ops"].append((ts, dur, op))
    out = {}
    for dev, d in devices.items():
        ops = sorted(d["ops"])
        union, last = 0.0, -float("inf")
        for ts, dur, _ in ops:  # union of intervals: concurrent thunks counted once
            lo, hi = max(ts, last), ts + dur
            if hi > lo:
                union += hi - lo
            last = max(last, hi)
        out[dev] = {"span_us": d["end"] - d["start"], "thunks": d["thunks"], "collective_us": union,
                    "ops": [[op, collectives[op][0], round(dur, 2)] for _, dur, op in ops],
                    "bytes": sum(collectives[op][1] for _, _, op in ops)}
    return out


def worker(args) -> None:
    def say(**rec):
        print(MARK + json.dumps(rec), flush=True)

    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from worldlm_jax.run import distributed
    if args.num_processes > 1:  # before JAX starts its backends
        distributed.initialize(f"localhost:{args.port}", args.num_processes, args.process_id, timeout_s=240)
    import jax
    import numpy as np

    from worldlm_jax.run import experiment as experiment_lib

    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    cfg = workload_config(args.workload, args.set)
    t0 = time.perf_counter()
    exp = experiment_lib.build_experiment(cfg)
    state = experiment_lib.place_state(exp, exp.strategy.init(exp.init_params))
    batch = experiment_lib._put(exp, experiment_lib.make_batch(exp, 0))  # one round's batch, reused: the round alone is timed
    key = jax.random.PRNGKey(1)

    def one_round():
        nonlocal state
        t = time.perf_counter()
        state, m = exp.strategy.run_round(state, batch, key)
        jax.block_until_ready((state, m))
        dt = time.perf_counter() - t
        loss = np.asarray(m["train_loss_sum"]) / np.maximum(np.asarray(m["train_clients"]), 1)
        return dt, float(np.mean(loss))

    first, loss0 = one_round()
    second, _ = one_round()  # a recompile would show here
    hlo = exp.strategy.run_round.lower(state, batch, key).compile().as_text()  # cached: compiles nothing
    module = re.search(r"HloModule (\S+?),", hlo).group(1)
    collectives = collectives_of(hlo)
    say(event="ready", setup_s=round(time.perf_counter() - t0, 2), first_round_s=round(first, 3),
        second_round_s=round(second, 3), first_round_loss=loss0, processes=jax.process_count(),
        devices=len(jax.devices()), local_devices=jax.local_device_count(), slots=exp.run_topology.n_slots,
        clients=exp.topology.n_clients, compiles=int(exp.strategy.run_round._cache_size()),
        collective_instructions=len(collectives),
        collective_opcodes=sorted({op for op, _ in collectives.values()}),
        collective_bytes_static=sum(b for _, b in collectives.values()),
        collective_instructions_under_1kib=sum(b <= 1024 for _, b in collectives.values()))
    chains = {size: latency_chain(exp.mesh, size) for size in LATENCY_SIZES}
    trace_root = tempfile.mkdtemp(prefix=f"mp_trace_{args.process_id}_")  # emptied after each trace
    n_traced = 0
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "round":
            dt, loss = one_round()
            say(event="round", s=dt, loss=loss)
        elif cmd == "profile":
            n_traced += 1
            where = os.path.join(trace_root, str(n_traced))
            with jax.profiler.trace(where, create_perfetto_trace=True):
                dt, loss = one_round()
            devices = read_trace(where, module, collectives)
            shutil.rmtree(where, ignore_errors=True)
            seen = {op for d in devices.values() for op, _, _ in d["ops"]}
            say(event="profile", s=dt, loss=loss, process=jax.process_index(), devices=devices,
                collective_instructions_seen=len(seen))
        elif cmd == "latency":
            say(event="latency", us={str(size): run(2) for size, run in chains.items()})
        elif cmd == "quit":
            break
    shutil.rmtree(trace_root, ignore_errors=True)
    say(event="bye", compiles=int(exp.strategy.run_round._cache_size()))


LATENCY_SIZES = (4, 262_144)  # float32 elements per device: 16 B (latency) and 1 MiB
LATENCY_CHAIN = 50


def latency_chain(mesh, size: int):
    """A jitted chain of LATENCY_CHAIN dependent psums of `size` float32 per device over
    the run's mesh; returns run(reps) -> the best microseconds per psum."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from worldlm_jax.engine import parallel

    def body(x):
        return jax.lax.fori_loop(0, LATENCY_CHAIN, lambda i, y: jax.lax.psum(y, parallel.AXIS) * 0.5, x)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(parallel.AXIS), out_specs=P(parallel.AXIS),
                              check_vma=False))
    shape = (mesh.size * size,)
    x = jax.make_array_from_callback(shape, NamedSharding(mesh, P(parallel.AXIS)),
                                     lambda index: np.ones(shape, np.float32)[index])
    jax.block_until_ready(f(x))

    def run(reps: int) -> float:
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(f(x))
            best = min(best, time.perf_counter() - t)
        return round(best / LATENCY_CHAIN * 1e6, 1)

    return run


# ---------------------------------------------------------------------------- launcher
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Proc:
    """One worker: its stdout lines with the marker go to a queue."""

    def __init__(self, argv, env, log_path):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.p = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                  text=True, bufsize=1)
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            if line.startswith(MARK):
                self.q.put(json.loads(line[len(MARK):]))
        self.q.put(None)

    def send(self, cmd: str):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()

    def get(self, timeout: float) -> dict:
        try:
            rec = self.q.get(timeout=timeout)
        except queue.Empty:
            rec = None
        if rec is None:
            self.log.flush()
            tail = open(self.log_path).read()[-3000:]
            raise RuntimeError(f"worker {' '.join(self.p.args[-8:])} gave no answer (exit code {self.p.poll()}):"
                               f"\n{tail}")
        return rec


def start_setup(workload: str, n_proc: int, devices: int, args, logdir: str) -> list[Proc]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    flags = [f"--xla_force_host_platform_device_count={devices}"]
    if args.eigen == "off":
        flags.append("--xla_cpu_multi_thread_eigen=false")
    env.update(XLA_FLAGS=" ".join(flags + args.xla_flags.split()), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    port = free_port()
    procs = []
    for i in range(n_proc):
        argv = [sys.executable, os.path.abspath(__file__), "--worker", "--workload", workload, "--port", str(port),
                "--num-processes", str(n_proc), "--process-id", str(i)]
        for s in args.set:
            argv += ["--set", s]
        if args.compilation_cache:
            argv += ["--compilation-cache", args.compilation_cache]
        procs.append(Proc(argv, env, os.path.join(logdir, f"{workload}_{n_proc}x{devices}_{i}.log")))
    return procs


def ask(procs: list[Proc], cmd: str, timeout: float) -> list[dict]:
    for p in procs:
        p.send(cmd)
    return [p.get(timeout) for p in procs]


def summarise_profiles(profiles: list[list[dict]]) -> dict:
    """profiles: per traced round, the answers of the set-up's processes."""
    shares, exchange, traced, ops, nbytes, seen = [], [], [], [], [], []
    per_opcode: dict = {}
    for answers in profiles:
        wall = max(a["s"] for a in answers) * 1e6
        devs = [d for a in answers for d in a["devices"].values()]
        shares.append(statistics.mean(d["collective_us"] for d in devs) / wall)
        # each collective's k-th run on every device; the device that arrived last waited least
        by_op, opcode_of = {}, {}
        for d in devs:
            count = {}
            for op, opcode, dur in d["ops"]:
                k = count[op] = count.get(op, -1) + 1
                by_op.setdefault((op, k), []).append(dur)
                opcode_of[op] = opcode
        matched = {key: min(v) for key, v in by_op.items() if len(v) == len(devs)}
        exchange.append(sum(matched.values()) / wall)
        for opcode in set(opcode_of.values()):
            times = [t for (op, _), t in matched.items() if opcode_of[op] == opcode]
            per_opcode.setdefault(opcode, []).append((len(times), sum(times) / wall))
        traced.append(wall / 1e6)
        ops.append(statistics.mean(len(d["ops"]) for d in devs))
        nbytes.append(statistics.mean(d["bytes"] for d in devs))
        seen.append(min(a["collective_instructions_seen"] for a in answers))
    med = lambda xs: float(statistics.median(xs))
    return {"collective_share": round(med(shares), 4), "collective_share_all": [round(x, 4) for x in shares],
            "exchange_share": round(med(exchange), 4), "traced_round_s": round(med(traced), 4),
            "collectives_per_round": med(ops), "collective_bytes_per_round": med(nbytes),
            "collective_instructions_seen": min(seen),
            "exchange_by_opcode": {k: {"per_round": med([n for n, _ in v]), "share": round(med([x for _, x in v]), 4)}
                                   for k, v in sorted(per_opcode.items())}}


def measure(workload: str, args, logdir: str) -> dict:
    t0 = time.perf_counter()
    setups = [(name, start_setup(workload, n, d, args, logdir)) for name, n, d in SETUPS]  # side by side
    try:
        ready = {name: [p.get(args.timeout) for p in procs] for name, procs in setups}
        times = {name: [] for name, _ in setups}
        losses = {name: [] for name, _ in setups}
        for r in range(args.rounds):  # interleaved, alternating which set-up goes first
            for name, procs in (setups if r % 2 == 0 else setups[::-1]):
                answers = ask(procs, "round", args.timeout)
                times[name].append(max(a["s"] for a in answers))
                losses[name].append(answers[0]["loss"])
        profiles = {name: [] for name, _ in setups}
        for _ in range(args.profile_rounds):
            for name, procs in setups:
                profiles[name].append(ask(procs, "profile", args.timeout))
        latency = {name: [] for name, _ in setups}
        for _ in range(3):
            for name, procs in setups:
                latency[name].append(ask(procs, "latency", args.timeout)[0]["us"])
        bye = {name: ask(procs, "quit", args.timeout) for name, procs in setups}
    finally:
        for _, procs in setups:
            for p in procs:
                try:
                    p.p.stdin.close()  # a worker still waiting for commands ends on EOF
                except OSError:
                    pass
            for p in procs:
                if p.p.poll() is None:
                    try:
                        p.p.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        p.p.kill()
    rows = []
    for (name, procs), (_, n, d) in zip(setups, SETUPS):
        r0 = ready[name][0]
        ts = times[name]
        rows.append({
            "setup": name, "processes": n, "devices_per_process": d, "devices": r0["devices"],
            "round_s": round(statistics.median(ts), 4), "round_s_best": round(min(ts), 4),
            "round_s_all": [round(t, 4) for t in ts],
            **summarise_profiles(profiles[name]),
            "psum_us": {size: float(statistics.median(x[size] for x in latency[name])) for size in latency[name][0]},
            "collective_instructions": r0["collective_instructions"], "collective_opcodes": r0["collective_opcodes"],
            "collective_instructions_under_1kib": r0["collective_instructions_under_1kib"],
            "compile_s": round(max(a["first_round_s"] for a in ready[name]) - statistics.median(ts), 1),
            "setup_s": max(a["setup_s"] for a in ready[name]),
            "compiles": max(a["compiles"] for a in bye[name]),
            "first_round_loss": r0["first_round_loss"], "losses": losses[name],
            "slots": r0["slots"], "clients": r0["clients"],
        })
    one, two = rows
    pairs = [b / a for a, b in zip(one["round_s_all"], two["round_s_all"])]
    return {"workload": workload, "rounds": args.rounds, "profile_rounds": args.profile_rounds,
            "ratio_2proc_over_1proc": round(two["round_s"] / one["round_s"], 3),
            "ratio_paired_median": round(statistics.median(pairs), 3),
            "first_round_loss_diff": abs(one["first_round_loss"] - two["first_round_loss"]),
            "setups": rows, "wall_s": round(time.perf_counter() - t0, 1)}


def table(results: list[dict]) -> str:
    head = (f"{'workload':>8} {'set-up':>23} {'round s':>8} {'best':>7} {'ratio':>6} {'in coll.':>8} "
            f"{'exchange':>8} {'traced s':>8} {'coll/round':>10} {'KB/round':>8} {'compile s':>9}")
    lines = [head]
    for res in results:
        for i, r in enumerate(res["setups"]):
            ratio = "1.00" if i == 0 else f"{res['ratio_2proc_over_1proc']:.2f}"
            lines.append(f"{res['workload']:>8} {r['setup']:>23} {r['round_s']:>8.4f} {r['round_s_best']:>7.4f} "
                         f"{ratio:>6} {100 * r['collective_share']:>7.1f}% {100 * r['exchange_share']:>7.1f}% "
                         f"{r['traced_round_s']:>8.4f} {r['collectives_per_round']:>10.0f} "
                         f"{r['collective_bytes_per_round'] / 1024:>8.1f} {r['compile_s']:>9.1f}")
        for r in res["setups"]:
            parts = [f"{k} {v['per_round']:.0f}/round {100 * v['share']:.1f}%" for k, v in r["exchange_by_opcode"].items()]
            lines.append(f"{'':>8} {r['setup']}: exchange by opcode: {', '.join(parts)}")
        lat = [f"{r['setup']}: {r['psum_us']['4']:.0f} us (16 B), {r['psum_us']['262144']:.0f} us (1 MiB)"
               for r in res["setups"]]
        lines.append(f"{'':>8} one psum over the mesh, alone: {'; '.join(lat)}")
        lines.append(f"{'':>8} paired ratio (median of per-round ratios) {res['ratio_paired_median']:.2f}; "
                     f"first-round loss difference {res['first_round_loss_diff']:.1e}")
    lines.append("in coll.: share of the (traced) round a device spends inside collectives, waiting for its peer "
                 "included; exchange: the last-arriving device's time only")
    return "\n".join(lines)


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="tiny,w", help="comma list: tiny, w")
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds per set-up (median reported)")
    ap.add_argument("--profile-rounds", type=int, default=3, help="traced rounds per set-up")
    ap.add_argument("--eigen", choices=("off", "on"), default="off",
                    help="XLA:CPU multi-threaded Eigen in every process (off: one compute thread per device)")
    ap.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for every process")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--compilation-cache", default="",
                    help="persistent XLA compilation cache directory for every process (reruns start faster)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds any worker answer may take")
    ap.add_argument("--logs", default="", help="directory for the workers' stderr (default: a temporary one)")
    ap.add_argument("--quiet", action="store_true", help="the JSON line only")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workload", default="tiny", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    logdir = args.logs or tempfile.mkdtemp(prefix="mp_bench_")
    os.makedirs(logdir, exist_ok=True)
    t0 = time.perf_counter()
    results = [measure(w, args, logdir) for w in args.workloads.split(",")]
    if not args.quiet:
        print(table(results))
    print(json.dumps({"benchmark": "multiprocess", "results": results, "eigen": args.eigen, "commit": _commit(),
                      "cpu_count": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2),
                      "wall_s": round(time.perf_counter() - t0, 1), "logs": logdir}))
    return results


if __name__ == "__main__":
    main()
