"""The modules that moved into subpackages, and their old import paths.

A plug-in file written against the flat layout (`from worldlm_jax import
optimizers`) keeps working, and so does a resumed run whose saved config
names such a file: each old path below imports the moved module itself (the
same module object, so a registration or a monkeypatch through either name is
one), with a DeprecationWarning. These paths go in a later release; new code
imports the new ones.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {  # old path (worldlm_jax.<old>) -> new module
    "optimizers": "plugins.optimizers", "schedules": "plugins.schedules", "objectives": "plugins.objectives",
    "aggregators": "plugins.aggregators", "attacks": "plugins.attacks", "callbacks": "plugins.callbacks",
    "strategies": "engine.strategies", "registry": "plugins.registry", "configs": "config.presets",
    "topology": "tree.topology", "policy": "tree.policy", "metrics": "outputs.metrics", "plots": "outputs.plots",
    "report": "outputs.report", "checkpoint": "outputs.checkpoint", "vectorized": "sweeps.vectorized",
    "sweep": "sweeps.grid", "accounting": "privacy.accounting", "dp_ledger": "privacy.ledger",
    "model_config": "model.config", "partition": "model.partition", "experiment": "run.experiment",
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves `worldlm_jax.<old>` to the module it moved to."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.rpartition(".")
        if package != "worldlm_jax" or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = "worldlm_jax." + MOVED[spec.name.rpartition(".")[2]]
        warnings.warn(f"{spec.name} moved to {new}; the old path goes in a later release",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):  # the moved module is already executed
        pass


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
