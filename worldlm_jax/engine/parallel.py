"""Devices: the client-slot axis sharded over a mesh, clients mapped per device.

Client slots sit on the devices as `Topology.slot_layout` says: spread (every
federation's slots over every device) or federation-local (a device holds only
the slots of the federations whose rows it holds). Inside a device, clients run
either all at once (`vmap`), in chunks of k (a `lax.scan` over vmapped chunks:
bounded memory) or one after another (k = 1). Whatever aggregation can be
streamed (weighted sums of updates per federation) is summed chunk by chunk
inside the mapped function (`map_reduce_clients`), so no per-client copy of the
model outlives its chunk; spread, the sums are then all-reduced over devices
once; federation-local, each device keeps its own federations' rows
(`to_device_rows`, `from_device_rows`).

A model axis (`run.model_parallel`, `make_mesh(model=k)`) splits every weight
along its largest dimension that k divides, in the manner of FSDP
(`model_spec`): the stored state carries that sharding and a client's
parameters, optimizer state and gradients are constrained to it inside the step
(`constrain_model`); XLA's SPMD partitioner gathers each weight where a matmul
needs it. The client map is manual over `clients` only, so `model` stays
automatic inside it.
"""
from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXIS = "clients"
MODEL = "model"  # a weight's shards (`run.model_parallel`)
SWEEP_AXIS = "sweep"  # the points of a vectorised sweep (`vectorized.run`), each on its own devices


def make_mesh(n_devices: int | None = None, sweep: int | None = None, model: int = 1) -> Mesh:
    """A mesh over the first `n_devices` devices (all by default).

    sweep=None: 1-D, (`clients`,), what a single run trains on. sweep=S: 2-D,
    (`sweep`, `clients`) of shape (S, n_devices / S): S groups of consecutive
    devices, each group the `clients` mesh of its own sweep points (a vectorised
    sweep vmaps the round with `spmd_axis_name=SWEEP_AXIS`, so the engine's
    client mapping and sharding constraints, which name only `clients`, act
    within a group). model=k > 1 (no sweep): 2-D, (`clients`, `model`) of shape
    (n_devices / k, k): k consecutive devices hold the shards of one copy of the
    weights (within a host where the hosts' devices are consecutive). Auto axis
    types: a weighted reduction over a sharded axis must be allowed to insert its
    all-reduce (Explicit axes raise ShardingTypeError).
    """
    devices = jax.devices()
    n = len(devices) if n_devices is None else int(n_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"n_devices={n_devices} but {len(devices)} device(s) are available "
                         f"(on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts)")
    if model > 1:
        if sweep is not None:
            raise ValueError("a model axis and a sweep axis in one mesh are not supported")
        if n % model:
            raise ValueError(f"model={model} must divide the {n} device(s) of the mesh")
        grid = np.array(devices[:n]).reshape(n // model, model)
        return Mesh(grid, (AXIS, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))
    if sweep is None:
        return Mesh(np.array(devices[:n]), (AXIS,), axis_types=(AxisType.Auto,))
    if not 1 <= sweep <= n or n % sweep:
        raise ValueError(f"sweep={sweep} must divide the {n} device(s) of the mesh")
    grid = np.array(devices[:n]).reshape(sweep, n // sweep)
    return Mesh(grid, (SWEEP_AXIS, AXIS), axis_types=(AxisType.Auto, AxisType.Auto))


def model_size(mesh) -> int:
    """Devices one copy of the weights is split over (1: no model axis)."""
    return 1 if mesh is None else dict(mesh.shape).get(MODEL, 1)


def model_dim(shape: tuple[int, ...], k: int) -> int | None:
    """The dimension a weight of `shape` is split along over k model devices:
    its largest one that k divides (the last of equals). None: kept whole
    (k = 1, a vector or scalar, which is cheap to replicate, or no dimension fits)."""
    if k <= 1 or len(shape) < 2:
        return None
    fits = [d for d, n in enumerate(shape) if n % k == 0]
    return max(fits, key=lambda d: (shape[d], d)) if fits else None


def model_spec(shape: tuple[int, ...], k: int, lead: tuple = ()) -> P:
    """PartitionSpec of an array whose leading len(lead) dimensions (rows, slots)
    are sharded as `lead` says and whose trailing ones are a weight split over
    the model axis (`model_dim`)."""
    body = [None] * (len(shape) - len(lead))
    d = model_dim(tuple(shape[len(lead):]), k)
    if d is not None:
        body[d] = MODEL
    spec = [*lead, *body]
    while spec and spec[-1] is None:  # trailing Nones dropped: the form XLA hands back (one compilation)
        spec.pop()
    return P(*spec)


def constrain_model(tree, mesh):
    """Every leaf of a weight-shaped tree (one client's, inside the client map)
    kept split over the model axis; the identity without one."""
    k = model_size(mesh)
    if k == 1:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, model_spec(x.shape, k)), tree)


def constrain_batch(tokens_ExBxL1, mesh):
    """One client's token block split along its batch over the model axis (where
    the axis divides it): each device of a model group runs its part of the batch
    with the weights gathered where used (FSDP), so activations fall with the
    axis too; the identity without one."""
    k = model_size(mesh)
    if k == 1 or tokens_ExBxL1.shape[1] % k:
        return tokens_ExBxL1
    return jax.lax.with_sharding_constraint(tokens_ExBxL1, P(None, MODEL))


def sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def padded_rows(n: int, mesh: Mesh | None) -> int:
    """Rows a per-node array of `n` nodes is stored with: rounded up to a multiple
    of the device count when it has at least one row per device (then sharded
    along rows, `row_spec`), else `n` (replicated: too few rows to split)."""
    m = 1 if mesh is None else mesh.shape[AXIS]
    return n if n < m else -(-n // m) * m


def row_spec(rows: int, mesh: Mesh | None) -> P:
    """Leading-axis sharding of a per-node array stored with `rows` rows."""
    m = 1 if mesh is None else mesh.shape[AXIS]
    return P(AXIS) if m > 1 and rows >= m and rows % m == 0 else P()


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
    mapped); the rest are mapped. chunk = 0: vmap all local clients; chunk =
    k > 0: k at a time. With a mesh, each device handles its own shard of slots.
    """
    def chunk_fn(*args):
        shared, mapped = args[:n_shared], args[n_shared:]
        return jax.vmap(lambda *xs: fn(*shared, *xs))(*mapped), ()

    mapped = map_reduce_clients(chunk_fn, mesh, chunk, n_shared)
    return lambda *args: mapped(*args)[0]


def map_reduce_clients(chunk_fn: Callable, mesh: Mesh | None, chunk: int = 0, n_shared: int = 0,
                       n_local: int = 0) -> Callable:
    """Run `chunk_fn` over chunks of client slots and total its reductions.

    `chunk_fn(*shared, *mapped_chunk) -> (per_slot, sums)` handles a chunk of
    slots at once (typically a vmap over one client's function) and returns
    per-slot outputs plus sums over the chunk (e.g. per-federation sums of
    weighted updates). The result is `(per_slot for every slot, sums over all
    slots)`. Chunks run one after another (`lax.scan`) with the sums as the
    carry, so a chunk's full-size outputs die with it: memory is bounded by
    the chunk, not the client count. chunk = 0 runs all of a device's slots as
    one chunk (vmap: the fastest on accelerators); with a mesh each device runs
    its shard and the sums are all-reduced over devices.

    On a (`sweep`, `clients`) mesh only `clients` is named: under a vmap with
    `spmd_axis_name=SWEEP_AXIS` each group of devices maps its own points'
    slots and all-reduces within the group.

    n_local > 0 (a federation-local slot layout, `Topology.slot_layout`): the
    `n_local` arguments after the shared ones are per-federation rows laid out
    by device (`to_device_rows`): each device gets only its own rows, and the
    sums are per device row, left where they were formed (no all-reduce; the
    caller folds them back with `from_device_rows`).
    """
    def per_device(*args):
        # a device's own federation rows are shared by all its chunks, like the shared arguments
        shared, mapped = args[:n_shared + n_local], args[n_shared + n_local:]
        run = lambda xs: chunk_fn(*shared, *xs)
        n_slots = jax.tree.leaves(mapped)[0].shape[0]
        k = n_slots if chunk <= 0 else min(chunk, n_slots)
        n_full, rest = divmod(n_slots, k)
        if n_full == 1 and rest == 0:
            return run(mapped)
        head = jax.tree.map(lambda x: x[:n_full * k].reshape((n_full, k) + x.shape[1:]), mapped)
        first = jax.tree.map(lambda x: x[0], head)
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(run, first)[1])

        def body(total, xs):
            out, sums = run(xs)
            return jax.tree.map(jnp.add, total, sums), out

        sums, outs = jax.lax.scan(body, zero, head)
        outs = jax.tree.map(lambda x: x.reshape((n_full * k,) + x.shape[2:]), outs)
        if rest:  # the last, smaller chunk
            tail_out, tail_sums = run(jax.tree.map(lambda x: x[n_full * k:], mapped))
            outs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outs, tail_out)
            sums = jax.tree.map(jnp.add, sums, tail_sums)
        return outs, sums

    if mesh is None or mesh.size == 1:
        return per_device

    def on_device(*args):
        outs, sums = per_device(*args)
        return outs, sums if n_local else jax.lax.psum(sums, AXIS)

    def sharded(*args):
        specs = (P(),) * n_shared + (P(AXIS),) * (len(args) - n_shared)
        # manual over `clients` only: a model axis stays automatic inside (XLA splits the weights)
        manual = frozenset({AXIS}) if MODEL in mesh.axis_names else frozenset()
        return jax.shard_map(on_device, mesh=mesh, in_specs=specs, out_specs=(P(AXIS), P(AXIS) if n_local else P()),
                             axis_names=manual, check_vma=False)(*args)

    return sharded


def to_device_rows(tree, n_devices: int, rows_per_device: int, group: int):
    """Per-federation rows (F, ...) -> per-device rows (M x rows_per_device, ...)
    of a federation-local layout (`topology.federation_rows`): padded with
    copies of row 0 where F_pad > F (rows no real slot reads), repeated over a
    federation's group of devices where F < M."""
    def one(x):
        if group > 1:
            return jnp.repeat(x, group, axis=0)
        pad = n_devices * rows_per_device - x.shape[0]
        return x if pad == 0 else jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad,) + x.shape[1:])])
    return jax.tree.map(one, tree)


def from_device_rows(tree, n_federations: int, group: int):
    """Sums per device row -> per federation (the inverse of `to_device_rows`
    for sums: a federation's group adds up its devices' rows; padding rows go)."""
    def one(x):
        if group > 1:
            return jnp.sum(x.reshape((n_federations, group) + x.shape[1:]), axis=1)
        return x[:n_federations]
    return jax.tree.map(one, tree)


def configure_cpu_devices(n: int) -> None:
    """Ask XLA for `n` host devices (call before JAX initialises its backend)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def configure_cpu_bf16_matmuls() -> bool:
    """Let bf16 products run on the CPU's AMX / AVX512-BF16 units (`kernels.bf16_dense`).

    Adds `model.CPU_BF16_XLA_FLAG` (XLA's transpose folding off) to XLA_FLAGS, which
    XLA reads once, when JAX starts its backends. It is left out where it cannot take
    effect (backends already started) or would cost (JAX can reach an accelerator,
    whose compiler folds transposes into its matmuls for free). Returns whether the
    flag is in effect; without it bf16 products are still correct, only slower.
    """
    import importlib.util

    from jax._src import xla_bridge  # no public API says whether the backends have started

    from worldlm_jax.model.kernels import CPU_BF16_XLA_FLAG
    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_BF16_XLA_FLAG in flags:
        return True
    accelerator = os.environ.get("JAX_PLATFORMS", "") != "cpu" and any(
        importlib.util.find_spec(m) is not None
        for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "libtpu"))
    if xla_bridge.backends_are_initialized() or accelerator:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_BF16_XLA_FLAG}".strip()
    return True
