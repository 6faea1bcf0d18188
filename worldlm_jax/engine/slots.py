"""The client level of a round: client slots train locally and are reduced, chunk
by chunk, to per-federation sums.

A slot holds one sampled client (or padding). It starts from what its leaf
federation broadcasts plus what the client kept, descends the run's client
objective for its federation's local steps, and is checked (finite, norm
bound): a diverged client counts as absent. Only per-slot scalars leave a chunk,
plus what must: the parts a client keeps, each slot's K where its federation
aggregates K with attention, each slot's backbone update where an aggregator
needs them all (`aggregators`), and the objective's per-client state.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from worldlm_jax import tree_ops
from worldlm_jax.engine import aggregation, links, local_aggregation, parallel
from worldlm_jax.engine.client import make_local_update
from worldlm_jax.engine.federation import aggregated_parts, clip_norm, sum_children
from worldlm_jax.engine.plan import PARTS, split_parts
from worldlm_jax.engine.round_policies import RoundPolicies
from worldlm_jax.engine.state import Children, EngineState, RoundBatch
from worldlm_jax.engine.statics import RoundStatics
from worldlm_jax.plugins import attacks, contract, objectives
from worldlm_jax.plugins.objectives import ObjectiveContext


def train_slot(rs: RoundStatics, sent_P, fed_state_P, row, kept, opt_state, client_state, tokens, lr, steps,
               args):
    """One slot: its federation's broadcast parts (gathered here, per chunk, not
    materialised for every slot; `row`: its federation's row of `sent_P`) plus
    the parts the client kept, trained with the run's client objective.
    Returns (ClientResult, start params, objective state)."""
    start = jax.tree.map(lambda x: x[row], sent_P)
    if rs.plan.personal_keys:  # a kept K is the client's offset from its federation's K
        kept = {p: start[p] + v if p in rs.spec.key_paths else v for p, v in kept.items()}
    params = parallel.constrain_model({**start, **kept}, rs.spec.mesh)
    if not rs.plan.client_opt_persistent:
        opt_state = rs.client_tx.init(params)
    objective = rs.objective
    ctx = ObjectiveContext(params, client_state, jax.tree.map(lambda x: x[row], fed_state_P), args)
    objective_fn = None
    if objective.loss is not None:
        objective_fn = lambda p, t: checked_loss(rs, objective.loss(rs.spec.loss_fn, p, t, ctx))
    local_update = make_local_update(rs.spec.loss_fn, rs.client_tx, rs.masked_steps, objective_fn,
                                     lambda tree: parallel.constrain_model(tree, rs.spec.mesh))
    result = local_update(params, opt_state, parallel.constrain_batch(tokens, rs.spec.mesh), lr, steps)
    new_state, report, metrics = client_state, {}, {}
    if objective.after_training is not None:
        new_state, report = checked_after_training(rs, objective.after_training(ctx, result.params, result.steps, lr),
                                                   client_state)
    if objective.metrics is not None:
        metrics = contract.check_metrics(_objective(rs, "metrics"), objective.metrics(ctx, result.params, result.steps,
                                                                                      lr), (), METRICS_RULE)
    return result, params, new_state, report, metrics


LOSS_RULE = "loss returns (the value to differentiate, (the LM loss, its token count)), each a scalar"
AFTER_TRAINING_RULE = "after_training returns (the client's new state, shaped like ctx.client, a report)"
METRICS_RULE = "an objective's metrics(ctx, params, steps, lr) returns {name: one scalar for the client}"


def _objective(rs: RoundStatics, role: str) -> contract.Entry:
    return contract.Entry(objectives.OBJECTIVES.kind, rs.spec.client_objective, getattr(rs.objective, role), role)


def checked_loss(rs: RoundStatics, out):
    """The objective's loss output for one slot, once it is checked (trace time)."""
    entry = _objective(rs, "loss")
    value, aux = contract.check_pair(entry, out, ("value", "(lm_loss, n_tokens)"), LOSS_RULE)
    lm_loss, n_tokens = contract.check_pair(entry, aux, ("lm_loss", "n_tokens"), LOSS_RULE)
    contract.check_scalar(entry, value, "value", LOSS_RULE, floating=True)
    contract.check_scalar(entry, lm_loss, "lm_loss", LOSS_RULE, floating=True)
    contract.check_scalar(entry, n_tokens, "n_tokens", LOSS_RULE)
    return value, (lm_loss, n_tokens)


def checked_after_training(rs: RoundStatics, out, client_state):
    """(new client state, report) of one slot, the state checked against the one
    the client had, where the objective keeps one (otherwise it is dropped)."""
    entry = _objective(rs, "after_training")
    new_state, report = contract.check_pair(entry, out, ("client_state", "report"), AFTER_TRAINING_RULE)
    if rs.objective.init_client is not None:
        contract.check_like(entry, new_state, client_state, "client_state", AFTER_TRAINING_RULE)
    return new_state, report


def attack_updates(rs: RoundStatics, st: RoundPolicies, update_N, parent_N, attacker_N, key_N):
    """Attackers' updates replaced by what their federation's attack sends."""
    if rs.attack_kinds == ("none",):
        return update_N
    parts = split_parts(update_N, rs.spec.key_paths)
    args_N = {a: v[parent_N] for a, v in st.attack_args.items()}
    for k, name in enumerate(rs.attack_kinds):
        if name == "none":
            continue
        sent_B, sent_K = jax.vmap(_checked_attack(name))(parts["B"], parts["K"], key_N, args_N)
        mine = attacker_N & (st.attack_choice[parent_N] == k)
        parts = {"B": tree_ops.where_rows(mine, sent_B, parts["B"]), "K": tree_ops.where_rows(mine, sent_K, parts["K"])}
    return {**parts["B"], **parts["K"]}


ATTACK_RULE = "an attack returns (update_B, update_K) for one client, each shaped like the update it was given"


def _checked_attack(name: str):
    """The attack's `apply` for one client (vmapped), its result checked against
    the client's own update."""
    apply = attacks.get(name).apply
    entry = contract.Entry(attacks.ATTACKS.kind, name, apply)

    def checked(update_B, update_K, key, args):
        sent_B, sent_K = contract.check_pair(entry, apply(update_B, update_K, key, args), ("update_B", "update_K"),
                                             ATTACK_RULE)
        contract.check_like(entry, sent_B, update_B, "update_B", ATTACK_RULE)
        contract.check_like(entry, sent_K, update_K, "update_K", ATTACK_RULE)
        return sent_B, sent_K
    return checked


def train_chunk(rs: RoundStatics, st: RoundPolicies, sent_P, clip_P, fed_state_P, parent_N, row_N, kept_N, opt_N,
                client_state_N, tokens_N, lr_N, steps_N, args_N, attacker_N, key_N, codec_key_N, error_N, weight_N,
                present_N):
    """A chunk of slots: train, let attackers replace their updates, check each
    update (finite, norm), send it through its federation's up codec, and reduce
    the chunk to per-federation sums. The per-federation inputs (`sent_P`,
    `clip_P`, `fed_state_P`) and the sums are indexed by `row_N`, the policies by
    `parent_N` (the same but under a federation-local layout: a device's own rows)."""
    d = rs.topo.depth - 1
    train = lambda *a: train_slot(rs, sent_P, fed_state_P, *a)
    result, start, client_state, report, objective_metrics = jax.vmap(train)(
        row_N, kept_N, opt_N, client_state_N, tokens_N, lr_N, steps_N, args_N)
    update = attack_updates(rs, st, tree_ops.sub(result.params, start), parent_N, attacker_N, key_N)
    mean_loss = result.loss_sum / jnp.maximum(result.steps, 1.0)
    valid = (tree_ops.row_all_finite(update) & jnp.isfinite(mean_loss)
             & (tree_ops.row_sq_norms(update) <= rs.spec.max_update_norm ** 2))
    weight = jnp.where(valid & present_N, weight_N, 0.0)
    delta, error = links.send_up(rs.up_codecs[d], aggregated_parts(rs, d, update), error_N, parent_N,
                                 None if not links.needs_key(rs.up_codecs[d], {}) else codec_key_N)
    sums, dp_norm = sum_children(rs, st, d, delta, weight, parent_N, clip_P[row_N], report, objective_metrics,
                                 segments=(row_N, clip_P.shape[0]))
    final = split_parts(tree_ops.add(start, update) if rs.attack_kinds != ("none",) else result.params,
                        rs.spec.key_paths)
    per_slot = dict(loss=mean_loss, tokens=result.tokens, valid=valid, weight=weight, dp_norm=dp_norm,
                    kept={part: final[part] for part in _written_back(rs.plan)},
                    K=_decoded_K(rs, start, delta, final) if rs.leaf_k_attention else {},
                    B=delta["B"] if rs.stacked[d] else {},
                    opt=result.opt_state if rs.plan.client_opt_persistent else (),
                    objective=client_state if rs.objective.init_client is not None else {},
                    up_error=error)
    if rs.spec.client_metrics:  # what the client sent: its backbone update (after an attack)
        per_slot["update_norm"] = jnp.sqrt(tree_ops.row_sq_norms(split_parts(update, rs.spec.key_paths)["B"]))
    return per_slot, sums


def _decoded_K(rs: RoundStatics, start, delta, final):
    """Each slot's K as its federation decodes it: what the client started from
    plus its decoded update (through `none`: the client's K itself)."""
    if "K" not in links.lossy_parts(rs.up_codecs[rs.topo.depth - 1]):
        return final["K"]
    return tree_ops.add({p: start[p] for p in final["K"]}, delta["K"])


def _skip_if_absent(chunk_fn):
    """Skip a chunk in which no slot takes part (padding, clients not sampled,
    federations not sampled): its zeros are absent slots to every consumer."""
    def run(*args):
        present_N = args[-1]
        absent = lambda *a: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(chunk_fn, *a))
        return jax.lax.cond(jnp.any(present_N), chunk_fn, absent, *args)
    return run


def clients_work(rs: RoundStatics, st: RoundPolicies, state: EngineState, batch: RoundBatch, active_P, key):
    """Client slots train locally from what their federation broadcasts (or what
    they kept); diverged clients are excluded and keep their old state; faults
    (dropout, stragglers, attackers) are drawn from `key`.
    Returns (state with the clients' kept state written back, metrics, Children)."""
    topo, plan = rs.topo, rs.plan
    d = topo.depth - 1
    lvl = state.levels[d]
    cid = batch.slot_client
    safe_cid = jnp.maximum(cid, 0)
    up_keys, down_keys = jnp.zeros((topo.n_slots,)), None  # (a slot's key where no up codec draws: unused)
    if links.needs_key(rs.up_codecs[d], rs.down_codecs[d]):  # split only where a codec draws: else today's keys
        key, up_key, down_key = jax.random.split(key, 3)
        up_keys, down_keys = jax.random.split(up_key, topo.n_slots), links.row_keys(down_key, topo.leaf.size)
    lvl, sent_P = links.broadcast_level(rs.down_codecs[d], plan.broadcast[d], lvl, active_P, down_keys)
    state = state._replace(levels=state.levels[:d] + (lvl,))
    sent = {**sent_P.get("B", {}), **sent_P.get("K", {})}
    kept = {}
    for part in PARTS:
        if part not in plan.broadcast[d] or (part == "K" and plan.personal_keys):
            kept.update(tree_ops.gather(getattr(state.clients, part), safe_cid))
    opt_state = (tree_ops.gather(state.clients.opt, safe_cid) if plan.client_opt_persistent
                 else jnp.zeros((topo.n_slots,)))
    client_state = tree_ops.gather(state.clients.objective, safe_cid)
    error = tree_ops.gather(state.clients.up_error, safe_cid)
    args = {a: v[st.slot_parent] for a, v in st.objective_args.items()}
    sampled = (cid >= 0) & active_P[st.slot_parent] & (batch.slot_weight > 0)
    faults = draw_faults(st, cid, sampled, key)
    present = sampled & ~faults["dropped"]
    # `st` travels as an argument, not in a closure: inside the device map a
    # captured array keeps the outer mesh's sharding type, and a vectorised
    # sweep on a mesh (its policies sharded on the sweep axis) cannot gather it.
    chunk_fn = lambda st_, *a: train_chunk(rs, st_, *a)
    # Skipping pays with small chunks (CPU); with every slot in one vmap (chunk 0,
    # accelerators) a whole device is rarely idle and a conditional would only
    # stand between XLA and the round's fusion.
    chunk_fn = _skip_if_absent(chunk_fn) if rs.spec.chunk > 0 else chunk_fn
    per_federation = (sent, clip_norm(rs, st, d, lvl), lvl.objective)
    if rs.device_rows is None:  # every device reads the level whole and the sums are all-reduced
        run = parallel.map_reduce_clients(chunk_fn, rs.spec.mesh, rs.spec.chunk, n_shared=4)
        row = st.slot_parent
    else:  # federation-local: a device reads and sums into its own federations' rows only
        n_devices, rows_per_device, group = rs.device_rows
        per_federation = parallel.to_device_rows(per_federation, n_devices, rows_per_device, group)
        run = parallel.map_reduce_clients(chunk_fn, rs.spec.mesh, rs.spec.chunk, n_shared=1, n_local=3)
        row = jnp.asarray(topo.slot_row)
    out, sums = run(st, *per_federation, st.slot_parent, row, kept, opt_state, client_state,
                    batch.tokens, st.client_lr[st.slot_parent], faults["steps"], args, faults["attacker"],
                    faults["keys"], up_keys, error, batch.slot_weight, present)
    if rs.device_rows is not None:
        sums = parallel.from_device_rows(sums, topo.leaf.size, rs.device_rows[2])
    state = state._replace(clients=_write_back(rs, state.clients, out, jnp.where(out["valid"] & present, cid,
                                                                                  topo.n_clients)))
    weight = out["weight"]
    n_leaf = topo.leaf.size
    metrics = {
        "train_loss_sum": jax.ops.segment_sum(jnp.where(weight > 0, out["loss"], 0.0), st.slot_parent,
                                              num_segments=n_leaf),
        "train_clients": jax.ops.segment_sum((weight > 0).astype(jnp.float32), st.slot_parent, num_segments=n_leaf),
        "tokens": jnp.sum(jnp.where(present, out["tokens"], 0.0)),
        "diverged": jnp.sum((present & ~out["valid"]).astype(jnp.float32)),
        "dropped": jnp.sum(faults["dropped"].astype(jnp.float32)),
        "stragglers": jnp.sum((present & faults["straggler"]).astype(jnp.float32)),
        "attackers": jnp.sum((present & faults["attacker"]).astype(jnp.float32)),
    }
    if rs.spec.client_metrics:
        metrics.update(client_metrics(topo.n_clients, cid, weight, out))
    kids = Children(weight, st.slot_parent, sums, out["dp_norm"], out["K"] if rs.leaf_k_attention else None,
                    out["B"] if rs.stacked[d] else None)
    return state, metrics, kids


def client_metrics(n_clients: int, cid, weight, out) -> dict:
    """(n_clients,) each client's mean training loss, backbone update norm and
    aggregation weight this round, NaN for a client that did not count (not
    sampled, dropped, diverged, or a padding slot): the weight > 0 of its slot."""
    rows = jnp.where(weight > 0, cid, n_clients)  # out of range: dropped
    per_client = lambda v: jnp.full((n_clients,), jnp.nan, jnp.float32).at[rows].set(v.astype(jnp.float32),
                                                                                      mode="drop")
    return {"clients/train_loss": per_client(out["loss"]), "clients/update_norm": per_client(out["update_norm"]),
            "clients/weight": per_client(weight)}


def draw_faults(st: RoundPolicies, cid, sampled, key) -> dict:
    """Per slot, from the round key: dropped (a sampled client that does not
    report), straggler (stops after a uniform 1..E of its E local steps, so
    its `steps`), attacker (its federation's first clients), and the slot's
    own key for its attack."""
    parent = st.slot_parent
    k_drop, k_straggle, k_part, k_attack = jax.random.split(key, 4)
    S = cid.shape[0]
    dropped = sampled & (jax.random.uniform(k_drop, (S,)) < st.dropout[parent])
    straggler = jax.random.uniform(k_straggle, (S,)) < st.stragglers[parent]
    full = st.steps[parent]
    part = 1 + jnp.floor(jax.random.uniform(k_part, (S,)) * full).astype(full.dtype)
    attacker = (cid >= 0) & (st.client_rank[jnp.maximum(cid, 0)] < st.attackers[parent])
    return {"dropped": dropped, "straggler": straggler, "steps": jnp.where(straggler, jnp.minimum(part, full), full),
            "attacker": attacker, "keys": jax.random.split(k_attack, S)}


def personalize(rs: RoundStatics, st: RoundPolicies, state: EngineState, kids: Children, new_K_P, slot_client):
    """Personal key layers, after the leaf federations updated their K: each
    participating client keeps its own mixture of its siblings' K
    (`aggregation.personal_keys`), stored as its offset from the federation's
    new K; the others keep their offsets (and so follow their federation)."""
    d = rs.topo.depth - 1
    parent = st.slot_parent
    policy = st.attention[d]
    split = parallel.model_size(rs.spec.mesh) > 1
    if local_aggregation.applies(rs.device_rows):  # on each device's own slots and federation rows
        offset = local_aggregation.personal_keys(rs.spec.mesh, rs.device_rows, jnp.asarray(rs.topo.slot_row), kids.K_N,
                                          state.levels[d].K, new_K_P, kids.weight_N, policy.tau[parent],
                                          policy.eta[parent], rs.spec.key_groups, split)
    else:
        mixed = aggregation.personal_keys(kids.K_N, tree_ops.gather(state.levels[d].K, parent), kids.weight_N,
                                          parent, policy.tau[parent], policy.eta[parent], rs.spec.key_groups, split)
        offset = tree_ops.sub(mixed, tree_ops.gather(new_K_P, parent))
    rows = jnp.where(kids.weight_N > 0, slot_client, rs.topo.n_clients)
    K = jax.tree.map(lambda x, y: x.at[rows].set(y.astype(x.dtype), mode="drop"), state.clients.K, offset)
    return state._replace(clients=state.clients._replace(K=K))


def _written_back(plan) -> tuple[str, ...]:
    """The parts a client writes back after training (a personal K is written
    after its federation's aggregation, by `personalize`)."""
    return tuple(p for p in sorted(plan.client_keeps) if not (p == "K" and plan.personal_keys))


def _write_back(rs: RoundStatics, clients, out, rows):
    """Clients that keep state write it back at `rows` (out of range = not: a
    diverged or absent slot leaves its client as it was)."""
    put = lambda old, new: jax.tree.map(lambda x, y: x.at[rows].set(y, mode="drop"), old, new)
    for part in _written_back(rs.plan):
        clients = clients._replace(**{part: put(getattr(clients, part), out["kept"][part])})
    if rs.plan.client_opt_persistent:
        clients = clients._replace(opt=put(clients.opt, out["opt"]))
    if rs.objective.init_client is not None:
        clients = clients._replace(objective=put(clients.objective, out["objective"]))
    if out["up_error"]:
        clients = clients._replace(up_error={**clients.up_error, **put(
            {part: clients.up_error[part] for part in out["up_error"]}, out["up_error"])})
    return clients
