"""Compare finished runs: a markdown table plus perplexity plots.

`write_report(run_dirs, out_dir)` reads each run's summary.json, metrics.jsonl
and config.yaml and writes, into `out_dir`:

- report.md    one row per run: algorithm, rounds, overall perplexity,
               bits/byte, ratio to the first run, one column per federation;
- report.json  the same rows;
- methods.png  evaluated perplexity per round, one line per run
               (from the metrics records that carry an "eval" entry);
- perplexity_<run>.png  per-federation perplexity over rounds, per run.
"""
from __future__ import annotations

import json
import os
import re
from typing import Sequence

from worldlm_jax.outputs import metrics as metrics_lib, plots


class ReportError(ValueError):
    """A run dir that cannot be reported on; the message names it and the fix."""


def load_run(run_dir: str) -> dict:
    """{'label', 'dir', 'summary', 'records', 'finished'} of one run dir.

    A run without summary.json (still training, or killed) is reported from
    its last evaluated metrics record and marked unfinished.
    """
    if not os.path.isdir(run_dir):
        raise ReportError(f"{run_dir}: not a directory")
    metrics_path = os.path.join(run_dir, metrics_lib.METRICS_FILE)
    records = metrics_lib.read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary, finished = json.load(f), True
    else:
        evaluated = [r for r in records if "eval" in r]
        if not evaluated:
            raise ReportError(f"{run_dir}: no summary.json and no evaluated round in metrics.jsonl; "
                              "is it a worldlm run dir? (finish it with: worldlm train --workdir "
                              f"{run_dir} --config {os.path.join(run_dir, 'config.yaml')})")
        last = evaluated[-1]
        summary = {"algorithm": _algorithm_from_config(run_dir), "rounds_completed": last["round"] + 1,
                   "eval": last["eval"], "wall_seconds": None}
        finished = False
    return {"label": os.path.basename(os.path.normpath(run_dir)) or run_dir, "dir": run_dir,
            "summary": summary, "records": records, "finished": finished}


def _algorithm_from_config(run_dir: str) -> str:
    import yaml
    try:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            return str(yaml.safe_load(f)["algorithm"]["name"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return "?"


def _unique_labels(runs: list[dict]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        label = run["label"]
        if label in seen:
            seen[label] += 1
            run["label"] = f"{label}#{seen[label]}"
        else:
            seen[label] = 1


def report_rows(runs: Sequence[dict]) -> tuple[list[str], list[dict]]:
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
                     "wall_seconds": s.get("wall_seconds")})
    return federations, rows


def markdown(federations: Sequence[str], rows: Sequence[dict]) -> str:
    header = ["run", "algorithm", "rounds", "perplexity", "bits/byte", "ppl / first"]
    header += [f"ppl {name}" for name in federations]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for row in rows:
        rounds = f"{row['rounds']}" + ("" if row["finished"] else " (unfinished)")
        cells = [row["run"], row["algorithm"], rounds, _fmt(row["perplexity"], 3),
                 _fmt(row["bits_per_byte"], 4), _fmt(row["ratio_to_first"], 3)]
        cells += [_fmt(row["per_federation"].get(name), 3) for name in federations]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _file_safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", label)


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


def write_report(run_dirs: Sequence[str], out_dir: str) -> dict:
    """Write report.md, report.json and the plots; returns {'markdown', 'rows', 'files'}.

    A sweep directory among `run_dirs` is replaced by its points.
    """
    run_dirs = expand_run_dirs(run_dirs)
    if not run_dirs:
        raise ReportError("no run dirs given")
    runs = [load_run(d) for d in run_dirs]
    _unique_labels(runs)
    federations, rows = report_rows(runs)
    os.makedirs(out_dir, exist_ok=True)
    text = (f"# Report\n\nRatios are relative to the first run ({runs[0]['label']}); "
            "perplexities are on the validation windows of each federation.\n\n"
            + markdown(federations, rows))
    files = []
    curves = {run["label"]: [(r["round"], r["eval"]["perplexity"]) for r in run["records"] if "eval" in r]
              for run in runs}
    curves = {label: points for label, points in curves.items() if points}
    if curves:
        files.append(plots.plot_methods(curves, os.path.join(out_dir, "methods.png")))
    for run in runs:
        if any("eval" in r for r in run["records"]):
            files.append(plots.plot_perplexity(
                run["records"], os.path.join(out_dir, f"perplexity_{_file_safe(run['label'])}.png")))
    if files:
        text += "\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in files) + "\n"
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump({"federations": federations, "runs": rows}, f, indent=2)
    return {"markdown": text, "rows": rows, "files": [md_path, *files]}
