"""Decoder LM: shapes, numerics at init, causality, positions, presets, transforms."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from worldlm_jax.model import kernels, lm as M

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
    qs, ks = np.asarray(jax.jit(kernels.rotary, static_argnums=1)(q_k, 10_000.0))[:, :, 0]

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
    np.testing.assert_allclose(kernels.causal_attention(q, k, v),
                               jax.nn.dot_product_attention(q, k, v, is_causal=True), atol=1e-5)


@pytest.mark.parametrize("recompute", [False, True], ids=["probabilities-stored", "recomputed"])
def test_causal_attention_gradient_matches_autodiff_of_the_reference(recompute):
    """The hand-written softmax backward (custom VJP) against JAX's autodiff of
    jax.nn.dot_product_attention, for q, k and v; with the probabilities read
    stored, or recomputed from each row's log-sum-exp."""
    rng = np.random.default_rng(1)
    q, k, v, w = (jnp.asarray(rng.normal(size=(2, 16, 4, 8)), jnp.float32) for _ in range(4))
    ours = jax.grad(lambda *a: jnp.sum(kernels.causal_attention(*a, recompute=recompute) * w),
                    argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(lambda *a: jnp.sum(jax.nn.dot_product_attention(*a, is_causal=True) * w),
                   argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_recomputed_attention_keeps_no_square_residual():
    """`recompute` keeps q, k, v, the output and one value per row for the
    backward: no (L, L) array, the probabilities' (B*H) L^2 floats gone."""
    B, L, H, K = 2, 64, 4, 8
    q = jnp.zeros((B, L, H, K), jnp.float32)
    for recompute, square in ((False, 1), (True, 0)):
        _, vjp = jax.vjp(lambda *a: kernels.causal_attention(*a, recompute=recompute), q, q, q)
        shapes = [x.shape for x in jax.tree.leaves(vjp)]
        assert sum(s[-2:] == (L, L) for s in shapes) == square, shapes


def test_fused_attention_kernel_gives_the_same_model():
    """`attention: fused` (jax.nn.dot_product_attention, cuDNN on GPU) and the
    explicit kernel are the same function of the parameters: loss and gradients."""
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 17)), jnp.int32)
    out = {}
    for kind in ('explicit', 'fused', 'recompute'):
        model_def, params = M.init(M.preset('tiny', attention=kind), jax.random.PRNGKey(0))
        out[kind] = jax.value_and_grad(lambda p: model_def.loss(p, tokens)[0])(params)
    np.testing.assert_allclose(out['explicit'][0], out['fused'][0], rtol=1e-5)
    for kind in ('fused', 'recompute'):
        np.testing.assert_allclose(out['explicit'][0], out[kind][0], rtol=1e-5)
        for k in out['explicit'][1]:
            np.testing.assert_allclose(out['explicit'][1][k], out[kind][1][k], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="attention must be one of"):
        M.preset('tiny', attention='flash')


# ----------------------------------------------------------------------------- bf16 products

def _bf16_round(x):
    return x.astype(jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize('kernel_is_OxI', [False, True])
@pytest.mark.parametrize('materialise', [True, False])
def test_bf16_dense_is_the_float32_product_of_bf16_rounded_operands(monkeypatch, kernel_is_OxI, materialise):
    """Forward and both gradients of `bf16_dense` equal float32 products of the
    bf16-rounded operands (and of the bf16-rounded output gradient), in both kernel
    layouts and in both forms (split contraction with the XLA flag, plain without)."""
    assert kernels.cpu_transposes_materialise()  # conftest sets the flag: the AMX form is the default here
    monkeypatch.setattr(kernels, 'cpu_transposes_materialise', lambda: materialise)
    rng = np.random.default_rng(3)
    x, g = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((24, 16), (24, 12)))
    kernel = jnp.asarray(rng.normal(size=(12, 16) if kernel_is_OxI else (16, 12)), jnp.float32)
    y, vjp = jax.vjp(lambda x, w: kernels.bf16_dense(x, w, kernel_is_OxI), x, kernel)
    dx, dw = vjp(g)
    w_IxO = _bf16_round(kernel.T if kernel_is_OxI else kernel)
    hi = dict(precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(y, jnp.dot(_bf16_round(x), w_IxO, **hi), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, jnp.dot(_bf16_round(g), w_IxO.T, **hi), rtol=1e-5, atol=1e-5)
    dw_IxO = jnp.dot(_bf16_round(x).T, _bf16_round(g), **hi)
    np.testing.assert_allclose(dw, dw_IxO.T if kernel_is_OxI else dw_IxO, rtol=1e-5, atol=1e-5)
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32


def _dot_operand_dtypes(hlo_text: str) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot in optimised HLO text, fusions included."""
    types, out = {}, []
    for line in hlo_text.splitlines():
        m = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[', line)
        if m:
            types[m.group(1)] = m.group(2)
        d = re.search(r' dot\(%([\w.\-]+), %([\w.\-]+)\)', line)
        if d:
            out.append((types.get(d.group(1)), types.get(d.group(2))))
    return out


def test_bf16_matmuls_keep_every_dense_product_in_bf16_on_cpu():
    """With the flag, all three products of every dense layer (and of the tied head)
    reach XLA:CPU's compiled program with bf16 operands; without the split form XLA
    folds the backward transposes and upcasts those products to float32. A regression
    guard for the XLA behaviour the fast path relies on (kernels.py, bf16 products)."""
    cfg = M.preset('tiny', matmul_dtype='bfloat16', attention='explicit')
    model_def, params = M.init(cfg, jax.random.key(0))
    tokens = _tokens(5, 2, 17)
    grad = jax.jit(jax.grad(lambda p: model_def.loss(p, tokens)[0]))
    dots = _dot_operand_dtypes(grad.lower(params).compile().as_text())
    n_dense = 4 * cfg.n_layers + 1  # qkv, out, up, down per block; the head
    assert sum(d == ('bf16', 'bf16') for d in dots) == 3 * n_dense


@pytest.mark.parametrize('shape', [{}, {'tie_embeddings': False},
                                   {'d_model': 30, 'n_heads': 3, 'd_ff': 99, 'positions': 'rotary', 'remat': True}])
def test_bf16_matmuls_track_the_float32_model(shape):
    """Mixed precision changes the loss and the gradients by bf16 rounding only, for the
    tied and the untied head and for odd widths (d_ff 99: the plain form); the parameters
    stay float32, and the option validates its field."""
    tokens = _tokens(6, 4, 33)
    out = {}
    for md in ('float32', 'bfloat16'):
        cfg = M.preset('tiny', matmul_dtype=md, **shape)
        model_def, params = M.init(cfg, jax.random.key(0))
        out[md] = jax.jit(jax.value_and_grad(lambda p: model_def.loss(p, tokens)[0]))(params)
        assert all(v.dtype == jnp.float32 for v in params.values())
    (l32, g32), (l16, g16) = out['float32'], out['bfloat16']
    assert l16 != l32  # the bf16 path is taken ...
    np.testing.assert_allclose(l16, l32, rtol=2e-3)  # ... and is the same model
    for k in g32:
        cos = jnp.vdot(g16[k], g32[k]) / (jnp.linalg.norm(g16[k]) * jnp.linalg.norm(g32[k]))
        assert cos > 0.99, k
    with pytest.raises(ValueError, match=r'matmul_dtype must be one of'):
        M.ModelConfig(matmul_dtype='float16')
    with pytest.raises(ValueError, match=r"matmul_dtype='bfloat16'.*Set only one"):
        M.ModelConfig(matmul_dtype='bfloat16', dtype='bfloat16')
