"""Where each federation's policy comes from: the resolved tree, field by field.

A federation's policy is its own `policy:` fields over its parent's policy, and
the root's parent is the config-level `policy:` section (`policy.inherit_policy`,
as `topology.build_topology` applies it). `policy_provenance` walks the same
tree the same way and says, for every field a federation does not leave at the
`Policy` defaults (or sets itself), its value and where it came from:

    set                                   in the federation's own `policy:`
    inherited from world/eu               from that ancestor's own `policy:`
    inherited from config policy          from the config's `policy:` section
    set (merged with inherited from P)    a `*_args` mapping merged key by key
    own (not inherited)                   in the federation's own `own_policy:`,
                                          which its children do not inherit
    default of strategy S (not inherited) the root's rule that strategy S brings
                                          (`StrategyDef.policy_defaults`), where
                                          the config sets none (`with_root_defaults`)

Federations are named by their path from the root (`world/en`). Host-side and
pure: no JAX, no data.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from worldlm_jax.tree.policy import POLICY_FIELDS, Policy, inherit_policy
from worldlm_jax.tree.topology import build_topology

__all__ = ["FieldSource", "FederationPolicy", "policy_provenance", "format_provenance", "format_value", "CONFIG_POLICY",
           "with_root_defaults"]

CONFIG_POLICY = "config policy"  # the root's ancestor: the config-level `policy:` section
_DEFAULTS = Policy()
_MERGED = ("aggregator_args", "objective_args", "attack_args")  # merged key by key (inherit_policy)


@dataclasses.dataclass(frozen=True)
class FieldSource:
    """One policy field of one federation: its resolved value and its origin."""

    field: str
    value: Any
    source: str  # "set" | "inherited from <path>" | "inherited from config policy" | "set (merged with ...)"


@dataclasses.dataclass(frozen=True)
class FederationPolicy:
    """One federation of the tree: its path, level, resolved policy and the
    fields that differ from the defaults (or that it sets), with their origins."""

    path: str  # names from the root, joined by '/': world/en
    level: int  # 0 = the root
    policy: Policy
    fields: tuple[FieldSource, ...]


def with_root_defaults(spec: Mapping[str, Any], root_policy: Policy | None,
                       defaults: Mapping[str, Any] | None) -> tuple[Mapping[str, Any], tuple[str, ...]]:
    """(spec, applied): tree `spec` with `defaults` (policy fields a strategy brings for
    the root) written into its root's `own_policy:` beneath what the config sets, and
    the fields that took the default.

    The config sets a field when the root's `policy:` or `own_policy:` names it (any
    value), or when the config-level `policy:` section (`root_policy`) holds it at a
    value other than the `Policy` default: that section is a dataclass, which keeps no
    record of what was written, so a field left at its default reads as unset, as in
    this module's table. (To give the root the `Policy` default itself, write it at the
    root: `tree.policy.server_lr: 1.0`; the config loader refuses the config-level
    spelling, `config.schema.refuse_shadowed_policy`.) A default applies at the root alone, as
    `own_policy:` does; the federations below inherit what they did before.
    `spec` is returned unchanged (the same object) where nothing applies."""
    root_policy = root_policy or Policy()
    if not defaults or not isinstance(spec, Mapping):
        return spec, ()
    unknown = sorted(set(defaults) - set(POLICY_FIELDS))
    if unknown:
        raise ValueError(f"policy defaults name unknown policy field(s) {unknown}; valid fields: "
                         f"{', '.join(POLICY_FIELDS)}")
    own = spec.get("own_policy") or {}
    if not isinstance(own, Mapping):  # build_topology names the malformed field
        return spec, ()
    written = set(own) | set(spec["policy"] if isinstance(spec.get("policy"), Mapping) else ())
    applied = {f: v for f, v in defaults.items() if f not in written and not _differs(root_policy, f)}
    if not applied:
        return spec, ()
    return {**spec, "own_policy": {**applied, **own}}, tuple(applied)


def policy_provenance(spec: Mapping[str, Any], root_policy: Policy | None = None, *,
                      root_defaults: Mapping[str, Any] | None = None,
                      defaults_from: str = "strategy") -> tuple[FederationPolicy, ...]:
    """Every federation of tree `spec` in depth-first order, with the origin of each
    policy field not at the `Policy` defaults. `root_policy` (the config's `policy:`
    section) is what the root inherits; `root_defaults`, the root's rule a strategy
    brings (`with_root_defaults`), named `defaults_from` ("strategy diloco") where it
    applies. A malformed spec raises build_topology's TopologyError."""
    root_policy = root_policy or Policy()
    spec, from_defaults = with_root_defaults(spec, root_policy, root_defaults)
    build_topology(spec, root_policy=root_policy)  # the same checks (and errors) as the run's own tree
    # origin of each field of the policy being inherited: a path, CONFIG_POLICY, or None (the default)
    origin = {f: CONFIG_POLICY if _differs(root_policy, f) else None for f in POLICY_FIELDS}
    out: list[FederationPolicy] = []

    def visit(node, level, inherited, origin, path):
        path = f"{path}/{node['name']}" if path else node["name"]
        where = f"federation '{node['name']}'"
        own, alone = dict(node.get("policy") or {}), dict(node.get("own_policy") or {})
        passed_on = inherit_policy(node, inherited, where)
        policy = inherit_policy(node, passed_on, where, field="own_policy")
        here = dict(origin)
        rows = []
        for f in POLICY_FIELDS:
            if f in own:
                here[f] = path
            if not (f in own or f in alone or _differs(policy, f)):
                continue
            if level == 0 and f in from_defaults:
                source = f"default of {defaults_from} (not inherited)"
            elif f in alone:
                source = "own (not inherited)"
            elif f not in own:
                source = f"inherited from {origin[f]}" if origin[f] else "default"
            elif f in _MERGED and set(getattr(inherited, f)) - set(own[f] or {}):
                source = f"set (merged with inherited from {origin[f]})"
            else:
                source = "set"
            rows.append(FieldSource(f, getattr(policy, f), source))
        out.append(FederationPolicy(path, level, policy, tuple(rows)))
        for child in node.get("children", ()):
            visit(child, level + 1, passed_on, here, path)

    visit(spec, 0, root_policy, origin, "")
    return tuple(out)


def _differs(policy: Policy, field: str) -> bool:
    return getattr(policy, field) != getattr(_DEFAULTS, field)


def format_value(value: Any) -> str:
    """A policy value as YAML would write it (numbers in full, inf, null, {k: v})."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def format_provenance(federations: tuple[FederationPolicy, ...]) -> str:
    """One row per (federation, field): path, field, value, origin; a federation at
    the defaults throughout gets one row saying so."""
    rows = [("federation", "field", "value", "from")]
    for fed in federations:
        rows += [(fed.path, r.field, format_value(r.value), r.source) for r in fed.fields] or [
            (fed.path, "-", "-", "all defaults")]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows)
