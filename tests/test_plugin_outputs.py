"""A registered entry that returns the wrong thing fails where the engine calls it:
one line naming the kind, the entry, its file and line, what it returned and
what was expected (`plugins.contract`), raised while the round is traced.

Each case registers a deliberately broken entry of one kind (a wrong shape, a
wrong dtype, a wrong tree structure), traces a toy round with `jax.eval_shape`
(no compilation: the check fires at trace time) and reads the message. The
CLI's side (exit status 2, one line, no traceback) is the `plugin-output-shape`
row of docs/errors.md, run by tests/test_bad_inputs.py.
"""
import dataclasses
import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from engine_helpers import make_batches, make_spec, toy_params, topo, tree2
from worldlm_jax import engine
from worldlm_jax.config import ConfigError
from worldlm_jax.plugins import aggregators, attacks, contract, objectives, optimizers, schedules

HERE = os.path.basename(__file__)


# ---- deliberately broken entries, one per kind and way of being wrong -------------------
def unreduced_rows(delta_N, weight_N, parent_N, n_parents, args_P):
    return delta_N  # forgot to reduce the children's rows to one per federation


def half_precision(delta_N, weight_N, parent_N, n_parents, args_P):
    return jax.tree.map(lambda x: jnp.zeros((n_parents,) + x.shape[1:], jnp.float16), delta_N)


def drops_a_leaf(delta_N, args_N):
    return {p: v for p, v in delta_N.items() if p != "head_bias"}


def per_token_loss(loss_fn, params, tokens, ctx):
    loss, n_tokens = loss_fn(params, tokens)
    return jnp.full(tokens.shape[:1], loss), (loss, n_tokens)  # a vector: not differentiable as a loss


def zeros_like_model(params):
    return jax.tree.map(jnp.zeros_like, params)


def report_params(ctx, params, steps, lr):
    return ctx.client, params


def bfloat16_state(state, mean_report, args):
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16), state)


def one_factor_per_round(round, warmup, decay, floor):
    return jnp.ones((3,))  # not a scalar


def backbone_only(update_B, update_K, key, args):
    return update_B  # not the pair (update_B, update_K)


def kept_per_child(delta_N, weight_N, parent_N, n_parents, args_P):
    return {"kept": (weight_N > 0).astype(jnp.float32)}  # one value per child, not per federation


def vector_metric(ctx, params, steps, lr):
    return {"lr": jnp.full((3,), lr)}  # a vector: one client reports one value per metric


def sgd_with_lost_state():
    tx = optax.sgd(1.0)
    return tx._replace(update=lambda updates, state, params=None: (updates, ()))  # drops its state


BROKEN_OBJECTIVE = objectives.ClientObjective(init_client=zeros_like_model, init_federation=zeros_like_model,
                                              after_training=report_params, update_federation=bfloat16_state)

# (id, registry, name, entry, the policy naming it, EngineSpec fields, the function that errs, words)
CASES = [
    ("aggregator-unreduced-rows", aggregators.AGGREGATORS, "broken_unreduced",
     aggregators.Aggregator(combine=unreduced_rows), {"aggregator": "broken_unreduced"}, {}, unreduced_rows,
     ["combine", "delta_P['blocks/0/norm/scale'] of shape (4, 4) float32", "expected (2, 4) float32",
      "n_parents = 2", "not one per child (4)"]),
    ("aggregator-wrong-dtype", aggregators.AGGREGATORS, "broken_dtype", aggregators.Aggregator(combine=half_precision),
     {"aggregator": "broken_dtype"}, {}, half_precision, ["of shape (2, 4) float16", "expected (2, 4) float32"]),
    ("aggregator-wrong-tree", aggregators.AGGREGATORS, "broken_tree", aggregators.Aggregator(transform=drops_a_leaf),
     {"aggregator": "broken_tree"}, {}, drops_a_leaf, ["transform", "delta_N with another tree structure",
                                                      "missing ['head_bias']"]),
    ("objective-loss-not-scalar", objectives.OBJECTIVES, "broken_loss", objectives.ClientObjective(loss=per_token_loss),
     {}, {"client_objective": "broken_loss"}, per_token_loss,
     ["client objective 'broken_loss' (loss", "value of shape (2,) float32", "expected a float scalar"]),
    ("objective-state-wrong-dtype", objectives.OBJECTIVES, "broken_state", BROKEN_OBJECTIVE,
     {}, {"client_objective": "broken_state"}, bfloat16_state,
     ["update_federation", "state['blocks/0/norm/scale'] of shape (4,) bfloat16",
      "expected (4,) float32"]),
    ("aggregator-metrics-per-child", aggregators.AGGREGATORS, "broken_metrics",
     aggregators.Aggregator(combine=aggregators.get("median").combine, metrics=kept_per_child),
     {"aggregator": "broken_metrics"}, {}, kept_per_child,
     ["(metrics", "metrics['kept'] of shape (4,) float32", "expected (2,)", "one value per federation"]),
    ("objective-metrics-not-scalar", objectives.OBJECTIVES, "broken_metrics", objectives.ClientObjective(
        metrics=vector_metric), {}, {"client_objective": "broken_metrics"}, vector_metric,
     ["client objective 'broken_metrics' (metrics", "metrics['lr'] of shape (3,) float32", "expected ()"]),
    ("schedule-not-scalar", schedules.SCHEDULES, "broken_schedule", one_factor_per_round,
     {"client_lr_schedule": "broken_schedule"}, {}, one_factor_per_round,
     ["learning-rate schedule 'broken_schedule'", "a factor of shape (3,) float32", "expected a real scalar"]),
    ("attack-not-a-pair", attacks.ATTACKS, "broken_attack", attacks.Attack(apply=backbone_only),
     {"attack": "broken_attack", "attackers": 1}, {}, backbone_only,
     ["attack 'broken_attack'", "returned one value of type dict, expected a pair (update_B, update_K)"]),
    ("optimizer-loses-its-state", optimizers.OPTIMIZERS, "broken_sgd", sgd_with_lost_state,
     {}, {"client_optimizer": "broken_sgd"}, sgd_with_lost_state,
     ["optimizer 'broken_sgd'", "state with another tree structure", "update(updates, state, params)"]),
]


@pytest.fixture
def register(monkeypatch):
    """Register an entry for one test: the name is gone from the registry afterwards
    (the registry-wide contract tests must not meet these)."""
    def add(registry, name, entry):
        monkeypatch.setitem(registry._entries, name, None)  # teardown deletes the name again
        registry.register(name, entry)
    return add


def trace_round(policy: dict, **spec_fields):
    """`jax.eval_shape` of one root round over root -> two federations of two
    clients: the round is traced (every plug-in called) and never compiled."""
    t = topo(tree2([2, 2], fed_policies=[dict(policy, local_steps=1)] * 2))
    spec = dataclasses.replace(make_spec(t), **spec_fields)
    strategy = engine.make_strategy(spec, jit=False)
    state = jax.eval_shape(strategy.init, toy_params())
    return jax.eval_shape(strategy.run_round, state, abstract_batch(t), jax.random.PRNGKey(0))


def abstract_batch(t):
    return engine.RoundBatch(*(jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in make_batches(t, 1)[0]))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_wrong_output_is_one_line_naming_the_entry_and_its_file(case, register):
    _, registry, name, entry, policy, spec_fields, culprit, words = case
    register(registry, name, entry)
    with pytest.raises(contract.PluginOutputError) as raised:
        trace_round(policy, **spec_fields)
    message = str(raised.value)
    assert "\n" not in message, message
    assert message.startswith(f"{registry.kind} {name!r} ("), message
    assert f"{HERE}:{inspect.getsourcelines(culprit)[1]}" in message, message  # the file and line it is defined at
    assert all(word in message for word in words), message


# the package's own entries (tests and examples register others into the same registries)
BUILT_IN = {"aggregator": ("mean", "clipped_mean", "median", "trimmed_mean", "multi_krum", "geometric_median"),
            "attack": ("none", "nan", "sign_flip", "scale", "noise", "constant", "key_takeover"),
            "client_lr_schedule": ("constant", "linear_warmup", "cosine", "warmup_cosine")}


def test_the_built_in_entries_pass_their_own_checks():
    """Every built-in aggregator, attack and schedule in one traced round (a level
    traces each kind it names), with FedProx's loss: the checks accept what the
    engine ships."""
    n = max(len(names) for names in BUILT_IN.values())
    policies = [dict({field: names[i % len(names)] for field, names in BUILT_IN.items()}, local_steps=1,
                     attackers=1) for i in range(n)]
    t = topo(tree2([2] * n, fed_policies=policies))
    strategy = engine.make_strategy(dataclasses.replace(make_spec(t), client_objective="fedprox"), jit=False)
    state = jax.eval_shape(strategy.init, toy_params())
    jax.eval_shape(strategy.run_round, state, abstract_batch(t), jax.random.PRNGKey(0))


def test_the_error_is_a_config_error_the_cli_prints_as_one_line():
    assert issubclass(contract.PluginOutputError, ConfigError)


def test_where_an_entry_is_defined_looks_through_wrappers():
    line = f"{HERE}:{inspect.getsourcelines(unreduced_rows)[1]}"
    assert contract.defined_at(unreduced_rows).endswith(line)
    assert contract.defined_at(jax.tree_util.Partial(unreduced_rows)).endswith(line)
    wrapped = schedules.SCHEDULES.get("constant")
    assert contract.defined_at(wrapped).endswith(".py:" + str(inspect.getsourcelines(wrapped)[1]))
    assert contract.defined_at(len) == "builtins"  # no source: its module


def test_a_structure_difference_names_the_missing_and_the_extra_leaves():
    entry = contract.Entry("aggregator", "x", unreduced_rows, "combine")
    expected = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    with pytest.raises(contract.PluginOutputError, match=r"missing \['b'\]; not expected \['c'\]"):
        contract.check_like(entry, {"a": jnp.zeros(2), "c": jnp.zeros(2)}, expected, "delta_P", "rule")
    with pytest.raises(contract.PluginOutputError, match=r"delta_P\['a'\] of type str, expected \(2,\) float32"):
        contract.check_like(entry, {"a": "text", "b": jnp.zeros(2)}, expected, "delta_P", "rule")
    contract.check_like(entry, {"a": jnp.ones(2), "b": np.ones(2, np.float32)}, expected, "delta_P", "rule")
