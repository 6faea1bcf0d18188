"""The decoder's shape and numerics (`ModelConfig`): what a preset fixes and a
config's `model:` section sets. Both the network (`layers.py`) and the model
interface (`model.py`) read it; it imports neither."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

_POSITIONS = ('learned', 'rotary')
_ATTENTION = ('auto', 'explicit', 'fused', 'recompute')
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
    # Attention kernel: 'explicit' = `kernels.causal_attention` (hand-written backward,
    # the fastest on CPU), 'fused' = jax.nn.dot_product_attention (cuDNN's fused
    # flash attention on GPUs that have it, XLA otherwise), 'auto' = fused on
    # GPU, explicit elsewhere, 'recompute' = the explicit kernel keeping only each
    # row's log-sum-exp, its backward recomputing the probabilities (flash
    # attention's memory: O(L) per row, not the (L, L) probabilities; one more
    # q k^T product in the backward).
    attention: str = 'auto'
    # Operands of the dense products (projections, MLP, head) in this dtype, products
    # accumulated in float32, everything else float32 (`kernels.bf16_dense`). 'bfloat16' uses the
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
