"""What the round's functions know at trace time: `RoundStatics`, built once
per compiled round from the `EngineSpec` (the optimizers, objective, schedule,
aggregator and attack kinds each level uses, which levels run DP, whether the
clients' K must be kept whole for attention)."""
from __future__ import annotations

import dataclasses

import optax

from worldlm_jax.engine import links, parallel, partial_sync, releases
from worldlm_jax.engine.plan import EngineSpec, Plan, level_kinds, residual_mask, server_kinds
from worldlm_jax.plugins import aggregators, contract, objectives, optimizers
from worldlm_jax.plugins.objectives import ClientObjective
from worldlm_jax.tree.policy import ATTENDING
from worldlm_jax.tree.topology import Topology, federation_rows


@dataclasses.dataclass(frozen=True)
class RoundStatics:
    """What the round's functions know at trace time (per level d: tuples)."""

    spec: EngineSpec
    topo: Topology
    plan: Plan
    client_tx: optax.GradientTransformation
    masked_steps: bool  # federations differ in local steps, or stragglers stop early
    objective: ClientObjective
    server_txs: tuple  # per level: the optimizer of each server kind
    client_schedules: tuple[str, ...]  # the leaf level's client_lr schedule kinds
    server_schedules: tuple  # per level: server_lr schedule kinds
    aggregator_kinds: tuple  # per level: aggregator names
    attack_kinds: tuple[str, ...]  # the leaf level's attacks ("none": no attackers)
    stacked: tuple  # per level: some aggregator needs every child's backbone update
    residual_masks: tuple
    dp_levels: tuple
    adaptive_levels: tuple
    dp_scope: tuple
    leaf_k_attention: bool  # the clients' K is kept whole for attention
    robust_keys: tuple  # per level: some federation bounds its children's K deltas (robust_attention)
    summed: tuple  # per level: parts reduced to per-federation sums as children finish
    up_codecs: tuple = ()  # per level: {part: links.PartCodecs} of what its children send it
    down_codecs: tuple = ()  # per level: {part: links.PartCodecs} of what it broadcasts
    partial_sync_levels: tuple = ()  # per level: some federation syncs part of its backbone a round
    # (devices M, rows per device L, devices per federation g) where the client slots are laid
    # out federation-local on a mesh (`Topology.slot_layout`, `parallel.to_device_rows`); else None
    device_rows: tuple | None = None


def round_statics(spec: EngineSpec) -> RoundStatics:
    topo, plan = spec.topology, spec.plan
    plan.validate(topo.depth)
    releases.check(spec)  # nothing leaves a DP federation but through its release
    partial_sync.check(spec)
    D = topo.depth
    dp_scope = []
    for d, lvl in enumerate(topo.levels):
        scopes = {p.dp_scope for p in lvl.policies if p.uses_dp}
        if len(scopes) > 1:
            raise ValueError(f"level {d}: federations {lvl.names} mix dp_scope values {sorted(scopes)}; "
                             "use one scope per level")
        dp_scope.append(scopes.pop() if scopes else "backbone")
    # Static per level: the parts whose children are reduced to per-federation
    # sums as they finish (streamed: no per-child copy is kept), and whether the
    # children's K must be kept whole (attention scores every child against the
    # children's mean, known only once all have finished). Federation levels
    # keep their children's K anyway (it is their state); the client level
    # keeps it only when some leaf federation aggregates K with attention.
    leaf_k_attention = ("K" in plan.aggregate[D - 1] and bool(spec.key_paths)
                        and any(p.k_agg in ATTENDING for p in topo.leaf.policies))
    child_K_kept = [d < D - 1 or leaf_k_attention for d in range(D)]
    aggregator_kinds = tuple(level_kinds(topo, d, "aggregator") for d in range(D))
    return RoundStatics(
        spec=spec, topo=topo, plan=plan,
        client_tx=checked_optimizer(spec.client_optimizer, "algorithm.client_optimizer"),
        masked_steps=(len({p.local_steps for p in topo.leaf.policies}) > 1
                      or any(p.stragglers > 0 for p in topo.leaf.policies)),
        objective=objectives.get(spec.client_objective),
        server_txs=tuple(tuple(checked_optimizer(n, "server_optimizer") for n in server_kinds(topo, d))
                         for d in range(D)),
        client_schedules=level_kinds(topo, D - 1, "client_lr_schedule"),
        server_schedules=tuple(level_kinds(topo, d, "server_lr_schedule") for d in range(D)),
        aggregator_kinds=aggregator_kinds,
        attack_kinds=level_kinds(topo, D - 1, "attack"),
        stacked=tuple("B" in plan.aggregate[d] and any(not aggregators.get(k).streamed for k in kinds)
                      for d, kinds in enumerate(aggregator_kinds)),
        residual_masks=tuple(residual_mask(topo, d, plan.residuals) for d in range(D)),
        dp_levels=tuple(any(p.uses_dp for p in lvl.policies) for lvl in topo.levels),
        adaptive_levels=tuple(any(p.dp_adaptive_clip for p in lvl.policies) for lvl in topo.levels),
        dp_scope=tuple(dp_scope),
        leaf_k_attention=leaf_k_attention,
        robust_keys=tuple(any(p.k_agg == "robust_attention" for p in lvl.policies) for lvl in topo.levels),
        summed=tuple(frozenset(part for part in plan.aggregate[d] if part == "B" or not child_K_kept[d])
                     for d in range(D)),
        up_codecs=tuple(links.level_codecs(topo, d, "up", plan.aggregate[d]) for d in range(D)),
        down_codecs=tuple(links.level_codecs(topo, d, "down", plan.broadcast[d]) for d in range(D)),
        partial_sync_levels=partial_sync.levels(spec),
        device_rows=device_rows(spec))


def device_rows(spec: EngineSpec) -> tuple | None:
    """(M, L, g) of a federation-local slot layout on a mesh of M > 1 devices, else None."""
    topo, mesh = spec.topology, spec.mesh
    if topo.slot_layout != "local" or mesh is None or mesh.shape[parallel.AXIS] == 1:
        return None
    M = mesh.shape[parallel.AXIS]
    if topo.slot_multiple != M:
        raise ValueError(f"the slots are laid out on {topo.slot_multiple} device blocks but the mesh has {M} "
                         f"devices on '{parallel.AXIS}': lay them out with topology.with_slot_multiple({M})")
    return (M, *federation_rows(topo.leaf.size, M))


def checked_optimizer(name: str, field: str) -> optax.GradientTransformation:
    """Optimizer `name`, its every update checked where the round traces it (`contract`)."""
    entry = contract.Entry(optimizers.OPTIMIZERS.kind, name, optimizers.OPTIMIZERS.get(name, field))
    return contract.checked_optimizer(optimizers.get(name, field), entry)
