"""WorldLM in JAX: federated pre-training of language models over a tree of federations.

The Python entry point is `worldlm_jax.train(config, workdir, callbacks=...)`
(`config`: a Config, a preset name or a YAML path), the `worldlm` command's
`train` as a function. Importing the package stays cheap: JAX and the engine
load on first use, after `train` has laid out the CPU devices.
"""
from __future__ import annotations

import importlib

__all__ = ["train", "Callback"]


def __getattr__(name: str):
    if name == "train":  # the submodule, callable as the function (train._CallableModule)
        return importlib.import_module("worldlm_jax.train")
    if name == "Callback":
        from worldlm_jax.callbacks import Callback
        return Callback
    raise AttributeError(f"module 'worldlm_jax' has no attribute {name!r}")
