"""Run plots: perplexity per federation, attention-weight heat maps, methods compared,
runs' learning curves and a one-dimensional sweep (`worldlm report`).

Built on ``matplotlib.figure.Figure`` (Agg canvas), never pyplot: no global
figure state, no GUI backend, safe from threads and on headless machines. Each
function writes exactly one PNG and returns its path.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, ScalarFormatter

_DPI = 120
_ANNOTATE_MAX_CELLS = 144  # write the weight in each cell only while it stays legible


def plot_perplexity(records: Sequence[dict], out_png: str | os.PathLike) -> str:
    """Perplexity of each federation (and overall) over rounds, from metrics records.

    Records without an ``eval`` entry (rounds that were not evaluated) are skipped.
    """
    evaluated = [r for r in records if isinstance(r, dict) and "eval" in r]
    if not evaluated:
        raise ValueError("plot_perplexity: no record has an 'eval' entry; expected records like "
                         "{'round': r, 'eval': {'per_federation': {name: ppl}, 'perplexity': p}}.")
    rounds = [_field(r, "round", i) for i, r in enumerate(evaluated)]
    names = sorted({name for r in evaluated for name in r["eval"].get("per_federation", {})})
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for name in names:  # a federation missing from a round is a gap, not a zero
        ax.plot(rounds, [r["eval"].get("per_federation", {}).get(name, math.nan)
                         for r in evaluated], marker=".", label=name)
    overall = [r["eval"].get("perplexity", math.nan) for r in evaluated]
    if not all(math.isnan(v) for v in overall):
        ax.plot(rounds, overall, color="black", linestyle="--", linewidth=2, label="overall")
    _finish(ax, "round", "perplexity", "Perplexity per federation", log_y=True)
    return _save(fig, out_png)


def plot_attention(weights: Mapping[str, object] | object,
                   labels: Sequence[str] | tuple[Sequence[str], Sequence[str]]
                   | Mapping[str, object],
                   out_png: str | os.PathLike) -> str:
    """Heat maps of attention weights: rows = aggregating federation, columns = candidates.

    ``weights`` is one 2-D matrix (array or nested lists) or a dict of panel name
    (e.g. the parent federation) -> matrix, one panel each. ``labels`` is one
    name list used for rows and columns (federations attending over each other),
    a pair ``(row_names, column_names)``, or a dict of panel name -> either.
    """
    panels = dict(weights) if isinstance(weights, Mapping) else {"": weights}
    if not panels:
        raise ValueError("plot_attention: weights is empty.")
    fig = Figure(figsize=(4.8 * len(panels), 4.4))
    for i, (name, matrix) in enumerate(panels.items()):
        matrix = _matrix(matrix, name)
        panel_labels = labels[name] if isinstance(labels, Mapping) else labels
        rows, cols = _row_col_labels(panel_labels, matrix.shape, name)
        ax = fig.add_subplot(1, len(panels), i + 1)
        image = ax.imshow(matrix, vmin=0.0, vmax=max(1.0, float(np.nanmax(matrix))),
                          cmap="viridis")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("candidate")
        ax.set_ylabel("aggregating federation")
        ax.set_title(name or "attention weights")
        if matrix.size <= _ANNOTATE_MAX_CELLS:
            for (r, c), value in np.ndenumerate(matrix):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center",
                        color="white" if value < 0.5 else "black", fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, out_png)


def plot_similarity(matrix, labels: Sequence[str], out_png: str | os.PathLike, title: str) -> str:
    """Heat map of the cosine similarity between a federation's children's K deltas."""
    matrix = _matrix(matrix, title)
    rows, cols = _row_col_labels(labels, matrix.shape, title)
    fig = Figure(figsize=(max(5.0, 1.6 + 0.3 * len(cols)), max(4.0, 1.4 + 0.28 * len(rows))))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(matrix, vmin=-1.0, vmax=1.0, cmap="coolwarm")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, out_png)


def plot_series(series: Mapping[str, Sequence[tuple[int, float]]], out_png: str | os.PathLike, ylabel: str,
                title: str) -> str:
    """One line per name of (round, value) points."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for name, points in series.items():
        if points:
            ax.plot(*zip(*points), label=name)
    _finish(ax, "round", ylabel, title, log_y=False)
    return _save(fig, out_png)


def plot_methods(results: Mapping[str, Sequence[tuple[int, float]]],
                 out_png: str | os.PathLike) -> str:
    """Perplexity per round for each method (WorldLM vs baselines)."""
    if not results:
        raise ValueError("plot_methods: results is empty; expected {method: [(round, ppl), ...]}.")
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for method, points in results.items():
        arr = np.asarray(points, dtype=float)
        if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) == 0:
            raise ValueError(f"plot_methods: results[{method!r}] has shape {arr.shape}; expected "
                             "a non-empty list of (round, perplexity) pairs.")
        ax.plot(arr[:, 0], arr[:, 1], marker=".", label=method)
    _finish(ax, "round", "perplexity", "Perplexity per method", log_y=True)
    return _save(fig, out_png)


# x axes of the learning curves: what a run has spent so far (cumulative sums of the round records)
CURVE_X = (("round", "round"), ("tokens", "training tokens (cumulative)"),
           ("bytes_communicated", "bytes communicated (cumulative)"),
           ("sim_hours", "simulated hours (cumulative, the network clock)"))
# y axes: (key, label, log scale)
CURVE_Y = (("train_loss", "training loss (nats/token)", False), ("perplexity", "evaluation perplexity", True))
_MARKERS_UP_TO = 30  # points per line: mark each one while they stay apart (a lone final eval is a dot)


def plot_curves(lines: Mapping[str, Mapping[str, Mapping[str, Sequence]]], out_png: str | os.PathLike) -> str:
    """Training loss (top row) and evaluation perplexity (bottom row) against rounds,
    cumulative tokens, bytes communicated and simulated hours (columns), one line per name.

    ``lines[name][y]``, y in ``"train_loss"``, ``"perplexity"``, holds equal-length lists:
    the x values ``"round"``, ``"tokens"``, ``"bytes_communicated"``, ``"sim_hours"`` (None
    for a run without a clock: that panel stays empty), the line under ``y``
    itself (a group's mean) and, optionally, ``"low"`` and ``"high"``: a band (the
    spread of a group's seeds).
    """
    if not lines:
        raise ValueError("plot_curves: lines is empty; expected {name: {'train_loss': curve, "
                         "'perplexity': curve}}.")
    fig = Figure(figsize=(20, 8))
    axes = fig.subplots(len(CURVE_Y), len(CURVE_X), squeeze=False)
    legend_drawn = False  # one legend, on the first panel with lines: the colours are the same in all
    for row, (y, ylabel, log_y) in enumerate(CURVE_Y):
        for col, (x, xlabel) in enumerate(CURVE_X):
            ax = axes[row][col]
            drawn = 0
            for i, (name, curves) in enumerate(lines.items()):
                curve = curves.get(y) or {}
                if curve.get(y):
                    _draw_curve(ax, curve, x, y, name, color=f"C{i % 10}")
                    drawn += 1
            if not drawn:
                ax.text(0.5, 0.5, f"no {y} recorded", ha="center", va="center", transform=ax.transAxes)
            _finish(ax, xlabel, ylabel, "", log_y=log_y and drawn > 0, integer_x=x == "round",
                    legend=drawn > 0 and not legend_drawn)
            legend_drawn = legend_drawn or drawn > 0
    return _save(fig, out_png)


def _draw_curve(ax, curve: Mapping[str, Sequence], x: str, y: str, name: str, color: str) -> None:
    xs, line = _floats(curve[x]), _floats(curve[y])
    ax.plot(xs, line, color=color, marker="." if len(xs) <= _MARKERS_UP_TO else None, label=name)
    low, high = curve.get("low"), curve.get("high")
    if low is not None and high is not None and list(low) != list(high):
        ax.fill_between(xs, _floats(low), _floats(high), color=color, alpha=0.2, linewidth=0)


def plot_sweep(field: str, points: Sequence[Mapping[str, float]], out_png: str | os.PathLike) -> str:
    """Final perplexity against one swept config value: each point is the mean over a
    value's seeds, its bar the lowest to the highest seed. ``points``: dicts with
    ``value``, ``mean``, ``low``, ``high``. Log x when the values span 10x or more."""
    if not points:
        raise ValueError("plot_sweep: points is empty; expected [{'value', 'mean', 'low', 'high'}, ...].")
    ordered = sorted(points, key=lambda p: p["value"])
    values = _floats([p["value"] for p in ordered])
    mean = _floats([p["mean"] for p in ordered])
    below = mean - _floats([p["low"] for p in ordered])
    above = _floats([p["high"] for p in ordered]) - mean
    fig = Figure(figsize=(6.4, 4.5))
    ax = fig.add_subplot()
    ax.errorbar(values, mean, yerr=[below, above], marker="o", capsize=4, label="mean, min-max over seeds")
    if values.min() > 0 and values.max() >= 10 * values.min():  # learning rates and the like
        ax.set_xscale("log")
    _finish(ax, field, "final perplexity", f"Final perplexity against {field}", log_y=True,
            integer_x=False)
    return _save(fig, out_png)


def _floats(values: Sequence) -> np.ndarray:
    """A float array; None (a value a record lacks) becomes NaN: a gap in the line."""
    return np.asarray([math.nan if v is None else v for v in values], dtype=float)


def _matrix(value: object, name: str) -> np.ndarray:
    try:
        matrix = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"plot_attention: weights[{name!r}] is not a numeric matrix "
                         f"(ragged rows?): {err}") from err
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"plot_attention: weights[{name!r}] has shape {matrix.shape}; expected a "
                         "2-D (federations x candidates) matrix.")
    return matrix


def _row_col_labels(labels, shape: tuple[int, int], name: str) -> tuple[list, list]:
    is_pair = (isinstance(labels, tuple) and len(labels) == 2
               and not isinstance(labels[0], str))
    rows, cols = (list(labels[0]), list(labels[1])) if is_pair else (list(labels), list(labels))
    if (len(rows), len(cols)) != shape:
        raise ValueError(f"plot_attention: weights[{name!r}] has shape {shape} but labels give "
                         f"{len(rows)} rows x {len(cols)} columns; pass one name per row and "
                         "column, or a (row_names, column_names) pair.")
    return rows, cols


def _field(record: dict, key: str, index: int):
    if key not in record:
        raise ValueError(f"record #{index} has no '{key}' field: {record!r:.200}")
    return record[key]


def _finish(ax, xlabel: str, ylabel: str, title: str, log_y: bool, integer_x: bool = True,
            legend: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if integer_x:  # rounds are integers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if log_y:  # perplexity falls over orders of magnitude; keep plain numbers on the axis
        ax.set_yscale("log")
        for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_formatter(ScalarFormatter())
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def _save(fig: Figure, out_png: str | os.PathLike) -> str:
    out_png = os.fspath(out_png)
    if os.path.dirname(out_png):
        os.makedirs(os.path.dirname(out_png), exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_png, dpi=_DPI)
    return out_png
