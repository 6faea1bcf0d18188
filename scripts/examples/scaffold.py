"""SCAFFOLD (Karimireddy et al. 2020, "Stochastic Controlled Averaging for
Federated Learning") as a client objective, written against the public API.

Each client keeps a control variate c_i and each leaf federation a control
variate c, both shaped like the model. A client descends its loss corrected by
c - c_i (the gradient of the linear term <w, c - c_i> below), then moves c_i
by option II of the paper, c_i+ = c_i - c + (x - y_i) / (K * lr), and reports
the change; its federation adds the mean change to c (all clients taking part:
the paper's |S| / N is 1). Exact with plain SGD clients (`client_optimizer:
sgd`); with adaptive optimizers the correction is applied through them.

    worldlm train --plugin scripts/examples/scaffold.py --config tiny \\
        --set algorithm.client_objective=scaffold --set algorithm.client_optimizer=sgd
"""
import jax
import jax.numpy as jnp

from worldlm_jax.plugins import objectives


def zeros_like_model(params):
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)


def corrected_loss(loss_fn, params, tokens, ctx):
    loss, n_tokens = loss_fn(params, tokens)
    correction = jax.tree.map(lambda c, c_i: jax.lax.stop_gradient(c - c_i), ctx.federation, ctx.client)
    linear = sum(jnp.sum(p.astype(jnp.float32) * g) for p, g in zip(jax.tree.leaves(params),
                                                                    jax.tree.leaves(correction)))
    return loss + linear, (loss, n_tokens)


def after_training(ctx, params, steps, lr):
    inverse_step = 1.0 / jnp.maximum(steps * lr, 1e-12)
    new_c_i = jax.tree.map(lambda c_i, c, x, y: c_i - c + (x.astype(jnp.float32) - y.astype(jnp.float32)) * inverse_step,
                           ctx.client, ctx.federation, ctx.start, params)
    # a client that took no step reports no change
    new_c_i = jax.tree.map(lambda new, old: jnp.where(steps > 0, new, old), new_c_i, ctx.client)
    return new_c_i, jax.tree.map(jnp.subtract, new_c_i, ctx.client)


def update_federation(c, mean_change, args):
    return jax.tree.map(jnp.add, c, mean_change)


objectives.register("scaffold", objectives.ClientObjective(
    loss=corrected_loss, init_client=zeros_like_model, init_federation=zeros_like_model,
    after_training=after_training, update_federation=update_federation))
