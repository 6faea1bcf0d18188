"""Invariants of DP-FedAvg aggregation, adaptive clipping and accounting."""
import json
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import pld, rdp
from hypothesis import given, settings, strategies as st

from worldlm_jax.privacy import accounting, ledger as dp_ledger, mechanism as P
from worldlm_jax.tree.policy import TopologyError
from worldlm_jax.tree.topology import build_topology

KEY = jax.random.key(0)


def _tree(rng, n, scale=1.0):
    return {"a/w": jnp.asarray(rng.normal(size=(n, 3, 4)) * scale, jnp.float32),
            "b/bias": jnp.asarray(rng.normal(size=(n, 5)) * scale, jnp.float32)}


def _row_norms(tree):
    return np.sqrt(sum(np.sum(np.asarray(x, np.float64).reshape(x.shape[0], -1) ** 2, 1)
                       for x in tree.values()))


# ------------------------------------------------------------------- clipping
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3),
       clip=st.floats(1e-2, 1e2))
def test_clip_bounds_norm_and_keeps_small_updates(seed, scale, clip):
    tree = _tree(np.random.default_rng(seed), 6, scale)
    tree["a/w"] = tree["a/w"].at[0].set(0.0)  # a zero row must stay zero (no 0/0)
    tree["b/bias"] = tree["b/bias"].at[0].set(0.0)
    clipped, norms = P.clip_updates(tree, jnp.full((6,), clip))
    before, after = _row_norms(tree), _row_norms(clipped)
    np.testing.assert_allclose(norms, before, rtol=1e-5)
    assert np.all(after <= clip * (1 + 1e-5))
    small = before <= clip
    for k in tree:
        np.testing.assert_array_equal(np.asarray(clipped[k])[small], np.asarray(tree[k])[small])
    assert np.all(np.isfinite(after))


def test_clip_inf_is_identity():
    tree = _tree(np.random.default_rng(1), 4, 1e3)
    clipped, _ = P.clip_updates(tree, jnp.full((4,), jnp.inf))
    for k in tree:
        np.testing.assert_array_equal(clipped[k], tree[k])


# ------------------------------------------------------------------- dp_mean
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_dp_mean_without_noise_is_plain_participant_mean(seed):
    rng = np.random.default_rng(seed)
    n, n_parents = 8, 3
    tree = _tree(rng, n)
    parent = jnp.asarray(rng.integers(0, n_parents, n))
    part = jnp.asarray(rng.random(n) < 0.7)
    big = float(_row_norms(tree).max()) * 2
    clip = jnp.asarray([big, jnp.inf, big])
    zeros = jnp.zeros(n_parents)
    mean, stats = P.dp_mean(tree, part, parent, n_parents, clip, zeros, jnp.full(3, 7.0), KEY)
    for p in range(n_parents):
        rows = np.asarray(part) & (np.asarray(parent) == p)
        for k in tree:
            want = np.asarray(tree[k])[rows].mean(0) if rows.any() else 0.0
            np.testing.assert_allclose(mean[k][p], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stats.clipped_fraction_P, 0.0)

    # padding rows (participate 0), even holding NaN, change nothing
    pad = {k: jnp.concatenate([v, jnp.full((2,) + v.shape[1:], jnp.nan)]) for k, v in tree.items()}
    mean2, _ = P.dp_mean(pad, jnp.concatenate([part, jnp.zeros(2, bool)]),
                         jnp.concatenate([parent, jnp.asarray([0, 2])]), n_parents,
                         clip, zeros, jnp.full(3, 7.0), KEY)
    for k in tree:
        np.testing.assert_array_equal(mean2[k], mean[k])


def test_dp_mean_clips_sums_and_divides_by_expected_count():
    tree = {"w": jnp.asarray([[3.0, 4.0], [0.3, 0.4], [6.0, 8.0]])}  # norms 5, 0.5, 10
    mean, stats = P.dp_mean(tree, jnp.asarray([1, 1, 0]), jnp.asarray([0, 0, 0]), 1,
                            jnp.asarray([1.0]), jnp.asarray([1e-9]), jnp.asarray([4.0]), KEY)
    np.testing.assert_allclose(mean["w"][0], [(0.6 + 0.3) / 4, (0.8 + 0.4) / 4], atol=1e-6)
    np.testing.assert_allclose(stats.norms_N, [5.0, 0.5, 10.0], rtol=1e-6)
    np.testing.assert_allclose(stats.clipped_fraction_P, [0.5])
    np.testing.assert_allclose(stats.count_P, [2.0])


def test_noise_keys_per_leaf_and_std():
    like = {"x": jnp.zeros((2, 300, 300)), "y": jnp.zeros((2, 300, 300))}
    noise = P.gaussian_noise(KEY, like, jnp.asarray([1.0, 2.0]))
    assert not np.allclose(noise["x"], noise["y"])
    assert not np.allclose(noise["x"][0], noise["x"][1])
    # keys depend on the structure only, not on the values
    k1, k2 = P.leaf_keys(KEY, like), P.leaf_keys(KEY, jax.tree.map(lambda v: v + 1, like))
    assert all(jnp.array_equal(jax.random.key_data(k1[k]), jax.random.key_data(k2[k])) for k in k1)

    z, clip, m = 1.3, 0.7, 5.0
    upd = {"big": jnp.zeros((3, 200_000))}
    mean, _ = P.dp_mean(upd, jnp.asarray([1, 1, 0]), jnp.asarray([0, 0, 1]), 2,
                        jnp.asarray([clip, 1.0]), jnp.asarray([z, 0.0]), jnp.asarray([m, 1.0]),
                        jax.random.key(3))
    std = float(jnp.std(mean["big"][0]))
    assert abs(std / (z * clip / m) - 1) < 0.01  # sampling sd of std is ~0.16%
    assert abs(float(jnp.mean(mean["big"][0]))) < 5 * z * clip / m / math.sqrt(200_000)
    np.testing.assert_array_equal(mean["big"][1], 0.0)  # no-DP federation: no noise


def test_dp_mean_jits():
    tree = _tree(np.random.default_rng(2), 4)
    f = jax.jit(P.dp_mean, static_argnums=3)
    mean, _ = f(tree, jnp.ones(4), jnp.asarray([0, 1, 0, 1]), 2, jnp.ones(2), jnp.ones(2),
                jnp.full(2, 2.0), KEY)
    assert mean["a/w"].shape == (2, 3, 4) and mean["a/w"].dtype == jnp.float32


# --------------------------------------------------------- adaptive clipping
def test_adaptive_clip_shrinks_grows_and_tracks_quantile():
    norms = jnp.linspace(0.1, 10.0, 100)
    part, parent = jnp.ones(100), jnp.zeros(100, jnp.int32)
    upd = lambda s, k, **kw: P.adaptive_clip_update(  # noqa: E731
        s, norms, part, parent, 0.3, 0.2, 0.0, k, expected_count_P=jnp.asarray([100.0]), **kw)
    high = upd(P.adaptive_clip_init(jnp.asarray([1e3])), KEY)
    assert float(high.clip[0]) < 1e3 and float(high.unclipped_fraction[0]) == pytest.approx(1.0)
    low = upd(P.adaptive_clip_init(jnp.asarray([1e-3])), KEY)
    assert float(low.clip[0]) > 1e-3

    frozen = P.adaptive_clip_update(P.adaptive_clip_init(jnp.asarray([2.0])), norms, part * 0, parent,
                                    0.5, 0.0, 1.0, KEY, expected_count_P=jnp.asarray([0.0]))
    assert float(frozen.clip[0]) == 2.0  # lr 0 (no adaptive clipping): clip fixed, even at m=0

    step = jax.jit(lambda s, k: upd(s, k))
    state = P.adaptive_clip_init(jnp.asarray([1e3]))
    for i in range(300):
        state = step(state, jax.random.fold_in(KEY, i))
    frac = float(jnp.mean(norms <= state.clip[0]))
    assert 0.25 <= frac <= 0.35


def test_adaptive_noise_split_preserves_total_privacy():
    z, sb = 1.0, 2.0
    zu = P.split_noise_multiplier(z, sb)
    assert zu > z and zu ** -2 + (2 * sb) ** -2 == pytest.approx(z ** -2)
    with pytest.raises(ValueError, match="clip_count_stddev=0.4"):
        P.split_noise_multiplier(1.0, 0.4)


# ---------------------------------------------------------------- accounting
@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_matches_dp_accounting(accountant):
    z, q, rounds, delta = 1.1, 0.05, 100, 1e-5
    acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds))
    assert accounting.epsilon_after(z, q, rounds, delta, accountant) == pytest.approx(acc.get_epsilon(delta))


def test_epsilon_fixed_and_full_sampling_events():
    acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    # replace-one: the clipped sum's sensitivity is 2 * clip, hence z / 2
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
        100, 10, dp_accounting.GaussianDpEvent(2.0 / 2)), 50))
    got = accounting.epsilon_after(2.0, 0.1, 50, 1e-5, sampling="fixed", population=100)
    assert got == pytest.approx(acc.get_epsilon(1e-5))
    full = rdp.RdpAccountant()
    full.compose(dp_accounting.GaussianDpEvent(3.0), 20)
    assert accounting.epsilon_after(3.0, 1.0, 20, 1e-5, sampling="full") == pytest.approx(
        full.get_epsilon(1e-5))
    with pytest.raises(ValueError, match="population"):
        accounting.epsilon_after(2.0, 0.1, 50, 1e-5, sampling="fixed")


def test_epsilon_monotone_and_edge_cases():
    eps = [accounting.epsilon_after(z, 0.1, 100, 1e-5) for z in (0.8, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(eps, eps[1:]))
    eps = [accounting.epsilon_after(1.0, 0.1, r, 1e-5) for r in (1, 10, 100, 1000)]
    assert all(a < b for a, b in zip(eps, eps[1:]))
    assert accounting.epsilon_after(1.0, 0.1, 0, 1e-5) == 0.0
    assert accounting.epsilon_after(0.0, 0.1, 5, 1e-5) == math.inf


@pytest.mark.parametrize("target", [0.5, 3.0])
def test_calibrate_noise_hits_target(target):
    z = accounting.calibrate_noise(target, 1e-5, 0.05, 300)
    eps = accounting.epsilon_after(z, 0.05, 300, 1e-5)
    assert target * 0.99 <= eps <= target


# ----------------------------------------------------------------- policies
@pytest.mark.parametrize("fields, named", [
    (dict(dp_clip=0.0), "'dp_clip' = 0.0"), (dict(dp_clip=-1.0), "'dp_clip' = -1.0"),
    (dict(dp_noise_multiplier=-0.5), "'dp_noise_multiplier' = -0.5"),
    (dict(dp_delta=0.0), "'dp_delta' = 0.0"), (dict(dp_delta=1.5), "'dp_delta' = 1.5"),
    (dict(dp_noise_multiplier=1.0), "'dp_clip' = inf"),
])
def test_bad_policy_names_federation_and_value(fields, named):
    with pytest.raises(TopologyError, match=f"federation 'eu-west'.*{named}"):
        build_topology({"name": "root", "children": [{"name": "eu-west", "clients": 2, "sources": ["s"],
                                                      "policy": fields}]})


def test_unreachable_target_names_federation_and_target():
    topology = build_topology({"name": "asia", "clients": 2, "sources": ["s"]})
    with pytest.raises(ValueError, match="federation 'asia'.*target_epsilon=0.0001.*unreachable"):
        dp_ledger.calibrate(topology, 1e-4, 1e-5, 1000)
    ok = dp_ledger.calibrate(topology, 2.0, 1e-5, 10).levels[0].policies[0]
    assert accounting.epsilon_after(ok.dp_noise_multiplier, 1.0, 10, ok.dp_delta, sampling="full") <= 2.0


def test_federation_accountant_round_trip_and_budget_stop():
    acc = accounting.FederationAccountant("eu", 1.0, 0.1)
    acc.step()
    acc.step(4)
    back = accounting.FederationAccountant.from_dict(json.loads(json.dumps(acc.to_dict())))
    assert back == acc and back.rounds == 5
    assert back.epsilon(1e-5) == accounting.epsilon_after(1.0, 0.1, 5, 1e-5)
    eps = acc.epsilon(1e-5)
    assert not accounting.would_exceed(acc, eps + 1e-9, 1e-5, rounds=0)
    assert accounting.would_exceed(acc, eps + 1e-9, 1e-5)
    with pytest.raises(ValueError, match="federation 'x'.*population"):
        accounting.FederationAccountant("x", 1.0, 0.1, sampling="fixed")
