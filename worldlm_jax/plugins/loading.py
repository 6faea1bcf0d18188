"""User modules imported before a config is read: the way researchers add named plug-ins.

A plug-in is a dotted module name (imported with `importlib`, so it must be on
`sys.path`) or a path to a `.py` file. Importing it runs its `register(...)`
calls, so the optimizers, schedules, aggregators, strategies and callbacks it
adds can be named in the same config. `worldlm --plugin SPEC` and a config's
top-level `plugins:` list both come here; relative paths in a YAML's list are
relative to that YAML's folder, and the saved config.yaml keeps absolute paths
so `worldlm eval` and a resume import the same files.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
import types
from typing import Iterable

from worldlm_jax.errors import ConfigError

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_LOADED: dict[str, types.ModuleType] = {}  # resolved spec -> module: a file is executed once per process


class PluginError(ConfigError):
    """A plug-in that cannot be found or fails to import; one line naming both."""


def is_file(spec: str) -> bool:
    """'my_plugins.py' and 'lib/opt.py' are files; 'mylab.optimizers' is a module."""
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def resolve(spec: str, base_dir: str | None = None) -> str:
    """The form a config stores: an absolute path for a file (relative ones
    resolved against `base_dir`, default the working directory), the name for a
    module."""
    if not isinstance(spec, str) or not spec.strip():
        raise PluginError(f"plugin {spec!r}: expected a module name or a path to a .py file")
    spec = spec.strip()
    if not is_file(spec):
        if not _MODULE_NAME.match(spec):
            raise PluginError(f"plugin {spec!r}: not a dotted module name nor a .py path")
        return spec
    path = os.path.expanduser(spec)
    if not os.path.isabs(path):
        path = os.path.join(base_dir or os.getcwd(), path)
    return os.path.realpath(path)


def module_name(path: str) -> str:
    """A stable module name for a plug-in file: its stem plus a hash of its path,
    so two files called `plugins.py` in different folders do not collide, and
    classes defined in it pickle under the same name in every process."""
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    return f"worldlm_plugin_{stem}_{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def load(spec: str, base_dir: str | None = None) -> types.ModuleType:
    """Import one plug-in (once: a second load of the same file or module
    returns the module without running it again, so nothing registers twice)."""
    resolved = resolve(spec, base_dir)
    if resolved in _LOADED:
        return _LOADED[resolved]
    try:
        module = _import_file(resolved) if is_file(resolved) else importlib.import_module(resolved)
    except PluginError:
        raise
    except (Exception, SystemExit) as e:  # a plug-in's own error becomes one line, not a traceback
        detail = " ".join(str(e).split()) or "(no message)"
        raise PluginError(f"plugin {spec!r} failed to import: {type(e).__name__}: {detail}") from e
    _LOADED[resolved] = module
    return module


def load_all(specs: Iterable[str], base_dir: str | None = None) -> tuple[str, ...]:
    """Import every plug-in in order; returns their resolved specs (what a
    config's `plugins` field keeps), without repeats."""
    resolved = []
    for spec in specs:
        load(spec, base_dir)
        name = resolve(spec, base_dir)
        if name not in resolved:
            resolved.append(name)
    return tuple(resolved)


def _import_file(path: str) -> types.ModuleType:
    if not os.path.isfile(path):
        raise PluginError(f"plugin file {path!r} not found")
    name = module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin {path!r}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses and pickle look the module up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
