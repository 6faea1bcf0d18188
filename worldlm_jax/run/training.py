"""Train a run from a config: `train` below, the package's entry point
(`worldlm_jax.train` and `worldlm_jax.run.train` are this function).

The parts live in their own modules: the experiment, its batches and states
(`experiment`), the run loop (`loop`), round records, summaries and plots
(`records`).
"""
from __future__ import annotations

import json
import os
import re
import time
import warnings

import jax

from worldlm_jax import config as config_lib, model as model_lib
from worldlm_jax.config import Config, ConfigError, save_yaml
from worldlm_jax.engine import parallel
from worldlm_jax.plugins import callbacks as callbacks_lib
from worldlm_jax.run import distributed, records
from worldlm_jax.run.dirs import check_resumable
from worldlm_jax.run.experiment import build_experiment
from worldlm_jax.run.loop import RunLoop
from worldlm_jax.run.records import format_table, write_plots

__all__ = ["train", "prepare_backend", "configure_devices", "compilation_cache_dir", "enable_compilation_cache"]
# check_resumable (run_dirs): ConfigError naming the differing fields when a workdir holds
# checkpoints of a run with another config; resuming it would silently mix hyper-parameters


def prepare_backend(model_config: model_lib.ModelConfig) -> None:
    """XLA flags the model's numerics need, set before JAX starts its backends where possible."""
    if model_config.matmul_dtype == "bfloat16" and not parallel.configure_cpu_bf16_matmuls() \
            and jax.default_backend() == "cpu":
        warnings.warn(f"model.matmul_dtype=bfloat16 on CPU runs its backward products in float32 unless "
                      f"XLA_FLAGS contains {model_lib.CPU_BF16_XLA_FLAG} before JAX starts; results are "
                      f"the same, only slower.", stacklevel=3)


DEFAULT_COMPILATION_CACHE = "~/.cache/worldlm_jax/xla"


def compilation_cache_dir(setting: str) -> str:
    """The directory `run.compilation_cache` names ('' = none): 'auto' is
    $JAX_COMPILATION_CACHE_DIR where set, else DEFAULT_COMPILATION_CACHE."""
    if setting == "auto":
        setting = os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_COMPILATION_CACHE
    return os.path.expanduser(setting)


def enable_compilation_cache(setting: str) -> None:
    """JAX's persistent compilation cache on in `compilation_cache_dir(setting)`, or off.

    A run, `worldlm eval`, and a vectorised sweep load a program compiled before
    (same code, config shapes, devices and jax version) instead of compiling it:
    a restart, a resume or a sweep point after the first skips the compile.
    JAX caches programs that took at least a second to compile. It changes no
    number: the cache holds the executables XLA would build again. Every process
    of a multi-process run sets it alike (a shared directory is shared safely:
    JAX keys entries by program and devices); a plug-in's jitted code is cached
    with the round it is traced into.
    """
    from jax.experimental.compilation_cache import compilation_cache

    directory = compilation_cache_dir(setting)
    state = (bool(directory), directory or jax.config.jax_compilation_cache_dir)
    if state == (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir):
        return
    jax.config.update("jax_enable_compilation_cache", state[0])
    jax.config.update("jax_compilation_cache_dir", state[1])
    compilation_cache.reset_cache()  # JAX opens its cache once: a new choice needs a fresh one


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


def train(config: Config | str, workdir: str, quiet: bool = False, progress: bool = True,
          callbacks=(), from_step: int | None = None) -> dict:
    """Train (or resume) the run in `workdir`; returns the summary (also written).

    `config`: a Config, a preset name or a YAML path. `callbacks`: Callback
    instances (or registered names) run after those named in run.callbacks;
    their on_start comes before the first round, their on_end after the
    summary (with None when the run raises). `from_step`: resume from that
    saved step rather than the latest, the later steps set aside (renamed
    `<step>.superseded`, never deleted), e.g. past a damaged or diverged one.
    Refuses (ConfigError) a workdir whose checkpoints belong to another config.
    Raises NonFiniteStateError (run_loop) when a round leaves a federation's state
    NaN or Inf: metrics.jsonl has the rounds so far, no checkpoint holds that state
    and no summary is written.
    """
    configure_devices()
    config, hooks = _load(config, workdir, callbacks, quiet)
    prepare_backend(config.model)
    enable_compilation_cache(config.run.compilation_cache)
    # Multi-process runs: every process computes, process 0 alone writes files and prints.
    primary = distributed.is_primary()
    if primary:
        save_yaml(config, os.path.join(workdir, "config.yaml"))
    t0 = time.perf_counter()
    exp = build_experiment(config)
    say = (lambda *a: None) if quiet or not primary else print
    say(exp.run_topology.summary())
    loop = RunLoop(exp, workdir, hooks, say, progress=progress and not quiet and primary, from_step=from_step)
    context = callbacks_lib.RunContext(workdir=os.path.abspath(workdir), process_index=distributed.process_index(),
                                       process_count=jax.process_count(), config=config, first_round=loop.start,
                                       resumed=loop.resumed)
    return callbacks_lib.around_run(hooks, context, lambda: _run(exp, config, loop, workdir, t0, quiet))


def _run(exp, config: Config, loop: RunLoop, workdir: str, t0: float, quiet: bool) -> dict:
    """The loop's rounds and final evaluation, then the plots, summary.json and
    table (process 0); returns the summary."""
    primary = distributed.is_primary()
    final = loop.run()
    if primary:
        write_plots(exp, workdir)
    summary = records.run_summary(exp, config, loop.round, final, exp.compiles(), time.perf_counter() - t0,
                                  loop.accountants, workdir, loop.logger.stopped_by)
    if primary:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    if not quiet and primary:
        print(format_table(summary))
    return summary


def _load(config: Config | str, workdir: str, callbacks, quiet: bool = False) -> tuple[Config, list]:
    """The config (a preset or YAML read, its plug-ins imported, `key_layers.auto`
    resolved by its probe run) and its callbacks, once `workdir` is known to hold
    no run of another config (then created)."""
    from worldlm_jax import plugins
    from worldlm_jax.run.probe import resolve_key_layers

    if isinstance(config, str):
        config = config_lib.load(config)
    plugins.load_all(config.plugins)  # a config built in this process has them; one read elsewhere may not
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"run directory {workdir!r} exists and is not a directory; give --workdir a new "
                          "directory or an earlier run's")
    config = resolve_key_layers(config, workdir, train, say=(lambda *a: None) if quiet else print)
    hooks = callbacks_lib.build(config, callbacks)
    check_resumable(workdir, config)
    os.makedirs(workdir, exist_ok=True)
    return config, hooks

