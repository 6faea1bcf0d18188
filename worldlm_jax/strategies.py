"""The paper's methods as `Plan`s for the one hierarchical engine.

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
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax

from worldlm_jax.engine import EngineSpec, Plan, init_state, make_round
from worldlm_jax.topology import Topology

STRATEGIES = ("worldlm", "fedavg", "hierfavg", "fedper", "local", "centralized")
ALL, BACKBONE, NONE = frozenset({"B", "K"}), frozenset({"B"}), frozenset()


class Strategy(NamedTuple):
    """Pure functions, in the manner of optax: init, then run_round repeatedly."""

    init: Callable  # (params) -> EngineState
    run_round: Callable  # (EngineState, RoundBatch, key) -> (EngineState, metrics)


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


def strategy_topology(name: str, topology: Topology) -> Topology:
    """The tree a strategy runs on (same clients, same data)."""
    check_name(name)
    if name in ("worldlm", "hierfavg"):
        return topology
    return topology.flattened()


def strategy_plan(name: str, depth: int, residuals="siblings", similarity="cos_delta", use_parent=True,
                  residual_dim: int = 0) -> Plan:
    check_name(name)
    if name in ("fedavg", "hierfavg"):
        return averaging_plan(depth)
    if name == "fedper":
        return fedper_plan()
    if name in ("local", "centralized"):
        return local_plan()
    return worldlm_plan(depth, residuals, similarity, use_parent, residual_dim)


def uses_key_layers(name: str) -> bool:
    return name in ("worldlm", "fedper")


def check_name(name: str) -> None:
    if name not in STRATEGIES:
        raise ValueError(f"unknown algorithm {name!r}; choose one of: {', '.join(STRATEGIES)}")


def make_strategy(spec: EngineSpec, jit: bool = True) -> Strategy:
    run_round = make_round(spec)
    if jit:
        run_round = jax.jit(run_round, donate_argnums=(0,))
    return Strategy(init=lambda params: init_state(spec, params), run_round=run_round)
