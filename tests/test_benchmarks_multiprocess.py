"""benchmarks/multiprocess.py measures time in collectives from a JAX profiler trace:
it must see every run of every collective on every device (loop iterations too),
and none of the other thunks."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

HERE = os.path.dirname(os.path.abspath(__file__))


def _bench():
    path = os.path.join(HERE, "..", "benchmarks", "multiprocess.py")
    spec = importlib.util.spec_from_file_location("bench_multiprocess", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trace_counts_every_collective_run_on_every_device(tmp_path):
    bench = _bench()
    n = 4
    mesh = Mesh(np.array(jax.devices()[:n]), ("d",))

    def body(x):  # per device: x (2, 8)
        s = jax.lax.psum(x, "d")  # one all-reduce of f32[2,8]
        g = jax.lax.all_gather(x[0], "d")  # one all-gather -> f32[4,8]
        loop = jax.lax.fori_loop(0, 3, lambda i, y: jax.lax.psum(jnp.tanh(y), "d"), x[1])  # 3 runs of one
        return s + g.sum(0) + loop

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P("d"), check_vma=False))
    x = jax.device_put(jnp.ones((2 * n, 8)), NamedSharding(mesh, P("d")))
    jax.block_until_ready(f(x))
    hlo = f.lower(x).compile().as_text()
    collectives = bench.collectives_of(hlo)
    opcodes = sorted(op for op, _ in collectives.values())
    assert opcodes.count("all-gather") == 1 and opcodes.count("all-reduce") >= 2, collectives
    assert ("all-gather", 4 * 8 * 4) in collectives.values()  # result bytes: f32[4,8]
    module = bench.re.search(r"HloModule (\S+?),", hlo).group(1)

    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        jax.block_until_ready(f(x))
    devices = bench.read_trace(str(tmp_path), module, collectives)

    assert sorted(devices) == [str(i) for i in range(n)]
    runs = len(collectives) - 1 + 3  # the loop's psum runs 3 times
    for d in devices.values():
        assert len(d["ops"]) == runs, d["ops"]
        assert {op for op, _, _ in d["ops"]} == set(collectives)
        assert d["thunks"] > runs  # the other thunks were seen, and not counted
        assert 0 < d["collective_us"] <= sum(dur for _, _, dur in d["ops"]) + 0.01 * runs  # durations rounded
        assert d["collective_us"] <= d["span_us"]
