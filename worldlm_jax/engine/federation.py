"""A federation's aggregation step: what it makes of its children's updates.

    sum_children       children -> per-federation sums (streamed: chunk by chunk)
    aggregate          one level, from its Children:
      dp_release         clipped, noised sums (DP federations; adaptive clip)
      aggregate_backbone the aggregator's pseudo-gradient through the server optimizer
      aggregate_keys     K by attention over children, residuals and the parent
      update_objective   the client objective's federation state (e.g. SCAFFOLD's c)
      plugin metrics     what the aggregators and the objective report, per federation

Shapes: N children, P federations of the level, (P,) arrays per federation.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from worldlm_jax import tree_ops
from worldlm_jax.engine import aggregation, local_aggregation, parallel, partial_sync
from worldlm_jax.engine.plan import PARTS, Params, split_parts
from worldlm_jax.engine.round_policies import RoundPolicies
from worldlm_jax.engine.state import Children, EngineState, LevelState
from worldlm_jax.engine.statics import RoundStatics
from worldlm_jax.plugins import aggregators, contract, objectives
from worldlm_jax.privacy import mechanism as privacy
from worldlm_jax.tree.policy import K_AGG_MODES


def clip_norm(rs: RoundStatics, st: RoundPolicies, d: int, lvl: LevelState) -> jax.Array:
    """(P,) the clip norm level d uses this round (inf where no DP)."""
    if not rs.dp_levels[d]:
        return jnp.full((rs.topo.levels[d].size,), jnp.inf, jnp.float32)
    return jnp.where(st.dp_clip_lr[d] > 0, lvl.clip, st.dp_clip[d])


def aggregated_parts(rs: RoundStatics, d: int, delta: Params) -> dict:
    """{"B": ..., "K": ...} of a delta, {} for the parts level d does not aggregate."""
    parts = split_parts(delta, rs.spec.key_paths)
    return {part: parts[part] if part in rs.plan.aggregate[d] else {} for part in PARTS}


def _streamed_backbone(rs: RoundStatics, st: RoundPolicies, d: int, delta_B: Params, parent_N) -> Params:
    """Each child's backbone update as its federation's streamed aggregator
    reshapes it (`aggregators.Aggregator.transform`; mean: unchanged)."""
    for k, name in enumerate(rs.aggregator_kinds[d]):
        transform = aggregators.get(name).transform
        if transform is not None and delta_B:
            args_N = {a: v[parent_N] for a, v in st.aggregator_args[d].items()}
            reshaped = transform(delta_B, args_N)
            contract.check_like(_aggregator(name, transform, "transform"), reshaped, delta_B, "delta_N",
                                "transform reshapes each child's update on its own: one row per child, "
                                "each leaf's shape and dtype kept")
            mine = st.aggregator_choice[d][parent_N] == k
            delta_B = tree_ops.where_rows(mine, reshaped, delta_B)
    return delta_B


def _aggregator(name: str, fn, role: str) -> contract.Entry:
    return contract.Entry(aggregators.AGGREGATORS.kind, name, fn, role)


STREAMED_METRICS_RULE = "a streamed aggregator's metrics(delta_N, args_N) returns {name: one value per child}"
STACKED_METRICS_RULE = ("a stacked aggregator's metrics(delta_N, weight_N, parent_N, n_parents, args_P) returns "
                        "{name: one value per federation}")


def participant_sums(values_N: dict, counted_N, parent_N, P: int) -> dict:
    """{name: (P,)} each federation's sum of its counted children's values (`where`:
    an absent child's value may be NaN)."""
    return {m: jax.ops.segment_sum(jnp.where(counted_N, v, 0.0), parent_N, num_segments=P)
            for m, v in values_N.items()}


def _streamed_metric_sums(rs: RoundStatics, st: RoundPolicies, d: int, delta_B: Params, weight_N, parent_N,
                          segments) -> dict:
    """{aggregator: {metric: (P,)}}: the streamed rules' per-child metrics (of the
    updates as the children sent them), summed over each federation's
    participating children that the rule aggregates."""
    out = {}
    for k, name in enumerate(rs.aggregator_kinds[d]):
        rule = aggregators.get(name)
        if rule.streamed and rule.metrics is not None and delta_B:
            args_N = {a: v[parent_N] for a, v in st.aggregator_args[d].items()}
            values = contract.check_metrics(_aggregator(name, rule.metrics, "metrics"), rule.metrics(delta_B, args_N),
                                            weight_N.shape, STREAMED_METRICS_RULE)
            counted = (weight_N > 0) & (st.aggregator_choice[d][parent_N] == k)
            out[name] = participant_sums(values, counted, *segments)
    return out


def sum_children(rs: RoundStatics, st: RoundPolicies, d: int, delta_N: dict, weight_N, parent_N, clip_N,
                 report_N=None, objective_metrics_N=None, segments=None):
    """Per-federation sums over level d's children: the weighted deltas of the
    summed parts, the weighted squared norms of the backbone deltas (their
    spread), the objective's reports, the plug-ins' per-child metrics and, at
    DP levels, the participants' clipped deltas; plus each child's pre-clip
    norm. Sums over disjoint children add up, so the client level runs this
    chunk by chunk. `segments` (row_N, n_rows): the rows the sums go to, where
    they are not the level's federations (`parent_N`, P) themselves: a device's
    own federation rows under a federation-local slot layout; the policies are
    still read at `parent_N`."""
    segment_N, P = (parent_N, rs.topo.levels[d].size) if segments is None else segments
    streamed = {part: delta_N[part] if part in rs.summed[d] else {} for part in PARTS}
    plugin = {"aggregator": _streamed_metric_sums(rs, st, d, streamed["B"], weight_N, parent_N, (segment_N, P))}
    if objective_metrics_N:
        plugin["objective"] = {rs.spec.client_objective: participant_sums(objective_metrics_N, weight_N > 0,
                                                                          segment_N, P)}
    streamed["B"] = _streamed_backbone(rs, st, d, streamed["B"], parent_N)
    sums = {"delta": tree_ops.weighted_sum(streamed, weight_N, segment_N, P), "dp": {},
            # `where`, not a product: an absent row may hold NaN (0 * NaN is NaN)
            "sq_norm": jax.ops.segment_sum(jnp.where(weight_N > 0, weight_N * tree_ops.row_sq_norms(streamed["B"]),
                                                     0.0), segment_N, num_segments=P) if streamed["B"] else jnp.zeros(P),
            "objective": tree_ops.weighted_sum(report_N, weight_N, segment_N, P) if report_N else {},
            "plugin": plugin}
    if rs.spec.param_groups and streamed["B"]:
        sums["sq_norm_groups"] = {
            group: jax.ops.segment_sum(jnp.where(weight_N > 0, weight_N * tree_ops.row_sq_norms(part), 0.0),
                                       segment_N, num_segments=P)
            for group, part in _by_group(rs.spec.param_groups, streamed["B"]).items()}
    norms_N = jnp.zeros(weight_N.shape, jnp.float32)
    if rs.dp_levels[d]:
        dp_tree = released_deltas(rs, st, d, delta_N, parent_N)
        if jax.tree.leaves(dp_tree):  # a level that aggregates nothing releases nothing
            if dp_tree["B"] and dp_tree["K"] and "K" not in rs.plan.broadcast[d]:
                sums["dp"], norms_N = privacy.clipped_part_sums(dp_tree, weight_N, segment_N, P, clip_N)
            else:
                sums["dp"], norms_N = privacy.clipped_sums(dp_tree, weight_N, segment_N, P, clip_N)
    return sums, norms_N


def _by_group(groups, tree: dict) -> dict[str, dict]:
    """{group: the leaves of `tree` in it} (`EngineSpec.param_groups`), groups in sorted order."""
    out: dict[str, dict] = {}
    for path in sorted(tree):
        out.setdefault(groups[path], {})[path] = tree[path]
    return dict(sorted(out.items()))


def released_deltas(rs: RoundStatics, st: RoundPolicies, d: int, delta_N: dict, parent_N) -> dict:
    """{"B": ..., "K": ...}: what level d's DP federations clip and noise. B
    where the level aggregates it; K where it aggregates K and `dp_scope` is
    `all`, as zeros under a federation whose K stays its own (`k_agg: local`
    releases no K, so its children's K deltas must not take clip budget)."""
    if rs.dp_scope[d] != "all" or not delta_N["K"]:
        return {"B": delta_N["B"], "K": {}}
    keeps_own_N = (st.attention[d].mode == K_AGG_MODES.index("local"))[parent_N]
    return {"B": delta_N["B"], "K": tree_ops.where_rows(keeps_own_N, jax.tree.map(jnp.zeros_like, delta_N["K"]),
                                                        delta_N["K"])}


def aggregate(rs: RoundStatics, st: RoundPolicies, d: int, state: EngineState, kids: Children, active_P, key,
              synced=None):
    """Aggregate level d's children into it; returns (new level state, metrics).
    `synced` ({B path: (P,) bool}, `partial_sync`): the backbone moves only where it syncs."""
    lvl = state.levels[d]
    P = rs.topo.levels[d].size
    total_P = jax.ops.segment_sum(kids.weight_N, kids.parent_N, num_segments=P)
    safe_P = jnp.where(total_P > 0, total_P, 1.0)
    mean = jax.tree.map(lambda s: s / tree_ops.expand_rows(safe_P, s), kids.sums["delta"])
    metrics = {}
    dp = None
    if rs.dp_levels[d]:
        dp, new_clip, metrics = dp_release(rs, st, d, lvl, kids, active_P, key)
        lvl = lvl._replace(clip=new_clip)
    if "B" in rs.plan.aggregate[d]:
        lvl, backbone_metrics = aggregate_backbone(rs, st, d, lvl, kids, mean["B"], total_P, active_P, dp, synced)
        metrics.update(backbone_metrics)
    if "K" in rs.plan.aggregate[d] and lvl.K:
        parent_K = None
        if rs.plan.use_parent and d > 0 and kids.K_N is not None:
            parent_K = tree_ops.gather(state.levels[d - 1].K, st.parents[d])
        lvl, key_metrics = aggregate_keys(rs, st, d, lvl, kids, mean["K"], total_P, active_P, dp, parent_K)
        metrics.update(key_metrics)
    if rs.objective.update_federation is not None and d == rs.topo.depth - 1:
        lvl = update_objective(rs, st, lvl, kids.sums["objective"], safe_P, active_P & (total_P > 0))
    metrics["participants"] = jax.ops.segment_sum((kids.weight_N > 0).astype(jnp.float32), kids.parent_N,
                                                  num_segments=P)
    metrics.update(participant_means(rs, st, d, kids.sums["plugin"], metrics["participants"], active_P))
    return lvl, metrics


# ---- plug-in metrics ---------------------------------------------------------------------
def shown_at(rs: RoundStatics, st: RoundPolicies, d: int, active_P):
    """(P,) the federations whose plug-in metrics a round logs: those that ran
    this round and are not DP (a DP federation lets out only its noised
    release, and a plug-in's metric is computed from its children's raw values)."""
    if not rs.dp_levels[d]:
        return active_P
    return active_P & ~((st.dp_noise[d] > 0) | jnp.isfinite(st.dp_clip[d]))


def plugin_metrics(kind: str, name: str, values_P: dict, shown_P) -> dict:
    """{"plugin/<kind>/<name>/<metric>": (P,)} NaN (null in the record) where not shown."""
    return {f"plugin/{kind}/{name}/{m}": jnp.where(shown_P, v, jnp.nan) for m, v in values_P.items()}


def _runs(rs: RoundStatics, st: RoundPolicies, d: int, kind: str, name: str):
    """(P,) the federations that run entry `name` of `kind` (the objective: all of them)."""
    if kind == "aggregator":
        return st.aggregator_choice[d] == rs.aggregator_kinds[d].index(name)
    return jnp.ones(st.aggregator_choice[d].shape, bool)


def participant_means(rs: RoundStatics, st: RoundPolicies, d: int, plugin_sums: dict, participants_P,
                      active_P) -> dict:
    """The per-child plug-in metrics as each federation's mean over its
    participating children (NaN where none took part)."""
    out = {}
    for kind, entries in plugin_sums.items():
        for name, sums in entries.items():
            means = {m: s / jnp.maximum(participants_P, 1.0) for m, s in sums.items()}
            shown = shown_at(rs, st, d, active_P) & (participants_P > 0) & _runs(rs, st, d, kind, name)
            out.update(plugin_metrics(kind, name, means, shown))
    return out


class DpRelease(NamedTuple):
    """What a level's DP federations release this round."""
    is_dp_P: jax.Array  # (P,) the federation clips (and maybe noises): its release replaces the plain mean
    noised_P: jax.Array  # (P,) it adds noise: the release runs at every active round, even with no participant
    mean: dict  # {"B": ..., "K": ...} the noised means of the clipped deltas


def applies(total_P, active_P, dp: DpRelease | None):
    """(P,) where a level's aggregate is applied: active federations that heard
    from a child, and active noised DP federations whatever took part (the
    mechanism the accountant analyses releases every round, an empty sum
    included: skipping it would release "nobody took part" without noise)."""
    heard = total_P > 0
    return active_P & (heard | dp.noised_P) if dp is not None else active_P & heard


def dp_release(rs: RoundStatics, st: RoundPolicies, d: int, lvl: LevelState, kids: Children, active_P, key):
    """The DP federations' noised means of the clipped child deltas. Returns
    (DpRelease, the next clip norm, metrics)."""
    clip_P = clip_norm(rs, st, d, lvl)
    noise_key, count_key = jax.random.split(key)  # the update's noise and the clip count's: never the same draw
    stats = privacy.dp_stats(kids.dp_norm_N, kids.weight_N, kids.parent_N, rs.topo.levels[d].size, clip_P)
    noisy = privacy.dp_release(kids.sums["dp"], stats.count_P, clip_P, st.dp_noise[d], st.dp_expected[d], noise_key)
    metrics = {}
    new_clip = lvl.clip
    if rs.adaptive_levels[d]:
        participate = (kids.weight_N > 0).astype(jnp.float32)
        moved = privacy.adaptive_clip_update(
            privacy.adaptive_clip_init(clip_P), stats.norms_N, participate, kids.parent_N, st.dp_target_quantile[d],
            st.dp_clip_lr[d], st.dp_count_std[d], count_key, expected_count_P=st.dp_expected[d])
        adaptive = st.dp_clip_lr[d] > 0
        # the count is released with noise whoever took part: the clip moves at every active round
        new_clip = jnp.where(adaptive & active_P & ((stats.count_P > 0) | (st.dp_noise[d] > 0)), moved.clip,
                             lvl.clip)
        metrics["dp_clip"] = new_clip
    is_dp = (st.dp_noise[d] > 0) | jnp.isfinite(st.dp_clip[d])
    # the exact clipped fraction is a statistic of the raw updates: a DP federation lets out
    # only the noised one its adaptive clip released (1 - b_hat), and nothing without one
    released = (1.0 - moved.unclipped_fraction) if rs.adaptive_levels[d] else jnp.full_like(clip_P, jnp.nan)
    adaptive_P = (st.dp_clip_lr[d] > 0) if rs.adaptive_levels[d] else jnp.zeros(is_dp.shape, bool)
    metrics["dp_clipped_fraction"] = jnp.where(is_dp, jnp.where(adaptive_P, released, jnp.nan),
                                               stats.clipped_fraction_P)
    return DpRelease(is_dp, st.dp_noise[d] > 0, noisy), new_clip, metrics


def aggregate_backbone(rs: RoundStatics, st: RoundPolicies, d: int, lvl: LevelState, kids: Children, mean_B,
                       total_P, active_P, dp, synced=None):
    """B <- each federation's server optimizer stepped with its aggregator's
    pseudo-gradient (the weighted mean for streamed rules; the DP release at
    DP federations). Returns (level state, metrics)."""
    P = rs.topo.levels[d].size
    metrics = {}
    # where the leaf federations live, a stacked rule sees one device's federations and their slots
    local = d == rs.topo.depth - 1 and local_aggregation.applies(rs.device_rows)
    for k, name in enumerate(rs.aggregator_kinds[d]):
        rule = aggregators.get(name)
        if rule.combine is not None and mean_B:
            combine, report = _checked_combine(name, rule), _checked_stacked_metrics(name, rule)
            if local:
                run = lambda fn: local_aggregation.combine(rs.spec.mesh, rs.device_rows, jnp.asarray(rs.topo.slot_row),
                                                           fn, kids.B_N, kids.weight_N, st.aggregator_args[d], P)
            else:
                run = lambda fn: fn(kids.B_N, kids.weight_N, kids.parent_N, P, st.aggregator_args[d])
            mean_B = tree_ops.where_rows(st.aggregator_choice[d] == k, run(combine), mean_B)
            if rule.metrics is not None:
                metrics.update(plugin_metrics("aggregator", name, run(report),
                                              shown_at(rs, st, d, active_P) & (st.aggregator_choice[d] == k)))
    if dp is not None:
        mean_B = tree_ops.where_rows(dp.is_dp_P, dp.mean["B"], mean_B)
    apply = applies(total_P, active_P, dp)
    new_B, new_server = aggregation.server_update(lvl.B, mean_B, lvl.server, rs.server_txs[d], st.server_choice[d],
                                                  st.server_lr[d], apply)
    if synced is not None:  # the other fragments, and their optimizer state, wait for their turn
        new_B = partial_sync.where_synced(synced, new_B, lvl.B)
        new_server = partial_sync.keep_unsynced(synced, new_server, lvl.server)
    metrics["update_norm"] = jnp.sqrt(tree_ops.row_sq_norms(mean_B)) if mean_B else jnp.zeros(P)
    if mean_B:  # weighted RMS distance of the children's updates from their mean (client drift)
        safe_P = jnp.where(total_P > 0, total_P, 1.0)
        mean_sq = tree_ops.row_sq_norms(jax.tree.map(lambda s: s / tree_ops.expand_rows(safe_P, s),
                                                     kids.sums["delta"]["B"]))
        spread = jnp.sqrt(jnp.maximum(kids.sums["sq_norm"] / safe_P - mean_sq, 0.0))
        # computed from the raw updates: null at a DP federation, which lets out only its release
        hide = (lambda v: jnp.where(dp.is_dp_P, jnp.nan, v)) if dp is not None else (lambda v: v)
        metrics["update_spread"] = hide(spread)
        if "sq_norm_groups" in kids.sums:  # the same, group by group (where a split search probes)
            mean_by_group = _by_group(rs.spec.param_groups, kids.sums["delta"]["B"])
            for group, sq_P in kids.sums["sq_norm_groups"].items():
                mean_sq_g = tree_ops.row_sq_norms(jax.tree.map(lambda s: s / tree_ops.expand_rows(safe_P, s),
                                                               mean_by_group[group]))
                metrics[f"update_spread_group/{group}"] = hide(jnp.sqrt(jnp.maximum(sq_P / safe_P - mean_sq_g,
                                                                                    0.0)))
    return lvl._replace(B=new_B, server=new_server), metrics


def _checked_combine(name: str, rule):
    """A stacked rule's combine, its result checked where it is traced (one row per federation)."""
    def combine(delta_N, weight_N, parent_N, n_parents, args_P):
        combined = rule.combine(delta_N, weight_N, parent_N, n_parents, args_P)
        contract.check_like(_aggregator(name, rule.combine, "combine"), combined, contract.with_rows(delta_N, n_parents),
                            "delta_P", f"combine returns one row per federation (n_parents = {n_parents}), not one "
                            f"per child ({weight_N.shape[0]}), each leaf in the dtype of delta_N")
        return combined
    return combine


def _checked_stacked_metrics(name: str, rule):
    """A stacked rule's metrics, checked where they are traced (one value per federation)."""
    def report(delta_N, weight_N, parent_N, n_parents, args_P):
        return contract.check_metrics(_aggregator(name, rule.metrics, "metrics"),
                                      rule.metrics(delta_N, weight_N, parent_N, n_parents, args_P), (n_parents,),
                                      f"{STACKED_METRICS_RULE} (n_parents = {n_parents})")
    return report


def aggregate_keys(rs: RoundStatics, st: RoundPolicies, d: int, lvl: LevelState, kids: Children, mean_K,
                   total_P, active_P, dp, parent_K):
    """K by attention over the children's K (plus residual candidates and the
    parent's K), or the streamed mean where no leaf federation attends.
    Returns (level state, metrics)."""
    P = rs.topo.levels[d].size
    res_mask = rs.residual_masks[d]
    if kids.K_N is None:  # no leaf federation attends: the streamed mean
        attended = aggregation.mean_keys(lvl.K, mean_K, total_P, st.attention[d])
        n_res = 0 if res_mask is None else res_mask.shape[1]
        info = aggregation.AttentionInfo(None, jnp.zeros((P, n_res)), jnp.zeros(P))
    else:
        args = dict(residual_K_M=lvl.residual_K if res_mask is not None else None,
                    residual_mask_PxM=jnp.asarray(res_mask) if res_mask is not None else None,
                    parent_K_P=parent_K, residual_dim=rs.plan.residual_dim, robust=rs.robust_keys[d],
                    split=parallel.model_size(rs.spec.mesh) > 1)
        if d == rs.topo.depth - 1 and local_aggregation.applies(rs.device_rows):  # where the federations live
            attended, info = local_aggregation.attend_keys(
                rs.spec.mesh, rs.device_rows, jnp.asarray(rs.topo.slot_row), lvl.K, kids.K_N, kids.weight_N,
                st.attention[d], rs.spec.key_groups, rs.plan.similarity, **args)
        else:
            mesh = rs.spec.mesh
            if mesh is not None and kids.weight_N.shape[0] >= mesh.shape[parallel.AXIS] > 1:
                # the children's rows are sharded: their pairwise cosines round the devices, not gathered
                args["child_pairs"] = local_aggregation.sharded_pairs(mesh, args["split"])
            attended, info = aggregation.attend_keys(lvl.K, kids.K_N, kids.weight_N, kids.parent_N, st.attention[d],
                                                     rs.spec.key_groups, rs.plan.similarity, **args)
    keeps_own = st.attention[d].mode == K_AGG_MODES.index("local")
    if dp is not None and rs.dp_scope[d] == "all":  # K released: its noised mean, never attention over raw K
        stepped = tree_ops.add(lvl.K, tree_ops.scale_rows(st.attention[d].eta, dp.mean["K"]))
        attended = tree_ops.where_rows(dp.is_dp_P & ~keeps_own, stepped, attended)
    new_K = tree_ops.where_rows(applies(total_P, active_P, dp) & ~keeps_own, attended, lvl.K)
    residual = info.residual_weight_PxM
    metrics = {"attention_parent": info.parent_weight_P,
               "attention_residual": jnp.sum(residual, axis=1) if residual.size else jnp.zeros(P)}
    if residual.size:
        metrics["attention_residual_matrix"] = residual
    if info.child_entropy_P is not None:  # diagnostics where the children's K were seen
        metrics["attention_entropy"] = info.child_entropy_P
        metrics["child_k_delta_norm"] = info.delta_norm_N
        metrics["child_present"] = (kids.weight_N > 0).astype(jnp.float32)  # what per-child averages count
        if info.child_similarity_NxN is not None:
            metrics["child_similarity"] = info.child_similarity_NxN
    if dp is not None and rs.dp_scope[d] == "all":
        metrics = hide_attention_at_dp(metrics, dp.is_dp_P & ~keeps_own, kids.parent_N)
    return lvl._replace(K=new_K), metrics


def hide_attention_at_dp(metrics: dict, hidden_P, parent_N) -> dict:
    """The attention diagnostics null (NaN) at the federations `hidden_P` whose K is
    released (`dp_scope: all`): they are computed from the children's raw K, and the
    federation lets out only its noised mean (rows and columns of a child of one)."""
    hidden_N = hidden_P[parent_N]
    out = dict(metrics)
    for key, value in metrics.items():
        if key == "child_present":  # the count per-child averages divide by: not a statistic of K
            continue
        if key == "child_similarity":
            out[key] = jnp.where(hidden_N[:, None] | hidden_N[None, :], jnp.nan, value)
        elif key == "child_k_delta_norm":
            out[key] = jnp.where(hidden_N, jnp.nan, value)
        else:  # one value (or one row) per federation
            out[key] = jnp.where(tree_ops.expand_rows(hidden_P, value), jnp.nan, value)
    return out


def update_objective(rs: RoundStatics, st: RoundPolicies, lvl: LevelState, report_sums, safe_P, apply_P):
    """Leaf federations that heard from clients update the objective's state
    from the weighted mean of their reports."""
    mean_report = jax.tree.map(lambda s: s / tree_ops.expand_rows(safe_P, s), report_sums)
    entry = contract.Entry(objectives.OBJECTIVES.kind, rs.spec.client_objective, rs.objective.update_federation,
                           "update_federation")

    def update(state, report, args):  # one federation (vmapped): its own shapes, as the objective sees them
        new = rs.objective.update_federation(state, report, args)
        contract.check_like(entry, new, state, "state",
                            "update_federation returns the federation's new state, shaped like the one it was given")
        return new

    updated = jax.vmap(update)(lvl.objective, mean_report, st.objective_args)
    return lvl._replace(objective=tree_ops.where_rows(apply_P, updated, lvl.objective))
