"""What a plug-in returns, checked where the engine calls it, before the engine uses it.

Every registered function the compiled round calls (an aggregator's
`transform` or `combine`, a client objective's `loss`, `after_training` and
`update_federation`, an attack's `apply`, a schedule, an optimizer's `update`,
an aggregator's or an objective's `metrics`) has its result compared with what
the engine expects: the tree structure, each leaf's shape and dtype, a scalar,
or a dict of named values of one shape. A mismatch raises
`PluginOutputError`, one line naming the entry, where it was defined and what
it returned against what was expected, e.g.

    aggregator 'my_mean' (combine, my_plugins.py:4) returned delta_P['blocks/0/attn/out/kernel'] of shape
    (6, 32, 32) float32, expected (3, 32, 32) float32: combine returns one row per federation (n_parents = 3),
    not one per child (6), each leaf in the dtype of delta_N

instead of a broadcasting error deep inside the engine that names neither.
Key-layer rules (`k_agg`) are the engine's own, not a registry; strategies
and callbacks run outside the compiled round (a plan is validated when it is
built).

The checks read only shapes and dtypes, which are static: they run in Python
while the round is traced (`jax.jit`, `jax.eval_shape`, lowering) and add
nothing to the compiled program, so a round costs the same with them. How they
compose with the rest of the round:

- Rows of absent, padding and diverged children (weight 0, possibly NaN) and
  attackers' rows have the shape of every other row: a check never sees
  values, so it neither masks nor depends on them; masking stays the entry's
  job (`aggregators`).
- DP federations: their release is the engine's own code (clipped, noised
  sums; their aggregator is `mean`), and what runs before it per client (the
  objective, an attack, the client optimizer) is checked as anywhere else.
  An entry is traced, and so checked, once for each level that names it,
  whichever of the level's federations select it.
- A vectorised sweep (`sweeps.vectorized`) vmaps the round over its points:
  inside `vmap` every shape is one point's (no sweep axis), as are the
  shapes an entry is given, so the same checks hold per point.
- Under a device mesh, client slots run inside `shard_map` and in chunks: a
  per-slot entry (loss, after_training, attack, client optimizer) sees one
  slot, a streamed `transform` the chunk's rows, and each is compared with
  what it was given, whatever the chunk; a stacked `combine` and a server
  optimizer run outside the device map, on the level's whole rows.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from worldlm_jax.errors import ConfigError


class PluginOutputError(ConfigError):
    """A registered entry returned something the engine cannot use; one line
    naming the entry, its file and what it returned against what was expected."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registered function as the engine calls it (for the error message)."""

    kind: str  # the registry's kind: "aggregator", "client objective", ...
    name: str  # the name it is registered under
    fn: Callable  # the function called: where it is defined is read off it, only on a mismatch
    role: str = ""  # which of the entry's functions, when it has several ("combine")

    def __str__(self) -> str:
        where = ", ".join(filter(None, (self.role, defined_at(self.fn))))
        return f"{self.kind} {self.name!r} ({where})"


def defined_at(fn: Callable) -> str:
    """'my_plugins.py:5': the file (relative to the working directory when below
    it) and line where `fn` is defined; its module where the source is unknown.
    Best effort: wrappers (`functools.wraps`, partials) are looked through."""
    target = inspect.unwrap(fn)
    while isinstance(target, functools.partial):
        target = inspect.unwrap(target.func)
    if not (inspect.isfunction(target) or inspect.ismethod(target) or inspect.isclass(target)):
        target = type(target)  # a callable object: its class
    try:
        path, line = inspect.getsourcefile(target), inspect.getsourcelines(target)[1]
    except (TypeError, OSError):
        path = line = None
    if path:
        relative = os.path.relpath(path)
        return f"{path if relative.startswith(os.pardir) else relative}:{line}"
    return getattr(target, "__module__", None) or "unknown file"


# ---- what a value looks like, in a message -------------------------------------------
def _shape_dtype(x) -> tuple[tuple, np.dtype] | None:
    """(shape, dtype) of an array, tracer, ShapeDtypeStruct or Python number; None for anything else."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return tuple(x.shape), np.dtype(x.dtype)
    if isinstance(x, (bool, int, float, complex)):
        return (), np.dtype(jnp.result_type(x))
    return None


def _describe(x, with_dtype: bool = True) -> str:
    """'shape (6, 32) float32', or 'type str' for what is not an array."""
    found = _shape_dtype(x)
    if found is None:
        return f"type {type(x).__name__}"
    shape, dtype = found
    return f"shape {shape}" + (f" {dtype}" if with_dtype else "")


def _expected(x, with_dtype: bool = True) -> str:
    shape, dtype = _shape_dtype(x)
    return f"{shape}" + (f" {dtype}" if with_dtype else "")


def _paths(tree) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _few(paths: list[str], most: int = 3) -> str:
    shown = ", ".join(paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


def _clipped(text: str, most: int = 80) -> str:
    return text if len(text) <= most else text[:most - 3] + "..."


def _structure_difference(returned, expected) -> str:
    """What differs between two tree structures, in a few words: the leaves
    missing and those not expected, else (same leaves, other containers) both."""
    got, want = _paths(returned), _paths(expected)
    missing = [p for p in want if p not in set(got)]
    extra = [p for p in got if p not in set(want)]
    if missing or extra:
        return "; ".join(filter(None, (missing and f"missing {_few(missing)}",
                                       extra and f"not expected {_few(extra)}")))
    return (f"structured as {_clipped(str(jax.tree.structure(returned)))}, "
            f"expected {_clipped(str(jax.tree.structure(expected)))}")


# ---- the checks ------------------------------------------------------------------------
def check_like(entry: Entry, returned, expected, what: str, rule: str, *, dtypes: bool = True) -> None:
    """Raise `PluginOutputError` unless `returned` has the tree structure of
    `expected` and every leaf its shape (and, with `dtypes`, its dtype).
    `what` names the returned value in the message, `rule` says the contract."""
    if jax.tree.structure(returned) != jax.tree.structure(expected):
        raise PluginOutputError(f"{entry} returned {what} with another tree structure "
                                f"({_structure_difference(returned, expected)}): {rule}")
    flat = jax.tree_util.tree_flatten_with_path(returned)[0]
    for (path, got), want in zip(flat, jax.tree.leaves(expected)):
        found, wanted = _shape_dtype(got), _shape_dtype(want)
        if wanted is None:  # not an array where the engine holds it either: nothing to compare
            continue
        if found is None or found[0] != wanted[0] or (dtypes and found[1] != wanted[1]):
            raise PluginOutputError(f"{entry} returned {what}{jax.tree_util.keystr(path)} of "
                                    f"{_describe(got, dtypes)}, expected {_expected(want, dtypes)}: {rule}")


def check_pair(entry: Entry, returned, names: tuple[str, str], rule: str) -> tuple:
    """`returned` as a pair (a tuple or list of two), else `PluginOutputError`."""
    if not (isinstance(returned, (tuple, list)) and len(returned) == 2):
        many = isinstance(returned, (tuple, list))
        got = f"{len(returned)} values" if many else f"one value of {_describe(returned)}"
        raise PluginOutputError(f"{entry} returned {got}, expected a pair ({', '.join(names)}): {rule}")
    return tuple(returned)


def check_scalar(entry: Entry, returned, what: str, rule: str, *, floating: bool = False) -> None:
    """Raise `PluginOutputError` unless `returned` is a real scalar (a float
    with `floating`: what is differentiated)."""
    found = _shape_dtype(returned)
    kinds = "f" if floating else "fiub"
    if found is None or found[0] != () or found[1].kind not in kinds:
        expected = "a float scalar" if floating else "a real scalar"
        raise PluginOutputError(f"{entry} returned {what} of {_describe(returned)}, expected {expected} "
                                f"(shape ()): {rule}")


def check_metrics(entry: Entry, returned, shape: tuple, rule: str) -> dict:
    """`returned` as `{name: float32 array of shape}` once it is checked: a
    mapping of names (non-empty, without '/': each is one segment of a
    metrics key) to real arrays of `shape`; else `PluginOutputError`."""
    if not isinstance(returned, Mapping):
        raise PluginOutputError(f"{entry} returned metrics of {_describe(returned)}, expected a dict "
                                f"{{name: array}}: {rule}")
    checked = {}
    for name, value in returned.items():
        if not (isinstance(name, str) and name and "/" not in name):
            raise PluginOutputError(f"{entry} returned a metric named {name!r}, expected a non-empty string "
                                    f"without '/': {rule}")
        found = _shape_dtype(value)
        if found is None or found[0] != tuple(shape) or found[1].kind not in "fiub":
            raise PluginOutputError(f"{entry} returned metrics[{name!r}] of {_describe(value)}, expected "
                                    f"{tuple(shape)} of real numbers: {rule}")
        checked[name] = jnp.asarray(value, jnp.float32)
    return checked


def with_rows(tree, n: int) -> Any:
    """`tree`'s leaves as shapes with n rows instead of their own (a reduction's result)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((n,) + tuple(x.shape[1:]), x.dtype), tree)


OPTIMIZER_RULE = ("an optimizer's update(updates, state, params) returns (updates shaped like the gradients, "
                  "a state shaped like the one it was given)")


def checked_optimizer(tx: optax.GradientTransformation, entry: Entry) -> optax.GradientTransformationExtraArgs:
    """`tx` (an optax transformation) whose `update` checks its result: the
    updates shaped like the gradients (their dtype is the engine's to cast) and
    the next state exactly like the state (it is carried from step to step)."""
    def update(updates, state, params=None, **extra):
        new_updates, new_state = check_pair(entry, tx.update(updates, state, params, **extra),
                                            ("updates", "state"), OPTIMIZER_RULE)
        check_like(entry, new_updates, updates, "updates", OPTIMIZER_RULE, dtypes=False)
        check_like(entry, new_state, state, "state", OPTIMIZER_RULE)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(tx.init, update)
