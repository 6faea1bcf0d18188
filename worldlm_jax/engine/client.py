"""Local training of ONE client: a `lax.scan` over its local optimizer steps.

Written for a single client and vmapped (or chunk-mapped, or sharded) over the
client-slot axis by the engine. The optimizer is any optax transformation built
with learning rate 1; the client's own learning rate multiplies its updates, so
per-federation learning rates are plain arrays (exact for optax's sgd, adam,
adamw, ..., which all end with a learning-rate scaling).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

Params = Any
LossFn = Callable[[Params, jax.Array], tuple[jax.Array, jax.Array]]


class ClientResult(NamedTuple):
    params: Params  # parameters after local training
    opt_state: Any  # optimizer state after local training
    loss_sum: jax.Array  # sum over active steps of the mean batch loss
    steps: jax.Array  # active steps taken
    tokens: jax.Array  # target tokens seen


def make_local_update(loss_fn: LossFn, tx: optax.GradientTransformation, masked_steps: bool = True,
                      objective_fn: Callable | None = None, constrain: Callable = lambda tree: tree):
    """Returns `local_update(params, opt_state, tokens_ExBxL1, lr, n_steps) -> ClientResult`.

    `n_steps` (<= E) lets federations with fewer local steps share one compiled
    round: steps past it leave the parameters unchanged. With
    `masked_steps=False` every one of the E steps is taken (faster: no select).
    `objective_fn(params, tokens) -> (value, (loss, n_tokens))`, when given, is
    what the client descends (e.g. FedProx's proximal loss); `loss` is reported.
    `constrain(tree) -> tree` places the weights, their gradients and optimizer
    state at every step (a model axis: `parallel.constrain_model`).
    """
    if objective_fn is None:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    else:
        objective_grad = jax.value_and_grad(objective_fn, has_aux=True)
        grad_fn = lambda p, t: (lambda out: (out[0][1], out[1]))(objective_grad(p, t))

    def local_update(params, opt_state, tokens_ExBxL1, lr, n_steps) -> ClientResult:
        def step(carry, xs):
            params, opt_state = carry
            i, tokens_BxL1 = xs
            (loss, n_tokens), grads = grad_fn(params, tokens_BxL1)
            updates, next_state = tx.update(constrain(grads), opt_state, params)
            stepped = jax.tree.map(lambda p, u: (p + lr * u).astype(p.dtype), params, updates)
            stepped, next_state = constrain(stepped), constrain(next_state)
            if masked_steps:
                active = i < n_steps
                stepped = jax.tree.map(lambda a, b: jnp.where(active, a, b), stepped, params)
                next_state = jax.tree.map(lambda a, b: jnp.where(active, a, b), next_state, opt_state)
                loss, n_tokens = loss * active, n_tokens * active
            return (stepped, next_state), (loss, n_tokens)

        n_local = tokens_ExBxL1.shape[0]
        (params, opt_state), (losses, tokens) = jax.lax.scan(
            step, (params, opt_state), (jnp.arange(n_local), tokens_ExBxL1))
        steps = jnp.minimum(n_steps, n_local) if masked_steps else jnp.asarray(n_local)
        return ClientResult(params, opt_state, jnp.sum(losses), steps.astype(jnp.float32),
                            jnp.sum(tokens).astype(jnp.float32))

    return local_update
