"""Contracts that every registered entry keeps, whoever registered it (issue 20).

Each test is parametrised over a registry as it stands when the tests are
collected: the engine's own entries plus those of the example plug-ins in
scripts/examples (loaded below as `--plugin` loads them). An entry registered
later, in the package or in an example, is covered without a new test.

- aggregators (`aggregators.AGGREGATORS`): a streamed rule as the engine runs
  it (its `transform` row by row, then the weighted mean), a stacked rule's
  `combine`, and the `metrics` of those that report any (per federation);
- key-layer rules (`policy.K_AGG_MODES`, the k_agg names; a name's index is
  `AttentionPolicy.mode`): attention over the children's K
  (`aggregation.attend_keys`, any level), the streamed mean
  (`aggregation.mean_keys`), and each client's own mixture for `personalized`
  (`aggregation.personal_keys`);
- attacks (`attacks.ATTACKS`): what an attacker sends keeps the shape of its
  update, and every aggregator and key-layer rule stays finite with it among
  the children (after the engine's finiteness check);
- client objectives (`objectives.OBJECTIVES`) with a federation state: it is
  updated from the clients' reports as the engine does.

The contracts: (a) a child of weight 0 holding NaN, Inf or a huge finite value
changes nothing: the result is finite and equals the result without it; (b) a
padding child (weight 0, a federation's index, plausible values) changes
nothing; (c) relabelling the children changes no federation's result; (d) a
federation whose children are all absent gets a finite result (no update, its
K unchanged) and does not disturb the others.

Tolerances follow from the computation: results that differ only in the order
of a float32 sum differ by at most a few roundings per summed term, each at
most eps times the largest magnitude summed (`summation_tol`).
"""
import functools
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from worldlm_jax import plugins, tree_ops
from worldlm_jax.engine import aggregation, federation
from worldlm_jax.plugins import aggregators, attacks, objectives
from worldlm_jax.tree.policy import K_AGG_MODES

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "examples")
for _example in sorted(glob.glob(os.path.join(EXAMPLES, "*.py"))):
    plugins.load(_example)  # their aggregators and objectives are registry entries like any other

AGGREGATOR_NAMES = aggregators.AGGREGATORS.names()
ATTACK_NAMES = attacks.ATTACKS.names()
OBJECTIVE_NAMES = objectives.OBJECTIVES.names()

EPS = float(np.finfo(np.float32).eps)
ROUNDINGS = 4  # per summed term: its product, the addition, a cast and the division by the total
P = 3  # federations
SIZES = (4, 10, 5)  # children per federation (10: trimmed_mean's default 0.1 drops one at each end)
B_SHAPES = {"embed": (3, 2), "head": (4,)}
K_SHAPES = {"blocks/0/w": (2, 3), "blocks/1/w": (4,)}
GROUPS = {"blocks/0/w": 0, "blocks/1/w": 1}
TAU, ETA = 0.5, 0.7
POISONS = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "huge": 1e30}  # what an absent child may hold
INSERT_AT, INSERT_INTO = 5, 1  # where the extra zero-weight child goes (among the children, into federation 1)


# ---- data: fixed, small, children of three federations interleaved -------------------------
class Children:
    def __init__(self, B, K, w, parent):
        self.B, self.K, self.w, self.parent = B, K, np.asarray(w, np.float32), np.asarray(parent, np.int32)

    def rows(self, index):
        take = lambda t: {p: v[index] for p, v in t.items()}
        return Children(take(self.B), take(self.K), self.w[index], self.parent[index])

    def with_row(self, at, federation, B_value, K_value):
        """One more child of weight 0 in `federation`, inserted before child `at`."""
        ins = lambda t, value: {p: np.insert(v, at, np.broadcast_to(value(p, v.shape[1:]), v.shape[1:]), axis=0)
                                for p, v in t.items()}
        return Children(ins(self.B, B_value), ins(self.K, K_value), np.insert(self.w, at, 0.0),
                        np.insert(self.parent, at, federation))

    def absent(self, federation, value=np.nan):
        """Every child of `federation` absent (weight 0), its rows holding `value`."""
        gone = self.parent == federation
        fill = lambda t: {p: np.where(gone.reshape((-1,) + (1,) * (v.ndim - 1)), np.float32(value), v)
                          for p, v in t.items()}
        return Children(fill(self.B), fill(self.K), np.where(gone, 0.0, self.w), self.parent)


@functools.cache
def setup():
    """(node K, residual K, parent K, children): node federations' K, their
    related federations' K (residual candidates), the level above's K, and the
    children's backbone updates and K (each near its federation's)."""
    rng = np.random.default_rng(20)
    parent = rng.permutation(np.repeat(np.arange(P), SIZES)).astype(np.int32)  # not sorted by federation
    n = len(parent)
    normal = lambda shapes, rows, scale=1.0: {p: (scale * rng.normal(size=(rows,) + s)).astype(np.float32)
                                              for p, s in shapes.items()}
    node_K = normal(K_SHAPES, P)
    residual_K, parent_K = normal(K_SHAPES, P), normal(K_SHAPES, P)
    offset = normal(B_SHAPES, P)  # federations' children move differently
    B = {p: offset[p][parent] + 0.5 * v for p, v in normal(B_SHAPES, n).items()}
    K = {p: node_K[p][parent] + 0.3 * v for p, v in normal(K_SHAPES, n).items()}
    return node_K, residual_K, parent_K, Children(B, K, rng.uniform(0.5, 3.0, n), parent)


RESIDUAL_MASK = ~np.eye(P, dtype=bool)  # every federation may attend to the other two


def poisoned(kind):
    value = np.float32(POISONS[kind])
    return lambda path, shape: np.full(shape, value, np.float32)


def plausible(tree, row):
    """A padding child's values: a real child's row, scaled (as if it had trained)."""
    return lambda path, shape: 2.0 * tree[path][row]


# ---- tolerances ------------------------------------------------------------------------
def summation_tol(trees, terms, amplification=1.0):
    """Float32 bound for results that differ only in summation order: `terms`
    summed terms, each with ROUNDINGS roundings of at most eps times the largest
    finite magnitude in `trees`; `amplification` for a step that scales errors
    (attention's logits are similarities / tau)."""
    scale = max(float(np.max(np.abs(np.where(np.isfinite(v), v, 0.0)))) for t in trees for v in t.values())
    return ROUNDINGS * terms * EPS * scale * amplification


def assert_close(actual, expected, tol, err=""):
    for p in expected:
        a, e = np.asarray(actual[p]), np.asarray(expected[p])
        assert np.all(np.isfinite(a)), f"{err} {p}: not finite"
        np.testing.assert_allclose(a, e, rtol=0, atol=tol, err_msg=f"{err} {p}")


def rows_of(tree, index):
    return {p: np.asarray(v)[index] for p, v in tree.items()}


# ---- aggregators -------------------------------------------------------------------------
@functools.cache
def _aggregator(name):
    """The federations' backbone update under aggregator `name` as the engine
    computes it (federation.sum_children / aggregate_backbone): a streamed
    rule's `transform` on every row, then the weighted mean (a federation
    without weight gets 0); a stacked rule's `combine`."""
    rule = aggregators.get(name)

    def fn(B_N, w_N, parent_N, args_P):
        if rule.streamed:
            rows = B_N if rule.transform is None else rule.transform(B_N, {a: v[parent_N] for a, v in args_P.items()})
            return tree_ops.weighted_mean(rows, w_N, parent_N, P)[0]
        return rule.combine(B_N, w_N, parent_N, P, args_P)
    return jax.jit(fn)


def aggregate(name, kids):
    args = {a: jnp.full((P,), v, jnp.float32) for a, v in aggregators.get(name).args.items()}
    out = _aggregator(name)(kids.B, jnp.asarray(kids.w), jnp.asarray(kids.parent), args)
    return {p: np.asarray(v) for p, v in out.items()}


def aggregator_tol(kids):
    return summation_tol([kids.rows(kids.w > 0).B], len(kids.w))


@pytest.mark.parametrize("poison", sorted(POISONS))
@pytest.mark.parametrize("name", AGGREGATOR_NAMES)
def test_aggregator_ignores_a_zero_weight_child_whatever_it_holds(name, poison):
    kids = setup()[3]
    expected = aggregate(name, kids)
    with_row = kids.with_row(INSERT_AT, INSERT_INTO, poisoned(poison), poisoned(poison))
    assert_close(aggregate(name, with_row), expected, aggregator_tol(kids), f"{name} with a {poison} child")


@pytest.mark.parametrize("name", AGGREGATOR_NAMES)
def test_aggregator_ignores_a_padding_child(name):
    kids = setup()[3]
    padded = kids.with_row(len(kids.w), 0, plausible(kids.B, 1), plausible(kids.K, 1))  # padding slots come last
    assert_close(aggregate(name, padded), aggregate(name, kids), aggregator_tol(kids), name)


@pytest.mark.parametrize("name", AGGREGATOR_NAMES)
def test_aggregator_does_not_depend_on_the_childrens_order(name):
    kids = setup()[3]
    perm = np.random.default_rng(1).permutation(len(kids.w))
    assert_close(aggregate(name, kids.rows(perm)), aggregate(name, kids), aggregator_tol(kids), name)


@pytest.mark.parametrize("name", AGGREGATOR_NAMES)
def test_aggregator_gives_an_empty_federation_no_update_and_leaves_the_others(name):
    kids = setup()[3]
    expected = aggregate(name, kids)
    out = aggregate(name, kids.absent(INSERT_INTO))
    others = np.arange(P) != INSERT_INTO
    assert_close(rows_of(out, others), rows_of(expected, others), aggregator_tol(kids), name)
    for p, v in out.items():
        np.testing.assert_array_equal(v[INSERT_INTO], 0.0, err_msg=f"{name} {p}: an empty federation's update")


# ---- aggregators' metrics ------------------------------------------------------------------
METRIC_NAMES = [n for n in AGGREGATOR_NAMES if aggregators.get(n).metrics is not None]


@functools.cache
def _aggregator_metrics(name):
    """The per-federation metrics of aggregator `name` as the engine computes
    them: a stacked rule's as returned, a streamed rule's per-child values
    averaged over each federation's participants (federation.participant_sums)."""
    rule = aggregators.get(name)

    def fn(B_N, w_N, parent_N, args_P):
        if not rule.streamed:
            return rule.metrics(B_N, w_N, parent_N, P, args_P)
        values = rule.metrics(B_N, {a: v[parent_N] for a, v in args_P.items()})
        count = jax.ops.segment_sum((w_N > 0).astype(jnp.float32), parent_N, num_segments=P)
        return {m: s / jnp.maximum(count, 1.0) for m, s in federation.participant_sums(values, w_N > 0, parent_N,
                                                                                      P).items()}
    return jax.jit(fn)


def aggregate_metrics(name, kids):
    args = {a: jnp.full((P,), v, jnp.float32) for a, v in aggregators.get(name).args.items()}
    out = _aggregator_metrics(name)(kids.B, jnp.asarray(kids.w), jnp.asarray(kids.parent), args)
    return {m: np.asarray(v) for m, v in out.items()}


@pytest.mark.parametrize("poison", sorted(POISONS))
@pytest.mark.parametrize("name", METRIC_NAMES)
def test_aggregator_metrics_ignore_a_zero_weight_child_whatever_it_holds(name, poison):
    kids = setup()[3]
    with_row = kids.with_row(INSERT_AT, INSERT_INTO, poisoned(poison), poisoned(poison))
    assert_close(aggregate_metrics(name, with_row), aggregate_metrics(name, kids), 0.0, f"{name} with a {poison} child")


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_aggregator_metrics_ignore_a_padding_child_and_the_childrens_order(name):
    kids = setup()[3]
    expected = aggregate_metrics(name, kids)
    padded = kids.with_row(len(kids.w), 0, plausible(kids.B, 1), plausible(kids.K, 1))
    assert_close(aggregate_metrics(name, padded), expected, 0.0, f"{name} with a padding child")
    perm = np.random.default_rng(1).permutation(len(kids.w))
    assert_close(aggregate_metrics(name, kids.rows(perm)), expected, 0.0, f"{name} reordered")


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_aggregator_metrics_of_an_empty_federation_are_finite_and_leave_the_others(name):
    kids = setup()[3]
    expected = aggregate_metrics(name, kids)
    out = aggregate_metrics(name, kids.absent(INSERT_INTO))
    others = np.arange(P) != INSERT_INTO
    assert_close(rows_of(out, others), rows_of(expected, others), 0.0, name)
    assert all(np.isfinite(v[INSERT_INTO]) for v in out.values()), f"{name}: an empty federation's metrics"


# ---- key-layer rules -----------------------------------------------------------------------
def k_policy(mode):
    full = lambda v, dt=jnp.float32: jnp.full((P,), v, dt)
    return aggregation.AttentionPolicy(full(mode, jnp.int32), full(TAU), full(ETA), full(0.0), full(0.0))


@functools.cache
def _attend(similarity, robust):
    # `robust` is static in the engine: set where some federation's rule is robust_attention
    return jax.jit(lambda *a: aggregation.attend_keys(*a[:5], GROUPS, similarity, residual_K_M=a[5],
                                                      residual_mask_PxM=a[6], parent_K_P=a[7], robust=robust))


def attend(name, kids, similarity="cos_delta", robust=None):
    """Attention over the children's K (with residual candidates and the
    parent's K): (new K, info), as numpy. `robust` as the engine sets it for a
    level where every federation's rule is `name`, unless given."""
    node_K, residual_K, parent_K, _ = setup()
    robust = name == "robust_attention" if robust is None else robust
    out, info = _attend(similarity, robust)(
        node_K, kids.K, jnp.asarray(kids.w), jnp.asarray(kids.parent), k_policy(K_AGG_MODES.index(name)),
        residual_K, jnp.asarray(RESIDUAL_MASK), parent_K)
    return {p: np.asarray(v) for p, v in out.items()}, jax.tree.map(np.asarray, info)


@functools.cache
def _mean_keys():
    def fn(node_K, K_N, w_N, parent_N, policy):  # the leaf clients' K deltas, summed as they stream
        mean, total = tree_ops.weighted_mean(tree_ops.sub(K_N, tree_ops.gather(node_K, parent_N)), w_N, parent_N, P)
        return aggregation.mean_keys(node_K, mean, total, policy)
    return jax.jit(fn)


def mean_keys(name, kids):
    out = _mean_keys()(setup()[0], kids.K, jnp.asarray(kids.w), jnp.asarray(kids.parent),
                       k_policy(K_AGG_MODES.index(name)))
    return {p: np.asarray(v) for p, v in out.items()}


@functools.cache
def _personal():
    def fn(node_K, K_N, w_N, parent_N):
        n = w_N.shape[0]
        return aggregation.personal_keys(K_N, tree_ops.gather(node_K, parent_N), w_N, parent_N,
                                         jnp.full((n,), TAU), jnp.full((n,), ETA), GROUPS)
    return jax.jit(fn)


def personal(kids):
    out = _personal()(setup()[0], kids.K, jnp.asarray(kids.w), jnp.asarray(kids.parent))
    return {p: np.asarray(v) for p, v in out.items()}


def k_tol(kids):
    """Attention sums over every candidate (children, residuals, the parent);
    a logit's rounding is scaled by 1 / tau."""
    node_K, residual_K, parent_K, _ = setup()
    live = kids.rows(kids.w > 0)
    delta = {p: live.K[p] - node_K[p][live.parent] for p in K_SHAPES}
    return summation_tol([node_K, residual_K, parent_K, live.K, delta], len(kids.w) + P + 1, 1.0 + 1.0 / TAU)


def assert_same_attention(got, expected, keep, tol, err):
    """Same K and the same weights and diagnostics for the children `keep` of
    `got` (the children of `expected`, in order); the other children of `got`
    are absent: weight 0, K-delta norm 0, similarity 0, all finite."""
    (K, info), (K_e, info_e) = got, expected
    assert_close(K, K_e, tol, err)
    for field in info._fields:
        value = getattr(info, field)
        if value is None:
            continue
        assert np.all(np.isfinite(value)), f"{err}: {field} not finite"
    close = lambda a, b, what: np.testing.assert_allclose(a, b, rtol=0, atol=tol, err_msg=f"{err}: {what}")
    close(info.child_weight_N[keep], info_e.child_weight_N, "child weights")
    close(info.residual_weight_PxM, info_e.residual_weight_PxM, "residual weights")
    close(info.parent_weight_P, info_e.parent_weight_P, "parent weight")
    close(info.child_entropy_P, info_e.child_entropy_P, "entropy")
    close(info.delta_norm_N[keep], info_e.delta_norm_N, "K-delta norms")
    close(info.child_similarity_NxN[np.ix_(keep, keep)], info_e.child_similarity_NxN, "child similarity")
    gone = np.setdiff1d(np.arange(len(info.child_weight_N)), keep)
    for what, v in (("weight", info.child_weight_N[gone]), ("K-delta norm", info.delta_norm_N[gone]),
                    ("similarity", info.child_similarity_NxN[gone])):
        np.testing.assert_array_equal(v, 0.0, err_msg=f"{err}: an absent child's {what}")


def without_inserted(n):
    return np.delete(np.arange(n + 1), INSERT_AT)


@pytest.mark.parametrize("poison", sorted(POISONS))
@pytest.mark.parametrize("name", K_AGG_MODES)
def test_key_rule_ignores_a_zero_weight_child_whatever_it_holds(name, poison):
    kids = setup()[3]
    with_row = kids.with_row(INSERT_AT, INSERT_INTO, poisoned(poison), poisoned(poison))
    keep, tol = without_inserted(len(kids.w)), k_tol(kids)
    err = f"{name} with a {poison} child"
    assert_same_attention(attend(name, with_row), attend(name, kids), keep, tol, err)
    assert_close(mean_keys(name, with_row), mean_keys(name, kids), tol, f"{err} (streamed mean)")
    if name == "personalized":
        out, expected = personal(with_row), personal(kids)
        assert_close(rows_of(out, keep), expected, tol, f"{err} (personal mixtures)")
        for p in out:  # the absent child's own K comes back as it was
            np.testing.assert_array_equal(out[p][INSERT_AT], with_row.K[p][INSERT_AT])


@pytest.mark.parametrize("similarity", aggregation.SIMILARITIES)
def test_every_similarity_ignores_a_nan_child(similarity):
    kids = setup()[3]
    with_row = kids.with_row(INSERT_AT, INSERT_INTO, poisoned("nan"), poisoned("nan"))
    for name in K_AGG_MODES:  # robust: one program for every rule (the others' deltas are scaled by 1)
        assert_same_attention(attend(name, with_row, similarity, True), attend(name, kids, similarity, True),
                              without_inserted(len(kids.w)), k_tol(kids), f"{name}, {similarity}")


@pytest.mark.parametrize("name", K_AGG_MODES)
def test_key_rule_ignores_a_padding_child(name):
    kids = setup()[3]
    n = len(kids.w)
    padded = kids.with_row(n, 0, plausible(kids.B, 1), plausible(kids.K, 1))  # padding slots come last
    keep, tol = np.arange(n), k_tol(kids)
    assert_same_attention(attend(name, padded), attend(name, kids), keep, tol, name)
    assert_close(mean_keys(name, padded), mean_keys(name, kids), tol, f"{name} (streamed mean)")
    if name == "personalized":
        assert_close(rows_of(personal(padded), keep), personal(kids), tol, f"{name} (personal mixtures)")


@pytest.mark.parametrize("name", K_AGG_MODES)
def test_key_rule_does_not_depend_on_the_childrens_order(name):
    kids = setup()[3]
    perm = np.random.default_rng(1).permutation(len(kids.w))
    tol = k_tol(kids)
    (K, info), (K_e, info_e) = attend(name, kids.rows(perm)), attend(name, kids)
    assert_close(K, K_e, tol, name)
    np.testing.assert_allclose(info.child_weight_N, info_e.child_weight_N[perm], rtol=0, atol=tol)
    np.testing.assert_allclose(info.child_similarity_NxN, info_e.child_similarity_NxN[np.ix_(perm, perm)], rtol=0,
                               atol=tol)
    assert_close(mean_keys(name, kids.rows(perm)), mean_keys(name, kids), tol, f"{name} (streamed mean)")
    if name == "personalized":
        assert_close(personal(kids.rows(perm)), rows_of(personal(kids), perm), tol, f"{name} (personal mixtures)")


@pytest.mark.parametrize("name", K_AGG_MODES)
def test_key_rule_keeps_an_empty_federations_K_and_leaves_the_others(name):
    node_K, _, _, kids = setup()
    empty = kids.absent(INSERT_INTO)
    others, tol = np.arange(P) != INSERT_INTO, k_tol(kids)
    for rule, (out, expected) in (("attention", (attend(name, empty)[0], attend(name, kids)[0])),
                                  ("streamed mean", (mean_keys(name, empty), mean_keys(name, kids)))):
        assert_close(rows_of(out, others), rows_of(expected, others), tol, f"{name} ({rule})")
        for p in out:
            np.testing.assert_array_equal(out[p][INSERT_INTO], node_K[p][INSERT_INTO], err_msg=f"{name} ({rule}) {p}")
    if name == "personalized":
        mine = kids.parent == INSERT_INTO
        out, expected = personal(empty), personal(kids)
        assert_close(rows_of(out, ~mine), rows_of(expected, ~mine), tol, f"{name} (personal mixtures)")
        for p in out:  # absent children keep what they hold
            np.testing.assert_array_equal(out[p][mine], empty.K[p][mine])


# ---- attacks -------------------------------------------------------------------------------
@functools.cache
def _attack(name):
    return jax.jit(jax.vmap(attacks.get(name).apply))


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_an_attacker_keeps_its_updates_shape_and_every_rule_finite(name):
    """Client 0 of every federation attacks with the attack's default arguments
    (as `slots.attack_updates` runs it: vmapped, one key per client); the engine
    then gives a non-finite update weight 0 (`slots.train_chunk`, here without
    a norm bound); every aggregator and key-layer rule must stay finite."""
    node_K, _, _, kids = setup()
    attack = attacks.get(name)
    n = len(kids.w)
    update_K = {p: kids.K[p] - node_K[p][kids.parent] for p in K_SHAPES}
    args_N = {a: jnp.full((n,), v, jnp.float32) for a, v in attack.args.items()}
    sent_B, sent_K = _attack(name)(kids.B, update_K, jax.random.split(jax.random.PRNGKey(0), n), args_N)
    for sent, honest in ((sent_B, kids.B), (sent_K, update_K)):
        assert jax.tree.structure(sent) == jax.tree.structure(honest)
        assert all(s.shape == h.shape and s.dtype == h.dtype for s, h in zip(jax.tree.leaves(sent),
                                                                          jax.tree.leaves(honest)))
    attacker = np.array([np.flatnonzero(kids.parent == f)[0] for f in range(P)])
    is_attacker = np.isin(np.arange(n), attacker)
    B = jax.tree.map(np.asarray, tree_ops.where_rows(jnp.asarray(is_attacker), sent_B, kids.B))
    K_upd = jax.tree.map(np.asarray, tree_ops.where_rows(jnp.asarray(is_attacker), sent_K, update_K))
    valid = np.asarray(tree_ops.row_all_finite({**B, **K_upd}))
    attacked = Children(B, {p: node_K[p][kids.parent] + K_upd[p] for p in K_SHAPES}, np.where(valid, kids.w, 0.0),
                        kids.parent)
    for agg in AGGREGATOR_NAMES:
        assert all(np.all(np.isfinite(v)) for v in aggregate(agg, attacked).values()), f"{name} under {agg}"
    for rule in K_AGG_MODES:
        K, info = attend(rule, attacked)
        assert all(np.all(np.isfinite(v)) for v in K.values()), f"{name} under k_agg {rule}"
        assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(info)), f"{name} under k_agg {rule} (info)"
        assert all(np.all(np.isfinite(v)) for v in mean_keys(rule, attacked).values()), f"{name}, {rule} mean"
    out = personal(attacked)
    assert all(np.all(np.isfinite(v[attacked.w > 0])) for v in out.values()), f"{name} under personalized"


# ---- client objectives ---------------------------------------------------------------------
def _objective_params(kids):
    return {**kids.B, **kids.K}


@functools.cache
def _federation_state(name):
    """Each federation's objective state after one round, by the engine's path:
    every client's `after_training` report, summed by weight
    (`tree_ops.weighted_sum`, federation.sum_children), divided by the
    federation's total, `update_federation` where some client took part
    (federation.update_objective)."""
    obj = objectives.get(name)

    def fn(start_P, params_N, w_N, parent_N):
        start_N = tree_ops.gather(start_P, parent_N)
        n = w_N.shape[0]
        client_N = jax.vmap(obj.init_client)(start_N) if obj.init_client is not None else {}
        fed_P = jax.vmap(obj.init_federation)(start_P) if obj.init_federation is not None else {}
        args_P = {a: jnp.full((P,), v, jnp.float32) for a, v in obj.args.items()}
        ctx = objectives.ObjectiveContext(start_N, client_N, tree_ops.gather(fed_P, parent_N),
                                          {a: v[parent_N] for a, v in args_P.items()})
        _, report_N = jax.vmap(obj.after_training)(ctx, params_N, jnp.full((n,), 2.0), jnp.full((n,), 0.1))
        total_P = jax.ops.segment_sum(w_N, parent_N, num_segments=P)
        sums = tree_ops.weighted_sum(report_N, w_N, parent_N, P)
        mean = jax.tree.map(lambda s: s / tree_ops.expand_rows(jnp.where(total_P > 0, total_P, 1.0), s), sums)
        updated = jax.vmap(obj.update_federation)(fed_P, mean, args_P)
        return tree_ops.where_rows(total_P > 0, updated, fed_P)
    return jax.jit(fn)


def federation_state(name, kids):
    node_K, _, _, _ = setup()
    start_P = {**{p: np.zeros((P,) + s, np.float32) for p, s in B_SHAPES.items()}, **node_K}
    out = _federation_state(name)(start_P, _objective_params(kids), jnp.asarray(kids.w), jnp.asarray(kids.parent))
    return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize("name", OBJECTIVE_NAMES)
def test_an_objectives_federation_state_ignores_absent_clients(name):
    """(a)-(d) for the state a federation keeps for its objective (SCAFFOLD's
    control variate): a diverged client's NaN report, a padding client, the
    clients' order, and a federation nobody reported to (state kept)."""
    if objectives.get(name).update_federation is None:
        pytest.skip(f"{name}: no federation state (each client's loss is its own: no rows to mix)")
    kids = setup()[3]
    expected = flat(federation_state(name, kids))
    tol = summation_tol([_objective_params(kids)], len(kids.w), 1.0 / (2.0 * 0.1))  # reports are scaled by 1/(steps lr)
    for case, other in (("nan", kids.with_row(INSERT_AT, INSERT_INTO, poisoned("nan"), poisoned("nan"))),
                        ("padding", kids.with_row(len(kids.w), 0, plausible(kids.B, 1), plausible(kids.K, 1))),
                        ("permuted", kids.rows(np.random.default_rng(1).permutation(len(kids.w))))):
        assert_close(flat(federation_state(name, other)), expected, tol, f"{name}: {case}")
    empty = flat(federation_state(name, kids.absent(INSERT_INTO)))
    initial = flat(federation_state(name, Children(kids.B, kids.K, np.zeros_like(kids.w), kids.parent)))
    others = np.arange(P) != INSERT_INTO
    assert_close(rows_of(empty, others), rows_of(expected, others), tol, f"{name}: an empty federation's siblings")
    for p in empty:
        np.testing.assert_array_equal(empty[p][INSERT_INTO], initial[p][INSERT_INTO], err_msg=f"{name} {p}")


def flat(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
