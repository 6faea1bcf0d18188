"""Named optimizers for clients and servers; researchers register their own.

Every factory returns an optax transformation with learning rate 1: the
engine multiplies updates by each federation's own learning rate, so rates
stay per-federation arrays in one compiled round. Server optimizers receive the
pseudo-gradient -mean(child deltas) (Reddi et al. 2021, "Adaptive Federated
Optimization"): `sgd` with lr 1 is FedAvg, `momentum` FedAvgM, `adam` FedAdam,
`yogi` FedYogi, `adagrad` FedAdagrad.
"""
from __future__ import annotations

from typing import Callable

import optax

Factory = Callable[[], optax.GradientTransformation]

_REGISTRY: dict[str, Factory] = {
    "sgd": lambda: optax.sgd(1.0),
    "momentum": lambda: optax.sgd(1.0, momentum=0.9),
    # Server-side adaptive optimizers use eps ~1e-3 (Reddi et al. 2021, tuned range).
    "adam": lambda: optax.adam(1.0, b1=0.9, b2=0.99, eps=1e-3),
    "yogi": lambda: optax.yogi(1.0, b1=0.9, b2=0.99, eps=1e-3),
    "adagrad": lambda: optax.adagrad(1.0, eps=1e-3),
    # Client-side default: AdamW as in LM pre-training.
    "adamw": lambda: optax.adamw(1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1),
    "client_adam": lambda: optax.adam(1.0, b1=0.9, b2=0.95, eps=1e-8),
}


def register(name: str, factory: Factory) -> None:
    """Add an optimizer usable by name in configs and tree policies."""
    if not callable(factory):
        raise TypeError(f"optimizer factory for {name!r} must be callable, got {type(factory).__name__}")
    _REGISTRY[name] = factory


def names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get(name: str) -> optax.GradientTransformation:
    if name not in _REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; registered: {', '.join(names())} "
                         "(add one with worldlm_jax.optimizers.register)")
    return _REGISTRY[name]()
