"""Every named-rule registry with its built-in entries, and the loader of user
plug-in modules. A researcher adds a rule with the catalogue's `register` in a
module loaded by `--plugin` or a config's `plugins:` list (docs/extending.md).

    registry     Registry: the one class behind every catalogue (names, errors)
    optimizers   client and server optimizers (optax)
    schedules    learning-rate schedules over a federation's rounds
    objectives   client objectives (FedProx, SCAFFOLD, ...) and their state
    aggregators  backbone aggregators (mean, trimmed mean, multi-Krum, ...)
    attacks      simulated attacks a federation's attackers send
    codecs       what a message becomes on a link (casts, quantisers, top-k, sign) and its bits
    callbacks    run-loop callbacks (Callback, early stopping, ...)
    contract     what an entry returns, checked where the round calls it (PluginOutputError)
    loading      imports a plug-in module by name or .py path

Strategies (a plan plus a tree) register in `engine.strategies`. The names
below are stable (a catalogue module's documented contract and `register`
included); the modules' other names are not.
"""
from worldlm_jax.plugins import aggregators, attacks, callbacks, codecs, objectives, optimizers, schedules
from worldlm_jax.plugins.loading import PluginError, load, load_all
from worldlm_jax.plugins.registry import Registry, UnknownNameError

__all__ = ["optimizers", "schedules", "objectives", "aggregators", "attacks", "codecs", "callbacks", "load",
           "load_all",
           "PluginError", "Registry", "UnknownNameError"]
