"""One run over many processes: JAX's own multi-controller runtime, nothing home-made.

Every process runs the same program (`worldlm train ...` with the same config,
seed and data); `jax.distributed.initialize` joins them into one runtime, so
`jax.devices()` lists every process's devices and one mesh spans them all. Each
process then feeds only its own devices (the client slots they hold), process 0
alone writes the run's files, and checkpoints are written by all processes
together (orbax).

Where the runtime comes from:
  explicit  --coordinator HOST:PORT --num-processes N --process-id I
            (localhost tests, or any cluster where you start the processes yourself)
  auto      --distributed auto: `jax.distributed.initialize()` without arguments,
            which detects TPU pod slices, SLURM and Open MPI (mpirun) on its own.

On CPU, cross-process collectives need gloo, set before the backend starts.
A bad coordinator, a process id out of range or processes that disagree fail
within `timeout_s`; a process that dies is noticed by the others through the
runtime's heartbeat, which ends them with a message naming the missing task.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
from typing import Sequence

import jax
import numpy as np


class DistributedError(RuntimeError):
    """The processes of a run could not form, or disagree; the message says how to fix it."""


DEFAULT_TIMEOUT_S = 300  # joining the runtime; a process that dies is noticed after a third of it (<= 100 s)


def _cpu_only() -> bool:
    """Whether JAX will run on the CPU (the only case that needs gloo collectives)."""
    import importlib.util

    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(m) is not None
                   for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "libtpu"))


def check_arguments(coordinator: str | None, num_processes: int | None, process_id: int | None,
                    auto: bool) -> bool:
    """Validate the flags before anything connects; returns whether to initialise."""
    explicit = [coordinator is not None, num_processes is not None, process_id is not None]
    if auto:
        if any(explicit):
            raise DistributedError("--distributed auto detects the coordinator, process count and id itself; "
                                   "drop --coordinator/--num-processes/--process-id, or drop --distributed auto")
        return True
    if not any(explicit):
        return False
    if not all(explicit):
        missing = [flag for flag, given in zip(("--coordinator", "--num-processes", "--process-id"), explicit)
                   if not given]
        raise DistributedError(f"a multi-process run needs --coordinator, --num-processes and --process-id "
                               f"together; missing {', '.join(missing)} (or use --distributed auto)")
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"--coordinator={coordinator!r}: expected HOST:PORT, e.g. localhost:12355 "
                               "(the address of process 0, reachable from every process)")
    if num_processes < 1:
        raise DistributedError(f"--num-processes={num_processes}: expected an integer >= 1")
    if not 0 <= process_id < num_processes:
        raise DistributedError(f"--process-id={process_id}: expected 0 <= id < --num-processes={num_processes}")
    return True


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               auto: bool = False, timeout_s: int = DEFAULT_TIMEOUT_S) -> bool:
    """Join this process to the run's runtime (call before JAX starts its backends).

    Returns whether a multi-process runtime was set up. Idempotent for a
    process that is already part of one."""
    if not check_arguments(coordinator, num_processes, process_id, auto):
        return False
    if jax.distributed.is_initialized():
        return True
    if _cpu_only():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout_s = int(timeout_s)
    heartbeat = min(max(timeout_s // 3, 5), 100)
    # The runtime ends a process that cannot join with a C++ abort and a message
    # about "another task"; our watchdog fires first with what to check instead.
    # At the end every process waits at a shutdown barrier for the others to finish
    # their last host-side work (process 0 writes the summary and plots): on a loaded
    # host that took more than a heartbeat timeout (20 s of a 60 s timeout) and aborted
    # a finished run, so the barrier waits the whole timeout; a dead process is still
    # noticed by its missing heartbeats.
    kwargs = dict(initialization_timeout=timeout_s + 30, heartbeat_timeout_seconds=heartbeat,
                  shutdown_timeout_seconds=timeout_s)
    if not auto:
        kwargs.update(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    where = "the auto-detected cluster" if auto else f"coordinator {coordinator}"
    watchdog = threading.Timer(timeout_s, _give_up, args=(
        f"worldlm: error: the run's processes did not all join through {where} within {timeout_s} s "
        f"(this is process {'?' if auto else process_id}{'' if auto else f' of {num_processes}'}). Check that "
        "process 0 is running at that address and reachable from every process, that every process got the "
        "same --num-processes and a distinct --process-id, or raise --distributed-timeout",))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as err:  # e.g. a malformed address, or a port process 0 cannot bind
        raise DistributedError(f"could not join the run through {where}: {_first_line(err)}") from err
    finally:
        watchdog.cancel()
    if not auto:
        check_same("--num-processes", str(num_processes))
    return True


def _give_up(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    os._exit(2)


def process_index() -> int:
    return jax.process_index()


def is_primary() -> bool:
    """Process 0 writes the run's files and prints its tables; the others only compute."""
    return jax.process_index() == 0


def check_same(what: str, text: str) -> None:
    """Fail on every process, with the same message, unless `text` is equal on all of them
    (e.g. the resolved config: processes that trained different configs would mix them)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(digest))
    differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
    if differ:
        raise DistributedError(f"the {what} of process(es) {', '.join(map(str, differ))} differs from process 0's: "
                               f"every process must be started with the same {what}")


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (e.g. Ctrl-C reached one of them):
    all must stop at the same round, or the others would wait on its collectives."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray([flag], np.int32))))


def local_rows(sharding, shape: Sequence[int], axis: int) -> np.ndarray:
    """Sorted indices along `axis` that this process's devices hold under `sharding`."""
    rows = set()
    for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
        rows.update(range(*index[axis].indices(shape[axis])))
    return np.asarray(sorted(rows), np.int64)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__
