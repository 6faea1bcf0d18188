"""A sweep as ONE compiled program: runs batched along a leading sweep axis.

Scalar hyperparameters that live in the round's policies (learning rates,
temperatures, key-layer steps, DP noise) and seeds vary across the points of
a sweep; the tree, model and data shapes do not. Each point's config gives its
own `RoundPolicies` (compiled from its own topology, so per-federation
overrides keep their meaning); they are stacked, and the round is vmapped over
(state, batch, policies, key). Results equal separate runs up to float
tolerance (tests/test_vectorized.py).

What a seed changes: everything it changes in a separate run. Each distinct
`run.seed` gets its own data (`experiment.build_experiment` with that seed: the
document split, tokenizer, validation windows and the clients' data weights),
initial model and round key, and every round each point draws its own host
batch (client sample `slot_client`/`slot_weight` and token windows) from its
own seed and its own topology, exactly as `experiment.make_batch` does for a
separate run; the batches are stacked along the sweep axis (the round is
vmapped with in_axes 0 for the batch). Points with the same seed and sampling
rules share one draw, so a sweep over hyperparameters at one seed stays paired
(same data, same batches); so do the padding points below (copies of the last).

Where the points live: the devices form a 2-D mesh (`sweep`, `clients`)
(`parallel.make_mesh(n, sweep=G)`): G groups of n / G devices. The round is
vmapped with `spmd_axis_name="sweep"`, so everything batched over the points
(state, batch, policies, keys, metrics) is sharded over the groups, and inside
a group the engine runs exactly as a single run on a `clients` mesh of n / G
devices (its client mapping and sharding constraints name only `clients`; the
client slots are padded to a multiple of n / G). So a pod trains G points at
once, each on its own share of devices, in one compilation. The points are
padded with copies of the last one to a multiple of G (their results are
dropped). A point runs on n / G devices where `worldlm train` would use all n:
its clients' sums are split over other devices (another float summation order),
so a point agrees with its separate run up to summation order, not bit for bit;
`--sweep-devices 1` keeps every point on all n devices.

How it composes:
- DP: each point's noise comes from its own round key and its topology's
  policies (calibrated per point under privacy.target_epsilon), and its
  accountant steps with it; its client sample is drawn from its own seed, as
  the accountant's sampling rate assumes.
- NaN rows, diverged clients: the round handles them per point (vmapped, a
  point's rows never mix with another's).
- Padding: client slots padded per group, points padded by copies of the last
  (sharing its draws); neither changes a real point's result.
- Sharding: a point's token windows are sharded over its own group's `clients`
  devices (sweep x clients), its participation replicated within the group.
- Several processes: every process computes; each cuts the token windows of
  only the (point, slot) blocks its own devices hold, participation (small)
  for every point; process 0 writes the points' files.
- Resume: with a checkpoint directory (`worldlm sweep --vectorized`: the
  sweep's DIR/checkpoints) the stacked states and the points' privacy ledgers
  are saved every run.checkpoint_every rounds and at the end; the same sweep
  run again restores the latest step, cuts each point's metrics.jsonl to it and
  goes on, ending as the uninterrupted sweep does (tested bit for bit). Its
  batches are a pure function of (seed, round), so there is no batch-stream
  position to save. A checkpoint of other points (a config that differs beyond
  the resumable keys) or of another layout (other devices or device groups) is
  refused, naming the fix.
Refused, one line each (ValueError naming the field and the fix): points that
differ in anything but policy.*, tree policies and run.seed; in the tree, k_agg,
a named rule, clients_per_round/sampling where they move the client slots,
local_steps/rounds where they change the batch shape or need masked steps the
first point does not compile; seeds whose tokenizers differ in vocabulary size;
algorithm.schedule=staged; run.callbacks (the points run none); run.model_parallel > 1
(the mesh is sweep x clients: no axis left for the weights); an unresolved
algorithm.key_layers.auto (a probe needs a run of its own, `blueprint.abstract_run`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from worldlm_jax import engine
from worldlm_jax.config import Config, save_yaml
from worldlm_jax.data.federated import validation_batches
from worldlm_jax.engine import evaluate, parallel, strategies
from worldlm_jax.privacy import ledger as dp_ledger
from worldlm_jax.run import distributed, experiment, records, loop as run_loop, training as train
from worldlm_jax.tree.topology import Topology, build_topology

SWEEP = parallel.SWEEP_AXIS
NAMED_RULES = ("server_optimizer", "aggregator", "client_lr_schedule", "server_lr_schedule", "attack")
CODEC_FIELDS = ("codec_up", "codec_down", "codec_args")


def _point_topology(exp: experiment.Experiment, config: Config,
                    data_exp: experiment.Experiment | None = None) -> Topology:
    """The tree one sweep point trains on: the compiled experiment's tree shape
    with the point's own policies (DP noise calibrated as a single run would)
    and the client data weights of the point's seed (`data_exp`, default `exp`:
    a seed splits the documents, so the clients' token counts differ with it)."""
    data_exp = exp if data_exp is None else data_exp
    user = build_topology(config.run_tree(), root_policy=config.policy)
    _check_same_clients(exp.topology, user)
    topo = strategies.get(exp.config.algorithm.name).topology(user)
    base = exp.run_topology
    if [lvl.names for lvl in topo.levels] != [lvl.names for lvl in base.levels]:
        raise ValueError("a vectorised sweep may vary only scalar policies and seeds, not the tree")
    for b, t in zip(base.levels, topo.levels):
        if [p.k_agg for p in b.policies] != [p.k_agg for p in t.policies]:
            # k_agg decides what the compiled round keeps per client (attention needs every child's K)
            raise ValueError("a vectorised sweep may not vary k_agg (it shapes the compiled round); "
                             "use `worldlm sweep` to compare key-layer aggregation rules")
        for field in NAMED_RULES:  # each named rule is traced into the round; its arguments may vary
            if [getattr(p, field) for p in b.policies] != [getattr(p, field) for p in t.policies]:
                raise ValueError(f"a vectorised sweep may not vary {field} (each named rule is part of the "
                                 f"compiled round; its numeric arguments may vary); use `worldlm sweep`")
        if [(p.sync_fragments, dict(p.sync_every)) for p in b.policies] != \
                [(p.sync_fragments, dict(p.sync_every)) for p in t.policies]:
            raise ValueError("a vectorised sweep may not vary sync_fragments or sync_every (which part of a "
                             "backbone syncs when is part of the compiled round); use `worldlm sweep`")
        for field in CODEC_FIELDS:  # a codec's arguments shape its messages: both are traced into the round
            if [getattr(p, field) for p in b.policies] != [getattr(p, field) for p in t.policies]:
                raise ValueError(f"a vectorised sweep may not vary {field} (codecs and their arguments are part "
                                 f"of the compiled round); use `worldlm sweep`")
    if any(p.deadline_s > 0 for lvl in topo.levels for p in lvl.policies):
        raise ValueError("a vectorised sweep does not take policy deadline_s (which children are late is part of "
                         "the compiled round); use `worldlm sweep`")
    levels = tuple(dataclasses.replace(b, policies=t.policies) for b, t in zip(base.levels, topo.levels))
    topo = dataclasses.replace(data_exp.run_topology, levels=levels)
    _check_same_batch(base, topo)
    privacy = config.privacy
    if privacy.target_epsilon > 0:
        topo = dp_ledger.calibrate(topo, privacy.target_epsilon, privacy.target_delta, config.run.rounds,
                                   privacy.default_clip, privacy.accountant, privacy.level)
    return topo


def _check_same_clients(first: Topology, point: Topology) -> None:
    """The clients, their sources and splits decide every seed's data: one per sweep."""
    same = (first.client_names == point.client_names and first.client_sources == point.client_sources
            and first.leaf_split == point.leaf_split and np.array_equal(first.client_parent, point.client_parent))
    if not same:
        raise ValueError("a vectorised sweep may vary only the tree's policies, not its clients, sources or "
                         "split (they decide the data); use `worldlm sweep`")


def _check_same_batch(first: Topology, point: Topology) -> None:
    """A point's host batch must fit the round compiled for the first point:
    the same client slots and batch shape, and masked local steps compiled
    wherever a point needs them (`statics.masked_steps`)."""
    if point.n_slots != first.n_slots or not np.array_equal(point.slot_parent, first.slot_parent):
        raise ValueError("a vectorised sweep may not vary policy.clients_per_round or policy.sampling where "
                         "they move the client slots (fixed sampling gives a federation clients_per_round "
                         "slots); use `worldlm sweep`")
    if engine.level_rounds(point) != engine.level_rounds(first) or \
            engine.local_steps(point) != engine.local_steps(first):
        raise ValueError("vectorised sweep points must share the first point's largest policy.local_steps and "
                         "policy.rounds (they shape the round's batch); use `worldlm sweep`")

    def masked(topo: Topology) -> bool:
        leaf = topo.leaf.policies
        return len({p.local_steps for p in leaf}) > 1 or any(p.stragglers > 0 for p in leaf)

    if masked(point) and not masked(first):
        raise ValueError("a vectorised sweep over stragglers or uneven policy.local_steps needs them in its first "
                         "point too (they compile masked local steps); put such a point first")


def _policies(exp: experiment.Experiment, config: Config) -> engine.RoundPolicies:
    """Round policies of one sweep point, on the base experiment's tree shape."""
    return engine.round_policies(_point_topology(exp, config), exp.spec.total_rounds, exp.spec.client_objective)


def check_static(configs: Sequence[Config]) -> None:
    """Everything but policies and the seed must be equal across points."""
    def strip(c: Config):
        return dataclasses.replace(c, policy=configs[0].policy, run=dataclasses.replace(c.run, seed=0),
                                   tree={})
    first = strip(configs[0])
    for c in configs[1:]:
        if strip(c) != first:
            raise ValueError("vectorised sweep points may differ only in policy.* fields, tree policies and "
                             "run.seed; use `worldlm sweep` for anything else")
    if configs[0].algorithm.schedule == "staged":
        raise ValueError("a vectorised sweep is one compiled round; algorithm.schedule=staged needs two "
                         "(global K first); use `worldlm sweep`")
    if configs[0].run.callbacks:  # they would be silently skipped: the points never pass through train.train
        raise ValueError("a vectorised sweep runs no callbacks (its points train as one program), so it refuses "
                         "run.callbacks; set run.callbacks=[] or use `worldlm sweep` without --vectorized")
    if configs[0].run.model_parallel > 1:  # its mesh is (sweep, clients): no axis left for the weights
        raise ValueError(f"a vectorised sweep has no model axis, so it refuses run.model_parallel="
                         f"{configs[0].run.model_parallel}; set run.model_parallel=1 or use `worldlm sweep` "
                         "without --vectorized")


def choose_sweep_devices(n_devices: int, n_points: int, requested: int = 0) -> int:
    """Device groups the points are spread over (the mesh's `sweep` axis).

    `requested` > 0 must divide the device count. Otherwise: the largest divisor
    of the device count that is <= the number of points, so every group has
    at least one point (8 devices: 4 points -> 4 x 2, 3 points -> 2 x 4 with one
    padding point, 16 points -> 8 x 1 with 2 points per device). A point then
    runs on n_devices / groups devices, not on all of them as `worldlm train`
    would (see the module docstring); requested=1 keeps all of them per point."""
    if requested:
        if requested < 1 or n_devices % requested:
            raise ValueError(f"--sweep-devices {requested} must divide the {n_devices} device(s)")
        return requested
    return max(g for g in range(1, min(n_devices, n_points) + 1) if n_devices % g == 0)


def seed_experiment(config: Config, seed: int, share: int) -> experiment.Experiment:
    """`config` as a run with `seed` on `share` devices: what a separate run with
    that seed loads (its document split, tokenizer, validation windows, data
    weights and initial model), built by the same `build_experiment`."""
    run = dataclasses.replace(config.run, seed=seed, devices=share)
    return experiment.build_experiment(dataclasses.replace(config, run=run))


def sweep_experiment(config: Config, n_devices: int, groups: int,
                     alone: experiment.Experiment | None = None) -> experiment.Experiment:
    """The experiment every point shares, on a (`sweep`=groups, `clients`=n/groups) mesh.

    Built as a single run on n / groups devices (so the client slots are padded
    to a multiple of the `clients` axis, not of all devices; `alone`: that run,
    when already built), then moved onto the 2-D mesh (with its round, initial
    state and evaluator). One device: no mesh at all, as a single run."""
    share = n_devices // groups
    exp = seed_experiment(config, config.run.seed, share) if alone is None else alone
    exp = dataclasses.replace(exp, config=config)
    if n_devices == 1:
        return exp
    mesh = parallel.make_mesh(n_devices, sweep=groups)
    spec = dataclasses.replace(exp.spec, mesh=mesh)
    data = config.data
    tokens = validation_batches([c.validation for c in exp.data.clients], data.seq_len, data.eval_batch_size,
                                data.eval_batches)
    return dataclasses.replace(exp, spec=spec, mesh=mesh, strategy=engine.make_strategy(spec),
                               eval_fn=evaluate.make_evaluator(spec, exp.model_def.loss, tokens, _deploy_index(exp)))


def _deploy_index(exp: experiment.Experiment) -> np.ndarray:
    """The engine client whose deployed model each client evaluates (`evaluate.make_evaluator`)."""
    if strategies.get(exp.config.algorithm.name).pooled:
        return np.zeros(exp.topology.n_clients, np.int32)
    return np.arange(exp.topology.n_clients, dtype=np.int32)


def sweep_specs(exp: experiment.Experiment, state_like: engine.EngineState):
    """PartitionSpec of every leaf of the stacked states: `sweep` on the point
    axis, then the single run's own spec (rows over `clients` where wide)."""
    specs = engine.state_partition_specs(exp.spec, state_like)
    return jax.tree.map(lambda p: parallel.P(SWEEP, *p), specs, is_leaf=lambda x: isinstance(x, parallel.P))


def _on_sweep(exp: experiment.Experiment, tree):
    """Put a stacked tree (every leaf's first axis: the points) on the sweep axis."""
    if exp.spec.mesh is None:
        return jax.tree.map(jnp.asarray, tree)
    return jax.device_put(tree, parallel.NamedSharding(exp.mesh, parallel.P(SWEEP)))


def run(configs: Sequence[Config], rounds: int | None = None, sweep_devices: int = 0,
        workdirs: Sequence[str] | None = None, log: Callable[[str], None] | None = None,
        checkpoint_dir: str | None = None):
    """Train every point for `rounds` root rounds in one program.

    `sweep_devices`: device groups (0 = `choose_sweep_devices`). With `workdirs`
    (one per point), each point's dir gets what `train.train` writes for a run:
    config.yaml, metrics.jsonl (per-round records, evaluations), summary.json
    and plots. With `checkpoint_dir` (and workdirs) the sweep checkpoints its
    stacked states under checkpoint_dir/checkpoints and resumes from them (the
    module docstring, Resume).

    Returns (per-point evaluations as dicts, the points' final states stacked,
    number of compilations of the round).
    """
    check_static(configs)
    if workdirs is not None and len(workdirs) != len(configs):
        raise ValueError(f"{len(workdirs)} workdirs for {len(configs)} points")
    t0 = time.perf_counter()
    first = configs[0]
    train.prepare_backend(first.model)
    train.enable_compilation_cache(first.run.compilation_cache)
    n_points = len(configs)
    n_devices = first.run.devices or jax.device_count()
    groups = choose_sweep_devices(n_devices, n_points, sweep_devices)
    padded = list(configs) + [configs[-1]] * (-n_points % groups)
    by_seed = _seed_experiments(first, [c.run.seed for c in padded], n_devices // groups)
    exp = sweep_experiment(first, n_devices, groups, alone=by_seed[first.run.seed])
    if log is not None:
        extra = f" (+{len(padded) - n_points} padding)" if len(padded) > n_points else ""
        log(f"vectorised: {n_points} point(s){extra} on a sweep x clients mesh of "
            f"{groups} x {n_devices // groups} device(s), each point on {n_devices // groups} "
            f"(`worldlm train` would use {n_devices})")
    topologies = [_point_topology(exp, c, by_seed[c.run.seed]) for c in padded]
    points = [_point_experiment(exp, by_seed[c.run.seed], c, t) for c, t in zip(padded, topologies)]
    inputs = _stacked_inputs(exp, padded, topologies, by_seed)
    del by_seed  # the seeds' initial parameters are in the stacked states now
    spmd = None if exp.spec.mesh is None else SWEEP
    step = jax.jit(jax.vmap(engine.make_round(exp.spec), in_axes=(0, 0, 0, 0), spmd_axis_name=spmd),
                   donate_argnums=(0,))
    n_rounds = rounds or first.run.rounds
    accountants = [dp_ledger.make_accountants(t, first.privacy.accountant) for t in topologies[:n_points]]
    ckpt = None
    if checkpoint_dir is not None and workdirs is not None:
        from worldlm_jax.outputs.checkpoint import Checkpointer
        ckpt = Checkpointer(checkpoint_dir, max_to_keep=2)
    inputs, start = _resume(ckpt, inputs, configs, workdirs, accountants, log)
    writers = [] if workdirs is None else [_open_point(d, c, start) for d, c in zip(workdirs, configs)]
    logger = records.RoundLogger(points[:len(writers)], writers, stacked=True)
    try:
        states, evals = _train(exp, points, step, inputs, n_rounds, n_points, logger, accountants, start, ckpt)
    finally:
        if ckpt is not None:
            ckpt.close()
    compiles = step._cache_size()
    wall = time.perf_counter() - t0
    if writers and distributed.is_primary():  # multi-process sweeps: process 0 writes
        for i, (point, config, workdir) in enumerate(zip(points, configs, workdirs)):
            # wall_seconds: of the whole sweep (the points train together)
            summary = records.run_summary(point, config, n_rounds, evals[i], compiles, wall, accountants[i], workdir)
            summary["vectorized"] = {"points": n_points, "index": i,
                                     "mesh": {SWEEP: groups, parallel.AXIS: n_devices // groups}}
            with open(os.path.join(workdir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
            records.write_plots(point, workdir)
    if len(padded) > n_points:
        states = jax.tree.map(lambda x: x[:n_points], states)
    return evals, states, compiles


def _seed_experiments(first: Config, seeds: Sequence[int], share: int) -> dict[int, experiment.Experiment]:
    """{seed: the first point's config run with that seed on `share` devices}: each
    seed's data, once (a point's data depends only on its seed: the points differ
    in nothing else the data pipeline reads, `check_static`). Refuses seeds whose
    tokenizers differ in vocabulary size (one compiled model shape); a seed whose
    data cannot be built fails as its separate run would, naming the seed."""
    by_seed = {}
    for seed in dict.fromkeys(seeds):
        try:
            by_seed[seed] = seed_experiment(first, seed, share)
        except ValueError as e:  # e.g. a seed's split leaves a client too little text: say which seed
            raise ValueError(f"run.seed={seed}: {e}") from e
    model = by_seed[first.run.seed].model_def.config
    for seed, exp in by_seed.items():
        if exp.model_def.config != model:
            raise ValueError(f"run.seed={seed} trains a tokenizer of {exp.model_def.config.vocab_size} pieces, "
                             f"run.seed={first.run.seed} one of {model.vocab_size}: one compiled model needs one "
                             f"vocabulary; use `worldlm sweep` (or data.tokenizer=byte)")
    return by_seed


def _point_experiment(exp: experiment.Experiment, data_exp: experiment.Experiment, config: Config,
                      topology: Topology) -> experiment.Experiment:
    """One point as `make_batch`, the round records and summaries see it: the
    shared program (spec, mesh, strategy) with the point's config and topology
    and its seed's data (sampler, validation streams, bytes per token). Its
    evaluator is `_evaluate_points` (the shared one holds the first seed's windows)."""
    return dataclasses.replace(exp, config=config, run_topology=topology, topology=data_exp.topology,
                               data=data_exp.data, sampler=data_exp.sampler, eval_fn=None)


def _stacked_inputs(exp: experiment.Experiment, padded: Sequence[Config], topologies: Sequence[Topology],
                    by_seed: dict[int, experiment.Experiment]):
    """(states, keys, policies, validation windows) of every point, stacked along
    the sweep axis: stacked on the host, then sent to each group's devices (no
    device holds all points). Initial states from each seed's own parameters."""
    stack = lambda trees: jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)
    policies = _on_sweep(exp, stack([engine.round_policies(t, exp.spec.total_rounds, exp.spec.client_objective)
                                     for t in topologies]))
    keys = _on_sweep(exp, stack([jax.random.PRNGKey(c.run.seed + 1) for c in padded]))
    data = exp.config.data
    windows = {seed: validation_batches([c.validation for c in e.data.clients], data.seq_len,
                                        data.eval_batch_size, data.eval_batches) for seed, e in by_seed.items()}
    eval_tokens = _on_sweep(exp, np.stack([windows[c.run.seed] for c in padded]))
    params = _on_sweep(exp, stack([by_seed[c.run.seed].init_params for c in padded]))
    spmd = None if exp.spec.mesh is None else SWEEP
    init = jax.vmap(exp.strategy.init, spmd_axis_name=spmd)
    if exp.spec.mesh is None:
        return init(params), keys, policies, eval_tokens
    # each point's state is built on its own group of devices, as the round keeps it
    like = jax.eval_shape(exp.strategy.init, jax.tree.map(lambda x: x[0], params))
    shardings = jax.tree.map(lambda p: parallel.NamedSharding(exp.mesh, p), sweep_specs(exp, like),
                             is_leaf=lambda x: isinstance(x, parallel.P))
    return jax.jit(init, out_shardings=shardings)(params), keys, policies, eval_tokens


# ---- host batches: one per point, from its own seed --------------------------------------
def batch_keys(points: Sequence[experiment.Experiment]) -> list[tuple]:
    """What decides a point's host batch besides the round: its seed (data,
    windows, sample) and its leaf federations' sampling rules (the slots and
    the batch shape are the same for every point, `_check_same_batch`). Points
    with one key draw one batch."""
    return [(p.config.run.seed, tuple((q.sampling, q.clients_per_round) for q in p.run_topology.leaf.policies))
            for p in points]


def _token_sharding(exp: experiment.Experiment):
    """Stacked token blocks (P, R..., S, E, B, L+1): points over `sweep`, slots over `clients`."""
    n_lead = len(engine.level_rounds(exp.run_topology))
    return parallel.NamedSharding(exp.mesh, parallel.P(SWEEP, *([None] * n_lead), parallel.AXIS))


def _token_shape(exp: experiment.Experiment, n_points: int) -> tuple[int, ...]:
    return (n_points,) + engine.batch_shape(exp.run_topology, exp.batch_size, exp.config.data.seq_len)


def local_blocks(exp: experiment.Experiment, n_points: int) -> tuple[np.ndarray, np.ndarray]:
    """(points, slots) whose token windows this process cuts: those its own devices
    hold (every point and slot with one process or one device)."""
    if exp.spec.mesh is None:
        return np.arange(n_points), np.arange(exp.run_topology.n_slots)
    sharding, shape = _token_sharding(exp), _token_shape(exp, n_points)
    if sharding.is_fully_addressable:
        return np.arange(n_points), np.arange(exp.run_topology.n_slots)
    n_lead = len(engine.level_rounds(exp.run_topology))
    return distributed.local_rows(sharding, shape, 0), distributed.local_rows(sharding, shape, n_lead + 1)


def host_batch(points: Sequence[experiment.Experiment], round_index: int, local_points: np.ndarray,
               local_slots: np.ndarray) -> engine.RoundBatch:
    """Round `round_index`'s host batch of every point, stacked on a leading point
    axis: each point's participation and token windows exactly as a separate run
    with its seed draws them (`experiment.make_batch` on the point's experiment).
    Participation of every point; token windows of `local_points` x `local_slots`
    only. Points with one `batch_keys` key share one draw."""
    keys = batch_keys(points)
    wanted = {keys[i] for i in local_points}
    drawn = {}
    for point, key in zip(points, keys):
        if key not in drawn:  # participation for all, tokens only where this process feeds them
            drawn[key] = experiment.make_batch(point, round_index, local_slots if key in wanted else local_slots[:0])
    batches = [drawn[key] for key in keys]
    return engine.RoundBatch(np.stack([batches[i].tokens for i in local_points]),
                             np.stack([b.slot_client for b in batches]), np.stack([b.slot_weight for b in batches]))


def put_batch(exp: experiment.Experiment, batch: engine.RoundBatch, local_points: np.ndarray,
              local_slots: np.ndarray) -> engine.RoundBatch:
    """Place a stacked host batch: each device gets its own points' slots' token
    windows from its own process; participation goes to each point's group."""
    if exp.spec.mesh is None:
        return jax.tree.map(jnp.asarray, batch)
    n_points = batch.slot_client.shape[0]
    n_lead = len(engine.level_rounds(exp.run_topology))
    point_at = np.full(n_points, -1, np.int64)
    point_at[local_points] = np.arange(len(local_points))
    slot_at = np.full(exp.run_topology.n_slots, -1, np.int64)
    slot_at[local_slots] = np.arange(len(local_slots))

    def block(index):  # the device's slice of the global array, from this process's blocks
        rows = batch.tokens[point_at[np.arange(n_points)[index[0]]]]
        slots = slot_at[np.arange(exp.run_topology.n_slots)[index[n_lead + 1]]]
        return rows[(slice(None),) + tuple(index[1:n_lead + 1]) + (slots,) + tuple(index[n_lead + 2:])]

    tokens = jax.make_array_from_callback(_token_shape(exp, n_points), _token_sharding(exp), block)
    slot_client, slot_weight = _on_sweep(exp, (batch.slot_client, batch.slot_weight))
    return engine.RoundBatch(tokens, slot_client, slot_weight)


class _Prefetcher:
    """Cuts round r+1's stacked batch on a host thread while round r runs."""

    def __init__(self, draw: Callable[[int], engine.RoundBatch], stop: int, start: int = 0):
        self._draw, self._stop = draw, stop
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._next = self._submit(start)

    def _submit(self, r: int):
        return self._pool.submit(self._draw, r) if r < self._stop else None

    def get(self, r: int) -> engine.RoundBatch:
        batch = self._next.result()
        self._next = self._submit(r + 1)
        return batch

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _evaluate_points(exp: experiment.Experiment):
    """`evaluate(states, windows) -> (P, C)`: every point's deployed models on its
    own seed's validation windows (a seed splits the documents, so each has its
    own), one compiled evaluator for all points."""
    deploy = _deploy_index(exp)

    def one(state, tokens):
        return evaluate.make_evaluator(exp.spec, exp.model_def.loss, tokens, deploy)(state)

    return jax.jit(jax.vmap(one))


def _resume(ckpt, inputs, configs: Sequence[Config], workdirs, accountants: list[dict], log):
    """(inputs with the saved stacked states, the round to start from): the
    sweep's latest checkpoint where there is one, its points' ledgers restored
    into `accountants`; (inputs, 0) where there is none."""
    if ckpt is None or ckpt.latest_step() is None:
        return inputs, 0
    from worldlm_jax.config import load_yaml
    from worldlm_jax.outputs.checkpoint import leaf_paths
    from worldlm_jax.privacy import accounting
    from worldlm_jax.run.dirs import config_changes
    for workdir, config in zip(workdirs, configs):
        saved = os.path.join(workdir, "config.yaml")
        changed = config_changes(load_yaml(saved), config) if os.path.exists(saved) else ["config.yaml missing"]
        if changed:
            raise ValueError(f"{ckpt.directory} holds a sweep whose point {workdir} differs in: "
                             f"{', '.join(changed[:6])}; rerun that sweep, or use another --workdir")
    states = inputs[0]
    saved_shapes = ckpt.saved_shapes()
    if [saved_shapes.get(p) for p in leaf_paths(states)] != [tuple(x.shape) for x in jax.tree.leaves(states)]:
        raise ValueError(f"{ckpt.directory} holds a sweep laid out on other devices (its stacked states have other "
                         "shapes); resume it with the run.devices and --sweep-devices it was saved with")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), states)
    states, host = ckpt.restore(abstract_state=abstract)
    for acc, saved in zip(accountants, host["privacy"]):
        acc.update({name: accounting.FederationAccountant.from_dict(d) for name, d in saved.items()})
    if log is not None:
        log(f"resumed the sweep from round {host['round']}")
    return (states, *inputs[1:]), int(host["round"])


def _train(exp: experiment.Experiment, points: Sequence[experiment.Experiment], step, inputs, n_rounds: int,
           n_points: int, logger: records.RoundLogger, accountants: Sequence[dict], start: int = 0, ckpt=None):
    """The rounds `start`.. of every point, logged to the points' writers (when there
    are any): each round's records, run.eval_every evaluations and the final one;
    checkpointed to `ckpt` (when given) every run.checkpoint_every rounds and at the end.
    Returns (the stacked final states, each point's final evaluation)."""
    states, keys, policies, eval_tokens = inputs
    evaluate_points = _evaluate_points(exp)

    def evaluations():
        nll = np.asarray(evaluate_points(states, eval_tokens))
        return [records.describe_eval(point, row) for point, row in zip(points[:n_points], nll)]

    finite = run_loop.replicated_jit(jax.vmap(run_loop.state_flags(exp.spec.topology)), exp.spec.mesh)
    pending: list[tuple[int, tuple]] = []  # (round, flags): read one round late, as the metrics are

    def check_finite(keep: int):
        while len(pending) > keep:
            r, flags = pending.pop(0)
            _check_points_finite(points[:n_points], r, flags, logger)

    def save(done: int):
        check_finite(keep=0)  # never save a broken state
        logger.flush()
        host = {"round": done, "privacy": [{n: a.to_dict() for n, a in acc.items()} for acc in accountants]}
        ckpt.save(done, states, host, force=True)

    eval_every, checkpoint_every = exp.config.run.eval_every, exp.config.run.checkpoint_every
    local_points, local_slots = local_blocks(exp, len(points))
    prefetch = _Prefetcher(lambda r: host_batch(points, r, local_points, local_slots), n_rounds, start)
    try:
        for r in range(start, n_rounds):
            batch = put_batch(exp, prefetch.get(r), local_points, local_slots)
            states, round_metrics = step(states, batch, keys, policies)
            pending.append((r, finite(states)))
            check_finite(keep=1)
            if not logger.writers:
                continue
            for point, acc in zip(logger.points, accountants):
                dp_ledger.step_all(point.run_topology, acc)
            spent = [records.privacy_spent(point, acc) for point, acc in zip(logger.points, accountants)] \
                if any(accountants) else None
            logger.submit(r, round_metrics, spent)
            done = r + 1
            if eval_every and done % eval_every == 0 and done < n_rounds:
                logger.flush()
                logger.evaluation(r, evaluations())
            if ckpt is not None and checkpoint_every and done % checkpoint_every == 0:
                save(done)
        check_finite(keep=0)
        logger.flush()
        if ckpt is not None and ckpt.latest_step() != n_rounds:
            ckpt.wait()
            if ckpt.latest_step() != n_rounds:
                save(n_rounds)
        evals = evaluations()
        if start < n_rounds:  # (a finished sweep run again: its final evaluation is on file)
            logger.evaluation(n_rounds - 1, evals, final=True)
    finally:
        prefetch.close()
        for writer in logger.writers:
            writer.close()
    return states, evals


def _check_points_finite(points: Sequence[experiment.Experiment], round_index: int, flags,
                         logger: records.RoundLogger) -> None:
    """Stop the sweep at the first round that left a point's state non-finite:
    the rounds logged so far are written (no summary.json: the sweep did not
    finish), and the error names the point, then the round, level and federation
    as a separate run's would (`run_loop.nonfinite_error`). Padding points copy
    the last real one and are not checked."""
    host = [np.asarray(f) for f in flags]  # each (P, n_d)
    for i, point in enumerate(points):
        error = run_loop.nonfinite_error(point.run_topology, round_index, [f[i] for f in host], None)
        if error is not None:
            logger.flush()
            raise run_loop.NonFiniteStateError(f"sweep point {i} (run.seed={point.config.run.seed}): {error}",
                                               error.round, error.level, error.federation)


def _open_point(workdir: str, config: Config, start: int = 0):
    """A point's run dir, its metrics.jsonl cut to the rounds before `start`
    (0: started afresh; a resumed sweep's round)."""
    from worldlm_jax.outputs import metrics as metrics_lib

    if not distributed.is_primary():  # multi-process sweeps: process 0 writes
        return metrics_lib.NullWriter()
    os.makedirs(workdir, exist_ok=True)
    summary = os.path.join(workdir, "summary.json")
    if os.path.exists(summary):  # of an earlier sweep into this dir: not this one's until it finishes
        os.remove(summary)
    save_yaml(config, os.path.join(workdir, "config.yaml"))
    earlier = os.path.exists(os.path.join(workdir, metrics_lib.METRICS_FILE))
    writer = metrics_lib.MetricsWriter(workdir)
    if earlier:
        writer.truncate_after(start - 1)
    return writer
