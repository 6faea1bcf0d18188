"""What the package promises by name: every name in every `__all__` resolves, the
public entry points are the objects their modules define, and the old flat
paths are the moved modules themselves (so a registration or a monkeypatch
through either name is one)."""
import importlib
import pkgutil
import sys

import pytest

import worldlm_jax
from worldlm_jax import moved


def _modules():
    yield worldlm_jax
    for info in pkgutil.walk_packages(worldlm_jax.__path__, "worldlm_jax."):
        if not info.name.endswith(".__main__"):  # `python -m worldlm_jax.cli` runs the command
            yield importlib.import_module(info.name)


@pytest.mark.parametrize("module", list(_modules()), ids=lambda m: m.__name__)
def test_every_name_in_all_resolves(module):
    names = getattr(module, "__all__", [])
    assert len(names) == len(set(names)), f"{module.__name__}.__all__ lists a name twice"
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"{module.__name__}.__all__ names what it does not have: {missing}"
    assert not [n for n in names if n.startswith("_")], f"{module.__name__}.__all__ exports private names"


def test_the_public_entry_points_are_the_defined_objects():
    from worldlm_jax.config import loading, schema
    from worldlm_jax.engine import plan, strategies
    from worldlm_jax.plugins import aggregators, callbacks, optimizers
    from worldlm_jax.run import training

    assert worldlm_jax.train is training.train and callable(worldlm_jax.train)
    assert worldlm_jax.Config is schema.Config and worldlm_jax.load_config is loading.load
    assert worldlm_jax.Plan is plan.Plan and worldlm_jax.StrategyDef is strategies.StrategyDef
    assert worldlm_jax.Callback is callbacks.Callback
    assert worldlm_jax.register_optimizer is optimizers.register
    assert worldlm_jax.register_aggregator is aggregators.register
    assert worldlm_jax.register_strategy is strategies.register


def _forget_old_path(old: str) -> None:
    """As in a fresh process: the old path not imported yet (it warns once per process)."""
    sys.modules.pop(f"worldlm_jax.{old}", None)
    worldlm_jax.__dict__.pop(old, None)


@pytest.mark.parametrize("old", sorted(moved.MOVED))
def test_an_old_flat_path_is_the_moved_module(old):
    new = importlib.import_module("worldlm_jax." + moved.MOVED[old])
    _forget_old_path(old)
    with pytest.warns(DeprecationWarning, match=f"worldlm_jax.{old} moved to"):
        alias = importlib.import_module(f"worldlm_jax.{old}")
    assert alias is new


def test_a_plugin_written_against_the_flat_layout_registers_in_the_moved_registry(tmp_path):
    """A resumed run re-imports the plug-in files its config names, which say
    `from worldlm_jax import optimizers`: their entries land where the config looks."""
    plugin = tmp_path / "old_style_plugin.py"
    plugin.write_text("import optax\nfrom worldlm_jax import optimizers\n"
                      "optimizers.register('old_style_sgd', lambda: optax.sgd(1.0))\n")
    from worldlm_jax.plugins import loading, optimizers

    _forget_old_path("optimizers")
    with pytest.warns(DeprecationWarning):
        loading.load(str(plugin))
    assert "old_style_sgd" in optimizers.names()
