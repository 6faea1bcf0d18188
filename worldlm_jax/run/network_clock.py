"""A simulated wall clock: how long a root round would take over the tree's links.

Host-side, from what the byte count reads (`communication.py`: the plan, the
parts' sizes, the round metrics `level{d}/participants` and `level{d}/rounds`),
plus each federation's link policy and the clients' speed. The compiled round
does not change.

Links. `link_bandwidth_mbps` and `link_latency_ms` of a federation describe the
link from it to each of its children (a leaf federation's: to each client).
A message costs latency + bytes / bandwidth; a direction that carries no bytes
sends no message (a `local` run only computes).

One round of a leaf federation takes

    latency + down / bandwidth + local work + latency + up / bandwidth

per client, where down and up are the bytes of the parts its plan broadcasts
and aggregates, and local work = local_steps x tokens per step /
client_tokens_per_s. Its clients are alike, so any one of them is the slowest.

One round of a federation of federations takes the same sum for its slowest
participating child, with that child's own time in the round in place of the
local work, and the residual K the child reads (its siblings' K and its
parent's, as `communication.py` counts them) on the child's down link.

A node's time in the root round is its round's time times the rounds it ran
(`level{d}/rounds`); a node with no participants takes 0. The root's time is
the round's simulated seconds. Along the way each node keeps its critical
path split into the seconds spent on each level's links and in the clients'
local work, so a round says where its time went.

Overlap. `link_overlap: true` at a federation prices its children's uploads
as Streaming DiLoCo schedules them: a child sends its update while it already
works on the next round, so each round's upload costs only what that work does
not hide, and a round takes down + max(work, up) instead of down + work + up
(the steady state: the run's very last upload, which nothing follows, is
hidden too, one message over a run). The work is the child's time in a round
before its upload: local work below a leaf federation, the child's own nested
rounds (with their own downloads) above. The compiled round does not change:
the engine still applies each round's aggregate before the next round starts,
so an overlapped clock is the time of a schedule whose one-round staleness the
training does not simulate. The slowest child is the slowest without overlap.

Simplifications:
- each child has its own link, at its parent's speed: no shared uplink, no
  contention;
- transfers are not overlapped with compute (but where `link_overlap` says),
  nor with each other;
- a child's time per round of its parent is its time in the root round over
  the parent rounds it took part in; with sampled children the slowest child
  of the root round counts as present in every round its parent ran (an upper
  bound);
- stragglers count as doing all their local steps; dropped clients as absent.

Deadlines. `deadline_s` at a federation bounds how long it waits for each
child's reply in one of its rounds (download, the child's work or nested
rounds, upload). Whether a child makes it is decided once, from the planned
clock (`planned_on_time`: every child taking part, all rounds run, deadlines
applied bottom-up), so it needs each leaf's `client_tokens_per_s`: a late child
is left out of every round, as a dropped client is (`level{d}/late` counts
them), and a federation that left one out waits out its deadline on its own
links. A leaf federation's clients are alike, so its deadline keeps all of them
or none (refused). A deadline is not combined with `link_overlap` at the same
federation (refused): the overlap hides the very upload a deadline times.
"""
from __future__ import annotations

import numpy as np

from worldlm_jax.engine import Plan
from worldlm_jax.run.communication import message_bytes, residual_candidates
from worldlm_jax.tree.policy import ATTENDING
from worldlm_jax.tree.topology import Topology

BYTES_PER_MEGABIT = 1e6 / 8


def message_seconds(n_bytes: np.ndarray, bandwidth_mbps: np.ndarray, latency_ms: np.ndarray) -> np.ndarray:
    """Seconds to send `n_bytes` over a link; nothing to send, no message."""
    n_bytes = np.asarray(n_bytes, np.float64)
    seconds = latency_ms / 1000.0 + n_bytes / (bandwidth_mbps * BYTES_PER_MEGABIT)
    return np.where(n_bytes > 0, seconds, 0.0)


def local_work_seconds(topology: Topology, tokens_per_step: float, measured_tokens_per_s: float) -> np.ndarray:
    """(n_leaf,) seconds one client of each leaf federation trains in one of its
    rounds: local_steps x tokens per step / client_tokens_per_s, where a speed of
    0 is the run's own `measured_tokens_per_s` (0 where that is 0: nothing trained)."""
    leaf = topology.leaf
    speed = leaf.policy_array("client_tokens_per_s", np.float64)
    speed = np.where(speed > 0, speed, measured_tokens_per_s)
    steps = leaf.policy_array("local_steps", np.float64)
    return np.where(speed > 0, steps * tokens_per_step / np.where(speed > 0, speed, 1.0), 0.0)


def residual_bytes(topology: Topology, plan: Plan, sizes: dict[str, int], level: int) -> np.ndarray:
    """(n_level,) K bytes each level-`level` federation reads per round of its parent:
    its residual candidates' and its parent's, where it aggregates K by attention."""
    lvl = topology.levels[level]
    if "K" not in plan.aggregate[level] or not sizes["K"]:
        return np.zeros(lvl.size)
    attends = np.array([p.k_agg in ATTENDING for p in lvl.policies])
    candidates = residual_candidates(topology, level, plan.residuals) + (1.0 if plan.use_parent else 0.0)
    return attends * candidates * sizes["K"]


def slowest_child(parent: np.ndarray, seconds: np.ndarray, present: np.ndarray, n_parents: int) -> np.ndarray:
    """(n_parents,) index of each parent's slowest present child; -1 where none is present."""
    order = np.lexsort((seconds, present, parent))  # by parent; absent children first, then by seconds
    last = np.r_[parent[order][1:] != parent[order][:-1], True]  # each parent's last child in that order
    best = np.full(n_parents, -1)
    best[parent[order][last]] = np.where(present[order][last], order[last], -1)
    return best


def critical_paths(topology: Topology, plan: Plan, sizes: dict[str, int], participants: dict[int, np.ndarray],
                   rounds: dict[int, np.ndarray], work_seconds: np.ndarray,
                   leaves: dict | None = None, late: dict | None = None,
                   backbone: dict | None = None) -> tuple[np.ndarray, ...]:
    """Per level d, (n_d, depth + 1): each node's simulated seconds in the root
    round along its critical path, split into the seconds on the links of each
    level (columns 0..depth-1: level d's links go to its children) and in the
    clients' local work (column depth). A row sums to the node's time.

    `participants[d]`, `rounds[d]`: the round metrics `level{d}/participants`
    and `level{d}/rounds` (per node, summed over nested rounds);
    `work_seconds`: (n_leaf,) a client's local work per round (`local_work_seconds`);
    `leaves`: messages priced through the federations' codecs (`communication.message_bytes`);
    `late[d]`: the round metric `level{d}/late` (per node, the children its deadline
    left out): a node that had one waits out its `deadline_s` in each of its rounds;
    `backbone[(d, direction)]` (`communication.partial_sync_bytes`): B's bytes per
    message where part of it syncs."""
    return _walk(topology, plan, sizes, participants, rounds, work_seconds, leaves, late, backbone=backbone)


def planned_on_time(topology: Topology, plan: Plan, sizes: dict[str, int], work_seconds: np.ndarray,
                    leaves: dict | None = None) -> tuple:
    """Which federations reply within their parent's `deadline_s`, by the planned
    clock: every federation takes part with all its children and runs all its
    rounds, and deadlines apply bottom-up (a federation that left a late child
    out waits out its own deadline). Per level: (n_d,) bool, None at the root.

    A federation's real time is at most its planned one (sampling and faults only
    remove children), so a child on time by plan is on time in every round; one
    late by plan is left out in every round (a static mask: it needs every leaf's
    `client_tokens_per_s`, which the caller checks). Raises ValueError where a
    deadline leaves a federation no child at all (a leaf federation's clients are
    alike: all of them, or none, are in time)."""
    D = topology.depth
    planned_rounds, participants = {}, {}
    for d, lvl in enumerate(topology.levels):
        own = lvl.policy_array("rounds", np.float64)
        planned_rounds[d] = own * (planned_rounds[d - 1][lvl.parent] if d else 1.0)
        participants[d] = topology.children_count(d).astype(np.float64)
    on_time: dict = {}
    _walk(topology, plan, sizes, participants, planned_rounds, work_seconds, leaves, None, on_time)
    return (None,) + tuple(on_time[d] for d in range(1, D))


def _walk(topology, plan, sizes, participants, rounds, work_seconds, leaves, late, planned: dict | None = None,
          backbone: dict | None = None):
    """The bottom-up walk of `critical_paths`; with `planned` (a dict, filled with
    each level's on-time mask) lateness is decided from the planned times."""
    D = topology.depth
    paths: list[np.ndarray] = [np.zeros(0)] * D
    for d in range(D - 1, -1, -1):
        lvl = topology.levels[d]
        bandwidth = lvl.policy_array("link_bandwidth_mbps", np.float64)
        latency = lvl.policy_array("link_latency_ms", np.float64)
        deadline = lvl.policy_array("deadline_s", np.float64)
        fragmented = (backbone or {}).get
        down = message_bytes(topology, d, "down", plan.broadcast[d], sizes, leaves, fragmented((d, "down")))
        up = message_bytes(topology, d, "up", plan.aggregate[d], sizes, leaves, fragmented((d, "up")))
        overlap = np.array([bool(p.link_overlap) for p in lvl.policies])
        per_round = np.zeros((lvl.size, D + 1))
        waits = np.zeros(lvl.size, bool) if late is None or d not in late else np.asarray(late[d]) > 0
        if d == D - 1:  # children are clients, all alike
            up_seconds = message_seconds(up, bandwidth, latency)
            per_round[:, d] = message_seconds(down, bandwidth, latency) + up_seconds
            per_round[:, D] = work_seconds
            work = np.asarray(work_seconds, np.float64)
            if planned is not None:
                _refuse_all_late(lvl.names, deadline, per_round.sum(1), "its clients (all alike)")
        else:  # children are federations: the slowest present one sets the pace
            child = topology.levels[d + 1]
            parent = child.parent
            present = np.asarray(rounds[d + 1]) > 0
            # a child runs its own `rounds` per round of its parent it takes part in
            parent_rounds = np.asarray(rounds[d + 1], np.float64) / child.policy_array("rounds", np.float64)
            child_per_round = paths[d + 1] / np.maximum(parent_rounds, 1.0)[:, None]
            child_work = child_per_round.sum(1)  # its own nested rounds: what an overlapped upload hides behind
            child_up = message_seconds(up[parent], bandwidth[parent], latency[parent])
            child_per_round[:, d] += (message_seconds(down[parent] + residual_bytes(topology, plan, sizes, d + 1),
                                                      bandwidth[parent], latency[parent]) + child_up)
            if planned is not None:
                is_late = (deadline[parent] > 0) & (child_per_round.sum(1) > deadline[parent])
                planned[d + 1] = ~is_late
                present &= ~is_late
                waits = np.bincount(parent[is_late], minlength=lvl.size) > 0
                fastest = np.full(lvl.size, np.inf)
                np.minimum.at(fastest, parent, child_per_round.sum(1))
                nobody = np.bincount(parent[present], minlength=lvl.size) == 0
                _refuse_all_late(lvl.names, np.where(nobody, deadline, 0.0), fastest, "its child federations")
            best = slowest_child(parent, child_per_round.sum(1), present, lvl.size)
            per_round = np.where((best >= 0)[:, None], child_per_round[np.maximum(best, 0)], 0.0)
            up_seconds = np.where(best >= 0, child_up[np.maximum(best, 0)], 0.0)
            work = np.where(best >= 0, child_work[np.maximum(best, 0)], 0.0)
        # a federation that left a late child out heard nothing from it before its deadline
        per_round[:, d] += np.where(waits, np.maximum(deadline - per_round.sum(1), 0.0), 0.0)
        ran = np.where(np.asarray(participants[d]) > 0, np.asarray(rounds[d], np.float64), 0.0)
        paths[d] = per_round * ran[:, None]
        # link_overlap: each round's upload hides behind the next round's work (the steady state)
        hidden = np.where(overlap, ran * np.minimum(up_seconds, work), 0.0)
        paths[d][:, d] -= hidden
    return tuple(paths)


def _refuse_all_late(names, deadline: np.ndarray, seconds: np.ndarray, children: str) -> None:
    """A deadline that every child of a federation misses leaves it nothing to aggregate."""
    for name, limit, took in zip(names, deadline, seconds):
        if limit > 0 and took > limit:
            raise ValueError(f"federation {name!r}: policy field 'deadline_s' = {limit:g} leaves out every one of "
                             f"{children}: the fastest replies in {took:.4g} s by the planned clock; raise it, "
                             "or set 0 for no deadline")


def round_clock(topology: Topology, plan: Plan, sizes: dict[str, int], participants: dict[int, np.ndarray],
                rounds: dict[int, np.ndarray], work_seconds: np.ndarray, leaves: dict | None = None,
                late: dict | None = None, backbone: dict | None = None) -> dict:
    """The root round's simulated seconds: `seconds` (the root's critical path),
    `compute_seconds` (the clients' local work on it) and `per_level` (its
    seconds on each level's links, `level{d}`); compute and links add up to seconds."""
    root = critical_paths(topology, plan, sizes, participants, rounds, work_seconds, leaves, late, backbone)[0][0]
    return {"seconds": float(root.sum()), "compute_seconds": float(root[-1]),
            "per_level": {f"level{d}": float(root[d]) for d in range(topology.depth)}}
