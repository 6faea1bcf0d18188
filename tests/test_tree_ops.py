"""Moving stacked pytrees along the tree: gather down, weighted means up."""
import jax.numpy as jnp
import numpy as np
import pytest

from worldlm_jax import tree_ops

N, P = 7, 3
SEG = np.array([0, 2, 0, 2, 2, 0, 0], np.int32)  # parent 1 has no children


def tree(rng, n=N):
    return {"a": rng.normal(size=(n, 3, 2)).astype(np.float32), "b": rng.normal(size=(n,)).astype(np.float32)}


def ref_weighted_mean(x, w, seg, p):
    out = np.zeros((p,) + x.shape[1:], np.float64)
    total = np.zeros(p)
    for i in range(len(w)):
        if w[i] != 0:
            out[seg[i]] += w[i] * x[i].astype(np.float64)
        total[seg[i]] += w[i]
    safe = np.where(total > 0, total, 1.0)
    return out / safe.reshape((p,) + (1,) * (x.ndim - 1)), total


def test_weighted_mean_matches_numpy():
    rng = np.random.default_rng(0)
    x, w = tree(rng), rng.uniform(0.1, 5.0, size=N).astype(np.float32)
    mean, total = tree_ops.weighted_mean(x, jnp.asarray(w), jnp.asarray(SEG), P)
    for k in x:
        ref, ref_total = ref_weighted_mean(x[k], w, SEG, P)
        np.testing.assert_allclose(mean[k], ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(total, ref_total, rtol=1e-6)
    assert np.all(np.asarray(mean["a"][1]) == 0)  # no children: mean 0, total 0
    assert float(total[1]) == 0


def test_weighted_sum_matches_numpy():
    rng = np.random.default_rng(1)
    x, w = tree(rng), rng.uniform(-2.0, 2.0, size=N).astype(np.float32)
    out = tree_ops.weighted_sum(x, jnp.asarray(w), jnp.asarray(SEG), P)
    for k in x:
        ref = np.zeros((P,) + x[k].shape[1:])
        np.add.at(ref, SEG, w.reshape((N,) + (1,) * (x[k].ndim - 1)) * x[k])
        np.testing.assert_allclose(out[k], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf, 1e30])
def test_zero_weight_rows_change_nothing_even_if_not_finite(poison):
    rng = np.random.default_rng(2)
    x, w = tree(rng), rng.uniform(0.5, 2.0, size=N).astype(np.float32)
    zero = np.array([1, 5])
    w[zero] = 0.0
    poisoned = {k: v.copy() for k, v in x.items()}
    for v in poisoned.values():
        v[zero] = poison
    keep = np.setdiff1d(np.arange(N), zero)
    mean_p, total_p = tree_ops.weighted_mean(poisoned, jnp.asarray(w), jnp.asarray(SEG), P)
    mean_k, total_k = tree_ops.weighted_mean({k: v[keep] for k, v in x.items()}, jnp.asarray(w[keep]),
                                             jnp.asarray(SEG[keep]), P)
    for k in x:
        assert np.all(np.isfinite(mean_p[k]))
        np.testing.assert_allclose(mean_p[k], mean_k[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(total_p, total_k)


def test_gather_broadcasts_parent_rows():
    rng = np.random.default_rng(3)
    parents = tree(rng, P)
    out = tree_ops.gather(parents, jnp.asarray(SEG))
    for k in parents:
        np.testing.assert_array_equal(out[k], parents[k][SEG])


def test_broadcast_then_mean_is_identity_for_parents_with_children():
    rng = np.random.default_rng(4)
    parents = tree(rng, P)
    w = rng.uniform(0.1, 3.0, size=N).astype(np.float32)
    mean, total = tree_ops.weighted_mean(tree_ops.gather(parents, jnp.asarray(SEG)), jnp.asarray(w),
                                         jnp.asarray(SEG), P)
    has = np.asarray(total) > 0
    for k in parents:
        np.testing.assert_allclose(np.asarray(mean[k])[has], parents[k][has], rtol=1e-6)


def test_row_helpers():
    rng = np.random.default_rng(5)
    x = tree(rng)
    np.testing.assert_allclose(tree_ops.row_sq_norms(x),
                               (x["a"] ** 2).reshape(N, -1).sum(1) + x["b"] ** 2, rtol=1e-5)
    bad = {k: v.copy() for k, v in x.items()}
    bad["a"][2, 1, 0] = np.nan
    bad["b"][4] = np.inf
    assert list(np.asarray(tree_ops.row_all_finite(bad))) == [i not in (2, 4) for i in range(N)]
    mask = np.arange(N) % 2 == 0
    sel = tree_ops.where_rows(jnp.asarray(mask), x, bad)
    for k in x:
        np.testing.assert_array_equal(np.asarray(sel[k])[mask], x[k][mask])
        np.testing.assert_array_equal(np.asarray(sel[k])[~mask], bad[k][~mask])
