"""The decoder LM as the engine sees it: its config and presets, and a plain-dict
parameter interface over the Flax NNX network in `layers.py`.

Only this module and `layers.py` know Flax. Everything else in the engine (client
updates, aggregation, partitioning, privacy) sees parameters as a flat
``dict[str, jax.Array]`` keyed by '/'-joined module paths, e.g.
``'blocks/0/attn/qkv/kernel'``. Flat string keys make backbone/key-layer masks,
regex selectors, per-leaf PRNG keys and checkpoints trivial, and the dict is an
ordinary pytree, so it stacks along tree axes (``params_FxC``) and goes through
``jit``/``vmap``/``scan``/``grad`` unchanged.

``init(config, key) -> (ModelDef, params)``: ``ModelDef`` is static and hashable
(config + NNX graphdef); ``ModelDef.apply`` rebuilds the module with
``nnx.merge`` at trace time, so the NNX object never crosses a transform boundary.

Parameters are always float32 (aggregation and DP noise need the precision);
``dtype`` only sets the compute dtype. Logits and the loss are float32.
``matmul_dtype='bfloat16'`` is mixed precision: float32 activations, with only
the operands of the dense products (projections, MLP, head) rounded to bfloat16
and the products accumulated in float32 (``kernels.bf16_dense``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from worldlm_jax.model.config import ModelConfig
from worldlm_jax.model.layers import Decoder

__all__ = ["Params", "PRESETS", "preset", "ModelDef", "init", "abstract_init", "count_params", "flops_per_token"]

Params = dict[str, jax.Array]



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
    # MPT-1B's shape (1.3B parameters): larger than one chip's round, run with a model axis.
    '1b': ModelConfig(vocab_size=50304, d_model=2048, n_heads=16, n_layers=24,
                      max_len=1024, positions='rotary'),
    # The 1B's heads at 2560 wide and 32 deep (2.7B parameters).
    '3b': ModelConfig(vocab_size=50304, d_model=2560, n_heads=32, n_layers=32,
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
