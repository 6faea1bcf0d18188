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

import itertools
import os
import shutil
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from worldlm_jax.outputs.fingerprints import (SET_ASIDE_SUFFIX, CheckpointCorruptError, CheckpointError,
                                              CheckpointMismatchError, CheckpointStepNotSavedError,
                                              LeafFingerprint, _canonical_json, _check_structure,
                                              _check_values, _describe, _sha256, fingerprint, leaf_paths)

__all__ = [  # errors and fingerprints live in fingerprints.py; callers reach them here too
    "Checkpointer", "CheckpointError", "CheckpointMismatchError", "CheckpointCorruptError",
    "CheckpointStepNotSavedError", "LeafFingerprint",
    "fingerprint", "leaf_paths", "FORMAT_VERSION", "SET_ASIDE_SUFFIX"]

FORMAT_VERSION = 1
_BARRIERS = itertools.count()  # orbax barrier names must be unique


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

    def check_saved(self, step: int | None = None) -> list[int]:
        """The saved steps; raises CheckpointError when there are none, and
        CheckpointStepNotSavedError when ``step`` is not one of them: a step that
        was never saved is not a damaged one (nothing needs moving or deleting)."""
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"No checkpoint found in {self.directory}. Start a fresh run "
                                  "or point the workdir at the run to resume.")
        if step is not None and step not in steps:
            raise CheckpointStepNotSavedError(step, self.directory, steps)
        return steps

    def saved_shapes(self, step: int | None = None) -> dict[str, tuple[int, ...]]:
        """Shape of every saved leaf of ``step`` (default: the latest), by path, from
        the host record alone (no array is read): lets a caller restore a state
        whose layout depends on the device count onto another device count."""
        steps = self.check_saved(step)  # before reading: orbax calls a missing step unreadable
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
        self.check_saved(step)
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

    def set_aside(self, step: int, suffix: str = SET_ASIDE_SUFFIX) -> str:
        """Renames a (damaged) step to ``<step><suffix>`` (kept for inspection, never
        listed nor restored), so the run resumes from the step before; returns the new
        path. Process 0 renames; every process calls it and reloads after a barrier."""
        source = self.step_path(step)
        target = source + suffix
        n = 1
        while os.path.exists(target):
            target, n = f"{source}{suffix}.{n}", n + 1
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
        steps = self.check_saved(step)
        if step is None:
            step = steps[-1]
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
