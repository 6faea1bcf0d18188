"""The `worldlm` subcommands' handlers (`cmd_*`, each given the parsed
arguments, returning the exit code) and the config they share: a preset or
YAML with --set overrides and --plugin modules. `cli` builds the parser and
dispatches to them.
"""
from __future__ import annotations

import inspect
import json
import os
import sys
import textwrap
from typing import Sequence

from worldlm_jax.config import Config, apply_override, apply_overrides, load_yaml, presets as configs
from worldlm_jax.config.loading import load_written
from worldlm_jax.config.schema import policy_fields_written, refuse_shadowed_policy


class CliError(Exception):
    """A user error the CLI reports as one line (exit code 2)."""


EXIT_DOES_NOT_FIT = 3  # `plan` and `train`: the round cannot fit a device's memory
EXIT_NONFINITE = 4  # `train` and `sweep`: a round left a federation's state NaN or Inf (run_loop.NonFiniteStateError)


def _stopped_nonfinite(command: str, error: Exception) -> int:
    """A run whose state broke: its one line (round, level, federation), like any CLI error."""
    print(f"worldlm {command}: error: {error}", file=sys.stderr)
    return EXIT_NONFINITE


# ---- config -----------------------------------------------------------------------
def preset_name(spec: str) -> str:
    """'demo' -> 'demo'; 'path/to/my_exp.yaml' -> 'my_exp' (used in default workdirs)."""
    if spec in configs.PRESETS:
        return spec
    return os.path.splitext(os.path.basename(os.path.normpath(spec)))[0] or "config"


def load_config(spec: str, overrides: Sequence[str] = (), plugins: Sequence[str] = ()) -> Config:
    """A preset or YAML file, with overrides applied; the tree is compiled to check it.

    `plugins`: resolved specs of --plugin modules (already imported), kept in the
    config so the saved config.yaml imports them again for eval and resume."""
    import dataclasses

    from worldlm_jax.sweeps.grid import normalize_override

    config, written = load_written(spec)
    if plugins:
        config = dataclasses.replace(config, plugins=tuple(dict.fromkeys((*config.plugins, *plugins))))
    overrides = [normalize_override(o) for o in overrides]
    config = apply_overrides(config, overrides)
    # the YAML's policy fields, once the overrides have chosen the strategy
    config = refuse_shadowed_policy(config, written | policy_fields_written(overrides))
    check_tree(config)
    return config


def check_tree(config: Config) -> None:
    """Compile the tree now, so a bad tree fails before any data is loaded."""
    from worldlm_jax.data import corpus
    from worldlm_jax.tree.topology import build_topology

    build_topology(config.run_tree(), known_sources=corpus.list_sources(), root_policy=config.policy)


def _find_field(config: Config, names: Sequence[str]) -> str | None:
    """Dotted path of the first field of a config section named one of `names`."""
    import dataclasses

    for name in names:
        for section in dataclasses.fields(config):
            value = getattr(config, section.name)
            if dataclasses.is_dataclass(value) and name in {f.name for f in dataclasses.fields(value)}:
                return f"{section.name}.{name}"
    return None


def apply_privacy_target(config: Config, epsilon: float | None, delta: float | None) -> tuple[Config, dict]:
    """--target-epsilon/--target-delta: into the config when it has fields for them,
    else as train() keyword arguments when train accepts them, else a CliError."""
    if epsilon is None:
        if delta is not None:
            raise CliError("--target-delta needs --target-epsilon")
        return config, {}
    if not epsilon > 0:
        raise CliError(f"--target-epsilon={epsilon}: expected a number > 0")
    if delta is not None and not 0 < delta < 1:
        raise CliError(f"--target-delta={delta}: expected 0 < delta < 1")
    from worldlm_jax.sweeps.grid import yaml_float

    eps_field = _find_field(config, ("target_epsilon", "dp_target_epsilon"))
    if eps_field is not None:
        config = apply_override(config, f"{eps_field}={yaml_float(epsilon)}")
        if delta is not None:
            delta_field = _find_field(config, ("target_delta", "dp_target_delta", "dp_delta"))
            if delta_field is None:
                raise CliError("--target-delta: the config has no field for the DP delta")
            config = apply_override(config, f"{delta_field}={yaml_float(delta)}")
        return apply_overrides(config, []), {}  # validated like any override
    from worldlm_jax.run import training as train_lib

    params = inspect.signature(train_lib.train).parameters
    if "target_epsilon" not in params or (delta is not None and "target_delta" not in params):
        raise CliError("--target-epsilon: DP noise calibration to a target epsilon is not available yet "
                       "(neither the config nor train() accepts it); set the noise directly, e.g. "
                       "--set policy.dp_noise_multiplier=1.0 --set policy.dp_clip=1.0")
    kwargs = {"target_epsilon": epsilon}
    if delta is not None:
        kwargs["target_delta"] = delta
    return config, kwargs


# ---- subcommands -------------------------------------------------------------------
def cmd_train(args) -> int:
    from worldlm_jax.run import dirs as run_dirs, records as records_lib, training as train_lib

    config = load_config(args.config, args.set, args.plugins)
    config, extra = apply_privacy_target(config, args.target_epsilon, args.target_delta)
    _check_same_config(config)
    workdir = args.workdir or os.path.join("runs", f"{preset_name(args.config)}-{config.algorithm.name}")
    from worldlm_jax.run.probe import resolve_key_layers  # (its probe run first: the split it picks is the config)
    config = resolve_key_layers(config, workdir, train_lib.train,
                                say=print if not args.quiet and _primary() else (lambda *a: None))
    run_dirs.check_resumable(workdir, config)  # before the finished-run check: train() checks it too
    # a run a callback stopped is resumed by the same command (a sweep skips it instead)
    done = run_dirs.finished_summary(workdir, config.run.rounds, stopped=False)
    if done is not None and args.from_step is None:  # (--from-step reruns the rounds after its step)
        print(f"{workdir} already finished {config.run.rounds} rounds; raise run.rounds to continue it")
        print(records_lib.format_table(done))
        return 0
    if not args.quiet and _primary():  # each federation's rules and where they came from
        print(describe_config(config, short=True), end="")
    if not args.skip_memory_check:  # before any data is loaded; raises DoesNotFit
        result = memory_check(config, args.device_memory)
        if not args.quiet and _primary():
            print(memory_line(result))
    from worldlm_jax.run.loop import NonFiniteStateError
    try:
        summary = train_lib.train(config, workdir, quiet=args.quiet, progress=not args.no_progress,
                                  from_step=args.from_step, **extra)
    except NonFiniteStateError as e:
        return _stopped_nonfinite("train", e)
    # a callback's stop is the run's own decision, not an interruption to report as Ctrl-C
    code = 130 if summary.get("interrupted") and "stopped_by" not in summary else 0
    if not _primary():
        return code
    if args.quiet:  # train printed nothing; the result is still worth one table
        print(records_lib.format_table(summary))
    if "stopped_by" in summary:
        state = f"stopped by {summary['stopped_by']} after {summary['rounds_completed']} rounds"
    else:
        state = "interrupted; run the same command to resume" if summary.get("interrupted") else "done"
    print(f"{state}: {os.path.join(workdir, 'summary.json')}")
    return code


def memory_check(config: Config, device_memory_gib: float | None = None):
    """`worldlm train`'s first step: the run's memory plan (no data loaded), or
    memory_plan.DoesNotFit naming the knobs. Compiles the round for XLA's figure
    only when the estimate comes near the device's memory."""
    from worldlm_jax.run import memory_plan, training as train_lib

    train_lib.prepare_backend(config.model)  # the XLA flags training uses, before JAX starts
    return memory_plan.check(config, compile="auto", device_memory_gib=device_memory_gib)


def memory_line(result) -> str:
    from worldlm_jax.run.memory_plan import fmt_bytes

    source = "XLA" if result.xla else "estimate"
    return (f"memory per device: {fmt_bytes(result.required)} ({source}) of {fmt_bytes(result.usable)} usable "
            f"({result.device_memory_source}); 'worldlm plan' shows the parts")


def cmd_plan(args) -> int:
    from worldlm_jax.run import memory_plan, training as train_lib

    config = load_config(args.config, args.set, args.plugins)
    train_lib.prepare_backend(config.model)  # plan the program training compiles (bf16 products' form)
    result = memory_plan.plan(config, compile=not args.no_compile, device_memory_gib=args.device_memory,
                              platform=args.platform)
    print(memory_plan.to_json(result) if args.json else memory_plan.format_plan(result))
    if not result.fits:
        message = memory_plan.does_not_fit_message(result, knobs_shown=not args.json)
        print(f"worldlm plan: error: {message}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return 0


# What `worldlm eval --set` may change: how the checkpoint is evaluated, never what was trained.
EVAL_FIELDS = ("data.eval_batches", "data.eval_batch_size", "data.data_dir")


def evaluate_run(workdir: str, split: str = "validation", step: int | None = None,
                 overrides: Sequence[str] = ()) -> dict:
    """Rebuild the run from workdir/config.yaml, restore a checkpoint and evaluate it.

    `overrides` ('key=value', `EVAL_FIELDS` only) change the windows or where the
    data lives; anything else would evaluate a model the run did not train.
    Returns records.describe_eval's dict plus 'split', 'round', 'workdir' and,
    with overrides, 'overrides'.
    """
    import numpy as np

    from worldlm_jax.data.federated import validation_batches
    from worldlm_jax.engine import evaluate, strategies
    from worldlm_jax.outputs import checkpoint
    from worldlm_jax.run import experiment as experiment_lib, records as records_lib, training as train_lib

    config_path = os.path.join(workdir, "config.yaml")
    if not os.path.exists(config_path):
        raise CliError(f"{workdir} has no config.yaml; is it a worldlm run dir?")
    config = load_yaml(config_path)
    for assignment in overrides:
        key = assignment.partition("=")[0].strip()
        if key not in EVAL_FIELDS:
            raise CliError(f"--set {assignment}: worldlm eval may change only {', '.join(EVAL_FIELDS)}; "
                           f"the rest is the run's {config_path} (train a new run to change it)")
    config = apply_overrides(config, overrides)
    _check_same_config(config)
    train_lib.enable_compilation_cache(config.run.compilation_cache)  # the run's programs, compiled once
    with checkpoint.Checkpointer(workdir) as ckpt:
        latest = ckpt.latest_step()
        if latest is None:
            raise CliError(f"{workdir} has no checkpoint to evaluate; train it first")
        ckpt.check_saved(step)  # a step never saved says so (and lists the saved ones) before data loads
        exp = experiment_lib.build_experiment(config)
        state, host = experiment_lib.restore_state(exp, ckpt, step)
    if split == "validation":
        eval_fn = exp.eval_fn
    else:  # the same number of fixed windows, cut from each client's training stream
        tokens = validation_batches([c.train for c in exp.data.clients], config.data.seq_len,
                                    config.data.eval_batch_size, config.data.eval_batches)
        n = exp.topology.n_clients  # a pooled strategy (centralized) deploys its one model everywhere
        pooled = strategies.get(config.algorithm.name).pooled
        deploy = np.zeros(n, np.int32) if pooled else np.arange(n, dtype=np.int32)
        eval_fn = evaluate.make_evaluator(exp.spec, exp.model_def.loss, tokens, deploy)
    result = records_lib.describe_eval(exp, np.asarray(eval_fn(state)))
    extra = {"overrides": list(overrides)} if overrides else {}
    return {"workdir": workdir, "split": split, "round": int(host["round"]), **result, **extra}


def cmd_eval(args) -> int:
    result = evaluate_run(args.workdir, args.split, args.step, args.set)
    if not _primary():
        return 0
    name = "eval.json" if args.split == "validation" else f"eval_{args.split}.json"
    out = os.path.join(args.workdir, name)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(format_eval(result))
    print(f"wrote {out}")
    return 0


def format_eval(result: dict) -> str:
    per_fed = result["per_federation"]
    width = max([len(n) for n in per_fed] + [len("overall")]) + 2
    lines = [f"{result['workdir']}: {result['split']} split after {result['round']} rounds",
             f"{'federation':<{width}} perplexity"]
    lines += [f"{name:<{width}} {ppl:10.3f}" for name, ppl in per_fed.items()]
    lines.append(f"{'overall':<{width}} {result['perplexity']:10.3f}   ({result['bits_per_byte']:.3f} bits/byte)")
    return "\n".join(lines)


def cmd_sweep(args) -> int:
    from worldlm_jax.sweeps import grid as sweep

    base = load_config(args.config, args.set, args.plugins)
    _check_same_config(base)
    grid = sweep.parse_grid(args.grid)
    points = sweep.grid_points(grid)
    for assignments in points:  # every point must be a valid config with a valid tree
        check_tree(sweep.point_config(base, assignments))
    say = print if _primary() else (lambda *a, **k: None)  # multi-process: process 0 prints
    say(f"sweep: {len(points)} point(s) in {args.workdir}")
    from worldlm_jax.run.loop import NonFiniteStateError
    if args.vectorized:
        try:  # the error names the point
            rows = sweep.run_vectorized(base, grid, args.workdir, sweep_devices=args.sweep_devices, log=say)
        except NonFiniteStateError as e:
            return _stopped_nonfinite("sweep", e)
        say(sweep.markdown_table([k for k, _ in grid], rows), end="")
        say(f"wrote {os.path.join(args.workdir, 'sweep.md')}")
        return 0
    try:  # the log names the point that was training
        rows = sweep.run_sweep(base, grid, args.workdir, quiet=args.quiet, progress=not args.no_progress, log=say)
    except NonFiniteStateError as e:
        return _stopped_nonfinite("sweep", e)
    if not _primary():
        return 130 if any(r["status"] == "interrupted" for r in rows) else 0
    print(sweep.markdown_table([k for k, _ in grid], rows), end="")
    print(f"wrote {os.path.join(args.workdir, 'sweep.md')}")
    return 130 if any(r["status"] == "interrupted" for r in rows) else 0


def cmd_split_search(args) -> int:
    from worldlm_jax.run.loop import NonFiniteStateError
    from worldlm_jax.sweeps import split_search

    base = load_config(args.config, args.set, args.plugins)
    _check_same_config(base)
    split_search.check_base(base)
    only = [c.strip() for c in args.candidates.split(",") if c.strip()]
    say = print if _primary() else (lambda *a, **k: None)  # multi-process: process 0 prints
    try:  # the log names the candidate that was training
        result = split_search.search(base, args.workdir, only=only, quiet=args.quiet,
                                     progress=not args.no_progress, log=say, probe_rounds=args.probe)
    except NonFiniteStateError as e:
        return _stopped_nonfinite("split-search", e)
    if result["chosen"] is None:
        say("split search interrupted; run the same command again to resume")
        return 130
    chosen = next(r for r in result["rows"] if r["name"] == result["chosen"])
    say(split_search.markdown_table(result["rows"], result["front"], result["chosen"]), end="")
    say(f"chosen: {result['chosen']}  {split_search.override_line(chosen)}")
    say(f"wrote {os.path.join(args.workdir, split_search.SPLIT_FILE)}")
    return 0


def cmd_report(args) -> int:
    from worldlm_jax.outputs import report

    try:
        result = report.write_report(args.run_dirs, args.out, group_seeds=args.group_seeds)
    except report.ReportError as e:
        raise CliError(str(e)) from e
    print(result["markdown"], end="")
    for warning in result["warnings"]:
        print(f"worldlm report: warning: {warning}", file=sys.stderr)
    print("wrote " + ", ".join(result["files"]))
    return 0


def cmd_config(args) -> int:
    config = load_config(args.config, args.set, args.plugins)
    print(describe_config(config, short=args.short), end="")
    return 0


def describe_config(config: Config, short: bool = False) -> str:
    """`worldlm config`'s output: the config as train saves it (config.yaml), then
    the table of each federation's policy as YAML comments (so the whole output
    loads back); `short`: the table alone."""
    import yaml

    from worldlm_jax.engine import strategies
    from worldlm_jax.tree.provenance import format_provenance, policy_provenance

    name = config.algorithm.name  # its policy defaults at the root, as the run compiles them (Config.run_tree)
    table = format_provenance(policy_provenance(config.tree, root_policy=config.policy,
                                                root_defaults=strategies.policy_defaults(name),
                                                defaults_from=f"strategy {name}"))
    table = "\n".join([table, *deadline_lines(config)])
    if short:
        return table + "\n"
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)  # as config.save_yaml writes config.yaml
    note = "policies per federation: fields not at the defaults, and where each comes from"
    return text + "\n".join(f"# {line}".rstrip() for line in ["", note, *table.splitlines()]) + "\n"


def deadline_lines(config: Config) -> list[str]:
    """Which children each federation's `deadline_s` leaves out, by the planned network
    clock (docs/network.md, "Deadlines"); none where no federation sets a deadline."""
    from worldlm_jax.run import blueprint
    from worldlm_jax.tree.topology import build_topology

    tree = build_topology(config.run_tree(), root_policy=config.policy)  # cheap: no model, no data
    if not any(p.deadline_s > 0 for lvl in tree.levels for p in lvl.policies):
        return []
    run = blueprint.abstract_run(config)
    topo, on_time = run.run_topology, run.spec.on_time
    if not on_time:
        return []
    lines = []
    for d in range(1, topo.depth):
        above, level = topo.levels[d - 1], topo.levels[d]
        for p, (name, policy) in enumerate(zip(above.names, above.policies)):
            late = [n for n, parent, ok in zip(level.names, level.parent, on_time[d]) if parent == p and not ok]
            if policy.deadline_s > 0:
                left = f"leaves out {', '.join(late)}" if late else "hears from every child in time"
                lines.append(f"deadline: {name} waits {policy.deadline_s:g} s and {left} (the planned clock)")
    return lines


def cmd_presets(args) -> int:
    if args.show is not None:
        print(describe_config(configs.get(args.show)), end="")
        return 0
    for name, build in configs.PRESETS.items():
        doc = " ".join((inspect.getdoc(build) or "").split())
        config = build()
        facts = (f"model d={config.model.d_model} layers={config.model.n_layers}, "
                 f"seq_len={config.data.seq_len}, rounds={config.run.rounds}, "
                 f"algorithm={config.algorithm.name}")
        print(f"{name}\n" + textwrap.fill(doc, 78, initial_indent="    ", subsequent_indent="    ")
              + f"\n    ({facts})")
    return 0


def _check_same_config(config: Config) -> None:
    """Processes of one run must train the same config (checked before any data is loaded)."""
    import yaml

    from worldlm_jax.run import distributed
    distributed.check_same("config (after --set overrides)", yaml.safe_dump(config.to_dict(), sort_keys=True))


def _primary() -> bool:
    from worldlm_jax.run import distributed
    return distributed.is_primary()
