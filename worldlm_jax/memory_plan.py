"""Per-device memory of a run, from its config alone: no data is loaded, nothing is allocated.

`blueprint.abstract_run(config)` builds the data-free half of a run
(topology, model shapes, strategy tree and plan, key layers, `EngineSpec`,
the jitted round) with abstract parameters. `plan(config)` adds up what one
root round holds on each device (`estimate`):

  federation state         every level's B, K, server optimizer states, residual K
                           (and the clients' kept state) as stored: sharded along
                           the node axis where a level is wide enough
  federation working copy  the levels' rows the round works on, whole
  aggregation sums         per-federation sums of the clients' updates
  batch                    the round's token block, sharded along the slot axis
  parameters               per client in flight (a chunk of `run.chunk` per
                           device): broadcast copy, weights, gradients
  optimizer states         the chunk's client optimizer states
  activations              what one local step's backward keeps, per client of
                           the chunk (the model's VJP residuals: remat and bf16 show)
  per-slot copies          what outlives a chunk for every slot of the device

and asks XLA for its own figure: the round lowered and compiled on abstract
inputs, `memory_analysis()` (arguments + outputs - aliased + temporaries).
`check(config)` raises `DoesNotFit` (a ConfigError) naming the knobs that
would lower it when the round cannot fit a device. Not counted: the evaluator
(a separate, smaller program) and the first stage of a `staged` schedule.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp

from worldlm_jax import engine, optimizers, parallel
from worldlm_jax.blueprint import AbstractRun, abstract_run
from worldlm_jax.config import Config, ConfigError

GiB = 2 ** 30
MiB = 2 ** 20
# Plan with this share of a device's memory (the rest: runtime, fragmentation, the evaluator).
HEADROOM = 0.9
# Share of the VJP residuals (what the backward reads, as JAX traces it) that
# XLA keeps as buffers: it fuses elementwise chains (GELU, LayerNorm) and
# recomputes them in the backward. Measured on XLA:CPU: 0.6 (small) to 0.7 (paper-125m).
ACTIVATION_FUSION = 0.7


class DoesNotFit(ConfigError):
    """The run's round needs more memory per device than the device has."""

    def __init__(self, message: str, result: "PlanResult"):
        super().__init__(message)
        self.result = result


# ---- the estimate ----------------------------------------------------------------
def _nbytes(x) -> int:
    return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def tree_bytes(tree) -> int:
    """Bytes of a (possibly abstract) pytree, whole."""
    return sum(_nbytes(x) for x in jax.tree.leaves(tree))


def device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings
    (whole leaves where a leaf has none)."""
    total = 0
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def _is_sharded(tree) -> bool:
    """Whether some leaf is split over devices."""
    return any(getattr(x, "sharding", None) is not None and x.sharding.shard_shape(x.shape) != x.shape
               for x in jax.tree.leaves(tree))


def activation_bytes(model_def, params: dict, batch: int, seq_len: int) -> int:
    """What one client's local step keeps for its backward pass: the residuals of
    the loss's VJP, less the weights (the client holds those anyway)."""
    tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)

    def residuals(p, t):
        return jax.vjp(lambda q: model_def.loss(q, t)[0], p)[1]

    leaves = jax.tree.leaves(jax.eval_shape(residuals, params, tokens))
    weights: dict = {}
    for p in params.values():
        weights[(tuple(p.shape), jnp.dtype(p.dtype))] = weights.get((tuple(p.shape), jnp.dtype(p.dtype)), 0) + 1
    total = 0
    for x in leaves:
        key = (tuple(x.shape), jnp.dtype(x.dtype))
        if weights.get(key, 0) > 0:  # a weight the backward reads: not an activation
            weights[key] -= 1
            continue
        total += _nbytes(x)
    return total


def estimate(run: AbstractRun) -> tuple[dict, dict, dict]:
    """(components, federation state per level, facts) in bytes per device."""
    spec, topo, plan = run.spec, run.run_topology, run.spec.plan
    m = run.mesh.size if spec.mesh is not None else 1
    slots = topo.n_slots // m
    k = slots if spec.chunk <= 0 else min(spec.chunk, slots)
    params = run.params
    P = tree_bytes(params)
    parts = engine.split_parts(params, spec.key_paths)
    opt = tree_bytes(jax.eval_shape(optimizers.get(spec.client_optimizer).init, params))
    acts = activation_bytes(run.model_def, params, run.batch_size, run.config.data.seq_len)

    state = run.abstract_state()
    levels = {}
    for d, lvl in enumerate(topo.levels):
        layout = "sharded" if _is_sharded(state.levels[d]) else "replicated"
        levels[f"level {d} ({lvl.size} node{'s' * (lvl.size != 1)}, {layout})"] = device_bytes(state.levels[d])
    kept_state = device_bytes(state.clients)
    if kept_state:
        layout = "sharded" if _is_sharded(state.clients) else "replicated"
        levels[f"clients ({topo.n_clients}, kept state, {layout})"] = kept_state
    fed_state = sum(levels.values())

    # What outlives a chunk, per slot of the device: the parts a client keeps
    # (gathered in, written back), its K where leaf federations attend (the
    # chunk's output, the stacked outputs, their gather for attention), its
    # persistent optimizer state (gathered in and out).
    leaf = topo.depth - 1
    leaf_k_attention = ("K" in plan.aggregate[leaf] and bool(spec.key_paths)
                        and any(p.k_agg == "attention" for p in topo.leaf.policies))
    kept = sum(tree_bytes(parts[part]) for part in plan.client_keeps)
    per_slot = 2 * kept + (3 * tree_bytes(parts["K"]) if leaf_k_attention else 0)
    if plan.client_opt_persistent:
        per_slot += 2 * opt
    # Per-federation sums of the leaf level's updates: each chunk's, plus the
    # chunk loop's carry when a device runs more than one chunk (DP's clipped
    # sums add nothing XLA keeps apart: measured on small).
    summed = sum(tree_bytes(parts[part]) for part in plan.aggregate[leaf])
    n_sets = 1 if slots == k else 2
    sums = n_sets * topo.leaf.size * summed
    batch = device_bytes(run.abstract_batch())
    components = {
        "federation state": fed_state,
        # the levels' rows the round works on and their new values: whole on
        # every device (a sharded level is gathered for the round's segment
        # sums, gathers and attention; only its storage is split)
        "federation working copy": tree_bytes(jax.eval_shape(lambda s: engine.unpad_state(spec, s), state)),
        "aggregation sums": sums,
        "batch": batch,
        # per client in flight: the broadcast copy, the weights being trained, their gradients
        "parameters": k * 3 * P,
        "optimizer states": k * opt,
        "activations": int(k * ACTIVATION_FUSION * acts),
        "per-slot copies": slots * per_slot,
    }
    facts = {"devices": m, "chunk": k, "slots_per_device": slots, "params_bytes": P, "opt_bytes": opt,
             "activation_bytes_per_client": acts, "per_slot_bytes": per_slot}
    return components, levels, facts


# ---- XLA's figure ----------------------------------------------------------------
# LLVM's optimisation level does not change XLA's buffer assignment (the same figure
# for tiny, small and paper-125m) but shortens compiling on CPU (tiny: ~19 s -> ~11 s).
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def lower_round(run: AbstractRun):
    """The jitted round lowered on abstract inputs placed as training places them."""
    return run.strategy.run_round.lower(run.abstract_state(), run.abstract_batch(), run.abstract_key())


def compiled_memory(run_or_lowered) -> dict | None:
    """Compile the round (an AbstractRun, or `lower_round`'s result) and return
    XLA's bytes per device: arguments + outputs - aliased (the donated state) +
    temporaries; None where the backend reports nothing."""
    lowered = lower_round(run_or_lowered) if isinstance(run_or_lowered, AbstractRun) else run_or_lowered
    options = _COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    stats = lowered.compile(compiler_options=options).memory_analysis()
    if stats is None:
        return None
    out = {name: int(getattr(stats, f"{name}_size_in_bytes")) for name in ("argument", "output", "alias", "temp")}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


# ---- the device ------------------------------------------------------------------
def device_memory(override_gib: float | None = None) -> tuple[int, str]:
    """(bytes per device, where the number comes from)."""
    if override_gib is not None:
        if not override_gib > 0:
            raise ConfigError(f"--device-memory={override_gib}: expected a number of GiB > 0")
        return int(override_gib * GiB), "--device-memory"
    device = jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # backends without the query raise instead of returning None
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.platform} memory_stats()"
    n = max(jax.local_device_count(), 1)
    return _host_memory() // n, (f"{device.platform} reports no device memory: available host RAM / "
                                 f"{n} local device{'s' * (n != 1)}")


def _host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _mesh(config: Config):
    """The run's mesh; an abstract one where run.devices exceeds this host's devices
    (planning a bigger run: estimate only, XLA cannot compile for absent devices)."""
    n = config.run.devices or jax.device_count()
    if n <= jax.device_count():
        return parallel.make_mesh(config.run.devices or None)
    return jax.sharding.AbstractMesh((n,), (parallel.AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


# ---- the plan ---------------------------------------------------------------------
@dataclasses.dataclass
class PlanResult:
    """Bytes per device of one root round: our estimate, and XLA's figure."""

    devices: int
    chunk: int  # clients at once per device (run.chunk resolved)
    slots_per_device: int
    n_params: int
    components: dict  # name -> bytes: what the estimate adds up
    federation_levels: dict  # 'level d (n nodes, sharded|replicated)' (and kept client state) -> bytes as stored
    estimate: int
    xla: dict | None  # argument / output / alias / temp / total bytes; None when not compiled
    xla_note: str  # why there is no XLA figure ('' when there is one)
    device_memory: int  # bytes per device
    device_memory_source: str
    knobs: list = dataclasses.field(default_factory=list)  # [(knob, change, bytes saved)] when it does not fit

    @property
    def required(self) -> int:
        """What the fit decision uses: XLA's figure when there is one, else the estimate."""
        return self.xla["total"] if self.xla else self.estimate

    @property
    def usable(self) -> int:
        return int(self.device_memory * HEADROOM)

    @property
    def fits(self) -> bool:
        return self.required <= self.usable

    @property
    def ratio(self) -> float | None:
        """estimate / XLA's figure."""
        return self.estimate / self.xla["total"] if self.xla else None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["knobs"] = [{"knob": k, "change": c, "saves_bytes": int(s)} for k, c, s in self.knobs]
        out.update(required=self.required, usable=self.usable, fits=self.fits, ratio=self.ratio)
        return out


# `compile="auto"` compiles only when the estimate lies within this band around the
# usable memory: the estimate is within 25% of XLA's figure, so outside it the answer is clear.
AUTO_COMPILE_BAND = (0.5, 2.0)


def plan(config: Config, *, compile: bool | str = True, device_memory_gib: float | None = None,
         mesh=None) -> PlanResult:
    """The per-device memory plan of `config`'s round; loads no data.

    compile: True = also lower and compile the round for XLA's figure (seconds
    to a minute on a CPU); False = the estimate only; "auto" = compile only when
    the estimate lies in `AUTO_COMPILE_BAND` around the usable memory. Knob
    suggestions are filled in when the round does not fit."""
    mesh = _mesh(config) if mesh is None else mesh
    run = abstract_run(config, mesh)
    components, levels, facts = estimate(run)
    memory, source = device_memory(device_memory_gib)
    result = PlanResult(devices=facts["devices"], chunk=facts["chunk"], slots_per_device=facts["slots_per_device"],
                        n_params=sum(math.prod(p.shape) for p in run.params.values()), components=components,
                        federation_levels=levels, estimate=sum(components.values()), xla=None, xla_note="",
                        device_memory=memory, device_memory_source=source)
    if compile == "auto":
        low, high = AUTO_COMPILE_BAND
        compile = low * result.usable < result.estimate < high * result.usable
        side = "below" if result.estimate <= low * result.usable else "above"
        result.xla_note = "" if compile else f"not compiled: the estimate is far {side} the usable memory"
    if compile and isinstance(mesh, jax.sharding.AbstractMesh):
        result.xla_note = f"not compiled: this host has {jax.device_count()} device(s), the run {mesh.size}"
    elif compile:
        result.xla = compiled_memory(run)
        if result.xla is None:
            result.xla_note = f"{jax.default_backend()} reports no memory analysis"
    elif not result.xla_note:
        result.xla_note = "not compiled (--no-compile)"
    if not result.fits:
        result.knobs = knobs(config, result)
    return result


def _estimate_with(config: Config, mesh=None) -> int:
    return sum(estimate(abstract_run(config, _mesh(config) if mesh is None else mesh))[0].values())


def knobs(config: Config, result: PlanResult) -> list:
    """[(knob, change, bytes per device it saves)], largest saving first: the
    estimate again with each knob turned (no compilation)."""
    base = result.estimate
    replace = dataclasses.replace
    trials = []
    if result.chunk > 1:
        trials.append(("run.chunk", f"{config.run.chunk} -> 1 (now {result.chunk} clients at once per device)",
                       replace(config, run=replace(config.run, chunk=1)), None))
    if not config.model.remat:
        note = " (XLA:CPU keeps the activations anyway, jax#19822)" if jax.default_backend() == "cpu" else ""
        trials.append(("model.remat", "false -> true (recompute block activations in the backward)" + note,
                       replace(config, model=replace(config.model, remat=True)), None))
    if config.model.matmul_dtype == "float32" and config.model.dtype == "float32":
        trials.append(("model.matmul_dtype", "float32 -> bfloat16 (the backward keeps bf16 operands)",
                       replace(config, model=replace(config.model, matmul_dtype="bfloat16")), None))
    if config.run.shard_state_mb > 0 and result.devices > 1:
        trials.append(("run.shard_state_mb", f"{config.run.shard_state_mb:g} -> 0 (shard every level with a node "
                       "per device, however small its state)",
                       replace(config, run=replace(config.run, shard_state_mb=0.0)), None))
    n, local = result.devices, jax.device_count()
    more = local if n < local else 2 * n
    mesh = (parallel.make_mesh(more) if more <= local else
            jax.sharding.AbstractMesh((more,), (parallel.AXIS,), axis_types=(jax.sharding.AxisType.Auto,)))
    trials.append(("run.devices", f"{n} -> {more}" + ("" if more <= local else " (more than this host has)")
                   + ": fewer client slots per device, wide levels split further",
                   replace(config, run=replace(config.run, devices=0 if more == local else more)), mesh))
    if result.slots_per_device > 1:
        from worldlm_jax.data import corpus
        from worldlm_jax.topology import build_topology

        topo = build_topology(config.tree, known_sources=corpus.list_sources(), root_policy=config.policy)
        most = int(topo.slots_per_leaf.max())
        if most > 1:
            half = most // 2
            trials.append(("policy.clients_per_round", f"all -> {half} (with policy.sampling=fixed): fewer slots",
                           replace(config, policy=replace(config.policy, clients_per_round=half, sampling="fixed")),
                           None))
    out = []
    for knob, change, changed, knob_mesh in trials:
        try:
            saved = base - _estimate_with(changed, knob_mesh)
        except (ValueError, ConfigError):  # a knob this config cannot take
            continue
        if saved > 0:
            out.append((knob, change, int(saved)))
    out.sort(key=lambda x: -x[2])
    return out


def check(config: Config, *, compile: bool | str = "auto", device_memory_gib: float | None = None) -> PlanResult:
    """The plan, or `DoesNotFit` (a ConfigError naming the knobs) when the round
    cannot fit one device's memory. What `worldlm train` runs first."""
    result = plan(config, compile=compile, device_memory_gib=device_memory_gib)
    if not result.fits:
        raise DoesNotFit(does_not_fit_message(result), result)
    return result


def does_not_fit_message(result: PlanResult) -> str:
    """One line: what is needed, what there is, and the knobs with their savings."""
    over = result.required - result.usable
    tips = "; ".join(f"{k} {c}: saves ~{fmt_bytes(s)}" + (" (enough alone)" if s >= over * (
        result.estimate / max(result.required, 1)) else "") for k, c, s in result.knobs)
    source = "XLA's figure for the compiled round" if result.xla else "estimate"
    return (f"the round needs {fmt_bytes(result.required)} per device ({source}) but only {fmt_bytes(result.usable)} "
            f"is usable ({HEADROOM:.0%} of {fmt_bytes(result.device_memory)}: {result.device_memory_source}); "
            f"knobs that lower it: {tips or 'none left: a smaller model, data.batch_size or data.seq_len'}")


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_plan(result: PlanResult) -> str:
    """The plan as a readable table."""
    w = 30
    row = lambda name, n, note="": f"  {name:<{w}} {fmt_bytes(n):>11}" + (f"   {note}" if note else "")
    lines = [f"memory per device: {result.devices} device(s), {result.slots_per_device} client slot(s) per device, "
             f"{result.chunk} client(s) at once, {result.n_params:,} parameters"]
    for name, value in result.components.items():
        lines.append(row(name, value))
        if name == "federation state":
            lines += [row("  " + level, b) for level, b in result.federation_levels.items()]
    lines.append(row("estimate", result.estimate))
    if result.xla:
        x = result.xla
        lines.append(row("XLA (compiled round)", x["total"],
                         f"arguments {fmt_bytes(x['argument'])} + outputs {fmt_bytes(x['output'])} - aliased "
                         f"{fmt_bytes(x['alias'])} + temporaries {fmt_bytes(x['temp'])}; "
                         f"estimate / XLA = {result.ratio:.2f}"))
    else:
        lines.append(f"  {'XLA (compiled round)':<{w}} {'-':>11}   {result.xla_note}")
    lines.append(row("device memory", result.device_memory, result.device_memory_source))
    verdict = "fits" if result.fits else "DOES NOT FIT"
    lines.append(f"{verdict}: {fmt_bytes(result.required)} of {fmt_bytes(result.usable)} usable "
                 f"({HEADROOM:.0%} of the device)")
    for knob, change, saved in result.knobs:
        lines.append(f"  {knob}: {change}: saves ~{fmt_bytes(saved)}")
    return "\n".join(lines)


def to_json(result: PlanResult) -> str:
    return json.dumps(result.to_dict())
