"""Aggregation rules: attention over key layers and the per-node server step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from worldlm_jax.engine import aggregation
from worldlm_jax.plugins import optimizers

P = 2
PARENT = np.array([0, 0, 0, 1, 1, 1, 1], np.int32)
N = len(PARENT)
GROUPS = {"blocks/0/a": 0, "blocks/0/b": 0, "blocks/1/a": 1}
SHAPES = {"blocks/0/a": (3, 4), "blocks/0/b": (5,), "blocks/1/a": (6,)}


def stacked(rng, n, scale=1.0):
    return {p: (scale * rng.normal(size=(n,) + s)).astype(np.float32) for p, s in SHAPES.items()}


def setup(seed=0):
    rng = np.random.default_rng(seed)
    node = stacked(rng, P)
    child = {p: node[p][PARENT] + 0.3 * rng.normal(size=(N,) + s).astype(np.float32) for p, s in SHAPES.items()}
    w = rng.uniform(0.5, 3.0, size=N).astype(np.float32)
    return rng, node, child, w


def policy(mode, tau=0.1, eta=1.0, residual_bias=0.0, parent_bias=0.0):
    arr = lambda v, dt=jnp.float32: jnp.broadcast_to(jnp.asarray(v, dt), (P,))
    return aggregation.AttentionPolicy(arr(mode, jnp.int32), arr(tau), arr(eta), arr(residual_bias),
                                       arr(parent_bias))


@jax.jit
def _attend(node, child, w, parent, pol, residual_K_M, residual_mask_PxM, parent_K_P):
    return aggregation.attend_keys(node, child, w, parent, pol, GROUPS, residual_K_M=residual_K_M,
                                   residual_mask_PxM=residual_mask_PxM, parent_K_P=parent_K_P)


def attend(node, child, w, pol, residual_K_M=None, residual_mask_PxM=None, parent_K_P=None, parent=PARENT):
    out, info = _attend(node, child, jnp.asarray(w), jnp.asarray(parent), pol, residual_K_M,
                        None if residual_mask_PxM is None else jnp.asarray(residual_mask_PxM), parent_K_P)
    return {p: np.asarray(v) for p, v in out.items()}, info


def ref_mean(node, child, w, eta=1.0):
    out = {}
    for p in node:
        d = child[p] - node[p][PARENT]
        m = np.zeros_like(node[p], dtype=np.float64)
        for n in range(P):
            sel = PARENT == n
            ww = w[sel].reshape((-1,) + (1,) * (d.ndim - 1))
            m[n] = (ww * d[sel]).sum(0) / w[sel].sum()
        out[p] = node[p] + eta * m
    return out


def close(a, b, atol=1e-5):
    for p in a:
        np.testing.assert_allclose(a[p], b[p], atol=atol, rtol=1e-5, err_msg=p)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_mean_mode_is_weighted_mean(eta):
    _, node, child, w = setup()
    out, _ = attend(node, child, w, policy(1, eta=eta))
    close(out, ref_mean(node, child, w, eta))


def test_mean_mode_ignores_residuals_and_parent():
    rng, node, child, w = setup()
    res, parent = stacked(rng, 3), stacked(rng, P)
    out, info = attend(node, child, w, policy(1), residual_K_M=res, residual_mask_PxM=jnp.ones((P, 3), bool),
                       parent_K_P=parent)
    close(out, ref_mean(node, child, w))
    assert np.all(np.asarray(info.residual_weight_PxM) == 0) and np.all(np.asarray(info.parent_weight_P) == 0)


def test_attention_with_huge_tau_is_weighted_mean():
    _, node, child, w = setup(1)
    out, info = attend(node, child, w, policy(0, tau=1e6))
    close(out, ref_mean(node, child, w))
    share = w / np.bincount(PARENT, weights=w)[PARENT]
    np.testing.assert_allclose(info.child_weight_N, share, rtol=1e-4)


def _cos_argmax(node, child, w):
    """Per node and group: the child whose delta is most aligned with the mean delta."""
    delta = {p: (child[p] - node[p][PARENT]).reshape(N, -1).astype(np.float64) for p in node}
    best, margin = {}, np.inf
    for n in range(P):
        idx = np.flatnonzero(PARENT == n)
        for g in sorted(set(GROUPS.values())):
            d = np.concatenate([delta[p][idx] for p in sorted(delta) if GROUPS[p] == g], axis=1)
            m = (w[idx, None] * d).sum(0) / w[idx].sum()
            cos = d @ m / (np.linalg.norm(d, axis=1) * np.linalg.norm(m))
            order = np.sort(cos)
            margin = min(margin, order[-1] - order[-2])
            best[n, g] = idx[np.argmax(cos)]
    return best, margin


@pytest.mark.parametrize("seed", [0, 3])
def test_attention_with_tiny_tau_picks_most_aligned_child(seed):
    _, node, child, w = setup(seed)
    best, margin = _cos_argmax(node, child, w)
    assert margin > 1e-2, "test set-up: cosines too close to tell apart"
    out, _ = attend(node, child, w, policy(0, tau=1e-4))
    for p in node:
        for n in range(P):
            np.testing.assert_allclose(out[p][n], child[p][best[n, GROUPS[p]]], atol=1e-5, err_msg=f"{p} node {n}")
    # a different winner per group is possible: attention is per key block
    assert not np.allclose(out["blocks/0/a"][0], ref_mean(node, child, w)["blocks/0/a"][0], atol=1e-3)


def test_local_mode_keeps_K_bitwise():
    rng, node, child, w = setup()
    out, _ = attend(node, child, w, policy(2), residual_K_M=stacked(rng, 2),
                    residual_mask_PxM=jnp.ones((P, 2), bool), parent_K_P=stacked(rng, P))
    for p in node:
        np.testing.assert_array_equal(out[p], node[p])


def test_modes_are_per_node():
    _, node, child, w = setup()
    pol = aggregation.AttentionPolicy(jnp.array([2, 1], jnp.int32), jnp.full(P, 0.1), jnp.ones(P), jnp.zeros(P),
                                      jnp.zeros(P))
    out, _ = attend(node, child, w, pol)
    ref = ref_mean(node, child, w)
    for p in node:
        np.testing.assert_array_equal(out[p][0], node[p][0])
        np.testing.assert_allclose(out[p][1], ref[p][1], atol=1e-5)


def test_zero_weight_nan_child_changes_nothing():
    _, node, child, w = setup()
    out, _ = attend(node, child, w, policy(0, tau=0.5))
    w2 = w.copy()
    w2[1] = 0.0
    poisoned = {p: v.copy() for p, v in child.items()}
    keep = np.arange(N) != 1
    for v in poisoned.values():
        v[1] = np.nan
    out_p, info = attend(node, poisoned, w2, policy(0, tau=0.5))
    out_k, _ = attend(node, {p: v[keep] for p, v in child.items()}, w[keep], policy(0, tau=0.5),
                      parent=PARENT[keep])
    close(out_p, out_k, atol=1e-6)
    assert float(info.child_weight_N[1]) == 0
    assert not np.allclose(out_p["blocks/1/a"], out["blocks/1/a"])  # the weight did matter


def test_residual_identical_to_K_with_large_negative_bias_has_no_weight():
    _, node, child, w = setup(2)
    res = {p: v.copy() for p, v in node.items()}  # candidate m = copy of node m's own K
    mask = jnp.eye(P, dtype=bool)
    base, _ = attend(node, child, w, policy(0, tau=1.0))
    out, info = attend(node, child, w, policy(0, tau=1.0, residual_bias=-1e4), residual_K_M=res,
                       residual_mask_PxM=mask)
    close(out, base, atol=1e-6)
    assert np.all(np.asarray(info.residual_weight_PxM) < 1e-6)
    # without the bias it takes weight and, having delta 0, shrinks the step
    out0, info0 = attend(node, child, w, policy(0, tau=1.0), residual_K_M=res, residual_mask_PxM=mask)
    assert np.all(np.diag(np.asarray(info0.residual_weight_PxM)) > 0.05)
    for p in node:
        step0 = np.linalg.norm((out0[p] - node[p]).reshape(P, -1), axis=1)
        step = np.linalg.norm((base[p] - node[p]).reshape(P, -1), axis=1)
        assert np.all(step0 < 0.97 * step), p


def test_residual_candidates_matter_only_where_masked_in():
    rng, node, child, w = setup(4)
    res = stacked(rng, P)
    res2 = {p: v.copy() for p, v in res.items()}
    for v in res2.values():
        v[1] += 1.0  # only candidate 1 changes
    pol = policy(0, tau=1.0)
    cross = jnp.array([[False, True], [False, False]])  # node 0 sees candidate 1; node 1 sees none
    a, info = attend(node, child, w, pol, residual_K_M=res, residual_mask_PxM=cross)
    b, _ = attend(node, child, w, pol, residual_K_M=res2, residual_mask_PxM=cross)
    base, _ = attend(node, child, w, pol)
    assert float(info.residual_weight_PxM[0, 1]) > 1e-3
    for p in node:
        assert not np.allclose(a[p][0], b[p][0], atol=1e-4), p  # node 0 follows the residual
        np.testing.assert_allclose(a[p][1], base[p][1], atol=1e-6)  # node 1 does not see it
        np.testing.assert_array_equal(a[p][1], b[p][1])
    none = jnp.zeros((P, P), bool)
    c, info_c = attend(node, child, w, pol, residual_K_M=res, residual_mask_PxM=none)
    d, _ = attend(node, child, w, pol, residual_K_M=res2, residual_mask_PxM=none)
    close(c, base, atol=1e-6)
    for p in node:
        np.testing.assert_array_equal(c[p], d[p])
    assert np.all(np.asarray(info_c.residual_weight_PxM) == 0)


def test_a_residual_candidate_no_node_may_attend_may_hold_nan():
    """A masked-out candidate enters the weighted sum with weight 0, so it is
    masked to 0 before the product (0 * NaN would poison every node)."""
    rng, node, child, w = setup(4)
    res = stacked(rng, P)
    mask = jnp.array([[True, False], [True, False]])  # candidate 1: nobody's
    out, _ = attend(node, child, w, policy(0, tau=1.0), residual_K_M=res, residual_mask_PxM=mask)
    poisoned = {p: v.copy() for p, v in res.items()}
    for v in poisoned.values():
        v[1] = np.nan
    out_p, info = attend(node, child, w, policy(0, tau=1.0), residual_K_M=poisoned, residual_mask_PxM=mask)
    for p in out:  # the candidate is 0 in both programs: the same numbers exactly
        np.testing.assert_array_equal(out_p[p], out[p], err_msg=p)
    assert np.all(np.isfinite(np.asarray(info.residual_weight_PxM)))


@pytest.mark.parametrize("kind", aggregation.SIMILARITIES)
def test_a_residual_that_has_not_moved_scores_as_a_zero_delta(kind):
    """A residual equal to the node's K (a fresh state: every residual is the
    initial K): the expanded |R - K|^2 cancels to rounding noise, which gave
    cosines of -1.2 (4096 coordinates) to -20 (1e5), CPU- and order-dependent,
    then divided by tau. It scores exactly what a zero delta scores; residuals
    that moved keep their similarity (cosines within [-1, 1])."""
    rng = np.random.default_rng(0)
    onehot = {"a": jax.nn.one_hot(0, 1)}
    for n in (12, 4096, 100_000):
        K = {"a": jnp.asarray(rng.normal(size=(2, n)) * 3, jnp.float32)}
        m = {"a": jnp.asarray(rng.normal(size=(2, n)) * 0.01, jnp.float32)}
        dots = tuple(aggregation._rowdot(x, y, onehot) for x, y in ((K, K), (K, m), (m, m)))
        residuals = aggregation.dense_residuals(K, jnp.ones(2, bool), onehot, {"a": 0}, 0)
        sim = np.asarray(aggregation._residual_similarity(kind, residuals, K, m, dots, onehot, 0))[..., 0]  # (P, M)
        zero = np.asarray(aggregation._similarity(kind, 0.0, 0.0, dots[2], 0.0, dots[1], dots[0]))[:, 0]
        np.testing.assert_allclose(np.diagonal(sim), zero, rtol=1e-6, atol=1e-7)
        if kind != "neg_l2":
            assert np.all(np.abs(sim) <= 1.0 + 1e-5), (n, sim)


def test_parent_candidate_in_attention_mode():
    rng, node, child, w = setup(5)
    parent = {p: node[p] + 0.3 * rng.normal(size=node[p].shape).astype(np.float32) for p in node}
    base, _ = attend(node, child, w, policy(0, tau=1.0))
    with_parent, info = attend(node, child, w, policy(0, tau=1.0), parent_K_P=parent)
    muted, info_m = attend(node, child, w, policy(0, tau=1.0, parent_bias=-1e4), parent_K_P=parent)
    assert np.all(np.asarray(info.parent_weight_P) > 1e-3)
    assert all(not np.allclose(with_parent[p], base[p], atol=1e-4) for p in node)
    close(muted, base, atol=1e-6)
    assert np.all(np.asarray(info_m.parent_weight_P) < 1e-6)
    # the parent's weight is taken from the children: all weights still sum to 1 per node
    total = np.bincount(PARENT, weights=np.asarray(info.child_weight_N), minlength=P) + np.asarray(info.parent_weight_P)
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)


# ---- server step --------------------------------------------------------------
def server_tree(rng, n):
    return {"w": rng.normal(size=(n, 3, 2)).astype(np.float32), "b": rng.normal(size=(n, 4)).astype(np.float32)}


def test_server_sgd_lr1_adds_mean_delta():
    rng = np.random.default_rng(0)
    params, delta = server_tree(rng, 3), server_tree(rng, 3)
    txs = (optimizers.get("sgd"),)
    states = aggregation.init_server_states(txs, params)
    apply = jnp.array([True, False, True])
    new, new_states = aggregation.server_update(params, delta, states, txs, jnp.zeros(3, jnp.int32),
                                                jnp.ones(3), apply)
    for k in params:
        np.testing.assert_allclose(np.asarray(new[k])[[0, 2]], (params[k] + delta[k])[[0, 2]], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(new[k])[1], params[k][1])  # not applied: unchanged


def test_each_node_follows_its_own_server_optimizer():
    rng = np.random.default_rng(1)
    names = ("adam", "sgd", "momentum")
    txs = tuple(optimizers.get(n) for n in names)
    choice = np.array([0, 1, 2, 0])
    lr = np.array([0.1, 0.7, 0.3, 0.05], np.float32)
    n_nodes = len(choice)
    params = server_tree(rng, n_nodes)
    deltas = [server_tree(rng, n_nodes) for _ in range(3)]
    applies = [np.ones(n_nodes, bool), np.array([True, True, False, True]), np.ones(n_nodes, bool)]
    states = aggregation.init_server_states(txs, params)
    cur = params
    step = jax.jit(lambda *a: aggregation.server_update(*a[:3], txs, *a[3:]))
    for delta, apply in zip(deltas, applies):
        cur, states = step(cur, delta, states, jnp.asarray(choice), jnp.asarray(lr), jnp.asarray(apply))
    for n in range(n_nodes):  # reference: optax directly, node by node
        tx = optimizers.get(names[choice[n]])
        p = {k: jnp.asarray(v[n]) for k, v in params.items()}
        s = tx.init(p)
        update = jax.jit(tx.update)
        for delta, apply in zip(deltas, applies):
            if not apply[n]:
                continue
            g = {k: -jnp.asarray(v[n]) for k, v in delta.items()}
            u, s = update(g, s, p)
            p = optax.apply_updates(p, jax.tree.map(lambda x: lr[n] * x, u))
        for k in p:
            np.testing.assert_allclose(np.asarray(cur[k])[n], p[k], rtol=1e-5, atol=1e-6, err_msg=f"node {n} {k}")
    # the choice matters: adam and sgd give different results from the same inputs
    assert not np.allclose(np.asarray(cur["w"])[0], np.asarray(cur["w"])[1])
