"""A sweep as ONE compiled program: runs batched along a leading sweep axis.

Scalar hyperparameters that live in the round's policies (learning rates,
temperatures, key-layer steps, DP noise) and seeds vary across the points of
a sweep; the tree, model and data shapes do not. Each point's config gives its
own `RoundPolicies` (compiled from its own topology, so per-federation
overrides keep their meaning); they are stacked, and the round is vmapped over
(state, policies, key). All points see the same data batches, so the comparison
between points is paired. Results equal separate runs up to float tolerance.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from worldlm_jax import engine, train
from worldlm_jax.config import Config
from worldlm_jax.topology import build_topology


def _policies(exp: train.Experiment, config: Config) -> engine.RoundPolicies:
    """Round policies of one sweep point, on the base experiment's tree shape."""
    topo = build_topology(config.tree, root_policy=config.policy)
    base = exp.run_topology
    if exp.config.algorithm.name not in ("worldlm", "hierfavg"):
        topo = topo.flattened()
    if [lvl.names for lvl in topo.levels] != [lvl.names for lvl in base.levels]:
        raise ValueError("a vectorised sweep may vary only scalar policies and seeds, not the tree")
    for b, t in zip(base.levels, topo.levels):
        if [p.k_agg for p in b.policies] != [p.k_agg for p in t.policies]:
            # k_agg decides what the compiled round keeps per client (attention needs every child's K)
            raise ValueError("a vectorised sweep may not vary k_agg (it shapes the compiled round); "
                             "use `worldlm sweep` to compare key-layer aggregation rules")
    topo = dataclasses.replace(base, levels=tuple(dataclasses.replace(b, policies=t.policies)
                                                   for b, t in zip(base.levels, topo.levels)))
    return engine.round_policies(topo)


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


def run(configs: Sequence[Config], rounds: int | None = None):
    """Train every point for `rounds` root rounds in one program.

    Returns (per-point evaluations as dicts, number of compilations).
    """
    check_static(configs)
    train.prepare_backend(configs[0].model)
    exp = train.build_experiment(configs[0])
    round_fn = engine.make_round(exp.spec)
    stacked_policies = jax.tree.map(lambda *xs: jnp.stack(xs), *[_policies(exp, c) for c in configs])
    init = lambda seed: exp.strategy.init(_init_params(exp, seed))
    states = jax.tree.map(lambda *xs: jnp.stack(xs), *[init(c.run.seed) for c in configs])
    keys = jnp.stack([jax.random.PRNGKey(c.run.seed + 1) for c in configs])
    # Committed, replicated inputs from the start: the round's outputs are, so
    # the second call reuses the first compilation.
    states, keys, stacked_policies = train.place_state(exp, (states, keys, stacked_policies))
    step = jax.jit(jax.vmap(round_fn, in_axes=(0, None, 0, 0)), donate_argnums=(0,))
    for r in range(rounds or configs[0].run.rounds):
        batch = train._put(exp, train.make_batch(exp, r))
        states, _ = step(states, batch, keys, stacked_policies)
    nll = jax.vmap(exp.eval_fn)(states)
    evals = [train.describe_eval(exp, np.asarray(row)) for row in np.asarray(nll)]
    return evals, states, step._cache_size()


def _init_params(exp: train.Experiment, seed: int):
    from worldlm_jax import model as model_lib
    _, params = model_lib.init(exp.model_def.config, jax.random.PRNGKey(seed))
    return params
