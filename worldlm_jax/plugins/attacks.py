"""Byzantine clients, simulated inside the compiled round.

A leaf federation's policy names an `attack` and how many of its clients are
attackers (`attackers`: its first k clients, the same ones every round, as
colluding or compromised devices would be; or `attacker_fraction` of them).
After local training an attacker's update (its backbone and key-layer parts)
is replaced by what the attack sends; the engine then treats it like any
other update (the norm bound and non-finite check still apply), so robust
aggregators (`aggregators`) and key-layer attention see the attack.

An attack is `apply(update_B, update_K, key, args) -> (update_B, update_K)`
for ONE client (vmapped over slots), with `args` the federation's
`attack_args` (scalars; defaults declared by the attack) and `key` the
client's own random key this round.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from worldlm_jax.plugins.registry import Registry


@dataclasses.dataclass(frozen=True)
class Attack:
    apply: Callable  # (update_B, update_K, key, args) -> (update_B, update_K)
    args: Mapping[str, float] = dataclasses.field(default_factory=dict)  # argument -> default


ATTACKS: Registry[Attack] = Registry(
    "attack", "worldlm_jax.plugins.attacks.register(name, Attack(...))", Attack)
register = ATTACKS.register  # (name, Attack(...)): usable by name in configs


def get(name: str, field: str = "attack") -> Attack:
    return ATTACKS.get(name, field)


def _scaled(factor):
    return lambda b, k, key, args: (jax.tree.map(lambda x: factor(args) * x, b),
                                    jax.tree.map(lambda x: factor(args) * x, k))


def _noise(b, k, key, args):
    """Pure Gaussian noise of standard deviation `std` per coordinate."""
    leaves, treedef = jax.tree.flatten((b, k))
    keys = jax.random.split(key, max(len(leaves), 1))
    noisy = [args["std"] * jax.random.normal(kk, x.shape, jnp.float32).astype(x.dtype) for kk, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, noisy)


def _constant(b, k, key, args):
    """Every attacker sends the same update, `value` in every coordinate
    (colluders agreeing on one direction)."""
    return jax.tree.map(lambda x: jnp.full_like(x, args["value"]), (b, k))


def _key_takeover(b, k, key, args):
    """An honest backbone and a key-layer update blown up `factor` times: the
    children's mean delta, attention's query, then points at the attacker, whose
    similarity (and so attention weight) approaches 1."""
    return b, jax.tree.map(lambda x: args["factor"] * x, k)


def _nan(b, k, key, args):
    """A broken client: its update is NaN (the engine must exclude it)."""
    return jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), (b, k))


register("none", Attack(apply=lambda b, k, key, args: (b, k)))
register("nan", Attack(apply=_nan))
register("sign_flip", Attack(apply=_scaled(lambda args: -args["scale"]), args={"scale": 1.0}))
register("scale", Attack(apply=_scaled(lambda args: args["factor"]), args={"factor": 10.0}))
register("noise", Attack(apply=_noise, args={"std": 0.1}))
register("constant", Attack(apply=_constant, args={"value": 0.1}))
register("key_takeover", Attack(apply=_key_takeover, args={"factor": 100.0}))
