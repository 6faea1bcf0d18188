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

from worldlm_jax import engine
from worldlm_jax.engine import strategies
from worldlm_jax.model import partition
from worldlm_jax.plugins import optimizers
from worldlm_jax.tree.topology import build_topology

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
    return t, engine.make_strategy(make_spec(t, loss_fn=nan_loss, client_optimizer="test_sgd"))


def lead(batches, n=1):
    """Add the nested-round axis to flat-tree batches."""
    return [engine.RoundBatch(*(np.broadcast_to(x, (n,) + x.shape).copy() for x in b)) for b in batches]


# ---- "equal up to summation order": tolerances that follow from the computation ----
# (docs/determinism.md states the argument; every comparison of runs that add the same
# numbers in another order - devices, sharded state, client chunks, processes - uses these.)
EPS32 = float(np.finfo(np.float32).eps)  # 2**-23, twice float32's unit roundoff
SAFETY = 10.0  # margin on a measured rounding sensitivity (one random sample of the noise)


def toy_summands(rounds: int, local_steps: int, children: int, batch: int = 2, seq_len: int = 6,
                 per_step: int | None = None) -> int:
    """An over-count of the float32 additions that can feed one element of a toy run.

    Per local step the gradient contracts over batch*seq_len tokens, VOCAB logits and D
    features (`per_step`: another model's count, e.g. `decoder_step_summands`); per round
    every level sums its children (`children`: the most children of one node, summed over
    the levels); rounds repeat it all. (A nested sum's error is bounded by the sum of its
    stages' lengths; counting every contraction of the model, not only those one element
    passes through, also covers modest cancellation, sum|t| / |sum t|.)"""
    per_step = batch * seq_len + VOCAB + D if per_step is None else per_step
    return rounds * (local_steps * per_step + children)


def decoder_step_summands(cfg, batch: int, seq_len: int) -> int:
    """`toy_summands`' per-step count for the real decoder (model.ModelConfig `cfg`): weight
    gradients contract over batch*seq_len tokens, the logits over the vocabulary and the
    model width, each layer over its width, MLP width and the attended positions."""
    return batch * seq_len + cfg.vocab_size + cfg.d_model + cfg.n_layers * (cfg.d_model + cfg.ff_dim + seq_len)


def toy_updates(rounds: int, local_steps: int, levels: int) -> int:
    """Roundings of a state element's own value in a toy run: each local step adds its step
    to the parameter, the client's delta subtracts the start, and each level adds the mean."""
    return rounds * (local_steps + 1 + levels)


def change(final, initial):
    """|final - initial| per element (float64): what a run added to each element (0 where
    both are the same infinity, e.g. an unclipped DP bound)."""
    def diff(f, i):
        f, i = np.asarray(f, np.float64), np.asarray(i, np.float64)
        with np.errstate(invalid="ignore"):
            return np.where(f == i, 0.0, np.abs(f - i))
    return jax.tree.map(diff, final, initial)


def ulp_perturbed(params, seed: int = 0):
    """`params` with every element moved to a neighbouring float32 (one ulp, up or down at
    random): the inputs of a run whose differences to the unperturbed run measure how much
    the program itself magnifies rounding noise (Monte Carlo arithmetic, Parker 1997)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in params.items():
        x = np.asarray(v, np.float32)
        out[k] = jnp.asarray(np.nextafter(x, np.where(rng.random(x.shape) < 0.5, -np.inf, np.inf).astype(np.float32)))
    return out


def _row_norms(x, like) -> np.ndarray:
    """2-norm of each row of `x` (broadcast to `like`'s shape, non-finite entries of `like`
    left out): one row per federation / client along the leading axis of a >= 2-d leaf; a
    scalar or a vector (one number per federation) is a single row."""
    like = np.asarray(like)
    x = np.where(np.isfinite(like), np.broadcast_to(np.asarray(x, np.float64), like.shape), 0.0)
    return np.linalg.norm(x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1), axis=1)


def summation_order_excess(a, b, reference_scale, n_summands: int, *, values=None, n_updates: int = 0,
                           amplification: float = 1.0, sensitivity=None, safety: float = SAFETY):
    """(ratio, where): the largest difference of a and b relative to the bound of
    `assert_close_up_to_summation_order`, over leaves and rows (<= 1: within it)."""
    assert jax.tree.structure(a) == jax.tree.structure(b), "tree structures differ"
    leaves = lambda t: jax.tree.leaves(t) if t is not None else [None] * len(jax.tree.leaves(b))
    trees = [jax.tree.leaves(b), leaves(reference_scale), leaves(values), leaves(sensitivity)]
    assert len({len(t) for t in trees}) == 1, "reference_scale / values / sensitivity: trees unlike a"
    worst, where = 0.0, ""
    for (path, x), y, scale, value, sens in zip(jax.tree_util.tree_flatten_with_path(a)[0], *trees):
        x, y, name = np.asarray(x), np.asarray(y), jax.tree_util.keystr(path)
        assert x.shape == y.shape, f"{name}: shapes {x.shape} vs {y.shape}"
        if x.size == 0:
            continue
        if not np.issubdtype(x.dtype, np.floating):  # counts, flags, round numbers: exact
            if not np.array_equal(x, y):
                return float("inf"), f"{name} (not a float: must be equal)"
            continue
        finite = np.isfinite(x)
        if not (np.array_equal(finite, np.isfinite(y)) and np.array_equal(x[~finite], y[~finite], equal_nan=True)):
            return float("inf"), f"{name} (non-finite entries differ)"
        scale_r = _row_norms(scale, x)
        with np.errstate(invalid="ignore"):
            diff_r = _row_norms(np.where(finite, x.astype(np.float64) - y, 0.0), x)
        bound_r = amplification * EPS32 * (n_summands * scale_r
                                           + (n_updates * _row_norms(value, x) if value is not None else 0.0))
        if sens is not None:
            sens_r = _row_norms(sens, x)
            # the leaf's measured noise relative to its scale, applied to every row (one sample
            # per row is too few: a row the perturbation happened to leave alone gets a margin)
            kappa = np.max(np.where(scale_r > 0, sens_r / np.where(scale_r > 0, scale_r, 1.0), 0.0))
            bound_r = bound_r + safety * np.maximum(sens_r, kappa * scale_r)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio_r = np.where(diff_r == 0, 0.0, diff_r / bound_r)
        r = int(np.argmax(ratio_r))
        if ratio_r[r] > worst:
            worst, where = float(ratio_r[r]), f"{name} row {r}: |a - b| = {diff_r[r]:.3g}, bound {bound_r[r]:.3g}"
    return worst, where


def assert_close_up_to_summation_order(a, b, reference_scale, n_summands: int, *, values=None, n_updates: int = 0,
                                       amplification: float = 1.0, sensitivity=None, safety: float = SAFETY,
                                       err: str = ""):
    """Assert that a and b, float32 results of one computation whose sums were added in
    different orders (devices, sharded rows, client chunks, processes), differ by no more
    than float32 rounding allows, whatever CPU (vector width, FMA, oneDNN) computed them.

    The argument. A float32 sum of n terms t_i, in any order, is within (n - 1) u sum|t_i|
    of the exact sum (u = eps32 / 2; Higham, Accuracy and Stability of Numerical Algorithms,
    sec. 4.2), so two orders are within n eps32 sum|t_i| of each other, and a chain of rounded
    operations adds its stages' errors (to first order). So, per leaf and per row r:

        |a_r - b_r| <= amplification * eps32 * (n_summands * |reference_scale_r|
                                                + n_updates * |values_r|)
                       + safety * sensitivity_r

    - `reference_scale` (a tree like a): what was summed, e.g. `change(final, initial)`, the
      sum of a run's updates; `n_summands` the additions that can feed one element
      (`toy_summands`);
    - `values` / `n_updates`: the roundings of an element's own value (x + step rounds at
      |x|; `toy_updates`);
    - `amplification`: how much what follows the sums magnifies their error, to be justified
      where it is passed (1: sums, means, plain SGD steps);
    - `sensitivity` (a tree like a): where that factor cannot be argued (a softmax over cosines
      of small deltas, an adaptive optimizer's division by sqrt(v)) it is measured, as
      |run(ulp_perturbed inputs) - run(inputs)| of the same program: the noise one rounding
      of every input grows into. `safety` times it (per leaf, relative to the scale) is added.

    Norms are 2-norms over a row (a federation / client along the leading axis of a >= 2-d
    leaf; a scalar or a vector leaf is one row): one element where an optimizer divides by a
    tiny sqrt(v) cannot fail it alone, while a wrong row (a dropped federation, a wrong
    gather) differs by the size of its change, orders of magnitude above the bound (the tests
    check that margin with `summation_order_excess`). Integer leaves and non-finite entries
    must be equal.
    """
    ratio, where = summation_order_excess(a, b, reference_scale, n_summands, values=values, n_updates=n_updates,
                                          amplification=amplification, sensitivity=sensitivity, safety=safety)
    assert ratio <= 1.0, f"{err} beyond float32 summation order ({ratio:.3g} x the bound): {where}"


def assert_trained_close(a, b, initial, *, rounds: int, local_steps: int, children: int, levels: int = 1,
                         sensitivity=None, amplification: float = 1.0, err: str = ""):
    """`assert_close_up_to_summation_order` for states (or parts, or deployed parameters) of
    two toy runs from `initial` (a tree like b, or broadcastable to it leaf by leaf): the
    scale is what the run added (b - initial), the values are b, the counts `toy_summands`
    and `toy_updates`. A dict `initial` may hold more keys than b (e.g. all the parameters)."""
    if isinstance(b, dict) and isinstance(initial, dict):
        initial = {k: initial[k] for k in b}
    assert_close_up_to_summation_order(
        a, b, change(b, initial), toy_summands(rounds, local_steps, children), values=jax.tree.map(np.abs, b),
        n_updates=toy_updates(rounds, local_steps, levels), sensitivity=sensitivity, amplification=amplification,
        err=err)


def with_distinct_residuals(state, level: int, n_rows: int, spread: float = 0.05, seed: int = 0):
    """`state` with the residual K of `level`'s first `n_rows` rows moved apart (spread * N(0, 1);
    added to the leaves, so they stay placed as they were and a round does not recompile). In a fresh state every residual equals the initial K, so
    every residual candidate's delta R_m - K_n is zero; the engine scores it from expanded dot
    products (|R|^2 - 2 <R, K> + |K|^2), whose value is then rounding noise that the attention
    softmax magnifies, and a wrong residual gather would be invisible. Distinct residuals make
    the round well-conditioned and every residual row matter."""
    lv = state.levels[level]
    rng = np.random.default_rng(seed)
    R = {}
    for p in sorted(lv.residual_K):
        x = lv.residual_K[p]
        noise = np.zeros(x.shape, x.dtype)
        noise[:n_rows] = spread * rng.standard_normal(noise[:n_rows].shape)
        R[p] = x + noise
    levels = list(state.levels)
    levels[level] = lv._replace(residual_K=R)
    return state._replace(levels=tuple(levels))


def strategy_plan(name: str, depth: int, residuals="siblings", similarity="cos_delta", use_parent=True,
                  residual_dim: int = 0):
    """The plan of registered strategy `name` for a tree of `depth`, with these algorithm fields."""
    from worldlm_jax.config import AlgorithmConfig

    algo = AlgorithmConfig(name=name, residuals=residuals, similarity=similarity, use_parent=use_parent,
                           residual_dim=residual_dim)
    return strategies.get(name).plan(depth, algo)
