"""What the persistent compilation cache saves a launch: the same `worldlm train`
command run three times as separate processes, side by side in one invocation:
with the cache off, with an empty cache (compiles and writes it), and with the
cache the second launch wrote (loads every program). Wall time per launch, the
ratios, then one JSON line.

    .venv/bin/python benchmarks/compile_cache.py                    # tiny, 2 rounds: about 1 min
    .venv/bin/python benchmarks/compile_cache.py --config demo --rounds 1

JAX caches a program that took at least `--min-compile-s` to compile (its
default is 1 s; 0 caches every small jit too, as the test suite does). The
launches train the same numbers: the cache holds the executables XLA would build.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def launch(config: str, rounds: int, workdir: str, cache: str, min_compile_s: float) -> float:
    env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=str(min_compile_s))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, "-m", "worldlm_jax.cli", "train", "--config", config, "--set", f"run.rounds={rounds}",
           "--set", f"run.compilation_cache={cache}", "--workdir", workdir, "--quiet", "--skip-memory-check"]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-compile-s", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "xla")
        run = lambda name, setting: launch(args.config, args.rounds, os.path.join(tmp, name), setting,
                                           args.min_compile_s)
        off, cold, warm = run("off", ""), run("cold", cache), run("warm", cache)
        entries = len(os.listdir(cache))
    print(f"{args.config}, {args.rounds} rounds, programs cached from {args.min_compile_s} s of compile time up")
    print("| launch | wall s | / cache off |\n|---|---|---|")
    for name, seconds in (("cache off", off), ("empty cache (compiles, writes)", cold), ("warm cache (loads)", warm)):
        print(f"| {name} | {seconds:.1f} | {seconds / off:.2f} |")
    print(json.dumps({"benchmark": "compile_cache", "config": args.config, "rounds": args.rounds,
                      "min_compile_s": args.min_compile_s, "off_s": round(off, 2), "cold_s": round(cold, 2),
                      "warm_s": round(warm, 2), "warm_over_off": round(warm / off, 3), "entries": entries}))


if __name__ == "__main__":
    main()
