"""Hooks into the run loop: its start and end, each round's record and each
evaluation; a hook may ask the run to stop.

A callback subclasses `Callback` and overrides what it needs (every default
does nothing). `on_start(context)` runs before the first round of this launch
and `on_end(context, summary)` after the final evaluation and summary.json;
both get the run's `RunContext` (run directory, process index and count, the
resolved config, the first round of this launch, whether it resumed).
Returning True from `on_round_end` or `on_eval_end` asks the run to stop after
the current round: it checkpoints, evaluates and ends cleanly, its summary
saying `interrupted: true` and `stopped_by: NAME` (re-running `worldlm train`
resumes it; `worldlm sweep` counts such a point as finished, goes on with the
next one and skips it when re-run).

Callbacks are named in a config through the `CALLBACKS` registry of factories,
`run.callbacks: [name, {name: NAME, args: {ARG: VALUE, ...}}, ...]`: an entry's
args are keyword arguments of its factory, `factory(config, **args) ->
Callback` (a factory `factory(config)` takes none). They are checked against
the factory's signature when the config is read (`check_args`), before
anything compiles. Callbacks may also be passed as instances to
`train.train(..., callbacks=[...])`. In a multi-process run every process runs
them on the same records (`context.process_index` tells them apart), and a
stop asked on any process stops all of them at the same round.

Built in: `csv` and `jsonl` (`CsvLogger`, `JsonlLogger`) write each round's
record and each evaluation to a file in the run directory.

Records arrive as soon as their round is done: with a callback that may stop
the run (any but `watch_only` ones) the loop reads each round's metrics before
dispatching the next round (the host still cuts the next batch meanwhile), so
a stop takes effect right after the round that asked for it.
"""
from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import numbers
import os
from typing import Any, Callable, Iterable, Mapping

from worldlm_jax.plugins.registry import Registry

HOOKS = ("on_start", "on_round_end", "on_eval_end", "on_end")


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What a callback knows of its run, from `on_start` on.

    workdir: the run directory (absolute). process_index, process_count: this
    process among the run's (0 and 1 in a single-process run; process 0 alone
    writes the run's files). config: the resolved Config, as config.yaml holds
    it. first_round: the first round this launch trains (0, or the round a
    resumed run starts from: its checkpoint's round count). resumed: whether
    it started from a checkpoint."""
    workdir: str
    process_index: int
    process_count: int
    config: Any
    first_round: int
    resumed: bool

    @property
    def is_primary(self) -> bool:
        return self.process_index == 0


@dataclasses.dataclass(frozen=True)
class CallbackSpec:
    """A `run.callbacks` entry with arguments, `{name: csv, args: {path: losses.csv}}`
    (a bare name is an entry without any)."""
    name: str = ""
    args: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Callback:
    """Base class: every hook does nothing and asks nothing.

    `watch_only = True` declares a callback that never asks to stop (its return
    values are ignored): the loop may then show it each round a round late, as
    it reads the metrics without callbacks, so the device never waits for it."""

    watch_only = False

    def on_start(self, context: RunContext) -> None:
        """Before the first round of this launch (`context.first_round` > 0 when
        it resumed), on every process. A run cannot be stopped before it starts:
        returning a true value is an error (TypeError), not a stop quietly
        ignored. To refuse the run, raise: it ends before its first round, and
        no on_end follows."""
        return None

    def on_round_end(self, round_index: int, record: dict) -> bool | None:
        """After root round `round_index`, with its metrics.jsonl record
        (train_loss, train_loss_per_federation, client_lr, server_lr, tokens,
        bytes_communicated, level*/... metrics). True: stop after this round."""
        return None

    def on_eval_end(self, round_index: int, evaluation: dict) -> bool | None:
        """After an evaluation of the model as of the end of `round_index`
        (every run.eval_every rounds, and the final one, shown once when
        eval_every already evaluated that state): perplexity, nll,
        bits_per_byte, per_federation. True: stop after this round."""
        return None

    def on_end(self, context: RunContext, summary: dict | None) -> None:
        """Once the run is over, after its final evaluation and summary.json, with
        that summary; also when a callback, the privacy budget or Ctrl-C stopped
        it (`summary["interrupted"]`). When the run raises instead
        (NonFiniteStateError, an error in a hook, a crash), on_end still runs,
        with summary None, and the error propagates after it."""
        return None


Factory = Callable[..., Callback]

CALLBACKS: Registry[Factory] = Registry("callback", "worldlm_jax.plugins.callbacks.register(name, factory)")


def register(name: str, factory: Factory) -> Factory:
    """Add a callback usable by name in `run.callbacks`: `factory(config, **args)`
    returns a Callback (the config lets it read e.g. run.rounds; `args` are the
    entry's, so a factory that takes only the config takes no arguments)."""
    if not callable(factory):
        raise TypeError(f"callback factory for {name!r} must be callable, got {type(factory).__name__}")
    return CALLBACKS.register(name, factory)


def names() -> tuple[str, ...]:
    return CALLBACKS.names()


def _keywords(factory) -> tuple[list[str], list[str], bool]:
    """(the keyword arguments a factory takes after the config, those it requires,
    whether it takes **kwargs)."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin): let the call decide
        return [], [], True
    if params and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        params = params[1:]  # the config
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return ([p.name for p in named], [p.name for p in named if p.default is p.empty],
            any(p.kind is p.VAR_KEYWORD for p in params))


def check_args(name: str, args: Mapping[str, Any], field: str) -> None:
    """Raise ValueError, one line naming `field`, unless the factory of callback
    `name` takes these keyword arguments: none it does not know, none it needs missing."""
    accepted, required, any_keyword = _keywords(CALLBACKS.get(name, field))
    unknown = [] if any_keyword else sorted(set(args) - set(accepted))
    if unknown:
        raise ValueError(f"{field}={dict(args)!r}: callback {name!r} takes {', '.join(accepted) or 'no arguments'}, "
                         f"not {unknown}; correct or remove them")
    missing = [a for a in required if a not in args]
    if missing:
        raise ValueError(f"{field}={dict(args)!r}: callback {name!r} needs {', '.join(missing)}; add them")


def build(config, extra: Iterable[Callback | CallbackSpec | str] = ()) -> list[tuple[str, Callback]]:
    """(name, callback) for every entry of config.run.callbacks, then for `extra`
    (instances, named by their class, registered names or CallbackSpecs)."""
    built = []
    for item in (*config.run.callbacks, *extra):
        if isinstance(item, (str, CallbackSpec)):
            name, args = (item, {}) if isinstance(item, str) else (item.name, item.args)
            callback, label = CALLBACKS.get(name, "run.callbacks")(config, **args), name
        else:
            callback, label = item, type(item).__name__
        if not any(callable(getattr(callback, hook, None)) for hook in HOOKS):
            raise TypeError(f"callback {label!r} has none of {', '.join(HOOKS)}; subclass "
                            "worldlm_jax.callbacks.Callback")
        built.append((label, callback))
    return built


def _watch_only(callback) -> bool:
    return bool(getattr(callback, "watch_only", False))


def may_stop(callbacks: Iterable[tuple[str, Callback]]) -> bool:
    """Whether any callback may ask the run to stop (the loop then shows it each round as it ends)."""
    return not all(_watch_only(callback) for _, callback in callbacks)


def start(callbacks: Iterable[tuple[str, Callback]], context: RunContext) -> None:
    """`on_start(context)` of every callback, in order."""
    for label, callback in callbacks:
        method = getattr(callback, "on_start", None)
        result = method(context) if method is not None else None
        if result:
            raise TypeError(f"callback {label!r}: on_start returned {result!r}, but a run cannot stop before its "
                            "first round; return None (raise an exception to refuse the run)")


def notify(callbacks: Iterable[tuple[str, Callback]], hook: str, round_index: int, payload: dict) -> list[str]:
    """Call `hook` on every callback (all of them, even after one asked to stop);
    returns the names of those that asked to stop."""
    stop = []
    for label, callback in callbacks:
        method = getattr(callback, hook, None)
        if method is not None and method(round_index, payload) and not _watch_only(callback):
            stop.append(label)
    return stop


def end(callbacks: Iterable[tuple[str, Callback]], context: RunContext, summary: dict | None) -> None:
    """`on_end(context, summary)` of every callback, in order (summary None: the run raised)."""
    for _, callback in callbacks:
        method = getattr(callback, "on_end", None)
        if method is not None:
            method(context, summary)


def around_run(callbacks: Iterable[tuple[str, Callback]], context: RunContext, run: Callable[[], dict]) -> dict:
    """on_start of every callback, then `run()` (the run, returning its summary),
    then on_end of every callback: also when run() raises (with summary None,
    and the error propagates after), but not when an on_start raised."""
    start(callbacks, context)
    summary = None
    try:
        summary = run()
        return summary
    finally:
        end(callbacks, context, summary)


# ---- built in: the csv and jsonl loggers ----------------------------------------------
class FileLogger(Callback):
    """Writes each round's record (what metrics.jsonl gets) and each evaluation,
    as `{round, eval: {...}}`, to one file, in the order the callbacks see them.

    `path` (an argument in the config: `{name: csv, args: {path: losses.csv}}`)
    is relative to the run directory, or absolute. How it composes:
    - several processes: only process 0 writes (every process sees the same records);
    - resume: on_start keeps the file's lines of the rounds before
      `context.first_round` and drops the others (a killed run may have written
      rounds past its last checkpoint, which the resumed run trains again), so
      the file ends up as an uninterrupted run's, as metrics.jsonl does; a
      launch that starts at round 0 starts the file afresh. A logger added when a
      run resumes holds the rounds from there on;
    - `worldlm sweep`: each point is a run with its own directory and file; a
      vectorised sweep runs no callbacks and refuses run.callbacks;
    - it never asks to stop (`watch_only`), so alone it does not slow the loop.
    The final evaluation comes once: not again when run.eval_every evaluated
    that state already (metrics.jsonl then holds it twice, the second with
    `final: true`)."""

    watch_only = True
    default_path = ""

    def __init__(self, config, path: str = ""):
        self.relative = path or self.default_path
        self.path: str | None = None  # the file this process writes (None: it writes none)

    def on_start(self, context: RunContext) -> None:
        self.path = os.path.join(context.workdir, self.relative) if context.is_primary else None
        if self.path is not None:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._restart(context.first_round)

    def on_round_end(self, round_index: int, record: dict) -> None:
        if self.path is not None:
            self._write(record)

    def on_eval_end(self, round_index: int, evaluation: dict) -> None:
        if self.path is not None:
            self._write({"round": round_index, "eval": evaluation})

    def _restart(self, first_round: int) -> None:
        raise NotImplementedError

    def _write(self, line: dict) -> None:
        raise NotImplementedError


class JsonlLogger(FileLogger):
    """`jsonl`: one JSON object a line, nested as in metrics.jsonl (default
    path rounds.jsonl). See FileLogger for how it composes."""

    default_path = "rounds.jsonl"

    def _restart(self, first_round: int) -> None:
        kept = [line for line in _complete_lines(self.path) if _round_of_json(line) < first_round]
        _replace(self.path, kept)

    def _write(self, line: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, default=_to_plain) + "\n")


class CsvLogger(FileLogger):
    """`csv`: one row per round record or evaluation (default path rounds.csv).
    See FileLogger for how it composes.

    Nested keys are joined with '/' (`client_lr/en`, `privacy/en/epsilon`,
    `eval/perplexity`, `eval/per_federation/en`). A list (a per-federation
    metric such as `level1/update_norm`, one number per federation of the
    level, or a matrix) is one cell holding its JSON, so the columns do not
    depend on the tree's size. A row leaves the cells it has no value for
    empty: a round's eval/ columns, an evaluation's training ones. The header
    is every column in the order first seen; a row bringing a new one (the
    first evaluation, say) rewrites the file under the wider header, so every
    row lines up with it."""

    default_path = "rounds.csv"

    def _restart(self, first_round: int) -> None:
        self.rows = [row for row in _read_rows(self.path) if int(row["round"]) < first_round]
        self.columns = list(dict.fromkeys(column for row in self.rows for column in row))
        self._rewrite()

    def _write(self, line: dict) -> None:
        row = flat_row(line)
        self.rows.append(row)
        new = [column for column in row if column not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
        else:
            with open(self.path, "a", encoding="utf-8", newline="") as f:
                csv.DictWriter(f, self.columns, lineterminator="\n").writerow(row)

    def _rewrite(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            if self.columns:
                writer = csv.DictWriter(f, self.columns, lineterminator="\n")
                writer.writeheader()
                writer.writerows(self.rows)
        os.replace(tmp, self.path)  # a kill mid-rewrite leaves the previous file whole


def flat_row(line: Mapping, prefix: str = "") -> dict[str, str]:
    """A record as CSV cells: nested keys joined with '/', numbers as their
    shortest decimal, lists (and anything else) as JSON."""
    row = {}
    for key, value in line.items():
        if isinstance(value, Mapping):
            row.update(flat_row(value, f"{prefix}{key}/"))
        else:
            row[f"{prefix}{key}"] = _cell(value)
    return row


def _cell(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return repr(float(value))
    return json.dumps(value, default=_to_plain)


def _to_plain(value):
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _complete_lines(path: str) -> list[str]:
    """The file's lines that end in a newline (a kill mid-write leaves a torn last one); none if absent."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    return text[:text.rfind("\n") + 1].split("\n")[:-1]


def _round_of_json(line: str) -> float:
    try:
        return int(json.loads(line)["round"])
    except (ValueError, KeyError, TypeError):  # not a line this logger wrote whole: drop it
        return float("inf")


def _read_rows(path: str) -> list[dict[str, str]]:
    """The rows of a CSV this logger wrote, each with only the cells it has."""
    return [{k: v for k, v in row.items() if k is not None and v not in (None, "")}
            for row in csv.DictReader(_complete_lines(path))]


def _replace(path: str, lines: list[str]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
    os.replace(tmp, path)


register("csv", CsvLogger)
register("jsonl", JsonlLogger)
