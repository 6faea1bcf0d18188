"""The hierarchical round: one jitted function for all levels of the tree.

Every strategy (FedAvg, HierFAVG, FedPer, Local, Centralised, WorldLM) is the
same nested loop with a different `Plan`: which parameter parts (B = backbone,
K = key layers) are broadcast down each edge of the tree, which are aggregated
at each level, which a client keeps between rounds, and whose copy a client
deploys. One root round:

    fed_round(level 0):
      broadcast the parts sent down to the children
      children work: client slots train locally (vmapped / sharded, and
                     reduced chunk by chunk to per-federation sums: `Children`), or
                     each child federation runs its own `rounds` rounds (scan)
      aggregate: B through each node's server optimizer (optionally DP),
                 K through attention over children, residuals and the parent

Autonomous federations with different rules share one compiled program:
their policies are arrays over the level's node axis, fewer rounds or steps
are masked iterations, and a node's state changes only where it is active.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from worldlm_jax import aggregation, parallel, privacy, tree_ops
from worldlm_jax.client import make_local_update
from worldlm_jax.topology import Topology

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
        if self.similarity not in aggregation.SIMILARITIES:
            raise ValueError(f"similarity={self.similarity!r}; allowed: {', '.join(aggregation.SIMILARITIES)}")


class LevelState(NamedTuple):
    B: Params  # (n_d, ...) backbone of each federation at this level
    K: Params  # (n_d, ...) key layers of each federation
    server: tuple  # server optimizer states for B, one per optimizer kind
    residual_K: Params  # (n_d, ...) K as last shared with related federations
    clip: jax.Array  # (n_d,) current DP clip norm (moves only under adaptive clipping)


class ClientState(NamedTuple):
    B: Params  # (n_clients, ...) parts a client keeps ({} when none)
    K: Params
    opt: Any  # client optimizer states when persistent, else ()


class EngineState(NamedTuple):
    levels: tuple
    clients: ClientState
    round: jax.Array


class RoundBatch(NamedTuple):
    """Host-made inputs of one root round (R = nested rounds of levels 1..D-1)."""

    tokens: jax.Array  # (R_1, ..., R_{D-1}, S, E, B, L+1) int32
    slot_client: jax.Array  # (R..., S) client id in each slot, -1 = padding
    slot_weight: jax.Array  # (R..., S) data weight of the slot's client, 0 = absent


class Children(NamedTuple):
    """What a level's aggregation receives from its N children."""

    weight_N: jax.Array  # (N,) data weight; 0 = absent, padding or diverged
    parent_N: jax.Array  # (N,) index of the child's federation
    sums: dict  # {"delta": {B, K}, "dp": {B, K}}: per-federation sums (see make_round.sum_children)
    dp_norm_N: jax.Array  # (N,) pre-clip norm of each child's update (DP levels)
    K_N: Params | None  # (N, ...) each child's K, where attention needs it; else None


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


# ---- static arrays ----------------------------------------------------------
def level_rounds(topology: Topology) -> tuple[int, ...]:
    """Scan length of each level d >= 1: the most rounds any node there runs."""
    return tuple(int(max(p.rounds for p in lvl.policies)) for lvl in topology.levels[1:])


def local_steps(topology: Topology) -> int:
    return int(max(p.local_steps for p in topology.leaf.policies))


def _server_kinds(topology: Topology, level: int) -> tuple[str, ...]:
    return tuple(sorted({p.server_optimizer for p in topology.levels[level].policies}))


def _residual_mask(topology: Topology, level: int, mode: str) -> np.ndarray | None:
    lvl = topology.levels[level]
    if mode == "none" or lvl.size < 2:
        return None
    same = np.ones((lvl.size, lvl.size), bool) if mode == "all" else lvl.parent[:, None] == lvl.parent[None, :]
    return same & ~np.eye(lvl.size, dtype=bool)


def split_parts(params: Params, key_paths) -> dict[str, Params]:
    return {"B": {p: v for p, v in params.items() if p not in key_paths},
            "K": {p: v for p, v in params.items() if p in key_paths}}


# ---- state --------------------------------------------------------------------
def init_state(spec: EngineSpec, params: Params) -> EngineState:
    """Every node and client starts from the same initial parameters.

    With a mesh the state is built where it lives (`state_shardings`): a wide
    level's rows go straight to their devices, and no process ever holds a
    replicated copy of a sharded level."""
    build = lambda p: pad_state(spec, _initial_state(spec, p))
    if spec.mesh is None:  # distinct buffers: the round donates them
        return jax.tree.map(lambda x: jnp.array(x, copy=True), build(params))
    shardings = state_shardings(spec, jax.eval_shape(build, params))
    return jax.jit(build, out_shardings=shardings)(params)


def _initial_state(spec: EngineSpec, params: Params) -> EngineState:
    topo, plan = spec.topology, spec.plan
    parts = split_parts(params, spec.key_paths)
    levels = []
    for d, lvl in enumerate(topo.levels):
        B = tree_ops.stack_rows(parts["B"], lvl.size)
        K = tree_ops.stack_rows(parts["K"], lvl.size)
        txs = [_optimizer(name) for name in _server_kinds(topo, d)]
        residual = K if _residual_mask(topo, d, plan.residuals) is not None else {}
        clip = jnp.asarray(lvl.policy_array("dp_clip", np.float32))
        levels.append(LevelState(B, K, aggregation.init_server_states(txs, B), residual, clip))
    kept = {part: tree_ops.stack_rows(parts[part], topo.n_clients) if part in plan.client_keeps else {}
            for part in PARTS}
    opt = ()
    if plan.client_opt_persistent:
        opt = jax.vmap(_optimizer(spec.client_optimizer).init)(tree_ops.stack_rows(params, topo.n_clients))
    return EngineState(tuple(levels), ClientState(kept["B"], kept["K"], opt), jnp.zeros((), jnp.int32))


# ---- where the state lives ------------------------------------------------------
# Every leaf of a level's state (B, K, server optimizer states, residual K, clip)
# and of the clients' kept state has one row per node (client). A level with at
# least as many rows as the mesh has devices is sharded along that axis, padded
# to a multiple of the device count with inert rows (copies of row 0 that the
# round never reads: it works on the real rows and writes them back); smaller
# levels are replicated. So per-device memory of a wide tree falls with the
# device count, and the round's segment sums and gathers stay as they are: XLA
# inserts the collectives. Those collectives are one per parameter leaf and
# cost a fixed latency each (on CPU, 0.5 ms across processes), so a level whose
# state is small is better replicated: `EngineSpec.sharded_levels` (set from
# `run.shard_state_mb` by `levels_worth_sharding`) says which levels may shard.
def _level_mesh(spec: EngineSpec, level: int):
    """The mesh level `level` (depth = the clients' kept state) may shard over, or None."""
    if spec.mesh is None or (spec.sharded_levels is not None and level not in spec.sharded_levels):
        return None
    return spec.mesh


def stored_rows(spec: EngineSpec) -> tuple[tuple[int, ...], int]:
    """Rows each level's state (and the clients' kept state) is stored with."""
    topo = spec.topology
    return (tuple(parallel.padded_rows(lvl.size, _level_mesh(spec, d)) for d, lvl in enumerate(topo.levels)),
            parallel.padded_rows(topo.n_clients, _level_mesh(spec, topo.depth)))


def _map_rows(spec: EngineSpec, fn, state: EngineState, *others: EngineState) -> EngineState:
    """fn(leaf, *other_leaves, real_rows, stored_rows, mesh) on every per-row leaf
    (mesh: what the leaf's level may shard over, or None)."""
    topo = spec.topology
    level_rows, client_rows = stored_rows(spec)
    levels = tuple(jax.tree.map(lambda *x, n=lvl.size, m=m, mesh=_level_mesh(spec, d): fn(*x, n, m, mesh),
                                level, *(o.levels[d] for o in others))
                   for d, (lvl, level, m) in enumerate(zip(topo.levels, state.levels, level_rows)))
    clients_mesh = _level_mesh(spec, topo.depth)
    clients = jax.tree.map(lambda *x: fn(*x, topo.n_clients, client_rows, clients_mesh), state.clients,
                           *(o.clients for o in others))
    return state._replace(levels=levels, clients=clients)


def pad_state(spec: EngineSpec, state: EngineState) -> EngineState:
    """Real rows -> stored rows (padding rows repeat row 0)."""
    def pad(x, n, m, _):
        return x if x.shape[0] == m else jnp.concatenate([x, jnp.broadcast_to(x[:1], (m - n,) + x.shape[1:])])
    return _map_rows(spec, pad, state)


def unpad_state(spec: EngineSpec, state: EngineState, stored: bool = True) -> EngineState:
    """Stored rows -> the real rows the round works on. `stored=False`: the
    rows may be padded differently (e.g. saved on another device count)."""
    return _map_rows(spec, lambda x, n, m, _: x if stored and m == n else x[:n], state)


def repad_state(spec: EngineSpec, new: EngineState, stored: EngineState) -> EngineState:
    """Write the round's real rows back over the stored state (padding unchanged)."""
    return _map_rows(spec, lambda x, old, n, m, _: x if m == n else old.at[:n].set(x), new, stored)


def state_partition_specs(spec: EngineSpec, state: EngineState) -> EngineState:
    """PartitionSpec of every leaf of a (stored) state: rows sharded where wide enough."""
    specs = _map_rows(spec, lambda x, n, m, mesh: parallel.row_spec(m, mesh), state)
    return specs._replace(round=parallel.P())


def levels_worth_sharding(spec: EngineSpec, params: Params, min_bytes: float) -> frozenset:
    """Levels (depth = the clients' kept state) whose whole state holds at least
    `min_bytes`: sharding those saves memory that matters; smaller ones cost
    collectives for nothing. `params` may be abstract (ShapeDtypeStructs)."""
    state = jax.eval_shape(lambda p: _initial_state(spec, p), params)
    size = lambda tree: sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))
    sizes = [size(level) for level in state.levels] + [size(state.clients)]
    return frozenset(d for d, b in enumerate(sizes) if b >= min_bytes)


def state_shardings(spec: EngineSpec, state: EngineState) -> EngineState:
    """NamedSharding of every leaf of a (stored) state on the spec's mesh."""
    return jax.tree.map(lambda p: parallel.NamedSharding(spec.mesh, p), state_partition_specs(spec, state),
                        is_leaf=lambda x: isinstance(x, parallel.P))


def place_state(spec: EngineSpec, state: EngineState) -> EngineState:
    """Put a (stored) state where the round keeps it (a no-op without a mesh)."""
    return state if spec.mesh is None else jax.device_put(state, state_shardings(spec, state))


def _optimizer(name: str) -> optax.GradientTransformation:
    from worldlm_jax import optimizers
    return optimizers.get(name)


def deployed_params(spec: EngineSpec, state: EngineState, client_ids) -> Params:
    """Parameters client c deploys: each part from its owner level on c's path
    to the root (WorldLM: root B with its federation's K)."""
    topo = spec.topology
    out = {}
    for part in PARTS:
        level = spec.plan.owner[part]
        if level == topo.depth:
            source, index = getattr(state.clients, part), client_ids
        else:
            source = getattr(state.levels[level], part)
            index = jnp.asarray(topo.ancestors(level))[client_ids]
        out.update(tree_ops.gather(source, index))
    return out


# ---- the round ------------------------------------------------------------
class RoundPolicies(NamedTuple):
    """Per-node arrays of every federation's rules (plus the tree's index arrays)."""

    slot_parent: jax.Array
    parents: tuple  # per level d >= 1: (n_d,) parent index
    node_weight: tuple  # per level: (n_d,) data weight
    rounds: tuple  # per level: (n_d,) rounds per parent round
    client_lr: jax.Array  # (n_leaf,)
    steps: jax.Array  # (n_leaf,)
    server_choice: tuple  # per level: (n_d,) index into the level's optimizer kinds
    server_lr: tuple
    attention: tuple  # per level: AttentionPolicy
    dp_noise: tuple  # noise multiplier of the update (with adaptive clipping: its share)
    dp_clip: tuple
    dp_expected: tuple  # per level: (n_d,) expected participating children
    dp_clip_lr: tuple  # 0 = fixed clip
    dp_target_quantile: tuple
    dp_count_std: tuple  # noise std of the adaptive clip's count query
    children_per_round: tuple  # per level: (n_d,) children taking part per round (internal levels)
    poisson_children: tuple  # per level: (n_d,) bool, children drawn each with probability k / n


def round_policies(topo: Topology) -> "RoundPolicies":
    """The topology's policies as arrays over each level's node axis."""
    def f32(level, field):
        return jnp.asarray(topo.levels[level].policy_array(field, np.float32))

    D = topo.depth
    expected, per_round = [], []
    for d in range(D):
        count = topo.children_count(d).astype(np.float32)
        if d == D - 1:
            cpr = topo.leaf.policy_array("clients_per_round", np.float32)
            count = np.where(cpr > 0, np.minimum(cpr, count), count)
        else:
            count = topo.federations_sampled(d).astype(np.float32)
        per_round.append(jnp.asarray(count, jnp.int32))
        expected.append(jnp.asarray(np.maximum(count, 1.0)))
    noise, count_std = [], []
    for d, lvl in enumerate(topo.levels):
        # Default count noise: m / 20 (Andrew et al.), at least z so the split below exists.
        std = [p.dp_clip_count_stddev or max(float(m) / 20, p.dp_noise_multiplier)
               for p, m in zip(lvl.policies, np.asarray(expected[d]))]
        count_std.append(np.asarray(std, np.float32))
        # With adaptive clipping the accounted multiplier z pays for the update
        # and the count query together (Andrew et al. 2021, Thm 1).
        noise.append(np.asarray([privacy.split_noise_multiplier(p.dp_noise_multiplier, c) if p.dp_adaptive_clip
                                 else p.dp_noise_multiplier for p, c in zip(lvl.policies, std)], np.float32))
    return RoundPolicies(
        slot_parent=jnp.asarray(topo.slot_parent),
        parents=tuple(jnp.asarray(lvl.parent) for lvl in topo.levels),
        node_weight=tuple(jnp.asarray(topo.node_weight(d), jnp.float32) for d in range(D)),
        rounds=tuple(jnp.asarray(lvl.policy_array("rounds", np.int32)) for lvl in topo.levels),
        client_lr=f32(D - 1, "client_lr"),
        steps=jnp.asarray(topo.leaf.policy_array("local_steps", np.int32)),
        server_choice=tuple(jnp.asarray([_server_kinds(topo, d).index(p.server_optimizer)
                                         for p in topo.levels[d].policies], jnp.int32) for d in range(D)),
        server_lr=tuple(f32(d, "server_lr") for d in range(D)),
        attention=tuple(aggregation.AttentionPolicy(
            mode=jnp.asarray(topo.levels[d].policy_array("k_agg", np.int32)), tau=f32(d, "tau"), eta=f32(d, "eta"),
            residual_bias=f32(d, "residual_bias"), parent_bias=f32(d, "parent_bias")) for d in range(D)),
        dp_noise=tuple(jnp.asarray(noise[d]) for d in range(D)),
        dp_clip=tuple(f32(d, "dp_clip") for d in range(D)),
        dp_expected=tuple(expected),
        dp_clip_lr=tuple(jnp.asarray([p.dp_clip_lr if p.dp_adaptive_clip else 0.0 for p in lvl.policies], jnp.float32)
                         for lvl in topo.levels),
        dp_target_quantile=tuple(f32(d, "dp_target_quantile") for d in range(D)),
        dp_count_std=tuple(jnp.asarray(count_std[d]) for d in range(D)),
        children_per_round=tuple(per_round),
        poisson_children=tuple(jnp.asarray([p.sampling == "poisson" for p in lvl.policies]) for lvl in topo.levels),
    )


def sample_children(key, parent_N: jax.Array, k_P: jax.Array, poisson_P: jax.Array, n_P: np.ndarray) -> jax.Array:
    """(N,) which children take part this round: all where k >= n (a node's
    sample size and child count); otherwise k of the n drawn uniformly without
    replacement, or, under Poisson sampling, each with probability k / n."""
    u_N = jax.random.uniform(key, parent_N.shape)
    k_N, n_N = k_P[parent_N], jnp.asarray(n_P, jnp.float32)[parent_N]
    siblings = parent_N[:, None] == parent_N[None, :]
    rank_N = jnp.sum(siblings & (u_N[None, :] < u_N[:, None]), axis=1)  # O(N^2): N = federations, few
    drawn = jnp.where(poisson_P[parent_N], u_N < k_N / n_N, rank_N < k_N)
    return (k_N >= n_N) | drawn


def make_round(spec: EngineSpec) -> Callable:
    """Build `run_round(state, batch, key, policies=None) -> (state, metrics)` (not jitted).

    `policies` (a RoundPolicies pytree, default: the topology's) is an input,
    not a constant, so a sweep can vmap one compiled round over stacked
    learning rates, temperatures or noise multipliers."""
    topo, plan = spec.topology, spec.plan
    plan.validate(topo.depth)
    D, S = topo.depth, topo.n_slots
    default_policies = round_policies(topo)
    client_tx = _optimizer(spec.client_optimizer)
    heterogeneous_steps = len({p.local_steps for p in topo.leaf.policies}) > 1
    local_update = make_local_update(spec.loss_fn, client_tx, masked_steps=heterogeneous_steps)
    server_txs = [tuple(_optimizer(n) for n in _server_kinds(topo, d)) for d in range(D)]
    residual_masks = [_residual_mask(topo, d, plan.residuals) for d in range(D)]
    dp_levels = [any(p.uses_dp for p in lvl.policies) for lvl in topo.levels]
    adaptive_levels = [any(p.dp_adaptive_clip for p in lvl.policies) for lvl in topo.levels]
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
    leaf = D - 1
    leaf_k_attention = ("K" in plan.aggregate[leaf] and bool(spec.key_paths)
                        and any(p.k_agg == "attention" for p in topo.leaf.policies))
    child_K_kept = [d < leaf or leaf_k_attention for d in range(D)]
    summed = [frozenset(part for part in plan.aggregate[d] if part == "B" or not child_K_kept[d]) for d in range(D)]

    def sum_children(d, delta_N: dict, weight_N, parent_N, clip_N):
        """Per-federation sums over level d's children: the weighted deltas of the
        summed parts and, at DP levels, the participants' clipped deltas; plus
        each child's pre-clip norm. Sums over disjoint children add up, so the
        client level runs this chunk by chunk."""
        P = topo.levels[d].size
        streamed = {part: delta_N[part] if part in summed[d] else {} for part in PARTS}
        sums = {"delta": tree_ops.weighted_sum(streamed, weight_N, parent_N, P), "dp": {}}
        norms_N = jnp.zeros(weight_N.shape, jnp.float32)
        if dp_levels[d]:
            dp_tree = {"B": delta_N["B"], "K": delta_N["K"] if dp_scope[d] == "all" else {}}
            sums["dp"], norms_N = privacy.clipped_sums(dp_tree, weight_N, parent_N, P, clip_N)
        return sums, norms_N

    def aggregated_parts(d, delta: Params) -> dict:
        """{"B": ..., "K": ...} of a delta, {} for the parts level d does not aggregate."""
        parts = split_parts(delta, spec.key_paths)
        return {part: parts[part] if part in plan.aggregate[d] else {} for part in PARTS}

    def one_client(sent_P: Params, parent, kept: Params, opt_state, tokens, lr, steps):
        """One slot: its federation's broadcast parts (gathered here, per chunk,
        not materialised for every slot) plus the parts the client kept."""
        params = {**jax.tree.map(lambda x: x[parent], sent_P), **kept}
        if not plan.client_opt_persistent:
            opt_state = client_tx.init(params)
        return local_update(params, opt_state, tokens, lr, steps), params

    def client_chunk(sent_P, clip_P, parent_N, kept_N, opt_N, tokens_N, lr_N, steps_N, weight_N, present_N):
        """A chunk of slots: train, check each update (finite, norm), and reduce
        the chunk to per-federation sums; only per-slot scalars (and the parts a
        client keeps, or K for attention) leave the chunk."""
        result, start = jax.vmap(one_client, in_axes=(None, 0, 0, 0, 0, 0, 0))(
            sent_P, parent_N, kept_N, opt_N, tokens_N, lr_N, steps_N)
        update = tree_ops.sub(result.params, start)
        mean_loss = result.loss_sum / jnp.maximum(result.steps, 1.0)
        valid = (tree_ops.row_all_finite(update) & jnp.isfinite(mean_loss)
                 & (tree_ops.row_sq_norms(update) <= spec.max_update_norm ** 2))
        weight = jnp.where(valid & present_N, weight_N, 0.0)
        sums, dp_norm = sum_children(leaf, aggregated_parts(leaf, update), weight, parent_N,
                                     clip_P[parent_N])
        final = split_parts(result.params, spec.key_paths)
        per_slot = dict(loss=mean_loss, tokens=result.tokens, valid=valid, weight=weight, dp_norm=dp_norm,
                        kept={part: final[part] for part in plan.client_keeps},
                        K=final["K"] if leaf_k_attention else {},
                        opt=result.opt_state if plan.client_opt_persistent else ())
        return per_slot, sums

    def client_chunk_if_present(*args):
        """Skip a chunk in which no slot takes part (padding, clients not sampled,
        federations not sampled): its zeros are absent slots to every consumer."""
        present_N = args[-1]
        absent = lambda *a: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(client_chunk, *a))
        return jax.lax.cond(jnp.any(present_N), client_chunk, absent, *args)

    # Skipping pays with small chunks (CPU); with every slot in one vmap (chunk 0,
    # accelerators) a whole device is rarely idle and a conditional would only
    # stand between XLA and the round's fusion.
    run_clients = parallel.map_reduce_clients(client_chunk_if_present if spec.chunk > 0 else client_chunk,
                                              spec.mesh, spec.chunk, n_shared=2)

    def build(st: RoundPolicies):
        """The round's functions for one set of policies (at trace time)."""

        def clip_norm(d, lvl):
            """(P,) the clip norm level d uses this round (inf where no DP)."""
            if not dp_levels[d]:
                return jnp.full((topo.levels[d].size,), jnp.inf, jnp.float32)
            return jnp.where(st.dp_clip_lr[d] > 0, lvl.clip, st.dp_clip[d])

        def aggregate(d, state, kids: "Children", active_P, key):
            """Aggregate level d's children into it; returns new level state and info."""
            lvl = state.levels[d]
            P = topo.levels[d].size
            metrics = {}
            new_B, new_server, new_K, new_clip = lvl.B, lvl.server, lvl.K, lvl.clip
            total_P = jax.ops.segment_sum(kids.weight_N, kids.parent_N, num_segments=P)
            safe_P = jnp.where(total_P > 0, total_P, 1.0)
            mean = jax.tree.map(lambda s: s / tree_ops.expand_rows(safe_P, s), kids.sums["delta"])
            mean_B = mean["B"]
            dp_K = None
            if dp_levels[d]:
                clip_P = clip_norm(d, lvl)
                stats = privacy.dp_stats(kids.dp_norm_N, kids.weight_N, kids.parent_N, P, clip_P)
                noisy = privacy.dp_release(kids.sums["dp"], stats.count_P, clip_P, st.dp_noise[d],
                                           st.dp_expected[d], key)
                if adaptive_levels[d]:
                    participate = (kids.weight_N > 0).astype(jnp.float32)
                    moved = privacy.adaptive_clip_update(
                        privacy.adaptive_clip_init(clip_P), stats.norms_N, participate, kids.parent_N,
                        st.dp_target_quantile[d], st.dp_clip_lr[d], st.dp_count_std[d], jax.random.fold_in(key, 7),
                        expected_count_P=st.dp_expected[d])
                    adaptive = st.dp_clip_lr[d] > 0
                    new_clip = jnp.where(adaptive & active_P & (stats.count_P > 0), moved.clip, lvl.clip)
                    metrics["dp_clip"] = new_clip
                is_dp = (st.dp_noise[d] > 0) | jnp.isfinite(st.dp_clip[d])
                mean_B = tree_ops.where_rows(is_dp, noisy["B"], mean_B)
                if dp_scope[d] == "all":
                    dp_K = (is_dp, noisy["K"])
                metrics["dp_clipped_fraction"] = stats.clipped_fraction_P
            if "B" in plan.aggregate[d]:
                apply = active_P & (total_P > 0)
                new_B, new_server = aggregation.server_update(lvl.B, mean_B, lvl.server, server_txs[d],
                                                              st.server_choice[d], st.server_lr[d], apply)
                metrics["update_norm"] = jnp.sqrt(tree_ops.row_sq_norms(mean_B)) if mean_B else jnp.zeros(P)
            if "K" in plan.aggregate[d] and lvl.K:
                res_mask = residual_masks[d]
                if kids.K_N is None:  # no leaf federation attends: the streamed mean
                    attended = aggregation.mean_keys(lvl.K, mean["K"], total_P, st.attention[d])
                    n_res = 0 if res_mask is None else res_mask.shape[1]
                    info = aggregation.AttentionInfo(None, jnp.zeros((P, n_res)), jnp.zeros(P))
                else:
                    parent_K = None
                    if plan.use_parent and d > 0:
                        parent_K = tree_ops.gather(state.levels[d - 1].K, st.parents[d])
                    attended, info = aggregation.attend_keys(
                        lvl.K, kids.K_N, kids.weight_N, kids.parent_N, st.attention[d], spec.key_groups,
                        plan.similarity, residual_K_M=lvl.residual_K if res_mask is not None else None,
                        residual_mask_PxM=jnp.asarray(res_mask) if res_mask is not None else None,
                        parent_K_P=parent_K, residual_dim=plan.residual_dim)
                if dp_K is not None:
                    is_dp, noisy_K = dp_K
                    stepped = tree_ops.add(lvl.K, tree_ops.scale_rows(st.attention[d].eta, noisy_K))
                    attended = tree_ops.where_rows(is_dp, stepped, attended)
                new_K = tree_ops.where_rows(active_P & (total_P > 0), attended, lvl.K)
                metrics["attention_parent"] = info.parent_weight_P
                metrics["attention_residual"] = (jnp.sum(info.residual_weight_PxM, axis=1)
                                                 if info.residual_weight_PxM.size else jnp.zeros(P))
                if info.residual_weight_PxM.size:
                    metrics["attention_residual_matrix"] = info.residual_weight_PxM
            metrics["participants"] = jax.ops.segment_sum((kids.weight_N > 0).astype(jnp.float32), kids.parent_N,
                                                          num_segments=P)
            return lvl._replace(B=new_B, K=new_K, server=new_server, clip=new_clip), metrics

        def clients_work(d, state: EngineState, batch: RoundBatch, active_P):
            """Client slots train locally from what their federation broadcasts (or what
            they kept); diverged clients are excluded and keep their old state."""
            lvl = state.levels[d]
            metrics = {}
            cid = batch.slot_client
            safe_cid = jnp.maximum(cid, 0)
            sent = {**(lvl.B if "B" in plan.broadcast[d] else {}), **(lvl.K if "K" in plan.broadcast[d] else {})}
            kept = {}
            for part in PARTS:
                if part not in plan.broadcast[d]:
                    kept.update(tree_ops.gather(getattr(state.clients, part), safe_cid))
            opt_state = (tree_ops.gather(state.clients.opt, safe_cid) if plan.client_opt_persistent
                         else jnp.zeros((S,)))
            lr = st.client_lr[st.slot_parent]
            steps = st.steps[st.slot_parent]
            present = (cid >= 0) & active_P[st.slot_parent] & (batch.slot_weight > 0)
            out, sums = run_clients(sent, clip_norm(d, lvl), st.slot_parent, kept, opt_state, batch.tokens, lr,
                                    steps, batch.slot_weight, present)
            weight = out["weight"]
            # clients that keep state write it back (not if diverged or absent)
            keep_rows = jnp.where(out["valid"] & present, cid, topo.n_clients)
            clients = state.clients
            for part in plan.client_keeps:
                kept = {p: getattr(clients, part)[p].at[keep_rows].set(out["kept"][part][p], mode="drop")
                        for p in getattr(clients, part)}
                clients = clients._replace(**{part: kept})
            if plan.client_opt_persistent:
                clients = clients._replace(opt=jax.tree.map(
                    lambda x, y: x.at[keep_rows].set(y, mode="drop"), clients.opt, out["opt"]))
            state = state._replace(clients=clients)
            n_leaf = topo.leaf.size
            metrics["train_loss_sum"] = jax.ops.segment_sum(jnp.where(weight > 0, out["loss"], 0.0),
                                                            st.slot_parent, num_segments=n_leaf)
            metrics["train_clients"] = jax.ops.segment_sum((weight > 0).astype(jnp.float32), st.slot_parent,
                                                           num_segments=n_leaf)
            metrics["tokens"] = jnp.sum(jnp.where(present, out["tokens"], 0.0))
            metrics["diverged"] = jnp.sum((present & ~out["valid"]).astype(jnp.float32))
            kids = Children(weight, st.slot_parent, sums, out["dp_norm"], out["K"] if leaf_k_attention else None)
            return state, metrics, kids

        def federations_work(d, state: EngineState, batch: RoundBatch, active_P, key):
            """Each child federation receives what level d broadcasts, then runs its own
            rounds; afterwards the children share their K as residuals."""
            lvl = state.levels[d]
            child_level = state.levels[d + 1]
            parent = st.parents[d + 1]
            sampled = sample_children(jax.random.fold_in(key, 2_000_003 + d), parent, st.children_per_round[d],
                                      st.poisson_children[d], topo.children_count(d))
            active_child = active_P[parent] & sampled
            for part in PARTS:
                if part in plan.broadcast[d]:
                    sent = tree_ops.gather(getattr(lvl, part), parent)
                    child_level = child_level._replace(
                        **{part: tree_ops.where_rows(active_child, sent, getattr(child_level, part))})
            state = _with_level(state, d + 1, child_level)
            state, metrics = run_rounds(d + 1, state, batch, active_child, key)
            child_level = state.levels[d + 1]
            weight = jnp.where(active_child, st.node_weight[d + 1], 0.0)
            # level d itself does not change while its children run
            delta = aggregated_parts(d, tree_ops.sub({**child_level.B, **child_level.K},
                                                     tree_ops.gather({**lvl.B, **lvl.K}, parent)))
            sums, dp_norm = sum_children(d, delta, weight, parent, clip_norm(d, lvl)[parent])
            if residual_masks[d + 1] is not None:  # children share their K after our round
                state = _with_level(state, d + 1, child_level._replace(
                    residual_K=tree_ops.where_rows(active_child, child_level.K, child_level.residual_K)))
            return state, metrics, Children(weight, parent, sums, dp_norm, child_level.K)

        def fed_round(d, state: EngineState, batch: RoundBatch, active_P, key):
            """One round of every level-d federation with its children."""
            if d == D - 1:
                state, metrics, kids = clients_work(d, state, batch, active_P)
            else:
                state, metrics, kids = federations_work(d, state, batch, active_P, key)
            new_level, agg_metrics = aggregate(d, state, kids, active_P, jax.random.fold_in(key, 1_000_003 + d))
            agg_metrics["rounds"] = active_P.astype(jnp.float32)
            metrics = {**metrics, **{f"level{d}/{k}": v for k, v in agg_metrics.items()}}
            return _with_level(state, d, new_level), metrics

        def run_rounds(d, state, batch, active_parent_P, key):
            """Level-d federations each run their own number of rounds (scan)."""
            def body(state, xs):
                r, sub_batch = xs
                active = active_parent_P & (r < st.rounds[d])
                state, metrics = fed_round(d, state, sub_batch, active, jax.random.fold_in(key, r))
                return state, metrics

            n = level_rounds(topo)[d - 1]
            state, metrics = jax.lax.scan(body, state, (jnp.arange(n), batch))
            return state, _reduce_rounds(metrics)

        return fed_round

    def run_round(stored: EngineState, batch: RoundBatch, key, policies: RoundPolicies | None = None):
        fed_round = build(default_policies if policies is None else policies)
        key = jax.random.fold_in(key, stored.round)
        state, metrics = fed_round(0, unpad_state(spec, stored), batch, jnp.ones((1,), bool), key)
        state = repad_state(spec, state._replace(round=state.round + 1), stored)
        if spec.mesh is not None:  # returned where it came from: round 2 reuses round 1's compilation
            state = jax.lax.with_sharding_constraint(state, state_shardings(spec, state))
            metrics = jax.lax.with_sharding_constraint(metrics, parallel.replicated(spec.mesh))
        return state, metrics

    return run_round


def _with_level(state: EngineState, d: int, level: LevelState) -> EngineState:
    levels = list(state.levels)
    levels[d] = level
    return state._replace(levels=tuple(levels))


_ADDITIVE = ("train_loss_sum", "train_clients", "tokens", "diverged", "rounds", "participants")


def _reduce_rounds(metrics):
    """Nested rounds: counts add up; per-node values average over the rounds
    in which that node was active (its `level{d}/rounds` mask)."""
    out = {}
    for k, v in metrics.items():
        level, _, name = k.rpartition("/")
        if name in _ADDITIVE:
            out[k] = jnp.sum(v, axis=0)
        else:
            active = metrics[f"{level}/rounds"]
            active = active.reshape(active.shape + (1,) * (v.ndim - active.ndim))
            out[k] = jnp.sum(v * active, axis=0) / jnp.maximum(jnp.sum(active, axis=0), 1.0)
    return out


def batch_shape(topology: Topology, batch: int, seq_len: int) -> tuple[int, ...]:
    """Shape of RoundBatch.tokens for this topology."""
    return level_rounds(topology) + (topology.n_slots, local_steps(topology), batch, seq_len + 1)
