"""Moving stacked parameter pytrees up and down the federation tree.

Every leaf of a stacked pytree has a leading node axis (one row per node of a
level, or per client slot). Broadcasting down one level is a gather by parent
index; aggregating up one level is a weighted segment sum. Both are pure and
work on any pytree, so nested aggregation is the same two functions repeated.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def gather(tree_P: PyTree, index_N: jax.Array) -> PyTree:
    """Row `index_N[i]` of every leaf: broadcast parents to their children."""
    return jax.tree.map(lambda x: jnp.take(x, index_N, axis=0), tree_P)


def expand_rows(w, x):
    """Reshape per-row values `w` (N,) or (N, M) to broadcast against leaf `x`."""
    return w.reshape(w.shape + (1,) * (x.ndim - w.ndim))


def weighted_sum(tree_N: PyTree, weight_N: jax.Array, segment_N: jax.Array, n_segments: int) -> PyTree:
    """Sum over children of `weight * value`, per parent segment (fp32).

    A child of weight 0 contributes nothing, even if its value is NaN or Inf, so
    padding slots and excluded (diverged) clients cannot poison a parent.
    """
    def one(x):
        x32 = x.astype(jnp.float32)
        w = expand_rows(weight_N.astype(jnp.float32), x32)
        contrib = jnp.where(w != 0, w * x32, 0.0)
        return jax.ops.segment_sum(contrib, segment_N, num_segments=n_segments, indices_are_sorted=False)

    return jax.tree.map(one, tree_N)


def zero_absent_rows(tree_N: PyTree, weight_N: jax.Array) -> PyTree:
    """Every leaf with the rows of non-positive weight (absent, padding,
    diverged) set to 0, selected away rather than multiplied by their weight.

    Such a row may hold anything, NaN and Inf included, and 0 * NaN is NaN: a
    rule that multiplies rows by weights or by each other (a matrix product, a
    distance, a Gram matrix) masks them with this first.
    """
    live_N = weight_N > 0
    return jax.tree.map(lambda x: jnp.where(expand_rows(live_N, x), x, jnp.zeros((), x.dtype)), tree_N)


def weighted_mean(tree_N: PyTree, weight_N: jax.Array, segment_N: jax.Array, n_segments: int):
    """Weighted mean of children per parent; parents with no weight get 0.

    Returns (mean tree, total weight per parent).
    """
    total_P = jax.ops.segment_sum(weight_N.astype(jnp.float32), segment_N, num_segments=n_segments)
    summed = weighted_sum(tree_N, weight_N, segment_N, n_segments)
    safe = jnp.where(total_P > 0, total_P, 1.0)
    return jax.tree.map(lambda s: s / expand_rows(safe, s), summed), total_P


def where_rows(mask_N: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """Per-row select: rows where mask is True take `new`, others keep `old`."""
    return jax.tree.map(lambda a, b: jnp.where(expand_rows(mask_N, a), a, b), new, old)


def sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: x.astype(jnp.float32) - y.astype(jnp.float32), a, b)


def add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: (x.astype(jnp.float32) + y).astype(x.dtype), a, b)


def scale_rows(scale_N: jax.Array, tree_N: PyTree) -> PyTree:
    return jax.tree.map(lambda x: expand_rows(scale_N, x) * x, tree_N)


def trailing_axes(x) -> tuple[int, ...]:
    """Every axis but the leading (row) one: reduced in place rather than after a
    reshape to (N, -1), which would gather a weight split over a model axis."""
    return tuple(range(1, x.ndim))


def row_sq_norms(tree_N: PyTree) -> jax.Array:
    """(N,) squared L2 norm of each row over all leaves (fp32)."""
    leaves = jax.tree.leaves(tree_N)
    if not leaves:
        return jnp.zeros(())
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=trailing_axes(x)) for x in leaves)


def row_all_finite(tree_N: PyTree) -> jax.Array:
    """(N,) True where every entry of the row is finite."""
    leaves = jax.tree.leaves(tree_N)
    ok = [jnp.all(jnp.isfinite(x), axis=trailing_axes(x)) for x in leaves]
    out = ok[0]
    for o in ok[1:]:
        out = out & o
    return out


def stack_rows(tree: PyTree, n: int) -> PyTree:
    """A tree with a new leading axis of `n` identical rows."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree)
