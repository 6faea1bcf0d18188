"""Run directories: whether a config may resume one, and whether it is finished.

A run directory holds its `config.yaml`, checkpoints and, once done, its
`summary.json`. `worldlm train`, the Python API and sweeps all ask the same
two questions of it before training.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

from worldlm_jax.config import Config, ConfigError, load_yaml
from worldlm_jax.config.schema import _to_plain

SUMMARY_FILE = "summary.json"

# Fields that may differ between a run dir's saved config and the config used to
# resume it: they change how long, how often or where, not what is trained, so the
# rounds already run keep their numbers. Among them:
# - run.callbacks: callbacks only read each round's record and may stop the run
#   (with one present the loop reads metrics a round earlier; the records are the
#   same), so adding an early stop to a running run, or dropping one, is safe.
# - plugins: where user code is imported from, not what is trained: every name the
#   run uses from a plug-in (an optimizer, aggregator, schedule, strategy) is a
#   field of its own and still compared, and a plug-in file's contents are not
#   compared either way, so a moved plug-in (another path) may resume the run.
# - run.slot_layout: where the client slots sit on the devices (it follows run.devices);
#   the clients' state is stored per client, not per slot, so it changes only the
#   order in which the same sums are added.
RESUMABLE_KEYS = ("run.rounds", "run.eval_every", "run.checkpoint_every", "run.compilation_cache",
                  "run.chunk", "run.devices", "run.slot_layout", "run.callbacks", "plugins")


def flatten_config(config: Config) -> dict[str, Any]:
    """{'run.rounds': 10, 'tree': {...}, ...}: dotted keys down to non-dataclass values."""
    out: dict[str, Any] = {}

    def visit(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                visit(value, key + ".")
            else:
                out[key] = _to_plain(value)
    visit(config, "")
    return out


def config_changes(old: Config, new: Config, ignore: Sequence[str] = RESUMABLE_KEYS) -> list[str]:
    """Dotted keys whose values differ (except `ignore`)."""
    a, b = flatten_config(old), flatten_config(new)
    return [k for k in a if k not in ignore and a[k] != b.get(k)]


def check_resumable(workdir: str, config: Config) -> None:
    """Raise ConfigError when `workdir` holds a run trained with a different config.

    Resuming such a run would silently continue with other hyper-parameters (or
    fail deep inside checkpoint restore); only the RESUMABLE_KEYS may change.
    """
    saved = os.path.join(workdir, "config.yaml")
    if not os.path.isdir(os.path.join(workdir, "checkpoints")) or not os.path.exists(saved):
        return
    changed = config_changes(load_yaml(saved), config)
    if changed:
        shown = ", ".join(changed[:6]) + (", ..." if len(changed) > 6 else "")
        raise ConfigError(f"{workdir} holds a run with a different config (differs in: {shown}); "
                          "resume it with its own config (--config "
                          f"{saved}), or use another --workdir")


def finished_summary(workdir: str, rounds: int, stopped: bool = True) -> dict | None:
    """The run's summary if it is finished, else None: it completed `rounds`
    rounds, or (`stopped`) a callback stopped it (`stopped_by`: the run's own
    decision, whatever its run.rounds; Ctrl-C's interruption is not one)."""
    path = os.path.join(workdir, SUMMARY_FILE)
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    if summary.get("rounds_completed") == rounds and not summary.get("interrupted"):
        return summary
    if stopped and summary.get("stopped_by"):
        return summary
    return None
