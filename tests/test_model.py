"""Decoder LM: shapes, numerics at init, causality, positions, presets, transforms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from worldlm_jax import model as M

TINY = M.preset('tiny')


@pytest.fixture(scope='module')
def tiny():
    return M.init(TINY, jax.random.key(0))


def _tokens(seed, B, L, vocab=256):
    # numpy, not jax.random: no per-shape compile of the sampler.
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (B, L)), jnp.int32)


def test_forward_shape_dtype_and_param_paths(tiny):
    model_def, params = tiny
    logits = jax.jit(model_def.apply)(params, _tokens(1, 3, 16))
    assert logits.shape == (3, 16, 256) and logits.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in params.values())
    assert {'embed/embedding', 'pos_embed/embedding', 'final_norm/scale',
            'blocks/0/attn/qkv/kernel', 'blocks/1/mlp/down/kernel'} <= set(params)
    assert not any(k.startswith('head') for k in params)  # tied head
    assert model_def.param_paths == tuple(sorted(params))
    assert sum(v.size for v in params.values()) == M.count_params(TINY)


def test_init_is_deterministic_in_key_and_model_def_hashable(tiny):
    model_def, params = tiny
    model_def2, params2 = M.init(TINY, jax.random.key(0))
    _, params3 = M.init(TINY, jax.random.key(1))
    assert model_def == model_def2 and hash(model_def) == hash(model_def2)
    np.testing.assert_array_equal(params['embed/embedding'], params2['embed/embedding'])
    assert not np.allclose(params['embed/embedding'], params3['embed/embedding'])


def test_loss_at_init_is_about_log_vocab(tiny):
    model_def, params = tiny
    loss, n_tokens = jax.jit(model_def.loss)(params, _tokens(2, 4, 65))
    assert np.isfinite(loss)
    assert abs(float(loss) - math.log(256)) < 0.1
    assert int(n_tokens) == 4 * 64


def test_loss_matches_manual_cross_entropy(tiny):
    model_def, params = tiny
    tokens = _tokens(3, 2, 9)

    @jax.jit
    def both(params):
        logp = jax.nn.log_softmax(model_def.apply(params, tokens[:, :-1]))
        manual = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()
        return model_def.loss(params, tokens)[0], manual

    np.testing.assert_allclose(*both(params), rtol=1e-5)


def test_gradients_match_param_shapes_and_are_nonzero(tiny):
    model_def, params = tiny
    grads = jax.jit(jax.grad(lambda p: model_def.loss(p, _tokens(4, 2, 17))[0]))(params)
    assert set(grads) == set(params)
    for k in params:
        assert grads[k].shape == params[k].shape and grads[k].dtype == jnp.float32, k
        assert np.all(np.isfinite(grads[k])), k
    assert float(jnp.abs(grads['blocks/0/attn/qkv/kernel']).sum()) > 0


@pytest.mark.parametrize('positions', ['learned', 'rotary'])
def test_causal_and_order_aware(positions):
    """Changing a future token leaves earlier logits alone; swapping two past tokens
    changes later logits (attention without positions would be order-blind)."""
    model_def, params = M.init(M.preset('tiny', positions=positions), jax.random.key(0))
    assert ('pos_embed/embedding' in params) == (positions == 'learned')
    base = _tokens(5, 1, 12)[0]
    future = base.at[8].set((base[8] + 1) % 256)
    swapped = base.at[2].set(base[3]).at[3].set(base[2])
    assert base[2] != base[3]
    a, b, c = jax.jit(model_def.apply)(params, jnp.stack([base, future, swapped]))
    np.testing.assert_allclose(a[:8], b[:8], atol=1e-6)
    assert not np.allclose(a[8:], b[8:], atol=1e-5)
    assert not np.allclose(a[-1], c[-1], atol=1e-5)


def test_rotary_is_relative():
    """RoPE: q.k depends only on the position difference."""
    rng = np.random.default_rng(0)
    q_k = np.tile(rng.normal(size=(2, 1, 1, 8)).astype(np.float32), (1, 10, 1, 1))
    qs, ks = np.asarray(jax.jit(M.rotary, static_argnums=1)(q_k, 10_000.0))[:, :, 0]

    def score(i, j):
        return float(qs[i] @ ks[j])

    assert score(5, 3) == pytest.approx(score(9, 7), rel=1e-4)
    assert score(5, 3) != pytest.approx(score(5, 4), rel=1e-3)


def test_bfloat16_compute_keeps_float32_params_and_close_loss(tiny):
    model_def, params = tiny
    bf16_def, bf16_params = M.init(M.preset('tiny', dtype='bfloat16'), jax.random.key(0))
    assert all(v.dtype == jnp.float32 for v in bf16_params.values())
    tokens = _tokens(6, 2, 17)
    assert jax.eval_shape(bf16_def.apply, bf16_params, tokens).dtype == jnp.float32
    bf16_loss, f32_loss = jax.jit(lambda p: (bf16_def.loss(p, tokens)[0], model_def.loss(p, tokens)[0]))(params)
    np.testing.assert_allclose(bf16_loss, f32_loss, atol=2e-2)


def test_remat_and_untied_head():
    tokens = _tokens(7, 2, 9)
    base_def, params = M.init(TINY, jax.random.key(0))
    remat_def, _ = M.init(M.preset('tiny', remat=True), jax.random.key(0))
    g1, g2 = jax.jit(lambda p: (jax.grad(lambda p: base_def.loss(p, tokens)[0])(p),
                                jax.grad(lambda p: remat_def.loss(p, tokens)[0])(p)))(params)
    for k in params:
        np.testing.assert_allclose(g1[k], g2[k], atol=1e-6)
    untied_def, untied = M.init(M.preset('tiny', tie_embeddings=False), jax.random.key(0))
    assert untied['head/kernel'].shape == (32, 256)
    assert jax.eval_shape(untied_def.apply, untied, tokens).shape == (2, 9, 256)


def test_sequence_longer_than_max_len_raises(tiny):
    model_def, params = tiny
    jax.eval_shape(model_def.loss, params, _tokens(8, 1, 65))  # 64 inputs: fits exactly
    with pytest.raises(ValueError, match=r'65.*max_len=64'):
        jax.eval_shape(model_def.apply, params, _tokens(8, 1, 65))


def test_params_must_match_model(tiny):
    model_def, params = tiny
    partial = {k: v for k, v in params.items() if not k.startswith('blocks/1/')}
    with pytest.raises(ValueError, match='missing'):
        jax.eval_shape(model_def.apply, partial, _tokens(9, 1, 4))


def test_jit_vmap_over_stacked_params_equals_per_example(tiny):
    model_def, _ = tiny
    clients = [M.init(TINY, jax.random.key(10 + c))[1] for c in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *clients)
    tokens_CxBxL = _tokens(4, 6, 10).reshape(3, 2, 10)
    batched = jax.jit(jax.vmap(model_def.apply))(stacked, tokens_CxBxL)
    apply = jax.jit(model_def.apply)
    for c in range(3):
        np.testing.assert_allclose(batched[c], apply(clients[c], tokens_CxBxL[c]), atol=1e-5)


def test_config_validation_names_field():
    with pytest.raises(ValueError, match=r'd_model \(30\).*n_heads \(4\)'):
        M.ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match=r'positions.*learned.*rotary'):
        M.ModelConfig(positions='alibi')
    with pytest.raises(ValueError, match=r'dtype.*float32.*bfloat16'):
        M.ModelConfig(dtype='float16')
    with pytest.raises(ValueError, match=r'rotary.*even head dim'):
        M.ModelConfig(d_model=6, n_heads=2, positions='rotary')
    with pytest.raises(ValueError, match=r'n_layers'):
        M.ModelConfig(n_layers=0)


def test_presets():
    assert M.preset('tiny').ff_dim == 128
    w = M.preset('w')
    assert (w.vocab_size, w.d_model, w.n_heads, w.n_layers, w.ff_dim, w.max_len, w.positions) == (
        256, 128, 4, 2, 512, 128, 'learned')
    assert M.preset('small', n_layers=5).n_layers == 5
    assert M.preset('small', d_model=256).ff_dim == 1024  # d_ff follows d_model
    with pytest.raises(ValueError, match=r"Unknown model preset 'huge'.*125m"):
        M.preset('huge')
    with pytest.raises(ValueError, match=r"Unknown ModelConfig field.*d_modle"):
        M.preset('tiny', d_modle=64)


@pytest.mark.parametrize('name,target', [('75m', 75e6), ('125m', 125e6), ('400m', 400e6)])
def test_large_preset_param_counts_within_10_percent(name, target):
    config = M.preset(name)
    n = M.count_params(config)  # shapes only: nothing allocated
    assert abs(n - target) / target < 0.10, (name, n)
    assert config.vocab_size == 50304 and config.tie_embeddings
    assert M.flops_per_token(config, 1024) > 6 * n * 0.9


def test_flops_per_token_counts_matmuls_and_attention():
    c = M.preset('w')
    n_matmul = M.count_params(c) - c.max_len * c.d_model  # position table is a lookup
    assert M.flops_per_token(c, 128) == 6 * n_matmul + 12 * c.n_layers * c.d_model * 128


def test_causal_attention_matches_jax_reference():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 16, 4, 8)), jnp.float32) for _ in range(3))
    np.testing.assert_allclose(M.causal_attention(q, k, v),
                               jax.nn.dot_product_attention(q, k, v, is_causal=True), atol=1e-5)


def test_causal_attention_gradient_matches_autodiff_of_the_reference():
    """The hand-written softmax backward (custom VJP) against JAX's autodiff of
    jax.nn.dot_product_attention, for q, k and v."""
    rng = np.random.default_rng(1)
    q, k, v, w = (jnp.asarray(rng.normal(size=(2, 16, 4, 8)), jnp.float32) for _ in range(4))
    ours = jax.grad(lambda *a: jnp.sum(M.causal_attention(*a) * w), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(lambda *a: jnp.sum(jax.nn.dot_product_attention(*a, is_causal=True) * w),
                   argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_fused_attention_kernel_gives_the_same_model():
    """`attention: fused` (jax.nn.dot_product_attention, cuDNN on GPU) and the
    explicit kernel are the same function of the parameters: loss and gradients."""
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 17)), jnp.int32)
    out = {}
    for kind in ('explicit', 'fused'):
        model_def, params = M.init(M.preset('tiny', attention=kind), jax.random.PRNGKey(0))
        out[kind] = jax.value_and_grad(lambda p: model_def.loss(p, tokens)[0])(params)
    np.testing.assert_allclose(out['explicit'][0], out['fused'][0], rtol=1e-5)
    for k in out['explicit'][1]:
        np.testing.assert_allclose(out['explicit'][1][k], out['fused'][1][k], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="attention must be one of"):
        M.preset('tiny', attention='flash')
