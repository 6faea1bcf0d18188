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

from worldlm_jax.engine import Plan, links
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
                  leaves: dict | None = None, backbone_share: np.ndarray | None = None) -> np.ndarray:
    """(n_level,) bytes of one message on each level-`level` federation's edges in
    `direction` ("up": what one child sends it; "down": what it sends one child)
    of `parts`: through the federation's codecs where `leaves` is given, else float32;
    B times `backbone_share` (n_level,) where a federation syncs it in fragments."""
    policies = topology.levels[level].policies
    if leaves is None:
        per_part = {part: np.full(len(policies), float(sizes[part])) for part in parts}
    else:
        per_part = {part: np.array([float(codec_bytes(links.variant(p, direction, part), leaves[part])
                                          if leaves[part] else 0) for p in policies]) for part in parts}
    if backbone_share is not None and "B" in per_part:
        per_part["B"] = per_part["B"] * backbone_share
    return sum(per_part.values(), np.zeros(len(policies)))


def block_bytes(params: dict, key_paths, blocks: dict[str, int], bytes_per_value: int = 4) -> dict[int, int]:
    """{block: float32 bytes of the backbone in it} (-1: outside the blocks), where
    `blocks` maps a path to its block (`EngineSpec.param_blocks`)."""
    out: dict[int, int] = {}
    for path, value in params.items():
        if path not in key_paths:
            block = blocks.get(path, -1)
            out[block] = out.get(block, 0) + int(np.prod(value.shape)) * bytes_per_value
    return out


def fragment_shares(topology: Topology, bytes_by_block: dict[int, int], round_index: int) -> dict[int, np.ndarray]:
    """{d: (n_d,)} per level with a federation of federations that syncs its
    backbone in fragments (`sync_fragments`, engine/fragments.py): the share of B's
    bytes its messages carry in root round `round_index`, averaged over its rounds in
    that root round (a federation's n-th round over the run syncs fragment n mod P)."""
    total = float(sum(bytes_by_block.values())) or 1.0
    out, per_root = {}, np.ones(1, np.int64)  # a federation's rounds per root round
    for d, lvl in enumerate(topology.levels):
        if d:
            per_root = per_root[lvl.parent] * lvl.policy_array("rounds", np.int64)
        fragments = lvl.policy_array("sync_fragments", np.int64)
        if d == topology.depth - 1 or not np.any(fragments > 1):
            continue
        share = np.ones(lvl.size)
        for i, (P, T) in enumerate(zip(fragments, per_root)):
            fragment = [sum(b for blk, b in bytes_by_block.items() if (blk % P if blk >= 0 else 0) == k)
                        for k in range(P)]
            share[i] = np.mean([fragment[n % P] for n in range(round_index * T, (round_index + 1) * T)]) / total
        out[d] = share
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
                leaves: dict | None = None, shares: dict | None = None) -> dict:
    """Bytes of one root round, per level edge.

    `participants[d]` is each level-d federation's number of (round, child)
    participations of its children during the root round (summed over nested
    rounds), as reported by the round metrics `level{d}/participants`;
    `leaves` (`part_leaves`) prices messages through the federations' codecs;
    `shares` (`fragment_shares`): the backbone's share where it syncs in fragments.
    """
    out = {}
    for d in range(topology.depth):
        n_P = np.asarray(participants[d], np.float64)
        n = float(np.sum(n_P))
        share = (shares or {}).get(d)
        down = float(np.sum(n_P * message_bytes(topology, d, "down", plan.broadcast[d], sizes, leaves, share)))
        up = float(np.sum(n_P * message_bytes(topology, d, "up", plan.aggregate[d], sizes, leaves, share)))
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
