"""What a round is told: the strategy's `Plan`, the run's `EngineSpec`, and
the static facts of a tree the round's shapes depend on."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import numpy as np

from worldlm_jax.engine import aggregation
from worldlm_jax.tree.topology import Topology

Params = dict[str, jax.Array]
PARTS = ("B", "K")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where each parameter part lives and moves; the whole of a strategy."""

    broadcast: tuple[frozenset, ...]  # per edge level d -> d+1 (len = depth)
    aggregate: tuple[frozenset, ...]  # per federation level d (len = depth)
    client_keeps: frozenset = frozenset()  # parts a client keeps between rounds
    client_opt_persistent: bool = False  # clients keep their optimizer state too
    owner: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"B": 0, "K": 0})
    residuals: str = "none"  # none | siblings | all (candidates for K attention)
    similarity: str = "cos_delta"
    use_parent: bool = False  # parent's K is an attention candidate
    residual_dim: int = 0  # > 0: score residual candidates on count-sketch embeddings of this size
    # k_agg `personalized` at the leaf federations: each client keeps a personal offset
    # from its federation's K (client state K, zero at the start), starts and deploys
    # from their sum, and receives its own mixture of its siblings' K each round
    personal_keys: bool = False

    def validate(self, depth: int) -> None:
        if len(self.broadcast) != depth or len(self.aggregate) != depth:
            raise ValueError(f"plan has {len(self.broadcast)} broadcast / {len(self.aggregate)} aggregate "
                             f"entries for a tree of depth {depth}")
        for part in PARTS:
            if part not in self.broadcast[-1] and part not in self.client_keeps:
                raise ValueError(f"part {part} is neither broadcast to clients nor kept by them")
            if not 0 <= self.owner[part] <= depth:
                raise ValueError(f"owner level {self.owner[part]} of part {part} outside 0..{depth}")
        if self.residuals not in ("none", "siblings", "all"):
            raise ValueError(f"residuals={self.residuals!r}; allowed: none, siblings, all")
        for part in self.aggregate[-1]:
            if part not in self.broadcast[-1]:
                raise ValueError(f"part {part} is aggregated from clients but not broadcast to them: a client's "
                                 "update is measured from what its federation sent")
        if self.personal_keys and not ("K" in self.client_keeps and "K" in self.broadcast[-1]
                                       and "K" in self.aggregate[-1] and self.owner["K"] == depth - 1):
            raise ValueError("personal key layers need K owned, broadcast and aggregated by the leaf "
                             "federations and kept by the clients")
        if self.similarity not in aggregation.SIMILARITIES:
            raise ValueError(f"similarity={self.similarity!r}; allowed: {', '.join(aggregation.SIMILARITIES)}")


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """Everything static a round needs."""

    topology: Topology
    plan: Plan
    loss_fn: Callable
    key_paths: frozenset  # parameter paths that are key layers K
    key_groups: Mapping[str, int]
    client_optimizer: str = "adamw"
    chunk: int = 0  # clients per device at once: 0 = all (vmap), k = lax.map chunks
    max_update_norm: float = math.inf  # larger client updates count as diverged
    mesh: Any = None
    # levels (depth = the clients' kept state) whose state is sharded along its
    # node axis where wide enough; None = every level (`levels_worth_sharding`)
    sharded_levels: frozenset | None = None
    client_objective: str = "none"  # a registered `objectives.ClientObjective`
    total_rounds: int = 1  # root rounds of the run: where a schedule's decay ends by default
    client_metrics: bool = False  # the round also returns each client's loss, update norm and weight
    # path -> parameter group (`partition.parameter_groups`): each level then also reports its
    # children's backbone update spread per group (`update_spread_group/<group>`); empty: not
    param_groups: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # deadlines (policy `deadline_s`): per level d >= 1 (index d), which federations reply
    # within their parent's deadline, as the planned clock decides (`network_clock.planned_on_time`);
    # a late one is left out of its parent's every round. (): no deadline anywhere
    on_time: tuple = ()
    # path -> transformer block index (paths outside the blocks: absent); where a
    # federation syncs its backbone in fragments of blocks (policy `sync_fragments`)
    param_blocks: Mapping[str, int] = dataclasses.field(default_factory=dict)


# ---- static facts of a tree -----------------------------------------------------
def level_rounds(topology: Topology) -> tuple[int, ...]:
    """Scan length of each level d >= 1: the most rounds any node there runs."""
    return tuple(int(max(p.rounds for p in lvl.policies)) for lvl in topology.levels[1:])


def local_steps(topology: Topology) -> int:
    return int(max(p.local_steps for p in topology.leaf.policies))


def level_kinds(topology: Topology, level: int, *fields: str) -> tuple[str, ...]:
    """The named rules (optimizers, schedules, aggregators) level `level` uses
    in `fields`: each is traced once and every node selects its own."""
    return tuple(sorted({getattr(p, f) for p in topology.levels[level].policies for f in fields}))


def server_kinds(topology: Topology, level: int) -> tuple[str, ...]:
    return level_kinds(topology, level, "server_optimizer")


def residual_mask(topology: Topology, level: int, mode: str) -> np.ndarray | None:
    lvl = topology.levels[level]
    if mode == "none" or lvl.size < 2:
        return None
    same = np.ones((lvl.size, lvl.size), bool) if mode == "all" else lvl.parent[:, None] == lvl.parent[None, :]
    return same & ~np.eye(lvl.size, dtype=bool)


def split_parts(params: Params, key_paths) -> dict[str, Params]:
    return {"B": {p: v for p, v in params.items() if p not in key_paths},
            "K": {p: v for p, v in params.items() if p in key_paths}}
