"""The decoder as Flax NNX modules: attention, MLP, pre-LN block, and the whole
tokens -> logits network.

GPT-2 / MPT style: token embedding, learned or rotary positions, pre-LN blocks
(LayerNorm -> causal MHA -> residual; LayerNorm -> GELU MLP -> residual), final
LayerNorm, output head tied to the embedding. Linear layers have no biases (as
in MPT): fewer leaves to aggregate and no quality loss at this scale. The
numerics (RoPE, the attention kernel, bf16 products) live in `kernels.py`; the
config, the flat-params interface and init in `model.py`, which is how the rest
of the engine sees these modules.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from worldlm_jax.model.config import ModelConfig
from worldlm_jax.model.kernels import bf16_dense, causal_attention, rotary


def _normal(std: float):
    return jax.nn.initializers.normal(stddev=std)


# GPT-2 init: N(0, 0.02) everywhere, residual output projections scaled by
# 1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth.
# A small embedding std also keeps the tied head's initial logits near 0, so the
# initial loss is about log(vocab_size).
_STD = 0.02


def _project(config: ModelConfig, linear: nnx.Linear, x_NxI: jax.Array) -> jax.Array:
    if config.matmul_dtype == 'bfloat16':
        return bf16_dense(x_NxI, linear.kernel[...])
    return linear(x_NxI)


class Attention(nnx.Module):
    """Causal multi-head self-attention; softmax in float32."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, dt = config.d_model, config.compute_dtype
        self.config = config
        self.qkv = nnx.Linear(d, 3 * d, use_bias=False, dtype=dt,
                              kernel_init=_normal(_STD), rngs=rngs)
        self.out = nnx.Linear(d, d, use_bias=False, dtype=dt,
                              kernel_init=_normal(_STD / math.sqrt(2 * config.n_layers)), rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        B, L, D = x_BxLxD.shape
        c = self.config
        # Projections on (B*L, D): XLA CPU's weight gradients are ~2.5x slower
        # when the contraction runs over two batch-like axes (benchmarks/RESULTS.md).
        qkv_BxLx3xHxK = _project(c, self.qkv, x_BxLxD.reshape(B * L, D)).reshape(B, L, 3, c.n_heads, c.head_dim)
        q, k, v = (qkv_BxLx3xHxK[:, :, i] for i in range(3))
        if c.positions == 'rotary':
            q, k = rotary(q, c.rope_base), rotary(k, c.rope_base)
        fused = c.attention == 'fused' or (c.attention == 'auto' and jax.default_backend() == 'gpu')
        y_BxLxHxK = (jax.nn.dot_product_attention(q, k, v, is_causal=True) if fused
                     else causal_attention(q, k, v, recompute=c.attention == 'recompute'))
        return _project(c, self.out, y_BxLxHxK.reshape(B * L, D)).reshape(B, L, D)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, f, dt = config.d_model, config.ff_dim, config.compute_dtype
        self.config = config
        self.up = nnx.Linear(d, f, use_bias=False, dtype=dt, kernel_init=_normal(_STD), rngs=rngs)
        self.down = nnx.Linear(f, d, use_bias=False, dtype=dt,
                               kernel_init=_normal(_STD / math.sqrt(2 * config.n_layers)), rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        B, L, D = x_BxLxD.shape  # 2-D matmuls, as in Attention
        hidden = jax.nn.gelu(_project(self.config, self.up, x_BxLxD.reshape(B * L, D)))
        return _project(self.config, self.down, hidden).reshape(B, L, D)


def _layer_norm(config: ModelConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Flax LayerNorm computes its statistics in float32 even for bf16 inputs.
    return nnx.LayerNorm(config.d_model, epsilon=1e-5, dtype=config.compute_dtype, rngs=rngs)


class Block(nnx.Module):
    """Pre-LN transformer block. Norm names end in 'norm' so partition.py can find them."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = _layer_norm(config, rngs)
        self.attn = Attention(config, rngs)
        self.mlp_norm = _layer_norm(config, rngs)
        self.mlp = MLP(config, rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD))
        return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))


def _run_block(block: Block, x_BxLxD: jax.Array) -> jax.Array:
    return block(x_BxLxD)


_run_block_remat = nnx.remat(_run_block)


class Decoder(nnx.Module):
    """tokens_BxL (int) -> logits_BxLxV (float32)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = self.config = config
        self.embed = nnx.Embed(c.vocab_size, c.d_model, dtype=c.compute_dtype,
                               embedding_init=_normal(_STD), rngs=rngs)
        if c.positions == 'learned':
            self.pos_embed = nnx.Embed(c.max_len, c.d_model, dtype=c.compute_dtype,
                                       embedding_init=_normal(_STD), rngs=rngs)
        self.blocks = nnx.List([Block(c, rngs) for _ in range(c.n_layers)])
        self.final_norm = _layer_norm(c, rngs)
        if not c.tie_embeddings:
            self.head = nnx.Linear(c.d_model, c.vocab_size, use_bias=False, dtype=c.compute_dtype,
                                   kernel_init=_normal(_STD), rngs=rngs)

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        c = self.config
        if tokens_BxL.ndim != 2 or not jnp.issubdtype(tokens_BxL.dtype, jnp.integer):
            raise ValueError(f'tokens must be an int array of shape (batch, length), got '
                             f'{tokens_BxL.dtype}{tuple(tokens_BxL.shape)}.')
        L = tokens_BxL.shape[1]
        if L > c.max_len:
            raise ValueError(f'Sequence length {L} exceeds ModelConfig.max_len={c.max_len}; '
                             f'use shorter sequences or a config with max_len >= {L}.')
        h_BxLxD = self.embed(tokens_BxL)
        if c.positions == 'learned':
            h_BxLxD = h_BxLxD + self.pos_embed(jnp.arange(L))[None]
        run = _run_block_remat if c.remat else _run_block
        for block in self.blocks:
            h_BxLxD = run(block, h_BxLxD)
        h_BxLxD = self.final_norm(h_BxLxD)
        head_VxD = (self.embed.embedding[...] if c.tie_embeddings else self.head.kernel[...].T)
        # Head matmul in the compute dtype, accumulated and returned in float32.
        B, L, D = h_BxLxD.shape
        if c.matmul_dtype == 'bfloat16':
            logits_NxV = bf16_dense(h_BxLxD.reshape(B * L, D), head_VxD, True)
        else:
            logits_NxV = jnp.einsum('nd,vd->nv', h_BxLxD.reshape(B * L, D), head_VxD.astype(c.compute_dtype),
                                    preferred_element_type=jnp.float32)
        return logits_NxV.reshape(B, L, -1)
