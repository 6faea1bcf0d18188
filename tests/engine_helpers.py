"""Shared helpers for the engine invariant tests: a toy LM, specs, batches, runs.

The toy model is a one-block "transformer" small enough that a jitted round
compiles in well under a second, with a 'blocks/0/...' block to serve as key
layers. Out-of-range tokens make its loss NaN (jnp.take fills with NaN), which
the tests use as garbage that must never leak into an aggregate.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from worldlm_jax import engine, optimizers, partition, strategies
from worldlm_jax.topology import build_topology

VOCAB = 11
D = 4
MARK = VOCAB - 1  # token that marks a batch for `nan_loss` (never in normal data)

# Plain client optimizer (exact, no adaptive state) for equivalence tests.
optimizers.register("test_sgd", lambda: optax.sgd(1.0))


def toy_params(seed: int = 0) -> dict:
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {
        "embed": 0.5 * jax.random.normal(k[0], (VOCAB, D), jnp.float32),
        "blocks/0/w": 0.5 * jax.random.normal(k[1], (D, D), jnp.float32),
        "blocks/0/norm/scale": 1.0 + 0.1 * jax.random.normal(k[2], (D,), jnp.float32),
        "head_bias": 0.1 * jax.random.normal(k[3], (VOCAB,), jnp.float32),
    }


TOY_KEY_PATHS = frozenset({"blocks/0/w", "blocks/0/norm/scale"})


def toy_loss(params, tokens_BxLp1):
    x, y = tokens_BxLp1[:, :-1], tokens_BxLp1[:, 1:]
    h = jnp.take(params["embed"], x, axis=0, mode="fill", fill_value=jnp.nan)
    h = jnp.tanh(h @ params["blocks/0/w"]) * params["blocks/0/norm/scale"] + h
    logits = h @ params["embed"].T + params["head_bias"]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.clip(y, 0, VOCAB - 1))
    return jnp.mean(nll), jnp.asarray(y.size, jnp.int32)


def nan_loss(params, tokens_BxLp1):
    """toy_loss, but NaN for any batch that contains the MARK token."""
    loss, n = toy_loss(params, tokens_BxLp1)
    return jnp.where(jnp.any(tokens_BxLp1 == MARK), jnp.nan, loss), n


def make_spec(topology, plan=None, *, loss_fn=toy_loss, key_paths=frozenset(), client_optimizer="adamw",
              chunk=0, max_update_norm=float("inf"), mesh=None, shard_state=True):
    plan = plan if plan is not None else strategies.averaging_plan(topology.depth)
    key_paths = frozenset(key_paths)
    return engine.EngineSpec(topology=topology, plan=plan, loss_fn=loss_fn, key_paths=key_paths,
                             key_groups=partition.key_groups(key_paths) if key_paths else {},
                             client_optimizer=client_optimizer, chunk=chunk, max_update_norm=max_update_norm,
                             mesh=mesh, sharded_levels=None if shard_state else frozenset())


def flat_tree(n_clients: int, **policy) -> dict:
    return {"name": "root", "clients": n_clients, "sources": ["s"], "policy": policy}


def tree2(sizes, root_policy=None, fed_policies=None) -> dict:
    """Depth-2 tree: root -> federations F0, F1, ... with `sizes[i]` clients."""
    fed_policies = fed_policies or [{}] * len(sizes)
    return {"name": "root", "policy": dict(root_policy or {}), "children": [
        {"name": f"F{i}", "clients": n, "sources": ["s"], "policy": dict(p)}
        for i, (n, p) in enumerate(zip(sizes, fed_policies))]}


def topo(spec, weights=None, slot_multiple=1):
    t = build_topology(spec)
    if weights is not None:
        t = t.with_client_weights(weights)
    return t.with_slot_multiple(slot_multiple)


def random_tokens(rng: np.random.Generator, shape, vocab: int = MARK) -> np.ndarray:
    """Normal data: tokens in [0, vocab) (the toy default never contains MARK)."""
    return rng.integers(0, vocab, size=shape).astype(np.int32)


def make_batches(topology, n_rounds: int, *, batch: int = 2, seq_len: int = 6, seed: int = 0,
                 weights=None, vocab: int = MARK):
    """Full participation batches: slot s of every leaf holds its clients in order,
    padding slots are -1 with weight 0 and garbage (out-of-range) tokens.
    Returns a list of numpy RoundBatch (tokens, slot_client, slot_weight)."""
    rng = np.random.default_rng(seed)
    shape = engine.batch_shape(topology, batch, seq_len)
    lead = shape[:-4]
    S = topology.n_slots
    slot_client = np.full(S, -1, np.int32)
    for leaf in range(topology.leaf.size):
        slot_client[topology.leaf_slots(leaf)] = np.flatnonzero(topology.client_parent == leaf)
    w = np.asarray(topology.client_weight if weights is None else weights, np.float32)
    slot_weight = np.where(slot_client >= 0, w[np.maximum(slot_client, 0)], 0.0).astype(np.float32)
    out = []
    for _ in range(n_rounds):
        tokens = random_tokens(rng, shape, vocab)
        tokens[..., slot_client < 0, :, :, :] = 10**6  # padding slots: garbage
        out.append(engine.RoundBatch(tokens, np.broadcast_to(slot_client, lead + (S,)).copy(),
                                     np.broadcast_to(slot_weight, lead + (S,)).copy()))
    return out


def to_device(batch):
    return engine.RoundBatch(*(jnp.asarray(x) for x in batch))


def run(strategy, params, batches, seed: int = 0):
    """Init from `params` and run one root round per batch; returns (state, metrics list)."""
    state = strategy.init(params)
    metrics = []
    for r, b in enumerate(batches):
        state, m = strategy.run_round(state, to_device(b), jax.random.PRNGKey(seed))
        metrics.append(jax.tree.map(np.asarray, m))
    return jax.tree.map(np.asarray, state), metrics


def assert_tree_close(a, b, atol=1e-6, rtol=1e-6, err=""):
    a_leaves, a_def = jax.tree.flatten(a)
    b_leaves, b_def = jax.tree.flatten(b)
    assert a_def == b_def, f"{err}: tree structures differ: {a_def} vs {b_def}"
    for path_a, x, y in zip(jax.tree_util.tree_flatten_with_path(a)[0], a_leaves, b_leaves):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol,
                                   err_msg=f"{err} {jax.tree_util.keystr(path_a[0])}")


def assert_tree_equal(a, b, err=""):
    assert_tree_close(a, b, atol=0, rtol=0, err=err)


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ---- strategies shared between test modules (one compilation per session) ----
import functools  # noqa: E402

STEPS, LR = 2, 0.05
POLICY = {"local_steps": STEPS, "client_lr": LR}
W3 = np.array([1.0, 2.0, 3.0], np.float32)


@functools.cache
def hier_single():
    """HierFAVG on root -> F0 (3 clients), slots padded to 4, NaN-able loss, SGD clients.
    k_agg: mean in the policy is irrelevant here (no key layers) but lets WorldLM
    runs on the same tree be compared with it."""
    t = topo(tree2([3], root_policy=dict(POLICY, k_agg="mean")), weights=W3, slot_multiple=4)
    return t, strategies.make_strategy(make_spec(t, loss_fn=nan_loss, client_optimizer="test_sgd"))


def lead(batches, n=1):
    """Add the nested-round axis to flat-tree batches."""
    return [engine.RoundBatch(*(np.broadcast_to(x, (n,) + x.shape).copy() for x in b)) for b in batches]
