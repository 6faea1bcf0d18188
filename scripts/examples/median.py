"""A robust aggregator: the coordinate-wise median of the children's backbone
updates (Yin et al. 2018), registered by name and chosen per federation.

A stacked aggregator (`combine`) sees every child's update at once: rows of
`delta_N` are children, `parent_N` says whose federation each belongs to,
children with weight 0 (absent, padding, diverged) must be ignored, and it
returns one update per federation. The engine then keeps each client slot's
backbone update until the level aggregates (memory grows with the slots).
A streamed aggregator (`transform`, one row at a time) keeps the engine's
chunked sums instead; see docs/extending.md.

    worldlm train --plugin scripts/examples/median.py --config scripts/examples/median.yaml
"""
import jax
import jax.numpy as jnp

from worldlm_jax.plugins import aggregators


def coordinate_median(delta_N, weight_N, parent_N, n_parents, args_P):
    member_PxN = (parent_N[None, :] == jnp.arange(n_parents)[:, None]) & (weight_N[None, :] > 0)

    def median(x_N):
        rows = x_N.reshape(x_N.shape[0], -1).astype(jnp.float32)  # (N, size)
        values = jnp.where(member_PxN[:, :, None], rows[None], jnp.nan)  # (P, N, size)
        m = jnp.nanmedian(values, axis=1)
        return jnp.where(jnp.isnan(m), 0.0, m).reshape((n_parents,) + x_N.shape[1:]).astype(x_N.dtype)

    return jax.tree.map(median, delta_N)


aggregators.register("coordinate_median", aggregators.Aggregator(combine=coordinate_median))
