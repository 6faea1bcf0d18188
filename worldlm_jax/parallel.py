"""Devices: the client-slot axis sharded over a mesh, clients mapped per device.

Client slots are laid out federation-major, so a device's contiguous shard
holds whole federations whenever the sizes allow. Inside a device, clients run
either all at once (`vmap`), in chunks (`lax.map(batch_size=k)`: bounded memory)
or one after another (k = 1). Aggregation stays outside the mapped function:
plain array code that XLA partitions with the needed all-reduces.
"""
from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXIS = "clients"


def make_mesh(n_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first `n_devices` devices (all by default).

    Auto axis types: a weighted reduction over a sharded axis must be allowed
    to insert its all-reduce (Explicit axes raise ShardingTypeError).
    """
    devices = jax.devices()
    n = len(devices) if n_devices is None else int(n_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"n_devices={n_devices} but {len(devices)} device(s) are available "
                         f"(on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts)")
    return Mesh(np.array(devices[:n]), (AXIS,), axis_types=(AxisType.Auto,))


def sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def default_chunk(platform: str | None = None) -> int:
    """Clients run at once per device: all on accelerators (vmap fills the chip);
    two at a time on CPU, where each device is a core: pairs make the matmuls
    large enough to run efficiently while activations stay small (2 beat 1, 4
    and all-at-once on workload W, benchmarks/RESULTS.md)."""
    platform = platform or jax.default_backend()
    return 0 if platform in ("gpu", "tpu") else 2


def map_clients(fn: Callable, mesh: Mesh | None, chunk: int = 0, n_shared: int = 0) -> Callable:
    """Map `fn` (written for one client) over the leading slot axis of its args.

    The first `n_shared` arguments are shared by every client (replicated, not
    mapped: e.g. the federations' parameters, which each client gathers for
    itself, so no per-slot copy of the model is ever materialised); the rest
    are mapped. chunk = 0: vmap all local clients; chunk = k > 0: `lax.map` in
    chunks of k. With a mesh, each device handles its own shard of slots.
    """
    def per_device(*args):
        shared, mapped = args[:n_shared], args[n_shared:]
        one = lambda *xs: fn(*shared, *xs)
        n_local = jax.tree.leaves(mapped)[0].shape[0]
        if chunk <= 0 or chunk >= n_local:
            return jax.vmap(one)(*mapped)
        return jax.lax.map(lambda xs: one(*xs), mapped, batch_size=chunk)

    if mesh is None or mesh.size == 1:
        return per_device

    def sharded(*args):
        specs = (P(),) * n_shared + (P(AXIS),) * (len(args) - n_shared)
        return jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=P(AXIS), check_vma=False)(*args)

    return sharded


def configure_cpu_devices(n: int) -> None:
    """Ask XLA for `n` host devices (call before JAX initialises its backend)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def initialize_distributed(**kwargs) -> None:
    """Multi-host runs (TPU pods, GPU clusters): JAX's own multi-controller runtime."""
    jax.distributed.initialize(**kwargs)
