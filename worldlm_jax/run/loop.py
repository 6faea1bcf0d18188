"""The run loop of `train.train`: resume, rounds, evaluations, checkpoints, the end.

Orchestration only (no math): the host cuts the next round's batch while the
current one runs, logs metrics fetched asynchronously (`records.RoundLogger`),
runs callbacks, keeps the privacy ledgers, checkpoints, and resumes. All
numerics live in the one jitted round function, plus one jitted reduction per
round that says which federations' state is still finite (`finite_flags`): a
round that breaks one stops the run (`NonFiniteStateError`) before anything
saves the broken state.
"""
from __future__ import annotations

import collections
import contextlib
import signal
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from worldlm_jax.config import ConfigError
from worldlm_jax.outputs import metrics as metrics_lib
from worldlm_jax.plugins import callbacks as callbacks_lib
from worldlm_jax.privacy import accounting, ledger as dp_ledger
from worldlm_jax.run import distributed
from worldlm_jax.run.experiment import Experiment, Prefetcher, _put, place_state, restore_state
from worldlm_jax.run.records import RoundLogger, describe_eval, privacy_spent


# ---- a state that stopped being finite ------------------------------------------------
class NonFiniteStateError(RuntimeError):
    """A round left part of the engine state NaN or Inf. The run stopped before
    saving that state: its metrics so far are written and its checkpoints are
    all from before. `round` (as metrics.jsonl counts), `level` (0 = the root;
    the tree's depth = the clients' kept state) and `federation` (its name; a
    client's for the clients' state) say where; the message is one line."""

    def __init__(self, message: str, round_index: int, level: int, federation: str):
        super().__init__(message)
        self.round, self.level, self.federation = round_index, level, federation

    def __reduce__(self):
        return (NonFiniteStateError, (str(self), self.round, self.level, self.federation))


def _finite_rows(tree, n: int) -> jax.Array:
    """(n,) bool: whether every float entry of each of the first n rows of every leaf is finite."""
    ok = jnp.ones((n,), bool)
    for x in jax.tree.leaves(tree):
        if x.ndim and jnp.issubdtype(x.dtype, jnp.inexact):
            ok = ok & jnp.all(jnp.isfinite(x[:n]), axis=tuple(range(1, x.ndim)))
    return ok


def _level_rows(level, n: int) -> jax.Array:
    """(n,) bool per federation of a level; its clip norm may be +inf (no clipping: DP off), not NaN."""
    clip = level.clip[:n]
    return _finite_rows(level._replace(clip=()), n) & ~jnp.isnan(clip) & (clip > -jnp.inf)


def state_flags(topology):
    """state -> (per level (n_d,) bool, then (n_clients,) for the clients' kept state),
    not jitted: `finite_flags` jits it for one run, `vectorized` vmaps it over points."""

    def flags(state):
        levels = [_level_rows(level, lvl.size) for level, lvl in zip(state.levels, topology.levels)]
        return (*levels, _finite_rows(state.clients, topology.n_clients))

    return flags


def replicated_jit(fn, mesh):
    """jit `fn` with its outputs replicated over `mesh` (None: one device), so under
    multi-process every process reads the same flags and all stop at the same round."""
    if mesh is None:
        return jax.jit(fn)
    from jax.sharding import NamedSharding, PartitionSpec
    return jax.jit(fn, out_shardings=NamedSharding(mesh, PartitionSpec()))


def finite_flags(spec):
    """`state_flags` of the run's tree as one jitted reduction over the whole state."""
    return replicated_jit(state_flags(spec.topology), spec.mesh)


def federation_path(topology, level: int, index: int) -> str:
    """'world/en': the names from the root down to federation `index` of `level`
    (level = depth: client `index`, e.g. 'world/en/0' for client 'en/0')."""
    if level == topology.depth:
        leaf = int(topology.client_parent[index])
        return f"{federation_path(topology, level - 1, leaf)}/{topology.client_names[index].rsplit('/', 1)[-1]}"
    names = []
    while level >= 0:
        names.append(topology.levels[level].names[index])
        index, level = int(topology.levels[level].parent[index]), level - 1
    return "/".join(reversed(names))


def _name(topology, level: int, index: int) -> str:
    return topology.client_names[index] if level == topology.depth else topology.levels[level].names[index]


def _node_name(topology, level: int, index: int) -> str:
    return f"{'client' if level == topology.depth else 'federation'} '{_name(topology, level, index)}'"


def nonfinite_error(topology, round_index: int, flags: Sequence[np.ndarray],
                    last_step: int | None) -> NonFiniteStateError | None:
    """The error for one round's flags (None when every node is finite). It names
    the lowest broken federation first: within a round a NaN flows up the tree, so
    the lowest node is nearest to where it came in; a client's kept state only
    when no federation broke."""
    bad = [(d, int(i)) for d, f in enumerate(flags) for i in np.flatnonzero(~np.asarray(f, bool))]
    if not bad:
        return None
    federations = [b for b in bad if b[0] < topology.depth]
    d, i = max(federations or bad, key=lambda b: (b[0], -b[1]))
    others = [f"'{_name(topology, *b)}' (level {b[0]})" for b in bad if b != (d, i)]
    more = (f", and {len(others)} more: {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}"
            if others else "")
    kept = (f"checkpoint step {last_step} (from before it) is the last good one" if last_step is not None
            else "no checkpoint had been saved")
    message = (f"round {round_index} left the state of {_node_name(topology, d, i)} (level {d}, "
               f"{federation_path(topology, d, i)}) non-finite (NaN or Inf){more}; the run stopped without "
               f"saving it: metrics.jsonl holds its rounds so far and {kept}. Find what diverged (an attack, a "
               "learning rate too high, no dp_clip) and rerun with it changed, in a new --workdir")
    return NonFiniteStateError(message, round_index, d, _name(topology, d, i))


SUPERSEDED_SUFFIX = ".superseded"  # a checkpoint after the step `--from-step` resumes from


class RunLoop:
    """One run's rounds, from its latest checkpoint (or round 0) to run.rounds,
    a callback's stop, the privacy budget or Ctrl-C (which finishes the round,
    checkpoints and ends cleanly). `round`: the rounds done so far."""

    def __init__(self, exp: Experiment, workdir: str, hooks, say, progress: bool, from_step: int | None = None):
        from worldlm_jax.outputs import checkpoint

        self.exp, self.say = exp, say
        self.state = place_state(exp, exp.strategy.init(exp.init_params))
        self.ckpt = checkpoint.Checkpointer(workdir, max_to_keep=2)
        # Multi-process runs: every process computes, process 0 alone writes files and prints.
        self.writer = metrics_lib.MetricsWriter(workdir) if distributed.is_primary() else metrics_lib.NullWriter()
        if from_step is not None:
            self._rewind(from_step)
        self.resumed = self.ckpt.latest_step() is not None
        self.start = self._resume()
        self.round = self.start
        self.evaluated = -1  # the round count at the last eval_every evaluation
        self.interrupted = False  # Ctrl-C
        self.hooks, self.progress = hooks, progress
        # lag 1 dispatches round r+1 before reading round r's metrics (the device never
        # waits on logging); a callback that may stop the run must see round r before
        # round r+1 starts, so then each round is read as it ends. The records are the
        # same either way.
        self.lag = 0 if callbacks_lib.may_stop(hooks) else 1
        self._finite = finite_flags(exp.spec)
        self._unchecked: collections.deque = collections.deque()  # (round, flags on device)

    def _rewind(self, step: int) -> None:
        """`--from-step`: set every checkpoint after `step` aside (renamed
        `<step>.superseded`, none deleted), so the run resumes from `step` as if
        it had stopped there; metrics.jsonl is cut to it by `_resume`."""
        steps = self.ckpt.all_steps()
        if step not in steps:
            raise ConfigError(f"--from-step={step}: {self.ckpt.directory} holds no step {step}; saved steps: {steps} "
                              "(a run keeps its newest two)")
        later = [s for s in reversed(steps) if s > step]
        for s in later:
            self.ckpt.set_aside(s, SUPERSEDED_SUFFIX)
        if later:
            self.say(f"set aside the checkpoints of steps {sorted(later)} (as <step>{SUPERSEDED_SUFFIX})")

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
                self.logger = RoundLogger([self.exp], [self.writer], self.hooks, bar, lag=self.lag)
                self._train(prefetch, bar)
            except NonFiniteStateError:
                self._stop_broken()
                raise
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
        self._check_finite(keep=0)
        self.logger.flush()
        self.ckpt.wait()  # a save still in flight is not listed yet
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
        self.state, round_metrics = exp.strategy_for(r).run_round(self.state, batch, key, exp.policies)
        dp_ledger.step_all(exp.run_topology, self.accountants)
        # (epsilon, delta) per federation after every round
        spent = [privacy_spent(exp, self.accountants)] if self.accountants else None
        self.logger.submit(r, round_metrics, spent)
        self._submit_flags(r, self._finite(self.state))
        self.round = r + 1
        self._check_finite(keep=self.lag)  # read as the metrics are: no extra wait on the device

    def _submit_flags(self, r: int, flags) -> None:
        for f in flags:
            f.copy_to_host_async()
        self._unchecked.append((r, flags))

    def _check_finite(self, keep: int) -> None:
        """Raise NonFiniteStateError for the first round, of all but the last `keep`
        rounds not yet checked, that left a node's state non-finite."""
        while len(self._unchecked) > keep:
            r, flags = self._unchecked.popleft()
            host = [np.asarray(f) for f in flags]
            if not all(f.all() for f in host):
                self.ckpt.wait()  # the last good save may still be in flight: name it once it is on disk
                raise nonfinite_error(self.exp.run_topology, r, host, self.ckpt.latest_step())

    def _stop_broken(self) -> None:
        """What a run whose state broke keeps: every round's record so far, and the
        checkpoints saved before (the broken state is never saved)."""
        self._unchecked.clear()
        self.logger.flush()
        self.writer.close()
        self.ckpt.close()  # pending saves are of earlier, checked states

    def _maybe_evaluate(self) -> None:
        r, run = self.round, self.exp.config.run
        if run.eval_every and r % run.eval_every == 0 and r < run.rounds:
            self.logger.evaluation(r - 1, [describe_eval(self.exp, np.asarray(self.exp.eval_fn(self.state)))])
            self.evaluated = r

    def _maybe_checkpoint(self) -> None:
        r, run = self.round, self.exp.config.run
        if run.checkpoint_every and r % run.checkpoint_every == 0:
            self._check_finite(keep=0)  # never save a broken state
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
