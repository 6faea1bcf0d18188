"""Bytes sent per level per round, for every strategy (host-side accounting).

Counted from the plan (which parts move on each edge of the tree), the size of
each part, and how many children actually took part (a round metric):

- down, edge d -> d+1: every participating child receives the parts its parent
  broadcasts (WorldLM: B between federations, B and K from a lowest
  federation to its clients; K never leaves a federation otherwise);
- up: every participating child sends the parts its parent aggregates;
- residuals: a federation that aggregates K by attention receives the K of
  each residual candidate once per round of its parent, and its parent's K
  when that is a candidate (`k_agg: mean` reads neither).

A message is priced through its federation's codec of that part and direction
(`plugins.codecs`: payload plus scales and indices, each leaf in whole bytes),
given the leaves' sizes (`part_leaves`); without them, or through `none`,
parameters travel as float32 (4 bytes). Residual K reads are float32.
"""
from __future__ import annotations

import numpy as np

from worldlm_jax.engine import Plan, links, partial_sync
from worldlm_jax.plugins import codecs
from worldlm_jax.tree.policy import ATTENDING
from worldlm_jax.tree.topology import Topology


def part_bytes(params: dict, key_paths, bytes_per_value: int = 4) -> dict[str, int]:
    sizes = {"B": 0, "K": 0}
    for path, value in params.items():
        sizes["K" if path in key_paths else "B"] += int(np.prod(value.shape)) * bytes_per_value
    return sizes


def part_leaves(params: dict, key_paths) -> dict[str, tuple[int, ...]]:
    """{"B": ..., "K": ...}: the number of values in each leaf of each part (`params` may be abstract)."""
    leaves = {"B": [], "K": []}
    for path in sorted(params):
        leaves["K" if path in key_paths else "B"].append(int(np.prod(params[path].shape)))
    return {part: tuple(v) for part, v in leaves.items()}


def codec_bytes(variant, leaf_sizes) -> int:
    """Bytes of one message of a part (leaves of `leaf_sizes` values) through codec `variant`
    ((name, ((argument, value), ...)), as `engine.links.variant` resolves it): each leaf in whole bytes."""
    name, args = variant
    codec, args = codecs.get(name), dict(args)
    return sum(-(-int(codec.bits(int(n), args)) // 8) for n in leaf_sizes)


def message_bytes(topology: Topology, level: int, direction: str, parts, sizes: dict[str, int],
                  leaves: dict | None = None, backbone_bytes: np.ndarray | None = None) -> np.ndarray:
    """(n_level,) bytes of one message on each level-`level` federation's edges in
    `direction` ("up": what one child sends it; "down": what it sends one child)
    of `parts`: through the federation's codecs where `leaves` is given, else float32;
    B's bytes are `backbone_bytes` (n_level,) where given (a partial sync: `partial_sync_bytes`)."""
    policies = topology.levels[level].policies
    if leaves is None:
        per_part = {part: np.full(len(policies), float(sizes[part])) for part in parts}
    else:
        per_part = {part: np.array([float(codec_bytes(links.variant(p, direction, part), leaves[part])
                                          if leaves[part] else 0) for p in policies]) for part in parts}
    if backbone_bytes is not None and "B" in per_part:
        per_part["B"] = np.asarray(backbone_bytes, np.float64)
    return sum(per_part.values(), np.zeros(len(policies)))


def backbone_leaves(params: dict, key_paths, blocks: dict[str, int], groups: dict[str, str]) -> tuple:
    """((block, group, values), ...) of each backbone leaf (block -1: outside the blocks),
    where `blocks` and `groups` map a path to its block and parameter group
    (`EngineSpec.param_blocks`, `EngineSpec.param_groups`)."""
    return tuple((blocks.get(path, -1), groups.get(path, ""), int(np.prod(params[path].shape)))
                 for path in sorted(params) if path not in key_paths)


def partial_sync_bytes(topology: Topology, leaves: tuple, round_index: int) -> dict:
    """{(d, direction): (n_d,)} per level with a federation of federations that syncs
    part of its backbone a round (`sync_fragments`, `sync_every`; engine/partial_sync.py):
    the bytes of B in one message on each federation's edges in root round
    `round_index`, through its codec, averaged over its rounds in that root round
    (`leaves`: `backbone_leaves`; its n-th round over the run syncs the leaves of
    fragment n mod P whose group's interval divides n)."""
    out, per_root = {}, np.ones(1, np.int64)  # a federation's rounds per root round
    for d, lvl in enumerate(topology.levels):
        if d:
            per_root = per_root[lvl.parent] * lvl.policy_array("rounds", np.int64)
        if d == topology.depth - 1 or not any(partial_sync.is_partial(p) for p in lvl.policies):
            continue
        for direction in ("up", "down"):
            sent = np.zeros(lvl.size)
            for i, (policy, T) in enumerate(zip(lvl.policies, per_root)):
                in_turn = lambda n: tuple(size for block, group, size in leaves
                                          if partial_sync.syncs_at(policy, block, group, n))
                variant = links.variant(policy, direction, "B")
                sent[i] = np.mean([codec_bytes(variant, in_turn(n))
                                   for n in range(round_index * T, (round_index + 1) * T)])
            out[(d, direction)] = sent
    return out


def residual_candidates(topology: Topology, level: int, mode: str) -> np.ndarray:
    """(n_level,) number of residual candidates each federation attends to."""
    lvl = topology.levels[level]
    if mode == "none" or lvl.size < 2:
        return np.zeros(lvl.size, np.int64)
    if mode == "all":
        return np.full(lvl.size, lvl.size - 1)
    counts = np.bincount(lvl.parent, minlength=int(lvl.parent.max()) + 1)
    return counts[lvl.parent] - 1


def round_bytes(topology: Topology, plan: Plan, sizes: dict[str, int], participants: dict[int, np.ndarray],
                leaves: dict | None = None, backbone: dict | None = None) -> dict:
    """Bytes of one root round, per level edge.

    `participants[d]` is each level-d federation's number of (round, child)
    participations of its children during the root round (summed over nested
    rounds), as reported by the round metrics `level{d}/participants`;
    `leaves` (`part_leaves`) prices messages through the federations' codecs;
    `backbone` (`partial_sync_bytes`): B's bytes per message where part of it syncs.
    """
    out = {}
    for d in range(topology.depth):
        n_P = np.asarray(participants[d], np.float64)
        n = float(np.sum(n_P))
        fragmented = lambda direction: (backbone or {}).get((d, direction))
        down = float(np.sum(n_P * message_bytes(topology, d, "down", plan.broadcast[d], sizes, leaves,
                                                fragmented("down"))))
        up = float(np.sum(n_P * message_bytes(topology, d, "up", plan.aggregate[d], sizes, leaves,
                                              fragmented("up"))))
        extra = 0.0
        child_is_federation = d + 1 < topology.depth
        if child_is_federation and "K" in plan.aggregate[d + 1] and sizes["K"]:
            # only federations that aggregate K by attention read residuals and their parent's K
            attends = np.array([p.k_agg in ATTENDING for p in topology.levels[d + 1].policies])
            candidates = residual_candidates(topology, d + 1, plan.residuals) + (1.0 if plan.use_parent else 0.0)
            extra = n * float(np.mean(candidates * attends)) * sizes["K"]
        out[f"level{d}"] = {"down": down, "up": up, "residual": extra, "total": down + up + extra}
    out["total"] = sum(v["total"] for v in out.values())
    return out
