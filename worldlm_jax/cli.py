"""The `worldlm` command: train, evaluate, sweep and compare hierarchical federated LM runs.

Every subcommand takes a config the same way: `--config` names a preset
(`worldlm presets` lists them) or a YAML file, and `--set key.path=value`
overrides single fields with type checking (values are parsed as YAML).
`--plugin MODULE_OR_FILE` imports user code first, so what it registers can be
named in the config. `main(argv)` returns the exit code, so tests can call it
in-process.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import textwrap
from typing import Sequence

from worldlm_jax import configs
from worldlm_jax.config import Config, ConfigError, apply_override, apply_overrides, load_yaml

DEFAULT_PRESET = "demo"

DESCRIPTION = """\
WorldLM: pre-train a language model across a tree of federations
(world -> languages/domains -> clients) in JAX, and compare it with
FedAvg, HierFAVG, FedPer, local and centralized baselines.

subcommands:
  train     train (or resume) one run; writes WORKDIR/{summary.json,metrics.jsonl,config.yaml,checkpoints/}
  eval      re-evaluate a run's latest checkpoint; writes WORKDIR/eval.json
  sweep     train every point of a grid of overrides, one run dir each; writes DIR/sweep.md
  report    compare finished runs: a markdown table and perplexity plots
  plan      memory per device of a run (federation state, parameters, optimizer
            states, activations; XLA's figure), before any data is loaded
  presets   list the built-in configs

configs: --config PRESET or --config path/to/config.yaml (every run dir holds its
config.yaml; a YAML may start from a preset with `base: demo`), then any number of
--set key.path=value overrides, e.g.
  --set run.rounds=5 --set algorithm.name=fedavg --set policy.client_lr=1e-3
  --set algorithm.key_layers.fraction=0.5 --set data.seq_len=64

plugins: --plugin my_optimizers.py (or a dotted module name; repeatable, before or
after the subcommand) imports it before the config is read, so the optimizers,
aggregators, strategies and callbacks it registers can be named in the config
(a YAML's top-level `plugins:` list does the same).
"""

EPILOG = """\
examples:
  worldlm presets
  worldlm train --config tiny --set run.rounds=2            # a smoke run, seconds on a CPU
  worldlm train                                             # the 'demo' preset -> runs/demo-worldlm
  worldlm train --set algorithm.name=fedavg                 # the FedAvg baseline -> runs/demo-fedavg
  worldlm eval --workdir runs/demo-worldlm
  worldlm sweep --config tiny --grid algorithm.name=worldlm,fedavg --grid run.seed=0,1 --workdir runs/sweep
  worldlm report runs/demo-worldlm runs/demo-fedavg --out runs/report
  worldlm plan --config small                               # memory per device; exit 3 if it cannot fit
  worldlm --plugin my_optimizers.py train --config tiny --set policy.server_optimizer=my_opt

Re-running train or sweep with the same workdir resumes unfinished runs
(Ctrl-C finishes the current round, checkpoints and exits cleanly).
Run 'worldlm SUBCOMMAND --help' for each subcommand's options.
"""


class CliError(Exception):
    """A user error the CLI reports as one line (exit code 2)."""


EXIT_DOES_NOT_FIT = 3  # `plan` and `train`: the round cannot fit a device's memory


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

    from worldlm_jax.sweep import normalize_override

    config = configs.load(spec)
    if plugins:
        config = dataclasses.replace(config, plugins=tuple(dict.fromkeys((*config.plugins, *plugins))))
    config = apply_overrides(config, [normalize_override(o) for o in overrides])
    check_tree(config)
    return config


def check_tree(config: Config) -> None:
    """Compile the tree now, so a bad tree fails before any data is loaded."""
    from worldlm_jax.data import corpus
    from worldlm_jax.topology import build_topology

    build_topology(config.tree, known_sources=corpus.list_sources(), root_policy=config.policy)


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
    from worldlm_jax.sweep import yaml_float

    eps_field = _find_field(config, ("target_epsilon", "dp_target_epsilon"))
    if eps_field is not None:
        config = apply_override(config, f"{eps_field}={yaml_float(epsilon)}")
        if delta is not None:
            delta_field = _find_field(config, ("target_delta", "dp_target_delta", "dp_delta"))
            if delta_field is None:
                raise CliError("--target-delta: the config has no field for the DP delta")
            config = apply_override(config, f"{delta_field}={yaml_float(delta)}")
        return apply_overrides(config, []), {}  # validated like any override
    from worldlm_jax import train as train_lib

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
    from worldlm_jax import sweep, train as train_lib

    config = load_config(args.config, args.set, args.plugins)
    config, extra = apply_privacy_target(config, args.target_epsilon, args.target_delta)
    _check_same_config(config)
    workdir = args.workdir or os.path.join("runs", f"{preset_name(args.config)}-{config.algorithm.name}")
    train_lib.check_resumable(workdir, config)  # before the finished-run check: train() checks it too
    done = sweep.finished_summary(workdir, config.run.rounds)
    if done is not None:
        print(f"{workdir} already finished {config.run.rounds} rounds; raise run.rounds to continue it")
        print(train_lib.format_table(done))
        return 0
    if not args.skip_memory_check:  # before any data is loaded; raises DoesNotFit
        result = memory_check(config, args.device_memory)
        if not args.quiet and _primary():
            print(memory_line(result))
    summary = train_lib.train(config, workdir, quiet=args.quiet, progress=not args.no_progress, **extra)
    # a callback's stop is the run's own decision, not an interruption to report as Ctrl-C
    code = 130 if summary.get("interrupted") and "stopped_by" not in summary else 0
    if not _primary():
        return code
    if args.quiet:  # train printed nothing; the result is still worth one table
        print(train_lib.format_table(summary))
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
    from worldlm_jax import memory_plan, train as train_lib

    train_lib.prepare_backend(config.model)  # the XLA flags training uses, before JAX starts
    return memory_plan.check(config, compile="auto", device_memory_gib=device_memory_gib)


def memory_line(result) -> str:
    from worldlm_jax.memory_plan import fmt_bytes

    source = "XLA" if result.xla else "estimate"
    return (f"memory per device: {fmt_bytes(result.required)} ({source}) of {fmt_bytes(result.usable)} usable "
            f"({result.device_memory_source}); 'worldlm plan' shows the parts")


def cmd_plan(args) -> int:
    from worldlm_jax import memory_plan, train as train_lib

    config = load_config(args.config, args.set, args.plugins)
    train_lib.prepare_backend(config.model)  # plan the program training compiles (bf16 products' form)
    result = memory_plan.plan(config, compile=not args.no_compile, device_memory_gib=args.device_memory)
    print(memory_plan.to_json(result) if args.json else memory_plan.format_plan(result))
    if not result.fits:
        print(f"worldlm plan: error: {memory_plan.does_not_fit_message(result)}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return 0


def evaluate_run(workdir: str, split: str = "validation", step: int | None = None) -> dict:
    """Rebuild the run from workdir/config.yaml, restore a checkpoint and evaluate it.

    Returns train.describe_eval's dict plus 'split', 'round' and 'workdir'.
    """
    import numpy as np

    from worldlm_jax import checkpoint, evaluate, strategies, train as train_lib
    from worldlm_jax.data.federated import validation_batches

    config_path = os.path.join(workdir, "config.yaml")
    if not os.path.exists(config_path):
        raise CliError(f"{workdir} has no config.yaml; is it a worldlm run dir?")
    config = load_yaml(config_path)
    _check_same_config(config)
    with checkpoint.Checkpointer(workdir) as ckpt:
        latest = ckpt.latest_step()
        if latest is None:
            raise CliError(f"{workdir} has no checkpoint to evaluate; train it first")
        exp = train_lib.build_experiment(config)
        state, host = train_lib.restore_state(exp, ckpt, step)
    if split == "validation":
        eval_fn = exp.eval_fn
    else:  # the same number of fixed windows, cut from each client's training stream
        tokens = validation_batches([c.train for c in exp.data.clients], config.data.seq_len,
                                    config.data.eval_batch_size, config.data.eval_batches)
        n = exp.topology.n_clients  # a pooled strategy (centralized) deploys its one model everywhere
        pooled = strategies.get(config.algorithm.name).pooled
        deploy = np.zeros(n, np.int32) if pooled else np.arange(n, dtype=np.int32)
        eval_fn = evaluate.make_evaluator(exp.spec, exp.model_def.loss, tokens, deploy)
    result = train_lib.describe_eval(exp, np.asarray(eval_fn(state)))
    return {"workdir": workdir, "split": split, "round": int(host["round"]), **result}


def cmd_eval(args) -> int:
    result = evaluate_run(args.workdir, args.split, args.step)
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
    from worldlm_jax import sweep

    base = load_config(args.config, args.set, args.plugins)
    _check_same_config(base)
    grid = sweep.parse_grid(args.grid)
    points = sweep.grid_points(grid)
    for assignments in points:  # every point must be a valid config with a valid tree
        check_tree(sweep.point_config(base, assignments))
    say = print if _primary() else (lambda *a, **k: None)  # multi-process: process 0 prints
    say(f"sweep: {len(points)} point(s) in {args.workdir}")
    if args.vectorized:
        rows = sweep.run_vectorized(base, grid, args.workdir, sweep_devices=args.sweep_devices, log=say)
        say(sweep.markdown_table([k for k, _ in grid], rows), end="")
        say(f"wrote {os.path.join(args.workdir, 'sweep.md')}")
        return 0
    rows = sweep.run_sweep(base, grid, args.workdir, quiet=args.quiet, progress=not args.no_progress, log=say)
    if not _primary():
        return 130 if any(r["status"] == "interrupted" for r in rows) else 0
    print(sweep.markdown_table([k for k, _ in grid], rows), end="")
    print(f"wrote {os.path.join(args.workdir, 'sweep.md')}")
    return 130 if any(r["status"] == "interrupted" for r in rows) else 0


def cmd_report(args) -> int:
    from worldlm_jax import report

    try:
        result = report.write_report(args.run_dirs, args.out)
    except report.ReportError as e:
        raise CliError(str(e)) from e
    print(result["markdown"], end="")
    print("wrote " + ", ".join(result["files"]))
    return 0


def cmd_presets(args) -> int:
    for name, build in configs.PRESETS.items():
        doc = " ".join((inspect.getdoc(build) or "").split())
        config = build()
        facts = (f"model d={config.model.d_model} layers={config.model.n_layers}, "
                 f"seq_len={config.data.seq_len}, rounds={config.run.rounds}, "
                 f"algorithm={config.algorithm.name}")
        print(f"{name}\n" + textwrap.fill(doc, 78, initial_indent="    ", subsequent_indent="    ")
              + f"\n    ({facts})")
    return 0


# ---- parser ------------------------------------------------------------------------
def _add_config_args(p: argparse.ArgumentParser, default: str | None = DEFAULT_PRESET) -> None:
    p.add_argument("--config", default=default, metavar="PRESET_OR_YAML",
                   help=f"a preset name ({', '.join(configs.PRESETS)}) or a YAML file"
                        + (f" (default: {default})" if default else ""))
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config field, value parsed as YAML (repeatable), "
                        "e.g. --set run.rounds=5")


def _add_plugin_arg(p: argparse.ArgumentParser, dest: str) -> None:
    # Separate dests before and after the subcommand: a subparser's default would
    # otherwise overwrite what was given before it.
    p.add_argument("--plugin", action="append", dest=dest, default=None, metavar="MODULE_OR_FILE",
                   help="import a module (dotted name) or .py file first, so the optimizers, aggregators, "
                        "strategies and callbacks it registers can be named in the config (repeatable)")


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process runs (JAX's multi-controller runtime; the same command on every "
                             "process, with the same config, seed and data)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0, reachable from every process")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0 <= I < N (0 writes the run's files)")
    g.add_argument("--distributed", choices=("auto",),
                   help="auto: detect a TPU pod slice, SLURM or Open MPI job (jax.distributed.initialize())")
    g.add_argument("--distributed-timeout", type=int, default=None, metavar="S",
                   help="seconds to wait for every process to join (default 300); a process that dies is "
                        "noticed by the others after a third of it")


def _check_same_config(config: Config) -> None:
    """Processes of one run must train the same config (checked before any data is loaded)."""
    import yaml

    from worldlm_jax import distributed
    distributed.check_same("config (after --set overrides)", yaml.safe_dump(config.to_dict(), sort_keys=True))


def _primary() -> bool:
    from worldlm_jax import distributed
    return distributed.is_primary()


def _add_device_memory_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device-memory", type=float, metavar="GIB",
                   help="memory of one device in GiB, e.g. to plan a GPU/TPU run from a CPU box (default: what "
                        "the device reports; on CPU, available host RAM / local devices)")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no topology, progress bar or per-round output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for log files)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worldlm", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_plugin_arg(parser, "plugins_before")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,sweep,report,plan,presets}")
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("train", help="train (or resume) one run", formatter_class=raw,
                       description="Train one run, or resume it when WORKDIR already has checkpoints.\n"
                                   "Writes WORKDIR/summary.json, metrics.jsonl, config.yaml, checkpoints/.",
                       epilog="example:\n  worldlm train --config tiny --set run.rounds=2 --workdir runs/smoke")
    _add_config_args(p)
    p.add_argument("--workdir", help="run directory (default: runs/<preset>-<algorithm>)")
    _add_output_args(p)
    p.add_argument("--target-epsilon", type=float, metavar="E",
                   help="calibrate DP noise so the run ends at (E, D)-DP (when supported)")
    p.add_argument("--target-delta", type=float, metavar="D", help="delta for --target-epsilon")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="start without checking that the round fits a device's memory ('worldlm plan')")
    _add_device_memory_arg(p)
    _add_plugin_arg(p, "plugins_after")
    _add_distributed_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="re-evaluate a run's latest checkpoint", formatter_class=raw,
                       description="Rebuild the run from WORKDIR/config.yaml, restore its latest checkpoint and\n"
                                   "report perplexity per federation. Writes WORKDIR/eval.json.",
                       epilog="example:\n  worldlm eval --workdir runs/demo-worldlm")
    p.add_argument("--workdir", required=True, help="a run directory written by 'worldlm train'")
    p.add_argument("--split", default="validation", choices=("validation", "train"),
                   help="validation windows (default; what training reports) or as many windows cut "
                        "from the clients' training data (written to eval_train.json)")
    p.add_argument("--step", type=int, default=None, help="checkpoint round to evaluate (default: latest)")
    _add_plugin_arg(p, "plugins_after")
    _add_distributed_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sweep", help="train a grid of configs, one run dir per point", formatter_class=raw,
                       description="Train the cartesian product of --grid axes, one after the other, each in\n"
                                   "DIR/<key=value__...>. Finished points are skipped and unfinished ones\n"
                                   "resumed, so re-running the command continues the sweep.\n"
                                   "Writes DIR/sweep.md (a table) and DIR/sweep.json.",
                       epilog="example:\n  worldlm sweep --config tiny --grid algorithm.name=worldlm,fedavg "
                              "--grid policy.client_lr=1e-3,3e-3 --workdir runs/sweep")
    _add_config_args(p)
    p.add_argument("--grid", action="append", required=True, metavar="KEY.PATH=V1,V2,...",
                   help="one sweep axis (repeatable); commas inside [...] do not split")
    p.add_argument("--workdir", required=True, help="sweep directory (one sub-directory per point)")
    p.add_argument("--vectorized", action="store_true",
                   help="run all points as ONE compiled program (grid over policy.* / tree policies / "
                        "run.seed only); writes each point's DIR/<point>/{summary.json,metrics.jsonl,"
                        "config.yaml} (no checkpoints: it does not resume) and DIR/sweep.md, sweep.json")
    p.add_argument("--sweep-devices", type=int, default=0, metavar="S",
                   help="with --vectorized: spread the points over S groups of devices (a sweep x clients "
                        "mesh of S x N/S; S must divide the N devices, run.devices or all): each group "
                        "trains its points on its own N/S devices. Default: the largest divisor of N that "
                        "is <= the number of points (points are padded to a multiple of S)")
    _add_output_args(p)
    _add_plugin_arg(p, "plugins_after")
    _add_distributed_args(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="compare runs: markdown table and plots", formatter_class=raw,
                       description="One row per run (algorithm, rounds, perplexity, bits/byte, ratio to the\n"
                                   "first run, perplexity per federation) in OUT/report.md, plus plots.",
                       epilog="example:\n  worldlm report runs/demo-worldlm runs/demo-fedavg --out runs/report")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories (a sweep directory stands for all its points); "
                        "the first is the reference")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("plan", help="memory per device of a run, before any data is loaded", formatter_class=raw,
                       description="Per-device memory of one round of the run: federation state per level (as\n"
                                   "stored: wide levels sharded), the round's working copies and sums, the\n"
                                   "clients in flight (parameters, optimizer states, activations), per-slot\n"
                                   "copies and the batch; then XLA's own figure for the round, lowered and\n"
                                   "compiled on abstract inputs. Loads no data, allocates nothing.\n"
                                   f"Exits {EXIT_DOES_NOT_FIT} when the round cannot fit a device, naming "
                                   "the knobs that lower it.",
                       epilog="examples:\n  worldlm plan --config small\n"
                              "  worldlm plan --config paper-125m --set run.chunk=0 --device-memory 80 --json")
    _add_config_args(p)
    _add_device_memory_arg(p)
    p.add_argument("--no-compile", action="store_true",
                   help="the estimate only: skip compiling the round for XLA's figure (seconds faster)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON line")
    _add_plugin_arg(p, "plugins_after")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("presets", help="list the built-in configs")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from worldlm_jax import train as train_lib
    train_lib.configure_devices()  # one CPU device per core, before JAX starts (as train() does)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from worldlm_jax import distributed, plugins
    from worldlm_jax.checkpoint import CheckpointError
    from worldlm_jax.memory_plan import DoesNotFit
    from worldlm_jax.topology import TopologyError

    try:
        if hasattr(args, "coordinator"):  # before JAX starts its backends
            distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.distributed == "auto",
                                   args.distributed_timeout or distributed.DEFAULT_TIMEOUT_S)
        # after joining the processes: a plug-in may touch JAX's devices when imported
        args.plugins = plugins.load_all([*(args.plugins_before or []), *(getattr(args, "plugins_after", None) or [])])
        return args.func(args)
    except DoesNotFit as e:
        print(f"worldlm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    except (CliError, ConfigError, TopologyError, CheckpointError, distributed.DistributedError) as e:
        print(f"worldlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        # Config building raises plain ValueErrors too (e.g. an unknown algorithm); anything
        # raised once training has started is a bug and keeps its traceback.
        if _raised_while_building(e):
            print(f"worldlm {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


def _raised_while_building(error: BaseException) -> bool:
    """Whether the error comes from config/topology construction, not from training."""
    tb = error.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    names = {(os.path.basename(c.co_filename), c.co_name) for c in frames}
    return any(n in names for n in (("cli.py", "load_config"), ("cli.py", "check_tree"),
                                    ("cli.py", "apply_privacy_target"), ("sweep.py", "parse_grid"), ("sweep.py", "point_config"),
                                    ("config.py", "from_dict"), ("config.py", "apply_override")))


if __name__ == "__main__":
    sys.exit(main())
