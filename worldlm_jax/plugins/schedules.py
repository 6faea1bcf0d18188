"""Learning-rate schedules over root rounds, evaluated inside the compiled round.

A schedule is a pure function `factor(round, warmup, decay, floor)` of jnp
scalars returning the multiplier of a federation's `client_lr` (at leaf
federations) or `server_lr` (at every federation). Its arguments are the
federation's policy fields `warmup_rounds`, `decay_rounds` (0 = the run's root
rounds) and `min_lr_ratio`, so they are arrays of the round's policies: a
vectorised sweep over a warmup length stays one compiled program. Schedules
advance with root rounds (a nested federation's inner rounds within one root
round share its rate); `round` counts from 0.

Any optax schedule (a function of the step count) fits too:
`register_optax("halving", optax.exponential_decay(1.0, 10, 0.5))`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from worldlm_jax.plugins import contract
from worldlm_jax.plugins.registry import Registry

Schedule = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

SCHEDULES: Registry[Schedule] = Registry("learning-rate schedule",
                                         "worldlm_jax.plugins.schedules.register(name, fn)")


def register(name: str, fn: Schedule) -> Schedule:
    """Add `fn(round, warmup, decay, floor) -> multiplier` under `name`."""
    if not callable(fn):
        raise TypeError(f"schedule {name!r} must be callable, got {type(fn).__name__}")
    return SCHEDULES.register(name, fn)


def register_optax(name: str, schedule: Callable[[jax.Array], jax.Array]) -> Schedule:
    """Add an optax schedule (`count -> value`, its value multiplies the
    policy's learning rate; warmup, decay and floor are its own)."""
    def factor(round, warmup, decay, floor):
        return schedule(round)
    factor.__wrapped__ = schedule  # where an error says it was defined: the schedule given, not this line
    return register(name, factor)


def _warmup(round, warmup):
    """Linear ramp reaching 1 at round `warmup` (round 0 runs at 1 / warmup)."""
    return jnp.where(warmup > 0, jnp.minimum((round + 1.0) / jnp.maximum(warmup, 1.0), 1.0), 1.0)


def _cosine(round, start, decay, floor):
    """Half a cosine from 1 at round `start` to `floor` at round `decay`."""
    progress = jnp.clip((round - start) / jnp.maximum(decay - start, 1.0), 0.0, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


register("constant", lambda round, warmup, decay, floor: jnp.ones_like(round))
register("linear_warmup", lambda round, warmup, decay, floor: _warmup(round, warmup))
register("cosine", lambda round, warmup, decay, floor: _cosine(round, 0.0, decay, floor))
register("warmup_cosine", lambda round, warmup, decay, floor:
         _warmup(round, warmup) * _cosine(round, warmup, decay, floor))


def factors(kinds: tuple[str, ...], choice_P: jax.Array, round, warmup_P, decay_P, floor_P) -> jax.Array:
    """(P,) each node's multiplier from its own schedule (`kinds[choice_P]`):
    every kind a level uses is evaluated and each node selects its own."""
    r = jnp.asarray(round, jnp.float32)
    out = jnp.ones(choice_P.shape, jnp.float32)
    for k, name in enumerate(kinds):
        value = jax.vmap(_checked(name), in_axes=(None, 0, 0, 0))(r, warmup_P, decay_P, floor_P)
        out = jnp.where(choice_P == k, jnp.asarray(value, jnp.float32), out)
    return out


def _checked(name: str) -> Schedule:
    """Schedule `name` for one node (vmapped), its factor checked to be a scalar."""
    fn = SCHEDULES.get(name)
    entry = contract.Entry(SCHEDULES.kind, name, fn)

    def factor(round, warmup, decay, floor):
        value = fn(round, warmup, decay, floor)
        contract.check_scalar(entry, value, "a factor", "a schedule returns one real multiplier of the rate per "
                              "federation, from scalar round, warmup, decay and floor")
        return value
    return factor
