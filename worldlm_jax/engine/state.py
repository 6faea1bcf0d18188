"""The engine's state (one row per federation and per client), the round's
inputs, and where the state lives on a mesh.

Every leaf of a level's state has one row per node; the clients' kept state
one row per client. `init_state` builds it, the layout functions pad, shard
and place it, and `deployed_params` reads the model a client deploys.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from worldlm_jax import tree_ops
from worldlm_jax.engine import aggregation, links, parallel
from worldlm_jax.engine.plan import PARTS, EngineSpec, Params, residual_mask, server_kinds, split_parts
from worldlm_jax.plugins import objectives, optimizers


class LevelState(NamedTuple):
    B: Params  # (n_d, ...) backbone of each federation at this level
    K: Params  # (n_d, ...) key layers of each federation
    server: tuple  # server optimizer states for B, one per optimizer kind
    residual_K: Params  # (n_d, ...) K as last shared with related federations
    clip: jax.Array  # (n_d,) current DP clip norm (moves only under adaptive clipping)
    objective: Any = {}  # leaf federations: the client objective's federation state (e.g. SCAFFOLD's c)
    up_error: Any = {}  # {part: Params}: what this node's codec left out of its updates (error feedback)
    down_copy: Any = {}  # {part: Params}: the copy its children hold of what it broadcasts through a lossy codec


class ClientState(NamedTuple):
    B: Params  # (n_clients, ...) parts a client keeps ({} when none)
    K: Params
    opt: Any  # client optimizer states when persistent, else ()
    objective: Any = {}  # the client objective's per-client state (e.g. SCAFFOLD's c_i)
    up_error: Any = {}  # {part: Params}: what the client's codec left out of its updates (error feedback)


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
    sums: dict  # per-federation sums: "delta" {B, K}, "dp" {B, K}, "sq_norm", "objective", "plugin" (sum_children)
    dp_norm_N: jax.Array  # (N,) pre-clip norm of each child's update (DP levels)
    K_N: Params | None  # (N, ...) each child's K, where attention needs it; else None
    B_N: Params | None = None  # (N, ...) each child's backbone update, where an aggregator needs them all


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
    objective = objectives.get(spec.client_objective)
    levels = []
    up = [links.level_codecs(topo, d, "up", plan.aggregate[d]) for d in range(topo.depth)]
    for d, lvl in enumerate(topo.levels):
        B = tree_ops.stack_rows(parts["B"], lvl.size)
        K = tree_ops.stack_rows(parts["K"], lvl.size)
        txs = [optimizers.get(name) for name in server_kinds(topo, d)]
        residual = K if residual_mask(topo, d, plan.residuals) is not None else {}
        clip = jnp.asarray(lvl.policy_array("dp_clip", np.float32))
        fed_objective = {}
        if d == topo.depth - 1 and objective.init_federation is not None:
            fed_objective = tree_ops.stack_rows(objective.init_federation(params), lvl.size)
        up_error = links.init_error(up[d - 1], parts, lvl.size) if d > 0 else {}
        down_copy = links.init_copy(links.level_codecs(topo, d, "down", plan.broadcast[d]), parts, lvl.size)
        levels.append(LevelState(B, K, aggregation.init_server_states(txs, B), residual, clip, fed_objective,
                                 up_error, down_copy))
    kept = {part: tree_ops.stack_rows(parts[part], topo.n_clients) if part in plan.client_keeps else {}
            for part in PARTS}
    if plan.personal_keys:  # a personal offset from the federation's K: none yet
        kept["K"] = jax.tree.map(jnp.zeros_like, kept["K"])
    opt = ()
    if plan.client_opt_persistent:
        opt = jax.vmap(optimizers.get(spec.client_optimizer).init)(tree_ops.stack_rows(params, topo.n_clients))
    client_objective = {}
    if objective.init_client is not None:
        client_objective = tree_ops.stack_rows(objective.init_client(params), topo.n_clients)
    client_error = links.init_error(up[-1], parts, topo.n_clients)
    return EngineState(tuple(levels), ClientState(kept["B"], kept["K"], opt, client_objective, client_error),
                       jnp.zeros((), jnp.int32))


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
    """PartitionSpec of every leaf of a (stored) state: rows sharded where wide
    enough, and on a model axis each row's weight split along its largest dimension."""
    k = parallel.model_size(spec.mesh)
    if k == 1:
        specs = _map_rows(spec, lambda x, n, m, mesh: parallel.row_spec(m, mesh), state)
    else:
        specs = _map_rows(spec, lambda x, n, m, mesh: parallel.model_spec(
            x.shape, k, tuple(parallel.row_spec(m, mesh)) or (None,)), state)
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
    """Put a (stored) state where the round keeps it: without a mesh, committed to
    the default device, as a state restored from a checkpoint is (an uncommitted
    fresh state lowers to another program, so a resume would miss the compilation
    cache and compile the round again)."""
    if spec.mesh is None:
        return jax.device_put(state, jax.local_devices()[0])
    return jax.device_put(state, state_shardings(spec, state))


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
    if spec.plan.personal_keys:  # the federation's K plus the client's personal offset
        out.update(tree_ops.add({p: out[p] for p in state.clients.K}, tree_ops.gather(state.clients.K, client_ids)))
    return out
