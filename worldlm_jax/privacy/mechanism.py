"""Differential privacy inside the round: DP-FedAvg's clipping and noised release,
and adaptive clipping (pure JAX, jit/vmap friendly).

A federation's children's updates are stacked along a leading axis N, one row
per child slot; `participate_N` says which rows count and `parent_N` which
federation (0..P-1) each row belongs to, so every federation of a tree level is
aggregated in one call with per-federation policies given as arrays over P.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models") gives user-level DP to the children of a federation: clip
each child's whole update to L2 norm `clip`, sum with weight 1 per participant
(a data-size weight would unbound one child's influence), add N(0, (z*clip)^2)
per coordinate and divide by a *fixed* expected participant count, so the
sensitivity of the released mean is clip / expected_count whoever took part.

What that costs in epsilon is the host's business: `accounting.py` (dp_accounting,
noise calibration, per-federation ledgers); validated per-federation settings
are `Policy` fields (policy.py), stacked per level by `policy_arrays.round_policies`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from worldlm_jax import tree_ops


Tree = dict  # flat {path: jax.Array}; any pytree works
f32 = jnp.float32


# --------------------------------------------- clipping and the noised release
def _bcast(v_N: jax.Array, leaf: jax.Array) -> jax.Array:
    """Shape a per-row vector (N,) to broadcast against a leaf (N, ...)."""
    return v_N.reshape(v_N.shape + (1,) * (leaf.ndim - 1))


def global_norms(updates_N: Tree) -> jax.Array:
    """L2 norm of each row over *all* leaves (fp32), shape (N,).

    User-level DP bounds a child's whole contribution, so the norm is global
    over every leaf that leaves the federation, not per leaf.
    """
    sq = [jnp.sum(jnp.square(x.astype(f32)), axis=tree_ops.trailing_axes(x)) for x in jax.tree.leaves(updates_N)]
    return jnp.sqrt(sum(sq))


def clip_updates(updates_N: Tree, clip_N: jax.Array) -> tuple[Tree, jax.Array]:
    """Scale row i by min(1, clip_i / norm_i); returns (clipped fp32, norms).

    Safe at norm 0 and with clip = +inf (both leave the row unchanged). Rows
    with non-finite norms pass through: filtering faulty children is the job
    of the fault/robust-aggregation step before DP.
    """
    norms_N = global_norms(updates_N)
    clip_N = jnp.asarray(clip_N, f32)
    scale_N = jnp.where(norms_N > clip_N, clip_N / norms_N, 1.0)
    clipped = jax.tree.map(lambda x: x.astype(f32) * _bcast(scale_N, x), updates_N)
    return clipped, norms_N


def leaf_keys(key: jax.Array, tree: Tree) -> Tree:
    """One PRNG key per leaf: `split(key, leaves)`, in flatten order.

    Depends only on the tree structure (dict keys flatten sorted), never on
    leaf values, so two same-shaped leaves get independent noise and the
    noise is reproducible from the key alone. Split, not `fold_in(key, i)`:
    a fold-in with a small index is what any other use of `key` might fold in.
    """
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, list(jax.random.split(key, max(len(leaves), 1))[:len(leaves)]))


def gaussian_noise(key: jax.Array, like_tree_P: Tree, std_P: jax.Array) -> Tree:
    """N(0, std_P[p]^2) noise (fp32) shaped like a stacked (P, ...) tree."""
    std_P = jnp.asarray(std_P, f32)
    return jax.tree.map(
        lambda k, x: jax.random.normal(k, x.shape, f32) * _bcast(std_P, x),
        leaf_keys(key, like_tree_P), like_tree_P)


class DpStats(NamedTuple):
    """Diagnostics of one DP aggregation. Not privatised: log, don't release."""
    norms_N: jax.Array           # pre-clip global norm per child row
    clipped_fraction_P: jax.Array  # share of participants that were clipped
    count_P: jax.Array           # number of participants per federation


def dp_mean(updates_N: Tree, participate_N: jax.Array, parent_N: jax.Array,
            n_parents: int, clip_P: jax.Array, noise_multiplier_P: jax.Array,
            expected_count_P: jax.Array, key: jax.Array) -> tuple[Tree, DpStats]:
    """DP-FedAvg mean per federation: clip, sum, add noise, divide by E[count].

    Args:
      updates_N: stacked child updates, leaves (N, ...).
      participate_N: (N,) participation; anything > 0 counts as weight 1
        (DP needs each child's contribution bounded by one clipped update).
      parent_N: (N,) int federation id of each row, in [0, n_parents).
      clip_P, noise_multiplier_P, expected_count_P: (P,) per-federation policy.
      key: one key for the whole call; split per leaf by `leaf_keys`.

    Returns ({path: (P, ...) fp32 mean}, DpStats).

    The two halves, `clipped_sums` and `dp_release`, also work apart: the
    engine streams `clipped_sums` over chunks of clients and releases once.
    """
    clip_P = jnp.asarray(clip_P, f32)
    sums_P, norms_N = clipped_sums(updates_N, participate_N, parent_N, n_parents, clip_P[parent_N])
    stats = dp_stats(norms_N, participate_N, parent_N, n_parents, clip_P)
    return dp_release(sums_P, stats.count_P, clip_P, noise_multiplier_P, expected_count_P, key), stats


def clipped_sums(updates_N: Tree, participate_N: jax.Array, parent_N: jax.Array, n_parents: int,
                 clip_N: jax.Array) -> tuple[Tree, jax.Array]:
    """Per federation, the sum of its participants' clipped updates; and every
    row's pre-clip norm. Sums over disjoint sets of rows add up, so this can
    run chunk by chunk."""
    clipped, norms_N = clip_updates(updates_N, clip_N)
    w_N = participate_N > 0
    # `where`, not a product: padding rows may hold garbage (even NaN).
    masked = jax.tree.map(lambda x: jnp.where(_bcast(w_N, x), x, 0.0), clipped)
    sums_P = jax.tree.map(lambda x: jax.ops.segment_sum(x, parent_N, num_segments=n_parents), masked)
    return sums_P, norms_N


def clipped_part_sums(parts_N: dict, participate_N: jax.Array, parent_N: jax.Array, n_parents: int,
                      clip_N: jax.Array) -> tuple[dict, jax.Array]:
    """`clipped_sums` with each part ({"B": tree, "K": tree}) clipped on its own
    to a share of the clip, clip * sqrt(share), shares proportional to the
    parts' sizes (summing to 1): a row's joint norm stays within `clip`, so the
    sensitivity, the noise and the accounting are those of `clipped_sums`,
    while a large part cannot scale the other down to nothing. For levels
    whose K "delta" is the distance between two states that drift apart (K
    aggregated there but never broadcast down), not an update. The norm
    returned per row is max over parts of norm / sqrt(share): > clip exactly
    where some part was clipped (what clipped fractions and adaptive clipping
    count)."""
    sizes = {name: sum(x[0].size for x in jax.tree.leaves(tree)) for name, tree in parts_N.items()}
    total = sum(sizes.values())
    sums, norms_N = {}, jnp.zeros(participate_N.shape, f32)
    for name, tree in parts_N.items():
        if not sizes[name]:
            sums[name] = tree
            continue
        root_share = (sizes[name] / total) ** 0.5
        sums[name], part_N = clipped_sums(tree, participate_N, parent_N, n_parents,
                                          jnp.asarray(clip_N, f32) * root_share)
        norms_N = jnp.maximum(norms_N, part_N / root_share)
    return sums, norms_N


def dp_stats(norms_N: jax.Array, participate_N: jax.Array, parent_N: jax.Array, n_parents: int,
             clip_P: jax.Array) -> DpStats:
    w_N = participate_N > 0
    seg = functools.partial(jax.ops.segment_sum, segment_ids=parent_N, num_segments=n_parents)
    count_P = seg(w_N.astype(f32))
    clipped_P = seg((w_N & (norms_N > jnp.asarray(clip_P, f32)[parent_N])).astype(f32))
    return DpStats(norms_N, clipped_P / jnp.maximum(count_P, 1.0), count_P)


def dp_release(sums_P: Tree, count_P: jax.Array, clip_P: jax.Array, noise_multiplier_P: jax.Array,
               expected_count_P: jax.Array, key: jax.Array) -> Tree:
    """Noised mean from clipped sums: (sum + N(0, (z clip)^2)) / E[count].

    A federation with noise_multiplier 0 has no guarantee to protect, so it
    divides by its actual participant count instead: with clip = inf that is
    exactly the plain participant mean (and 0 when nobody took part).
    """
    clip_P = jnp.asarray(clip_P, f32)
    z_P = jnp.asarray(noise_multiplier_P, f32)
    std_P = jnp.where(z_P > 0, z_P * clip_P, 0.0)  # 0 * inf would be NaN
    noise_P = gaussian_noise(key, sums_P, std_P)
    denom_P = jnp.where(z_P > 0, jnp.asarray(expected_count_P, f32), jnp.maximum(count_P, 1.0))
    return jax.tree.map(lambda s, e: (s + e) / _bcast(denom_P, s), sums_P, noise_P)


# ------------------------------------------------------------ adaptive clipping
class AdaptiveClipState(NamedTuple):
    """Per-federation clip norm for adaptive clipping (Andrew et al. 2021)."""
    clip: jax.Array                # (P,) current clip norm
    unclipped_fraction: jax.Array  # (P,) last noised estimate b_hat (for logs)


def adaptive_clip_init(clip_P: jax.Array) -> AdaptiveClipState:
    clip_P = jnp.asarray(clip_P, f32)
    return AdaptiveClipState(clip_P, jnp.zeros_like(clip_P))


def adaptive_clip_update(state: AdaptiveClipState, norms_N: jax.Array,
                         participate_N: jax.Array, parent_N: jax.Array,
                         target_quantile: jax.Array | float, lr: jax.Array | float,
                         noise_std_for_count: jax.Array | float, key: jax.Array, *,
                         expected_count_P: jax.Array) -> AdaptiveClipState:
    """Geometric quantile tracking: clip <- clip * exp(-lr * (b_hat - target)).

    Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning
    with Adaptive Clipping". b_i = [norm_i <= clip] among participants; the
    count is centred, sum(b_i - 1/2) (sensitivity 1/2), noised with
    N(0, noise_std_for_count^2) and divided by the expected count m:
    b_hat = (sum(b_i - 1/2) + noise) / m + 1/2. The privacy cost is paid by
    raising the update's noise, see `split_noise_multiplier`. Scalars or (P,)
    arrays for the settings; lr = 0 keeps a federation's clip fixed.
    """
    n_parents = state.clip.shape[0]
    w_N = participate_N > 0
    b_N = jnp.where(w_N, (norms_N <= state.clip[parent_N]).astype(f32) - 0.5, 0.0)
    centred_P = jax.ops.segment_sum(b_N, parent_N, num_segments=n_parents)
    noise_P = jax.random.normal(key, (n_parents,), f32) * jnp.asarray(noise_std_for_count, f32)
    b_hat_P = (centred_P + noise_P) / jnp.asarray(expected_count_P, f32) + 0.5
    lr = jnp.asarray(lr, f32)
    clip_P = state.clip * jnp.exp(-lr * (b_hat_P - jnp.asarray(target_quantile, f32)))
    # lr = 0 must keep the clip even where b_hat is undefined (expected count 0).
    return AdaptiveClipState(jnp.where(lr > 0, clip_P, state.clip), b_hat_P)


def split_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """Update noise z_u so update + centred count together cost a Gaussian z.

    Andrew et al. 2021, Thm 1: z_u = (z^-2 - (2 sigma_b)^-2)^(-1/2).
    """
    if noise_multiplier == 0:
        return 0.0
    if count_stddev <= noise_multiplier / 2:
        raise ValueError(
            f"clip_count_stddev={count_stddev} is too small for noise_multiplier="
            f"{noise_multiplier}: adaptive clipping needs clip_count_stddev > "
            f"noise_multiplier / 2 = {noise_multiplier / 2}; raise it (default: "
            f"expected participants / 20).")
    return (noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5
