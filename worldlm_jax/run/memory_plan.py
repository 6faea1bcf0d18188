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

A plan is made for a platform (`platform=`, default JAX's backend): it decides how
many clients a device runs at once under `run.chunk: -1` (`parallel.default_chunk`:
two on CPU, all on GPU/TPU) and whether `model.remat` lowers memory (XLA:CPU keeps
the activations anyway). Planning another platform than this host's needs the
device's memory (`device_memory_gib`) and compiles nothing (XLA here cannot compile
for it). Each knob carries its `--set` assignments, and `fit_line` combines them,
largest saving first, until the estimate fits: one line to paste.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import jax

from worldlm_jax.config import Config, ConfigError, apply_overrides
from worldlm_jax.engine import parallel
from worldlm_jax.run.blueprint import abstract_run, run_mesh
from worldlm_jax.run.memory_estimate import compiled_memory, estimate

PLATFORMS = ("cpu", "gpu", "tpu")
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
    n, k = config.run.devices or jax.device_count(), config.run.model_parallel
    if n <= jax.device_count() or n % k:
        return run_mesh(config)  # (which names the fix where k does not divide n)
    if k > 1:
        return jax.sharding.AbstractMesh((n // k, k), (parallel.AXIS, parallel.MODEL),
                                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    return jax.sharding.AbstractMesh((n,), (parallel.AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


# ---- the plan ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Knob:
    """One change that lowers the round's memory: the field, what it does, the
    bytes per device it saves alone, and the `--set` assignments that make it."""

    knob: str
    change: str
    saves: int
    sets: tuple[str, ...]


def layout_note(platform: str, chunk: int, slots: int, config_chunk: int) -> str:
    """What the plan assumes of the platform: how many clients a device runs at once."""
    how = "all its client slots at once" if chunk >= slots else f"{chunk} client(s) at once"
    why = f"run.chunk: -1 on {platform}" if config_chunk < 0 else f"run.chunk: {config_chunk}"
    return f"planned for {platform}: each device runs {how} ({why})"


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
    platform: str = "cpu"  # the platform planned for
    layout: str = ""  # `layout_note`: what the plan assumes of it
    knobs: list = dataclasses.field(default_factory=list)  # [Knob] when it does not fit, largest saving first
    fit: tuple | None = None  # the `--set` assignments that together fit (None: no combination does)

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
        out["knobs"] = [{"knob": k.knob, "change": k.change, "saves_bytes": k.saves, "set": list(k.sets)}
                        for k in self.knobs]
        out["fit"] = None if self.fit is None else list(self.fit)
        out.update(required=self.required, usable=self.usable, fits=self.fits, ratio=self.ratio)
        return out


# `compile="auto"` compiles only when the estimate lies within this band around the
# usable memory: the estimate is within 25% of XLA's figure, so outside it the answer is clear.
AUTO_COMPILE_BAND = (0.5, 2.0)


def plan(config: Config, *, compile: bool | str = True, device_memory_gib: float | None = None,
         mesh=None, platform: str | None = None) -> PlanResult:
    """The per-device memory plan of `config`'s round; loads no data.

    compile: True = also lower and compile the round for XLA's figure (seconds
    to a minute on a CPU); False = the estimate only; "auto" = compile only when
    the estimate lies in `AUTO_COMPILE_BAND` around the usable memory. platform:
    the platform planned for (default: this host's; another needs
    `device_memory_gib` and is never compiled). Knob suggestions and the `--set`
    line that fits are filled in when the round does not fit."""
    here = jax.default_backend()
    platform = platform or here
    if platform not in PLATFORMS:
        raise ConfigError(f"--platform={platform}: expected one of {', '.join(PLATFORMS)}")
    if platform != here and device_memory_gib is None:
        raise ConfigError(f"--platform={platform} on a {here} host: give the device's memory with --device-memory "
                          "GIB (e.g. 80 for an 80 GB GPU), since this host cannot read it")
    mesh = _mesh(config) if mesh is None else mesh
    run = abstract_run(config, mesh, platform=platform)
    components, levels, facts = estimate(run)
    memory, source = device_memory(device_memory_gib)
    result = PlanResult(devices=facts["devices"], chunk=facts["chunk"], slots_per_device=facts["slots_per_device"],
                        n_params=sum(math.prod(p.shape) for p in run.params.values()), components=components,
                        federation_levels=levels, estimate=sum(components.values()), xla=None, xla_note="",
                        device_memory=memory, device_memory_source=source, platform=platform,
                        layout=layout_note(platform, facts["chunk"], facts["slots_per_device"], config.run.chunk))
    if platform != here:
        compile = False
        result.xla_note = f"not compiled: planned for {platform} on a {here} host"
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
        result.fit = fit_line(config, result)
    return result


def _estimate_with(config: Config, platform: str) -> int:
    return sum(estimate(abstract_run(config, _mesh(config), platform=platform))[0].values())


def knobs(config: Config, result: PlanResult) -> list[Knob]:
    """The knobs that lower the estimate, largest saving first: the estimate
    again with each one turned (no compilation)."""
    trials = []  # (knob, change, --set assignments)
    if result.chunk > 1:
        trials.append(("run.chunk", f"{config.run.chunk} -> 1 (from {result.chunk} clients at once per device)",
                       ("run.chunk=1",)))
    if not config.model.remat and result.platform != "cpu":  # XLA:CPU keeps the activations anyway (jax#19822)
        trials.append(("model.remat", "false -> true (recompute block activations in the backward)",
                       ("model.remat=true",)))
    attention = config.model.attention
    # a kernel that keeps the probabilities (not on CPU: XLA:CPU keeps them anyway, as with remat)
    if result.platform != "cpu" and (attention == "explicit" or (attention != "recompute" and result.platform != "gpu")):
        trials.append(("model.attention", f"{attention} -> recompute (the backward recomputes the attention "
                       "probabilities from a statistic per row)", ("model.attention=recompute",)))
    if config.model.matmul_dtype == "float32" and config.model.dtype == "float32":
        trials.append(("model.matmul_dtype", "float32 -> bfloat16 (the backward keeps bf16 operands)",
                       ("model.matmul_dtype=bfloat16",)))
    if config.run.shard_state_mb > 0 and result.devices > 1:
        trials.append(("run.shard_state_mb", f"{config.run.shard_state_mb:g} -> 0 (shard every level with a node "
                       "per device, however small its state)", ("run.shard_state_mb=0",)))
    n, local = result.devices, jax.device_count()
    split = config.run.model_parallel
    wider = model_parallel_trial(config, result, n)
    if wider is not None:
        trials.append(("run.model_parallel", f"{split} -> {wider} (every weight, optimizer state and client "
                       f"batch split over {wider} devices)", (f"run.model_parallel={wider}",)))
    more = local if n < local else 2 * n
    needs = f" (a run on {more} devices; this host has {local})" if more > local else ""
    trials.append(("run.devices", f"{n} -> {more}{needs}: fewer client slots per device, wide levels split further",
                   (f"run.devices={more}",)))
    if result.slots_per_device > 1:
        from worldlm_jax.data import corpus
        from worldlm_jax.tree.topology import build_topology

        topo = build_topology(config.run_tree(), known_sources=corpus.list_sources(), root_policy=config.policy)
        most = int(topo.slots_per_leaf.max())
        if most > 1:
            half = most // 2
            trials.append(("policy.clients_per_round", f"all -> {half} (with policy.sampling=fixed): fewer slots",
                           (f"policy.clients_per_round={half}", "policy.sampling=fixed")))
    out = []
    for knob, change, sets in trials:
        try:
            saved = result.estimate - _estimate_with(apply_overrides(config, sets), result.platform)
        except (ValueError, ConfigError):  # a knob this config cannot take
            continue
        if saved > 0:
            out.append(Knob(knob, change, int(saved), sets))
    return sorted(out, key=lambda k: -k.saves)


def model_parallel_trial(config: Config, result: PlanResult, n_devices: int) -> int | None:
    """The model axis worth offering: of 2, 4 and 8 times today's (those that divide
    the devices), the one whose estimate is lowest (a wider axis splits the weights
    further but leaves fewer `clients` rows, so more slots per device); None where
    none divides them."""
    split = config.run.model_parallel
    best = None
    for wider in (2 * split, 4 * split, 8 * split):
        if n_devices % wider:
            continue
        try:
            estimate = _estimate_with(apply_overrides(config, [f"run.model_parallel={wider}"]), result.platform)
        except (ValueError, ConfigError):
            continue
        if best is None or estimate < best[1]:
            best = (wider, estimate)
    return None if best is None else best[0]


def fit_line(config: Config, result: PlanResult) -> tuple[str, ...] | None:
    """The knobs' assignments, added largest saving first while each lowers the
    estimate, up to the first set whose estimate fits the usable memory; None
    when all of them together do not fit. Estimates only: compile once more with
    the line (`worldlm plan --set ...`) for XLA's figure."""
    sets: tuple[str, ...] = ()
    best = result.estimate
    for knob in result.knobs:
        try:
            after = _estimate_with(apply_overrides(config, sets + knob.sets), result.platform)
        except (ValueError, ConfigError):  # knobs that do not combine: skip this one
            continue
        if after < best:
            sets, best = sets + knob.sets, after
        if best <= result.usable:
            return sets
    return None


def check(config: Config, *, compile: bool | str = "auto", device_memory_gib: float | None = None) -> PlanResult:
    """The plan, or `DoesNotFit` (a ConfigError naming the knobs) when the round
    cannot fit one device's memory. What `worldlm train` runs first."""
    result = plan(config, compile=compile, device_memory_gib=device_memory_gib)
    if not result.fits:
        raise DoesNotFit(does_not_fit_message(result), result)
    return result


def does_not_fit_message(result: PlanResult, knobs_shown: bool = False) -> str:
    """One line: what is needed, what there is, and what makes it fit: the `--set`
    line (`fit_line`), and the knobs with their savings unless `knobs_shown`
    (`worldlm plan` printed them in its table already)."""
    source = "XLA's figure for the compiled round" if result.xla else "estimate"
    need = (f"the round needs {fmt_bytes(result.required)} per device ({source}) but only "
            f"{fmt_bytes(result.usable)} is usable ({HEADROOM:.0%} of {fmt_bytes(result.device_memory)}: "
            f"{result.device_memory_source}); ")
    if result.fit is not None:
        fix = f"to fit (estimate): {_set_flags(result.fit)}"
    elif result.knobs:
        fix = "the knobs together do not fit it: a smaller model, data.batch_size or data.seq_len"
    else:
        fix = "no knob lowers it: a smaller model, data.batch_size or data.seq_len"
    if knobs_shown or not result.knobs:
        return need + fix
    tips = "; ".join(f"{k.knob} {k.change}: saves ~{fmt_bytes(k.saves)}" for k in result.knobs)
    return need + fix + f"; knobs that lower it: {tips}"


def _set_flags(sets) -> str:
    return " ".join(f"--set {a}" for a in sets)


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
             f"{result.chunk} client(s) at once, {result.n_params:,} parameters", f"  {result.layout}"]
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
    for k in result.knobs:
        lines.append(f"  {k.knob}: {k.change}: saves ~{fmt_bytes(k.saves)}")
    if not result.fits:
        lines.append(f"  to fit (estimate): {_set_flags(result.fit)}" if result.fit is not None else
                     "  no combination of these knobs fits: a smaller model, data.batch_size or data.seq_len")
    return "\n".join(lines)


def to_json(result: PlanResult) -> str:
    return json.dumps(result.to_dict())
