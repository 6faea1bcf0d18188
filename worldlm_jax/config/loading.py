"""Where a Config comes from: a preset name or a YAML file, whose `base:` (a
preset or another YAML) is merged under it and whose `plugins:` are imported
first, so the names they register validate. The only config module that
knows about presets or the plug-in loader."""
from __future__ import annotations

import os
from typing import Mapping

import yaml

from worldlm_jax import plugins
from worldlm_jax.config import presets
from worldlm_jax.config.schema import Config, ConfigError, from_dict, refuse_shadowed_policy


def load(spec: str) -> Config:
    """A preset name or a path to a YAML config (`load_yaml`: its plugins
    imported, its `base:` merged in)."""
    return load_written(spec)[0]


def load_written(spec: str) -> tuple[Config, set[str]]:
    """`load(spec)`, and the config-level `policy:` fields its YAML writes (none for a
    preset), for `schema.refuse_shadowed_policy` once overrides have chosen the strategy."""
    if spec in presets.PRESETS:
        return presets.get(spec), set()
    if os.path.isfile(spec):
        data = resolve_yaml(spec)
        written = yaml_policy_fields(data)
        return refuse_shadowed_policy(from_dict(Config, data).validate(), written), written
    if spec.endswith((".yaml", ".yml")) or os.sep in spec or "/" in spec:
        raise ConfigError(f"config file {spec!r} not found")
    return presets.get(spec), set()  # raises: unknown preset, listing the presets


def load_yaml(path: str) -> Config:
    """A YAML config. Its `plugins` are imported first, so the names they
    register validate; `base: PRESET_OR_YAML` starts from a preset or another
    YAML, which the file's sections override key by key (`tree:` replaces the
    base's tree whole). Relative paths in both are relative to the YAML's folder."""
    data = resolve_yaml(path)
    return refuse_shadowed_policy(from_dict(Config, data).validate(), yaml_policy_fields(data))


def yaml_policy_fields(data: Mapping) -> set[str]:
    """The fields a resolved YAML's config-level `policy:` section writes."""
    section = data.get("policy") if isinstance(data, Mapping) else None
    return set(section) if isinstance(section, Mapping) else set()


def resolve_yaml(path: str, _chain: tuple[str, ...] = ()) -> dict:
    """The plain mapping of a YAML config with its base merged in and its
    plugins imported (`plugins` then lists them all, resolved)."""
    path = os.path.realpath(path)
    if path in _chain:
        raise ConfigError(f"base: {' -> '.join(_chain + (path,))} is a cycle")
    data = dict(_read_yaml(path))
    folder = os.path.dirname(path)
    specs = data.pop("plugins", None) or []
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
        raise ConfigError(f"{path}: plugins={specs!r}; expected a list of module names or .py paths")
    base = data.pop("base", None)
    merged = {}
    if base is not None:
        merged = _base_mapping(base, folder, _chain + (path,))
    loaded = plugins.load_all(specs, folder)
    merged = merge(merged, data)
    merged["plugins"] = list(dict.fromkeys([*merged.get("plugins", []), *loaded]))
    return merged


def _base_mapping(base, folder: str, chain: tuple[str, ...]) -> dict:
    if not isinstance(base, str) or not base:
        raise ConfigError(f"base={base!r}; expected a preset name ({', '.join(presets.PRESETS)}) or a YAML path")
    if base in presets.PRESETS:
        return presets.get(base).to_dict()
    path = os.path.join(folder, os.path.expanduser(base))
    if not os.path.isfile(path):
        raise ConfigError(f"base={base!r} is neither a preset ({', '.join(presets.PRESETS)}) nor a YAML file "
                          f"({path} not found)")
    return resolve_yaml(path, chain)


def merge(base: Mapping, override: Mapping) -> dict:
    """`override` laid over `base` key by key, down nested sections (`model:
    {n_layers: 2}` changes only n_layers), except `tree`, which is replaced whole:
    a tree is one spec, and merging two lists of children has no clear meaning."""
    out = dict(base)
    for key, value in override.items():
        if key != "tree" and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: str) -> Mapping:
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data
