"""What a run's Config is and where one comes from.

    schema     the frozen dataclasses (model, data, algorithm, run, privacy, the
               tree spec), their checks, and `a.b=v` overrides
    presets    named configs (tiny, demo, small, paper-*) built in Python
    loading    a preset name or a YAML file (`base:` merged under it, its
               `plugins:` imported first) -> a validated Config

The names below are stable; the modules' other names are not.
"""
from worldlm_jax.config import presets
from worldlm_jax.config.loading import load, load_yaml, merge, resolve_yaml
from worldlm_jax.config.presets import PRESETS, get
from worldlm_jax.config.schema import (AlgorithmConfig, Config, DataConfig, PrivacyConfig, RunConfig,
                                       apply_override, apply_overrides, from_dict, save_yaml)
from worldlm_jax.errors import ConfigError

__all__ = ["Config", "DataConfig", "AlgorithmConfig", "RunConfig", "PrivacyConfig", "ConfigError",
           "from_dict", "apply_override", "apply_overrides", "save_yaml", "load", "load_yaml",
           "resolve_yaml", "merge", "get", "PRESETS", "presets"]
