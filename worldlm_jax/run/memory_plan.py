"""Whether a run's round fits a device, from its config alone: no data is loaded,
nothing is allocated.

`plan(config)` builds the data-free half of the run (`blueprint.abstract_run`:
topology, model shapes, strategy tree and plan, key layers, `EngineSpec`, the
jitted round with abstract parameters), takes the per-device bytes of one root
round from `memory_estimate.py` (our estimate, by component, and XLA's figure
for the compiled round) and weighs them against the device's memory. When the
round does not fit it names the knobs that would lower it, each with the bytes
it saves; `check(config)` raises `DoesNotFit` (a ConfigError) instead, which is
what `worldlm train` runs first. `format_plan` / `to_json` are `worldlm plan`'s output.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import jax

from worldlm_jax.config import Config, ConfigError
from worldlm_jax.engine import parallel
from worldlm_jax.run.blueprint import abstract_run
from worldlm_jax.run.memory_estimate import compiled_memory, estimate

GiB = 2 ** 30
MiB = 2 ** 20
# Plan with this share of a device's memory (the rest: runtime, fragmentation, the evaluator).
HEADROOM = 0.9


class DoesNotFit(ConfigError):
    """The run's round needs more memory per device than the device has."""

    def __init__(self, message: str, result: "PlanResult"):
        super().__init__(message)
        self.result = result


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
        from worldlm_jax.tree.topology import build_topology

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
