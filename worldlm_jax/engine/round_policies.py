"""What a round knows before it runs: per-node policy arrays (`RoundPolicies`,
an input of the compiled round, so sweeps vmap over them) and the learning
rates a round actually uses (`scheduled`)."""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from worldlm_jax.engine import aggregation
from worldlm_jax.engine.plan import level_kinds
from worldlm_jax.plugins import aggregators, attacks, objectives, schedules
from worldlm_jax.privacy import mechanism as privacy
from worldlm_jax.tree.policy import TopologyError
from worldlm_jax.tree.topology import Topology


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
    client_schedule: jax.Array  # (n_leaf,) index into the leaf level's client schedule kinds
    server_schedule: tuple  # per level: (n_d,) index into the level's server schedule kinds
    warmup: tuple  # per level: (n_d,) warmup rounds
    decay: tuple  # per level: (n_d,) round the decay ends
    min_lr_ratio: tuple
    aggregator_choice: tuple  # per level: (n_d,) index into the level's aggregator kinds
    aggregator_args: tuple  # per level: {argument: (n_d,)}
    objective_args: dict  # {argument: (n_leaf,)} of the run's client objective
    dropout: jax.Array  # (n_leaf,) probability a sampled client does not report
    stragglers: jax.Array  # (n_leaf,) probability a client stops after a random part of its steps
    attack_choice: jax.Array  # (n_leaf,) index into the leaf level's attack kinds
    attack_args: dict  # {argument: (n_leaf,)}
    attackers: jax.Array  # (n_leaf,) the federation's clients of rank below this attack
    client_rank: jax.Array  # (n_clients,) a client's index within its leaf federation
    sync_fragments: tuple = ()  # per level: (n_d,) fragments its backbone syncs in, one per round in turn
    sync_every: tuple = ()  # per level: {parameter group: (n_d,) rounds between its syncs} (groups some node names)


def round_policies(topo: Topology, total_rounds: int = 1, objective: str = "none") -> "RoundPolicies":
    """The topology's policies as arrays over each level's node axis
    (`total_rounds`: where decays end by default; `objective`: the run's
    client objective, whose arguments each leaf federation sets)."""
    def f32(level, field):
        return jnp.asarray(topo.levels[level].policy_array(field, np.float32))

    D = topo.depth
    expected, per_round = [], []
    for d in range(D):
        count = topo.children_count(d).astype(np.float32)
        if d == D - 1:
            cpr = topo.leaf.policy_array("clients_per_round", np.float32)
            sampled = np.array([p.sampling != "full" for p in topo.leaf.policies])  # under full every client trains
            count = np.where(sampled & (cpr > 0), np.minimum(cpr, count), count)
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
        server_choice=tuple(_choice(topo, d, "server_optimizer") for d in range(D)),
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
        client_schedule=_choice(topo, D - 1, "client_lr_schedule"),
        server_schedule=tuple(_choice(topo, d, "server_lr_schedule") for d in range(D)),
        warmup=tuple(f32(d, "warmup_rounds") for d in range(D)),
        decay=tuple(jnp.asarray(np.where(lvl.policy_array("decay_rounds") > 0, lvl.policy_array("decay_rounds"),
                                         float(total_rounds)), jnp.float32) for lvl in topo.levels),
        min_lr_ratio=tuple(f32(d, "min_lr_ratio") for d in range(D)),
        aggregator_choice=tuple(_choice(topo, d, "aggregator") for d in range(D)),
        aggregator_args=tuple(_named_args(topo, d, "aggregator", aggregators.get) for d in range(D)),
        objective_args=_objective_args(topo, objective),
        dropout=f32(D - 1, "dropout"),
        stragglers=f32(D - 1, "stragglers"),
        attack_choice=_choice(topo, D - 1, "attack"),
        attack_args=_named_args(topo, D - 1, "attack", attacks.get),
        attackers=jnp.asarray([max(p.attackers, math.ceil(p.attacker_fraction * n)) for p, n in
                               zip(topo.leaf.policies, topo.children_count(D - 1))], jnp.float32),
        client_rank=jnp.asarray(_client_rank(topo)),
        sync_fragments=tuple(jnp.asarray(lvl.policy_array("sync_fragments", np.int32)) for lvl in topo.levels),
        sync_every=tuple({group: jnp.asarray([p.sync_every.get(group, 1) for p in lvl.policies], jnp.int32)
                          for group in sorted({g for p in lvl.policies for g in p.sync_every})}
                         for lvl in topo.levels),
    )


def _choice(topo: Topology, level: int, field: str) -> jax.Array:
    """(n_d,) each node's index into its level's kinds of a named rule."""
    kinds = level_kinds(topo, level, field)
    return jnp.asarray([kinds.index(getattr(p, field)) for p in topo.levels[level].policies], jnp.int32)


def _named_args(topo: Topology, level: int, field: str, lookup) -> dict:
    """{argument: (n_d,)} of every argument of the level's named rules in `field`
    (aggregators, attacks): a node's own value, else its rule's default, else 0
    for another rule's argument."""
    policies = topo.levels[level].policies
    declared = lambda p: lookup(getattr(p, field)).args
    names = sorted({a for p in policies for a in declared(p)})
    value = lambda p, a: getattr(p, f"{field}_args").get(a, declared(p).get(a, 0.0))
    return {a: jnp.asarray([value(p, a) for p in policies], jnp.float32) for a in names}


def _client_rank(topo: Topology) -> np.ndarray:
    """Each client's index among its leaf federation's clients."""
    rank = np.zeros(topo.n_clients, np.int32)
    for leaf in range(topo.leaf.size):
        members = np.flatnonzero(topo.client_parent == leaf)
        rank[members] = np.arange(len(members))
    return rank


def _objective_args(topo: Topology, objective: str) -> dict:
    declared = objectives.get(objective).args
    for name, p in zip(topo.leaf.names, topo.leaf.policies):
        unknown = sorted(set(p.objective_args) - set(declared))
        if unknown:
            raise TopologyError(f"federation {name!r}: policy field 'objective_args' = {dict(p.objective_args)}; "
                             f"client objective {objective!r} takes {', '.join(declared) or 'no arguments'}, "
                             f"not {unknown}")
    return {a: jnp.asarray([p.objective_args.get(a, default) for p in topo.leaf.policies], jnp.float32)
            for a, default in declared.items()}


def scheduled(st: "RoundPolicies", round_index, client_kinds: tuple, server_kinds_: tuple) -> "RoundPolicies":
    """The policies with the learning rates of root round `round_index`: each
    federation's rate times its schedule's factor (traced: no recompile)."""
    D = len(st.server_lr)
    factor = lambda kinds, choice, d: schedules.factors(kinds, choice, round_index, st.warmup[d], st.decay[d],
                                                        st.min_lr_ratio[d])
    return st._replace(
        client_lr=st.client_lr * factor(client_kinds, st.client_schedule, D - 1),
        server_lr=tuple(lr * factor(server_kinds_[d], st.server_schedule[d], d) for d, lr in enumerate(st.server_lr)))


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
