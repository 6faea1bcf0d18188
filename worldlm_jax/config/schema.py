"""Typed, frozen experiment configuration and its `a.b=v` overrides.

One dataclass per concept (model, data, algorithm, run, default federation
policy) plus the tree spec (a mapping, compiled by `topology.build_topology`).
Library functions take explicit arguments; only the run's entry point and the
CLI see the whole config. Where a Config comes from (presets, YAML with
`base:` and `plugins:`) is `loading`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Mapping

import yaml

from worldlm_jax.engine import strategies
from worldlm_jax.engine.aggregation import SIMILARITIES
from worldlm_jax.errors import ConfigError
from worldlm_jax.model.config import ModelConfig
from worldlm_jax.model.partition import KeyLayers
from worldlm_jax.plugins import callbacks, objectives, optimizers
from worldlm_jax.plugins.callbacks import CallbackSpec
from worldlm_jax.plugins.registry import UnknownNameError
from worldlm_jax.tree.policy import Policy
from worldlm_jax.tree.provenance import with_root_defaults
from worldlm_jax.tree.topology import NODE_FIELDS


_SECTIONS = {"DataConfig": "data", "RunConfig": "run", "AlgorithmConfig": "algorithm", "PrivacyConfig": "privacy"}


def _positive(obj, *names):
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            section = _SECTIONS.get(type(obj).__name__, type(obj).__name__)
            raise ConfigError(f"{section}.{name}={value!r}; expected an integer >= 1")


def _registered(registry, name, field):
    """One-line error for a name no plug-in registered (ConfigError, so the CLI reports it)."""
    try:
        registry.check(name, field)
    except UnknownNameError as e:
        raise ConfigError(str(e)) from e


def _check_callback(entry, field):
    """A run.callbacks entry names a registered callback, and its args are keyword
    arguments its factory takes (checked now, not when the run builds it)."""
    if isinstance(entry, str):
        _registered(callbacks.CALLBACKS, entry, "run.callbacks")
        return
    if not isinstance(entry, CallbackSpec):
        raise ConfigError(f"{field}={entry!r}: expected a callback name or {{name: NAME, args: {{ARG: VALUE}}}}")
    if not isinstance(entry.name, str) or not entry.name:
        raise ConfigError(f"{field}: name the callback, e.g. {{name: csv, args: {{path: rounds.csv}}}}")
    _registered(callbacks.CALLBACKS, entry.name, f"{field}.name")
    if not isinstance(entry.args, Mapping) or not all(isinstance(k, str) for k in entry.args):
        raise ConfigError(f"{field}.args={entry.args!r}: expected a mapping of argument names to values, "
                          "e.g. {path: rounds.csv}")
    try:
        callbacks.check_args(entry.name, entry.args, f"{field}.args")
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _choice(obj, name, allowed):
    if getattr(obj, name) not in allowed:
        raise ConfigError(f"algorithm.{name}={getattr(obj, name)!r}; allowed: {', '.join(allowed)}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    tokenizer: str = "byte"  # byte | spm:VOCAB (trained on the clients' training text) | path/to/model
    seq_len: int = 128
    batch_size: int = 8  # sequences per local step
    val_fraction: float = 0.1
    eval_batches: int = 4  # validation windows per client = eval_batches * eval_batch_size
    eval_batch_size: int = 8
    max_bytes_per_source: int = 0  # 0 = the whole source; smaller = faster demos
    data_dir: str = ""  # tfds data dir ('' = ~/.cache/worldlm_jax/tfds)

    def __post_init__(self):
        _positive(self, "seq_len", "batch_size", "eval_batches", "eval_batch_size")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.val_fraction}; expected 0 < val_fraction < 1")


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    name: str = "worldlm"  # worldlm | fedavg | hierfavg | fedper | local | centralized | diloco | registered
    key_layers: KeyLayers = KeyLayers()
    residuals: str = "siblings"  # none | siblings | all
    similarity: str = "cos_delta"  # cos_delta | cos_param | neg_l2
    use_parent: bool = True  # the parent's K is an attention candidate
    residual_dim: int = 0  # > 0: residual similarity on count-sketch embeddings of this size
    client_optimizer: str = "adamw"
    client_objective: str = "none"  # none | fedprox | registered (worldlm_jax.objectives); args per federation
    max_update_norm: float = math.inf  # a client update above this counts as diverged
    schedule: str = "nested"  # nested | staged (worldlm: first `staged_rounds` root rounds with a global K)
    staged_rounds: int = 0

    def __post_init__(self):

        strategies.check_name(self.name)
        _choice(self, "residuals", ("none", "siblings", "all"))
        _choice(self, "similarity", SIMILARITIES)
        _registered(optimizers.OPTIMIZERS, self.client_optimizer, "algorithm.client_optimizer")
        _registered(objectives.OBJECTIVES, self.client_objective, "algorithm.client_objective")
        _choice(self, "schedule", ("nested", "staged"))
        if self.residual_dim < 0:
            raise ConfigError(f"algorithm.residual_dim={self.residual_dim}; expected >= 0 (0 = full K)")
        if self.staged_rounds < 0:
            raise ConfigError(f"algorithm.staged_rounds={self.staged_rounds}; expected >= 0")
        if not self.max_update_norm > 0:
            raise ConfigError(f"algorithm.max_update_norm={self.max_update_norm}; expected > 0 (inf = off)")


SLOT_LAYOUT_CHOICES = ("auto", "local", "spread")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    rounds: int = 10  # root rounds
    seed: int = 0
    eval_every: int = 0  # evaluate every N rounds (0 = only at the end)
    checkpoint_every: int = 0  # checkpoint every N rounds (0 = only at the end)
    devices: int = 0  # devices in the mesh (0 = all local devices)
    chunk: int = -1  # clients at once per device: -1 auto, 0 all (vmap), k chunks
    # persistent XLA compilation cache: 'auto' ($JAX_COMPILATION_CACHE_DIR, else
    # ~/.cache/worldlm_jax/xla), a directory, or '' (off); see run.training.compilation_cache_dir
    compilation_cache: str = "auto"
    # shard a tree level's state over the devices when it holds at least this many MiB
    # (0: every level with a node per device); smaller levels stay replicated, since
    # sharding costs a collective per parameter leaf each round (benchmarks/RESULTS.md)
    shard_state_mb: float = 64.0
    # where the client slots sit on the devices: 'local' (a device trains only the slots of
    # the federations whose rows it holds, reading and summing into its own rows: per-device
    # memory falls with the device count), 'spread' (every federation's slots over every
    # device: even work under Poisson sampling, the leaf level read whole on every device),
    # or 'auto' (local where the federations divide the devices or the devices the
    # federations, else spread)
    slot_layout: str = "auto"
    # devices one copy of the weights is split over (FSDP: every weight along its largest
    # dimension this divides; a client's batch split likewise); must divide the devices
    # (and, over several processes, each process's devices). 1 = none. A model larger
    # than one chip needs it; `worldlm plan` suggests it. Refused by vectorised sweeps
    model_parallel: int = 1
    # registered callbacks (worldlm_jax.callbacks), run in this order: a name, or
    # {name: NAME, args: {ARG: VALUE}} whose args are keyword arguments of its factory
    callbacks: tuple[str | CallbackSpec, ...] = ()
    # each round line also gets every client's training loss, update norm and aggregation
    # weight (clients/...; docs/metrics.md); refused under DP, which would not cover them
    client_metrics: bool = False

    def __post_init__(self):

        _positive(self, "rounds")
        for i, entry in enumerate(self.callbacks):
            _check_callback(entry, f"run.callbacks[{i}]")
        for name in ("eval_every", "checkpoint_every", "devices", "shard_state_mb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"run.{name}={getattr(self, name)}; expected >= 0")
        if self.model_parallel < 1:
            raise ConfigError(f"run.model_parallel={self.model_parallel}; expected >= 1 (1 = no model axis)")
        if self.slot_layout not in SLOT_LAYOUT_CHOICES:
            raise ConfigError(f"run.slot_layout={self.slot_layout!r}; allowed: {', '.join(SLOT_LAYOUT_CHOICES)}")


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    target_epsilon: float = 0.0  # > 0: calibrate DP noise for every federation without a DP policy
    target_delta: float = 1e-5
    accountant: str = "rdp"  # rdp | pld
    default_clip: float = 1.0  # clip norm for calibrated federations that set none
    # which federations target_epsilon turns DP on at: clients (those aggregating clients: client-level
    # DP, as flat baselines get), federations (those aggregating federations), or all
    level: str = "clients"

    def __post_init__(self):
        if self.target_epsilon < 0:
            raise ConfigError(f"privacy.target_epsilon={self.target_epsilon}; expected > 0 (or 0 = off)")
        if not 0 < self.target_delta < 1:
            raise ConfigError(f"privacy.target_delta={self.target_delta}; expected 0 < delta < 1")
        if self.accountant not in ("rdp", "pld"):
            raise ConfigError(f"privacy.accountant={self.accountant!r}; allowed: rdp, pld")
        if not self.default_clip > 0:
            raise ConfigError(f"privacy.default_clip={self.default_clip}; expected > 0")
        if self.level not in ("clients", "federations", "all"):
            raise ConfigError(f"privacy.level={self.level!r}; allowed: clients, federations, all")


@dataclasses.dataclass(frozen=True)
class Config:
    # modules or .py files imported before the rest is read (absolute paths once loaded)
    plugins: tuple[str, ...] = ()
    model: ModelConfig = ModelConfig(d_model=128, n_heads=4, n_layers=3, max_len=128)
    data: DataConfig = DataConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    run: RunConfig = RunConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    policy: Policy = Policy()  # defaults every federation inherits
    tree: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> "Config":
        """Checks across sections; run once all overrides are applied (so that
        e.g. raising seq_len and max_len in either order works)."""

        if self.data.seq_len > self.model.max_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_len={self.model.max_len}; "
                              "lower data.seq_len or raise model.max_len")
        try:
            self.policy.validate("config 'policy'")
        except ValueError as e:
            raise ConfigError(str(e)) from e
        _registered(optimizers.OPTIMIZERS, self.policy.server_optimizer, "policy.server_optimizer")
        algo = self.algorithm
        if algo.schedule == "staged" and (algo.name != "worldlm" or not 1 <= algo.staged_rounds < self.run.rounds):
            raise ConfigError(f"algorithm.schedule=staged needs algorithm.name=worldlm and 1 <= algorithm.staged_rounds "
                              f"< run.rounds; got name={algo.name}, staged_rounds={algo.staged_rounds}, "
                              f"rounds={self.run.rounds}")
        return self

    def run_tree(self) -> Mapping[str, Any]:
        """The tree spec a run compiles (with `policy` as the root's inheritance): `tree`
        with the policy defaults of the strategy `algorithm.name` written at its root
        beneath what this config sets there (`tree.provenance.with_root_defaults`).
        `tree` itself, which config.yaml saves, stays as written."""
        return with_root_defaults(self.tree, self.policy, strategies.policy_defaults(self.algorithm.name))[0]

    def to_dict(self) -> dict:
        return _to_plain(self)


def _to_plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


# ---- from plain data (YAML) and overrides ------------------------------------
def _coerce(value, annotation, key: str):
    """Convert a YAML value to the field's declared type, or fail naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        # a mapping is meant for the dataclass among the choices: its error is the one to report
        args = sorted(args, key=lambda arg: not (dataclasses.is_dataclass(arg) and isinstance(value, Mapping)))
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(annotation):
        if isinstance(annotation, type) and isinstance(value, annotation):
            return value
        if not isinstance(value, Mapping):
            # `model: tiny` reads like "the tiny preset"; presets are whole configs, named by `base:`
            hint = (f"; to start from a preset, write 'base: {value}' at the top level and override only "
                    "what differs ('worldlm presets' lists them)") if isinstance(value, str) and "." not in key else ""
            raise ConfigError(f"{key} must be a mapping of {annotation.__name__} fields, got {value!r}{hint}")
        return from_dict(annotation, value, prefix=key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value.replace(".inf", "inf"))
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r}: expected a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r}: expected a string")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{key}[{i}]") if inner is not Any else v for i, v in enumerate(value))
    if origin in (Mapping, dict) or annotation in (Mapping, dict) or origin is typing.Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        return dict(value)
    return value


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls, globals() | vars(typing))


def from_dict(cls, data: Mapping[str, Any], prefix: str = ""):
    """Build dataclass `cls` from a mapping, checking keys and types."""
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(_unknown_key(full, key, names, prefix))
        values[key] = _coerce(value, hints[key], full)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except UnknownNameError as e:  # names its field already
        raise ConfigError(str(e)) from e
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def _unknown_key(full: str, key: str, valid, prefix: str) -> str:
    near = difflib.get_close_matches(key, valid, n=3)
    hint = f" Did you mean {', '.join((prefix + '.' if prefix else '') + n for n in near)}?" if near else ""
    return f"unknown config key '{full}'.{hint} Valid keys here: {', '.join(valid)}"


def apply_override(config, assignment: str):
    """Apply one `a.b.c=value` (value parsed as YAML) with type checking."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.path=value")
    path, raw = assignment.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return _set(config, path.strip().split("."), value, "")


def _set(obj, keys: list[str], value, prefix: str):
    key, rest = keys[0], keys[1:]
    full = f"{prefix}.{key}" if prefix else key
    if dataclasses.is_dataclass(obj):
        names = [f.name for f in dataclasses.fields(obj)]
        if key not in names:
            raise ConfigError(_unknown_key(full, key, names, prefix))
        current = getattr(obj, key)
        if key == "tree" and isinstance(obj, Config):
            new = _set_in_tree(current, rest, value, full)
        else:
            new = _set(current, rest, value, full) if rest else _coerce(value, _hints(type(obj))[key], full)
        try:
            return dataclasses.replace(obj, **{key: new})
        except ConfigError:
            raise
        except UnknownNameError as e:  # names its field already
            raise ConfigError(str(e)) from e
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{full}: {e}") from e
    if isinstance(obj, Mapping):
        copy = dict(obj)
        copy[key] = _set(obj.get(key, {}), rest, value, full) if rest else value
        return copy
    if isinstance(obj, list) and key.isdigit():  # tree.children.0.policy...
        if int(key) >= len(obj):
            raise ConfigError(f"cannot set '{full}': '{prefix}' has {len(obj)} items (0 to {len(obj) - 1})")
        copy = list(obj)
        copy[int(key)] = _set(obj[int(key)], rest, value, full) if rest else value
        return copy
    raise ConfigError(f"cannot set '{full}': '{prefix}' is a {type(obj).__name__}, not a config section")


def _set_in_tree(node, keys: list[str], value, prefix: str):
    """`tree.KEY...=value`: a node field (policy, own_policy, children, ...) sets that
    field of the root; any other KEY names a federation anywhere below (names are
    unique in a tree), so `tree.en.policy.client_lr=0.01` reaches `en` at any depth."""
    if not keys:
        return value
    key, rest = keys[0], keys[1:]
    if not isinstance(node, Mapping) or key in NODE_FIELDS:
        return _set(node, keys, value, prefix)
    route = _route_to(node, key)
    if route is None:
        names = ", ".join(_federation_names(node)) or "none"
        raise ConfigError(f"cannot set '{prefix}.{'.'.join(keys)}': the tree has no federation named {key!r} and "
                          f"a node has no field {key!r}; federations: {names}; node fields: {', '.join(NODE_FIELDS)}")
    return _replace_along(node, route, lambda target: _set_in_tree(target, rest, value, f"{prefix}.{key}"))


def _route_to(node, name: str) -> list[int] | None:
    """Child indices from `node` down to the federation called `name` ([] for `node`)."""
    if node.get("name") == name:
        return []
    for i, child in enumerate(node.get("children") or ()):
        if isinstance(child, Mapping):
            below = _route_to(child, name)
            if below is not None:
                return [i, *below]
    return None


def _replace_along(node, route: list[int], change):
    """A copy of `node` with the node at `route` replaced by `change(that node)`."""
    if not route:
        return change(node)
    children = list(node["children"])
    children[route[0]] = _replace_along(children[route[0]], route[1:], change)
    return {**node, "children": children}


def _federation_names(node) -> list[str]:
    if not isinstance(node, Mapping):
        return []
    return [str(node.get("name"))] + [n for c in node.get("children") or () for n in _federation_names(c)]


def apply_overrides(config, assignments) -> Config:
    for assignment in assignments or ():
        config = apply_override(config, assignment)
    if not isinstance(config, Config):
        return config
    return refuse_shadowed_policy(config.validate(), policy_fields_written(assignments))


def policy_fields_written(assignments) -> set[str]:
    """The config-level `policy:` fields that `a.b=v` overrides name."""
    written = set()
    for assignment in assignments or ():
        path, _, raw = str(assignment).partition("=")
        keys = path.strip().split(".")
        if keys[0] == "policy" and len(keys) > 1:
            written.add(keys[1])
        elif keys == ["policy"]:
            value = yaml.safe_load(raw) if raw.strip() else None
            written |= set(value) if isinstance(value, Mapping) else set()
    return written


def refuse_shadowed_policy(config: Config, written) -> Config:
    """`config`, unless a config-level `policy.F` it writes would be silently replaced.

    The `policy:` section is a dataclass, so a field written at the `Policy` default
    reads as unset, and where the strategy brings its own default for the root
    (`StrategyDef.policy_defaults`, `tree.provenance.with_root_defaults`) the root
    would take that instead of what was written (diloco's server_lr 0.7 for a written
    1.0). Refused, naming the spelling that works: the root's own `tree.policy.F`."""
    defaults = strategies.policy_defaults(config.algorithm.name) or {}
    root = config.tree if isinstance(config.tree, Mapping) else {}
    at_root = {f for section in ("policy", "own_policy") if isinstance(root.get(section), Mapping)
               for f in root[section]}
    base = Policy()
    for field in sorted(set(written) & set(defaults) - at_root):
        value = getattr(config.policy, field, None)
        if value == getattr(base, field) and defaults[field] != value:
            raise ConfigError(
                f"policy.{field}={value!r} is the Policy default, which strategy {config.algorithm.name!r} "
                f"replaces at the root with {defaults[field]!r}; to give the root {value!r}, write "
                f"tree.policy.{field}={value!r}")
    return config


def save_yaml(config: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
