"""Grid sweeps: the cartesian product of `key.path=v1,v2,...` axes, one run dir per point.

`parse_grid`, `grid_points` and `point_name` are pure functions; `run_sweep`
trains the points one after the other in this process. A point whose
`summary.json` says it finished (all configured rounds, or stopped by a
callback) is skipped; an unfinished one is resumed from its checkpoint
(`train.train` resumes by itself), so re-running the same command after a crash
or Ctrl-C continues the sweep. A point a callback stops does not stop the sweep.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from typing import Callable, Sequence

from worldlm_jax.config import Config, ConfigError, apply_overrides
from worldlm_jax.run.dirs import SUMMARY_FILE, check_resumable, finished_summary

_SAFE = re.compile(r"[^A-Za-z0-9._+-]")
_MAX_NAME = 120



# ---- overrides ---------------------------------------------------------------------
_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def normalize_value(raw: str) -> str:
    """'1e-3' -> '0.001'. PyYAML (YAML 1.1) reads 1e-3 as a *string* (it wants
    1.0e-3), which a float field then rejects; command-line users type 1e-3."""
    text = raw.strip()
    return yaml_float(float(text)) if _SCIENTIFIC.match(text) else raw


def yaml_float(value: float) -> str:
    """A float as text that PyYAML reads back as that float: 1e-06 -> 1.0e-06."""
    text = repr(float(value))
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return text


def normalize_override(assignment: str) -> str:
    if "=" not in assignment:
        return assignment
    key, raw = assignment.split("=", 1)
    return f"{key}={normalize_value(raw)}"


def point_config(base: Config, assignments: Sequence[tuple[str, str]]) -> Config:
    """`base` with one grid point's assignments applied."""
    return apply_overrides(base, [f"{k}={normalize_value(v)}" for k, v in assignments])


# ---- grid ------------------------------------------------------------------------
def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """['a.b=1,2', 'c=x'] -> [('a.b', ['1', '2']), ('c', ['x'])].

    Values stay raw strings (each is parsed as YAML when applied, like --set).
    Commas inside brackets do not split: `algorithm.key_layers.blocks=[0,1],[2]`
    has the two values `[0,1]` and `[2]`.
    """
    grid: list[tuple[str, list[str]]] = []
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"--grid {spec!r} must look like key.path=v1,v2,...")
        key, raw = (s.strip() for s in spec.split("=", 1))
        if not key:
            raise ConfigError(f"--grid {spec!r} has no key before '='")
        if any(key == k for k, _ in grid):
            raise ConfigError(f"--grid key '{key}' is given twice; list all its values in one --grid")
        values = _split_top_level(raw)
        if not values or any(v == "" for v in values):
            raise ConfigError(f"--grid {spec!r} has an empty value; expected key.path=v1,v2,...")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {spec!r} repeats a value")
        grid.append((key, values))
    return grid


def _split_top_level(raw: str) -> list[str]:
    values, depth, current = [], 0, []
    for ch in raw:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    values.append("".join(current).strip())
    return values


def grid_points(grid: Sequence[tuple[str, Sequence[str]]]) -> list[list[tuple[str, str]]]:
    """Cartesian product, the last axis varying fastest: [[(key, value), ...], ...]."""
    if not grid:
        return [[]]
    keys = [k for k, _ in grid]
    return [list(zip(keys, combo)) for combo in itertools.product(*[v for _, v in grid])]


def point_name(assignments: Sequence[tuple[str, str]]) -> str:
    """A filesystem-safe directory name: 'run.seed=1__policy.tau=0.5'.

    Characters outside [A-Za-z0-9._+-] become '_'; when that (or truncation)
    loses information a short hash of the exact assignments keeps names unique.
    """
    if not assignments:
        return "base"
    exact = "__".join(f"{k}={v}" for k, v in assignments)
    safe = "__".join(f"{_SAFE.sub('_', k)}={_SAFE.sub('_', v)}" for k, v in assignments)
    if safe != exact or len(safe) > _MAX_NAME:
        digest = hashlib.sha1(exact.encode()).hexdigest()[:8]
        safe = f"{safe[:_MAX_NAME]}-{digest}"
    return safe


# ---- config comparison (resume safety) ---------------------------------------------
# ---- running ----------------------------------------------------------------------
def run_sweep(base: Config, grid: Sequence[tuple[str, Sequence[str]]], workdir: str,
              train_fn: Callable[..., dict] | None = None, quiet: bool = False,
              progress: bool = True, log: Callable[[str], None] = print) -> list[dict]:
    """Train every grid point of `base` under `workdir/<point_name>`; write sweep.md/json.

    Every point's config is built (and checked) before the first one trains, so
    a bad value fails at once. Returns one row per point (in grid order).
    """
    keys = [k for k, _ in grid]
    return run_points(base, grid_points(grid), workdir, train_fn=train_fn, quiet=quiet, progress=progress,
                      log=log, write=lambda rows: write_tables(workdir, keys, rows))


def run_points(base: Config, points: Sequence[Sequence[tuple[str, str]]], workdir: str,
               names: Sequence[str] | None = None, train_fn: Callable[..., dict] | None = None,
               quiet: bool = False, progress: bool = True, log: Callable[[str], None] = print,
               write: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """Train each point (a list of overrides of `base`) under `workdir/<name>` (names
    default to `point_name`), one after the other, skipping finished ones; `write(rows)`
    after every point, so a crash keeps what finished. Stops at an interrupted point."""
    if train_fn is None:
        from worldlm_jax.run import training as train_lib
        train_fn = train_lib.train
    names = list(names) if names is not None else [point_name(a) for a in points]
    plans = []
    for assignments, name in zip(points, names):
        config = point_config(base, assignments)
        run_dir = os.path.join(workdir, name)
        check_resumable(run_dir, config)
        plans.append((assignments, config, run_dir))
    if len(set(names)) != len(names):
        raise ConfigError("two grid points map to the same directory name; use distinct values")
    os.makedirs(workdir, exist_ok=True)
    rows: list[dict] = []
    for i, (assignments, config, run_dir) in enumerate(plans, start=1):
        name = os.path.basename(run_dir)
        summary = finished_summary(run_dir, config.run.rounds)
        if summary is not None:
            log(f"[{i}/{len(plans)}] {name}: finished earlier, skipped")
            status = "skipped"
        else:
            log(f"[{i}/{len(plans)}] {name}: training ({config.run.rounds} rounds) in {run_dir}")
            summary = train_fn(config, run_dir, quiet=quiet, progress=progress)
            status = _status(summary)
            if status == "stopped":  # the point is finished; the sweep goes on
                log(f"[{i}/{len(plans)}] {name}: stopped by {summary['stopped_by']} after "
                    f"{summary.get('rounds_completed')} rounds")
        rows.append(_row(name, dict(assignments), run_dir, status, summary))
        write(rows)
        if status == "interrupted":
            log("sweep interrupted; run the same command again to resume")
            break
    return rows


def run_vectorized(base: Config, grid: Sequence[tuple[str, Sequence[str]]], workdir: str,
                   sweep_devices: int = 0, log: Callable[[str], None] = print) -> list[dict]:
    """All grid points as one compiled program (`vectorized.run`), spread over
    `sweep_devices` groups of devices (0 = `vectorized.choose_sweep_devices`).

    Writes what `run_sweep` writes: DIR/<point_name>/ with config.yaml,
    metrics.jsonl, summary.json and plots for every point, and DIR/sweep.md and
    sweep.json, so `worldlm report DIR` reads it. The stacked states are
    checkpointed under DIR/checkpoints (every run.checkpoint_every rounds and at
    the end): the same command run again after a kill resumes from the latest.

    Each point runs on n / S of the n devices (`run_sweep` runs each on all n),
    so its clients' sums are split over other devices: a point equals its
    sequential run up to float summation order, not bit for bit (README, sweeps).
    Each point draws its own data, client sample and token windows from its own
    run.seed, as its sequential run does (`vectorized` module docstring).
    """
    from worldlm_jax.sweeps import vectorized

    points = grid_points(grid)
    names = [point_name(a) for a in points]
    if len(set(names)) != len(names):
        raise ConfigError("two grid points map to the same directory name; use distinct values")
    run_dirs = [os.path.join(workdir, name) for name in names]
    os.makedirs(workdir, exist_ok=True)
    try:
        _, _, compiles = vectorized.run([point_config(base, a) for a in points], sweep_devices=sweep_devices,
                                        workdirs=run_dirs, log=log, checkpoint_dir=workdir)
    except ValueError as e:
        raise ConfigError(f"--vectorized: {e}") from e
    from worldlm_jax.run import distributed
    if not distributed.is_primary():  # only process 0 wrote the points' summaries
        return []
    rows = []
    for name, a, run_dir in zip(names, points, run_dirs):
        with open(os.path.join(run_dir, SUMMARY_FILE)) as f:
            summary = json.load(f)
        rows.append(_row(name, dict(a), run_dir, f"vectorized ({compiles} compile)", summary))
    write_tables(workdir, [k for k, _ in grid], rows)
    return rows


def _status(summary: dict) -> str:
    """'trained', 'stopped' (by a callback: finished, see `finished_summary`) or
    'interrupted' (Ctrl-C, the privacy budget: the sweep ends there, to be resumed)."""
    if summary.get("stopped_by"):
        return "stopped"
    return "interrupted" if summary.get("interrupted") else "trained"


def _row(name: str, assignments: dict, run_dir: str, status: str, summary: dict) -> dict:
    ev = summary.get("eval", {})
    return {"name": name, "assignments": assignments, "workdir": run_dir, "status": status,
            "rounds_completed": summary.get("rounds_completed"), "perplexity": ev.get("perplexity"),
            "bits_per_byte": ev.get("bits_per_byte"), "wall_seconds": summary.get("wall_seconds"),
            "bytes_communicated": summary.get("bytes_communicated", {}), "sim_hours": summary.get("sim_hours"),
            "per_federation": ev.get("per_federation", {})}


def markdown_table(keys: Sequence[str], rows: Sequence[dict]) -> str:
    header = list(keys) + ["perplexity", "bits/byte", "wall s", "status", "run dir"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for row in rows:
        cells = [str(row["assignments"].get(k, "")) for k in keys]
        cells += [_num(row["perplexity"], 3), _num(row["bits_per_byte"], 4), _num(row["wall_seconds"], 1),
                  row["status"], row["name"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _num(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def write_tables(workdir: str, keys: Sequence[str], rows: Sequence[dict]) -> None:
    from worldlm_jax.run import distributed
    if not distributed.is_primary():  # multi-process sweeps: process 0 writes
        return
    with open(os.path.join(workdir, "sweep.md"), "w") as f:
        f.write("# Sweep\n\n" + markdown_table(keys, rows))
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
        json.dump({"grid": list(keys), "points": list(rows)}, f, indent=2)
