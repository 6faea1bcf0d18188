"""Strategies by name: one registered outside the package runs through the same
blueprint, round and deployment as the built-ins, and the built-ins keep their plans.

The user strategy here localises key layers per language FAMILY (level 1 of
world -> family -> language -> clients) instead of per language: K is owned by
the families, sent down to languages and clients, aggregated at languages and
families and never at the root; B flows to the root as in WorldLM.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_helpers import strategy_plan
from engine_helpers import make_batches, to_device, topo, tree2
from worldlm_jax import engine, model as model_lib
from worldlm_jax.config import AlgorithmConfig, ConfigError, apply_override, presets as configs
from worldlm_jax.engine import strategies
from worldlm_jax.plugins.registry import UnknownNameError
from worldlm_jax.run import blueprint
from worldlm_jax.tree.topology import Topology

ALL, BACKBONE = frozenset({"B", "K"}), frozenset({"B"})
FAMILY = "test_family_keys"


def family_plan(depth: int, algo: AlgorithmConfig) -> engine.Plan:
    """K lives at level 1: broadcast on the edges below it, aggregated there and below."""
    parts = tuple(BACKBONE if d < 1 else ALL for d in range(depth))
    return engine.Plan(broadcast=parts, aggregate=parts, owner={"B": 0, "K": 1}, residuals=algo.residuals,
                       similarity=algo.similarity, use_parent=algo.use_parent, residual_dim=algo.residual_dim)


strategies.register(FAMILY, strategies.StrategyDef(plan=family_plan, uses_key_layers=True))

FAMILIES = {"germanic": ("en", "de"), "slavic": ("pl", "ru")}


def family_config(name: str = FAMILY):
    """tiny, on world -> 2 families -> 2 languages -> 2 clients, one device."""
    cfg = configs.tiny()
    tree = {"name": "world", "children": [
        {"name": family, "children": [{"name": lang, "sources": [f"man_{lang}"], "clients": 2} for lang in langs]}
        for family, langs in FAMILIES.items()]}
    return dataclasses.replace(cfg, tree=tree, run=dataclasses.replace(cfg.run, devices=1, chunk=0),
                               algorithm=dataclasses.replace(cfg.algorithm, name=name))


@pytest.fixture(scope="module")
def family_run():
    """The registered strategy, picked by algorithm.name, trained two rounds on real tiny-model params."""
    run = blueprint.abstract_run(family_config())
    _, params = model_lib.init(run.model_def.config, jax.random.PRNGKey(0))
    state = run.strategy.init(params)
    batches = make_batches(run.run_topology, 2, batch=run.batch_size, seq_len=run.config.data.seq_len, vocab=256,
                           seed=3)
    for r, b in enumerate(batches):
        state, _ = run.strategy.run_round(state, to_device(b), jax.random.PRNGKey(r))
    return run, params, jax.tree.map(np.asarray, state)


def test_a_registered_strategy_runs_through_the_blueprint_in_one_compiled_round(family_run):
    run, _, _ = family_run
    assert run.spec.plan == family_plan(3, run.config.algorithm)
    assert run.run_topology.depth == 3 and run.run_topology.n_clients == 8  # its own tree: unchanged
    assert run.spec.key_paths  # uses_key_layers: algorithm.key_layers split the model
    assert run.strategy.run_round._cache_size() == 1  # two rounds, one compilation


def test_family_level_keys_are_shared_within_a_family_and_differ_between_families(family_run):
    run, params, state = family_run
    keys = sorted(run.spec.key_paths)
    ids = jnp.arange(8)  # clients in tree order: germanic (en 0-1, de 2-3), slavic (pl 4-5, ru 6-7)
    deployed = jax.tree.map(np.asarray, engine.deployed_params(run.spec, state, ids))
    for path, value in deployed.items():
        if path in run.spec.key_paths:
            for family in (slice(0, 4), slice(4, 8)):  # both languages of a family: one K
                assert np.all(value[family] == value[family][:1]), path
        else:  # B: the root's, everywhere
            assert np.all(value == value[:1]), path
    assert max(float(np.max(np.abs(deployed[p][0] - deployed[p][4]))) for p in keys) > 1e-6  # families differ
    # K was aggregated at the families and languages, never at the root
    level0, level1, level2 = state.levels
    assert all(np.array_equal(level0.K[p][0], params[p]) for p in keys)
    assert max(float(np.max(np.abs(level1.K[p][0] - params[p]))) for p in keys) > 1e-6
    assert max(float(np.max(np.abs(level2.K[p][0] - level2.K[p][1]))) for p in keys) > 1e-6  # en vs de


def test_a_registered_strategy_brings_its_own_tree_and_pooling():
    def flat_worldlm(depth, algo):
        return strategies.worldlm_plan(depth, algo.residuals, algo.similarity, algo.use_parent)

    strategies.register("test_flat_worldlm", strategies.StrategyDef(plan=flat_worldlm, topology=Topology.flattened,
                                                                    uses_key_layers=True))
    flat = blueprint.abstract_run(family_config("test_flat_worldlm"))
    assert flat.run_topology.depth == 1 and flat.run_topology.n_clients == 8
    assert flat.spec.plan.owner == {"B": 0, "K": 0} and flat.spec.key_paths

    strategies.register("test_pooled", strategies.StrategyDef(plan=lambda depth, algo: strategies.local_plan(),
                                                              topology=strategies.pooled_topology, pooled=True))
    pooled = blueprint.abstract_run(family_config("test_pooled"))
    assert pooled.run_topology.n_clients == 1 and not pooled.spec.key_paths
    assert pooled.batch_size == 8 * pooled.config.data.batch_size  # one client, everyone's tokens per round


def test_a_strategy_whose_plan_does_not_fit_the_tree_fails_naming_it():
    strategies.register("test_two_levels", strategies.StrategyDef(plan=lambda depth, algo: family_plan(2, algo)))
    with pytest.raises(ConfigError, match=r"algorithm.name='test_two_levels' on a depth-3 tree: plan has 2"):
        blueprint.abstract_run(family_config("test_two_levels"))
    with pytest.raises(TypeError, match="StrategyDef"):
        strategies.register("test_not_a_definition", family_plan)


def test_an_unknown_algorithm_name_gets_the_registry_one_line_error():
    with pytest.raises(UnknownNameError) as e:
        AlgorithmConfig(name="fedsgd")
    message = str(e.value)
    assert message.startswith("algorithm.name='fedsgd' is not a registered strategy; registered: ")
    assert "\n" not in message and FAMILY in message and "worldlm" in message
    assert "strategies.register" in message
    with pytest.raises(ConfigError, match=r"algorithm.name='fedsgd' is not a registered strategy"):
        apply_override(configs.tiny(), "algorithm.name=fedsgd")
    assert apply_override(configs.tiny(), f"algorithm.name={FAMILY}").algorithm.name == FAMILY


def test_the_built_ins_keep_their_plans_trees_and_flags():
    algo = AlgorithmConfig(residuals="all", similarity="neg_l2", use_parent=False, residual_dim=8)
    plan = lambda name, depth: strategies.get(name).plan(depth, algo)
    assert plan("fedavg", 1) == engine.Plan(broadcast=(ALL,), aggregate=(ALL,), owner={"B": 0, "K": 0})
    assert plan("hierfavg", 2) == engine.Plan(broadcast=(ALL, ALL), aggregate=(ALL, ALL), owner={"B": 0, "K": 0})
    assert plan("fedper", 1) == engine.Plan(broadcast=(BACKBONE,), aggregate=(BACKBONE,),
                                            client_keeps=frozenset({"K"}), owner={"B": 0, "K": 1})
    local = engine.Plan(broadcast=(frozenset(),), aggregate=(frozenset(),), client_keeps=ALL,
                        client_opt_persistent=True, owner={"B": 1, "K": 1})
    assert plan("local", 1) == plan("centralized", 1) == local
    # DiLoCo: HierFAVG's averaging, and the clients keep their optimizer state (not their parameters)
    assert plan("diloco", 2) == engine.Plan(broadcast=(ALL, ALL), aggregate=(ALL, ALL), client_opt_persistent=True,
                                            owner={"B": 0, "K": 0})
    assert dict(strategies.get("diloco").policy_defaults) == {"server_optimizer": "nesterov", "server_lr": 0.7}
    assert not any(strategies.get(n).policy_defaults for n in strategies.names() if n != "diloco"
                   and not n.startswith("test_"))
    assert plan("worldlm", 3) == engine.Plan(broadcast=(BACKBONE, BACKBONE, ALL), aggregate=(ALL, ALL, ALL),
                                             owner={"B": 0, "K": 2}, residuals="all", similarity="neg_l2",
                                             use_parent=False, residual_dim=8)
    assert strategy_plan("worldlm", 3, "all", "neg_l2", False, 8) == plan("worldlm", 3)

    t = topo(tree2([2, 3]), weights=[1, 2, 3, 4, 5])
    for name in ("worldlm", "hierfavg", "diloco"):
        assert strategies.get(name).topology(t) is t
    for name in ("fedavg", "fedper", "local"):
        flat = strategies.get(name).topology(t)
        assert flat.depth == 1 and flat.n_clients == 5
    pooled = strategies.get("centralized").topology(t)
    assert pooled.n_clients == 1 and pooled.client_weight.tolist() == [15.0]
    assert {n for n in strategies.names() if strategies.get(n).uses_key_layers} >= {"worldlm", "fedper"}
    assert not any(strategies.get(n).uses_key_layers for n in ("fedavg", "hierfavg", "local", "centralized", "diloco"))
    assert [n for n in ("worldlm", "fedavg", "hierfavg", "fedper", "local", "centralized", "diloco")
            if strategies.get(n).pooled] == ["centralized"]
