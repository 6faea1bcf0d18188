"""FedProx (Li et al. 2020) written as a client objective, with its own
hyperparameter `mu` that each leaf federation sets in its policy.

A client objective wraps the LM loss: it returns the value the client descends
and, as auxiliary output, the plain loss (reported in metrics) and the token
count. `ctx.start` holds the parameters the client started the round from and
`ctx.args` its federation's arguments (defaults declared below).

    worldlm train --plugin scripts/examples/fedprox.py --config scripts/examples/fedprox.yaml
"""
import jax
import jax.numpy as jnp

from worldlm_jax.plugins import objectives


def proximal_loss(loss_fn, params, tokens, ctx):
    loss, n_tokens = loss_fn(params, tokens)
    distance = sum(jnp.sum(jnp.square(p.astype(jnp.float32) - s.astype(jnp.float32)))
                   for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(ctx.start)))
    return loss + 0.5 * ctx.args["mu"] * distance, (loss, n_tokens)


objectives.register("proximal", objectives.ClientObjective(loss=proximal_loss, args={"mu": 0.0}))
