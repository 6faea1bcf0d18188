"""WorldLM's key-layer mechanisms and the diagnostics that explain them:
adaptive attention (similarities in units of their spread), the attention
entropy, the children's similarity matrix and K-delta norms."""
import jax.numpy as jnp
import numpy as np
import pytest

from test_aggregation import GROUPS, PARENT, SHAPES, attend, close, policy, ref_mean, setup, stacked
from worldlm_jax.engine import aggregation

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
    np.testing.assert_allclose(np.asarray(info.delta_norm_N), norms * (w > 0), rtol=1e-5)  # absent: 0
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


# ---- personalised attention: each child its own mixture of its siblings' K -----------
def personal(K, base, w, parent, tau, eta=1.0):
    n = len(parent)
    out = aggregation.personal_keys(K, base, jnp.asarray(w), jnp.asarray(parent), jnp.full(n, tau, jnp.float32),
                                    jnp.full(n, eta, jnp.float32), GROUPS)
    return {p: np.asarray(v) for p, v in out.items()}


def test_personal_keys_at_huge_tau_give_every_child_the_weighted_mean():
    rng, node, child, w = setup(2)
    base = {p: v[PARENT] for p, v in node.items()}
    out = personal(child, base, w, PARENT, 1e9)
    for p in out:
        for n in range(2):
            sel = PARENT == n
            mean = (w[sel].reshape((-1,) + (1,) * (child[p].ndim - 1)) * child[p][sel]).sum(0) / w[sel].sum()
            np.testing.assert_allclose(out[p][sel], np.broadcast_to(mean, out[p][sel].shape), atol=1e-5)


def test_personal_keys_one_child_and_absent_children_keep_their_own():
    rng, node, child, w = setup(4)
    base = {p: v[PARENT] for p, v in node.items()}
    parent = np.array([0, 1, 1, 1, 1, 1, 1], np.int32)
    w[3] = 0.0  # absent: unchanged, and no one's candidate
    out = personal(child, base, w, parent, 0.3)
    for p in out:
        np.testing.assert_allclose(out[p][0], child[p][0], atol=1e-6)
        np.testing.assert_array_equal(out[p][3], child[p][3])
    w2 = w.copy()
    w2[3] = 1.0
    changed = personal({p: v.copy() for p, v in child.items()}, base, w2, parent, 0.3)
    assert not np.allclose(changed["blocks/0/a"][1], out["blocks/0/a"][1])  # child 3 counts once present


def test_personal_keys_are_permutation_equivariant_and_personal():
    rng, node, child, w = setup(6)
    base = {p: v[PARENT] for p, v in node.items()}
    perm = rng.permutation(len(PARENT))
    out = personal(child, base, w, PARENT, 0.2)
    out_p = personal({p: v[perm] for p, v in child.items()}, {p: v[perm] for p, v in base.items()}, w[perm],
                     PARENT[perm], 0.2)
    for p in out:
        np.testing.assert_allclose(out[p][perm], out_p[p], atol=1e-5)
    # at a finite tau siblings receive different mixtures, each closest to itself
    a = out["blocks/0/a"][PARENT == 1].reshape(4, -1)
    own = child["blocks/0/a"][PARENT == 1].reshape(4, -1)
    dist = np.linalg.norm(a[:, None] - own[None], axis=2)
    assert len({tuple(np.round(r, 4)) for r in a}) == 4
    assert np.all(np.argmin(dist, axis=1) == np.arange(4))


def _personal_run(k_agg, tau, rounds=2, fed_policies=None):
    from engine_helpers import TOY_KEY_PATHS, make_batches, make_spec, run, toy_params, topo, tree2
    from worldlm_jax import engine
    from worldlm_jax.config import AlgorithmConfig
    from worldlm_jax.engine import strategies
    from worldlm_jax.run import blueprint

    policy = dict(local_steps=2, client_lr=0.3, k_agg=k_agg, tau=tau)
    t = topo(tree2([3, 2], root_policy=policy, fed_policies=fed_policies), weights=[1, 2, 3, 1, 2])
    plan = blueprint.with_personal_keys(strategies.worldlm_plan(2, residuals="none", use_parent=False), t,
                                        AlgorithmConfig())
    spec = make_spec(t, plan, key_paths=TOY_KEY_PATHS, client_optimizer="test_sgd")
    state, _ = run(engine.make_strategy(spec), toy_params(1), make_batches(t, rounds, seed=3))
    return spec, state, engine.deployed_params(spec, state, jnp.arange(t.n_clients))


def test_personalized_at_huge_tau_deploys_what_the_mean_deploys():
    from engine_helpers import assert_tree_close
    spec, state, deployed = _personal_run("personalized", 1e9)
    assert spec.plan.personal_keys and "K" in spec.plan.client_keeps
    _, mean_state, mean_deployed = _personal_run("mean", 1e9)
    assert_tree_close(deployed, mean_deployed, atol=1e-5, rtol=1e-5)
    assert_tree_close(state.levels[1].K, mean_state.levels[1].K, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(state.clients.K["blocks/0/w"], 0.0, atol=1e-5)  # no personal offsets


def test_personalized_clients_deploy_their_own_key_layers():
    spec, state, deployed = _personal_run("personalized", 0.05)
    w = np.asarray(deployed["blocks/0/w"])
    assert not np.allclose(w[0], w[1], atol=1e-4) and not np.allclose(w[3], w[4], atol=1e-4)
    # deployed = the federation's K + the client's offset
    np.testing.assert_allclose(w, np.asarray(state.levels[1].K["blocks/0/w"])[[0, 0, 0, 1, 1]]
                               + np.asarray(state.clients.K["blocks/0/w"]), atol=1e-6)
    np.testing.assert_array_equal(deployed["embed"][0], state.levels[0].B["embed"][0])  # B stays shared


def test_personalized_on_some_leaf_federations_only_is_refused():
    from worldlm_jax.config import ConfigError
    with pytest.raises(ConfigError, match="k_agg=personalized is set on some leaf federations but not on F1"):
        _personal_run("personalized", 1.0, fed_policies=[{}, {"k_agg": "mean"}])
