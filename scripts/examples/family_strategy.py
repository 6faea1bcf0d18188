"""A strategy: WorldLM with key layers localised per language family (the middle
level of world -> family -> language -> clients) instead of per language.

A strategy is a plan (where the backbone B and key layers K are broadcast,
aggregated and owned at each level) plus a tree transformation. Here B flows to
the root as in WorldLM; K is owned by the families: broadcast from a family to
its languages and their clients, aggregated with attention at the languages and
the families, never at the root. Languages of one family deploy one K.

    worldlm train --plugin scripts/examples/family_strategy.py --config scripts/examples/family_strategy.yaml
"""
from worldlm_jax.engine import Plan, strategies

B, BK = frozenset({"B"}), frozenset({"B", "K"})


def family_plan(depth, algorithm):
    if depth != 3:
        raise ValueError(f"worldlm_families needs a depth-3 tree (world -> family -> language), got depth {depth}")
    # use_parent=False: the root never trains K, so its K is no candidate for a family's attention
    return Plan(broadcast=(B, BK, BK), aggregate=(B, BK, BK), owner={"B": 0, "K": 1},
                residuals=algorithm.residuals, similarity=algorithm.similarity, use_parent=False)


strategies.register("worldlm_families", strategies.StrategyDef(plan=family_plan, uses_key_layers=True))
