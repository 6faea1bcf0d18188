"""The one jitted round for any tree, and the methods as plans. The map of a
root round is in `round`'s docstring; the modules in the order a round meets them:

    strategies      the paper's methods as registered plans (StrategyDef)
    plan            Plan and EngineSpec: what moves where, and the round's inputs
    statics         RoundStatics: the compile-time facts a round closes over
    releases        what each federation releases, through which path, under DP
    round_policies  RoundPolicies: the tree's rules as arrays over each level
    state           EngineState: stacked per-level and per-client state, padding, sharding
    round           make_round / make_strategy: the nested loop over the levels
    links           what crosses an edge: messages through the federations' codecs, error feedback
    partial_sync    the part of the backbone a federation syncs this round: fragments, intervals
    slots           the lowest federations' client slots, vmapped and chunked
    client          one client's local training
    federation      sums of the children and a federation's aggregation step
    aggregation     the server step and key-layer attention (similarities, residuals)
    parallel        the mesh, and mapping client chunks over its devices
    evaluate        validation of the deployed models

The names below are stable (`strategies.register` and `StrategyDef` included);
the modules' other names are not.
"""
from worldlm_jax.engine import strategies
from worldlm_jax.engine.plan import PARTS, EngineSpec, Plan, level_rounds, local_steps, split_parts
from worldlm_jax.engine.round import (Strategy, batch_shape, fed_round, federations_work, make_round,
                                      make_strategy, run_rounds, spec_policies)
from worldlm_jax.engine.round_policies import RoundPolicies, round_policies, sample_children
from worldlm_jax.engine.state import (Children, ClientState, EngineState, LevelState, RoundBatch, deployed_params,
                                      init_state, levels_worth_sharding, pad_state, place_state, repad_state,
                                      state_partition_specs, state_shardings, stored_rows, unpad_state)
from worldlm_jax.engine.statics import RoundStatics, round_statics

__all__ = [
    "strategies", "Strategy", "make_strategy", "make_round", "spec_policies", "fed_round", "federations_work",
    "run_rounds", "batch_shape",
    "RoundStatics", "round_statics", "EngineSpec", "Plan", "PARTS", "level_rounds", "local_steps", "split_parts",
    "RoundPolicies", "round_policies", "sample_children", "EngineState", "LevelState", "ClientState", "RoundBatch",
    "Children", "init_state", "deployed_params", "pad_state", "unpad_state", "repad_state", "place_state",
    "stored_rows", "state_partition_specs", "state_shardings", "levels_worth_sharding"]
