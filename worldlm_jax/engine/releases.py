"""What each federation releases, in one place: every path along which what a
federation learnt from its children leaves it, and whether that path goes
through the federation's DP release.

A DP federation (`dp_noise_multiplier > 0`, or a finite `dp_clip`) protects
each of its children (a client, or a child federation with its whole subtree)
against everything it lets out: its own state once aggregated (which it
broadcasts down and sends up), and anything a child's data reaches outside
that child by another path. The paths of one round (`engine.py`):

| path        | what leaves a child of federation F                      | private when                          |
|-------------|----------------------------------------------------------|---------------------------------------|
| aggregate B | F's backbone from its children's B deltas                | always: the clipped, noised mean      |
| aggregate K | F's key layers from its children's K                     | `dp_scope: all` (or `k_agg: local`)   |
| personal K  | each client's K mixed from its siblings' trained K       | never: refused under DP               |
| residuals   | a federation's K as another federation's attention candidate | neither lies under a DP federation that tells them apart |
| objective   | the client objective's federation state (SCAFFOLD's c)   | never: refused under DP               |
| client metrics | each client's loss, update norm and weight, logged (`run.client_metrics`) | never: refused under DP |

The parent's K as a candidate flows into F (it is the parent's own state, already
released), and metrics are diagnostics: they are logged, never sent to a
federation. Per-client values are logged only without DP, and a plug-in's
metrics are null at a DP federation (`federation.shown_at`), as are the built-in
statistics of its children's raw updates: `update_spread`, the exact
`dp_clipped_fraction` (an adaptive clip reports the noised fraction it released)
and, where K is released (`dp_scope: all`), the attention diagnostics
(`federation.hide_attention_at_dp`). None lets out what the federation's
release would not. `check(spec)` runs when a round is
built (`statics.round_statics`), so every entry point (CLI, `train`, sweeps, a
user's own driver) refuses a configuration that would let a child's data out
without noise, with one line naming both fields; docs/errors.md lists the cases.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from worldlm_jax.engine.plan import EngineSpec
from worldlm_jax.tree.topology import Topology


class ReleaseError(ValueError):
    """A configuration under which some data would leave a DP federation without
    its noised release; the message names the federation, both fields and the fix."""


@dataclasses.dataclass(frozen=True)
class Path:
    """One way what federation `federation` (at `level`) learnt leaves it."""
    level: int
    federation: str
    path: str  # aggregate B | aggregate K | personal K | residuals | objective | client metrics
    private: bool
    why: str = ""  # for a path that is not private: the one-line reason and fix


def paths(spec: EngineSpec) -> list[Path]:
    """Every release path of every DP federation of the spec's tree."""
    topo, plan = spec.topology, spec.plan
    out = []
    for d, lvl in enumerate(topo.levels):
        for i, (name, policy) in enumerate(zip(lvl.names, lvl.policies)):
            if not policy.uses_dp:
                continue
            where = f"federation {name!r} (dp_noise_multiplier={policy.dp_noise_multiplier}, dp_clip={policy.dp_clip})"
            if "B" in plan.aggregate[d]:
                out.append(Path(d, name, "aggregate B", True))
            if "K" in plan.aggregate[d] and spec.key_paths and policy.k_agg != "local":
                out.append(Path(d, name, "aggregate K", policy.dp_scope == "all",
                                f"{where}: dp_scope=backbone while k_agg={policy.k_agg} aggregates its key layers "
                                "without noise; set dp_scope: all, or k_agg: local"))
            if d == topo.depth - 1 and plan.personal_keys:
                out.append(Path(d, name, "personal K", False,
                                f"{where}: k_agg=personalized gives each client a mixture of its siblings' trained K, "
                                "which no DP release covers; use k_agg: attention or mean, or drop the DP fields"))
            if d == topo.depth - 1 and spec.client_objective != "none" and _federation_state(spec.client_objective):
                out.append(Path(d, name, "objective", False,
                                f"{where}: algorithm.client_objective={spec.client_objective} sends every client "
                                "the plain mean of its siblings' reports, which no DP release covers; use a "
                                "stateless objective (none, fedprox), or drop the DP fields"))
            if spec.client_metrics:
                out.append(Path(d, name, "client metrics", False,
                                f"{where}: run.client_metrics=true logs each client's training loss, update norm "
                                "and weight, which no DP release covers; set run.client_metrics: false, or drop "
                                "the DP fields"))
    out.extend(_residual_paths(spec))
    return out


def _federation_state(objective: str) -> bool:
    from worldlm_jax.plugins import objectives

    return objectives.get(objective).update_federation is not None


def _residual_paths(spec: EngineSpec) -> list[Path]:
    """Residual sharing at level L lets node i's K reach node j. That bypasses a
    DP federation F above i when F tells them apart: i and j lie under
    different children of F (siblings under a DP parent, or `residuals: all`
    across DP federations)."""
    topo, plan = spec.topology, spec.plan
    out = []
    if plan.residuals == "none" or not spec.key_paths:
        return out
    from worldlm_jax.engine.plan import residual_mask

    for L in range(1, topo.depth):
        mask = residual_mask(topo, L, plan.residuals)
        if mask is None:
            continue
        if "K" not in plan.aggregate[L]:
            continue
        for d in range(L):
            F, unit = _ancestors(topo, L, d), _ancestors(topo, L, d + 1)
            for f, policy in enumerate(topo.levels[d].policies):
                if not policy.uses_dp:
                    continue
                leaks = mask & (F[:, None] == f) & (unit[:, None] != unit[None, :])
                if leaks.any():
                    i, j = map(int, np.argwhere(leaks)[0])
                    names = topo.levels[L].names
                    out.append(Path(d, topo.levels[d].names[f], "residuals", False,
                                    f"federation {topo.levels[d].names[f]!r} (dp_noise_multiplier="
                                    f"{policy.dp_noise_multiplier}, dp_clip={policy.dp_clip}): "
                                    f"algorithm.residuals={plan.residuals} shares the K of {names[i]!r} with {names[j]!r} "
                                    "outside its DP release; set algorithm.residuals: none, or drop the DP fields"))
    return out


def _ancestors(topo: Topology, level: int, at: int) -> np.ndarray:
    """(n_level,) the index of each level-`level` node's ancestor at level `at`."""
    index = np.arange(topo.levels[level].size)
    for d in range(level, at, -1):
        index = topo.levels[d].parent[index]
    return index


def check(spec: EngineSpec) -> None:
    """Refuse a spec with a path that lets a DP federation's data out unnoised."""
    for p in paths(spec):
        if not p.private:
            raise ReleaseError(p.why)
