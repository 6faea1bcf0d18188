"""Named optimizers for clients and servers; researchers register their own.

Every factory returns an optax transformation with learning rate 1: the
engine multiplies updates by each federation's own learning rate, so rates
stay per-federation arrays in one compiled round. Server optimizers receive the
pseudo-gradient -mean(child deltas) (Reddi et al. 2021, "Adaptive Federated
Optimization"): `sgd` with lr 1 is FedAvg, `momentum` FedAvgM, `adam` FedAdam,
`yogi` FedYogi, `adagrad` FedAdagrad, and `nesterov` (SGD with Nesterov momentum
0.9) DiLoCo's outer optimizer (Douillard et al. 2023, used there with lr 0.7; the
`diloco` strategy sets that rate at the root, `engine.strategies`).
"""
from __future__ import annotations

from typing import Callable

import optax

from worldlm_jax.plugins.registry import Registry

Factory = Callable[[], optax.GradientTransformation]

OPTIMIZERS: Registry[Factory] = Registry("optimizer", "worldlm_jax.plugins.optimizers.register(name, factory)")
_BUILT_IN: dict[str, Factory] = {
    "sgd": lambda: optax.sgd(1.0),
    "momentum": lambda: optax.sgd(1.0, momentum=0.9),
    # trace <- g + 0.9 trace; step = g + 0.9 trace (PyTorch's SGD(nesterov=True), as DiLoCo uses it)
    "nesterov": lambda: optax.sgd(1.0, momentum=0.9, nesterov=True),
    # Server-side adaptive optimizers use eps ~1e-3 (Reddi et al. 2021, tuned range).
    "adam": lambda: optax.adam(1.0, b1=0.9, b2=0.99, eps=1e-3),
    "yogi": lambda: optax.yogi(1.0, b1=0.9, b2=0.99, eps=1e-3),
    "adagrad": lambda: optax.adagrad(1.0, eps=1e-3),
    # Client-side default: AdamW as in LM pre-training.
    "adamw": lambda: optax.adamw(1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1),
    "client_adam": lambda: optax.adam(1.0, b1=0.9, b2=0.95, eps=1e-8),
}
for _name, _factory in _BUILT_IN.items():
    OPTIMIZERS.register(_name, _factory)


def register(name: str, factory: Factory) -> Factory:
    """Add an optimizer usable by name in configs and tree policies
    (`factory()` returns an optax transformation with learning rate 1)."""
    if not callable(factory):
        raise TypeError(f"optimizer factory for {name!r} must be callable, got {type(factory).__name__}")
    return OPTIMIZERS.register(name, factory)


def names() -> tuple[str, ...]:
    return OPTIMIZERS.names()


def get(name: str, field: str = "optimizer") -> optax.GradientTransformation:
    return OPTIMIZERS.get(name, field)()
