"""Compare runs: markdown tables, learning curves and a sweep plot.

`write_report(run_dirs, out_dir, group_seeds=True)` reads each run's summary.json,
metrics.jsonl and config.yaml and writes, into `out_dir`:

- report.md    warnings (unfinished or interrupted runs, unequal round counts), one row
               per run (algorithm, rounds, perplexity, bits/byte, ratio to the first
               run, one column per federation, then one column per config field whose
               value differs between the runs) and, when some runs differ only in
               `run.seed`, one row per seed group: the final perplexity's mean, sample
               standard deviation (n - 1), n, min and max over its seeds;
- report.json  the same: "runs", "groups" (each with its per-seed values),
               "differing_fields", "group_fields", "warnings", "curves" (per run: every
               round's train_loss and every evaluation's perplexity, each at its round,
               cumulative tokens and cumulative bytes communicated) and "sweep" (the
               points of sweep.png, or null);
- curves.png   training loss (top) and evaluation perplexity (bottom) against rounds,
               cumulative tokens, bytes communicated and simulated hours: one line per seed
               group (the mean over its seeds, a band from its lowest to its highest
               seed), so one per run with group_seeds=False (`--no-group`);
- sweep.png    final perplexity (mean, min-max bar over seeds) against the one config
               field that differs between groups, when exactly one does, it is numeric
               and it is not run.seed (log x when its values span 10x or more);
- perplexity_<run>.png  per-federation perplexity over rounds, per evaluated run.

Config fields are config.yaml flattened to dotted keys. A list of named dicts (the
tree's children) is keyed by name, without the `children` level: `tree.en.policy.tau`,
`tree.germanic.de.clients`; another list of dicts by index (`run.callbacks.0.name`); a
list of scalars stays one value (`tree.en.sources`).

Seed groups are runs whose fields are equal except `run.seed`, in first-seen order. A
group is labelled by the name its runs share (a sweep point's `run.seed=N` part dropped,
otherwise their common prefix) and its seeds: `policy.client_lr=0.001 (seeds 0,1)`.
"""
from __future__ import annotations

import collections
import json
import os
import re
from typing import Sequence

import numpy as np
import yaml

from worldlm_jax.outputs import metrics as metrics_lib, plots

SEED_FIELD = "run.seed"
CONFIG_FILE = "config.yaml"


class ReportError(ValueError):
    """A run dir that cannot be reported on; the message names it and the fix."""


# ---- reading run dirs ----------------------------------------------------------------
def load_run(run_dir: str) -> dict:
    """{'label', 'dir', 'summary', 'records', 'finished', 'config'} of one run dir.

    A run without summary.json (still training, or killed) is reported from
    its last evaluated metrics record and marked unfinished. 'config' is the
    flattened config.yaml, None when the run dir has none.
    """
    if not os.path.isdir(run_dir):
        raise ReportError(f"{run_dir}: not a directory")
    metrics_path = os.path.join(run_dir, metrics_lib.METRICS_FILE)
    records = metrics_lib.read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    config = read_flat_config(run_dir)
    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary, finished = json.load(f), True
    else:
        evaluated = [r for r in records if "eval" in r]
        if not evaluated:
            raise ReportError(f"{run_dir}: no summary.json and no evaluated round in metrics.jsonl; "
                              "is it a worldlm run dir? (finish it with: worldlm train --workdir "
                              f"{run_dir} --config {os.path.join(run_dir, CONFIG_FILE)})")
        last = evaluated[-1]
        summary = {"algorithm": str((config or {}).get("algorithm.name", "?")),
                   "rounds_completed": last["round"] + 1, "eval": last["eval"], "wall_seconds": None}
        finished = False
    return {"label": os.path.basename(os.path.normpath(run_dir)) or run_dir, "dir": run_dir,
            "summary": summary, "records": records, "finished": finished, "config": config}


def read_flat_config(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return flatten_config(yaml.safe_load(f) or {})
    except yaml.YAMLError as e:
        raise ReportError(f"{path}: not readable as YAML ({e})") from e


def flatten_config(value, prefix: str = "") -> dict:
    """Nested config -> {dotted key: leaf value} (see the module docstring for lists)."""
    if isinstance(value, dict) and value:
        out = {}
        for key, item in value.items():
            out.update(flatten_config(item, _join(prefix, str(key))))
        return out
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        names = [item.get("name") for item in value]
        if all(isinstance(n, str) for n in names) and len(set(names)) == len(names):
            # a tree reads as tree.en.policy.tau, not tree.children.en.policy.tau
            parent = prefix.rpartition(".")[0] if prefix.rpartition(".")[2] == "children" else prefix
            out = {}
            for name, item in zip(names, value):
                out.update(flatten_config({k: v for k, v in item.items() if k != "name"},
                                          _join(parent, name)))
            return out
        out = {}
        for i, item in enumerate(value):
            out.update(flatten_config(item, _join(prefix, str(i))))
        return out
    return {prefix: value}  # a scalar, a list of scalars, or an empty dict or list


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def expand_run_dirs(run_dirs: Sequence[str]) -> list[str]:
    """A sweep dir (holding sweep.json, no summary.json) stands for its points, in grid order."""
    out = []
    for d in run_dirs:
        sweep_json = os.path.join(d, "sweep.json")
        if os.path.exists(sweep_json) and not os.path.exists(os.path.join(d, "summary.json")):
            with open(sweep_json) as f:
                out += [os.path.join(d, p["name"]) for p in json.load(f)["points"]]
        else:
            out.append(d)
    return out


def _unique_labels(items: list[dict]) -> None:
    seen: dict[str, int] = {}
    for item in items:
        label = item["label"]
        if label in seen:
            seen[label] += 1
            item["label"] = f"{label}#{seen[label]}"
        else:
            seen[label] = 1


# ---- config fields and seed groups -----------------------------------------------------
def _signature(value) -> str:
    """A comparable text for a config value (lists and dicts included)."""
    return json.dumps(value, sort_keys=True, default=str)


def differing_fields(configs: Sequence[dict | None], ignore: Sequence[str] = ()) -> list[str]:
    """Dotted keys whose value (or presence) differs between the known configs, in config order."""
    known = [c for c in configs if c is not None]
    keys = dict.fromkeys(k for c in known for k in c)
    return [k for k in keys if k not in ignore
            and len({_signature(c[k]) if k in c else None for c in known}) > 1]


def group_runs(runs: Sequence[dict], group_seeds: bool = True) -> list[list[dict]]:
    """Runs whose configs are equal except run.seed, grouped in first-seen order.

    A run without config.yaml stands alone: nothing says which runs it repeats.
    """
    if not group_seeds:
        return [[run] for run in runs]
    groups: dict[str, list[dict]] = {}
    for i, run in enumerate(runs):
        config = run["config"]
        key = (f"no config #{i}" if config is None
               else _signature({k: v for k, v in config.items() if k != SEED_FIELD}))
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def group_label(members: Sequence[dict]) -> str:
    if len(members) == 1:
        return members[0]["label"]
    names = {"__".join(part for part in m["label"].split("__") if not part.startswith(SEED_FIELD + "="))
             for m in members}  # sweep point names: run.seed=0__policy.tau=0.5
    shared = names.pop() if len(names) == 1 else os.path.commonprefix([m["label"] for m in members])
    shared = shared.rstrip("-_.=+ ")
    seeds = ",".join(_value_cell(m["config"].get(SEED_FIELD)) for m in members)
    return f"{shared} (seeds {seeds})" if shared else f"seeds {seeds}"


def spread(values: Sequence[float | None]) -> dict:
    """mean, sample std (n - 1; None for one value), min, max and n of the known values."""
    known = np.asarray([v for v in values if v is not None], dtype=float)
    if not len(known):
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(known.mean()), "std": float(known.std(ddof=1)) if len(known) > 1 else None,
            "min": float(known.min()), "max": float(known.max()), "n": int(len(known))}


def summarize_group(members: Sequence[dict], fields: Sequence[str]) -> dict:
    per_seed = [{"run": m["label"], "seed": (m["config"] or {}).get(SEED_FIELD),
                 "rounds": m["summary"].get("rounds_completed"),
                 "perplexity": m["summary"]["eval"]["perplexity"],
                 "bits_per_byte": m["summary"]["eval"].get("bits_per_byte")} for m in members]
    config = members[0]["config"] or {}
    return {"group": group_label(members), "n": len(members), "runs": [m["label"] for m in members],
            "seeds": [s["seed"] for s in per_seed],
            "perplexity": spread([s["perplexity"] for s in per_seed]),
            "bits_per_byte": spread([s["bits_per_byte"] for s in per_seed]),
            "per_seed": per_seed, "config": {f: config.get(f) for f in fields}}


# ---- warnings ---------------------------------------------------------------------------
def run_warnings(runs: Sequence[dict]) -> list[str]:
    """One line per run that is not compared like the others: unfinished, interrupted,
    without config.yaml, or at another round count than most runs."""
    out = []
    for run in runs:
        s = run["summary"]
        if not run["finished"]:
            out.append(f"{run['label']}: unfinished (no summary.json), reported from its evaluation after "
                       f"round {s['rounds_completed'] - 1}")
        elif s.get("interrupted"):
            out.append(f"{run['label']}: interrupted after {s.get('rounds_completed')} rounds")
        if run["config"] is None:
            out.append(f"{run['label']}: no {CONFIG_FILE}; its config fields are unknown and it is not grouped")
    counts = [run["summary"].get("rounds_completed") for run in runs]
    if len(set(counts)) > 1:
        tally = collections.Counter(counts)
        usual = max(tally, key=lambda c: (tally[c], c if c is not None else -1))  # ties: the longer run
        for run, count in zip(runs, counts):
            if count != usual:
                out.append(f"{run['label']}: {count} rounds completed, {usual} in {tally[usual]} of {len(runs)} "
                           "runs: its numbers are from another point of training")
    return out


# ---- curves -------------------------------------------------------------------------------
def run_curves(records: Sequence[dict]) -> dict:
    """{'train_loss': curve, 'perplexity': curve} of one run's metrics records; a curve is
    {'round', 'tokens', 'bytes_communicated', 'sim_hours', <its own key>: values}, every
    round's train_loss and every evaluation, at the tokens, bytes and simulated hours
    (the network clock's, docs/network.md) spent up to that round.

    A round written twice (a resumed run's) counts once, its last record.
    """
    trained = _last_per_round(r for r in records if "eval" not in r)
    evaluated = _last_per_round(r for r in records if "eval" in r)
    rounds = sorted(trained)
    tokens = dict(zip(rounds, _cumulative([trained[r].get("tokens") for r in rounds])))
    sent = dict(zip(rounds, _cumulative([(trained[r].get("bytes_communicated") or {}).get("total")
                                         for r in rounds])))
    seconds = _cumulative([trained[r].get("sim_seconds") for r in rounds])
    hours = dict(zip(rounds, [None if s is None else s / 3600 for s in seconds]))

    def curve(at: Sequence[int], key: str, values: list) -> dict:
        return {"round": list(at), "tokens": [tokens.get(r) for r in at],
                "bytes_communicated": [sent.get(r) for r in at], "sim_hours": [hours.get(r) for r in at],
                key: values}

    return {"train_loss": curve(rounds, "train_loss", [trained[r].get("train_loss") for r in rounds]),
            "perplexity": curve(sorted(evaluated), "perplexity",
                                [evaluated[r]["eval"].get("perplexity") for r in sorted(evaluated)])}


def _last_per_round(records) -> dict[int, dict]:
    return {r["round"]: r for r in records if "round" in r}


def _cumulative(values: Sequence) -> list:
    """Running sums; None from the first unknown value on (an old run without the key)."""
    out, total = [], 0
    for value in values:
        total = None if total is None or value is None else total + value
        out.append(total)
    return out


def mean_curve(curves: Sequence[dict], key: str) -> dict:
    """A group's line: the mean over its runs at the rounds all of them have, with the
    lowest and highest run as 'low' and 'high'; one run's curve as it is."""
    if len(curves) == 1:
        return curves[0]
    common = sorted(set.intersection(*(set(c["round"]) for c in curves)))
    index = [{r: i for i, r in enumerate(c["round"])} for c in curves]

    def column(name: str) -> np.ndarray:  # rounds x runs
        return np.asarray([[np.nan if c[name][at[r]] is None else c[name][at[r]]
                            for c, at in zip(curves, index)] for r in common],
                          dtype=float).reshape(len(common), len(curves))

    values = column(key)
    return {"round": common, "tokens": column("tokens").mean(axis=1).tolist(),
            "bytes_communicated": column("bytes_communicated").mean(axis=1).tolist(),
            "sim_hours": column("sim_hours").mean(axis=1).tolist(),
            key: values.mean(axis=1).tolist(), "low": values.min(axis=1).tolist(),
            "high": values.max(axis=1).tolist()}


# ---- the sweep plot ------------------------------------------------------------------------
def sweep_points(groups: Sequence[dict], fields: Sequence[str]) -> dict | None:
    """{'field', 'points'} when exactly one field differs between groups and every group's
    value of it is a number; else None (nothing one-dimensional to plot). Seeds are
    repeats, not a swept value: runs that differ only in run.seed get no plot."""
    if len(fields) != 1 or fields[0] == SEED_FIELD:
        return None
    field = fields[0]
    values = [g["config"].get(field) for g in groups]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    return {"field": field, "points": [
        {"value": v, "group": g["group"], "n": g["n"], "mean": g["perplexity"]["mean"],
         "low": g["perplexity"]["min"], "high": g["perplexity"]["max"]} for v, g in zip(values, groups)]}


# ---- markdown -----------------------------------------------------------------------------
def report_rows(runs: Sequence[dict], fields: Sequence[str] = ()) -> tuple[list[str], list[dict]]:
    """(federation names in first-seen order, one row dict per run)."""
    federations: list[str] = []
    for run in runs:
        for name in run["summary"]["eval"].get("per_federation", {}):
            if name not in federations:
                federations.append(name)
    base = runs[0]["summary"]["eval"]["perplexity"]
    rows = []
    for run in runs:
        s = run["summary"]
        ev = s["eval"]
        rows.append({"run": run["label"], "dir": run["dir"], "algorithm": s.get("algorithm", "?"),
                     "rounds": s.get("rounds_completed"), "finished": run["finished"],
                     "perplexity": ev["perplexity"], "bits_per_byte": ev.get("bits_per_byte"),
                     "ratio_to_first": ev["perplexity"] / base if base else None,
                     "per_federation": dict(ev.get("per_federation", {})),
                     "wall_seconds": s.get("wall_seconds"),
                     "config": {f: _config_value(run["config"], f) for f in fields}})
    return federations, rows


def _config_value(config: dict | None, field: str):
    return None if config is None else config.get(field)


def markdown(federations: Sequence[str], rows: Sequence[dict], fields: Sequence[str] = ()) -> str:
    header = ["run", "algorithm", "rounds", "perplexity", "bits/byte", "ppl / first"]
    header += [f"ppl {name}" for name in federations] + list(fields)
    lines = _table_head(header)
    for row in rows:
        rounds = f"{row['rounds']}" + ("" if row["finished"] else " (unfinished)")
        cells = [row["run"], row["algorithm"], rounds, _fmt(row["perplexity"], 3),
                 _fmt(row["bits_per_byte"], 4), _fmt(row["ratio_to_first"], 3)]
        cells += [_fmt(row["per_federation"].get(name), 3) for name in federations]
        cells += [_value_cell(row["config"].get(f)) for f in fields]
        lines.append(_table_row(cells))
    return "\n".join(lines) + "\n"


def groups_markdown(groups: Sequence[dict], fields: Sequence[str]) -> str:
    header = ["group", "n", "seeds", "perplexity mean", "std", "min", "max", "bits/byte mean", *fields]
    lines = _table_head(header)
    for g in groups:
        ppl = g["perplexity"]
        cells = [g["group"], str(g["n"]), ",".join(_value_cell(s) for s in g["seeds"]), _fmt(ppl["mean"], 3),
                 _fmt(ppl["std"], 3), _fmt(ppl["min"], 3), _fmt(ppl["max"], 3),
                 _fmt(g["bits_per_byte"]["mean"], 4)]
        cells += [_value_cell(g["config"].get(f)) for f in fields]
        lines.append(_table_row(cells))
    return "\n".join(lines) + "\n"


def _table_head(header: Sequence[str]) -> list[str]:
    return [_table_row(header), "|" + "|".join(["---"] * len(header)) + "|"]


def _table_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _value_cell(value) -> str:
    """A config value as YAML would show it, short: 0.001, true, [man_en, man_de]; '-' if unknown."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _file_safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", label)


# ---- the report ---------------------------------------------------------------------------
def write_report(run_dirs: Sequence[str], out_dir: str, group_seeds: bool = True) -> dict:
    """Write report.md, report.json and the plots; returns {'markdown', 'rows', 'groups',
    'warnings', 'files'}.

    A sweep directory among `run_dirs` is replaced by its points. With group_seeds,
    runs that differ only in run.seed are pooled into one group (a table and one line
    per group); without it every run is its own group.
    """
    run_dirs = expand_run_dirs(run_dirs)
    if not run_dirs:
        raise ReportError("no run dirs given")
    runs = [load_run(d) for d in run_dirs]
    _unique_labels(runs)
    fields = differing_fields([run["config"] for run in runs])
    federations, rows = report_rows(runs, fields)
    members = group_runs(runs, group_seeds)
    group_fields = differing_fields([m[0]["config"] for m in members], ignore=(SEED_FIELD,) if group_seeds else ())
    groups = [summarize_group(m, group_fields) for m in members]
    for g, label in zip(groups, _deduplicated([g["group"] for g in groups])):
        g["group"] = label
    warnings = run_warnings(runs)
    curves = {run["label"]: run_curves(run["records"]) for run in runs}
    sweep = sweep_points(groups, group_fields)

    os.makedirs(out_dir, exist_ok=True)
    text = (f"# Report\n\nRatios are relative to the first run ({runs[0]['label']}); "
            "perplexities are on the validation windows of each federation.\n\n")
    if warnings:
        text += "".join(f"- warning: {w}\n" for w in warnings) + "\n"
    text += "## Runs\n\n" + markdown(federations, rows, fields)
    if any(g["n"] > 1 for g in groups):
        text += ("\n## Seed groups\n\nRuns whose configs differ only in run.seed: the final perplexity's mean, "
                 "sample standard deviation (n - 1), min and max over the seeds.\n\n"
                 + groups_markdown(groups, group_fields))
    files = _write_plots(runs, members, groups, curves, sweep, out_dir)
    if files:
        text += "\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in files) + "\n"
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump({"federations": federations, "runs": rows, "groups": groups, "differing_fields": fields,
                   "group_fields": group_fields, "warnings": warnings, "curves": curves, "sweep": sweep},
                  f, indent=2)
    return {"markdown": text, "rows": rows, "groups": groups, "warnings": warnings, "files": [md_path, *files]}


def _deduplicated(labels: Sequence[str]) -> list[str]:
    items = [{"label": label} for label in labels]
    _unique_labels(items)
    return [item["label"] for item in items]


def _write_plots(runs, members, groups, curves, sweep, out_dir: str) -> list[str]:
    files = []
    lines = {g["group"]: {key: mean_curve([curves[m["label"]][key] for m in group], key)
                          for key in ("train_loss", "perplexity")}
             for g, group in zip(groups, members)}
    if any(curve[key][key] for curve in lines.values() for key in curve):
        files.append(plots.plot_curves(lines, os.path.join(out_dir, "curves.png")))
    if sweep:
        files.append(plots.plot_sweep(sweep["field"], sweep["points"], os.path.join(out_dir, "sweep.png")))
    for run in runs:
        if any("eval" in r for r in run["records"]):
            files.append(plots.plot_perplexity(
                run["records"], os.path.join(out_dir, f"perplexity_{_file_safe(run['label'])}.png")))
    return files
