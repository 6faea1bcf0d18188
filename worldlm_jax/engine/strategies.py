"""The paper's methods as named, registered strategies for the one hierarchical engine.

Each strategy is a tree transformation (the baselines flatten or pool the
tree) plus a plan saying where the backbone B and key layers K move:

| strategy    | tree      | B                     | K                                  |
|-------------|-----------|-----------------------|------------------------------------|
| fedavg      | flat      | averaged at the root  | (none: the whole model is B)       |
| hierfavg    | the tree  | averaged at every level | (none)                           |
| fedper      | flat      | averaged at the root  | kept by each client, never sent    |
| local       | flat      | kept by each client   | (none)                             |
| centralized | one client on pooled data | kept  | (none)                             |
| worldlm     | the tree  | averaged up to the root | attention per federation, kept by the lowest federations |
| diloco      | the tree  | averaged at every level; clients keep their optimizer state | (none) |

DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training
of Language Models"): every round each client starts from what its federation
broadcasts, runs its local steps (H inner AdamW steps: `algorithm.client_optimizer`)
with the inner optimizer state it kept from its last round, and the root steps
the model with the mean pseudo-gradient -mean(delta) through SGD with Nesterov
momentum 0.9 at lr 0.7 (`policy_defaults`: server_optimizer `nesterov`,
server_lr 0.7 at the root, which a config overrides by setting them there). On
a depth-1 tree that is DiLoCo; on a deeper tree the federations below the root
average their children with their own server rule (sgd at lr 1 by default:
plain averaging), and a level given the outer rule (`server_optimizer: nesterov`
in its policy) runs it too: hierarchical DiLoCo.

How it composes with the rest of the engine, each tested in tests/test_diloco.py:
- a client's optimizer state is a row of the clients' kept state (as `local`'s
  model is): written back only for a client that took part and stayed finite, so
  a client not sampled, dropped, diverged or excluded by `max_update_norm` keeps
  its state unchanged, and a padding slot writes nothing;
- DP: the optimizer state never leaves its client, so no release path is added
  (`engine.releases`); the root's momentum is post-processing of released means;
- resume: the clients' optimizer states are part of the engine state and so of
  every checkpoint; a resumed run equals an uninterrupted one;
- vectorised sweeps vmap the round over stacked states, optimizer states
  included, so points that differ in server_lr or client_lr are one program;
- several processes: the same compiled round, the clients' optimizer rows sharded
  like every client-level state.

A research group adds its own with `register(name, StrategyDef(plan=...))` in
a module loaded with `--plugin` (or a config's `plugins:` list) and runs it
with `algorithm.name: name`; it goes through the same blueprint, engine round,
evaluation and checkpoints as the built-ins.
"""
from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Mapping, Protocol

from worldlm_jax.engine.plan import Plan
from worldlm_jax.plugins.registry import Registry
from worldlm_jax.tree.policy import POLICY_FIELDS, Policy, inherit_policy
from worldlm_jax.tree.topology import Topology, build_topology



class AlgorithmFields(Protocol):
    """What a plan may read of the config's `algorithm` section (config.AlgorithmConfig)."""

    residuals: str
    similarity: str
    use_parent: bool
    residual_dim: int

ALL, BACKBONE, NONE = frozenset({"B", "K"}), frozenset({"B"}), frozenset()


def _same_tree(topology: Topology) -> Topology:
    return topology


@dataclasses.dataclass(frozen=True)
class StrategyDef:
    """What a strategy is, before any model or data: everything a run asks of its name.

    `plan(depth, algorithm)` gets the depth of the tree the strategy trains on
    (after `topology`) and the whole `algorithm` config section, so a strategy
    may read residuals, similarity, use_parent, residual_dim (or ignore them).
    The plan's use_parent holds at every level that aggregates K: a plan that
    never aggregates K at the root (K per language family) and sets it makes
    the root's untrained K a candidate of the families' attention.

    `policy_defaults` are policy fields the method brings for the ROOT federation
    of the config's tree (diloco: server_optimizer nesterov, server_lr 0.7). They
    lie beneath what the config sets (`tree.provenance.with_root_defaults`): a
    field named in the root's `policy:` or `own_policy:`, or set to a non-default
    value in the config-level `policy:` section, wins. They apply at the root
    alone, as `own_policy:` does, and `worldlm config` shows them as the
    strategy's defaults. (A strategy that flattens or pools the tree gets them at
    the root of the config's tree before its `topology` runs.)
    """

    plan: Callable[[int, AlgorithmFields], Plan]
    topology: Callable[[Topology], Topology] = _same_tree  # the tree it trains on (same clients, same data)
    uses_key_layers: bool = False  # algorithm.key_layers splits the model into B and K (else all B)
    # One client trains on everyone's data (the streams are concatenated, the
    # batch grows by the client count) and every client deploys its one model.
    pooled: bool = False
    policy_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)  # the root's policy fields, beneath the config's

    def __post_init__(self):
        for field in ("plan", "topology"):
            if not callable(getattr(self, field)):
                raise TypeError(f"StrategyDef.{field} must be callable, got {type(getattr(self, field)).__name__}")
        if not isinstance(self.policy_defaults, Mapping):
            raise TypeError(f"StrategyDef.policy_defaults must be a mapping of policy fields, "
                            f"got {type(self.policy_defaults).__name__}")
        unknown = sorted(set(self.policy_defaults) - set(POLICY_FIELDS))
        if unknown:
            raise ValueError(f"StrategyDef.policy_defaults names unknown policy field(s) {unknown}; valid fields: "
                             f"{', '.join(POLICY_FIELDS)}")
        # values checked now, as a federation's would be (named rules must be registered first)
        inherit_policy({"policy": dict(self.policy_defaults)}, Policy(), "StrategyDef.policy_defaults")
        object.__setattr__(self, "policy_defaults", types.MappingProxyType(dict(self.policy_defaults)))


STRATEGIES: Registry[StrategyDef] = Registry("strategy", "worldlm_jax.engine.strategies.register(name, StrategyDef(...))")


def register(name: str, definition: StrategyDef) -> StrategyDef:
    """Add a strategy usable as `algorithm.name: name` (replaces one of that name)."""
    if not isinstance(definition, StrategyDef):
        raise TypeError(f"strategy {name!r} must be a worldlm_jax.strategies.StrategyDef, "
                        f"got {type(definition).__name__}")
    return STRATEGIES.register(name, definition)


def get(name: str, field: str = "algorithm.name") -> StrategyDef:
    return STRATEGIES.get(name, field)


def names() -> tuple[str, ...]:
    return STRATEGIES.names()


# ---- plans ------------------------------------------------------------------------
def averaging_plan(depth: int) -> Plan:
    """The whole model averaged at every level: FedAvg (depth 1) / HierFAVG."""
    return Plan(broadcast=(ALL,) * depth, aggregate=(ALL,) * depth, owner={"B": 0, "K": 0})


def fedper_plan() -> Plan:
    return Plan(broadcast=(BACKBONE,), aggregate=(BACKBONE,), client_keeps=frozenset({"K"}),
                owner={"B": 0, "K": 1})


def local_plan() -> Plan:
    """Each client trains alone and keeps its optimizer state across rounds."""
    return Plan(broadcast=(NONE,), aggregate=(NONE,), client_keeps=ALL, client_opt_persistent=True,
                owner={"B": 1, "K": 1})


def diloco_plan(depth: int) -> Plan:
    """DiLoCo: the whole model averaged at every level, as HierFAVG, and each client
    keeps its (inner) optimizer state across rounds, not its parameters: every round
    starts from what its federation broadcasts."""
    return dataclasses.replace(averaging_plan(depth), client_opt_persistent=True)


# DiLoCo's outer rule (Douillard et al. 2023, sec. 3): Nesterov momentum 0.9 at lr 0.7
DILOCO_POLICY = {"server_optimizer": "nesterov", "server_lr": 0.7}


def worldlm_plan(depth: int, residuals: str = "siblings", similarity: str = "cos_delta",
                 use_parent: bool = True, residual_dim: int = 0) -> Plan:
    """B flows to the root; K is sent only from a lowest federation to its
    clients and is aggregated with attention at every level."""
    broadcast = tuple(BACKBONE if d < depth - 1 else ALL for d in range(depth))
    return Plan(broadcast=broadcast, aggregate=(ALL,) * depth, owner={"B": 0, "K": depth - 1},
                residuals=residuals, similarity=similarity, use_parent=use_parent, residual_dim=residual_dim)


def global_stage_plan(depth: int, residuals: str = "siblings", similarity: str = "cos_delta",
                      use_parent: bool = True) -> Plan:
    """WorldLM's first stage under the `staged` schedule: K is aggregated up to
    the root and broadcast back like B (one global model), before the nested
    stage localises it. Same state layout as `worldlm_plan`, so a run switches
    plans between rounds without converting anything."""
    return Plan(broadcast=(ALL,) * depth, aggregate=(ALL,) * depth, owner={"B": 0, "K": 0},
                residuals=residuals, similarity=similarity, use_parent=use_parent)


def pooled_topology(topology: Topology, weight: float | None = None) -> Topology:
    """Centralised baseline: one client holding everyone's training data
    (its weight, by default, all of theirs)."""
    weight = float(sum(topology.client_weight)) if weight is None else weight
    policy = topology.levels[0].policies[0]
    leaf = topology.leaf.policies[0]
    spec = {"name": "pooled", "clients": 1, "sources": ["pooled"],
            "policy": {"local_steps": leaf.local_steps, "client_lr": leaf.client_lr}}
    return build_topology(spec, root_policy=policy).with_client_weights([weight])


def _worldlm(depth: int, algo: AlgorithmFields) -> Plan:
    return worldlm_plan(depth, algo.residuals, algo.similarity, algo.use_parent, algo.residual_dim)


_BUILT_IN = {
    "worldlm": StrategyDef(plan=_worldlm, uses_key_layers=True),
    "fedavg": StrategyDef(plan=lambda depth, algo: averaging_plan(depth), topology=Topology.flattened),
    "hierfavg": StrategyDef(plan=lambda depth, algo: averaging_plan(depth)),
    "fedper": StrategyDef(plan=lambda depth, algo: fedper_plan(), topology=Topology.flattened,
                          uses_key_layers=True),
    "local": StrategyDef(plan=lambda depth, algo: local_plan(), topology=Topology.flattened),
    "centralized": StrategyDef(plan=lambda depth, algo: local_plan(), topology=pooled_topology, pooled=True),
    "diloco": StrategyDef(plan=lambda depth, algo: diloco_plan(depth), policy_defaults=DILOCO_POLICY),
}
for _name, _definition in _BUILT_IN.items():
    register(_name, _definition)


# ---- by name (the config's algorithm.name) ------------------------------------------
def check_name(name: str) -> None:
    STRATEGIES.check(name, "algorithm.name")


def strategy_topology(name: str, topology: Topology) -> Topology:
    """The tree a strategy runs on (same clients, same data)."""
    return get(name).topology(topology)


def uses_key_layers(name: str) -> bool:
    return get(name).uses_key_layers


def policy_defaults(name: str) -> Mapping[str, Any]:
    """The policy fields strategy `name` brings for the root (beneath the config's)."""
    return get(name).policy_defaults
