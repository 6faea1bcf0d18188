"""A run whose federation state turns NaN or Inf stops at that round, naming the
round, the level and the federation, with its metrics written, no checkpoint of
the broken state (the last good one restores) and a non-zero exit from the CLI."""
import contextlib
import io
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from worldlm_jax.cli import commands as cli_commands, parser as cli
from worldlm_jax.cli.commands import EXIT_NONFINITE
from worldlm_jax.engine.state import ClientState, EngineState, LevelState
from worldlm_jax.outputs.checkpoint import Checkpointer
from worldlm_jax.run import training as train_lib
from worldlm_jax.run.loop import NonFiniteStateError, federation_path, finite_flags, nonfinite_error
from worldlm_jax.tree.topology import build_topology

ONE_LEAF = "tree={name: w, children: [{name: en, clients: 2, sources: [man_en]}]}"


def _tree():
    """world -> org -> {en, de}, two clients each: depth 3, the clients at level 3."""
    leaf = lambda name, source: {"name": name, "clients": 2, "sources": [source]}
    return build_topology({"name": "world", "children": [{"name": "org", "children": [
        leaf("en", "man_en"), leaf("de", "man_de")]}]})


def _state(rows=(1, 1, 3), clients=4):
    """A state shaped like the engine's: every leaf has one row per node (level 2 stored
    with a padding row), float and integer leaves, clip norms of +inf (no DP)."""
    level = lambda n: LevelState(B={"w": jnp.zeros((n, 3, 2))}, K={}, server=({"count": jnp.zeros((n,), jnp.int32)},),
                                 residual_K={}, clip=jnp.full((n,), jnp.inf))
    return EngineState(levels=tuple(level(n) for n in rows), clients=ClientState(B={}, K={"k": jnp.zeros((clients, 2))},
                                                                                   opt=()),
                       round=jnp.int32(0))


def _flags(state, topo):
    return [np.asarray(f) for f in finite_flags(types.SimpleNamespace(topology=topo, mesh=None))(state)]


def test_flags_name_the_lowest_broken_federation_by_its_path():
    topo = _tree()
    state = _state()
    assert all(f.all() for f in _flags(state, topo))
    assert nonfinite_error(topo, 3, _flags(state, topo), 2) is None
    padded = state._replace(levels=(*state.levels[:2], state.levels[2]._replace(clip=jnp.array([1.0, 1.0, jnp.nan]))))
    assert all(f.all() for f in _flags(padded, topo))  # a padding row is not a federation
    levels = list(state.levels)
    levels[2] = levels[2]._replace(B={"w": levels[2].B["w"].at[1, 2, 0].set(jnp.nan)})  # de
    levels[0] = levels[0]._replace(clip=jnp.array([jnp.nan]))  # world
    flags = _flags(state._replace(levels=tuple(levels)), topo)
    assert [f.tolist() for f in flags] == [[False], [True], [True, False], [True] * 4]
    err = nonfinite_error(topo, 3, flags, 2)
    assert (err.round, err.level, err.federation) == (3, 2, "de")
    message = str(err)
    assert message.startswith("round 3 left the state of federation 'de' (level 2, world/org/de) non-finite")
    assert "1 more: 'world' (level 0)" in message and "checkpoint step 2" in message and "\n" not in message
    assert not any(word in message for word in ("delete", "rm "))
    clients = state._replace(clients=state.clients._replace(K={"k": state.clients.K["k"].at[3, 1].set(-jnp.inf)}))
    err = nonfinite_error(topo, 0, _flags(clients, topo), None)
    assert (err.level, err.federation) == (3, "de/1") and "client 'de/1' (level 3, world/org/de/1)" in str(err)
    assert "no checkpoint had been saved" in str(err)
    assert federation_path(topo, 1, 0) == "world/org"


def _run_cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, [line for line in err.getvalue().splitlines() if line.strip()]


def test_an_attack_that_overflows_the_state_stops_the_run_with_one_line(tmp_path):
    """The issue's case: a scale attack of 1e30 made perplexity nan and the run said 'done' (exit 0)."""
    workdir = tmp_path / "run"
    code, lines = _run_cli(["train", "--config", "tiny", "--workdir", str(workdir), "--quiet", "--set", ONE_LEAF,
                            "--set", "policy.attack=scale", "--set", "policy.attackers=1",
                            "--set", "policy.attack_args={factor: 1.0e+30}", "--set", "run.rounds=3",
                            "--set", "run.checkpoint_every=1", "--skip-memory-check"])
    assert code == EXIT_NONFINITE and len(lines) == 1, lines
    assert lines[0].startswith("worldlm train: error: round 0 left the state of federation 'en' (level 1, w/en) "
                               "non-finite"), lines
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0]  # what it has: the round that broke
    with Checkpointer(workdir) as ckpt:
        assert ckpt.all_steps() == []  # checkpoint_every=1 would have saved the broken state as step 1
    assert not (workdir / "summary.json").exists()


def test_the_last_good_checkpoint_survives_a_round_that_breaks(tmp_path, monkeypatch):
    """Round 2 breaks the leaf federation (injected after the round): the error comes one
    round later (metrics are read a round behind), nothing after step 2 is saved, and step 2
    restores finite."""
    real_build = train_lib.build_experiment

    def build(config, *args, **kwargs):
        exp = real_build(config, *args, **kwargs)
        real_round, calls = exp.strategy.run_round, []

        def run_round(state, batch, key, policies=None):
            state, metrics = real_round(state, batch, key, policies)
            calls.append(1)
            if len(calls) == 3:  # round 2: a NaN in the leaf federation's backbone
                B = state.levels[1].B
                name = sorted(B)[0]
                bad = jax.device_put(B[name].at[0].set(jnp.nan), B[name].sharding)
                levels = (*state.levels[:1], state.levels[1]._replace(B={**B, name: bad}), *state.levels[2:])
                state = state._replace(levels=levels)
            return state, metrics

        run_round._cache_size = real_round._cache_size
        exp.strategy = exp.strategy._replace(run_round=run_round)
        return exp

    monkeypatch.setattr(train_lib, "build_experiment", build)
    config = cli_commands.load_config("tiny", [ONE_LEAF, "run.rounds=4", "run.checkpoint_every=2"])
    with pytest.raises(NonFiniteStateError) as err:
        train_lib.train(config, str(tmp_path), quiet=True)
    assert (err.value.round, err.value.level, err.value.federation) == (2, 1, "en"), str(err.value)
    assert "checkpoint step 2 (from before it) is the last good one" in str(err.value)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2, 3]  # every round that ran is written
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [2]
        state, host = ckpt.restore(2)
    assert host["round"] == 2
    assert not any(np.isnan(np.asarray(x)).any() for x in jax.tree.leaves(state)  # (clip norms are +inf: no DP)
                   if jnp.issubdtype(np.asarray(x).dtype, jnp.inexact))
    assert not (tmp_path / "summary.json").exists()


def test_a_vectorised_sweep_stops_at_the_point_whose_state_broke(tmp_path):
    """A vectorised sweep ran every point to the end and exited 0 with a nan point;
    now it stops at the first round that broke a point, naming the point, and exits 4."""
    workdir = tmp_path / "sweep"
    code, lines = _run_cli(["sweep", "--config", "tiny", "--workdir", str(workdir), "--quiet", "--vectorized",
                            "--set", ONE_LEAF, "--set", "policy.attack=scale",
                            "--set", "policy.attack_args={factor: 1.0e+30}", "--set", "run.rounds=3",
                            "--grid", "policy.attackers=0,1"])
    assert code == EXIT_NONFINITE, lines
    error = [line for line in lines if "error" in line]
    assert len(error) == 1 and error[0].startswith(
        "worldlm sweep: error: sweep point 1 (run.seed=0): round 0 left the state of federation 'en' "
        "(level 1, w/en) non-finite"), lines
    assert not list(workdir.glob("*/summary.json"))  # the sweep did not finish
