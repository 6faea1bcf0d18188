"""Per-round metrics: a JSONL log, TensorBoard scalars, and non-blocking device fetches.

``metrics.jsonl`` is the source of truth (one JSON object per round, flushed per
line, so a killed run keeps every finished round). On resume,
``truncate_after(checkpoint_round)`` drops the rounds the checkpoint does not
cover, so the file ends up identical to an uninterrupted run's. TensorBoard gets
the numeric leaves of each record, with nested keys joined as ``a/b`` tags.

Create one ``MetricsWriter`` per run, on process 0 only in multi-host runs.

``AsyncFetcher`` keeps the host loop ahead of the device: it starts the
device->host copy of round r's metrics when they are submitted and converts them
only ``lag`` rounds later, when they are long since ready.
"""
from __future__ import annotations

import collections
import json
import numbers
import os
import warnings
from typing import Any, Callable, Iterator

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


class NullWriter:
    """What processes other than 0 write in a multi-process run: nothing."""

    def write(self, record: dict) -> None:
        pass

    def truncate_after(self, round_: int) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsWriter:
    """Appends one JSON line per round to ``workdir/metrics.jsonl`` (+ TensorBoard events)."""

    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        self.tb_dir = os.path.join(workdir, TB_DIR) if tensorboard else None
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = self._open_tb(purge_step=None)

    def write(self, record: dict) -> None:
        """Logs one round; ``record["round"]`` (an int) orders lines and TensorBoard steps."""
        step = _round_of(record, where=f"record written to {self.path}")
        line = json.dumps(record, default=_to_json)  # fails here, before a half line is written
        self._file.write(line + "\n")
        self._file.flush()
        if self._tb is not None:
            for tag, value in flatten_scalars(record):
                if tag != "round":
                    self._tb.add_scalar(tag, value, global_step=step)

    def truncate_after(self, round_: int) -> None:
        """Drops lines with round > ``round_`` (and a torn last line) to resume cleanly.

        TensorBoard events cannot be edited in place; a new event file with
        ``purge_step = round_ + 1`` tells TensorBoard to hide the stale steps.
        """
        self._file.close()
        kept = [line for line, record in _parsed_lines(self.path)
                if _round_of(record, where=self.path) <= round_]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in kept)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        if self._tb is not None:
            self._tb.close()
            self._tb = self._open_tb(purge_step=round_ + 1)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open_tb(self, purge_step: int | None):
        if self.tb_dir is None:
            return None
        try:  # imported lazily: optional for library users (e.g. accelerator images without it)
            from tensorboardX import SummaryWriter
        except ImportError:
            warnings.warn("tensorboardX is not installed: no TensorBoard events (metrics.jsonl is still written)")
            self.tb_dir = None
            return None

        # Event files are named by the second they were opened: the suffix keeps a
        # resume within the same second from overwriting the previous file.
        suffix = "" if purge_step is None else f".resume{purge_step}"
        return SummaryWriter(logdir=self.tb_dir, purge_step=purge_step, flush_secs=10,
                             filename_suffix=suffix)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a ``metrics.jsonl`` (a torn last line from a killed run is skipped)."""
    return [record for _, record in _parsed_lines(path)]


def flatten_scalars(tree: dict, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Yields ('a/b', value) for every real-number leaf of nested dicts; skips the rest."""
    for key, value in tree.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten_scalars(value, prefix=tag + "/")
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            yield tag, float(value)
        elif isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "fiu":
            yield tag, float(value)


class AsyncFetcher:
    """Converts pytrees of device arrays to Python values without stalling the host loop.

    ``submit(tree)`` starts the device->host copy and returns the trees submitted
    more than ``lag`` calls ago, converted by ``convert`` (default ``to_python``:
    arrays -> float/int or nested lists; ``to_numpy``: NumPy arrays of their own
    dtypes; other leaves unchanged). ``flush()`` returns the rest. Results keep
    submission order. lag=1 lets round r+1 be dispatched before round r's metrics
    are read, so the device never idles waiting for logging.
    """

    def __init__(self, lag: int = 1, convert: Callable[[Any], Any] | None = None):
        if lag < 0:
            raise ValueError(f"AsyncFetcher lag must be >= 0, got {lag}.")
        self.lag = lag
        self._convert = to_python if convert is None else convert
        self._pending: collections.deque = collections.deque()

    def submit(self, tree: Any) -> list[Any]:
        for leaf in jax.tree.leaves(tree):
            if isinstance(leaf, jax.Array):
                leaf.copy_to_host_async()
        self._pending.append(tree)
        ready = []
        while len(self._pending) > self.lag:
            ready.append(self._convert(self._pending.popleft()))
        return ready

    def flush(self) -> list[Any]:
        ready = [self._convert(tree) for tree in self._pending]
        self._pending.clear()
        return ready

    def __len__(self) -> int:
        return len(self._pending)


def to_python(tree: Any) -> Any:
    """Arrays -> Python scalars / nested lists, so the result is JSON-ready."""
    def convert(leaf):
        if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            arr = np.asarray(leaf)
            return arr.item() if arr.ndim == 0 else arr.tolist()
        return leaf

    return jax.tree.map(convert, tree)


def to_numpy(tree: Any) -> Any:
    """Arrays -> NumPy arrays of their own dtype (a float32 metric stays float32,
    so its shortest decimal is float32's: 0.001, not 0.0010000000474974513)."""
    def convert(leaf):
        return np.asarray(leaf) if isinstance(leaf, (jax.Array, np.ndarray, np.generic)) else leaf

    return jax.tree.map(convert, tree)


def _to_json(value: Any) -> Any:
    """json.dumps fallback: numpy/JAX values become Python ones."""
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        return to_python(value)
    raise TypeError(f"metrics value of type {type(value).__name__} is not JSON-serialisable; "
                    "log numbers, strings, lists or dicts.")


def _round_of(record: Any, where: str) -> int:
    if not isinstance(record, dict) or not isinstance(record.get("round"), numbers.Integral):
        raise ValueError(f"Each metrics record needs an integer 'round' field ({where}); "
                         f"got {record!r:.200}.")
    return int(record["round"])


def _parsed_lines(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """(line, record) per newline-terminated line; a killed write's unterminated tail is dropped."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")[:-1]
    parsed = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            parsed.append((line, json.loads(line)))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number} is not valid JSON ({err}); delete or fix "
                             "that line.") from err
    return parsed
