"""The language model: a decoder with a shared backbone B and localisable key
layers K, as plain functions over a dict of parameters. The only package that
imports Flax.

    config      ModelConfig: the decoder's shape and numerics (no Flax import)
    partition   KeyLayers: which parameters are K, by path
    kernels     matmul and attention kernels (bf16 on CPU, fused on accelerators)
    layers      the Flax modules
    lm          presets, init, abstract_init, the loss: the interface the engine sees

The names below are stable; the modules' other names are not.
"""
from worldlm_jax.model.config import ModelConfig
from worldlm_jax.model.kernels import CPU_BF16_XLA_FLAG
from worldlm_jax.model.lm import (PRESETS, ModelDef, Params, abstract_init, count_params, flops_per_token, init,
                                  preset)
from worldlm_jax.model.partition import KeyLayers

__all__ = ["CPU_BF16_XLA_FLAG", "ModelConfig", "KeyLayers", "Params", "PRESETS", "preset", "ModelDef", "init", "abstract_init",
           "count_params", "flops_per_token"]
