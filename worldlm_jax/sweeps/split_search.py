"""Which layers to localise, searched: one run per candidate split, ranked.

WorldLM's largest hyperparameter is the split of the model into the backbone B
(shared up to the root) and the key layers K (kept per federation); the best
split differs between data mixtures. `candidates` names the splits worth trying
on a model of L blocks, each a list of config overrides:

    top-k        the last k blocks (k = 1..L): the paper's kind of split
    bottom-k     the first k blocks (k = 1..L-1; bottom-L is top-L)
    attention    every block's attention and its norm
    mlp          every block's MLP and its norm
    embeddings   the token and position embeddings (the tied head) and the final norm
    none         HierFAVG on the same tree: the split that shares everything

(localising everything is the `local` strategy, which shares nothing and so
sends nothing: not a split of this model, and not a candidate.)

`--probe R` adds one candidate chosen from data: R rounds of HierFAVG (every
group shared) in DIR/probe-hierfavg, then each parameter group (`partition.parameter_groups`:
a block's attention, its MLP, the embeddings) ranked by how much its updates differ
between the lowest federations relative to within them (the per-group
`update_spread_group` metrics of the two lowest levels), and the most divergent
30% of the groups localised, as the `probe` candidate (DIR/probe.json).

`search` trains the candidates one after the other with the grid sweep's
machinery (`grid.run_points`): the same base config, tree, data, seed and token
budget for each, one run dir per candidate, a finished one skipped when the
command runs again (an unfinished one resumed). `pareto` keeps the candidates no
other beats on both validation perplexity and bytes communicated; `choose` takes
the lowest perplexity among them, fewer bytes on a tie. The result is written as
DIR/split_search.md and .json, and the chosen split as DIR/split.yaml: a config
fragment (`algorithm:` only) to merge under a config's own sections, or the
`--set` line it prints.

How it composes:
- Differential privacy: refused. The choice reads every federation's validation
  perplexity, and no DP release covers it (each candidate's own run is accounted,
  the selection among them is not). Search on the same tree without the dp_*
  fields, or on public proxy data, and apply the split.
- The strategy: a base whose strategy has no key layers (fedavg, hierfavg, ...)
  is refused: there is nothing to choose.
- A candidate whose state turns non-finite stops the search like a grid sweep
  (the non-finite exit); the candidates that finished are kept and skipped on a rerun.
- Several processes: each candidate is an ordinary run over all of them; process
  0 writes the tables, as a grid sweep does.
- One program: the split decides which parameters are K at trace time, so each
  candidate compiles its own round (the vectorised sweep refuses points that
  change the key-layer rule).
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, NamedTuple, Sequence

import yaml

from worldlm_jax.config import Config, ConfigError
from worldlm_jax.engine import strategies
from worldlm_jax.run import probe
from worldlm_jax.sweeps import grid

TABLE_FILE, RESULT_FILE, SPLIT_FILE = "split_search.md", "split_search.json", "split.yaml"


class Candidate(NamedTuple):
    name: str  # its run dir under the search's workdir
    overrides: tuple[tuple[str, str], ...]  # (key.path, YAML value) applied to the base config


def _key_layers(value: str) -> tuple[tuple[str, str], ...]:
    return (("algorithm.key_layers", value),)


def candidates(n_layers: int) -> list[Candidate]:
    """The splits of a model of `n_layers` blocks that `search` tries, in this order."""
    if n_layers < 1:
        raise ConfigError(f"model.n_layers={n_layers}; a split search needs at least one block")
    blocks = lambda ids: _key_layers("{kind: blocks, blocks: [" + ", ".join(map(str, ids)) + "]}")
    regex = lambda pattern: _key_layers("{kind: regex, patterns: ['" + pattern + "']}")
    out = [Candidate(f"top-{k}", blocks(range(n_layers - k, n_layers))) for k in range(1, n_layers + 1)]
    out += [Candidate(f"bottom-{k}", blocks(range(k))) for k in range(1, n_layers)]
    out += [Candidate("attention", regex(r"^blocks/\d+/attn")),
            Candidate("mlp", regex(r"^blocks/\d+/mlp")),
            Candidate("embeddings", regex(r"^(embed|pos_embed|final_norm)/")),
            Candidate("none", (("algorithm.name", "hierfavg"),))]
    return out


# ---- the probe ------------------------------------------------------------------------
PROBE_DIR, PROBE_FILE, PROBE_SHARE = "probe-hierfavg", probe.PROBE_FILE, probe.PROBE_SHARE
probe_ranking = probe.probe_ranking  # (run/probe.py: `algorithm.key_layers.auto: probe` ranks alike)


def probe_candidate(ranking: Sequence[tuple[str, float]], share: float = PROBE_SHARE) -> Candidate:
    """The `probe` candidate: the most divergent ceil(share x groups) groups localised
    (at least one, never all; `probe.probe_groups`)."""
    return Candidate("probe", _key_layers(probe.groups_override(probe.probe_groups(ranking, share))))


def run_probe(base: Config, workdir: str, rounds: int, train_fn=None, quiet: bool = True, progress: bool = False,
              log: Callable[[str], None] = print) -> tuple[Candidate, list[tuple[str, float]]]:
    """Train HierFAVG (every group shared) for `rounds` rounds in DIR/probe-hierfavg (skipped
    when finished), rank the groups (`probe_ranking`) and write DIR/probe.json."""
    from worldlm_jax.outputs.metrics import METRICS_FILE, read_metrics
    from worldlm_jax.tree.topology import build_topology

    if rounds < 1:
        raise ConfigError(f"--probe {rounds}: expected a number of rounds >= 1")
    overrides = [("algorithm.name", "hierfavg"), ("run.rounds", str(rounds))]
    grid.run_points(base, [overrides], workdir, names=[PROBE_DIR], train_fn=train_fn, quiet=quiet,
                    progress=progress, log=log)
    depth = build_topology(base.run_tree(), root_policy=base.policy).depth
    records = read_metrics(os.path.join(workdir, PROBE_DIR, METRICS_FILE))
    ranking = probe_ranking([r for r in records if "train_loss" in r], depth)
    candidate = probe_candidate(ranking)
    from worldlm_jax.run import distributed
    if distributed.is_primary():
        with open(os.path.join(workdir, PROBE_FILE), "w") as f:
            json.dump({"rounds": rounds, "ranking": ranking, "candidate": dict(candidate.overrides)}, f, indent=2)
    return candidate, ranking


def check_base(base: Config) -> None:
    """Refuses a base the search cannot honestly run (module docstring)."""
    if not strategies.uses_key_layers(base.algorithm.name):
        raise ConfigError(f"algorithm.name={base.algorithm.name!r} has no key layers to choose; split-search "
                          "needs a strategy that localises them (worldlm or fedper)")
    private = probe.dp_federations(base)
    if private:
        raise ConfigError(f"split-search selects on every federation's validation perplexity, which no DP release "
                          f"covers, and federation(s) {', '.join(private[:3])} use DP; search on the "
                          "tree without the dp_* fields and apply the split")


def total_bytes(row: dict) -> float:
    return float((row.get("bytes_communicated") or {}).get("total", math.nan))


def _finite(row: dict) -> bool:
    return row.get("perplexity") is not None and math.isfinite(row["perplexity"]) and math.isfinite(total_bytes(row))


def pareto(rows: Sequence[dict]) -> list[str]:
    """Names of the rows no other row beats on both perplexity and bytes (lower is
    better; one at least as good on both and better on one beats it), in row order."""
    scored = [r for r in rows if _finite(r)]

    def beaten(r):
        return any(o["perplexity"] <= r["perplexity"] and total_bytes(o) <= total_bytes(r)
                   and (o["perplexity"], total_bytes(o)) != (r["perplexity"], total_bytes(r)) for o in scored)
    return [r["name"] for r in scored if not beaten(r)]


def choose(rows: Sequence[dict]) -> dict:
    """The front's row of lowest perplexity (fewer bytes on a tie)."""
    front = set(pareto(rows))
    if not front:
        raise ConfigError("no candidate finished with a finite perplexity; nothing to choose")
    return min((r for r in rows if r["name"] in front), key=lambda r: (r["perplexity"], total_bytes(r)))


def split_fragment(row: dict) -> dict:
    """The chosen split as a config fragment: `{algorithm: {...}}`."""
    section: dict = {}
    for key, value in row["assignments"].items():
        section[key.split(".", 1)[1]] = yaml.safe_load(value)
    return {"algorithm": section}


def markdown_table(rows: Sequence[dict], front: Sequence[str], chosen: str) -> str:
    lines = ["| candidate | perplexity | bytes | bytes / none's | front |", "|---|---|---|---|---|"]
    none = next((total_bytes(r) for r in rows if r["name"] == "none"), math.nan)
    for r in rows:
        ratio = total_bytes(r) / none if none and math.isfinite(none) else math.nan
        mark = "chosen" if r["name"] == chosen else ("yes" if r["name"] in front else "")
        ppl = "" if r.get("perplexity") is None else f"{r['perplexity']:.3f}"
        lines.append(f"| {r['name']} | {ppl} | {total_bytes(r):.4g} | {ratio:.3f} | {mark} |")
    return "\n".join(lines) + "\n"


def search(base: Config, workdir: str, only: Sequence[str] = (), train_fn: Callable[..., dict] | None = None,
           quiet: bool = True, progress: bool = False, log: Callable[[str], None] = print,
           probe_rounds: int = 0) -> dict:
    """Train the candidates (those named in `only`, default all; with `probe_rounds`,
    the probe's candidate too, after its run) and write the tables and DIR/split.yaml.
    Returns {"rows", "front", "chosen", "split"}."""
    check_base(base)
    pool = candidates(base.model.n_layers)
    if probe_rounds:
        probed, ranking = run_probe(base, workdir, probe_rounds, train_fn=train_fn, quiet=quiet,
                                    progress=progress, log=log)
        log("probe: groups by between / within spread: " + ", ".join(f"{g} {r:.3g}" for g, r in ranking))
        pool.append(probed)
    if only:
        unknown = sorted(set(only) - {c.name for c in pool})
        if unknown:
            raise ConfigError(f"--candidates: {unknown} are not candidates of this model; candidates: "
                              f"{', '.join(c.name for c in pool)}")
        pool = [c for c in pool if c.name in set(only)]
    rows = grid.run_points(base, [list(c.overrides) for c in pool], workdir, names=[c.name for c in pool],
                           train_fn=train_fn, quiet=quiet, progress=progress, log=log)
    if any(r["status"] == "interrupted" for r in rows):
        return {"rows": rows, "front": [], "chosen": None, "split": None}
    front, best = pareto(rows), choose(rows)
    result = {"rows": rows, "front": front, "chosen": best["name"], "split": split_fragment(best)}
    from worldlm_jax.run import distributed
    if distributed.is_primary():
        with open(os.path.join(workdir, TABLE_FILE), "w") as f:
            f.write("# Split search\n\n" + markdown_table(rows, front, best["name"]))
        with open(os.path.join(workdir, RESULT_FILE), "w") as f:
            json.dump(result, f, indent=2)
        with open(os.path.join(workdir, SPLIT_FILE), "w") as f:
            yaml.safe_dump(result["split"], f, sort_keys=False)
    return result


def override_line(row: dict) -> str:
    """The chosen candidate as --set arguments."""
    return " ".join(f'--set "{k}={v}"' for k, v in row["assignments"].items())
