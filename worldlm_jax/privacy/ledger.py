"""Per-federation privacy ledgers: which federations use DP, how often they
release an aggregate, and (epsilon, delta) so far (Google's dp_accounting).

A federation at level d releases one noisy aggregate per round it runs, and it
runs `rounds` rounds per round of its parent, so per root round it releases the
product of `rounds` along its path below the root. Its sampling rate is that of
its children: a lowest federation samples clients by its own policy; an
internal federation samples its child federations (`federations_per_round`,
rate 1 when all take part). A federation is charged for every round of its
parent, sampled or not: an upper bound (no amplification by the ancestors'
sampling is claimed).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from worldlm_jax.privacy import accounting
from worldlm_jax.tree.topology import Topology


def releases_per_root_round(topology: Topology, level: int, node: int) -> int:
    count, index = 1, node
    for d in range(level, 0, -1):
        count *= topology.levels[d].policies[index].rounds
        index = topology.levels[d].parent[index]
    return count


def sampling_of(topology: Topology, level: int, node: int) -> tuple[str, float, int]:
    """(sampling kind, rate, population) of the children of one federation."""
    if level < topology.depth - 1:
        n = int(np.sum(topology.levels[level + 1].parent == node))
        k = int(topology.federations_sampled(level)[node])
        if k >= n:
            return "full", 1.0, n
        return ("poisson" if topology.levels[level].policies[node].sampling == "poisson" else "fixed"), k / n, n
    policy = topology.leaf.policies[node]
    n = int(np.sum(topology.client_parent == node))
    per_round = min(policy.clients_per_round or n, n)
    if policy.sampling == "full" or per_round >= n:
        return "full", 1.0, n
    return policy.sampling, per_round / n, n


def _nodes(topology: Topology):
    for d, lvl in enumerate(topology.levels):
        for i, name in enumerate(lvl.names):
            yield d, i, name, lvl.policies[i]


def make_accountants(topology: Topology, accountant: str = "rdp") -> dict[str, accounting.FederationAccountant]:
    """One ledger per federation that adds noise."""
    out = {}
    for d, i, name, policy in _nodes(topology):
        if policy.dp_noise_multiplier > 0:
            kind, rate, population = sampling_of(topology, d, i)
            out[name] = accounting.FederationAccountant(
                name, policy.dp_noise_multiplier, rate, accountant if kind != "fixed" else "rdp", kind,
                population if kind == "fixed" else None)
    return out


def step_all(topology: Topology, accountants: dict) -> None:
    """Compose one root round into every ledger."""
    for d, i, name, _ in _nodes(topology):
        if name in accountants:
            accountants[name].step(releases_per_root_round(topology, d, i))


LEVELS = ("clients", "federations", "all")  # what privacy.level protects under a target epsilon


def protected_levels(topology: Topology, level: str) -> tuple[int, ...]:
    """The tree levels whose federations release under `privacy.level`: the
    federations that aggregate clients (`clients`: client-level DP, what a flat
    baseline's one federation gives, so trees and flat baselines compare at the
    same guarantee), those that aggregate federations (`federations`:
    organisation-level DP), or both (`all`: each client *and* each federation
    protected; a flat tree has no federation of federations to add)."""
    if level not in LEVELS:
        raise ValueError(f"privacy.level={level!r}; allowed: {', '.join(LEVELS)}")
    leaf = topology.depth - 1
    if level == "clients":
        return (leaf,)
    if level == "federations":
        if leaf == 0:
            raise ValueError("privacy.level=federations: this tree (or the flat one the strategy trains on) has no "
                             "federation of federations; use privacy.level: clients")
        return tuple(range(leaf))
    return tuple(range(leaf + 1))


def calibrate(topology: Topology, target_epsilon: float, target_delta: float, root_rounds: int,
              default_clip: float = 1.0, accountant: str = "rdp", level: str = "clients") -> Topology:
    """Turn DP on for every federation of the `level` it protects
    (`protected_levels`) without a DP policy of its own, with the smallest
    noise multiplier that keeps the whole run within (epsilon, delta)."""
    protected = protected_levels(topology, level)
    levels = []
    for d, lvl in enumerate(topology.levels):
        policies = []
        for i, policy in enumerate(lvl.policies):
            if policy.dp_noise_multiplier == 0 and d in protected:
                kind, rate, population = sampling_of(topology, d, i)
                releases = releases_per_root_round(topology, d, i) * root_rounds
                try:
                    noise = accounting.calibrate_noise(target_epsilon, target_delta, rate, releases,
                                                       accountant if kind != "fixed" else "rdp", kind,
                                                       population if kind == "fixed" else None)
                except ValueError as e:
                    raise ValueError(f"federation '{lvl.names[i]}': {e}") from e
                clip = policy.dp_clip if math.isfinite(policy.dp_clip) else default_clip
                policy = dataclasses.replace(policy, dp_noise_multiplier=float(noise), dp_clip=float(clip),
                                             dp_delta=target_delta)
            policies.append(policy)
        levels.append(dataclasses.replace(lvl, policies=tuple(policies)))
    return dataclasses.replace(topology, levels=tuple(levels))


def report(topology: Topology, accountants: dict, plan=None) -> dict:
    """Per DP federation: (epsilon, delta) so far and what they cover: its
    `level`, the `unit` protected (a client, or a child federation with all its
    clients) and, given the run's plan, the `parts` its release carries."""
    out = {}
    for d, i, name, policy in _nodes(topology):
        if name in accountants:
            acc = accountants[name]
            out[name] = {"epsilon": acc.epsilon(policy.dp_delta), "delta": policy.dp_delta,
                         "noise_multiplier": policy.dp_noise_multiplier, "clip": policy.dp_clip,
                         "sampling_rate": acc.sampling_rate, "rounds": acc.rounds,
                         "level": d, "unit": "client" if d == topology.depth - 1 else "federation"}
            if plan is not None:
                out[name]["parts"] = released_parts(plan, d, policy)
    return out


def released_parts(plan, d: int, policy) -> str:
    """The parameter parts a DP federation at level d releases through its noise."""
    parts = ["B"] if "B" in plan.aggregate[d] else []
    if "K" in plan.aggregate[d] and policy.dp_scope == "all" and policy.k_agg != "local":
        parts.append("K")
    return "+".join(parts) or "none"


def exceeding(topology: Topology, accountants: dict, target_epsilon: float) -> list[str]:
    """Federations whose next root round would push epsilon past the target."""
    names = []
    for d, i, name, policy in _nodes(topology):
        if name in accountants:
            extra = releases_per_root_round(topology, d, i)
            if accounting.would_exceed(accountants[name], target_epsilon, policy.dp_delta, extra):
                names.append(name)
    return names
