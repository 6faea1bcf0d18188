"""What a checkpoint is checked against, and how a bad one is reported.

Every saved leaf gets a `LeafFingerprint`: shape, dtype, float sums and an
exact checksum of its bits. A restore compares structure (`_check_structure`)
and values (`_check_values`) with the record, and any difference is a
`CheckpointMismatchError` (another config) or a `CheckpointCorruptError`
(damaged files, naming the step, the leaf and the previous good step).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shlex
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# `set_aside` renames a damaged step to `<step>.damaged`: orbax only lists `^<step>$` names.
SET_ASIDE_SUFFIX = ".damaged"
# Relative tolerance on per-leaf sums: restoring onto another sharding changes the
# float32 reduction order, which moves the sum by ~log2(n) * 1e-7 of sum(|x|).
_SUM_RTOL = 1e-4


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or incomplete; the message says how to fix it."""


class CheckpointStepNotSavedError(CheckpointError):
    """The step asked for is not among the saved ones (never saved, or no longer
    kept): nothing is damaged, so the message lists the steps there are."""

    def __init__(self, step: int, directory: str, steps):
        self.step, self.directory, self.steps = step, directory, list(steps)
        super().__init__(f"Checkpoint step {step} was never saved in {directory} (or is no longer kept: a run "
                         f"keeps its newest steps); available steps: {self.steps}. Ask for one of them "
                         f"(worldlm eval --step N), or leave the step out for the latest ({self.steps[-1]}).")

    def __reduce__(self):
        return (CheckpointStepNotSavedError, (self.step, self.directory, self.steps))


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's structure differs from the requested one (the config changed)."""


class CheckpointCorruptError(CheckpointError):
    """One step is damaged or incomplete. ``step``, ``path`` (the damaged file or item)
    and ``reason`` say what; ``good_step`` is the newest earlier step that passed
    verification (None: none did, or it was not looked for), ``steps_checked`` the
    earlier steps examined for it. The message says how to resume from ``good_step``."""

    def __init__(self, step: int, path: str, reason: str, *, directory: str,
                 good_step: int | None = None, steps_checked: tuple[int, ...] | None = None,
                 deep: bool = True):
        self.step, self.path, self.reason, self.directory = step, path, reason, directory
        self.good_step, self.steps_checked, self.deep = good_step, steps_checked, deep
        super().__init__(self.summary + " " + self._advice())

    def __reduce__(self):  # picklable despite the keyword-only fields
        return (functools.partial(CheckpointCorruptError, directory=self.directory,
                                  good_step=self.good_step, steps_checked=self.steps_checked,
                                  deep=self.deep), (self.step, self.path, self.reason))

    @property
    def summary(self) -> str:
        return f"Checkpoint step {self.step} is corrupt or incomplete at {self.path}: {self.reason}."

    def with_good_step(self, good_step: int | None, steps_checked: tuple[int, ...],
                       deep: bool) -> "CheckpointCorruptError":
        return CheckpointCorruptError(self.step, self.path, self.reason, directory=self.directory,
                                      good_step=good_step, steps_checked=steps_checked, deep=deep)

    def _advice(self) -> str:
        bad = os.path.join(self.directory, str(self.step))
        aside = f"`mv {shlex.quote(bad)} {shlex.quote(bad + SET_ASIDE_SUFFIX)}`"
        if self.steps_checked is None:  # not looked for (e.g. verify() of one step)
            return (f"Fix: move the damaged step aside ({aside}) or delete {bad}; the run then "
                    "resumes from the newest earlier step (Checkpointer.good_steps() lists the "
                    "intact ones).")
        if self.good_step is None:
            earlier = (f"no earlier step is intact (checked: {list(self.steps_checked)})"
                       if self.steps_checked else "there is no earlier step")
            return (f"No good step to fall back to: {earlier}. Start a new workdir, or delete "
                    f"{self.directory} to restart this run from round 0.")
        how = ("verified: its arrays match their saved fingerprints" if self.deep else
               "its record is intact; its arrays are verified when it is restored")
        return (f"The previous good step is {self.good_step} ({how}). To resume from step "
                f"{self.good_step}, rerun the same `worldlm train` command with `--from-step "
                f"{self.good_step}` (the later steps are set aside, none deleted), or move the damaged "
                f"step aside: {aside} (or delete {bad}); to read step {self.good_step} without that: "
                f"Checkpointer.restore(step={self.good_step}) or `worldlm eval --workdir "
                f"{os.path.dirname(self.directory)} --step {self.good_step}`.")


class LeafFingerprint(NamedTuple):
    path: str
    shape: tuple[int, ...]
    dtype: str
    sum: float
    abs_sum: float
    checksum: int | None = None  # None: written before checksums (sums only)


_UINT_OF_SIZE = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _leaf_sums(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """sum, sum |x| (float32) and the bit checksum (uint32, exact in any reduction order)."""
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:  # the raw bits of each element (no 8-byte dtypes: JAX runs without x64 here)
        bits = jax.lax.bitcast_convert_type(x, _UINT_OF_SIZE[x.dtype.itemsize]).astype(jnp.uint32)
    # odd weights: a flipped bit moves the sum by weight * 2^k != 0 (mod 2^32); position
    # dependent, so swapped elements move it too
    weight = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape) * jnp.uint32(2654435761) | jnp.uint32(1)
    f = x.astype(jnp.float32)
    return jnp.sum(f), jnp.sum(jnp.abs(f)), jnp.sum(bits * weight, dtype=jnp.uint32)


_group_sums = jax.jit(lambda leaves: [_leaf_sums(x) for x in leaves])


def fingerprint(tree: Any) -> list[LeafFingerprint]:
    """Per-leaf (path, shape, dtype, sum, sum|x|), computed on device, fetched in one go.

    One jit per set of devices the leaves live on (a mesh, a single device):
    a run's state is one compilation, not one per leaf shape.
    """
    arrays = []
    for _, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = jnp.asarray(leaf)
        if jnp.issubdtype(arr.dtype, jax.dtypes.prng_key):
            arr = jax.random.key_data(arr)
        arrays.append(arr)
    groups: dict[tuple, list[int]] = {}
    for i, arr in enumerate(arrays):
        groups.setdefault(tuple(sorted(d.id for d in arr.sharding.device_set)), []).append(i)
    sums = [None] * len(arrays)
    for members in groups.values():
        for i, value in zip(members, _group_sums([arrays[i] for i in members])):
            sums[i] = value
    sums = jax.device_get(sums)
    return [LeafFingerprint(*meta, float(s), float(a), int(c))
            for meta, (s, a, c) in zip(_leaf_meta(tree), sums)]


def leaf_paths(tree: Any) -> list[str]:
    """The path of every leaf, as checkpoints name them."""
    return [_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _leaf_meta(tree: Any) -> list[tuple[str, tuple[int, ...], str]]:
    """(path, shape, dtype) per leaf; works for arrays, ShapeDtypeStructs and scalars."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(_path(p), tuple(np.shape(x)), str(_dtype(x))) for p, x in leaves]


def _dtype(x: Any) -> Any:
    """A leaf's dtype; Python scalars get the dtype JAX gives them (int32 without x64)."""
    return x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype


def _check_structure(stored: list[LeafFingerprint], abstract_state: Any, step: int,
                     path: str) -> None:
    """Names the first leaf whose path, shape or dtype differs from the checkpoint."""
    wanted = _leaf_meta(abstract_state)
    have = [(f.path, f.shape, f.dtype) for f in stored]
    for i in range(max(len(wanted), len(have))):
        w = wanted[i] if i < len(wanted) else None
        h = have[i] if i < len(have) else None
        if w == h:
            continue
        if w is None:
            what = f"leaf '{h[0]}' is in the checkpoint but not in the requested state"
        elif h is None:
            what = f"leaf '{w[0]}' is requested but not in the checkpoint"
        elif w[0] != h[0]:
            what = f"leaf #{i} is '{h[0]}' in the checkpoint but '{w[0]}' in the requested state"
        else:
            what = (f"leaf '{w[0]}' has shape {h[1]} dtype {h[2]} in the checkpoint but "
                    f"shape {w[1]} dtype {w[2]} in the requested state")
        raise CheckpointMismatchError(
            f"Checkpoint step {step} at {path} does not match the requested state: {what}. "
            "The config differs from the run's: resume with the run's own config "
            "(config.json in the workdir) or start a new workdir.")


def _check_values(stored: list[LeafFingerprint], restored: list[LeafFingerprint], step: int,
                  path: str, corrupt) -> None:
    if [f.path for f in stored] != [f.path for f in restored]:
        raise corrupt(step, path, "the restored tree differs from the one saved")
    for want, got in zip(stored, restored):
        if want.shape != got.shape or not _close(want, got):
            raise corrupt(
                step, os.path.join(path, "device"),
                f"leaf '{want.path}' does not match its saved fingerprint (sum {got.sum:.6g} vs "
                f"{want.sum:.6g}, checksum {got.checksum} vs {want.checksum}, shape {got.shape} vs "
                f"{want.shape})")


def _close(want: LeafFingerprint, got: LeafFingerprint) -> bool:
    if want.checksum is not None and got.checksum is not None and want.checksum != got.checksum:
        return False
    tol = _SUM_RTOL * max(want.abs_sum, got.abs_sum) + 1e-6
    return all(a == b or (np.isnan(a) and np.isnan(b)) or abs(a - b) <= tol
               for a, b in ((want.sum, got.sum), (want.abs_sum, got.abs_sum)))


# -- small helpers --------------------------------------------------------------------


def _path(keypath) -> str:
    return jax.tree_util.keystr(keypath, simple=True, separator="/") or "<root>"


def _canonical_json(host_state: dict) -> Any:
    """JSON round trip, so the saved and restored host state (and checksum) are identical."""
    if not isinstance(host_state, dict):
        raise TypeError(f"host_state must be a dict, got {type(host_state).__name__}.")
    try:
        return json.loads(json.dumps(host_state))
    except (TypeError, ValueError) as err:
        raise TypeError(f"host_state is not JSON-serialisable at {_find_bad(host_state)}: {err}. "
                        "Convert it to int/float/str/list/dict (.item(), .tolist()).") from err


def _find_bad(obj: Any, where: str = "host_state") -> str:
    if isinstance(obj, dict):
        for k, v in obj.items():
            bad = _find_bad(v, f"{where}[{k!r}]")
            if bad:
                return bad
        return ""
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad = _find_bad(v, f"{where}[{i}]")
            if bad:
                return bad
        return ""
    try:
        json.dumps(obj)
        return ""
    except (TypeError, ValueError):
        return where


def _sha256(record: Any) -> str:
    blob = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _describe(err: BaseException) -> str:
    """The root cause's type and first line: orbax wraps a tensorstore error (which names
    the array and the file, e.g. 'OUT_OF_RANGE: Error reading "params.w/4.0" in OCDBT
    database at local file ...') in an Exception whose first line says neither."""
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {_first_line(err)}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0][:300] if text else "")

