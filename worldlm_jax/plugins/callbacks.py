"""Hooks into the run loop: see each round's record and each evaluation, ask to stop.

A callback subclasses `Callback` and overrides what it needs. Returning True
from a hook asks the run to stop after the current round: it checkpoints,
evaluates and ends cleanly, its summary saying `interrupted: true` and
`stopped_by: NAME` (re-running `worldlm train` resumes it; `worldlm sweep`
counts such a point as finished, goes on with the next one and skips it when
re-run).

Callbacks are named in a config (`run.callbacks: [name, ...]`) through the
`CALLBACKS` registry of factories `factory(config) -> Callback`, or passed as
instances to `train.train(..., callbacks=[...])`. In a multi-process run every
process runs them on the same records, and a stop asked on any process stops
all of them at the same round.

Records arrive as soon as their round is done: with a callback present the loop
reads each round's metrics before dispatching the next round (the host still
cuts the next batch meanwhile), so a stop takes effect right after the round
that asked for it.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from worldlm_jax.plugins.registry import Registry


class Callback:
    """Base class: every hook does nothing and asks nothing."""

    def on_round_end(self, round_index: int, record: dict) -> bool | None:
        """After root round `round_index`, with its metrics.jsonl record
        (train_loss, train_loss_per_federation, client_lr, server_lr, tokens,
        bytes_communicated, level*/... metrics). True: stop after this round."""
        return None

    def on_eval_end(self, round_index: int, evaluation: dict) -> bool | None:
        """After an evaluation of the model as of the end of `round_index`
        (every run.eval_every rounds, and the final one): perplexity, nll,
        bits_per_byte, per_federation. True: stop after this round."""
        return None


Factory = Callable[[Any], Callback]

CALLBACKS: Registry[Factory] = Registry("callback", "worldlm_jax.plugins.callbacks.register(name, factory)")


def register(name: str, factory: Factory) -> Factory:
    """Add a callback usable by name in `run.callbacks` (`factory(config)`
    returns a Callback; the config lets it read e.g. run.rounds)."""
    if not callable(factory):
        raise TypeError(f"callback factory for {name!r} must be callable, got {type(factory).__name__}")
    return CALLBACKS.register(name, factory)


def names() -> tuple[str, ...]:
    return CALLBACKS.names()


def build(config, extra: Iterable[Callback | str] = ()) -> list[tuple[str, Callback]]:
    """(name, callback) for every name in config.run.callbacks, then for `extra`
    (instances, named by their class, or registered names)."""
    built = []
    for item in (*config.run.callbacks, *extra):
        if isinstance(item, str):
            callback = CALLBACKS.get(item, "run.callbacks")(config)
            label = item
        else:
            callback, label = item, type(item).__name__
        if not any(callable(getattr(callback, hook, None)) for hook in ("on_round_end", "on_eval_end")):
            raise TypeError(f"callback {label!r} has neither on_round_end nor on_eval_end; subclass "
                            "worldlm_jax.callbacks.Callback")
        built.append((label, callback))
    return built


def notify(callbacks: Iterable[tuple[str, Callback]], hook: str, round_index: int, payload: dict) -> list[str]:
    """Call `hook` on every callback (all of them, even after one asked to stop);
    returns the names of those that asked to stop."""
    stop = []
    for label, callback in callbacks:
        method = getattr(callback, hook, None)
        if method is not None and method(round_index, payload):
            stop.append(label)
    return stop
