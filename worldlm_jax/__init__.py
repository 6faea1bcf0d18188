"""WorldLM in JAX: federated pre-training of language models over a tree of federations.

The Python entry point is `worldlm_jax.train(config, workdir, callbacks=...)`
(`config`: a Config, a preset name or a YAML path), the `worldlm` command's
`train` as a function. Importing the package stays cheap: JAX and the engine
load on first use, after `train` has laid out the CPU devices.

The public API is `__all__` below. The subpackages, from the bottom up:

    errors, tree_ops   ConfigError; gathers and segment sums over stacked pytrees
    model              the decoder (Flax), B and K by path
    plugins            every named-rule registry and its built-ins; the plug-in loader
    tree               the federation tree and each federation's rules
    data               corpus, tfds builder, tokenizer, per-client streams
    privacy            DP mechanism, accounting, per-federation ledgers
    engine             the one jitted round; strategies as plans
    config             Config, presets, YAML loading
    outputs            checkpoints, metrics, plots, reports
    run                one run: build, loop, record
    sweeps             grids of runs, vectorised sweeps
    cli                the `worldlm` command

Each subpackage's `__all__` is stable; paths below it are not. Old flat paths
(`worldlm_jax.optimizers`, ...) still import the moved modules (`moved`).
"""
from __future__ import annotations

import importlib

from worldlm_jax import moved

moved.install()

_PUBLIC = {  # name -> (module, attribute); loaded on first use
    "train": ("worldlm_jax.run.training", "train"),
    "Callback": ("worldlm_jax.plugins.callbacks", "Callback"),
    "RunContext": ("worldlm_jax.plugins.callbacks", "RunContext"),
    "Config": ("worldlm_jax.config.schema", "Config"),
    "ConfigError": ("worldlm_jax.errors", "ConfigError"),
    "load_config": ("worldlm_jax.config.loading", "load"),
    "apply_overrides": ("worldlm_jax.config.schema", "apply_overrides"),
    "Plan": ("worldlm_jax.engine.plan", "Plan"),
    "StrategyDef": ("worldlm_jax.engine.strategies", "StrategyDef"),
    "register_optimizer": ("worldlm_jax.plugins.optimizers", "register"),
    "register_schedule": ("worldlm_jax.plugins.schedules", "register"),
    "register_objective": ("worldlm_jax.plugins.objectives", "register"),
    "register_aggregator": ("worldlm_jax.plugins.aggregators", "register"),
    "register_attack": ("worldlm_jax.plugins.attacks", "register"),
    "register_codec": ("worldlm_jax.plugins.codecs", "register"),
    "Codec": ("worldlm_jax.plugins.codecs", "Codec"),
    "register_callback": ("worldlm_jax.plugins.callbacks", "register"),
    "register_strategy": ("worldlm_jax.engine.strategies", "register"),
}
_SUBPACKAGES = ("config", "data", "engine", "model", "outputs", "plugins", "privacy", "run", "sweeps", "tree")

__all__ = [*_PUBLIC, *_SUBPACKAGES]


def __getattr__(name: str):
    if name in _PUBLIC:
        module, attribute = _PUBLIC[name]
        return getattr(importlib.import_module(module), attribute)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"worldlm_jax.{name}")
    raise AttributeError(f"module 'worldlm_jax' has no attribute {name!r}")
