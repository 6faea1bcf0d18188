"""The leaf level's aggregation where its federations live: attention over K,
personal keys and stacked aggregators on a federation-local slot layout.

Under `run.slot_layout: local` with at least as many leaf federations as
devices (`statics.device_rows`: L rows on each of M devices, every federation's
slots on its own device), a federation's children, its K, its query and its
attention weights all sit on one device, so attention, personal keys and a stacked aggregator's combine
(`aggregators`: median, trimmed mean, which see every child's backbone update)
run there, on the device's own rows and slots (`jax.shard_map` over `clients`,
local indices): a device holds its own federations' children, never every
federation's (a median over P federations x N children, per leaf, before).
Two things cross devices: the residual candidates (the related federations'
residual K) and the children's pairwise cosines (a diagnostic over every pair
of slots). Both go round the devices (`ring`: each device's block passed on
M - 1 times with `ppermute`, each visiting block combined with the device's
own rows), so a device holds its own rows and one visiting block, never the
leaf level whole: the attention's memory per device does not grow with the
number of federations. What it computes equals the level-wide attention
(`aggregation.attend_keys` on whole arrays) up to the order of its sums.

Where federations span device groups (fewer federations than devices) the
level-wide form stays: few federations are cheap to gather.

How it composes: DP changes nothing here (a federation whose K is released
replaces the attended K with its release afterwards, `federation.aggregate_keys`);
NaN rows of absent slots and padding rows are masked before any product, as in
`aggregation` (padding federations may use no candidate); a model axis stays
automatic inside the map; across processes the ring's `ppermute`s are
collectives like the others (gloo on CPU); a vectorised sweep maps the round,
and so this, within each point's device group; the state and its layout on
disk are unchanged, so a resume is too.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from worldlm_jax import tree_ops
from worldlm_jax.engine import aggregation, parallel
from worldlm_jax.engine.parallel import AXIS, P

__all__ = ["applies", "attend_keys", "combine", "personal_keys", "sharded_pairs"]


def applies(device_rows: tuple | None) -> bool:
    """Whether the leaf level's aggregation runs where it lives: a federation-local
    layout in which every federation sits on one device (`statics.device_rows`)."""
    return device_rows is not None and device_rows[2] == 1


def ring(fn: Callable, block, n_devices: int, carry):
    """Fold `fn(carry, visiting_block, source_device)` over every device's block:
    the device's own first, then M - 1 times the block its neighbour passes on
    (after r passes a device holds the block of device (me - r) mod M). Inside
    the device map."""
    me = jax.lax.axis_index(AXIS)
    carry = fn(carry, block, me)
    if n_devices == 1:
        return carry
    perm = [(j, (j + 1) % n_devices) for j in range(n_devices)]

    def body(state, r):
        acc, visiting = state
        visiting = jax.lax.ppermute(visiting, AXIS, perm)
        return (fn(acc, visiting, (me - r) % n_devices), visiting), None

    (carry, _), _ = jax.lax.scan(body, (carry, block), jnp.arange(1, n_devices))
    return carry


def ring_residuals(R_L: dict, n_devices: int, rows: int, n_candidates: int, onehot, groups, residual_dim: int,
                   split: bool) -> Callable:
    """`attend_keys`'s residual source for a device holding residual rows `R_L`
    (its L rows of the level's residual K; every device's together are the M
    candidates, padded to n_devices x L): dot products and weighted sums taken
    block by block round the devices."""
    M, L, F = n_devices, rows, n_candidates

    def source(allowed_LxF) -> aggregation.Residuals:
        # a candidate no attending node of any device may use is zeroed before any product
        used_F = jax.lax.psum(jnp.any(allowed_LxF, axis=0).astype(jnp.int32), AXIS) > 0
        used_L = jax.lax.dynamic_slice_in_dim(jnp.pad(used_F, (0, M * L - F)), jax.lax.axis_index(AXIS) * L, L)
        R = tree_ops.zero_absent_rows({p: x.astype(jnp.float32) for p, x in R_L.items()}, used_L.astype(jnp.float32))
        Re = aggregation.sketch(R, residual_dim) if residual_dim > 0 else R
        in_place = split and residual_dim == 0
        n_groups = next(iter(onehot.values())).shape[-1]

        def dots(Ke, Me):
            def step(acc, blk, src):
                rr, kr, mr = acc
                at = src * L
                return (jax.lax.dynamic_update_slice_in_dim(rr, aggregation._rowdot(blk, blk, onehot), at, 0),
                        jax.lax.dynamic_update_slice_in_dim(kr, aggregation._gram(Ke, blk, onehot, in_place), at, 1),
                        jax.lax.dynamic_update_slice_in_dim(mr, aggregation._gram(Me, blk, onehot, in_place), at, 1))

            zero = (jnp.zeros((M * L, n_groups)), jnp.zeros((L, M * L, n_groups)), jnp.zeros((L, M * L, n_groups)))
            rr, kr, mr = ring(step, Re, M, zero)
            return rr[:F], kr[:, :F], mr[:, :F]

        def mix(a_LxFxG):
            a = jnp.pad(a_LxFxG, ((0, 0), (0, M * L - F), (0, 0)))

            def step(acc, blk, src):
                a_blk = jax.lax.dynamic_slice_in_dim(a, src * L, L, axis=1)  # (L, L, G): this block's weights
                return {p: acc[p] + jnp.tensordot(a_blk[:, :, groups[p]], blk[p], axes=(1, 0)) for p in acc}

            return ring(step, R, M, {p: jnp.zeros(x.shape, jnp.float32) for p, x in R.items()})

        return aggregation.Residuals(dots, mix)

    return source


def ring_pairs(n_devices: int, n_slots: int, split: bool) -> Callable:
    """`attend_keys`'s child-pairs function for a device holding n of the level's
    N slots: its rows of the (N, N) cosine matrix, the columns block by block
    round the devices (None beyond `aggregation.SIMILARITY_MATRIX_MAX` slots)."""
    def pairs(delta_n, live_n, onehot):
        if n_slots > aggregation.SIMILARITY_MATRIX_MAX:
            return None
        n = live_n.shape[0]
        sq_n = jnp.maximum(aggregation._rowdot(delta_n, delta_n, onehot), 0.0)

        def step(acc, blk, src):
            delta_b, sq_b, live_b = blk
            cos = aggregation.pair_cosines(aggregation._gram(delta_n, delta_b, onehot, split), sq_n, sq_b, live_n,
                                           live_b)
            return jax.lax.dynamic_update_slice_in_dim(acc, cos, src * n, 1)

        return ring(step, (delta_n, sq_n, live_n), n_devices, jnp.zeros((n, n_slots)))

    return pairs


def sharded_pairs(mesh, split: bool) -> Callable:
    """`attend_keys`'s child-pairs function for children stored as rows sharded
    over `clients` (a level above the leaf with at least a row per device, or
    the slots of a spread layout): the (N, N) cosines computed round the
    devices, so no device gathers every child's K for the diagnostic."""
    M = mesh.shape[AXIS]

    def pairs(delta_N, live_N, onehot):
        N = live_N.shape[0]
        if N > aggregation.SIMILARITY_MATRIX_MAX:
            return None
        pad = -N % M  # padding rows: zero deltas, absent (cosine 0)
        padded = lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        inner = ring_pairs(M, N + pad, split)
        out = _on_devices(lambda d, live: inner(d, live, onehot), mesh, jax.tree.map(padded, delta_N),
                          padded(live_N))
        return out[:N, :N]

    return pairs


def _on_devices(fn: Callable, mesh, *args):
    """`fn` on each device's rows and slots (every argument sharded along its
    leading axis over `clients`, and so every output); manual over `clients`
    only, so a model axis stays automatic inside."""
    manual = frozenset({AXIS}) if parallel.MODEL in mesh.axis_names else frozenset()
    return jax.shard_map(fn, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS), axis_names=manual,
                         check_vma=False)(*args)


def attend_keys(mesh, device_rows: tuple, slot_row_N, node_K_P, child_K_N, child_weight_N,
                policy: aggregation.AttentionPolicy, groups, similarity: str, residual_K_M=None,
                residual_mask_PxM=None, parent_K_P=None, residual_dim: int = 0, robust: bool = False,
                split: bool = False):
    """`aggregation.attend_keys` for the leaf level of a federation-local layout
    (`applies`), on each device's own rows: `slot_row_N` is each slot's row on its
    device (`Topology.slot_row`). Returns what it returns, for the level's F
    federations and N slots."""
    M, L, _ = device_rows
    F = jax.tree.leaves(node_K_P)[0].shape[0]
    N = child_weight_N.shape[0]
    rows = lambda tree: parallel.to_device_rows(tree, M, L, 1)
    has_residuals = residual_K_M is not None and residual_mask_PxM is not None
    has_parent = parent_K_P is not None
    paths = sorted(node_K_P)
    onehot = aggregation._group_matrix(paths, groups, max(groups[p] for p in paths) + 1) if paths else {}

    def on_device(K_L, child_K_n, w_n, row_n, policy_L, R_L, mask_L, parent_L):
        source = (ring_residuals(R_L, M, L, F, onehot, groups, residual_dim, split) if has_residuals else None)
        return aggregation.attend_keys(
            K_L, child_K_n, w_n, row_n, policy_L, groups, similarity,
            residual_K_M=R_L if has_residuals else None, residual_mask_PxM=mask_L if has_residuals else None,
            parent_K_P=parent_L if has_parent else None, residual_dim=residual_dim, robust=robust, split=split,
            residual_source=source, child_pairs=ring_pairs(M, N, split))

    empty = jnp.zeros((M * L,))  # a stand-in where the level has no residuals or no parent
    new_K, info = _on_devices(on_device, mesh, rows(node_K_P), child_K_N, child_weight_N, slot_row_N, rows(policy),
                              rows(residual_K_M) if has_residuals else empty,
                              _mask_rows(residual_mask_PxM, M * L) if has_residuals else empty,
                              rows(parent_K_P) if has_parent else empty)
    back = lambda x: None if x is None else x[:F]
    return {p: v[:F] for p, v in new_K.items()}, info._replace(
        residual_weight_PxM=back(info.residual_weight_PxM), parent_weight_P=back(info.parent_weight_P),
        child_entropy_P=back(info.child_entropy_P))


def _mask_rows(mask_PxM, n_rows: int):
    """The residual mask laid out by device rows; a padding row may use no
    candidate (else a NaN candidate that only it could use would not be zeroed)."""
    mask = jnp.asarray(mask_PxM)
    return jnp.zeros((n_rows, mask.shape[1]), bool).at[:mask.shape[0]].set(mask)


def personal_keys(mesh, device_rows: tuple, slot_row_N, K_N, node_K_P, new_K_P, w_N, tau_N, eta_N, groups,
                  split: bool = False):
    """Each participating slot's personal offset from its federation's new K
    (`aggregation.personal_keys` from the federation's K it was sent, then less
    the new one), on each device's own slots and rows: a client mixes only its
    siblings' K, which sit on its device."""
    M, L, _ = device_rows
    rows = lambda tree: parallel.to_device_rows(tree, M, L, 1)

    def on_device(K_n, base_L, new_L, w_n, row_n, tau_n, eta_n):
        mixed = aggregation.personal_keys(K_n, tree_ops.gather(base_L, row_n), w_n, row_n, tau_n, eta_n, groups,
                                          split)
        return tree_ops.sub(mixed, tree_ops.gather(new_L, row_n))

    return _on_devices(on_device, mesh, K_N, rows(node_K_P), rows(new_K_P), w_N, slot_row_N, tau_N, eta_N)


def combine(mesh, device_rows: tuple, slot_row_N, fn, delta_N, weight_N, args_P: dict, n_federations: int):
    """`fn(delta_n, weight_n, row_n, n_rows, args_L)` (a stacked aggregator's
    combine or metrics, its contract checked inside against the device's rows) on
    each device's own slots and federation rows; returns its per-federation
    result for the level's F federations."""
    M, L, _ = device_rows
    out = _on_devices(lambda d, w, r, a: fn(d, w, r, L, a), mesh, delta_N, weight_N, slot_row_N,
                      parallel.to_device_rows(args_P, M, L, 1))
    return jax.tree.map(lambda x: x[:n_federations], out)
