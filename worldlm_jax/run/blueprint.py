"""What a run is made of, from its config alone: no data read, nothing allocated.

`abstract_run(config)` compiles the tree, sizes the model (abstract parameters),
picks the strategy's tree and plan, the key layers, the mesh and the
`EngineSpec`, and builds the jitted round. `experiment.build_experiment` adds the
data (client weights, the tokenizer's vocabulary, token streams) and real
parameters on top; `memory_plan` sizes a run from it before any data exists.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from worldlm_jax import engine, model as model_lib
from worldlm_jax.config import Config, ConfigError
from worldlm_jax.engine import parallel, partial_sync, strategies
from worldlm_jax.model import partition
from worldlm_jax.run import communication, network_clock
from worldlm_jax.tree.topology import Topology, build_topology, local_layout_fits


@dataclasses.dataclass
class AbstractRun:
    """What a run is made of, with abstract (ShapeDtypeStruct) parameters."""

    config: Config
    topology: Topology  # the user's tree (unit client weights: weights never change shapes)
    run_topology: Topology  # the tree the strategy trains on (slots padded to the mesh)
    spec: engine.EngineSpec
    strategy: engine.Strategy
    first_stage: engine.Strategy | None
    model_def: Any
    params: dict  # path -> jax.ShapeDtypeStruct
    mesh: Any
    batch_size: int  # sequences per local step of a slot

    def abstract_state(self) -> engine.EngineState:
        """The stored round state as ShapeDtypeStructs carrying their shardings."""
        state = jax.eval_shape(self.strategy.init, self.params)
        if self.spec.mesh is None:
            return state
        shardings = engine.state_shardings(self.spec, state)
        return jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), state, shardings)

    def abstract_batch(self) -> engine.RoundBatch:
        """RoundBatch placed as `experiment._put` places it: tokens sharded along the slot axis."""
        shape = engine.batch_shape(self.run_topology, self.batch_size, self.config.data.seq_len)
        lead = shape[:-3]
        tokens_sharding = rep = None
        if self.spec.mesh is not None:
            spec = jax.sharding.PartitionSpec(*([None] * (len(lead) - 1)), parallel.AXIS)
            tokens_sharding = jax.sharding.NamedSharding(self.mesh, spec)
            rep = parallel.replicated(self.mesh)
        return engine.RoundBatch(jax.ShapeDtypeStruct(shape, jnp.int32, sharding=tokens_sharding),
                                 jax.ShapeDtypeStruct(lead, jnp.int32, sharding=rep),
                                 jax.ShapeDtypeStruct(lead, jnp.float32, sharding=rep))

    def abstract_policies(self) -> engine.RoundPolicies:
        """The round's `policies` input as training places it (replicated)."""
        rep = parallel.replicated(self.mesh) if self.spec.mesh is not None else None
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                            engine.spec_policies(self.spec))  # small host arrays: built, not traced

    def abstract_key(self) -> jax.ShapeDtypeStruct:
        rep = parallel.replicated(self.mesh) if self.spec.mesh is not None else None
        return jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)


def vocab_size(config: Config) -> int:
    """The model's vocabulary as the run will have it, without reading the corpus:
    `byte` has 256 tokens, `spm:N` is trained to exactly N pieces, a SentencePiece
    model file says its own size (build_experiment sets model.vocab_size the same way)."""
    from worldlm_jax.data.tokenizer import ByteTokenizer, get_tokenizer

    name = config.data.tokenizer
    if name == "byte":
        return ByteTokenizer.vocab_size
    if name.startswith("spm:"):
        try:
            return int(name.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"data.tokenizer={name!r}: expected spm:VOCAB with an integer VOCAB") from None
    try:
        return int(get_tokenizer(name).vocab_size)
    except (ValueError, OSError) as e:
        raise ConfigError(f"data.tokenizer={name!r}: {e}") from e


def slot_layout(choice: str, n_federations: int, n_devices: int) -> str:
    """`run.slot_layout` resolved for F lowest federations on M devices: `auto` is
    local where F divides M or M divides F (no device idles for padding rows),
    else spread; `local` where the devices cannot hold it is refused."""
    if choice == "auto":
        even = n_federations % n_devices == 0 or n_devices % n_federations == 0
        return "local" if n_devices > 1 and even else "spread"
    if choice == "local" and not local_layout_fits(n_federations, n_devices):
        raise ConfigError(f"run.slot_layout=local: {n_federations} lowest federations on {n_devices} devices; it "
                          f"needs at least as many federations as devices or a number that divides them: set "
                          f"run.slot_layout=spread, or run.devices to at most {n_federations} or a multiple of it")
    return choice


def run_mesh(config: Config):
    """The mesh of `config.run.devices` devices with its model axis (`run.model_parallel`)."""
    import jax
    n, k = config.run.devices or jax.device_count(), config.run.model_parallel
    if k > 1 and jax.process_count() > 1 and jax.local_device_count() % k:
        raise ConfigError(f"run.model_parallel={k} with {jax.local_device_count()} devices per process: a copy of "
                          "the weights is split within a process; set run.model_parallel to a divisor of "
                          f"{jax.local_device_count()}")
    if n % k:
        fits = ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
        raise ConfigError(f"run.model_parallel={k} does not divide the {n} devices; set it to one of {fits}")
    return parallel.make_mesh(config.run.devices or None, model=k)


def abstract_run(config: Config, mesh=None, *, topology: Topology | None = None,
                 vocab: int | None = None, platform: str | None = None) -> AbstractRun:
    """Everything `experiment.build_experiment` builds that does not need the data.

    `topology` (default: compiled from config.run_tree() with unit client weights) and
    `vocab` (default: `vocab_size(config)`) are what the data would change;
    `mesh` defaults to `parallel.make_mesh(config.run.devices or None)`;
    `platform` (default: JAX's backend) resolves `run.chunk: -1`
    (`parallel.default_chunk`), so a plan can be made for another platform.
    """
    from worldlm_jax.data import corpus
    from worldlm_jax.privacy import ledger as dp_ledger

    config.validate()
    if topology is None:
        topology = build_topology(config.run_tree(), known_sources=corpus.list_sources(), root_policy=config.policy)
    model_config = config.model
    vocab = vocab_size(config) if vocab is None else int(vocab)
    if model_config.vocab_size != vocab:
        model_config = dataclasses.replace(model_config, vocab_size=vocab)
    if platform == "gpu" != jax.default_backend() and model_config.attention in ("auto", "fused"):
        # cuDNN's fused kernel, which this host cannot trace, keeps for the backward what
        # `recompute` keeps (the output and a statistic per row, not the probabilities)
        model_config = dataclasses.replace(model_config, attention="recompute")
    model_def, params = model_lib.abstract_init(model_config)

    algo = config.algorithm
    if algo.key_layers.auto:
        raise ConfigError(f"algorithm.key_layers.auto={algo.key_layers.auto}: the split is chosen when `worldlm "
                          "train` starts (a probe run in <workdir>/probe); here give the split itself, e.g. the "
                          "groups that probe's probe.json names, or drop auto")
    definition = strategies.get(algo.name)
    mesh = run_mesh(config) if mesh is None else mesh
    batch_size = config.data.batch_size
    if definition.pooled:
        batch_size *= topology.clients_per_round()  # same tokens per round as the clients that train
    run_topology = definition.topology(topology)
    run_topology = run_topology.with_slot_multiple(mesh.shape[parallel.AXIS])  # slots shard over 'clients'
    run_topology = run_topology.with_slot_layout(slot_layout(config.run.slot_layout, run_topology.leaf.size,
                                                             mesh.shape[parallel.AXIS]))
    if config.privacy.target_epsilon > 0:
        try:
            run_topology = dp_ledger.calibrate(run_topology, config.privacy.target_epsilon,
                                               config.privacy.target_delta, config.run.rounds,
                                               config.privacy.default_clip, config.privacy.accountant,
                                               config.privacy.level)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    key_paths = frozenset()
    if definition.uses_key_layers:
        try:
            mask = partition.key_layer_mask(params.keys(), algo.key_layers, model_config.n_layers)
        except ValueError as e:
            raise ConfigError(f"algorithm.key_layers: {str(e).rstrip('.')}; algorithm.name=hierfavg shares "
                              "every parameter and local shares none") from e
        key_paths = frozenset(p for p, is_key in mask.items() if is_key)
    plan = definition.plan(run_topology.depth, algo)
    if not isinstance(plan, engine.Plan):
        raise ConfigError(f"algorithm.name={algo.name!r}: its plan() returned {type(plan).__name__}; "
                          "expected a worldlm_jax.engine.Plan")
    plan = with_personal_keys(plan, run_topology, algo)
    try:  # a registered strategy's plan: name it, rather than fail inside the round
        plan.validate(run_topology.depth)
    except ValueError as e:
        raise ConfigError(f"algorithm.name={algo.name!r} on a depth-{run_topology.depth} tree: {e}") from e
    chunk = parallel.default_chunk(platform) if config.run.chunk < 0 else config.run.chunk
    spec = engine.EngineSpec(topology=run_topology, plan=plan, loss_fn=model_def.loss, key_paths=key_paths,
                             key_groups=partition.key_groups(key_paths) if key_paths else {},
                             client_optimizer=algo.client_optimizer, chunk=chunk,
                             max_update_norm=algo.max_update_norm, mesh=mesh if mesh.size > 1 else None,
                             client_objective=algo.client_objective, total_rounds=config.run.rounds,
                             client_metrics=config.run.client_metrics,
                             param_groups=partition.parameter_groups(params),
                             on_time=planned_deadlines(run_topology, plan, params, key_paths,
                                                       batch_size * config.data.seq_len),
                             param_blocks={p: b for p in params if (b := partition.block_index(p)) is not None})
    try:
        partial_sync.check(spec)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if spec.mesh is not None:
        spec = dataclasses.replace(spec, sharded_levels=engine.levels_worth_sharding(
            spec, params, config.run.shard_state_mb * 2 ** 20))
    strategy = engine.make_strategy(spec)
    first_stage = None
    if algo.schedule == "staged":
        global_plan = strategies.global_stage_plan(run_topology.depth, algo.residuals, algo.similarity,
                                                   algo.use_parent)
        first_stage = engine.make_strategy(dataclasses.replace(spec, plan=global_plan, on_time=planned_deadlines(
            run_topology, global_plan, params, key_paths, batch_size * config.data.seq_len)))
    return AbstractRun(config, topology, run_topology, spec, strategy, first_stage, model_def, params, mesh,
                       batch_size)


def planned_deadlines(topology: Topology, plan: engine.Plan, params: dict, key_paths, tokens_per_step: int) -> tuple:
    """`EngineSpec.on_time`: which federations reply within their parent's
    `deadline_s`, by the planned network clock (`network_clock.planned_on_time`);
    () where no federation sets a deadline. A deadline is decided before the run,
    so every leaf federation needs its own `client_tokens_per_s` (not the measured 0)."""
    if not any(p.deadline_s > 0 for lvl in topology.levels for p in lvl.policies):
        return ()
    unset = [n for n, p in zip(topology.leaf.names, topology.leaf.policies) if not p.client_tokens_per_s > 0]
    if unset:
        raise ConfigError(f"policy field 'deadline_s' is set, but federation(s) {', '.join(unset)} have "
                          "client_tokens_per_s 0 (the measured speed, unknown before the run): give every leaf "
                          "federation a client_tokens_per_s > 0, or set deadline_s 0")
    work = network_clock.local_work_seconds(topology, tokens_per_step, 0.0)
    try:
        mask = network_clock.planned_on_time(topology, plan, communication.part_bytes(params, key_paths), work,
                                             communication.part_leaves(params, key_paths))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return tuple(None if m is None else tuple(bool(x) for x in m) for m in mask)


def with_personal_keys(plan: engine.Plan, topology: Topology, algo) -> engine.Plan:
    """The plan with personal key layers when the leaf federations use
    k_agg `personalized` (every leaf federation or none: their clients keep K)."""
    personal = [p.k_agg == "personalized" for p in topology.leaf.policies]
    if not any(personal):
        return plan
    if not all(personal):
        where = ", ".join(n for n, p in zip(topology.leaf.names, personal) if not p)
        raise ConfigError(f"k_agg=personalized is set on some leaf federations but not on {where}: set it on "
                          "every federation that aggregates clients (their clients keep a personal K), or on none")
    if plan.owner["K"] != topology.depth - 1 or "K" not in plan.broadcast[-1] or algo.schedule == "staged":
        raise ConfigError(f"k_agg=personalized with algorithm.name={algo.name!r}: personal key layers need K "
                          "localised at the leaf federations (algorithm.name=worldlm, schedule not staged)")
    return dataclasses.replace(plan, personal_keys=True, client_keeps=plan.client_keeps | {"K"})
