"""Per-device memory of one round, client slots spread over the devices or
federation-local (`run.slot_layout`), on trees of F leaf federations x 2 clients.

Part 1 compiles the round of the `small` preset on this host's fake CPU devices
and reads XLA's figure (arguments + outputs - aliased + temporaries per device).
Part 2 is `worldlm plan`'s estimate (no compilation) for the paper presets on
16 to 256 devices, planned for an 80 GB GPU: the federation working copy and the
aggregation sums per device, in model copies.
Part 3 compiles paper-125m itself, 64 federations x 2 clients on 64 fake CPU
devices (abstract inputs, nothing allocated), and reads XLA's figure beside the
plan's CPU estimate, with the attention kernel keeping its probabilities for the
backward and recomputing them (`model.attention=recompute`).

    .venv/bin/python benchmarks/slot_layout.py            # parts 1 and 2, a table and a JSON line
    .venv/bin/python benchmarks/slot_layout.py --part 2   # the estimate only (seconds)
    .venv/bin/python benchmarks/slot_layout.py --part 3   # paper-125m on 64 fake devices (a few minutes)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import configure  # noqa: E402


def tree(n_federations: int) -> dict:
    return {"name": "root", "children": [{"name": f"f{i}", "clients": 2, "sources": ["man_en"]}
                                         for i in range(n_federations)]}


def plan_of(preset: str, n_federations: int, devices: int, layout: str, compile_: bool, algorithm: str | None = None,
            platform: str | None = None, extra: tuple[str, ...] = ()):
    import dataclasses

    from worldlm_jax.config import apply_overrides, presets
    from worldlm_jax.run import memory_plan
    overrides = [f"run.devices={devices}", f"run.slot_layout={layout}", *extra]
    if algorithm:
        overrides.append(f"algorithm.name={algorithm}")
    config = dataclasses.replace(apply_overrides(presets.get(preset), overrides), tree=tree(n_federations))
    return memory_plan.plan(config, compile=compile_, device_memory_gib=80 if platform else None, platform=platform)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", type=int, choices=(0, 1, 2, 3), default=0, help="0: parts 1 and 2")
    args = ap.parse_args()
    configure(devices=64 if args.part == 3 else 8)
    out = {"compiled": [], "estimated": []}
    MiB, GiB = 2 ** 20, 2 ** 30
    if args.part in (0, 1):
        print("Part 1: XLA's figure per device, small preset, F federations x 2 clients")
        print(f"{'algorithm':>10} {'F':>3} {'devices':>7} {'spread MiB':>11} {'local MiB':>10} {'local/spread':>12}")
        for algorithm in ("hierfavg", "worldlm"):
            for F, M in ((16, 2), (16, 4), (16, 8), (4, 8)):
                row = {}
                for layout in ("spread", "local"):
                    row[layout] = plan_of("small", F, M, layout, True, algorithm).xla["total"]
                out["compiled"].append({"algorithm": algorithm, "federations": F, "devices": M, **row})
                print(f"{algorithm:>10} {F:>3} {M:>7} {row['spread'] / MiB:>11.1f} {row['local'] / MiB:>10.1f} "
                      f"{row['local'] / row['spread']:>12.2f}", flush=True)
    if args.part in (0, 2):
        print("\nPart 2: the estimate per device (planned for an 80 GB GPU), F federations x 2 clients on F devices")
        print(f"{'preset':>11} {'F':>4} {'layout':>7} {'working copy':>13} {'sums':>6} {'total GiB':>10} {'fits':>5}")
        for preset in ("paper-125m", "paper-400m"):
            for F in (16, 64, 256):
                for layout in ("spread", "local"):
                    p = plan_of(preset, F, F, layout, False, platform="gpu")
                    model = p.n_params * 4
                    work, sums = p.components["federation working copy"], p.components["aggregation sums"]
                    out["estimated"].append({"preset": preset, "federations": F, "devices": F, "layout": layout,
                                             "working_copy_models": work / model, "sums_models": sums / model,
                                             "total_gib": p.estimate / GiB, "fits": p.fits})
                    print(f"{preset:>11} {F:>4} {layout:>7} {work / model:>12.1f}x {sums / model:>5.1f}x "
                          f"{p.estimate / GiB:>10.1f} {str(p.fits):>5}", flush=True)
    if args.part == 3:
        print("Part 3: XLA's figure per device, paper-125m, 64 federations x 2 clients on 64 devices, WorldLM, local")
        print(f"{'attention':>10} {'XLA GiB':>8} {'estimate GiB':>13} {'estimate/XLA':>13}")
        out["paper"] = []
        for attention in ("explicit", "recompute"):
            p = plan_of("paper-125m", 64, 64, "local", True, extra=(f"model.attention={attention}",))
            out["paper"].append({"attention": attention, "xla_bytes": p.xla["total"], "estimate_bytes": p.estimate,
                                 "components": p.components})
            print(f"{attention:>10} {p.xla['total'] / GiB:>8.2f} {p.estimate / GiB:>13.2f} "
                  f"{p.estimate / p.xla['total']:>13.2f}", flush=True)
    print(json.dumps({"benchmark": "slot_layout", **out}))


if __name__ == "__main__":
    main()
