"""The run loop: build an experiment from a config, train it, evaluate it.

Orchestration only (no math): the host samples clients, cuts batches for the
next round while the current one runs, logs metrics fetched asynchronously,
runs callbacks, checkpoints, and resumes. All numerics live in the one jitted
round function.

This module is also the package's entry point: `worldlm_jax.train(config,
workdir, callbacks=...)` calls `train` below (see `_CallableModule`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import math
import os
import re
import signal
import sys
import time
import types
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from worldlm_jax import blueprint, communication, distributed, dp_ledger, engine, evaluate, model as model_lib
from worldlm_jax import parallel, strategies
from worldlm_jax import privacy
from worldlm_jax import callbacks as callbacks_lib
from worldlm_jax.config import Config, save_yaml
from worldlm_jax.data import corpus, pipeline
from worldlm_jax.data.federated import RoundSampler, validation_batches
from worldlm_jax.topology import Topology, build_topology


@dataclasses.dataclass
class Experiment:
    """Everything a run needs, built once from a config."""

    config: Config
    topology: Topology  # the user's tree (clients carry their data weights)
    run_topology: Topology  # the tree the strategy trains on
    spec: engine.EngineSpec
    strategy: strategies.Strategy
    model_def: Any
    init_params: dict
    sampler: RoundSampler
    batch_size: int
    eval_fn: Callable
    data: pipeline.FederatedData
    mesh: Any
    part_bytes: dict
    first_stage: strategies.Strategy | None = None  # staged schedule: rounds before localising K

    def strategy_for(self, round_index: int) -> strategies.Strategy:
        staged = self.first_stage is not None and round_index < self.config.algorithm.staged_rounds
        return self.first_stage if staged else self.strategy

    def compiles(self) -> int:
        stages = [self.strategy] + ([self.first_stage] if self.first_stage else [])
        return sum(s.run_round._cache_size() for s in stages)


def build_experiment(config: Config, cache_dir: str = "") -> Experiment:
    """The run's blueprint (`blueprint.abstract_run`) plus its data and real parameters."""
    config.validate()
    topology = build_topology(config.tree, known_sources=corpus.list_sources(), root_policy=config.policy)
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
    return Experiment(config, topology, run.run_topology, run.spec, run.strategy, model_def, params, sampler,
                      run.batch_size, eval_fn, data, run.mesh, communication.part_bytes(params, run.spec.key_paths),
                      run.first_stage)


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
    from worldlm_jax.checkpoint import leaf_paths

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


# ---- summaries ------------------------------------------------------------------
def describe_eval(exp: Experiment, nll_C: np.ndarray) -> dict:
    """Per-client mean NLL (nats/token) -> perplexity per federation and overall,
    token-weighted (every client is evaluated on the same number of tokens)."""
    feds = exp.topology.federation_of_client()
    per_fed = {}
    for name in dict.fromkeys(feds):
        members = [i for i, f in enumerate(feds) if f == name]
        per_fed[name] = float(np.exp(np.mean(nll_C[members])))
    mean_nll = float(np.mean(nll_C))
    bpb = mean_nll / math.log(2) / exp.data.bytes_per_token
    return {"perplexity": float(np.exp(mean_nll)), "nll": mean_nll, "bits_per_byte": bpb,
            "per_federation": per_fed}


def per_federation(metrics: dict, key: str, names, static) -> dict[str, float]:
    """{federation: value} of a per-federation round metric, or the `static`
    policy values when the round does not report it. A level that runs nested
    rounds may report one row per round: the last row is what the round ended with.
    Values are written as the shortest decimal of their own dtype, so a float32
    rate of 3e-3 reads 0.003 (as the static policy value does), not 0.0030000000260."""
    if key not in metrics:
        return dict(zip(names, map(float, static)))
    values = np.asarray(metrics[key]).reshape(-1, len(names))[-1]
    return {name: float(str(value)) for name, value in zip(names, values)}


def round_record(exp: Experiment, round_index: int, metrics: dict, seconds: float) -> dict:
    """Plain-Python metrics of one round (after an async device fetch).

    client_lr / server_lr are the rates this round used (the engine's
    `level{d}/client_lr` and `level{d}/server_lr` metrics, which schedules
    move), falling back to the policies' static rates when it reports none."""
    topo = exp.run_topology
    leaf = topo.leaf.names
    loss = np.asarray(metrics["train_loss_sum"]) / np.maximum(np.asarray(metrics["train_clients"]), 1)
    record = {"round": round_index, "seconds": seconds, "train_loss": float(np.mean(loss)),
              "train_loss_per_federation": dict(zip(leaf, map(float, loss))),
              "tokens": float(metrics["tokens"]), "tokens_per_s": float(metrics["tokens"]) / max(seconds, 1e-9),
              "diverged_clients": float(metrics["diverged"]),
              "client_lr": per_federation(metrics, f"level{topo.depth - 1}/client_lr", leaf,
                                          [p.client_lr for p in topo.leaf.policies]),
              "server_lr": {name: lr for d, lvl in enumerate(topo.levels)
                            for name, lr in per_federation(metrics, f"level{d}/server_lr", lvl.names,
                                                           [p.server_lr for p in lvl.policies]).items()}}
    for key, value in metrics.items():
        if key.startswith("level"):
            record[key] = np.asarray(value).tolist()
    participants = {d: np.asarray(metrics[f"level{d}/participants"]) for d in range(exp.run_topology.depth)}
    plan = exp.spec.plan
    if exp.strategy_for(round_index) is not exp.strategy:
        algo = exp.config.algorithm
        plan = strategies.global_stage_plan(exp.run_topology.depth, algo.residuals, algo.similarity, algo.use_parent)
    record["bytes_communicated"] = communication.round_bytes(exp.run_topology, plan, exp.part_bytes,
                                                             participants)
    return record


def prepare_backend(model_config: model_lib.ModelConfig) -> None:
    """XLA flags the model's numerics need, set before JAX starts its backends where possible."""
    if model_config.matmul_dtype == "bfloat16" and not parallel.configure_cpu_bf16_matmuls() \
            and jax.default_backend() == "cpu":
        warnings.warn(f"model.matmul_dtype=bfloat16 on CPU runs its backward products in float32 unless "
                      f"XLA_FLAGS contains {model_lib.CPU_BF16_XLA_FLAG} before JAX starts; results are "
                      f"the same, only slower.", stacklevel=3)


_DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"
_warned_devices = False


def configure_devices() -> None:
    """On CPU, one XLA device per core: clients are sharded one device per core,
    1.4x a single multi-threaded device (benchmarks/RESULTS.md).

    XLA reads the count once, when JAX starts its backends, so `worldlm` and
    `train` call this first. It touches only the host platform (accelerators are
    unaffected), and an XLA_FLAGS that already sets a count wins. When JAX has
    already started with fewer CPU devices than cores (and not because XLA_FLAGS
    asked for that many), warns once how to get one device per core."""
    global _warned_devices
    from jax._src import xla_bridge  # no public API says whether the backends have started

    cores = os.cpu_count() or 1
    if not xla_bridge.backends_are_initialized():
        parallel.configure_cpu_devices(cores)
        return
    asked = re.search(rf"{_DEVICE_COUNT_FLAG}=(\d+)", os.environ.get("XLA_FLAGS", ""))
    have = jax.local_device_count()
    if _warned_devices or jax.default_backend() != "cpu" or have >= cores or (asked and int(asked[1]) == have):
        return
    _warned_devices = True
    warnings.warn(f"JAX started with {have} CPU device(s) on this {cores}-core machine before worldlm_jax could "
                  f"ask for one per core, so clients share {have} device(s) (one per core trains about 1.4x "
                  f"faster); call worldlm_jax.train before anything uses JAX, or set "
                  f"XLA_FLAGS=--{_DEVICE_COUNT_FLAG}={cores} before JAX starts", stacklevel=3)


def check_resumable(workdir: str, config: Config) -> None:
    """ConfigError naming the differing fields when `workdir` holds checkpoints of
    a run with another config (only sweep.RESUMABLE_KEYS, such as run.rounds, may
    change): resuming it would silently mix hyper-parameters."""
    from worldlm_jax import sweep

    sweep.check_resumable(workdir, config)


def train(config: Config | str, workdir: str, quiet: bool = False, progress: bool = True,
          callbacks=()) -> dict:
    """Train (or resume) the run in `workdir`; returns the summary (also written).

    `config`: a Config, a preset name or a YAML path. `callbacks`: Callback
    instances (or registered names) run after those named in run.callbacks.
    Refuses (ConfigError) a workdir whose checkpoints belong to another config.
    """
    from worldlm_jax import checkpoint, configs, metrics as metrics_lib, plugins

    configure_devices()
    if isinstance(config, str):
        config = configs.load(config)
    plugins.load_all(config.plugins)  # a config built in this process has them; one read elsewhere may not
    hooks = callbacks_lib.build(config, callbacks)
    check_resumable(workdir, config)
    os.makedirs(workdir, exist_ok=True)
    prepare_backend(config.model)
    if config.run.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", config.run.compilation_cache)
    # Multi-process runs: every process computes, process 0 alone writes files and prints.
    primary = distributed.is_primary()
    if primary:
        save_yaml(config, os.path.join(workdir, "config.yaml"))
    t0 = time.perf_counter()
    exp = build_experiment(config)
    say = (lambda *a: None) if quiet or not primary else print
    say(exp.run_topology.summary())

    state = place_state(exp, exp.strategy.init(exp.init_params))
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=2)
    start = 0
    writer = metrics_lib.MetricsWriter(workdir) if primary else metrics_lib.NullWriter()
    if ckpt.latest_step() is not None:
        state, host = restore_state(exp, ckpt, like=state)
        start = int(host["round"])
        writer.truncate_after(start - 1)
        say(f"resumed from round {start}")
    accountants = dp_ledger.make_accountants(exp.run_topology, config.privacy.accountant)
    if start:
        for name, saved in host.get("privacy", {}).items():
            accountants[name] = privacy.FederationAccountant.from_dict(saved)
    host_state = lambda r: {"round": r, "privacy": {n: a.to_dict() for n, a in accountants.items()}}
    rounds = config.run.rounds
    key = jax.random.PRNGKey(config.run.seed + 1)
    prefetch = Prefetcher(exp, start, rounds)
    # lag 1 dispatches round r+1 before reading round r's metrics (the device never
    # waits on logging); callbacks must see round r before round r+1 starts, so
    # they read each round as it ends. The records are the same either way.
    fetcher = metrics_lib.AsyncFetcher(lag=0 if hooks else 1)
    stop = {"now": False}
    stopped_by: list[str] = []  # callbacks that asked to stop
    old_handler = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):  # finish the round, checkpoint, exit cleanly
        stop["now"] = True

    try:
        signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not in the main thread
        pass
    bar = None
    if progress and not quiet and primary:
        from tqdm import tqdm
        bar = tqdm(total=rounds, initial=start, unit="round", dynamic_ncols=True)
    r = start
    evaluated = -1  # the round count at the last eval_every evaluation
    clock = {"last": time.perf_counter()}
    privacy_after: dict = {}

    def log(done):
        # Converting round r's metrics waits for round r to finish (at lag 1, round
        # r+1 is already queued), so the gap between conversions is the round time.
        for rec_round, m in done:
            m = jax.tree.map(np.asarray, m)
            now = time.perf_counter()
            rec = round_record(exp, rec_round, m, now - clock["last"])
            if rec_round in privacy_after:
                rec["privacy"] = privacy_after.pop(rec_round)
            clock["last"] = now
            writer.write(rec)
            stopped_by.extend(callbacks_lib.notify(hooks, "on_round_end", rec_round, rec))
            if bar is not None:
                bar.set_postfix(loss=f"{rec['train_loss']:.3f}", ppl=f"{math.exp(min(rec['train_loss'], 50)):.1f}",
                                tok_s=f"{rec['tokens_per_s']:.0f}")

    try:
        while r < rounds and not distributed.any_process(stop["now"] or bool(stopped_by)):
            if config.privacy.target_epsilon > 0:
                over = dp_ledger.exceeding(exp.run_topology, accountants, config.privacy.target_epsilon)
                if over:
                    say(f"stopping before round {r}: it would exceed the privacy budget epsilon="
                        f"{config.privacy.target_epsilon} of federation(s) {', '.join(over)}")
                    break
            batch = _put(exp, prefetch.get(r))
            state, round_metrics = exp.strategy_for(r).run_round(state, batch, key)
            done = fetcher.submit((r, round_metrics))
            dp_ledger.step_all(exp.run_topology, accountants)
            if accountants:  # (epsilon, delta) per federation after every round
                privacy_after[r] = {name: {"epsilon": rep["epsilon"], "delta": rep["delta"]}
                                    for name, rep in dp_ledger.report(exp.run_topology, accountants).items()}
            log(done)
            r += 1
            if bar is not None:
                bar.update(1)
            if config.run.eval_every and r % config.run.eval_every == 0 and r < rounds:
                evaluation = describe_eval(exp, np.asarray(exp.eval_fn(state)))
                writer.write({"round": r - 1, "eval": evaluation})
                stopped_by.extend(callbacks_lib.notify(hooks, "on_eval_end", r - 1, evaluation))
                evaluated = r
            if config.run.checkpoint_every and r % config.run.checkpoint_every == 0:
                log(fetcher.flush())
                ckpt.save(r, state, host_state(r), force=True)
        log(fetcher.flush())
        if ckpt.latest_step() != r:
            ckpt.save(r, state, host_state(r), force=True)
        ckpt.wait()
    finally:
        prefetch.close()
        if bar is not None:
            bar.close()
        try:
            signal.signal(signal.SIGINT, old_handler)
        except ValueError:
            pass
    final = describe_eval(exp, np.asarray(exp.eval_fn(state)))
    writer.write({"round": r - 1, "eval": final, "final": True})
    if evaluated != r:  # callbacks saw this state's evaluation already otherwise
        callbacks_lib.notify(hooks, "on_eval_end", r - 1, final)
    writer.close()
    ckpt.close()
    if primary:
        write_plots(exp, workdir)
    summary = {
        "algorithm": config.algorithm.name,
        "rounds_completed": r,
        "interrupted": r < rounds,
        **({"stopped_by": ", ".join(dict.fromkeys(stopped_by))} if stopped_by and r < rounds else {}),
        "eval": final,
        "compiles": exp.compiles(),
        "wall_seconds": time.perf_counter() - t0,
        "topology": {"depth": exp.run_topology.depth, "clients": exp.topology.n_clients,
                     "slots": exp.run_topology.n_slots, "padding_fraction": exp.run_topology.padding_fraction},
        "parameters": int(sum(np.prod(v.shape) for v in exp.init_params.values())),
        "bytes_communicated": _total_bytes(os.path.join(workdir, "metrics.jsonl")) if primary else {},
        "privacy": dp_ledger.report(exp.run_topology, accountants),
        "key_layer_parameters": int(sum(np.prod(exp.init_params[p].shape) for p in exp.spec.key_paths)),
    }
    if primary:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    if not quiet and primary:
        print(format_table(summary))
    return summary


def write_plots(exp: Experiment, workdir: str) -> list[str]:
    """DIR/plots: perplexity per federation over rounds, and the attention
    weights each federation gave its candidates in the last round."""
    from worldlm_jax import plots
    from worldlm_jax.metrics import read_metrics

    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    out = os.path.join(workdir, "plots")
    os.makedirs(out, exist_ok=True)
    written = [plots.plot_perplexity(records, os.path.join(out, "perplexity.png"))]
    last = next((rec for rec in reversed(records) if "train_loss" in rec), None)
    for d, level in enumerate(exp.run_topology.levels):
        matrix = (last or {}).get(f"level{d}/attention_residual_matrix")
        if matrix is None:
            continue
        residual = np.asarray(matrix)
        parent = np.asarray(last.get(f"level{d}/attention_parent", np.zeros(len(residual))))[:, None]
        children = np.clip(1.0 - residual.sum(1, keepdims=True) - parent, 0.0, 1.0)
        weights = np.concatenate([children, residual, parent], axis=1)
        columns = ["own children", *level.names, "parent"]
        written.append(plots.plot_attention({f"level {d}": weights}, {f"level {d}": (list(level.names), columns)},
                                            os.path.join(out, f"attention_level{d}.png")))
    return written


def _total_bytes(metrics_path: str) -> dict:
    """Sum of the per-round byte counts in metrics.jsonl, per level and overall."""
    from worldlm_jax.metrics import read_metrics

    total: dict = {}
    for rec in read_metrics(metrics_path):
        for level, value in rec.get("bytes_communicated", {}).items():
            if isinstance(value, dict):
                total[level] = total.get(level, 0.0) + value["total"]
            else:
                total[level] = total.get(level, 0.0) + value
    return total


def format_table(summary: dict) -> str:
    ev = summary["eval"]
    width = max(len(n) for n in ev["per_federation"]) + 2
    lines = [f"{summary['algorithm']}: {summary['rounds_completed']} rounds, "
             f"{summary['wall_seconds']:.0f} s, {summary['compiles']} compilation(s)",
             f"{'federation':<{width}} perplexity"]
    lines += [f"{name:<{width}} {ppl:10.3f}" for name, ppl in ev["per_federation"].items()]
    lines.append(f"{'overall':<{width}} {ev['perplexity']:10.3f}   ({ev['bits_per_byte']:.3f} bits/byte)")
    return "\n".join(lines)


class _CallableModule(types.ModuleType):
    """`worldlm_jax.train(config, workdir, ...)` calls `train` above. A function
    named `train` in the package would be replaced by this module the first time
    anything imports it (`from worldlm_jax import train as train_lib`), so the
    module itself is made callable: both spellings keep working."""

    def __call__(self, config: Config | str, workdir: str, **kwargs) -> dict:
        return train(config, workdir, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
