"""Client objectives: how a client's local loss differs from the plain LM loss,
and any state the method keeps between rounds.

A `ClientObjective` is chosen per run (`algorithm.client_objective`); its
hyperparameters are per federation (`objective_args` in a federation's
policy, defaults from the objective), so federations tune their own `mu` in
one compiled round. The engine calls, for every client slot:

    loss(loss_fn, params, tokens, ctx)  -> (value to differentiate, (lm loss, tokens))
    after_training(ctx, params, steps, lr) -> (the client's new state, report)

and for every leaf federation that received reports this round:

    update_federation(federation_state, mean report, args) -> new federation state

`ctx` (an `ObjectiveContext`) holds the parameters the client started from,
its own kept state, its federation's state and the federation's arguments.
States are pytrees of the objective's choosing (`init_client`,
`init_federation` from the initial parameters), kept one row per client and
per leaf federation in the engine state and checkpointed with it. FedProx
needs only `loss`; SCAFFOLD (scripts/examples/scaffold.py) uses all of it.

An objective may report metrics (`metrics`, optional; after_training's
arguments): `{name: scalar}` for one client, averaged over each leaf
federation's participating clients and logged as
`level{d}/plugin/objective/<objective>/<name>` (null at a DP federation:
docs/metrics.md).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from worldlm_jax.plugins.registry import Registry


class ObjectiveContext(NamedTuple):
    start: Any  # the parameters the client started this round from
    client: Any  # this client's kept state ({} when the objective keeps none)
    federation: Any  # its leaf federation's state ({} when none)
    args: Mapping[str, jax.Array]  # hyperparameters: the federation's values


@dataclasses.dataclass(frozen=True)
class ClientObjective:
    loss: Callable | None = None  # (loss_fn, params, tokens, ctx) -> (value, (lm_loss, n_tokens)); None = loss_fn
    args: Mapping[str, float] = dataclasses.field(default_factory=dict)  # hyperparameter -> default
    init_client: Callable | None = None  # (params) -> one client's state
    init_federation: Callable | None = None  # (params) -> one leaf federation's state
    after_training: Callable | None = None  # (ctx, params, steps, lr) -> (client state, report)
    update_federation: Callable | None = None  # (federation state, mean report, args) -> federation state
    # optional, logged per leaf federation: (ctx, params, steps, lr) -> {name: scalar} for one client,
    # averaged over the federation's participating clients
    metrics: Callable | None = None

    def __post_init__(self):
        if self.update_federation is not None and self.after_training is None:
            raise ValueError("a client objective with update_federation needs after_training to report to it")


OBJECTIVES: Registry[ClientObjective] = Registry(
    "client objective", "worldlm_jax.plugins.objectives.register(name, ClientObjective(...))", ClientObjective)
register = OBJECTIVES.register  # (name, ClientObjective(...)): usable by name in configs


def get(name: str, field: str = "algorithm.client_objective") -> ClientObjective:
    return OBJECTIVES.get(name, field)


def squared_distance(a, b) -> jax.Array:
    """sum |a - b|^2 over every leaf (fp32)."""
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _fedprox_loss(loss_fn, params, tokens, ctx: ObjectiveContext):
    """FedProx (Li et al. 2020): loss + mu/2 |w - w_start|^2 keeps a client near
    what its federation sent."""
    loss, n_tokens = loss_fn(params, tokens)
    return loss + 0.5 * ctx.args["mu"] * squared_distance(params, ctx.start), (loss, n_tokens)


register("none", ClientObjective())
register("fedprox", ClientObjective(loss=_fedprox_loss, args={"mu": 0.01}))
