"""WorldLM's key-layer mechanisms and the diagnostics that explain them:
adaptive attention (similarities in units of their spread), the attention
entropy, the children's similarity matrix and K-delta norms."""
import jax.numpy as jnp
import numpy as np
import pytest

from test_aggregation import GROUPS, PARENT, SHAPES, attend, close, policy, ref_mean, setup, stacked
from worldlm_jax import aggregation

ADAPTIVE = 4


def test_adaptive_attention_with_huge_tau_is_weighted_mean():
    _, node, child, w = setup()
    out, info = attend(node, child, w, policy(ADAPTIVE, tau=1e7))
    close(out, ref_mean(node, child, w))
    for n in range(2):  # the weights are the data shares, and so is their entropy
        share = w[PARENT == n] / w[PARENT == n].sum()
        expected = -(share * np.log(share)).sum() / np.log(len(share))
        assert float(info.child_entropy_P[n]) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("mode", [0, ADAPTIVE])
def test_one_child_returns_itself(mode):
    rng, node, child, w = setup(3)
    parent = np.array([0, 1, 1, 1, 1, 1, 1], np.int32)  # node 0 has one child
    out, info = attend(node, child, w, policy(mode, tau=0.5), parent=parent)
    for p in out:
        np.testing.assert_allclose(out[p][0], child[p][0], atol=1e-5, err_msg=p)
    assert float(info.child_entropy_P[0]) == 1.0  # a single child: uniform by definition


@pytest.mark.parametrize("mode", [0, ADAPTIVE])
def test_attention_is_permutation_equivariant(mode):
    """Relabelling the children permutes their weights and leaves each node's K unchanged."""
    rng, node, child, w = setup(5)
    perm = rng.permutation(len(PARENT))
    out, info = attend(node, child, w, policy(mode, tau=0.3))
    out_p, info_p = attend(node, {p: v[perm] for p, v in child.items()}, w[perm], policy(mode, tau=0.3),
                           parent=PARENT[perm])
    close(out, out_p, atol=1e-5)
    np.testing.assert_allclose(np.asarray(info.child_weight_N)[perm], np.asarray(info_p.child_weight_N), atol=1e-6)
    sim, sim_p = np.asarray(info.child_similarity_NxN), np.asarray(info_p.child_similarity_NxN)
    np.testing.assert_allclose(sim[np.ix_(perm, perm)], sim_p, atol=1e-5)


def test_adaptive_attention_ignores_the_scale_of_similarity_differences():
    """Plain attention at a fixed tau turns near-equal similarities into near-equal
    weights; adaptive attention measures them against their spread, so children
    that differ only slightly (same direction plus small noise) are still ranked."""
    rng = np.random.default_rng(0)
    node = stacked(rng, 2)
    base = stacked(rng, 1)

    def children(noise):
        return {p: node[p][PARENT] + base[p][0] + noise * rng.normal(size=(len(PARENT),) + s).astype(np.float32)
                for p, s in SHAPES.items()}

    w = np.ones(len(PARENT), np.float32)
    ent = {}
    for noise in (0.1, 1.0):
        for mode in (0, ADAPTIVE):
            ent[mode, noise] = np.asarray(attend(node, children(noise), w, policy(mode, tau=0.5))[1].child_entropy_P)
    assert np.all(ent[0, 0.1] > 0.99)  # plain: small differences, uniform weights
    assert np.all(ent[ADAPTIVE, 0.1] < 0.95) and np.all(ent[ADAPTIVE, 1.0] < 0.95)  # adaptive: ranked at both scales


def test_diagnostics_match_their_definitions():
    _, node, child, w = setup(7)
    w[2] = 0.0  # an absent child: no similarity, no entropy share
    out, info = attend(node, child, w, policy(0, tau=0.2))
    delta = {p: child[p] - node[p][PARENT] for p in node}
    norms = np.sqrt(sum((delta[p].reshape(len(PARENT), -1) ** 2).sum(1) for p in delta))
    np.testing.assert_allclose(np.asarray(info.delta_norm_N), norms, rtol=1e-5)
    # cosine per key group, averaged over groups
    cos = np.zeros((len(PARENT), len(PARENT)))
    for g in set(GROUPS.values()):
        x = np.concatenate([delta[p].reshape(len(PARENT), -1) for p in delta if GROUPS[p] == g], axis=1)
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        cos += x @ x.T / len(set(GROUPS.values()))
    live = w > 0
    cos = cos * live[:, None] * live[None, :]
    np.testing.assert_allclose(np.asarray(info.child_similarity_NxN), cos, atol=1e-5)


def test_tiny_tau_entropy_goes_to_zero():
    _, node, child, w = setup(1)
    _, info = attend(node, child, w, policy(0, tau=1e-4))
    assert np.all(np.asarray(info.child_entropy_P) < 0.01)


def test_similarity_matrix_skipped_for_many_children(monkeypatch):
    monkeypatch.setattr(aggregation, "SIMILARITY_MATRIX_MAX", 3)
    _, node, child, w = setup()
    out, info = aggregation.attend_keys(node, child, jnp.asarray(w), jnp.asarray(PARENT), policy(0), GROUPS)
    assert info.child_similarity_NxN is None and info.delta_norm_N.shape == (len(PARENT),)
