"""A sweep as ONE compiled program: runs batched along a leading sweep axis.

Scalar hyperparameters that live in the round's policies (learning rates,
temperatures, key-layer steps, DP noise) and seeds vary across the points of
a sweep; the tree, model and data shapes do not. Each point's config gives its
own `RoundPolicies` (compiled from its own topology, so per-federation
overrides keep their meaning); they are stacked, and the round is vmapped over
(state, policies, key). All points see the same data batches, so the comparison
between points is paired. Results equal separate runs up to float tolerance.

Where the points live: the devices form a 2-D mesh (`sweep`, `clients`)
(`parallel.make_mesh(n, sweep=G)`): G groups of n / G devices. The round is
vmapped with `spmd_axis_name="sweep"`, so everything batched over the points
(state, policies, keys, metrics) is sharded over the groups, and inside a group
the engine runs exactly as a single run on a `clients` mesh of n / G devices
(its client mapping and sharding constraints name only `clients`; the client
slots are padded to a multiple of n / G). So a pod trains G points at once,
each on its own share of devices, in one compilation. The points are padded
with copies of the last one to a multiple of G (their results are dropped).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from worldlm_jax import distributed, dp_ledger, engine, evaluate, experiment, parallel, records, strategies, train
from worldlm_jax.config import Config, save_yaml
from worldlm_jax.data.federated import validation_batches
from worldlm_jax.topology import Topology, build_topology

SWEEP = parallel.SWEEP_AXIS
NAMED_RULES = ("server_optimizer", "aggregator", "client_lr_schedule", "server_lr_schedule", "attack")


def _point_topology(exp: experiment.Experiment, config: Config) -> Topology:
    """The tree one sweep point trains on: the base experiment's tree shape with
    the point's own policies (DP noise calibrated as a single run would)."""
    topo = build_topology(config.tree, root_policy=config.policy)
    base = exp.run_topology
    topo = strategies.get(exp.config.algorithm.name).topology(topo)
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
        if any(p.stragglers > 0 for p in t.policies) and not any(p.stragglers > 0 for p in b.policies):
            raise ValueError("a vectorised sweep over stragglers needs them in its first point too (stragglers "
                             "compile masked local steps); put the point with stragglers first")
    topo = dataclasses.replace(base, levels=tuple(dataclasses.replace(b, policies=t.policies)
                                                   for b, t in zip(base.levels, topo.levels)))
    privacy = config.privacy
    if privacy.target_epsilon > 0:
        topo = dp_ledger.calibrate(topo, privacy.target_epsilon, privacy.target_delta, config.run.rounds,
                                   privacy.default_clip, privacy.accountant)
    return topo


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


def choose_sweep_devices(n_devices: int, n_points: int, requested: int = 0) -> int:
    """Device groups the points are spread over (the mesh's `sweep` axis).

    `requested` > 0 must divide the device count. Otherwise: the largest divisor
    of the device count that is <= the number of points, so every group has
    at least one point (8 devices: 4 points -> 4 x 2, 3 points -> 2 x 4 with one
    padding point, 16 points -> 8 x 1 with 2 points per device)."""
    if requested:
        if requested < 1 or n_devices % requested:
            raise ValueError(f"--sweep-devices {requested} must divide the {n_devices} device(s)")
        return requested
    return max(g for g in range(1, min(n_devices, n_points) + 1) if n_devices % g == 0)


def sweep_experiment(config: Config, n_devices: int, groups: int) -> experiment.Experiment:
    """The experiment every point shares, on a (`sweep`=groups, `clients`=n/groups) mesh.

    Built as a single run on n / groups devices (so the client slots are padded
    to a multiple of the `clients` axis, not of all devices), then moved onto
    the 2-D mesh (with its round, initial state and evaluator). One device: no
    mesh at all, as a single run."""
    share = n_devices // groups
    exp = experiment.build_experiment(dataclasses.replace(config, run=dataclasses.replace(config.run, devices=share)))
    exp = dataclasses.replace(exp, config=config)
    if n_devices == 1:
        return exp
    mesh = parallel.make_mesh(n_devices, sweep=groups)
    spec = dataclasses.replace(exp.spec, mesh=mesh)
    data = config.data
    tokens = validation_batches([c.validation for c in exp.data.clients], data.seq_len, data.eval_batch_size,
                                data.eval_batches)
    deploy_index = np.zeros(exp.topology.n_clients, np.int32) if strategies.get(config.algorithm.name).pooled \
        else np.arange(exp.topology.n_clients, dtype=np.int32)
    return dataclasses.replace(exp, spec=spec, mesh=mesh, strategy=strategies.make_strategy(spec),
                               eval_fn=evaluate.make_evaluator(spec, exp.model_def.loss, tokens, deploy_index))


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
        workdirs: Sequence[str] | None = None, log: Callable[[str], None] | None = None):
    """Train every point for `rounds` root rounds in one program.

    `sweep_devices`: device groups (0 = `choose_sweep_devices`). With `workdirs`
    (one per point), each point's dir gets what `train.train` writes for a run:
    config.yaml, metrics.jsonl (per-round records, evaluations), summary.json
    and plots (no checkpoints).

    Returns (per-point evaluations as dicts, the points' final states stacked,
    number of compilations of the round).
    """
    check_static(configs)
    if workdirs is not None and len(workdirs) != len(configs):
        raise ValueError(f"{len(workdirs)} workdirs for {len(configs)} points")
    t0 = time.perf_counter()
    first = configs[0]
    train.prepare_backend(first.model)
    n_points = len(configs)
    n_devices = first.run.devices or jax.device_count()
    groups = choose_sweep_devices(n_devices, n_points, sweep_devices)
    exp = sweep_experiment(first, n_devices, groups)
    padded = list(configs) + [configs[-1]] * (-n_points % groups)
    if log is not None:
        extra = f" (+{len(padded) - n_points} padding)" if len(padded) > n_points else ""
        log(f"vectorised: {n_points} point(s){extra} on a sweep x clients mesh of "
            f"{groups} x {n_devices // groups} device(s)")
    topologies = [_point_topology(exp, c) for c in padded]
    policies, keys, states = _stacked_inputs(exp, padded, topologies)
    spmd = None if exp.spec.mesh is None else SWEEP
    step = jax.jit(jax.vmap(engine.make_round(exp.spec), in_axes=(0, None, 0, 0), spmd_axis_name=spmd),
                   donate_argnums=(0,))
    n_rounds = rounds or first.run.rounds
    points = [dataclasses.replace(exp, run_topology=t) for t in topologies[:n_points]]
    writers = [] if workdirs is None else [_open_point(d, c) for d, c in zip(workdirs, configs)]
    accountants = [dp_ledger.make_accountants(t, first.privacy.accountant) for t in topologies[:n_points]]
    logger = records.RoundLogger(points[:len(writers)], writers, stacked=True)
    states, evals = _train(exp, step, (states, keys, policies), n_rounds, n_points, logger, accountants)
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


def _stacked_inputs(exp: experiment.Experiment, padded: Sequence[Config], topologies: Sequence[Topology]):
    """(policies, keys, initial states) of every point, stacked along the sweep axis:
    stacked on the host, then sent to each group's devices (no device holds all points)."""
    stack = lambda trees: jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)
    policies = _on_sweep(exp, stack([engine.round_policies(t, exp.spec.total_rounds, exp.spec.client_objective)
                                     for t in topologies]))
    keys = _on_sweep(exp, stack([jax.random.PRNGKey(c.run.seed + 1) for c in padded]))
    by_seed = {seed: _init_params(exp, seed) for seed in dict.fromkeys(c.run.seed for c in padded)}
    params = _on_sweep(exp, stack([by_seed[c.run.seed] for c in padded]))
    del by_seed
    spmd = None if exp.spec.mesh is None else SWEEP
    init = jax.vmap(exp.strategy.init, spmd_axis_name=spmd)
    if exp.spec.mesh is None:
        return policies, keys, init(params)
    # each point's state is built on its own group of devices, as the round keeps it
    like = jax.eval_shape(exp.strategy.init, jax.tree.map(lambda x: x[0], params))
    shardings = jax.tree.map(lambda p: parallel.NamedSharding(exp.mesh, p), sweep_specs(exp, like),
                             is_leaf=lambda x: isinstance(x, parallel.P))
    return policies, keys, jax.jit(init, out_shardings=shardings)(params)


def _train(exp: experiment.Experiment, step, inputs, n_rounds: int, n_points: int, logger: records.RoundLogger,
           accountants: Sequence[dict]):
    """The rounds of every point, logged to the points' writers (when there are any):
    each round's records, run.eval_every evaluations and the final one.
    Returns (the stacked final states, each point's final evaluation)."""
    states, keys, policies = inputs
    evaluate_points = jax.jit(jax.vmap(exp.eval_fn))

    def evaluations():
        return [records.describe_eval(exp, row) for row in np.asarray(evaluate_points(states))[:n_points]]

    eval_every = exp.config.run.eval_every
    prefetch = experiment.Prefetcher(exp, 0, n_rounds)
    try:
        for r in range(n_rounds):
            batch = experiment._put(exp, prefetch.get(r))
            states, round_metrics = step(states, batch, keys, policies)
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
        logger.flush()
        evals = evaluations()
        logger.evaluation(n_rounds - 1, evals, final=True)
    finally:
        prefetch.close()
        for writer in logger.writers:
            writer.close()
    return states, evals


def _open_point(workdir: str, config: Config):
    """A point's run dir, started afresh (a vectorised sweep does not resume)."""
    from worldlm_jax import metrics as metrics_lib

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
        writer.truncate_after(-1)
    return writer


def _init_params(exp: experiment.Experiment, seed: int):
    from worldlm_jax import model as model_lib
    _, params = model_lib.init(exp.model_def.config, jax.random.PRNGKey(seed))
    return params
