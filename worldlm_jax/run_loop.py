"""The run loop of `train.train`: resume, rounds, evaluations, checkpoints, the end.

Orchestration only (no math): the host cuts the next round's batch while the
current one runs, logs metrics fetched asynchronously (`records.RoundLogger`),
runs callbacks, keeps the privacy ledgers, checkpoints, and resumes. All
numerics live in the one jitted round function.
"""
from __future__ import annotations

import contextlib
import signal

import jax
import numpy as np

from worldlm_jax import accounting, distributed, dp_ledger
from worldlm_jax import metrics as metrics_lib
from worldlm_jax.experiment import Experiment, Prefetcher, _put, place_state, restore_state
from worldlm_jax.records import RoundLogger, describe_eval, privacy_spent


class RunLoop:
    """One run's rounds, from its latest checkpoint (or round 0) to run.rounds,
    a callback's stop, the privacy budget or Ctrl-C (which finishes the round,
    checkpoints and ends cleanly). `round`: the rounds done so far."""

    def __init__(self, exp: Experiment, workdir: str, hooks, say, progress: bool):
        from worldlm_jax import checkpoint

        self.exp, self.say = exp, say
        self.state = place_state(exp, exp.strategy.init(exp.init_params))
        self.ckpt = checkpoint.Checkpointer(workdir, max_to_keep=2)
        # Multi-process runs: every process computes, process 0 alone writes files and prints.
        self.writer = metrics_lib.MetricsWriter(workdir) if distributed.is_primary() else metrics_lib.NullWriter()
        self.start = self._resume()
        self.round = self.start
        self.evaluated = -1  # the round count at the last eval_every evaluation
        self.interrupted = False  # Ctrl-C
        self.hooks, self.progress = hooks, progress

    def _resume(self) -> int:
        """The round to start from (its checkpoint restored, metrics.jsonl cut to it);
        builds the privacy ledgers, as they were saved."""
        exp = self.exp
        host, start = {}, 0
        if self.ckpt.latest_step() is not None:
            self.state, host = restore_state(exp, self.ckpt, like=self.state)
            start = int(host["round"])
            self.writer.truncate_after(start - 1)
            self.say(f"resumed from round {start}")
        self.accountants = dp_ledger.make_accountants(exp.run_topology, exp.config.privacy.accountant)
        if start:
            for name, saved in host.get("privacy", {}).items():
                self.accountants[name] = accounting.FederationAccountant.from_dict(saved)
        return start

    def _host_state(self, r: int) -> dict:
        return {"round": r, "privacy": {n: a.to_dict() for n, a in self.accountants.items()}}

    def run(self) -> dict:
        """Train, checkpoint the last round, evaluate; returns the final evaluation."""
        rounds = self.exp.config.run.rounds
        prefetch = Prefetcher(self.exp, self.start, rounds)
        bar = None
        with _finish_round_on_sigint(self):
            try:
                if self.progress:
                    from tqdm import tqdm
                    bar = tqdm(total=rounds, initial=self.start, unit="round", dynamic_ncols=True)
                # lag 1 dispatches round r+1 before reading round r's metrics (the device never
                # waits on logging); callbacks must see round r before round r+1 starts, so
                # they read each round as it ends. The records are the same either way.
                self.logger = RoundLogger([self.exp], [self.writer], self.hooks, bar, lag=0 if self.hooks else 1)
                self._train(prefetch, bar)
            finally:
                prefetch.close()
                if bar is not None:
                    bar.close()
        return self._finish()

    def _train(self, prefetch: Prefetcher, bar) -> None:
        config = self.exp.config
        key = jax.random.PRNGKey(config.run.seed + 1)
        while self.round < config.run.rounds and not distributed.any_process(
                self.interrupted or bool(self.logger.stopped_by)):
            if self._over_budget():
                break
            self._round(prefetch, key)
            if bar is not None:
                bar.update(1)
            self._maybe_evaluate()
            self._maybe_checkpoint()
        self.logger.flush()
        if self.ckpt.latest_step() != self.round:
            self.ckpt.save(self.round, self.state, self._host_state(self.round), force=True)
        self.ckpt.wait()

    def _over_budget(self) -> bool:
        """Whether the next round would spend more than privacy.target_epsilon."""
        target = self.exp.config.privacy.target_epsilon
        if target <= 0:
            return False
        over = dp_ledger.exceeding(self.exp.run_topology, self.accountants, target)
        if over:
            self.say(f"stopping before round {self.round}: it would exceed the privacy budget epsilon="
                     f"{target} of federation(s) {', '.join(over)}")
        return bool(over)

    def _round(self, prefetch: Prefetcher, key) -> None:
        exp, r = self.exp, self.round
        batch = _put(exp, prefetch.get(r))
        self.state, round_metrics = exp.strategy_for(r).run_round(self.state, batch, key)
        dp_ledger.step_all(exp.run_topology, self.accountants)
        # (epsilon, delta) per federation after every round
        spent = [privacy_spent(exp, self.accountants)] if self.accountants else None
        self.logger.submit(r, round_metrics, spent)
        self.round = r + 1

    def _maybe_evaluate(self) -> None:
        r, run = self.round, self.exp.config.run
        if run.eval_every and r % run.eval_every == 0 and r < run.rounds:
            self.logger.evaluation(r - 1, [describe_eval(self.exp, np.asarray(self.exp.eval_fn(self.state)))])
            self.evaluated = r

    def _maybe_checkpoint(self) -> None:
        r, run = self.round, self.exp.config.run
        if run.checkpoint_every and r % run.checkpoint_every == 0:
            self.logger.flush()
            self.ckpt.save(r, self.state, self._host_state(r), force=True)

    def _finish(self) -> dict:
        final = describe_eval(self.exp, np.asarray(self.exp.eval_fn(self.state)))
        # callbacks saw this state's evaluation already when eval_every evaluated it
        self.logger.evaluation(self.round - 1, [final], final=True, notify=self.evaluated != self.round)
        self.writer.close()
        self.ckpt.close()
        return final


@contextlib.contextmanager
def _finish_round_on_sigint(loop: RunLoop):
    """Ctrl-C sets `loop.interrupted` (the loop finishes the round, checkpoints and
    ends) instead of raising KeyboardInterrupt; the old handler is back after."""
    old_handler = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        loop.interrupted = True

    try:
        signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not in the main thread
        pass
    try:
        yield
    finally:
        try:
            signal.signal(signal.SIGINT, old_handler)
        except ValueError:
            pass
