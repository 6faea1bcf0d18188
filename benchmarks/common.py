"""Shared set-up for the benchmarks: XLA flags, workload W through the real engine, timing.

Import order matters: `configure(...)` sets XLA_FLAGS and must run before the
first `import jax` of the process (the benchmark scripts call it from `main`
before importing anything that imports JAX).
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Workload W (the issue): fixed so numbers stay comparable across changes.
W = dict(preset="w", clients=16, steps=5, batch=8, seq=128, client_lr=3e-4)


def configure(devices: int = 0, eigen_threads: str = "auto", extra_flags: str = "") -> None:
    """Set XLA_FLAGS before JAX starts.

    devices > 0: that many host devices (one per core is the recommended CPU set-up).
    eigen_threads: 'auto' (multi-threaded Eigen unless devices > 1), 'on', 'off'.
    """
    if "jax" in sys.modules and devices:
        raise RuntimeError("configure() must run before jax is imported")
    flags = os.environ.get("XLA_FLAGS", "").split()
    if devices and not any("xla_force_host_platform_device_count" in f for f in flags):
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    if eigen_threads == "auto":
        eigen_threads = "off" if devices and devices > 1 else "on"
    if eigen_threads == "off" and not any("xla_cpu_multi_thread_eigen" in f for f in flags):
        flags.append("--xla_cpu_multi_thread_eigen=false")
    flags += extra_flags.split()
    os.environ["XLA_FLAGS"] = " ".join(flags)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} CPU(s), {platform.processor() or platform.platform()}"


def median(xs):
    return float(statistics.median(xs))


class Workload(NamedTuple):
    spec: Any
    strategy: Any
    model_def: Any
    params: dict
    batch: Any  # RoundBatch, placed (sharded along slots when there is a mesh)
    clients_fn: Any  # jitted: the same mapped client function alone (no aggregation)
    client_args: tuple
    flops_per_client_step: float
    n_clients: int
    steps: int


def tree_spec(clients: int, depth: int, steps: int, client_lr: float, federations_per_round=None) -> dict:
    """A tree of `depth` levels over `clients` clients (2-way fan-out above the leaves)."""
    policy = {"local_steps": steps, "client_lr": client_lr, "server_optimizer": "sgd", "server_lr": 1.0,
              "rounds": 1, "federations_per_round": federations_per_round}
    if depth == 1:
        return {"name": "root", "clients": clients, "sources": ["x"], "policy": policy}
    n_leaf = 2 ** (depth - 1)
    if clients % n_leaf:
        raise ValueError(f"clients={clients} must be divisible by {n_leaf} leaf federations for depth {depth}")

    def node(name, level):
        if level == depth - 1:
            return {"name": name, "clients": clients // n_leaf, "sources": ["x"]}
        return {"name": name, "children": [node(f"{name}.{i}", level + 1) for i in range(2)]}

    root = node("root", 0)
    root["policy"] = policy
    return root


def build(clients=16, steps=5, preset="w", chunk=0, devices=1, depth=1, dtype="float32", batch=8, seq=128,
          client_lr=3e-4, seed=0, federations_per_round=None, **model_overrides) -> Workload:
    """Workload W (or a variant) through the engine's own round: FedAvg/HierFAVG plan."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from worldlm_jax import engine, model
    from worldlm_jax.engine import client as client_lib, parallel, strategies
    from worldlm_jax.plugins import optimizers
    from worldlm_jax.tree import topology

    topo = topology.build_topology(tree_spec(clients, depth, steps, client_lr, federations_per_round))
    mesh = parallel.make_mesh(devices) if devices > 1 else None
    topo = topo.with_slot_multiple(devices if devices > 1 else 1)
    cfg = model.preset(preset, dtype=dtype, max_len=max(seq, model.preset(preset).max_len), **model_overrides)
    model_def, params = model.init(cfg, jax.random.PRNGKey(seed))
    plan = strategies.averaging_plan(topo.depth)
    spec = engine.EngineSpec(topology=topo, plan=plan, loss_fn=model_def.loss, key_paths=frozenset(),
                             key_groups={}, client_optimizer="adamw", chunk=chunk, mesh=mesh)
    strategy = engine.make_strategy(spec)

    shape = engine.batch_shape(topo, batch, seq)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, shape, dtype=np.int32)
    n_lead = len(engine.level_rounds(topo))
    S = topo.n_slots
    slot_client = np.full(shape[:n_lead] + (S,), -1, np.int32)
    slot_client[..., :clients] = np.arange(clients)
    slot_weight = (slot_client >= 0).astype(np.float32)
    if mesh is not None:
        sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*([None] * n_lead), parallel.AXIS))
        tok = jax.device_put(tokens, sh)
    else:
        tok = jnp.asarray(tokens)
    rb = engine.RoundBatch(tok, jnp.asarray(slot_client), jnp.asarray(slot_weight))

    # The engine's client path alone (engine.run_clients without aggregation):
    # fresh AdamW per client, scan over local steps, mapped over slots.
    tx = optimizers.get("adamw")
    hetero = len({p.local_steps for p in topo.leaf.policies}) > 1
    local_update = client_lib.make_local_update(model_def.loss, tx, masked_steps=hetero)

    def one(p, _o, t, lr, st):
        return local_update(p, tx.init(p), t, lr, st)

    mapped = parallel.map_clients(one, mesh, chunk)

    def clients_only(params, tokens_SxExBxL1):
        stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (S,) + x.shape), params)
        res = mapped(stacked, jnp.zeros((S,)), tokens_SxExBxL1, jnp.full((S,), client_lr, jnp.float32),
                     jnp.full((S,), steps, jnp.int32))
        return res.params, res.loss_sum

    clients_fn = jax.jit(clients_only)
    inner_tokens = tok
    for _ in range(n_lead):  # nested rounds: one innermost round's tokens
        inner_tokens = inner_tokens[0]
    flops = model.flops_per_token(cfg, seq) * batch * seq
    return Workload(spec, strategy, model_def, params, rb, clients_fn, (params, inner_tokens), flops,
                    clients, steps)


def time_round(w: Workload, state, key):
    import jax
    t = time.perf_counter()
    state, metrics = w.strategy.run_round(state, w.batch, key)
    jax.block_until_ready((state, metrics))
    return state, metrics, time.perf_counter() - t


def time_clients(w: Workload) -> float:
    import jax
    t = time.perf_counter()
    jax.block_until_ready(w.clients_fn(*w.client_args))
    return time.perf_counter() - t


def matmul_peak_gflops(devices: int = 1, n: int = 2048, reps: int = 5, dtype: str = "float32") -> float:
    """Measured matmul FLOP/s of the whole machine in the current XLA set-up.

    dtype: the operands' dtype; products accumulate in float32 either way.
    Best of: one matmul on one device, and one independent matmul per device at
    once (shard_map over all devices). The larger is used, so MFU is conservative.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    best = 0.0
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32)).astype(dtype)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    jax.block_until_ready(f(x, x))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(x, x))
        times.append(time.perf_counter() - t)
    best = max(best, 2 * n ** 3 / min(times) / 1e9)
    if devices > 1:
        from worldlm_jax.engine import parallel
        mesh = parallel.make_mesh(devices)
        xs = jax.device_put(jnp.broadcast_to(x, (devices, n, n)), parallel.sharded(mesh))
        g = jax.jit(jax.shard_map(lambda a: jnp.einsum("bij,bjk->bik", a, a, preferred_element_type=jnp.float32),
                                  mesh=mesh,
                                  in_specs=jax.sharding.PartitionSpec(parallel.AXIS),
                                  out_specs=jax.sharding.PartitionSpec(parallel.AXIS)))
        jax.block_until_ready(g(xs))
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(g(xs))
            times.append(time.perf_counter() - t)
        best = max(best, devices * 2 * n ** 3 / min(times) / 1e9)
    return best
