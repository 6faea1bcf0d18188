"""A run-loop callback: early stopping when the training loss stops improving.

A callback sees every finished round's record (the line metrics.jsonl gets)
and every evaluation; returning True stops the run after that round, which
checkpoints and ends cleanly (`interrupted: true`, `stopped_by` in the
summary; re-running the command resumes). Registered factories receive the
config and, as keyword arguments, the `args` of their `run.callbacks` entry
(callback.yaml gives patience and min_delta, and adds the built-in csv
logger, which writes every round to rounds.csv in the run directory).

    worldlm train --plugin scripts/examples/callback.py --config scripts/examples/callback.yaml
"""
from worldlm_jax.plugins import callbacks


class EarlyStopping(callbacks.Callback):
    """Stop once the mean training loss has not improved by `min_delta` for
    `patience` rounds in a row."""

    def __init__(self, patience: int = 1, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, min_delta
        self.best, self.stale = float("inf"), 0

    def on_start(self, context):
        # a resumed run starts with a fresh count: the rounds before it are not seen again
        self.best, self.stale = float("inf"), 0

    def on_round_end(self, round_index, record):
        if record["train_loss"] < self.best - self.min_delta:
            self.best, self.stale = record["train_loss"], 0
        else:
            self.stale += 1
        return self.stale >= self.patience


# `args: {patience: 1, min_delta: 100.0}` in the config arrive as keyword arguments.
callbacks.register("early_stopping", lambda config, patience=1, min_delta=0.0: EarlyStopping(patience, min_delta))
