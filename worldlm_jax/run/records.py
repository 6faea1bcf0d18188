"""What a run writes: round records, evaluations, its summary, its plots.

`RoundLogger` turns each round's device metrics into the record metrics.jsonl
gets (`round_record`), writes it, shows it to the callbacks and the progress
bar; `train.train` logs one run with it, `vectorized.run` every point of a
sweep, so both write their records the same way. `run_summary` is what both
write to summary.json. `worldlm_jax.train` re-exports the public names.
"""
from __future__ import annotations

import math
import os
import time
from typing import Sequence

import numpy as np

from worldlm_jax.engine import parallel, strategies
from worldlm_jax.outputs import metrics as metrics_lib
from worldlm_jax.plugins import callbacks as callbacks_lib
from worldlm_jax.privacy import ledger as dp_ledger
from worldlm_jax.run import communication, distributed, network_clock
from worldlm_jax.run.experiment import Experiment


# ---- one round, one evaluation -------------------------------------------------------
def describe_eval(exp: Experiment, nll_C: np.ndarray) -> dict:
    """Per-client mean NLL (nats/token) -> perplexity per federation and overall,
    token-weighted (every client is evaluated on the same number of tokens)."""
    feds = exp.topology.federation_of_client()
    per_fed = {}
    for name in dict.fromkeys(feds):
        members = [i for i, f in enumerate(feds) if f == name]
        per_fed[name] = float(np.exp(np.mean(nll_C[members])))
    mean_nll = float(np.mean(nll_C))
    bpb = mean_nll / math.log(2) / exp.data.bytes_per_token
    return {"perplexity": float(np.exp(mean_nll)), "nll": mean_nll, "bits_per_byte": bpb,
            "per_federation": per_fed}


def per_federation(metrics: dict, key: str, names, static) -> dict[str, float]:
    """{federation: value} of a per-federation round metric, or the `static`
    policy values when the round does not report it. A level that runs nested
    rounds may report one row per round: the last row is what the round ended with.
    Values are written as the shortest decimal of their own dtype, so a float32
    rate of 3e-3 reads 0.003 (as the static policy value does), not 0.0030000000260."""
    if key not in metrics:
        return dict(zip(names, map(float, static)))
    values = np.asarray(metrics[key]).reshape(-1, len(names))[-1]
    return {name: float(str(value)) for name, value in zip(names, values)}


def _or_null(value: float) -> float | None:
    """None (JSON null) for NaN: a federation or client that has no value this round."""
    return None if math.isnan(value) else value


def node_metrics(topo, metrics: dict) -> dict:
    """The round's per-node metrics as a record holds them: `level{d}/...` a
    list per node of level d, a plug-in's metric (`level{d}/plugin/...`) by
    federation name (TensorBoard then gets one scalar per federation), and
    `clients/...` a list per client of `topo` (run.client_metrics); null where NaN."""
    out = {}
    for key, value in metrics.items():
        if "/plugin/" in key:
            names = topo.levels[int(key[len("level"):key.index("/")])].names
            out[key] = {name: _or_null(v) for name, v in per_federation(metrics, key, names, ()).items()}
        elif key.startswith("level"):
            out[key] = _nulls(np.asarray(value).tolist())
        elif key.startswith("clients/"):
            out[key] = [_or_null(v) for v in np.asarray(value).tolist()]
    return out


def _nulls(value):
    """A nested list of numbers with NaN as None (JSON null): a value a node does not
    report (a DP federation's diagnostics of its children's raw updates)."""
    if isinstance(value, list):
        return [_nulls(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


RULES = ("server_optimizer", "aggregator", "k_agg")  # the named rules a federation runs


def federation_rules(topology) -> dict[str, dict[str, str]]:
    """Each federation's named rules, as resolved from the tree (inherited,
    set, or its own_policy), so a record says what every federation ran."""
    return {name: {rule: getattr(policy, rule) for rule in RULES}
            for level in topology.levels for name, policy in zip(level.names, level.policies)}


def round_record(exp: Experiment, round_index: int, metrics: dict, seconds: float) -> dict:
    """Plain-Python metrics of one round (after an async device fetch), from
    arrays in the round's own dtypes (`metrics.to_numpy`).

    client_lr / server_lr are the rates this round used (the engine's
    `level{d}/client_lr` and `level{d}/server_lr` metrics, which schedules
    move), falling back to the policies' static rates when it reports none.
    Losses and byte counts are summed in float64."""
    topo = exp.run_topology
    leaf = topo.leaf.names
    loss = np.asarray(metrics["train_loss_sum"], np.float64) / np.maximum(
        np.asarray(metrics["train_clients"], np.float64), 1)
    record = {"round": round_index, "seconds": seconds, "train_loss": float(np.mean(loss)),
              "train_loss_per_federation": dict(zip(leaf, map(float, loss))),
              "tokens": float(metrics["tokens"]), "tokens_per_s": float(metrics["tokens"]) / max(seconds, 1e-9),
              "diverged_clients": float(metrics["diverged"]),
              **{f"{name}_clients": float(metrics[name]) for name in ("dropped", "stragglers", "attackers")
                 if name in metrics},  # simulated faults (policy dropout, stragglers, attack)
              "client_lr": per_federation(metrics, f"level{topo.depth - 1}/client_lr", leaf,
                                          [p.client_lr for p in topo.leaf.policies]),
              "server_lr": {name: lr for d, lvl in enumerate(topo.levels)
                            for name, lr in per_federation(metrics, f"level{d}/server_lr", lvl.names,
                                                           [p.server_lr for p in lvl.policies]).items()},
              "rules": federation_rules(topo)}
    record.update(node_metrics(topo, metrics))
    participants = {d: np.asarray(metrics[f"level{d}/participants"], np.float64) for d in range(topo.depth)}
    plan = exp.spec.plan
    if exp.strategy_for(round_index) is not exp.strategy:
        algo = exp.config.algorithm
        plan = strategies.global_stage_plan(topo.depth, algo.residuals, algo.similarity, algo.use_parent)
    leaves = communication.part_leaves(exp.init_params, exp.spec.key_paths)
    backbone = communication.partial_sync_bytes(topo, communication.backbone_leaves(  # a part of B a round
        exp.init_params, exp.spec.key_paths, exp.spec.param_blocks, exp.spec.param_groups), round_index)
    record["bytes_communicated"] = communication.round_bytes(topo, plan, exp.part_bytes, participants, leaves,
                                                             backbone)
    record.update(simulated_time(exp, plan, metrics, participants, record["tokens_per_s"], backbone))
    return record


def simulated_time(exp: Experiment, plan, metrics: dict, participants: dict, measured_tokens_per_s: float,
                   backbone: dict | None = None) -> dict:
    """The round on the network clock (`network_clock.round_clock`): `sim_seconds`,
    `sim_compute_seconds` and `sim_seconds_per_level`. A leaf federation with
    client_tokens_per_s 0 trains at this round's measured tokens_per_s."""
    topo = exp.run_topology
    rounds = {d: np.asarray(metrics[f"level{d}/rounds"], np.float64) for d in range(topo.depth)}
    work = network_clock.local_work_seconds(topo, exp.batch_size * exp.config.data.seq_len, measured_tokens_per_s)
    late = {d: np.asarray(metrics[f"level{d}/late"], np.float64) for d in range(topo.depth)
            if f"level{d}/late" in metrics}  # children a deadline left out: their parent waited it out
    clock = network_clock.round_clock(topo, plan, exp.part_bytes, participants, rounds, work,
                                      communication.part_leaves(exp.init_params, exp.spec.key_paths), late, backbone)
    return {"sim_seconds": clock["seconds"], "sim_compute_seconds": clock["compute_seconds"],
            "sim_seconds_per_level": clock["per_level"]}


def privacy_spent(exp: Experiment, accountants: dict) -> dict:
    """(epsilon, delta) per federation after the rounds composed so far."""
    return {name: {"epsilon": rep["epsilon"], "delta": rep["delta"]}
            for name, rep in dp_ledger.report(exp.run_topology, accountants).items()}


class RoundLogger:
    """Writes each round's record for one run, or for every point of a vectorised
    sweep (`stacked`: every metric's first axis is the point, `points[i]` writes
    to `writers[i]`).

    `submit` starts the device->host copy of a round's metrics and logs the
    rounds submitted more than `lag` calls ago: their metrics are read in their
    own dtypes, each point's becomes a `round_record` (plus the privacy spent
    after that round, when given), is written, shown to the callbacks'
    on_round_end and to the progress bar. The time between two rounds' reads is
    their `seconds`. `stopped_by`: the callbacks that asked to stop."""

    def __init__(self, points: Sequence[Experiment], writers: Sequence, hooks=(), bar=None, lag: int = 1,
                 stacked: bool = False):
        self.points, self.writers, self.hooks, self.bar, self.stacked = list(points), list(writers), hooks, bar, stacked
        self.fetcher = metrics_lib.AsyncFetcher(lag=lag, convert=metrics_lib.to_numpy)
        self.stopped_by: list[str] = []
        self._privacy: dict = {}
        self._last = time.perf_counter()

    def submit(self, round_index: int, metrics, privacy: Sequence[dict] | None = None) -> None:
        """Round `round_index`'s device metrics, and each point's privacy spent after it."""
        if privacy is not None:
            self._privacy[round_index] = privacy
        self._log(self.fetcher.submit((round_index, metrics)))

    def flush(self) -> None:
        """Log every round submitted so far."""
        self._log(self.fetcher.flush())

    def _log(self, done) -> None:
        # Reading round r's metrics waits for round r to finish (at lag 1, round r+1
        # is already queued), so the gap between reads is the round time.
        for round_index, metrics in done:
            now = time.perf_counter()
            privacy = self._privacy.pop(round_index, None)
            for i, (exp, writer) in enumerate(zip(self.points, self.writers)):
                own = {k: v[i] for k, v in metrics.items()} if self.stacked else metrics
                record = round_record(exp, round_index, own, now - self._last)
                if privacy is not None:
                    record["privacy"] = privacy[i]
                writer.write(record)
                self.stopped_by.extend(callbacks_lib.notify(self.hooks, "on_round_end", round_index, record))
                self._show(record)
            self._last = now

    def _show(self, record: dict) -> None:
        if self.bar is not None:
            loss = record["train_loss"]
            self.bar.set_postfix(loss=f"{loss:.3f}", ppl=f"{math.exp(min(loss, 50)):.1f}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")

    def evaluation(self, round_index: int, evaluations: Sequence[dict], final: bool = False,
                   notify: bool = True) -> None:
        """Each point's evaluation of the model as of the end of `round_index`,
        written and (`notify`) shown to the callbacks' on_eval_end. A stop asked
        at the final evaluation comes too late to count."""
        self.flush()  # a round's record comes before its evaluation, in metrics.jsonl and to the callbacks
        for writer, evaluation in zip(self.writers, evaluations):
            writer.write({"round": round_index, "eval": evaluation, **({"final": True} if final else {})})
            if notify:
                asked = callbacks_lib.notify(self.hooks, "on_eval_end", round_index, evaluation)
                if not final:
                    self.stopped_by.extend(asked)


# ---- the run --------------------------------------------------------------------------
def run_summary(exp: Experiment, config, rounds_completed: int, final: dict, compiles: int, wall_seconds: float,
                accountants: dict, workdir: str, stopped_by: Sequence[str] = ()) -> dict:
    """What summary.json holds (bytes_communicated, sim_hours and compute_utilisation:
    summed from workdir/metrics.jsonl, which only process 0 writes)."""
    interrupted = rounds_completed < config.run.rounds
    metrics_path = os.path.join(workdir, metrics_lib.METRICS_FILE)
    return {
        "algorithm": config.algorithm.name,
        "rounds_completed": rounds_completed,
        "interrupted": interrupted,
        **({"stopped_by": ", ".join(dict.fromkeys(stopped_by))} if stopped_by and interrupted else {}),
        "eval": final,
        "compiles": compiles,
        "wall_seconds": wall_seconds,
        "topology": {"depth": exp.run_topology.depth, "clients": exp.topology.n_clients,
                     "slots": exp.run_topology.n_slots, "padding_fraction": exp.run_topology.padding_fraction,
                     "slot_layout": exp.run_topology.slot_layout,
                     "model_parallel": parallel.model_size(exp.spec.mesh)},
        "parameters": int(sum(np.prod(v.shape) for v in exp.init_params.values())),
        "bytes_communicated": _total_bytes(metrics_path) if distributed.is_primary() else {},
        **(_total_sim_time(metrics_path) if distributed.is_primary() else {"sim_hours": None,
                                                                           "compute_utilisation": None}),
        "privacy": dp_ledger.report(exp.run_topology, accountants, exp.spec.plan),  # with level, unit, parts
        "key_layer_parameters": int(sum(np.prod(exp.init_params[p].shape) for p in exp.spec.key_paths)),
        "rules": federation_rules(exp.run_topology),
    }


def write_plots(exp: Experiment, workdir: str) -> list[str]:
    """DIR/plots: perplexity per federation over rounds, and the attention
    weights each federation gave its candidates in the last round."""
    from worldlm_jax.outputs import plots

    records = metrics_lib.read_metrics(os.path.join(workdir, metrics_lib.METRICS_FILE))
    out = os.path.join(workdir, "plots")
    os.makedirs(out, exist_ok=True)
    written = [plots.plot_perplexity(records, os.path.join(out, "perplexity.png"))]
    last = next((rec for rec in reversed(records) if "train_loss" in rec), None)
    for d, level in enumerate(exp.run_topology.levels):
        matrix = (last or {}).get(f"level{d}/attention_residual_matrix")
        if matrix is None:
            continue
        residual = np.asarray(matrix, dtype=np.float64)  # null (a DP federation's) -> NaN
        if not np.isfinite(residual).any():  # every federation of the level is DP: nothing to draw
            continue
        parent = np.asarray(last.get(f"level{d}/attention_parent", np.zeros(len(residual))), dtype=np.float64)[:, None]
        children = np.clip(1.0 - residual.sum(1, keepdims=True) - parent, 0.0, 1.0)
        weights = np.concatenate([children, residual, parent], axis=1)
        columns = ["own children", *level.names, "parent"]
        written.append(plots.plot_attention({f"level {d}": weights}, {f"level {d}": (list(level.names), columns)},
                                            os.path.join(out, f"attention_level{d}.png")))
    return written + _diagnostic_plots(exp, records, last or {}, out)


def _child_names(exp: Experiment, d: int) -> list[str]:
    """Names of level d's children: the federations below, or client slots as `federation/slot`."""
    topo = exp.run_topology
    if d + 1 < topo.depth:
        return list(topo.levels[d + 1].names)
    return [f"{topo.leaf.names[p]}/{i}" for i, p in enumerate(topo.slot_parent)]


def _diagnostic_plots(exp: Experiment, records, last: dict, out: str) -> list[str]:
    """The child-similarity matrix of the last round at each level that attends,
    and the attention entropy of every federation over the rounds."""
    from worldlm_jax.outputs import plots

    written = []
    for d, level in enumerate(exp.run_topology.levels):
        matrix = last.get(f"level{d}/child_similarity")
        if matrix is not None and np.isfinite(np.asarray(matrix, dtype=np.float64)).any():
            written.append(plots.plot_similarity(np.asarray(matrix, dtype=np.float64), _child_names(exp, d),
                                                 os.path.join(out, f"child_similarity_level{d}.png"),
                                                 f"level {d}: cosine of the children's K deltas"))
        series = {}
        for rec in records:
            entropy = rec.get(f"level{d}/attention_entropy")
            if entropy is not None:
                for name, value in zip(level.names, np.asarray(entropy, dtype=np.float64).reshape(-1, level.size)[-1]):
                    series.setdefault(name, []).append((rec["round"] + 1, float(value)))
        if series:
            written.append(plots.plot_series(series, os.path.join(out, f"attention_entropy_level{d}.png"),
                                             "entropy / log(children)",
                                             f"level {d}: attention over children (1 = uniform)"))
    return written


def _total_bytes(metrics_path: str) -> dict:
    """Sum of the per-round byte counts in metrics.jsonl, per level and overall."""
    total: dict = {}
    for rec in metrics_lib.read_metrics(metrics_path):
        for level, value in rec.get("bytes_communicated", {}).items():
            if isinstance(value, dict):
                total[level] = total.get(level, 0.0) + value["total"]
            else:
                total[level] = total.get(level, 0.0) + value
    return total


def _total_sim_time(metrics_path: str) -> dict:
    """The run on the network clock: `sim_hours`, summed over the round records
    (so a resumed run counts every round once), and `compute_utilisation`, the
    clients' local work on the critical path over the simulated time (None
    before any simulated time)."""
    rounds = [rec for rec in metrics_lib.read_metrics(metrics_path) if "sim_seconds" in rec]
    seconds = sum(rec["sim_seconds"] for rec in rounds)
    compute = sum(rec["sim_compute_seconds"] for rec in rounds)
    return {"sim_hours": seconds / 3600, "compute_utilisation": compute / seconds if seconds > 0 else None}


def format_table(summary: dict) -> str:
    ev = summary["eval"]
    width = max(len(n) for n in ev["per_federation"]) + 2
    lines = [f"{summary['algorithm']}: {summary['rounds_completed']} rounds, "
             f"{summary['wall_seconds']:.0f} s, {summary['compiles']} compilation(s)",
             f"{'federation':<{width}} perplexity"]
    lines += [f"{name:<{width}} {ppl:10.3f}" for name, ppl in ev["per_federation"].items()]
    lines.append(f"{'overall':<{width}} {ev['perplexity']:10.3f}   ({ev['bits_per_byte']:.3f} bits/byte)")
    if summary.get("sim_hours") is not None:
        lines.append(network_line(summary))
    lines += [privacy_line(name, rep) for name, rep in summary.get("privacy", {}).items()]
    return "\n".join(lines)


def network_line(summary: dict) -> str:
    """The run on the network clock (docs/network.md): simulated time, the clients'
    share of it, and what the edges carried."""
    utilisation = summary.get("compute_utilisation")
    share = f", compute utilisation {100 * utilisation:.1f}%" if utilisation is not None else ""
    sent = summary.get("bytes_communicated", {}).get("total")
    carried = f", {sent / 1e6:.4g} MB communicated" if sent is not None else ""
    return f"network clock: {summary['sim_hours'] * 3600:.4g} simulated s ({summary['sim_hours']:.4g} h){share}{carried}"


def privacy_line(name: str, rep: dict) -> str:
    """What one federation's epsilon covers: its level, the unit it protects, the parts it releases."""
    unit = {"client": "each client", "federation": "each child federation"}.get(rep.get("unit"), "its children")
    parts = f", releasing {rep['parts']}" if "parts" in rep else ""
    return (f"DP {name} (level {rep.get('level', '?')}): epsilon {rep['epsilon']:.3g} at delta {rep['delta']:g} "
            f"for {unit}{parts}")
