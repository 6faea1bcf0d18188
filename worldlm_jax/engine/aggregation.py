"""Aggregation rules: the server step for the backbone, attention for key layers.

All functions are pure and work on stacked flat parameter dicts (`{path: array}`
with a leading node axis). Shapes: N children (client slots or federations of
the level below), P aggregating nodes, M residual candidates, G key groups
(one per key transformer block: attention weights are computed per block).

A child of weight 0 (absent, padding, diverged) may hold anything, NaN and Inf
included: every rule masks its row (`jnp.where`, `tree_ops.zero_absent_rows`)
before any product or sum over children, never multiplies it by its 0 weight
(0 * NaN is NaN), and reports 0 for it in the diagnostics.
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from worldlm_jax import tree_ops

Params = Mapping[str, jax.Array]
SIMILARITIES = ("cos_delta", "cos_param", "neg_l2")
_EPS = 1e-12


# ---- backbone: data-weighted mean of deltas through a server optimizer ------
def init_server_states(txs: Sequence[optax.GradientTransformation], params_P: Params) -> tuple:
    """One stacked optimizer state per optimizer kind used at a level."""
    return tuple(jax.vmap(tx.init)(params_P) for tx in txs)


def server_update(params_P: Params, mean_delta_P: Params, states: tuple, txs, choice_P, lr_P, apply_P):
    """Apply each node's own server optimizer to the pseudo-gradient -mean_delta.

    `choice_P` picks the optimizer kind of each node (autonomous federations
    may differ); every kind is evaluated and the node's own is selected, which
    keeps heterogeneous rules in one compiled program. Nodes where `apply_P`
    is False (inactive this round, or no participating child) keep their
    parameters and optimizer state. SGD with lr 1 gives FedAvg exactly.
    """
    grads = jax.tree.map(lambda d: -d, mean_delta_P)
    new_params, new_states = params_P, []
    for k, (tx, state) in enumerate(zip(txs, states)):
        updates, next_state = jax.vmap(tx.update)(grads, state, params_P)
        stepped = tree_ops.add(params_P, tree_ops.scale_rows(lr_P, updates))
        take = apply_P & (choice_P == k)
        new_params = tree_ops.where_rows(take, stepped, new_params)
        new_states.append(tree_ops.where_rows(take, next_state, state))
    return new_params, tuple(new_states)


# ---- key layers: attention over children, residuals and the parent ----------
class AttentionPolicy(NamedTuple):
    """Per-node arrays (P,) of the key-layer rule of each federation."""

    mode: jax.Array  # 0 attention, 1 mean, 2 local, 3 robust attention, 4 adaptive attention, 5 personalized
    tau: jax.Array
    eta: jax.Array
    residual_bias: jax.Array
    parent_bias: jax.Array


class AttentionInfo(NamedTuple):
    child_weight_N: jax.Array  # (N,) weight of each child, averaged over groups
    residual_weight_PxM: jax.Array  # (P, M)
    parent_weight_P: jax.Array  # (P,)
    # diagnostics (None where no child K is seen: the streamed mean)
    child_entropy_P: jax.Array | None = None  # entropy of the weights over children / log(#children), mean over groups
    child_similarity_NxN: jax.Array | None = None  # cosine of children's K deltas, mean over groups
    delta_norm_N: jax.Array | None = None  # |K_child - K_node| per child (0 for absent children)


ADAPTIVE_MIN_SPREAD = 1e-3  # floor of the similarity spread adaptive attention divides by
# A residual candidate whose expanded |R - K|^2 is below this fraction of |R|^2 + |K|^2
# (R within about 1% of K) is scored as not having moved: float32 dot products over
# a key group carry a relative rounding error of ~log2(size) * 6e-8, some 100x below.
RESIDUAL_RESOLUTION = 1e-4
SIMILARITY_MATRIX_MAX = 256  # children beyond which the child-similarity matrix is not computed


def _group_matrix(paths: Sequence[str], groups: Mapping[str, int], n_groups: int):
    return {p: jax.nn.one_hot(groups[p], n_groups) for p in paths}


def _rowdot(a: Params, b: Params, onehot) -> jax.Array:
    """(N, G) per-group dot product of matching rows of a and b."""
    out = 0.0
    for p in a:
        d = jnp.sum(a[p].astype(jnp.float32) * b[p].astype(jnp.float32), axis=tree_ops.trailing_axes(a[p]))
        out = out + d[:, None] * onehot[p]
    return out


def _gram(a_P: Params, b_M: Params, onehot, split: bool = False) -> jax.Array:
    """(P, M, G) per-group dot products between every row of a and of b.

    Rows flattened (a free reshape), or where the weights are split over a model
    axis (`split`) contracted over every trailing axis in place, since flattening
    would gather the split dimension; unsplit, the flat form is leaner (XLA:CPU
    keeps a transposed copy for the other: 12 MiB more on `small`, 16 federations)."""
    out = 0.0
    for p in a_P:
        x, y = a_P[p].astype(jnp.float32), b_M[p].astype(jnp.float32)
        if split:
            axes = tree_ops.trailing_axes(x)
            dots = jnp.tensordot(x, y, axes=(axes, axes))
        else:
            dots = x.reshape(x.shape[0], -1) @ y.reshape(y.shape[0], -1).T
        out = out + dots[:, :, None] * onehot[p]
    return out


def _similarity(kind: str, dd, dm, mm, kd, km, kk):
    """Similarity from dot products: d = candidate delta, m = query (mean
    child delta), k = the node's current K; each argument is <x, y> per group.
    Squared norms from expanded dot products can round below 0: clamp them."""
    dd, mm, kk = jnp.maximum(dd, 0.0), jnp.maximum(mm, 0.0), jnp.maximum(kk, 0.0)
    if kind == "cos_delta":
        return dm / jnp.sqrt(dd * mm + _EPS)
    if kind == "cos_param":  # cos(K + d, K + m): candidate vs the children's mean
        num = kk + kd + km + dm
        den = jnp.sqrt(jnp.maximum(kk + 2 * kd + dd, 0.0) * jnp.maximum(kk + 2 * km + mm, 0.0) + _EPS)
        return num / den
    if kind == "neg_l2":  # -|d - m| relative to |m|, so tau is scale-free
        return -jnp.sqrt(jnp.maximum(dd - 2 * dm + mm, 0.0) / (mm + _EPS))
    raise ValueError(f"unknown similarity {kind!r}; allowed: {', '.join(SIMILARITIES)}")


def mean_keys(node_K_P: Params, mean_delta_P: Params, total_P: jax.Array, policy: AttentionPolicy) -> Params:
    """K_n <- K_n + eta * (weighted mean child delta): `attend_keys` for nodes
    whose mode is `mean` or `local`, from the mean alone (children streamed)."""
    step_P = jnp.where((policy.mode != 2) & (total_P > 0), policy.eta, 0.0)
    return {p: (k.astype(jnp.float32) + tree_ops.expand_rows(step_P, k) * mean_delta_P[p]).astype(k.dtype)
            for p, k in node_K_P.items()}


def sketch(tree_N: Params, dim: int) -> Params:
    """Count-sketch each row of every leaf into `dim` buckets (a random signed
    hashing fixed per parameter path, so every federation embeds alike)."""
    out = {}
    for path, x in tree_N.items():
        flat = x.reshape(x.shape[0], -1).astype(jnp.float32)
        rng = np.random.default_rng(zlib.crc32(path.encode()))
        bucket = jnp.asarray(rng.integers(0, dim, flat.shape[1]))
        sign = jnp.asarray(rng.choice(np.array([-1.0, 1.0], np.float32), flat.shape[1]))
        out[path] = jax.ops.segment_sum((flat * sign).T, bucket, num_segments=dim).T
    return out


class Residuals(NamedTuple):
    """How a level's attention reaches its residual candidates R_m (M of them).

    `dots(Ke, Me)` -> (rr (M, G), kr (P, M, G), mr (P, M, G)): per-group dot
    products of the candidates (or their sketches, `residual_dim`) with
    themselves and with the nodes' K and query, embedded alike; `mix(a_PxMxG)`
    -> {path: (P, ...)}: each node's sum_m a_m R_m. `dense_residuals` holds every
    candidate in one array; a federation-local leaf level passes its candidates
    round its devices instead (`local_aggregation`)."""

    dots: Callable
    mix: Callable


def dense_residuals(R_M: Params, used_M, onehot, groups: Mapping[str, int], residual_dim: int,
                    split: bool = False) -> Residuals:
    """The candidates as one stacked array. A candidate no attending node may use
    (`used_M` False) enters the weighted sum with weight 0: it must not be NaN there."""
    R = tree_ops.zero_absent_rows({p: x.astype(jnp.float32) for p, x in R_M.items()}, used_M.astype(jnp.float32))
    Re = sketch(R, residual_dim) if residual_dim > 0 else R
    contract_in_place = split and residual_dim == 0

    def dots(Ke, Me):
        return (_rowdot(Re, Re, onehot), _gram(Ke, Re, onehot, contract_in_place),
                _gram(Me, Re, onehot, contract_in_place))

    def mix(a_R):
        return {p: jnp.tensordot(a_R[:, :, groups[p]], R[p], axes=(1, 0)) for p in R}

    return Residuals(dots, mix)


def _residual_similarity(similarity: str, residuals: Residuals, K_P: Params, mean_P: Params, full_dots, onehot,
                         residual_dim: int) -> jax.Array:
    """(P, M, G) similarity of every residual candidate R_m - K_n to node n's
    query, from dot products; on count-sketch embeddings when `residual_dim` > 0
    (`full_dots` = (kk, km, mm) of the full K, reused otherwise)."""
    if residual_dim > 0:
        Ke, Me = sketch(K_P, residual_dim), sketch(mean_P, residual_dim)
        kk, km, mm = _rowdot(Ke, Ke, onehot), _rowdot(Ke, Me, onehot), _rowdot(Me, Me, onehot)
    else:
        (Ke, Me), (kk, km, mm) = (K_P, mean_P), full_dots
    rr_M, kr, mr = residuals.dots(Ke, Me)
    dd = rr_M[None] - 2 * kr + kk[:, None]
    # |R - K|^2 expanded cancels where R is close to K (a fresh state: every residual
    # is the initial K): below its rounding error the delta is taken as exactly 0, so
    # the candidate scores what a zero delta scores instead of CPU-dependent noise
    moved = dd > RESIDUAL_RESOLUTION * (rr_M[None] + kk[:, None])
    dd = jnp.where(moved, dd, 0.0)
    dm = jnp.where(moved, mr - km[:, None], 0.0)
    kd = jnp.where(moved, kr - kk[:, None], 0.0)
    return _similarity(similarity, dd, dm, mm[:, None], kd, km[:, None], kk[:, None])


def attend_keys(
    node_K_P: Params,
    child_K_N: Params,
    child_weight_N: jax.Array,
    child_parent_N: jax.Array,
    policy: AttentionPolicy,
    groups: Mapping[str, int],
    similarity: str = "cos_delta",
    residual_K_M: Params | None = None,
    residual_mask_PxM: jax.Array | None = None,
    parent_K_P: Params | None = None,
    residual_dim: int = 0,
    robust: bool = False,
    split: bool = False,
    residual_source: Callable | None = None,
    child_pairs: Callable | None = None,
):
    """K_n <- K_n + eta * sum_j a_j (K_j - K_n), per key group (see WORLDLM.md).

    Candidates j of node n: its children (prior = data share w_j / W_n), the
    residual K of related federations (`residual_mask_PxM`, prior = one average
    child, bias `residual_bias`) and its parent's K (prior = one average child,
    bias `parent_bias`). Logits: similarity / tau + log prior + bias, softmax
    over all candidates of the node. Mode `mean` drops the similarity and the
    non-child candidates (the weighted mean, HierFAVG on K); mode `local` keeps
    K_n. Residuals and the parent are never the query: the query is the
    weighted mean of the children's deltas. Math in float32. Children with
    weight 0 may hold anything (NaN included): their deltas are set to 0 before
    every product, so they change no node's K, weights or diagnostics; so are
    residual candidates that no attending node may use.

    `robust` (static: some node's mode is 3, robust attention): those nodes
    first bound each child's delta by the median norm of its participating
    siblings' (`_bounded_by_median_norm`); then they attend like mode 0.

    `residual_dim` > 0 scores residual candidates on `residual_dim`-dimensional
    count-sketch embeddings of K (inner products preserved in expectation):
    related federations exchange embeddings for the similarity, and the full K
    only enters the weighted sum.

    `split` (static): the weights are split over a model axis (`_gram`).

    `residual_source(allowed_PxM)` -> `Residuals` and `child_pairs(delta_N,
    live_N, onehot)` -> the (N, N') cosine matrix (or None) say where the
    residual candidates and the children's pairs are read: by default from
    `residual_K_M` and `delta_N` whole (`dense_residuals`, `_dense_pairs`); a
    federation-local leaf level reads its own rows and passes the others round
    its devices (`local_aggregation`).
    """
    paths = sorted(node_K_P)
    if not paths:
        n = child_weight_N.shape[0]
        return dict(node_K_P), AttentionInfo(jnp.zeros(n), jnp.zeros((0, 0)), jnp.zeros(0))
    n_groups = max(groups[p] for p in paths) + 1
    onehot = _group_matrix(paths, groups, n_groups)
    P = node_K_P[paths[0]].shape[0]
    w_N = child_weight_N.astype(jnp.float32)

    # an absent child's K may be NaN: select it away before any product (median norm, dots, Gram)
    delta_N = tree_ops.zero_absent_rows(tree_ops.sub(child_K_N, tree_ops.gather(node_K_P, child_parent_N)), w_N)
    if robust:  # some node's rule is robust_attention (static: the plain rules pay nothing)
        delta_N = _bounded_by_median_norm(delta_N, w_N, child_parent_N, P, policy.mode == 3)
    mean_P, total_P = tree_ops.weighted_mean(delta_N, w_N, child_parent_N, P)
    K32 = {p: node_K_P[p].astype(jnp.float32) for p in paths}
    n_children_P = jax.ops.segment_sum((w_N > 0).astype(jnp.float32), child_parent_N, num_segments=P)
    ext_log_prior_P = -jnp.log(jnp.maximum(n_children_P, 1.0))  # a residual or the parent: one average child

    attention = ((policy.mode == 0) | (policy.mode == 3) | (policy.mode == 4))[:, None]
    dots = (_rowdot(K32, K32, onehot), _rowdot(K32, mean_P, onehot), _rowdot(mean_P, mean_P, onehot))
    g = lambda x: jnp.take(x, child_parent_N, axis=0)

    # children: prior = data share
    sim_N = _candidate_similarity(similarity, delta_N, tree_ops.gather(mean_P, child_parent_N),
                                  tree_ops.gather(K32, child_parent_N), tuple(map(g, dots)), onehot)
    share_N = w_N / jnp.maximum(g(total_P), _EPS)
    inv_tau = jnp.where(attention, 1.0 / policy.tau[:, None], 0.0) * jnp.ones((1, n_groups))  # (P, G)
    # adaptive attention: similarities in units of their spread across the children
    spread_P = _weighted_spread(sim_N, share_N, child_parent_N, P)
    inv_tau = jnp.where((policy.mode == 4)[:, None], inv_tau / jnp.maximum(spread_P, ADAPTIVE_MIN_SPREAD), inv_tau)
    logit_N = jnp.where((w_N > 0)[:, None], sim_N * g(inv_tau) + jnp.log(jnp.maximum(share_N, _EPS))[:, None],
                        -jnp.inf)
    logit_R = logit_p = None
    # residual candidates: delta_nm = R_m - K_n, all from dot products
    if residual_K_M is not None and residual_mask_PxM is not None:
        allowed_PxM = residual_mask_PxM & attention
        if residual_source is None:
            residuals = dense_residuals({p: residual_K_M[p] for p in paths}, jnp.any(allowed_PxM, axis=0), onehot,
                                        groups, residual_dim, split)
        else:
            residuals = residual_source(allowed_PxM)
        sim_R = _residual_similarity(similarity, residuals, K32, mean_P, dots, onehot, residual_dim)
        allowed = allowed_PxM[:, :, None]
        logit_R = jnp.where(allowed, sim_R * inv_tau[:, None, :]
                            + (ext_log_prior_P + policy.residual_bias)[:, None, None], -jnp.inf)
    if parent_K_P is not None:
        delta_p = tree_ops.sub({p: parent_K_P[p].astype(jnp.float32) for p in paths}, K32)
        sim_p = _candidate_similarity(similarity, delta_p, mean_P, K32, dots, onehot)
        logit_p = jnp.where(attention, sim_p * inv_tau + (ext_log_prior_P + policy.parent_bias)[:, None], -jnp.inf)
    a_N, a_R, a_p = _softmax(logit_N, logit_R, logit_p, child_parent_N, P)

    step_P = jnp.where((policy.mode != 2) & (total_P > 0), policy.eta, 0.0)
    mixed_R = residuals.mix(a_R) if a_R is not None else None
    out = {p: _step(p, groups[p], K32, delta_N, a_N, child_parent_N, P, step_P,
                    (a_R, mixed_R) if a_R is not None else None, (a_p, delta_p) if a_p is not None else None
                    ).astype(node_K_P[p].dtype) for p in paths}
    res_w = jnp.mean(a_R, axis=2) if a_R is not None else jnp.zeros((P, 0))
    par_w = jnp.mean(a_p, axis=1) if a_p is not None else jnp.zeros(P)
    pairs = child_pairs or (lambda delta, live, onehot_: _dense_pairs(delta, live, onehot_, split))
    return out, AttentionInfo(jnp.mean(a_N, axis=1), res_w, par_w, *_diagnostics(delta_N, a_N, w_N, child_parent_N,
                                                                                  P, onehot, pairs))


def _weighted_spread(sim_N, share_N, parent_N, P: int) -> jax.Array:
    """(P, G) standard deviation of the children's similarities, weighted by data
    share; children of share 0 are selected out (their similarity may be NaN)."""
    s = share_N[:, None]
    live = s > 0
    mean_P = jax.ops.segment_sum(jnp.where(live, s * sim_N, 0.0), parent_N, num_segments=P)
    dev = jnp.where(live, sim_N - jnp.take(mean_P, parent_N, axis=0), 0.0)
    var_P = jax.ops.segment_sum(s * dev ** 2, parent_N, num_segments=P)
    return jnp.sqrt(jnp.maximum(var_P, 0.0))


def _diagnostics(delta_N: Params, a_N, w_N, parent_N, P: int, onehot, pairs: Callable):
    """Why attention chose what it chose: the entropy of each node's weights over
    its children (per key group, then averaged) against uniform (1 = the mean's
    weights for equal shares), the
    children's pairwise cosine similarity, and each child's K-delta norm
    (absent children: 0, whatever their K held)."""
    live_N = (w_N > 0).astype(jnp.float32)
    a = a_N * live_N[:, None]  # (N, G): per key group, renormalised over the children
    a = a / jnp.maximum(jnp.take(jax.ops.segment_sum(a, parent_N, num_segments=P), parent_N, axis=0), _EPS)
    ent_P = jnp.mean(jax.ops.segment_sum(-a * jnp.log(jnp.maximum(a, _EPS)), parent_N, num_segments=P), axis=1)
    n_P = jax.ops.segment_sum(live_N, parent_N, num_segments=P)
    entropy_P = jnp.where(n_P > 1, ent_P / jnp.log(jnp.maximum(n_P, 2.0)), 1.0)
    norm_N = jnp.where(w_N > 0, jnp.sqrt(jnp.maximum(tree_ops.row_sq_norms(delta_N), 0.0)), 0.0)
    return entropy_P, pairs(delta_N, live_N, onehot), norm_N


def _dense_pairs(delta_N: Params, live_N, onehot, split: bool = False):
    """(N, N) the children's pairwise cosines (mean over key groups; 0 where either
    is absent), or None beyond `SIMILARITY_MATRIX_MAX` children."""
    if live_N.shape[0] > SIMILARITY_MATRIX_MAX:
        return None
    gram = _gram(delta_N, delta_N, onehot, split)  # (N, N, G)
    sq = jnp.maximum(jnp.diagonal(gram, axis1=0, axis2=1).T, 0.0)  # (N, G)
    return pair_cosines(gram, sq, sq, live_N, live_N)


def pair_cosines(gram_NxN2, sq_N, sq_N2, live_N, live_N2):
    """Cosines from a (N, N', G) Gram block and the rows' squared norms, averaged
    over key groups; 0 where either child is absent."""
    cos = gram_NxN2 / jnp.sqrt(sq_N[:, None, :] * sq_N2[None, :, :] + _EPS)
    both = (live_N[:, None] > 0) & (live_N2[None, :] > 0)
    return jnp.where(both, jnp.mean(cos, axis=2), 0.0)


def personal_keys(K_N: Params, base_N: Params, w_N: jax.Array, parent_N: jax.Array, tau_N: jax.Array,
                  eta_N: jax.Array, groups: Mapping[str, int], split: bool = False) -> Params:
    """Personalised attention (k_agg `personalized`): every participating child i
    receives its own mixture of its siblings' K,

        K_i <- K_i + eta * sum_j a_ij (K_j - K_i),
        a_ij = softmax_j( cos(K_i - base_i, K_j - base_j) / tau + log w_j ),

    over the children j of i's federation with weight w_j > 0 (itself
    included), per key group; `base` is what the federation sent (its K), so
    the similarity compares how the children moved. As tau grows every child
    receives the weighted mean (the federation's `mean` K); a child alone in
    its federation keeps its own K; relabelling the children permutes the
    result. Children with w = 0 are returned unchanged; their K may hold
    anything (NaN included) and is masked before every product, so it moves no
    sibling. Memory: an (N, N) matrix per key group over the level's children."""
    paths = sorted(K_N)
    if not paths:
        return dict(K_N)
    n_groups = max(groups[p] for p in paths) + 1
    onehot = _group_matrix(paths, groups, n_groups)
    K32 = {p: K_N[p].astype(jnp.float32) for p in paths}
    live = w_N > 0
    # absent children's K (maybe NaN) enter neither the Gram matrix nor `a_g @ flat`
    K_live = tree_ops.zero_absent_rows(K32, w_N)
    delta = tree_ops.zero_absent_rows(tree_ops.sub(K32, {p: base_N[p].astype(jnp.float32) for p in paths}), w_N)
    gram = _gram(delta, delta, onehot, split)  # (N, N, G)
    sq = jnp.maximum(jnp.diagonal(gram, axis1=0, axis2=1).T, 0.0)  # (N, G)
    cos = gram / jnp.sqrt(sq[:, None, :] * sq[None, :, :] + _EPS)
    allowed = (parent_N[:, None] == parent_N[None, :]) & live[None, :]
    logit = jnp.where(allowed[:, :, None], cos / tau_N[:, None, None]
                      + jnp.log(jnp.maximum(w_N, _EPS))[None, :, None], -jnp.inf)
    a = jax.nn.softmax(logit, axis=1)
    a = jnp.where(live[:, None, None], a, 0.0)  # absent children: no mixture (and no NaN from an empty row)
    out = {}
    for p in paths:
        a_g = a[:, :, groups[p]]
        move = (jnp.tensordot(a_g, K_live[p], axes=(1, 0))
                - tree_ops.expand_rows(a_g.sum(1), K_live[p]) * K_live[p]).reshape(K32[p].shape)
        mixed = K_live[p] + tree_ops.expand_rows(eta_N, move) * move
        out[p] = jnp.where(tree_ops.expand_rows(live, mixed), mixed, K32[p]).astype(K_N[p].dtype)
    return out


def _bounded_by_median_norm(delta_N: Params, w_N, parent_N, P: int, robust_P) -> Params:
    """Robust attention (mode 3): a child's K delta longer than the median of its
    participating siblings' is scaled down to it, so no child can dominate the
    query (the children's mean) by sheer size and take the federation's K.
    Other modes are unchanged (scaled by exactly 1)."""
    norm_N = jnp.sqrt(tree_ops.row_sq_norms(delta_N))
    member = (parent_N[None, :] == jnp.arange(P)[:, None]) & (w_N[None, :] > 0)
    median_P = jnp.nanmedian(jnp.where(member, norm_N[None, :], jnp.nan), axis=1)
    bound_N = jnp.take(median_P, parent_N)
    scale_N = jnp.where(jnp.take(robust_P, parent_N) & (norm_N > bound_N),
                        bound_N / jnp.maximum(norm_N, _EPS), 1.0)
    return jax.tree.map(lambda x: (tree_ops.expand_rows(scale_N, x) * x).astype(x.dtype), delta_N)


def _candidate_similarity(kind: str, delta, mean, K, node_dots, onehot) -> jax.Array:
    """(rows, G) similarity of candidate deltas to the query `mean`, given the
    node's (kk, km, mm) dot products."""
    kk, km, mm = node_dots
    return _similarity(kind, _rowdot(delta, delta, onehot), _rowdot(delta, mean, onehot), mm,
                       _rowdot(K, delta, onehot), km, kk)


def _step(p, gi, K32, delta_N, a_N, child_parent_N, P, step_P, residual, parent):
    """K_n + eta * sum_j a_j (K_j - K_n) for path p (group gi), from the
    children's deltas, the residuals (a_R, R) and the parent (a_p, delta_p)."""
    move = tree_ops.weighted_sum({p: delta_N[p]}, a_N[:, gi], child_parent_N, P)[p]
    if residual is not None:  # sum_m a_m (R_m - K_n)
        a_R, mixed_R = residual
        move = (move + mixed_R[p].reshape(move.shape)
                - tree_ops.expand_rows(a_R[:, :, gi].sum(1), K32[p]) * K32[p])
    if parent is not None:
        a_p, delta_p = parent
        move = move + tree_ops.expand_rows(a_p[:, gi], K32[p]) * delta_p[p]
    return K32[p] + tree_ops.expand_rows(step_P, move) * move


def _softmax(logit_N, logit_R, logit_p, child_parent_N, P):
    """Each node's softmax over its candidates: children (N, G), residuals
    (P, M, G) and the parent (P, G); absent kinds are None (and stay None)."""
    g = lambda x: jnp.take(x, child_parent_N, axis=0)
    max_P = jax.ops.segment_max(logit_N, child_parent_N, num_segments=P)
    if logit_R is not None:
        max_P = jnp.maximum(max_P, jnp.max(logit_R, axis=1))
    if logit_p is not None:
        max_P = jnp.maximum(max_P, logit_p)
    max_P = jnp.where(jnp.isfinite(max_P), max_P, 0.0)
    e_N = jnp.exp(logit_N - g(max_P))
    norm_P = jax.ops.segment_sum(e_N, child_parent_N, num_segments=P)
    e_R = e_p = None
    if logit_R is not None:
        e_R = jnp.exp(logit_R - max_P[:, None, :])
        norm_P = norm_P + jnp.sum(e_R, axis=1)
    if logit_p is not None:
        e_p = jnp.exp(logit_p - max_P)
        norm_P = norm_P + e_p
    norm_P = jnp.maximum(norm_P, _EPS)
    return (e_N / g(norm_P), None if e_R is None else e_R / norm_P[:, None, :],
            None if e_p is None else e_p / norm_P)
