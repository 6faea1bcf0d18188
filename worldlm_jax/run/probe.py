"""The key layers chosen by a probe: which parameter groups a federation should
keep for itself, read from how their updates differ.

A probe trains HierFAVG (every group shared) for a few rounds and records, per
parameter group (`partition.parameter_groups`: a block's attention, its MLP, the
embeddings), the spread of the lowest federations' updates around their parent's
mean and the spread of the clients' updates around their federation's
(`level{d}/update_spread_group/<group>`). A group whose federations differ more
than their clients do is one the federations disagree on: the most divergent
groups become the key layers.

    probe_ranking        (group, between / within) from a probe's records, most divergent first
    probe_groups         the most divergent share of them (at least one, never all)
    resolve_key_layers   `algorithm.key_layers.auto: probe` for `worldlm train`: the probe run in
                         <workdir>/probe (skipped once finished), the choice written into the config

How `auto: probe` composes: the probe is an ordinary run of its own (checkpointed,
resumed, skipped when finished), so a resumed main run resolves to the same split
and its saved config.yaml (which holds the choice) compares equal. Differential
privacy is refused (the update spreads are no DP release: a DP federation hides
them), as are strategies without key layers, a tree without federations under
the root (no spread between federations), several processes (the ranking reads
process 0's metrics file), and every command that builds a run without training
it first (`worldlm plan`, vectorised sweeps: `blueprint.abstract_run` refuses an
unresolved `auto`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Sequence

import numpy as np

from worldlm_jax.config import Config, ConfigError, apply_overrides

PROBE_DIR, PROBE_FILE, PROBE_SHARE = "probe", "probe.json", 0.3


def probe_ranking(records: Sequence[dict], depth: int) -> list[tuple[str, float]]:
    """(group, between / within) from a probe run's metrics.jsonl records, most
    divergent first: `between` is the spread of the lowest federations' backbone
    updates around their parent's mean (`level{depth-2}/update_spread_group/<group>`),
    `within` the spread of the clients' updates around their federation's mean
    (`level{depth-1}/...`), each averaged over the federations and rounds that report
    one."""
    if depth < 2:
        raise ConfigError("a probe needs federations under the root (a tree of depth >= 2): with clients "
                          "straight under the root there is no spread between federations")
    prefix = {level: f"level{level}/update_spread_group/" for level in (depth - 2, depth - 1)}

    def spread(level: int) -> dict[str, float]:
        values: dict[str, list] = {}
        for record in records:
            for key, value in record.items():
                if key.startswith(prefix[level]):
                    values.setdefault(key[len(prefix[level]):], []).extend(np.ravel(np.asarray(value, np.float64)))
        return {g: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for g, v in values.items()}

    between, within = spread(depth - 2), spread(depth - 1)
    if not between:
        raise ConfigError("the probe run recorded no update_spread_group metrics; rerun it with this version")
    ratio = {g: between[g] / within[g] if within.get(g, 0) > 0 else math.nan for g in between}
    return sorted(ratio.items(), key=lambda item: (-item[1] if math.isfinite(item[1]) else math.inf, item[0]))


def probe_groups(ranking: Sequence[tuple[str, float]], share: float = PROBE_SHARE) -> tuple[str, ...]:
    """The most divergent ceil(share x groups) groups (at least one, never all)."""
    ranked = [g for g, r in ranking if math.isfinite(r)]
    if len(ranked) < 2:
        raise ConfigError("the probe ranked fewer than two parameter groups; nothing to split")
    return tuple(ranked[:min(max(1, math.ceil(share * len(ranked))), len(ranked) - 1)])


def groups_override(groups: Sequence[str]) -> str:
    """The `algorithm.key_layers` value (YAML) that localises `groups`."""
    return "{kind: groups, groups: [" + ", ".join(groups) + "]}"


def resolve_key_layers(config: Config, workdir: str, train_fn: Callable[..., dict],
                       say: Callable[[str], None] = print) -> Config:
    """`config` with `algorithm.key_layers.auto: probe` resolved: the probe trained
    (or found finished) in <workdir>/probe/, its ranking written to probe.json
    there, and the chosen groups as the key layers. Any other config: unchanged."""
    key_layers = config.algorithm.key_layers
    if key_layers.auto != "probe":
        return config
    check_probe(config)
    from worldlm_jax.outputs.metrics import METRICS_FILE, read_metrics
    from worldlm_jax.run.dirs import finished_summary
    from worldlm_jax.tree.topology import build_topology

    rounds = key_layers.probe_rounds or max(1, config.run.rounds // 10)
    probe_dir = os.path.join(workdir, PROBE_DIR)
    plain = dataclasses.replace(config.algorithm, key_layers=dataclasses.replace(key_layers, auto=""))
    probe_config = apply_overrides(dataclasses.replace(config, algorithm=plain),
                                   ["algorithm.name=hierfavg", f"run.rounds={rounds}", "run.callbacks=[]"])
    if finished_summary(probe_dir, rounds, stopped=False) is None:
        say(f"algorithm.key_layers.auto=probe: {rounds} round(s) of HierFAVG in {probe_dir} first")
        train_fn(probe_config, probe_dir, quiet=True, progress=False)
    depth = build_topology(config.run_tree(), root_policy=config.policy).depth
    ranking = probe_ranking([r for r in read_metrics(os.path.join(probe_dir, METRICS_FILE)) if "train_loss" in r],
                            depth)
    groups = probe_groups(ranking)
    with open(os.path.join(probe_dir, PROBE_FILE), "w") as f:
        json.dump({"rounds": rounds, "ranking": ranking, "groups": list(groups)}, f, indent=2)
    say(f"algorithm.key_layers.auto=probe localises {', '.join(groups)} (ranking in {probe_dir}/{PROBE_FILE})")
    return apply_overrides(config, [f"algorithm.key_layers={groups_override(groups)}"])


def dp_federations(config: Config) -> list[str]:
    """The names of the tree's federations whose policy uses DP: what a choice made
    from their updates or validation data would leak outside any release."""
    from worldlm_jax.tree.topology import build_topology

    topology = build_topology(config.run_tree(), root_policy=config.policy)
    return [name for level in topology.levels for name, p in zip(level.names, level.policies) if p.uses_dp]


def check_probe(config: Config) -> None:
    """Refuses what `auto: probe` cannot honestly do (the module docstring), one line each."""
    import jax

    from worldlm_jax.engine import strategies

    if not strategies.uses_key_layers(config.algorithm.name):
        raise ConfigError(f"algorithm.key_layers.auto=probe: algorithm.name={config.algorithm.name!r} has no key "
                          "layers to choose; use worldlm or fedper, or drop auto")
    private = dp_federations(config)
    if private or config.privacy.target_epsilon > 0:
        raise ConfigError("algorithm.key_layers.auto=probe ranks the groups on update spreads, which no DP release "
                          f"covers, and federation(s) {', '.join(private[:3]) or 'of privacy.target_epsilon'} use "
                          "DP; choose the split on the tree without DP (worldlm split-search --probe) and set it")
    if jax.process_count() > 1:
        raise ConfigError("algorithm.key_layers.auto=probe runs in one process for now; run the probe "
                          "(worldlm split-search --probe) and set the split it writes")
