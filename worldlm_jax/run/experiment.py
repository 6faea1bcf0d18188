"""A run's experiment: everything built once from a config, and the batches it trains on.

`build_experiment` adds the data and the real parameters to the run's blueprint
(`blueprint.abstract_run`); `make_batch` cuts a root round's participation and
token windows on the host (a pure function of the round index), `_put` places
them on the mesh, `Prefetcher` cuts round r+1's while round r runs. States are
placed (`place_state`) and restored from checkpoints (`restore_state`) as the
round keeps them. `worldlm_jax.train` re-exports all of these.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from worldlm_jax import engine, model as model_lib
from worldlm_jax.config import Config
from worldlm_jax.data import corpus, pipeline
from worldlm_jax.data.federated import RoundSampler, validation_batches
from worldlm_jax.engine import evaluate, parallel, strategies
from worldlm_jax.run import blueprint, communication, distributed
from worldlm_jax.tree.topology import Topology, build_topology


@dataclasses.dataclass
class Experiment:
    """Everything a run needs, built once from a config."""

    config: Config
    topology: Topology  # the user's tree (clients carry their data weights)
    run_topology: Topology  # the tree the strategy trains on
    spec: engine.EngineSpec
    strategy: engine.Strategy
    model_def: Any
    init_params: dict
    sampler: RoundSampler
    batch_size: int
    eval_fn: Callable
    data: pipeline.FederatedData
    mesh: Any
    part_bytes: dict
    first_stage: engine.Strategy | None = None  # staged schedule: rounds before localising K
    # the tree's rules, an input of the round (engine.spec_policies): placed once, replicated
    policies: engine.RoundPolicies | None = None

    def strategy_for(self, round_index: int) -> engine.Strategy:
        staged = self.first_stage is not None and round_index < self.config.algorithm.staged_rounds
        return self.first_stage if staged else self.strategy

    def compiles(self) -> int:
        stages = [self.strategy] + ([self.first_stage] if self.first_stage else [])
        return sum(s.run_round._cache_size() for s in stages)


def build_experiment(config: Config, cache_dir: str = "") -> Experiment:
    """The run's blueprint (`blueprint.abstract_run`) plus its data and real parameters."""
    config.validate()
    topology = build_topology(config.run_tree(), known_sources=corpus.list_sources(), root_policy=config.policy)
    data = pipeline.prepare(topology, config.data.tokenizer, config.data.seq_len, config.data.val_fraction,
                            config.run.seed, config.data.max_bytes_per_source, config.data.data_dir, cache_dir)
    topology = topology.with_client_weights([len(c.train) for c in data.clients])
    run = blueprint.abstract_run(config, topology=topology, vocab=data.tokenizer.vocab_size)
    model_def, params = model_lib.init(run.model_def.config, jax.random.PRNGKey(config.run.seed))
    streams = [c.train for c in data.clients]
    if strategies.get(config.algorithm.name).pooled:
        streams = [np.concatenate(streams)]
    sampler = RoundSampler(streams, config.data.seq_len, config.run.seed)
    eval_tokens = validation_batches([c.validation for c in data.clients], config.data.seq_len,
                                     config.data.eval_batch_size, config.data.eval_batches)
    deploy_index = np.zeros(topology.n_clients, np.int32) if strategies.get(config.algorithm.name).pooled \
        else np.arange(topology.n_clients, dtype=np.int32)
    eval_fn = evaluate.make_evaluator(run.spec, model_def.loss, eval_tokens, deploy_index)
    policies = engine.spec_policies(run.spec)
    if run.spec.mesh is not None:
        policies = jax.device_put(policies, parallel.replicated(run.mesh))
    return Experiment(config, topology, run.run_topology, run.spec, run.strategy, model_def, params, sampler,
                      run.batch_size, eval_fn, data, run.mesh, communication.part_bytes(params, run.spec.key_paths),
                      run.first_stage, policies)


# ---- host-side batches --------------------------------------------------------
def batch_sharding(exp: Experiment):
    """Token blocks (R..., S, E, B, L+1) sharded along the slot axis S (None: one device)."""
    if exp.spec.mesh is None:
        return None
    n_lead = len(engine.level_rounds(exp.run_topology))
    return parallel.NamedSharding(exp.mesh, parallel.P(*([None] * n_lead), parallel.AXIS))


def local_slots(exp: Experiment) -> np.ndarray:
    """The client slots whose token blocks this process feeds: those its own
    devices hold (every slot with one process)."""
    topo = exp.run_topology
    sharding = batch_sharding(exp)
    if sharding is None or sharding.is_fully_addressable:
        return np.arange(topo.n_slots)
    shape = engine.batch_shape(topo, exp.batch_size, exp.config.data.seq_len)
    return distributed.local_rows(sharding, shape, len(engine.level_rounds(topo)))


def make_batch(exp: Experiment, round_index: int, slots: np.ndarray | None = None) -> engine.RoundBatch:
    """Participation and token windows of root round `round_index` (pure function of it).

    Participation (which client sits in which slot, with what weight) covers
    every slot; token windows only `slots` (default: this process's, see
    `local_slots`), so no process cuts the whole round's tokens."""
    topo = exp.run_topology
    slots = local_slots(exp) if slots is None else slots
    nested = engine.level_rounds(topo)
    steps = engine.local_steps(topo)
    clients, weights, tokens = [], [], []
    for salt, _ in enumerate(itertools.product(*[range(r) for r in nested]) if nested else [()]):
        slot_client, slot_weight = pipeline.sample_slots(topo, round_index, salt, exp.config.run.seed)
        clients.append(slot_client)
        weights.append(slot_weight)
        tokens.append(exp.sampler.sample(round_index, slot_client[slots], steps, exp.batch_size, salt=salt))
    shape = tuple(nested)
    stack = lambda xs: np.stack(xs).reshape(shape + xs[0].shape)
    return engine.RoundBatch(stack(tokens), stack(clients), stack(weights))


def _put(exp: Experiment, batch: engine.RoundBatch) -> engine.RoundBatch:
    """Place a host batch from `make_batch`: each device gets its own slots'
    token blocks from its own process; participation is replicated."""
    sharding = batch_sharding(exp)
    if sharding is None:
        return jax.tree.map(jnp.asarray, batch)
    topo = exp.run_topology
    n_lead = len(engine.level_rounds(topo))
    shape = engine.batch_shape(topo, exp.batch_size, exp.config.data.seq_len)
    position = np.full(topo.n_slots, -1, np.int64)
    position[local_slots(exp)] = np.arange(batch.tokens.shape[n_lead])

    def block(index):  # the device's slice of the global array, from this process's slots
        rows = position[np.arange(topo.n_slots)[index[n_lead]]]
        return batch.tokens[index[:n_lead] + (rows,) + index[n_lead + 1:]]

    replicated = parallel.replicated(exp.mesh)
    return engine.RoundBatch(jax.make_array_from_callback(shape, sharding, block),
                             jax.device_put(batch.slot_client, replicated),
                             jax.device_put(batch.slot_weight, replicated))


class Prefetcher:
    """Cuts round r+1's batch on a host thread while round r runs on the device."""

    def __init__(self, exp: Experiment, start: int, stop: int):
        self._exp, self._stop = exp, stop
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._next = self._submit(start)

    def _submit(self, r):
        return self._pool.submit(make_batch, self._exp, r) if r < self._stop else None

    def get(self, r: int) -> engine.RoundBatch:
        batch = self._next.result()
        self._next = self._submit(r + 1)
        return batch

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


def place_state(exp: Experiment, state):
    """Put the state where the round keeps it (federation rows sharded over the
    mesh where a level is wide enough, the rest replicated): equal input
    placements mean one compilation, and checkpoints restore to it."""
    return engine.place_state(exp.spec, state)


def restore_state(exp: Experiment, ckpt, step: int | None = None, like=None):
    """(state, host state) from a checkpoint, placed and structured like a fresh
    state of this experiment (so optax states come back as NamedTuples).

    A wide level's rows are stored padded to a multiple of the device count, so
    a run saved on another number of devices has other row counts: it is read
    as saved and laid out anew (its real rows are the same), so a run resumes
    on any number of devices and processes."""
    from worldlm_jax.outputs.checkpoint import leaf_paths

    like = place_state(exp, exp.strategy.init(exp.init_params)) if like is None else like
    saved = ckpt.saved_shapes(step)
    as_saved = [saved.get(p, x.shape) for p, x in zip(leaf_paths(like), jax.tree.leaves(like))]
    if as_saved == [x.shape for x in jax.tree.leaves(like)]:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        return ckpt.restore(step, abstract_state=abstract)
    shapes = iter(as_saved)
    abstract = jax.tree.map(lambda x: _abstract_rows(exp, x, next(shapes)), like)
    state, host = ckpt.restore(step, abstract_state=abstract)
    relayout = lambda s: engine.pad_state(exp.spec, engine.unpad_state(exp.spec, s, stored=False))
    shardings = jax.tree.map(lambda x: x.sharding, like)
    return jax.jit(relayout, out_shardings=shardings)(state), host


def _abstract_rows(exp: Experiment, like, shape):
    """A leaf as saved: its own row count, sharded along rows only where that
    count divides over this mesh."""
    if tuple(shape) == like.shape or exp.spec.mesh is None:
        return jax.ShapeDtypeStruct(tuple(shape), like.dtype, sharding=like.sharding)
    spec = parallel.row_spec(shape[0], exp.spec.mesh)
    return jax.ShapeDtypeStruct(tuple(shape), like.dtype, sharding=parallel.NamedSharding(exp.spec.mesh, spec))
