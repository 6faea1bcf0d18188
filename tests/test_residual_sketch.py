"""Residual embeddings: count sketches keep the similarity that attention needs."""
import jax.numpy as jnp
import numpy as np

from worldlm_jax.engine import aggregation


def test_sketch_preserves_inner_products_and_is_the_same_for_every_federation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 20_000)).astype(np.float32)
    x[1] = 0.6 * x[0] + 0.8 * x[1]  # cosine about 0.6
    a = aggregation.sketch({"blocks/1/w": jnp.asarray(x)}, 1024)["blocks/1/w"]
    b = aggregation.sketch({"blocks/1/w": jnp.asarray(x[::-1].copy())}, 1024)["blocks/1/w"]
    cos = lambda u, v: float(u @ v / np.sqrt((u @ u) * (v @ v)))
    assert abs(cos(a[0], a[1]) - cos(x[0], x[1])) < 0.1
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[1]), rtol=1e-5)  # same hashing for a row anywhere


def test_attention_on_embeddings_matches_attention_on_full_keys():
    rng = np.random.default_rng(1)
    P, N = 3, 6
    K = {"blocks/0/w": jnp.asarray(rng.normal(size=(P, 3000)), jnp.float32)}
    child = {"blocks/0/w": jnp.repeat(K["blocks/0/w"], 2, 0) + 0.1 * jnp.asarray(rng.normal(size=(N, 3000)), jnp.float32)}
    policy = aggregation.AttentionPolicy(jnp.zeros(P, jnp.int32), jnp.full(P, 0.5), jnp.ones(P), jnp.zeros(P), jnp.zeros(P))
    mask = jnp.asarray(~np.eye(P, dtype=bool))
    args = (K, child, jnp.ones(N), jnp.array([0, 0, 1, 1, 2, 2]), policy, {"blocks/0/w": 0})
    full_K, full = aggregation.attend_keys(*args, residual_K_M=K, residual_mask_PxM=mask)
    sk_K, sk = aggregation.attend_keys(*args, residual_K_M=K, residual_mask_PxM=mask, residual_dim=512)
    np.testing.assert_allclose(np.asarray(sk.residual_weight_PxM), np.asarray(full.residual_weight_PxM), atol=0.03)
    assert not np.allclose(np.asarray(sk.residual_weight_PxM), np.asarray(full.residual_weight_PxM))  # really sketched
    np.testing.assert_allclose(np.asarray(sk_K["blocks/0/w"]), np.asarray(full_K["blocks/0/w"]), atol=0.05)
