"""What one root round holds on each device, in bytes, from the run's abstract half
(`blueprint.abstract_run`): no data is loaded, nothing is allocated.

`estimate(run)` adds up, per device:

  federation state         every level's B, K, server optimizer states, residual K
                           (and the clients' kept state) as stored: sharded along
                           the node axis where a level is wide enough
  federation working copy  the levels' rows the round works on, whole (a
                           federation-local leaf level: the device's own rows)
  aggregation sums         per-federation sums of the clients' updates (the
                           device's own federations' under a local layout)
  batch                    the round's token block, sharded along the slot axis
  parameters               per client in flight (a chunk of `run.chunk` per
                           device): broadcast copy, weights, gradients
  optimizer states         the chunk's client optimizer states
  activations              what one local step's backward keeps, per client of
                           the chunk (the model's VJP residuals: remat and bf16 show)
  per-slot copies          what outlives a chunk for every slot of the device

On a model axis of k devices (`run.model_parallel`) the slots shard over the
`clients` axis only, and every weight-shaped component is the device's split of
it (`parallel.model_dim`: matrices over k, vectors whole); a client's
activations fall by k where k divides its batch (`parallel.constrain_batch`).

`compiled_memory(run)` is XLA's own figure for the same round: lowered and
compiled on abstract inputs, `memory_analysis()` (arguments + outputs - aliased
+ temporaries). Both are what `memory_plan.py` weighs against the device.
Not counted: the evaluator (a separate, smaller program) and the first stage of
a `staged` schedule.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from worldlm_jax import engine
from worldlm_jax.plugins import aggregators, optimizers
from worldlm_jax.engine.statics import device_rows
from worldlm_jax.run.blueprint import AbstractRun
from worldlm_jax.tree.policy import ATTENDING

# Share of the VJP residuals (what the backward reads, as JAX traces it) that
# XLA keeps as buffers: it fuses elementwise chains (GELU, LayerNorm) and
# recomputes them in the backward. Measured on XLA:CPU: 0.6 (small) to 0.7 (paper-125m).
ACTIVATION_FUSION = 0.7


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


def split_bytes(tree, k: int) -> int:
    """Bytes of one device's share of a weight-shaped pytree split over a model
    axis of k devices (`parallel.model_dim`)."""
    from worldlm_jax.engine import parallel
    return sum(_nbytes(x) // (k if parallel.model_dim(tuple(x.shape), k) is not None else 1)
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
    from worldlm_jax.engine import parallel
    spec, topo, plan = run.spec, run.run_topology, run.spec.plan
    m = run.mesh.shape[parallel.AXIS] if spec.mesh is not None else 1  # devices the slots shard over
    split = parallel.model_size(spec.mesh)
    slots = topo.n_slots // m
    k = slots if spec.chunk <= 0 else min(spec.chunk, slots)
    params = run.params
    P = split_bytes(params, split)
    parts = engine.split_parts(params, spec.key_paths)
    opt = split_bytes(jax.eval_shape(optimizers.get(spec.client_optimizer).init, params), split)
    acts = activation_bytes(run.model_def, params, run.batch_size, run.config.data.seq_len)
    acts = acts // split if run.batch_size % split == 0 else acts

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
                        and any(p.k_agg in ATTENDING for p in topo.leaf.policies))
    kept = sum(split_bytes(parts[part], split) for part in plan.client_keeps)
    per_slot = 2 * kept + (3 * split_bytes(parts["K"], split) if leaf_k_attention else 0)
    if plan.client_opt_persistent:
        per_slot += 2 * opt
    # A stacked aggregator (`aggregators`: median, trimmed mean) needs every
    # slot's backbone update (the chunk's output, the stacked outputs, and one
    # leaf-sized (federations x slots) temporary at a time while it combines).
    if "B" in plan.aggregate[leaf] and any(not aggregators.get(p.aggregator).streamed for p in topo.leaf.policies):
        per_slot += 2 * split_bytes(parts["B"], split)
    # Per-federation sums of the leaf level's updates: each chunk's, plus the
    # chunk loop's carry when a device runs more than one chunk (DP's clipped
    # sums add nothing XLA keeps apart: measured on small).
    # Under a federation-local slot layout (`statics.device_rows`) a device reads and
    # sums into its own L rows of the leaf level, not all F of them.
    summed = sum(split_bytes(parts[part], split) for part in plan.aggregate[leaf])
    n_sets = 1 if slots == k else 2
    local = device_rows(spec)
    leaf_rows = topo.leaf.size if local is None else local[1]
    sums = n_sets * leaf_rows * summed
    batch = device_bytes(run.abstract_batch())
    working = jax.eval_shape(lambda s: engine.unpad_state(spec, s), state)
    leaf_working = split_bytes(working.levels[leaf], split)
    components = {
        "federation state": fed_state,
        # the levels' rows the round works on and their new values: whole on
        # every device (a sharded level is gathered for the round's segment
        # sums, gathers and attention; only its storage is split), but for a
        # federation-local leaf level: the device's own rows
        "federation working copy": (split_bytes(working, split) - leaf_working
                                    + leaf_working * leaf_rows // topo.leaf.size),
        "aggregation sums": sums,
        "batch": batch,
        # per client in flight: the broadcast copy, the weights being trained, their gradients
        "parameters": k * 3 * P,
        "optimizer states": k * opt,
        "activations": int(k * ACTIVATION_FUSION * acts),
        "per-slot copies": slots * per_slot,
    }
    facts = {"devices": m * split, "model_parallel": split, "chunk": k, "slots_per_device": slots, "params_bytes": P, "opt_bytes": opt,
             "activation_bytes_per_client": acts, "per_slot_bytes": per_slot}
    return components, levels, facts


# ---- XLA's figure ----------------------------------------------------------------
# LLVM's optimisation level does not change XLA's buffer assignment (the same figure
# for tiny, small and paper-125m) but shortens compiling on CPU (tiny: ~19 s -> ~11 s).
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def lower_round(run: AbstractRun):
    """The jitted round lowered on abstract inputs placed as training places them."""
    return run.strategy.run_round.lower(run.abstract_state(), run.abstract_batch(), run.abstract_key(),
                                        run.abstract_policies())


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
