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
  Coordinate-wise `median` and `trimmed_mean` (Yin et al. 2018), `multi_krum`
  (Blanchard et al. 2017) and `geometric_median` (Weiszfeld iterations, as in
  Pillutla et al. 2022's robust federated aggregation).

Children with weight 0 (absent, padding, diverged) must not count, and their
rows may hold anything, NaN and Inf included (a diverged client, a padding
slot, an attacker sending NaN): the engine selects them out of a streamed mean
(`tree_ops.weighted_sum`), and a `combine` masks them before every product or
sum over rows (`jnp.where`, `tree_ops.zero_absent_rows`; never by multiplying
with the weight: 0 * NaN is NaN). `args_N` holds the
arguments of each child's federation, `args_P` of each federation; every
argument is a float with a default declared by the aggregator.

An aggregator may report metrics (`metrics`, optional; same arguments as its
`transform` or `combine`), logged as `level{d}/plugin/aggregator/<name>/<metric>`
with one value per federation of the level (docs/metrics.md): a stacked rule
returns `{metric: (n_parents,)}`, a streamed one `{metric: (N,)}`, one value
per child, which the engine averages over each federation's participating
children. The same masking rule holds: an absent row must not count. A helper
shared by `combine` and `metrics` is computed once (XLA merges the same
computation on the same inputs). `trimmed_mean` and `multi_krum` report how
many children they kept (`kept`), `clipped_mean` the fraction it clipped
(`clipped`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from worldlm_jax import tree_ops
from worldlm_jax.plugins.registry import Registry


@dataclasses.dataclass(frozen=True)
class Aggregator:
    transform: Callable | None = None  # streamed: (delta_N, args_N) -> delta_N, row by row
    combine: Callable | None = None  # stacked: (delta_N, weight_N, parent_N, n_parents, args_P) -> delta_P
    args: Mapping[str, float] = dataclasses.field(default_factory=dict)  # argument -> default
    # optional, logged per federation: stacked (delta_N, weight_N, parent_N, n_parents, args_P) -> {name: (P,)};
    # streamed (delta_N, args_N) -> {name: (N,)}, averaged over each federation's participating children
    metrics: Callable | None = None

    def __post_init__(self):
        if self.transform is not None and self.combine is not None:
            raise ValueError("an aggregator is either streamed (transform) or stacked (combine), not both")

    @property
    def streamed(self) -> bool:
        return self.combine is None


AGGREGATORS: Registry[Aggregator] = Registry(
    "aggregator", "worldlm_jax.plugins.aggregators.register(name, Aggregator(...))", Aggregator)
register = AGGREGATORS.register  # (name, Aggregator(...)): usable by name in configs


def get(name: str, field: str = "aggregator") -> Aggregator:
    return AGGREGATORS.get(name, field)


# ---- helpers for stacked rules ---------------------------------------------------
def members(weight_N: jax.Array, parent_N: jax.Array, n_parents: int) -> jax.Array:
    """(P, N) whether child n takes part in federation p's aggregate."""
    return (parent_N[None, :] == jnp.arange(n_parents)[:, None]) & (weight_N[None, :] > 0)


def per_federation(fn: Callable, delta_N, weight_N, parent_N, n_parents: int):
    """Apply `fn(values_PxN, member_PxN) -> (P, ...)` to every leaf, with each
    federation's row of children (fp32; non-members are for `fn` to ignore:
    they may hold NaN, so `fn` selects them away with `jnp.where`).
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


def _trimmed_counts(weight_N, parent_N, n_parents, args_P):
    """(P,) each federation's participants n and how many it drops at each end."""
    n_P = jnp.sum(members(weight_N, parent_N, n_parents), axis=1).astype(jnp.float32)
    drop_P = jnp.minimum(jnp.floor(args_P["trim"] * n_P), jnp.floor((n_P - 1.0) / 2.0))
    return n_P, jnp.maximum(drop_P, 0.0)


def _trimmed_mean(delta_N, weight_N, parent_N, n_parents, args_P):
    """Coordinate-wise mean after dropping the `trim` fraction of largest and of
    smallest values among each federation's n participants (at least one stays)."""
    n_P, drop_P = _trimmed_counts(weight_N, parent_N, n_parents, args_P)

    def fn(values, member):
        ordered = jnp.sort(jnp.where(member, values, jnp.inf), axis=1)  # participants first, ascending
        rank = jnp.arange(values.shape[1], dtype=jnp.float32).reshape((1, -1) + (1,) * (values.ndim - 2))
        lo, hi = tree_ops.expand_rows(drop_P, ordered), tree_ops.expand_rows(n_P - drop_P, ordered)
        keep = (rank >= lo) & (rank < hi)
        kept = jnp.maximum(tree_ops.expand_rows(n_P - 2.0 * drop_P, ordered[:, 0]), 1.0)
        return jnp.sum(jnp.where(keep, ordered, 0.0), axis=1) / kept
    return per_federation(fn, delta_N, weight_N, parent_N, n_parents)


def _trimmed_kept(delta_N, weight_N, parent_N, n_parents, args_P):
    """How many of each federation's participants every coordinate's mean averages."""
    n_P, drop_P = _trimmed_counts(weight_N, parent_N, n_parents, args_P)
    return {"kept": n_P - 2.0 * drop_P}


def _flat_rows(delta_N, weight_N) -> jax.Array:
    """(N, size) every child's whole update as one fp32 row; rows of weight 0
    are 0 (whatever they held), so the products over rows below stay finite."""
    live = tree_ops.zero_absent_rows(delta_N, weight_N)
    return jnp.concatenate([x.reshape(x.shape[0], -1).astype(jnp.float32) for x in jax.tree.leaves(live)], 1)


def _unflat_rows(rows_P: jax.Array, like_N):
    """Rows (P, size) back into the tree of `like_N`'s leaves (P, ...)."""
    leaves, treedef = jax.tree.flatten(like_N)
    out, start = [], 0
    for x in leaves:
        size = math.prod(x.shape[1:])
        out.append(rows_P[:, start:start + size].reshape((rows_P.shape[0],) + x.shape[1:]).astype(x.dtype))
        start += size
    return jax.tree.unflatten(treedef, out)


def _krum_choice(delta_N, weight_N, parent_N, n_parents, args_P):
    """((P, N) the children each federation averages, (N, size) the rows); see `_multi_krum`."""
    member = members(weight_N, parent_N, n_parents).astype(jnp.float32)  # (P, N)
    rows = _flat_rows(delta_N, weight_N)  # absent rows 0: `rows @ rows.T` and `chosen @ rows` stay finite
    sq = jnp.sum(rows * rows, axis=1)
    dist = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * rows @ rows.T, 0.0)  # (N, N)
    dist = 0.5 * (dist + dist.T)  # exactly symmetric (the product's rounding need not be): ties stay ties
    n_P = jnp.sum(member, axis=1)
    f_P = jnp.clip(jnp.floor(args_P["byzantine"]), 0.0, jnp.maximum(n_P - 1.0, 0.0))
    others = (member[:, None, :] > 0) & ~jnp.eye(rows.shape[0], dtype=bool)[None]  # (P, N, N)
    nearest = jnp.sort(jnp.where(others, dist[None], jnp.inf), axis=2)
    k_P = jnp.clip(n_P - f_P - 2.0, 1.0, None)
    taken = jnp.arange(rows.shape[0], dtype=jnp.float32)[None, None, :] < k_P[:, None, None]
    score = jnp.sum(jnp.where(taken & jnp.isfinite(nearest), nearest, 0.0), axis=2)  # (P, N)
    score = jnp.where(member > 0, score, jnp.inf)
    m_P = jnp.maximum(n_P - f_P, 1.0).astype(jnp.int32)  # how many to keep
    threshold_P = jnp.take_along_axis(jnp.sort(score, axis=1), m_P[:, None] - 1, axis=1)  # the m-th best score
    return ((score <= threshold_P) & (member > 0)).astype(jnp.float32), rows


def _multi_krum(delta_N, weight_N, parent_N, n_parents, args_P):
    """Multi-Krum: score each participant by the summed squared distances to its
    n - f - 2 nearest fellow participants (f = `byzantine`, the attackers a
    federation tolerates) and average the n - f best-scored (unweighted). A tie
    at the boundary takes every tied child: with n - f - 2 = 1 two mutually
    nearest children score exactly alike, and picking one by its slot would
    make the result depend on the children's order."""
    chosen, rows = _krum_choice(delta_N, weight_N, parent_N, n_parents, args_P)
    mean_P = (chosen @ rows) / jnp.maximum(jnp.sum(chosen, axis=1, keepdims=True), 1.0)
    return _unflat_rows(mean_P, delta_N)


def _krum_kept(delta_N, weight_N, parent_N, n_parents, args_P):
    """How many participants each federation averaged (n - f, more with ties)."""
    return {"kept": jnp.sum(_krum_choice(delta_N, weight_N, parent_N, n_parents, args_P)[0], axis=1)}


GEOMETRIC_MEDIAN_ITERATIONS = 32  # Weiszfeld steps (each two products with the stacked updates)


def _geometric_median(delta_N, weight_N, parent_N, n_parents, args_P):
    """The data-weighted geometric median (argmin_z sum_i w_i |x_i - z|) by
    smoothed Weiszfeld iterations from the weighted mean."""
    member = members(weight_N, parent_N, n_parents)
    w_PxN = jnp.where(member, weight_N[None, :], 0.0)
    rows = _flat_rows(delta_N, weight_N)  # absent rows 0: `c_PxN @ rows` stays finite

    def weighted(c_PxN):
        return (c_PxN @ rows) / jnp.maximum(jnp.sum(c_PxN, axis=1, keepdims=True), 1e-12)

    sq_N = jnp.sum(rows * rows, axis=1)

    def step(_, z_P):  # distances from dot products: no (P, N, size) temporary
        sq_dist = sq_N[None, :] + jnp.sum(z_P * z_P, axis=1, keepdims=True) - 2.0 * z_P @ rows.T
        return weighted(w_PxN / jnp.maximum(jnp.sqrt(jnp.maximum(sq_dist, 0.0)), 1e-6))

    z_P = jax.lax.fori_loop(0, GEOMETRIC_MEDIAN_ITERATIONS, step, weighted(w_PxN))
    return _unflat_rows(z_P, delta_N)


def _clip_transform(delta_N, args_N):
    """Scale each child's update to L2 norm at most `clip` (bounded, not excluded)."""
    norm_N = jnp.sqrt(tree_ops.row_sq_norms(delta_N))
    scale_N = jnp.minimum(1.0, args_N["clip"] / jnp.maximum(norm_N, 1e-12))
    return tree_ops.scale_rows(scale_N, delta_N)


def _clipped(delta_N, args_N):
    """1 for a child whose update `clip` scales down, else 0 (averaged: the fraction clipped)."""
    return {"clipped": (tree_ops.row_sq_norms(delta_N) > jnp.square(args_N["clip"])).astype(jnp.float32)}


register("mean", Aggregator())
register("clipped_mean", Aggregator(transform=_clip_transform, args={"clip": 1.0}, metrics=_clipped))
register("median", Aggregator(combine=_median))
register("trimmed_mean", Aggregator(combine=_trimmed_mean, args={"trim": 0.1}, metrics=_trimmed_kept))
register("multi_krum", Aggregator(combine=_multi_krum, args={"byzantine": 1.0}, metrics=_krum_kept))
register("geometric_median", Aggregator(combine=_geometric_median))
