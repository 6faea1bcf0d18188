"""Decoder-only transformer LM (Flax NNX) behind a plain-dict parameter interface.

This is the only module that knows Flax. Everything else in the engine (client
updates, aggregation, partitioning, privacy) sees parameters as a flat
``dict[str, jax.Array]`` keyed by '/'-joined module paths, e.g.
``'blocks/0/attn/qkv/kernel'``. Flat string keys make backbone/key-layer masks,
regex selectors, per-leaf PRNG keys and checkpoints trivial, and the dict is an
ordinary pytree, so it stacks along tree axes (``params_FxC``) and goes through
``jit``/``vmap``/``scan``/``grad`` unchanged.

``init(config, key) -> (ModelDef, params)``: ``ModelDef`` is static and hashable
(config + NNX graphdef); ``ModelDef.apply`` rebuilds the module with
``nnx.merge`` at trace time, so the NNX object never crosses a transform boundary.

Architecture (GPT-2 / MPT style): token embedding, learned or rotary positions,
pre-LN blocks (LayerNorm -> causal MHA -> residual; LayerNorm -> GELU MLP ->
residual), final LayerNorm, output head tied to the embedding. Linear layers have
no biases (as in MPT): fewer leaves to aggregate and no quality loss at this scale.
Parameters are always float32 (aggregation and DP noise need the precision);
``dtype`` only sets the compute dtype. Logits and the loss are float32.
``matmul_dtype='bfloat16'`` is mixed precision: float32 activations, with only
the operands of the dense products (projections, MLP, head) rounded to bfloat16
and the products accumulated in float32 (``bf16_dense``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Params = dict[str, jax.Array]

_POSITIONS = ('learned', 'rotary')
_ATTENTION = ('auto', 'explicit', 'fused')
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the decoder. Defaults are the `tiny` test preset."""

    vocab_size: int = 256  # byte-level tokenizer: no training, nothing leaks between federations
    d_model: int = 32
    n_heads: int = 2
    n_layers: int = 2
    # None means 4 * d_model. Kept as None (not filled in) so that
    # `dataclasses.replace(cfg, d_model=...)` in a sweep rescales the MLP too.
    d_ff: int | None = None
    max_len: int = 64  # longest input sequence (context); learned tables have this many rows
    positions: str = 'learned'  # 'learned' table or 'rotary' (RoPE on q, k; no parameters)
    tie_embeddings: bool = True  # head = embedding.T: saves V*d params, standard for GPT-2/MPT
    dtype: str = 'float32'  # compute dtype; parameters stay float32
    rope_base: float = 10_000.0  # RoPE wavelength base (RoFormer / GPT-NeoX default)
    remat: bool = False  # recompute block activations in the backward pass to save memory
    # Attention kernel: 'explicit' = `causal_attention` (hand-written backward,
    # the fastest on CPU), 'fused' = jax.nn.dot_product_attention (cuDNN's fused
    # flash attention on GPUs that have it, XLA otherwise), 'auto' = fused on
    # GPU, explicit elsewhere.
    attention: str = 'auto'
    # Operands of the dense products (projections, MLP, head) in this dtype, products
    # accumulated in float32, everything else float32 (`bf16_dense`). 'bfloat16' uses the
    # AMX / AVX512-BF16 units of recent x86 CPUs and the tensor cores of GPUs.
    matmul_dtype: str = 'float32'

    def __post_init__(self):
        for name in ('vocab_size', 'd_model', 'n_heads', 'n_layers', 'max_len'):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f'ModelConfig.{name} must be a positive int, got {value!r}.')
        if self.d_ff is not None and (not isinstance(self.d_ff, int) or self.d_ff < 1):
            raise ValueError(
                f'ModelConfig.d_ff must be a positive int or None (= 4 * d_model), got {self.d_ff!r}.')
        if self.d_model % self.n_heads:
            raise ValueError(
                f'ModelConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}); '
                f'pick n_heads from the divisors of d_model.')
        if self.attention not in _ATTENTION:
            raise ValueError(f'ModelConfig.attention must be one of {_ATTENTION}, got {self.attention!r}.')
        if self.positions not in _POSITIONS:
            raise ValueError(f'ModelConfig.positions must be one of {_POSITIONS}, got {self.positions!r}.')
        if self.positions == 'rotary' and self.head_dim % 2:
            raise ValueError(
                f'ModelConfig.positions="rotary" needs an even head dim (d_model / n_heads), '
                f'got {self.head_dim}; change d_model or n_heads.')
        if self.dtype not in _DTYPES:
            raise ValueError(f'ModelConfig.dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}.')
        if self.matmul_dtype not in _DTYPES:
            raise ValueError(f'ModelConfig.matmul_dtype must be one of {tuple(_DTYPES)}, got {self.matmul_dtype!r}.')
        if self.matmul_dtype == 'bfloat16' and self.dtype != 'float32':
            raise ValueError(
                "ModelConfig.matmul_dtype='bfloat16' is mixed precision on float32 activations; with "
                f"dtype={self.dtype!r} the products already run in that dtype. Set only one of the two.")
        if not self.rope_base > 0:
            raise ValueError(f'ModelConfig.rope_base must be > 0, got {self.rope_base!r}.')

    @property
    def ff_dim(self) -> int:
        """Hidden width of the MLP (d_ff, or 4 * d_model when d_ff is None)."""
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]


# The three large presets are MPT-style decoders as in the paper (75M-400M), with
# the 50304-entry GPT-NeoX/MPT vocabulary (50277 padded to a multiple of 64) and
# rotary positions (parameter-free, like MPT's ALiBi).
PRESETS: dict[str, ModelConfig] = {
    # Unit tests: compiles in about a second on a 2-core CPU.
    'tiny': ModelConfig(d_model=32, n_heads=2, n_layers=2, max_len=64),
    # CPU demo: the prototype in WORLDLM.md (d 128, 3 blocks, ~640k params).
    'small': ModelConfig(d_model=128, n_heads=4, n_layers=3, max_len=128),
    # Benchmark workload: fixed so speed numbers stay comparable across changes.
    'w': ModelConfig(vocab_size=256, d_model=128, n_heads=4, n_layers=2,
                     d_ff=512, max_len=128, positions='learned'),
    '75m': ModelConfig(vocab_size=50304, d_model=512, n_heads=8, n_layers=16,
                       max_len=1024, positions='rotary'),
    # GPT-2 small shape.
    '125m': ModelConfig(vocab_size=50304, d_model=768, n_heads=12, n_layers=12,
                        max_len=1024, positions='rotary'),
    # GPT-2 medium width, deeper to reach 400M.
    '400m': ModelConfig(vocab_size=50304, d_model=1024, n_heads=16, n_layers=28,
                        max_len=1024, positions='rotary'),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named config, optionally with some fields replaced (validated again)."""
    if name not in PRESETS:
        raise ValueError(f'Unknown model preset {name!r}; choose one of {sorted(PRESETS)}.')
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f'Unknown ModelConfig field(s) {unknown}; valid fields: {sorted(fields)}.')
    return dataclasses.replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------- modules

def _normal(std: float):
    return jax.nn.initializers.normal(stddev=std)


# GPT-2 init: N(0, 0.02) everywhere, residual output projections scaled by
# 1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth.
# A small embedding std also keeps the tied head's initial logits near 0, so the
# initial loss is about log(vocab_size).
_STD = 0.02


def rotary(x_BxLxHxD: jax.Array, base: float) -> jax.Array:
    """Rotate feature pairs (i, i + D/2) by position-dependent angles (RoPE, NeoX layout).

    q.k then depends on positions only through their difference, so no table is
    needed. Angles are computed in float32 and the result cast back.
    """
    _, L, _, D = x_BxLxHxD.shape
    inv_freq_D2 = 1.0 / (base ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
    angles_LxD2 = jnp.arange(L, dtype=jnp.float32)[:, None] * inv_freq_D2[None, :]
    cos, sin = jnp.cos(angles_LxD2)[:, None, :], jnp.sin(angles_LxD2)[:, None, :]
    x1, x2 = jnp.split(x_BxLxHxD.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x_BxLxHxD.dtype)


def causal_attention(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array) -> jax.Array:
    """Softmax(q k^T / sqrt(K) + causal mask) v, logits and softmax in float32.

    Heads are moved next to the batch axis first so both products are plain
    batched matmuls with leading batch dims (about 20% faster backward on XLA
    CPU than jax.nn.dot_product_attention's layout; same values).
    """
    B, L, H, K = q_BxLxHxK.shape
    to_heads = lambda x: x.transpose(0, 2, 1, 3).reshape(B * H, L, K)
    q, k, v = to_heads(q_BxLxHxK), to_heads(k_BxLxHxK), to_heads(v_BxLxHxK)
    y = _attend(q * jnp.asarray(1 / math.sqrt(K), q.dtype), k, v)
    return y.reshape(B, H, L, K).transpose(0, 2, 1, 3)


@jax.custom_vjp
def _attend(q_NxLxK, k_NxLxK, v_NxLxK):
    return _attend_fwd(q_NxLxK, k_NxLxK, v_NxLxK)[0]


def _attend_fwd(q, k, v):
    L = q.shape[1]
    logits = jnp.einsum('nqk,nsk->nqs', q, k, preferred_element_type=jnp.float32)
    causal = jnp.tril(jnp.ones((L, L), bool))
    p = jax.nn.softmax(jnp.where(causal, logits, jnp.finfo(jnp.float32).min), axis=-1)
    y = jnp.einsum('nqs,nsk->nqk', p.astype(v.dtype), v)
    return y, (q, k, v, p, y)


def _attend_bwd(res, dy):
    """The softmax backward written out, dS = P * (dP - rowsum(dY * Y)) (rowsum(dP * P)
    equals rowsum(dY * Y) since Y = P V): fewer passes over the (L, L) scores than
    autodiff's chain through max, exp, sum and divide."""
    q, k, v, p, y = res
    dv = jnp.einsum('nqs,nqk->nsk', p.astype(dy.dtype), dy)
    dp = jnp.einsum('nqk,nsk->nqs', dy, v, preferred_element_type=jnp.float32)
    row = jnp.sum(dy.astype(jnp.float32) * y.astype(jnp.float32), axis=-1, keepdims=True)
    ds = p * (dp - row)
    dq = jnp.einsum('nqs,nsk->nqk', ds.astype(k.dtype), k)
    dk = jnp.einsum('nqs,nqk->nsk', ds.astype(q.dtype), q)
    return dq, dk, dv


_attend.defvjp(_attend_fwd, _attend_bwd)


# ----------------------------------------------------------------------------- bf16 products

# XLA:CPU sends a bf16 x bf16 -> f32 dot to its AMX / AVX512-BF16 kernels (YNNPACK) only
# when both operands are row-major with the contraction on the lhs's last axis and the
# rhs's first. Two of a dense layer's three products (the input and weight gradients)
# read an operand transposed; XLA folds such a transpose into the dot and then runs it in
# float32 on upcast operands, 4x slower. With transpose folding off (CPU_BF16_XLA_FLAG, in
# XLA_FLAGS before JAX starts) and the contraction axis split in two (a reshape, which a
# transposed layout cannot take as a free bitcast), the transpose becomes a real copy and
# the dot stays bf16. The split must not be emitted without the flag: XLA then folds it
# into a two-axis contraction that its bf16 fallback cannot run. For the same reason the
# product's output passes an optimisation barrier: a transpose of the result (the untied
# head's kernel gradient, `_weight_gradient`) must not be folded back into the dot.
# Measured in benchmarks/RESULTS.md (section 2c).
CPU_BF16_XLA_FLAG = '--xla_disable_hlo_passes=transpose-folding'


def cpu_transposes_materialise() -> bool:
    """Whether bf16 products can take the split-contraction form (see above)."""
    return jax.default_backend() == 'cpu' and CPU_BF16_XLA_FLAG in os.environ.get('XLA_FLAGS', '')


def _bf16_product(a_MxK: jax.Array, b_KxN: jax.Array) -> jax.Array:
    """a @ b with bfloat16 operands, accumulated and returned in float32."""
    a, b = a_MxK.astype(jnp.bfloat16), b_KxN.astype(jnp.bfloat16)
    K = a.shape[-1]
    if K % 2 or not cpu_transposes_materialise():
        return jnp.matmul(a, b, preferred_element_type=jnp.float32)
    a = a.reshape(*a.shape[:-1], 2, K // 2)
    b = b.reshape(2, K // 2, b.shape[-1])
    return jax.lax.optimization_barrier(jnp.einsum('mab,abn->mn', a, b, preferred_element_type=jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bf16_dense(x_NxI: jax.Array, kernel: jax.Array, kernel_is_OxI: bool = False) -> jax.Array:
    """x @ kernel for a kernel (I, O), or x @ kernel.T for a kernel (O, I) (the tied head),
    with bfloat16 operands and a float32 result.

    The custom VJP sends each of the three products through `_bf16_product`, so every
    one reads row-major operands, and keeps the residuals in bf16 (half the memory).
    """
    return _bf16_dense_fwd(x_NxI, kernel, kernel_is_OxI)[0]


def _bf16_dense_fwd(x, kernel, kernel_is_OxI):
    x, w = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    return _bf16_product(x, w.T if kernel_is_OxI else w), (x, w)


def _bf16_dense_bwd(kernel_is_OxI, residuals, dy):
    x, w = residuals
    dy = dy.astype(jnp.bfloat16)
    dx = _bf16_product(dy, w if kernel_is_OxI else w.T)
    dw_IxO = _weight_gradient(x, dy)
    return dx, (dw_IxO.T if kernel_is_OxI else dw_IxO)


def _weight_gradient(x_NxI, dy_NxO):
    """x^T dy, transposing the narrower of the two (the transpose is a real copy on CPU,
    and the (I, O) result is small): the MLP's down projection transposes dy (N, 128),
    not its (N, 512) input."""
    if x_NxI.shape[-1] <= dy_NxO.shape[-1]:
        return _bf16_product(x_NxI.T, dy_NxO)
    return _bf16_product(dy_NxO.T, x_NxI).T


bf16_dense.defvjp(_bf16_dense_fwd, _bf16_dense_bwd)


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
        y_BxLxHxK = jax.nn.dot_product_attention(q, k, v, is_causal=True) if fused else causal_attention(q, k, v)
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


# ----------------------------------------------------------------------------- flat params

def _key(path: tuple) -> str:
    return '/'.join(str(p) for p in path)


def _path(key: str) -> tuple:
    # nnx.List children have int indices; restore them so nnx.merge finds them.
    return tuple(int(p) if p.isdigit() else p for p in key.split('/'))


def _flatten(state: nnx.State) -> dict[str, Any]:
    # get_value(), not var[...]: also works on abstract (ShapeDtypeStruct) variables.
    return {_key(path): var.get_value() for path, var in nnx.to_flat_state(state)}


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """Static half of the model: config + NNX graphdef + the parameter paths.

    Hashable, so it can be closed over or passed as a static argument. ``apply``
    and ``loss`` are pure functions of a flat params dict.
    """

    config: ModelConfig
    graphdef: Any
    param_paths: tuple[str, ...]

    def module(self, params: Params) -> Decoder:
        """Rebuild the NNX module from flat params (at trace time inside transforms)."""
        if set(params) != set(self.param_paths):
            missing = sorted(set(self.param_paths) - set(params))
            extra = sorted(set(params) - set(self.param_paths))
            raise ValueError(f'params do not match the model: missing {missing[:5]}, '
                             f'unexpected {extra[:5]}. Did you pass only a backbone/key split? '
                             f'Use partition.merge(backbone, key) first.')
        state = nnx.from_flat_state([(_path(k), params[k]) for k in self.param_paths])
        return nnx.merge(self.graphdef, state)

    def apply(self, params: Params, tokens_BxL: jax.Array) -> jax.Array:
        """Logits (float32) for every position: logits_BxLxV."""
        return self.module(params)(tokens_BxL)

    def loss(self, params: Params, tokens_BxLp1: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Mean next-token NLL (nats, float32) and the number of predicted tokens.

        Inputs are tokens[:, :-1], targets tokens[:, 1:], so a block of max_len + 1
        tokens trains on max_len predictions. n_tokens is the data weight for
        aggregation (an int32 array so the pair vmaps and scans uniformly).
        """
        inputs_BxL, targets_BxL = tokens_BxLp1[:, :-1], tokens_BxLp1[:, 1:]
        logits_BxLxV = self.apply(params, inputs_BxL)
        nll_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
        return jnp.mean(nll_BxL), jnp.asarray(targets_BxL.size, jnp.int32)


def _build(config: ModelConfig, key: jax.Array) -> tuple[Any, nnx.State]:
    model = Decoder(config, nnx.Rngs(params=key))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    assert not nnx.to_flat_state(rest), 'Decoder holds non-parameter state; handle it in ModelDef.'
    return graphdef, params


def init(config: ModelConfig, key: jax.Array) -> tuple[ModelDef, Params]:
    """Build the model: (static ModelDef, float32 params keyed by '/'-joined paths).

    The initialisers run as one compiled program (eagerly, each op of each
    layer would compile on its own: seconds per run)."""
    model_def, _ = abstract_init(config)
    params = jax.jit(lambda k: _flatten(_build(config, k)[1]))(key)
    return model_def, params


def abstract_init(config: ModelConfig) -> tuple[ModelDef, dict[str, jax.ShapeDtypeStruct]]:
    """Like `init` but allocates nothing: shapes for memory plans, masks, counting."""
    abstract = nnx.eval_shape(lambda: Decoder(config, nnx.Rngs(params=0)))
    graphdef, state, _ = nnx.split(abstract, nnx.Param, ...)
    shapes = _flatten(state)
    return ModelDef(config, graphdef, tuple(sorted(shapes))), shapes


@functools.lru_cache(maxsize=64)  # configs are frozen; tracing 400m takes ~0.5 s
def count_params(config: ModelConfig) -> int:
    """Number of parameters, from shapes only (no allocation, fine for 400m on a laptop)."""
    _, shapes = abstract_init(config)
    return sum(math.prod(s.shape) for s in shapes.values())


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), for MFU.

    6 * N for the matmuls (PaLM / nanoGPT convention) where N excludes the learned
    position table (a lookup, not a matmul) but includes the embedding once (the
    tied head is a V x d matmul); plus 12 * n_layers * d_model * seq_len for the
    attention scores and weighted values (counted unmasked, as is conventional).
    """
    if seq_len < 1:
        raise ValueError(f'seq_len must be >= 1, got {seq_len}.')
    n = count_params(config)
    if config.positions == 'learned':
        n -= config.max_len * config.d_model
    return 6.0 * n + 12.0 * config.n_layers * config.d_model * seq_len
