"""Checkpoints of a run: the device state (any pytree of jax.Arrays) and the host state.

One orbax ``CheckpointManager`` under ``workdir/checkpoints`` keeps two items per
step: ``device`` (the pytree, orbax StandardSave: sharded, async) and ``host`` (a
JSON dict: round, seeds, sampler position, accountant, ...).

Why the extra bookkeeping: orbax happily restores whatever is on disk. A run that
resumes from a silently damaged or mismatched checkpoint wastes a cluster-week, so
the host JSON also stores a small fingerprint of the device state (per-leaf
path, shape, dtype, sum, sum of |x| and a checksum of the bits) and a SHA-256 over host state +
fingerprint. ``restore`` checks the requested structure against the fingerprint
*before* reading arrays (so a config change names the first differing leaf),
wraps every read failure in a ``CheckpointError`` that names the step, the path
and the fix, and re-checks the restored values against the fingerprint.

The fingerprint is needed: tensorstore reports missing or truncated chunks, but
a garbled byte inside a raw array chunk is read back silently (checked with
orbax 0.12.8). The sums name what changed in readable terms; the checksum (a
position-weighted sum of the raw bits modulo 2^32, with odd weights) is what makes
it exact: any single flipped bit changes it, a low mantissa bit included, which
the sums cannot see. It is not a cryptographic hash (a deliberate forgery passes).
Checkpoints written before the checksum existed are checked on the sums alone.

Orbax notes (0.12.8):
- optax NamedTuple states come back as NamedTuples only when restoring into an
  abstract target; without one they come back as plain containers.
- Small arrays are inlined in the OCDBT b-tree (``device/d/``); large ones live in
  ``device/ocdbt.process_*/d/``. Either being damaged surfaces as a ValueError
  from tensorstore, which we wrap.
- A missing item surfaces as KeyError; garbled JSON as JSONDecodeError.
- When a read fails, orbax closes its asyncio loop while other tensorstore reads
  are pending; their late callbacks log "Event loop is closed" (harmless).
- ``save`` copies arrays to host before returning (only the write is async), so
  the caller may donate/delete the buffers right after.
- ``all_steps``/``latest_step`` are cached: call ``reload`` after the directory
  changes under a live manager (we do so before every restore).

Interrupted saves (orbax 0.12.8, local or NFS paths: ``AtomicRenameTemporaryPath``):
a step is written under ``<step>.orbax-checkpoint-tmp`` (each item under
``<item>.orbax-checkpoint-tmp`` inside it), ``commit_success.txt`` is written and
the directory is renamed to ``<step>`` last. Steps are only ever found by the
``^<step>$`` name, so a process killed at any point of a save leaves the last good
step as the latest; old steps (``max_to_keep``) are deleted only after the new one
is committed. The leftover ``*.orbax-checkpoint-tmp`` directory is removed by the
first ``save`` of the next run (not at construction: a reader, e.g. ``worldlm eval``
on a live run, must not delete a writer's save in progress). tests/test_durability.py
SIGKILLs a saving process at several points to keep this true across orbax updates.
A rename is atomic against a killed process, not against a power cut on a
filesystem that reorders metadata (orbax does not fsync); the fingerprints then
report the damage and name the previous good step (``good_steps``).
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import shlex
import shutil
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

FORMAT_VERSION = 1
# `set_aside` renames a damaged step to `<step>.damaged`: orbax only lists `^<step>$` names.
SET_ASIDE_SUFFIX = ".damaged"
_BARRIERS = itertools.count()  # orbax barrier names must be unique
# Relative tolerance on per-leaf sums: restoring onto another sharding changes the
# float32 reduction order, which moves the sum by ~log2(n) * 1e-7 of sum(|x|).
_SUM_RTOL = 1e-4


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or incomplete; the message says how to fix it."""


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
                f"{self.good_step}, move the damaged step aside: {aside} (or delete {bad}), then "
                f"rerun the same command; to read step {self.good_step} without that: "
                f"Checkpointer.restore(step={self.good_step}) or `worldlm eval --workdir "
                f"{os.path.dirname(self.directory)} --step {self.good_step}`.")


class LeafFingerprint(NamedTuple):
    path: str
    shape: tuple[int, ...]
    dtype: str
    sum: float
    abs_sum: float
    checksum: int | None = None  # None: written before checksums (sums only)


class Checkpointer:
    """Saves and restores ``(device_state, host_state)`` under ``workdir/checkpoints``.

    ``save`` is asynchronous: it returns once arrays are copied off the device, and
    ``wait``/``close`` make the checkpoint durable. Use as a context manager to
    never lose the last save.
    """

    def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int | None = 3,
                 save_interval_steps: int = 1, async_save: bool = True):
        # max_to_keep=3 (not 1): fallback_to_previous needs an earlier good step.
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._cleaned_interrupted = False

    # -- saving -------------------------------------------------------------------

    def save(self, step: int, device_state: Any, host_state: dict, force: bool = False) -> bool:
        """Saves ``step`` if the save interval says so (or ``force``); returns whether it did."""
        if not force and not self._manager.should_save(step):
            return False
        if not self._cleaned_interrupted:  # the writer's first save: a dead run's leftovers
            self.remove_interrupted_saves()
            self._cleaned_interrupted = True
        record = {"host_state": _canonical_json(host_state),
                  "device_fingerprint": [list(f) for f in fingerprint(device_state)]}
        payload = {"format": FORMAT_VERSION, "sha256": _sha256(record), **record}
        args = ocp.args.Composite(device=ocp.args.StandardSave(device_state),
                                  host=ocp.args.JsonSave(payload))
        return bool(self._manager.save(step, args=args, force=force))

    def wait(self) -> None:
        """Blocks until every pending save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases orbax's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- querying -----------------------------------------------------------------

    def all_steps(self) -> list[int]:
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def saved_shapes(self, step: int | None = None) -> dict[str, tuple[int, ...]]:
        """Shape of every saved leaf of ``step`` (default: the latest), by path, from
        the host record alone (no array is read): lets a caller restore a state
        whose layout depends on the device count onto another device count."""
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"No checkpoint found in {self.directory}.")
        try:
            payload = self._read_host_payload(steps[-1] if step is None else step)
        except CheckpointCorruptError as err:  # no abstract state here: a cheap check
            raise self._offer_previous(err, None, deep=False) from err
        return {p: tuple(shape) for p, shape, *_ in payload["device_fingerprint"]}

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def interrupted_saves(self) -> list[str]:
        """Directories of saves that never committed (``*.orbax-checkpoint-tmp``): a
        process died mid-save. They are never restored; ``save`` removes them."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(str(p.get()) for p in ocp.path.step.all_temporary_paths(self.directory))

    def remove_interrupted_saves(self) -> list[str]:
        """Deletes the leftovers of interrupted saves (process 0 only); returns them.
        Only for the run's writer: a reader would delete a live writer's save."""
        if jax.process_index() != 0:
            return []
        removed = self.interrupted_saves()
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed

    def verify(self, step: int, abstract_state: Any = None, *, deep: bool = True) -> None:
        """Raises ``CheckpointCorruptError`` if ``step`` is damaged.

        ``deep``: read every array and check it against its fingerprint (as ``restore``
        does; the arrays land as ``abstract_state`` says, else as saved). Otherwise only
        the host record (with its checksum) is read and the device item's presence checked.
        """
        steps = self.all_steps()
        if step not in steps:
            raise CheckpointError(f"No checkpoint for step {step} in {self.directory}; "
                                  f"available steps: {steps}.")
        if deep:
            device_state, _ = self._restore_step(step, abstract_state)
            del device_state
            return
        self._read_host_payload(step)
        device = os.path.join(self.step_path(step), "device")
        if not os.path.isdir(device):
            raise self._corrupt(step, device, "item 'device' is missing")

    def good_steps(self, abstract_state: Any = None, *, deep: bool = True,
                   below: int | None = None, limit: int | None = None) -> list[int]:
        """Steps that pass ``verify`` (``deep`` as there), newest first; ``below``: only
        earlier steps; ``limit``: stop after that many good ones (``limit=1``: the step a
        resume would use). A structure mismatch counts as not good. Deep checks read every
        array of every step examined."""
        good = []
        for step in reversed(self.all_steps()):
            if below is not None and step >= below:
                continue
            try:
                self.verify(step, abstract_state, deep=deep)
            except CheckpointError:
                continue
            good.append(step)
            if limit is not None and len(good) >= limit:
                break
        return good

    def set_aside(self, step: int) -> str:
        """Renames a (damaged) step to ``<step>.damaged`` (kept for inspection, never
        listed nor restored), so the run resumes from the step before; returns the new
        path. Process 0 renames; every process calls it and reloads after a barrier."""
        source = self.step_path(step)
        target = source + SET_ASIDE_SUFFIX
        n = 1
        while os.path.exists(target):
            target, n = f"{source}{SET_ASIDE_SUFFIX}.{n}", n + 1
        if jax.process_index() == 0:
            os.rename(source, target)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"worldlm_set_aside_{step}_{next(_BARRIERS)}")
        self._manager.reload()
        return target

    # -- restoring ----------------------------------------------------------------

    def restore(self, step: int | None = None, abstract_state: Any = None, *,
                fallback_to_previous: bool = False) -> tuple[Any, dict]:
        """Returns ``(device_state, host_state)`` of ``step`` (default: the latest).

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with shardings
        (``jax.eval_shape`` of the init + shardings); it fixes the container types
        (optax NamedTuples) and where each array lands. Without it orbax returns
        plain containers of arrays as saved.

        A damaged step raises ``CheckpointCorruptError`` naming the step, the
        damaged item or leaf, and the previous good step (earlier steps are verified
        newest first, with ``abstract_state``, until one passes) with how to resume
        from it. With ``fallback_to_previous`` a damaged step is skipped with a warning
        and the next earlier step is tried; a structure mismatch (config change) is
        never skipped.
        """
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"No checkpoint found in {self.directory}. Start a fresh run "
                                  "or point the workdir at the run to resume.")
        if step is None:
            step = steps[-1]
        if step not in steps:
            raise CheckpointError(f"No checkpoint for step {step} in {self.directory}; "
                                  f"available steps: {steps}.")
        if not fallback_to_previous:
            try:
                return self._restore_step(step, abstract_state)
            except CheckpointCorruptError as err:
                raise self._offer_previous(err, abstract_state, deep=True) from err
        candidates = [s for s in reversed(steps) if s <= step]
        for candidate, previous in zip(candidates, candidates[1:]):
            try:
                return self._restore_step(candidate, abstract_state)
            except CheckpointCorruptError as err:
                warnings.warn(f"{err.summary} Falling back to step {previous}.", stacklevel=2)
            # a CheckpointMismatchError (config change) propagates: every earlier step
            # would mismatch too
        try:
            return self._restore_step(candidates[-1], abstract_state)
        except CheckpointCorruptError as err:  # the oldest: nothing earlier to offer
            raise err.with_good_step(None, (), deep=True) from err

    def _offer_previous(self, err: "CheckpointCorruptError", abstract_state: Any, *,
                        deep: bool) -> "CheckpointCorruptError":
        """``err`` with the newest earlier step that verifies (deep: reads its arrays)."""
        earlier = tuple(s for s in reversed(self.all_steps()) if s < err.step)
        found = self.good_steps(abstract_state, deep=deep, below=err.step, limit=1)
        good = found[0] if found else None
        checked = earlier if good is None else earlier[:earlier.index(good) + 1]
        return err.with_good_step(good, checked, deep)

    def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        payload = self._read_host_payload(step)
        stored = [LeafFingerprint(p, tuple(sh), *rest) for p, sh, *rest in payload["device_fingerprint"]]
        if abstract_state is not None:
            _check_structure(stored, abstract_state, step, self.step_path(step))
        device_state = self._read(step, "device", ocp.args.StandardRestore(abstract_state))
        _check_values(stored, fingerprint(device_state), step, self.step_path(step), self._corrupt)
        return device_state, payload["host_state"]

    def _read_host_payload(self, step: int) -> dict:
        payload = self._read(step, "host", ocp.args.JsonRestore())
        path = os.path.join(self.step_path(step), "host")
        fields = {"format", "sha256", "host_state", "device_fingerprint"}
        if (not isinstance(payload, dict) or not fields <= payload.keys()
                or payload["format"] != FORMAT_VERSION):
            raise self._corrupt(step, path, "the host JSON is not a worldlm_jax "
                                f"checkpoint record (format {FORMAT_VERSION})")
        record = {k: payload[k] for k in ("host_state", "device_fingerprint")}
        if _sha256(record) != payload["sha256"]:
            raise self._corrupt(step, path, "the host record's checksum does not match")
        return payload

    def _read(self, step: int, item: str, restore_args: Any) -> Any:
        """Reads one item, turning orbax/tensorstore failures into a CheckpointError."""
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{item: restore_args}))
            value = restored[item]
        except Exception as err:  # orbax raises KeyError/ValueError/JSONDecodeError/OSError...
            path = os.path.join(self.step_path(step), item)
            raise self._corrupt(step, path, _describe(err)) from err
        if value is None:
            path = os.path.join(self.step_path(step), item)
            raise self._corrupt(step, path, f"item '{item}' is missing")
        return value

    def _corrupt(self, step: int, path: str, why: str) -> "CheckpointCorruptError":
        return CheckpointCorruptError(step, path, why, directory=self.directory)


# -- fingerprints ---------------------------------------------------------------------


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

