"""Aggregators: how a federation combines its children's backbone updates.

Each federation names one in its policy (`aggregator`, arguments in
`aggregator_args`); the result is the pseudo-gradient its server optimizer
steps with. Two kinds:

- **streamed**: `transform(delta_N, args_N) -> delta_N` reshapes each child's
  update on its own (row by row), and the engine takes the data-weighted mean
  as sums, chunk by chunk: memory does not grow with the number of children.
  `mean` (the default, FedAvg) and `clipped_mean`.
- **stacked**: `combine(delta_N, weight_N, parent_N, n_parents, args_P) ->
  delta_P` sees every child's update at once. At the client level the engine
  then keeps each slot's backbone update until the level aggregates: memory
  grows with the client slots (one backbone per slot, on the slot's device).
  Coordinate-wise `median` and `trimmed_mean` (Yin et al. 2018).

Children with weight 0 (absent, padding, diverged) must not count: the
engine drops them from a streamed mean, a `combine` ignores them. `args_N` holds the
arguments of each child's federation, `args_P` of each federation; every
argument is a float with a default declared by the aggregator.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from worldlm_jax import tree_ops
from worldlm_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class Aggregator:
    transform: Callable | None = None  # streamed: (delta_N, args_N) -> delta_N, row by row
    combine: Callable | None = None  # stacked: (delta_N, weight_N, parent_N, n_parents, args_P) -> delta_P
    args: Mapping[str, float] = dataclasses.field(default_factory=dict)  # argument -> default

    def __post_init__(self):
        if self.transform is not None and self.combine is not None:
            raise ValueError("an aggregator is either streamed (transform) or stacked (combine), not both")

    @property
    def streamed(self) -> bool:
        return self.combine is None


AGGREGATORS: Registry[Aggregator] = Registry("aggregator", "worldlm_jax.aggregators.register(name, Aggregator(...))")


def register(name: str, aggregator: Aggregator) -> Aggregator:
    if not isinstance(aggregator, Aggregator):
        raise TypeError(f"aggregator {name!r} must be an Aggregator, got {type(aggregator).__name__}")
    return AGGREGATORS.register(name, aggregator)


def get(name: str, field: str = "aggregator") -> Aggregator:
    return AGGREGATORS.get(name, field)


# ---- helpers for stacked rules ---------------------------------------------------
def members(weight_N: jax.Array, parent_N: jax.Array, n_parents: int) -> jax.Array:
    """(P, N) whether child n takes part in federation p's aggregate."""
    return (parent_N[None, :] == jnp.arange(n_parents)[:, None]) & (weight_N[None, :] > 0)


def per_federation(fn: Callable, delta_N, weight_N, parent_N, n_parents: int):
    """Apply `fn(values_PxN, member_PxN) -> (P, ...)` to every leaf, with each
    federation's row of children (fp32; non-members are for `fn` to ignore).
    Memory: P x N x leaf size for the leaf being combined."""
    member = members(weight_N, parent_N, n_parents)

    def leaf(x):
        values = jnp.broadcast_to(x.astype(jnp.float32)[None], (n_parents,) + x.shape)
        return fn(values, tree_ops.expand_rows(member, values)).astype(x.dtype)

    return jax.tree.map(leaf, delta_N)


def _median(delta_N, weight_N, parent_N, n_parents, args_P):
    """Coordinate-wise median of the participating children (0 with none)."""
    def fn(values, member):
        m = jnp.nanmedian(jnp.where(member, values, jnp.nan), axis=1)
        return jnp.where(jnp.isnan(m), 0.0, m)
    return per_federation(fn, delta_N, weight_N, parent_N, n_parents)


def _trimmed_mean(delta_N, weight_N, parent_N, n_parents, args_P):
    """Coordinate-wise mean after dropping the `trim` fraction of largest and of
    smallest values among each federation's n participants (at least one stays)."""
    n_P = jnp.sum(members(weight_N, parent_N, n_parents), axis=1).astype(jnp.float32)
    drop_P = jnp.minimum(jnp.floor(args_P["trim"] * n_P), jnp.floor((n_P - 1.0) / 2.0))
    drop_P = jnp.maximum(drop_P, 0.0)

    def fn(values, member):
        ordered = jnp.sort(jnp.where(member, values, jnp.inf), axis=1)  # participants first, ascending
        rank = jnp.arange(values.shape[1], dtype=jnp.float32).reshape((1, -1) + (1,) * (values.ndim - 2))
        lo, hi = tree_ops.expand_rows(drop_P, ordered), tree_ops.expand_rows(n_P - drop_P, ordered)
        keep = (rank >= lo) & (rank < hi)
        kept = jnp.maximum(tree_ops.expand_rows(n_P - 2.0 * drop_P, ordered[:, 0]), 1.0)
        return jnp.sum(jnp.where(keep, ordered, 0.0), axis=1) / kept
    return per_federation(fn, delta_N, weight_N, parent_N, n_parents)


def _clip_transform(delta_N, args_N):
    """Scale each child's update to L2 norm at most `clip` (bounded, not excluded)."""
    norm_N = jnp.sqrt(tree_ops.row_sq_norms(delta_N))
    scale_N = jnp.minimum(1.0, args_N["clip"] / jnp.maximum(norm_N, 1e-12))
    return tree_ops.scale_rows(scale_N, delta_N)


register("mean", Aggregator())
register("clipped_mean", Aggregator(transform=_clip_transform, args={"clip": 1.0}))
register("median", Aggregator(combine=_median))
register("trimmed_mean", Aggregator(combine=_trimmed_mean, args={"trim": 0.1}))
