"""Hand-written JAX kernels of the decoder: rotary positions, causal attention with its
own backward, and dense products with bfloat16 operands.

Pure functions of arrays, no Flax and no parameters: `layers.py` builds the
transformer from them, and each can be tested against a JAX reference on its own.
Two carry a custom VJP because JAX's autodiff of the plain form is slower
(`causal_attention`: fewer passes over the (L, L) scores) or keeps the wrong
dtypes and layouts (`bf16_dense`: bf16 residuals, row-major operands for the
CPU's AMX / AVX512-BF16 units). Both compute the same function as the reference.
`causal_attention(..., recompute=True)` keeps only each row's log-sum-exp for
the backward, which recomputes the probabilities: O(L) residuals per row
instead of the (L, L) probabilities, what flash attention keeps, for one more
q k^T product in the backward.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp


# ----------------------------------------------------------------------------- positions, attention

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


def causal_attention(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array,
                     recompute: bool = False) -> jax.Array:
    """Softmax(q k^T / sqrt(K) + causal mask) v, logits and softmax in float32.

    Heads are moved next to the batch axis first so both products are plain
    batched matmuls with leading batch dims (about 20% faster backward on XLA
    CPU than jax.nn.dot_product_attention's layout; same values). `recompute`:
    the backward recomputes the probabilities from each row's log-sum-exp
    rather than reading them stored (`_attend_recompute`).
    """
    B, L, H, K = q_BxLxHxK.shape
    to_heads = lambda x: x.transpose(0, 2, 1, 3).reshape(B * H, L, K)
    q, k, v = to_heads(q_BxLxHxK), to_heads(k_BxLxHxK), to_heads(v_BxLxHxK)
    attend = _attend_recompute if recompute else _attend
    y = attend(q * jnp.asarray(1 / math.sqrt(K), q.dtype), k, v)
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
    return _softmax_product_grads(q, k, v, p, y, dy)


def _softmax_product_grads(q, k, v, p, y, dy):
    """(dq, dk, dv) of Y = P V, P = softmax(q k^T), from P itself."""
    dv = jnp.einsum('nqs,nqk->nsk', p.astype(dy.dtype), dy)
    dp = jnp.einsum('nqk,nsk->nqs', dy, v, preferred_element_type=jnp.float32)
    row = jnp.sum(dy.astype(jnp.float32) * y.astype(jnp.float32), axis=-1, keepdims=True)
    ds = p * (dp - row)
    dq = jnp.einsum('nqs,nsk->nqk', ds.astype(k.dtype), k)
    dk = jnp.einsum('nqs,nqk->nsk', ds.astype(q.dtype), q)
    return dq, dk, dv


_attend.defvjp(_attend_fwd, _attend_bwd)


def _causal_probabilities(q, k, lse=None):
    """(P, log-sum-exp of each row): the causal softmax of q k^T in float32, from
    the row statistic where it is given (the backward of `_attend_recompute`)."""
    L = q.shape[1]
    logits = jnp.einsum('nqk,nsk->nqs', q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(jnp.tril(jnp.ones((L, L), bool)), logits, jnp.finfo(jnp.float32).min)
    if lse is None:
        lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    return jnp.exp(logits - lse), lse


@jax.custom_vjp
def _attend_recompute(q_NxLxK, k_NxLxK, v_NxLxK):
    return _attend_recompute_fwd(q_NxLxK, k_NxLxK, v_NxLxK)[0]


def _attend_recompute_fwd(q, k, v):
    p, lse = _causal_probabilities(q, k)
    y = jnp.einsum('nqs,nsk->nqk', p.astype(v.dtype), v)
    return y, (q, k, v, y, lse)  # (N, L, 1) per row, not the (N, L, L) probabilities


def _attend_recompute_bwd(res, dy):
    q, k, v, y, lse = res
    # behind a barrier with the cotangent: else XLA merges the recomputation with the
    # forward's identical q k^T (CSE) and keeps the probabilities after all (jax.checkpoint
    # guards its recomputation the same way)
    q, k, lse, dy = jax.lax.optimization_barrier((q, k, lse, dy))
    return _softmax_product_grads(q, k, v, _causal_probabilities(q, k, lse)[0], y, dy)


_attend_recompute.defvjp(_attend_recompute_fwd, _attend_recompute_bwd)


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
