"""Determinism as docs/determinism.md states it: the same config and seed give
bit-identical rounds, simulated faults included; another seed draws other faults;
8 devices agree with 1 within the tolerance reduction order allows (test_engine)."""

from engine_helpers import (POLICY, assert_tree_equal, flat_tree, make_batches, make_spec, run, toy_params,
                            topo)
from worldlm_jax import engine

FAULTS = dict(dropout=0.3, stragglers=0.5, attack="noise", attackers=1, **POLICY)


def fresh_run(seed, n_rounds=2):
    """A strategy built and compiled anew (nothing shared with another call)."""
    t = topo(flat_tree(5, **FAULTS))
    strategy = engine.make_strategy(make_spec(t, client_optimizer="test_sgd"))
    return run(strategy, toy_params(), make_batches(t, n_rounds), seed=seed)


def test_same_config_and_seed_are_bit_identical_faults_included():
    state_a, metrics_a = fresh_run(seed=3)
    state_b, metrics_b = fresh_run(seed=3)
    assert_tree_equal(state_a, state_b)
    assert_tree_equal(metrics_a, metrics_b)
    assert sum(m["dropped"] for m in metrics_a) > 0 and sum(m["stragglers"] for m in metrics_a) > 0


def test_another_seed_draws_other_faults():
    _, metrics_a = fresh_run(seed=3, n_rounds=3)
    _, metrics_b = fresh_run(seed=4, n_rounds=3)
    draws = lambda ms: [(float(m["dropped"]), float(m["stragglers"]), float(m["tokens"])) for m in ms]
    assert draws(metrics_a) != draws(metrics_b)
