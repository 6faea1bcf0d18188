"""The hierarchical round: one jitted function for all levels of the tree.

Every strategy (FedAvg, HierFAVG, FedPer, Local, Centralised, WorldLM, or one
registered by a user) is the same nested loop with a different `Plan`: which
parameter parts (B = backbone, K = key layers) are broadcast down each edge of
the tree, which are aggregated at each level, which a client keeps between
rounds, and whose copy a client deploys. The map of one root round:

    run_round                      policies at this round (`policy_arrays.scheduled`: learning-rate schedules)
      fed_round(level 0)
        federations_work(d)        broadcast to the child federations (through the level's down
                                     codecs, `links`), which each run
          run_rounds(d + 1)          their own `rounds` rounds (scan) of fed_round(d + 1)
        | slots.clients_work       (lowest federations) client slots train with the client
                                     objective, vmapped / sharded and reduced chunk by chunk
                                     to per-federation sums (`federation.sum_children`)
          (either way)               the children's updates go up through the level's up codecs
        federation.aggregate(d)    DP release; B through the federation's aggregator and
                                     server optimizer; K through attention over children,
                                     residuals and the parent; the objective's state

Plug-in points (each a registry of named entries, see docs/extending.md):
optimizers (client and server), schedules, client objectives, aggregators,
simulated attacks, codecs, strategies (plan + tree), and run-loop callbacks. What a
registered function returns is checked where it is called, at trace time
(`plugins.contract`): a wrong shape is one line naming the entry.

Autonomous federations with different rules share one compiled program:
their policies are arrays over the level's node axis, fewer rounds or steps
are masked iterations, named rules (optimizers, schedules, aggregators) are
each traced once and selected per node, and a node's state changes only where
it is active.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from worldlm_jax import tree_ops
from worldlm_jax.engine import links, parallel, partial_sync, round_policies as policy_arrays, slots
from worldlm_jax.engine.federation import aggregate, aggregated_parts, clip_norm, sum_children
from worldlm_jax.engine.plan import PARTS, EngineSpec, level_rounds, local_steps
from worldlm_jax.engine.round_policies import RoundPolicies, round_policies, sample_children
from worldlm_jax.engine.state import (Children, EngineState, LevelState, RoundBatch, init_state, repad_state,
                                      state_shardings, unpad_state)
from worldlm_jax.engine.statics import RoundStatics, round_statics
from worldlm_jax.tree.topology import Topology

__all__ = ["Strategy", "make_strategy", "make_round", "spec_policies", "fed_round", "federations_work", "run_rounds",
           "batch_shape"]


class Strategy(NamedTuple):
    """Pure functions, in the manner of optax: init, then run_round repeatedly."""

    init: Callable  # (params) -> EngineState
    run_round: Callable  # (EngineState, RoundBatch, key) -> (EngineState, metrics)


def make_strategy(spec: EngineSpec, jit: bool = True) -> Strategy:
    """The round of `spec` (jitted, its state donated) and its initial state."""
    run_round = make_round(spec)
    if jit:
        run_round = jax.jit(run_round, donate_argnums=(0,))
    return Strategy(init=lambda params: init_state(spec, params), run_round=run_round)


def make_round(spec: EngineSpec) -> Callable:
    """Build `run_round(state, batch, key, policies=None) -> (state, metrics)` (not jitted).

    `policies` (a RoundPolicies pytree, default: the topology's) is an input,
    not a constant, so a sweep can vmap one compiled round over stacked
    learning rates, temperatures or noise multipliers."""
    rs = round_statics(spec)
    default_policies = spec_policies(spec)

    def run_round(stored: EngineState, batch: RoundBatch, key, policies: RoundPolicies | None = None):
        st = default_policies if policies is None else policies
        st = policies_at(rs, st, stored.round)
        key = jax.random.fold_in(key, stored.round)
        ordinal = jnp.reshape(stored.round, (1,)) if any(rs.partial_sync_levels) else None
        state, metrics = fed_round(rs, st, 0, unpad_state(spec, stored), batch, jnp.ones((1,), bool), key, ordinal)
        metrics = {**metrics, **learning_rate_metrics(rs, st)}
        state = repad_state(spec, state._replace(round=state.round + 1), stored)
        if spec.mesh is not None:  # returned where it came from: round 2 reuses round 1's compilation
            state = jax.lax.with_sharding_constraint(state, state_shardings(spec, state))
            metrics = jax.lax.with_sharding_constraint(metrics, parallel.replicated(spec.mesh))
        return state, metrics

    return run_round


def spec_policies(spec: EngineSpec) -> RoundPolicies:
    """The tree's rules of `spec` as the round's `policies` input. A run passes them
    as an argument rather than letting the round close over them: as constants they
    would be part of the program, so every learning rate, temperature, noise
    multiplier or round count would compile (and cache) a program of its own."""
    return round_policies(spec.topology, spec.total_rounds, spec.client_objective)


def policies_at(rs: RoundStatics, st: RoundPolicies, round_index) -> RoundPolicies:
    """The policies of root round `round_index`: learning rates on their schedules."""
    return policy_arrays.scheduled(st, round_index, rs.client_schedules, rs.server_schedules)


def learning_rate_metrics(rs: RoundStatics, st: RoundPolicies) -> dict:
    """The learning rates this round used: client (leaf federations), server (every level)."""
    D = rs.topo.depth
    return {f"level{D - 1}/client_lr": st.client_lr,
            **{f"level{d}/server_lr": st.server_lr[d] for d in range(D)}}


def fed_round(rs: RoundStatics, st: RoundPolicies, d: int, state: EngineState, batch: RoundBatch, active_P, key,
              ordinal_P=None):
    """One round of every level-d federation with its children. The round's
    key is split, never folded with constants: the children's work and the
    level's aggregation draw from keys no other draw of the round uses.
    `ordinal_P` (where some level syncs part of its backbone): each federation's
    round counted over the run, which picks the part it syncs (`partial_sync`)."""
    work_key, aggregate_key = jax.random.split(key)
    synced = None
    if rs.partial_sync_levels[d]:
        synced = partial_sync.synced(rs.spec, state.levels[d].B, st.sync_fragments[d], st.sync_every[d], ordinal_P)
    if d == rs.topo.depth - 1:
        state, metrics, kids = slots.clients_work(rs, st, state, batch, active_P, work_key)
    else:
        state, metrics, kids = federations_work(rs, st, d, state, batch, active_P, work_key, ordinal_P, synced)
    new_level, agg_metrics = aggregate(rs, st, d, state, kids, active_P, aggregate_key, synced)
    if d == rs.topo.depth - 1 and rs.plan.personal_keys:
        state = slots.personalize(rs, st, state, kids, new_level.K, batch.slot_client)
    agg_metrics["rounds"] = active_P.astype(jnp.float32)
    metrics = {**metrics, **{f"level{d}/{k}": v for k, v in agg_metrics.items()}}
    return _with_level(state, d, new_level), metrics


def federations_work(rs: RoundStatics, st: RoundPolicies, d: int, state: EngineState, batch: RoundBatch, active_P,
                     key, ordinal_P=None, synced=None):
    """Each child federation receives what level d broadcasts, then runs its own
    rounds; afterwards the children share their K as residuals. With `synced`
    ({B path: (P,) bool}, `partial_sync`) only each federation's part of this
    round goes down and comes up.
    Returns (state, the children's metrics, Children)."""
    topo, plan = rs.topo, rs.plan
    lvl = state.levels[d]
    child_level = state.levels[d + 1]
    parent = st.parents[d + 1]
    up_keys, down_keys = None, None
    if links.needs_key(rs.up_codecs[d], rs.down_codecs[d]):  # split only where a codec draws: else today's keys
        key, up_key, down_key = jax.random.split(key, 3)
        up_keys, down_keys = links.row_keys(up_key, parent.shape[0]), links.row_keys(down_key, topo.levels[d].size)
    sample_key, rounds_key = jax.random.split(key)
    sampled = sample_children(sample_key, parent, st.children_per_round[d], st.poisson_children[d],
                              topo.children_count(d))
    active_child = active_P[parent] & sampled
    metrics_here = {}
    if rs.spec.on_time:  # a child late by its parent's deadline is left out, counted like a dropout
        on_time = jnp.asarray(rs.spec.on_time[d + 1])
        late = active_child & ~on_time
        metrics_here[f"level{d}/late"] = jax.ops.segment_sum(late.astype(jnp.float32), parent,
                                                             num_segments=topo.levels[d].size)
        active_child = active_child & on_time
    held = lvl.down_copy
    lvl, sent_P = links.broadcast_level(rs.down_codecs[d], plan.broadcast[d], lvl, active_P, down_keys)
    if synced is not None:  # the children's copy of a fragment moves only in its turn
        lvl = lvl._replace(down_copy=partial_sync.in_turn(synced, lvl.down_copy, held))
    state = _with_level(state, d, lvl)
    synced_N = None if synced is None else {path: m[parent] for path, m in synced.items()}
    received = {}  # what the children start from: their parent's parts as they decoded them
    for part in PARTS:
        if part in plan.broadcast[d]:
            sent = tree_ops.gather(sent_P[part], parent)
            received.update(sent)
            updated = tree_ops.where_rows(active_child, sent, getattr(child_level, part))
            if part == "B" and synced_N is not None:  # a fragment goes down only in its turn
                updated = partial_sync.where_synced(synced_N, updated, child_level.B)
            child_level = child_level._replace(**{part: updated})
    state = _with_level(state, d + 1, child_level)
    state, metrics = run_rounds(rs, st, d + 1, state, batch, active_child, rounds_key, ordinal_P)
    child_level = state.levels[d + 1]
    weight = jnp.where(active_child, st.node_weight[d + 1], 0.0)
    # level d itself does not change while its children run
    start = tree_ops.gather({**lvl.B, **lvl.K}, parent)
    if links.lossy_parts(rs.down_codecs[d]):
        start = {**start, **received}
    delta = aggregated_parts(rs, d, tree_ops.sub({**child_level.B, **child_level.K}, start))
    send_up = lambda delta_, error_: links.send_up(rs.up_codecs[d], delta_, error_, parent, up_keys)
    if synced_N is None:
        delta, error = send_up(delta, child_level.up_error)
    else:  # and comes up only in its turn: the other fragments' drift (and unsent error) stays with the child
        delta, error = partial_sync.send_up_in_turn(send_up, synced_N, delta, child_level.up_error)
    if error:  # a child that took part keeps what its codec left out
        child_level = child_level._replace(up_error={**child_level.up_error, **{
            part: tree_ops.where_rows(active_child, e, child_level.up_error[part]) for part, e in error.items()}})
    sums, dp_norm = sum_children(rs, st, d, delta, weight, parent, clip_norm(rs, st, d, lvl)[parent])
    if rs.residual_masks[d + 1] is not None:  # children share their K after our round
        child_level = child_level._replace(
            residual_K=tree_ops.where_rows(active_child, child_level.K, child_level.residual_K))
    state = _with_level(state, d + 1, child_level)
    K_N = child_level.K
    if "K" in links.lossy_parts(rs.up_codecs[d]):  # the K a federation attends to is the one it decoded
        K_N = tree_ops.add({p: start[p] for p in child_level.K}, delta["K"])
    return state, {**metrics, **metrics_here}, Children(weight, parent, sums, dp_norm, K_N,
                                                       delta["B"] if rs.stacked[d] else None)


def run_rounds(rs: RoundStatics, st: RoundPolicies, d: int, state: EngineState, batch: RoundBatch,
               active_parent_P, key, parent_ordinal_P=None):
    """Level-d federations each run their own number of rounds (scan); a
    federation's r-th round in its parent's round n is its round n x rounds + r."""
    def body(state, xs):
        r, sub_batch, round_key = xs
        active = active_parent_P & (r < st.rounds[d])
        ordinal = None if parent_ordinal_P is None else parent_ordinal_P[st.parents[d]] * st.rounds[d] + r
        return fed_round(rs, st, d, state, sub_batch, active, round_key, ordinal)

    n = level_rounds(rs.topo)[d - 1]
    state, metrics = jax.lax.scan(body, state, (jnp.arange(n), batch, jax.random.split(key, n)))
    return state, _reduce_rounds(metrics)


def _with_level(state: EngineState, d: int, level: LevelState) -> EngineState:
    levels = list(state.levels)
    levels[d] = level
    return state._replace(levels=tuple(levels))


_ADDITIVE = ("train_loss_sum", "train_clients", "tokens", "diverged", "rounds", "participants", "dropped",
             "stragglers", "attackers", "child_present", "late")


_PER_CHILD = ("child_similarity", "child_k_delta_norm")  # indexed by the level's children, not its nodes


def _reduce_rounds(metrics):
    """Nested rounds: counts add up; per-node values average over the rounds
    in which that node was active (its `level{d}/rounds` mask); per-child
    diagnostics over the rounds in which that child took part (a pair's
    similarity: in which both did; `level{d}/child_present`); plug-in metrics
    and per-client values over the rounds that have one (NaN: none)."""
    out = {}
    for k, v in metrics.items():
        # "level1/update_spread" and "level1/update_spread_group/block0_attn" are level1's
        level, _, name = k.partition("/") if k.startswith("level") else k.rpartition("/")
        if k.startswith("clients/") or "/plugin/" in k:
            out[k] = _mean_of_present(v)
        elif name in _ADDITIVE:
            out[k] = jnp.sum(v, axis=0)
        elif name in _PER_CHILD:
            present = metrics[f"{level}/child_present"]  # (rounds, N)
            if v.ndim == 3:  # (rounds, N, N)
                present = present[:, :, None] * present[:, None, :]
            out[k] = jnp.sum(v * present, axis=0) / jnp.maximum(jnp.sum(present, axis=0), 1.0)
        else:
            active = metrics[f"{level}/rounds"]
            active = active.reshape(active.shape + (1,) * (v.ndim - active.ndim))
            out[k] = jnp.sum(v * active, axis=0) / jnp.maximum(jnp.sum(active, axis=0), 1.0)
    return out


def _mean_of_present(v):
    """The mean over the leading (rounds) axis of the values that are not NaN; NaN where all are."""
    present = ~jnp.isnan(v)
    count = jnp.sum(present, axis=0)
    total = jnp.sum(jnp.where(present, v, 0.0), axis=0)
    return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)


def batch_shape(topology: Topology, batch: int, seq_len: int) -> tuple[int, ...]:
    """Shape of RoundBatch.tokens for this topology."""
    return level_rounds(topology) + (topology.n_slots, local_steps(topology), batch, seq_len + 1)
