"""Per-device memory of one round with every weight split over a model axis
(`run.model_parallel`: k devices hold one copy of the weights, FSDP-style).

Part 1 compiles the round of a preset on this host's 8 fake CPU devices for
k = 1, 2, 4 and reads XLA's figure per device (arguments + outputs - aliased +
temporaries) beside the plan's estimate: 4 / k federations x 2 clients, so each
device of the (8/k) x k mesh trains one client slot whatever k (what changes is
only how finely its weights are split).
Part 2 is `worldlm plan`'s estimate (no compilation) for the paper presets on
64 devices of 80 GB, 64 / k leaf federations x 2 clients (one federation per
row of the `clients` axis), with and without `model.remat`.

    .venv/bin/python benchmarks/model_axis.py --part 1 --preset small   # minutes
    .venv/bin/python benchmarks/model_axis.py --part 2                  # a minute
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import configure  # noqa: E402
from slot_layout import tree  # noqa: E402


def plan_of(preset: str, n_federations: int, devices: int, model_parallel: int, compile_: bool,
            platform: str | None = None, extra: tuple[str, ...] = ()):
    import dataclasses

    from worldlm_jax.config import apply_overrides, presets
    from worldlm_jax.run import memory_plan
    overrides = [f"run.devices={devices}", f"run.model_parallel={model_parallel}", *extra]
    config = dataclasses.replace(apply_overrides(presets.get(preset), overrides), tree=tree(n_federations))
    return memory_plan.plan(config, compile=compile_, device_memory_gib=80 if platform else None, platform=platform)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", type=int, choices=(0, 1, 2), default=0, help="0: both")
    ap.add_argument("--preset", default="small", help="part 1's preset")
    args = ap.parse_args()
    configure(devices=8)
    out = {"compiled": [], "estimated": []}
    GiB, MiB = 2 ** 30, 2 ** 20
    if args.part in (0, 1):
        print(f"Part 1: XLA's figure per device, {args.preset}, 4/k federations x 2 clients on 8 devices")
        print(f"{'model axis':>10} {'XLA MiB':>9} {'estimate MiB':>13} {'compile s':>10}")
        for k in (1, 2, 4):
            t0 = time.perf_counter()
            p = plan_of(args.preset, 4 // k, 8, k, True)
            seconds = time.perf_counter() - t0
            out["compiled"].append({"preset": args.preset, "model_parallel": k, "xla_bytes": p.xla["total"],
                                    "estimate_bytes": p.estimate, "seconds": round(seconds, 1)})
            print(f"{k:>10} {p.xla['total'] / MiB:>9.1f} {p.estimate / MiB:>13.1f} {seconds:>10.0f}", flush=True)
    if args.part in (0, 2):
        print("\nPart 2: the estimate per device on 64 devices of 80 GB, 64/k federations x 2 clients")
        print(f"{'preset':>11} {'k':>2} {'remat':>5} {'state':>7} {'params+opt':>10} {'activations':>11} "
              f"{'total GiB':>9} {'fits':>5}")
        for preset in ("paper-125m", "paper-400m", "paper-1b", "paper-3b"):
            for k in (1, 4, 8):
                for remat in (False, True):
                    p = plan_of(preset, 64 // k, 64, k, False, platform="gpu",
                                extra=("model.remat=true",) if remat else ())
                    c = p.components
                    row = {"preset": preset, "model_parallel": k, "remat": remat,
                           "state_gib": c["federation state"] / GiB,
                           "params_opt_gib": (c["parameters"] + c["optimizer states"]) / GiB,
                           "activations_gib": c["activations"] / GiB, "total_gib": p.estimate / GiB, "fits": p.fits}
                    out["estimated"].append(row)
                    print(f"{preset:>11} {k:>2} {str(remat):>5} {row['state_gib']:>7.2f} {row['params_opt_gib']:>10.2f} "
                          f"{row['activations_gib']:>11.2f} {row['total_gib']:>9.1f} {str(p.fits):>5}", flush=True)
    print(json.dumps({"benchmark": "model_axis", **out}))


if __name__ == "__main__":
    main()
