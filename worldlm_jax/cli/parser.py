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
import sys
from typing import Sequence

from worldlm_jax.cli import commands
from worldlm_jax.cli.commands import EXIT_DOES_NOT_FIT, CliError
from worldlm_jax.config import ConfigError, presets as configs

__all__ = ["main", "build_parser"]

DEFAULT_PRESET = "demo"

DESCRIPTION = """\
WorldLM: pre-train a language model across a tree of federations
(world -> languages/domains -> clients) in JAX, and compare it with
FedAvg, HierFAVG, FedPer, local and centralized baselines.

subcommands:
  train     train (or resume) one run; writes WORKDIR/{summary.json,metrics.jsonl,config.yaml,checkpoints/}
  eval      re-evaluate a run's latest checkpoint; writes WORKDIR/eval.json
  sweep     train every point of a grid of overrides, one run dir each; writes DIR/sweep.md
  split-search  train one run per candidate key-layer split, rank them by perplexity and bytes
            (a Pareto front); writes DIR/split_search.md and the chosen split as DIR/split.yaml
  report    compare runs: tables (seeds pooled, differing config fields), learning curves
            against rounds, tokens, bytes and simulated hours, a sweep plot; warns on unequal round counts
  plan      memory per device of a run (federation state, parameters, optimizer
            states, activations; XLA's figure), before any data is loaded
  config    the resolved config as YAML (what train saves as config.yaml) and each
            federation's policy: fields off the defaults and where each comes from
  presets   list the built-in configs (--show NAME: one preset, resolved)

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
  worldlm config --config tiny --short                      # each federation's policy, and who set it
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


# ---- parser ------------------------------------------------------------------------
_RAW = argparse.RawDescriptionHelpFormatter


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


def _add_device_memory_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device-memory", type=float, metavar="GIB",
                   help="memory of one device in GiB, e.g. to plan a GPU/TPU run from a CPU box (default: what "
                        "the device reports; on CPU, available host RAM / local devices)")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no topology, progress bar or per-round output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for log files)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worldlm", description=DESCRIPTION, epilog=EPILOG, formatter_class=_RAW)
    _add_plugin_arg(parser, "plugins_before")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,sweep,split-search,report,plan,config,presets}")
    _train_parser(sub)
    _eval_parser(sub)
    _sweep_parser(sub)
    _split_search_parser(sub)
    _report_parser(sub)
    _plan_parser(sub)
    _config_parser(sub)
    _presets_parser(sub)
    return parser


def _train_parser(sub) -> None:
    """train: one run, resumed when its dir has checkpoints."""
    p = sub.add_parser("train", help="train (or resume) one run", formatter_class=_RAW,
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
    p.add_argument("--from-step", type=int, metavar="N",
                   help="resume from saved step N rather than the latest (past a damaged or diverged step): "
                        "the later checkpoints are set aside as <step>.superseded, none deleted")
    _add_device_memory_arg(p)
    _add_plugin_arg(p, "plugins_after")
    _add_distributed_args(p)
    p.set_defaults(func=commands.cmd_train)


def _eval_parser(sub) -> None:
    """eval: a run's checkpoint, evaluated again."""
    p = sub.add_parser("eval", help="re-evaluate a run's latest checkpoint", formatter_class=_RAW,
                       description="Rebuild the run from WORKDIR/config.yaml, restore its latest checkpoint and\n"
                                   "report perplexity per federation. Writes WORKDIR/eval.json.",
                       epilog="example:\n  worldlm eval --workdir runs/demo-worldlm")
    p.add_argument("--workdir", required=True, help="a run directory written by 'worldlm train'")
    p.add_argument("--split", default="validation", choices=("validation", "train"),
                   help="validation windows (default; what training reports) or as many windows cut "
                        "from the clients' training data (written to eval_train.json)")
    p.add_argument("--step", type=int, default=None, help="checkpoint round to evaluate (default: latest)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help=f"change how it is evaluated (repeatable): {', '.join(commands.EVAL_FIELDS)}, "
                        "e.g. --set data.eval_batches=16 for more windows")
    _add_plugin_arg(p, "plugins_after")
    _add_distributed_args(p)
    p.set_defaults(func=commands.cmd_eval)


def _sweep_parser(sub) -> None:
    """sweep: a grid of configs, one run dir per point (or one program)."""
    p = sub.add_parser("sweep", help="train a grid of configs, one run dir per point", formatter_class=_RAW,
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
                        "config.yaml} and DIR/sweep.md, sweep.json; checkpoints in DIR/checkpoints, so the "
                        "same command resumes a killed sweep")
    p.add_argument("--sweep-devices", type=int, default=0, metavar="S",
                   help="with --vectorized: spread the points over S groups of devices (a sweep x clients "
                        "mesh of S x N/S; S must divide the N devices, run.devices or all): each group "
                        "trains its points on its own N/S devices. Default: the largest divisor of N that "
                        "is <= the number of points (points are padded to a multiple of S)")
    _add_output_args(p)
    _add_plugin_arg(p, "plugins_after")
    _add_distributed_args(p)
    p.set_defaults(func=commands.cmd_sweep)


def _split_search_parser(sub) -> None:
    """split-search: which layers to localise, one run per candidate split."""
    p = sub.add_parser("split-search", help="choose the key layers: one run per candidate split, ranked",
                       formatter_class=_RAW,
                       description="Train the config once per candidate split of the model into backbone and\n"
                                   "key layers (top-k and bottom-k blocks, attention, MLP, embeddings, none =\n"
                                   "hierfavg), each in DIR/<candidate>, and rank them by validation perplexity\n"
                                   "and bytes communicated. Prints the table (the Pareto front marked) and the\n"
                                   "chosen split as --set arguments; writes DIR/split_search.md, .json and\n"
                                   "DIR/split.yaml. Finished candidates are skipped on a rerun.",
                       epilog="example:\n  worldlm split-search --config tiny --workdir runs/split")
    _add_config_args(p)
    p.add_argument("--workdir", required=True, help="search directory (one sub-directory per candidate)")
    p.add_argument("--candidates", default="", metavar="NAME,NAME",
                   help="only these candidates (default: all; the names are those of the table)")
    p.add_argument("--probe", type=int, default=0, metavar="ROUNDS",
                   help="first train HierFAVG for ROUNDS rounds (DIR/probe-hierfavg), rank the parameter groups by "
                        "how much their updates differ between federations relative to within them, and "
                        "add the most divergent 30%% localised as the candidate 'probe'")
    _add_output_args(p)
    _add_plugin_arg(p, "plugins_after")
    _add_distributed_args(p)
    p.set_defaults(func=commands.cmd_split_search)


def _report_parser(sub) -> None:
    """report: finished runs compared."""
    p = sub.add_parser("report", help="compare runs: markdown table and plots", formatter_class=_RAW,
                       description="One row per run (algorithm, rounds, perplexity, bits/byte, ratio to the\n"
                                   "first run, perplexity per federation, the config fields that differ) in\n"
                                   "OUT/report.md, runs that differ only in run.seed pooled (mean, std, n),\n"
                                   "a warning per run not comparable (unfinished, other round counts), and\n"
                                   "plots: curves.png (train loss and eval perplexity against rounds, tokens,\n"
                                   "bytes communicated and simulated hours), sweep.png (perplexity against the one swept\n"
                                   "numeric field), perplexity_<run>.png (per federation).",
                       epilog="examples:\n  worldlm report runs/demo-worldlm runs/demo-fedavg --out runs/report\n"
                              "  worldlm report runs/lr-sweep --out runs/lr-report     # a sweep dir: all its points")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories (a sweep directory stands for all its points); "
                        "the first is the reference")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-group", dest="group_seeds", action="store_false",
                   help="one row and one curve per run: do not pool runs that differ only in run.seed")
    p.set_defaults(func=commands.cmd_report)


def _plan_parser(sub) -> None:
    """plan: memory per device, before any data is loaded."""
    p = sub.add_parser("plan", help="memory per device of a run, before any data is loaded", formatter_class=_RAW,
                       description="Per-device memory of one round of the run: federation state per level (as\n"
                                   "stored: wide levels sharded), the round's working copies and sums, the\n"
                                   "clients in flight (parameters, optimizer states, activations), per-slot\n"
                                   "copies and the batch; then XLA's own figure for the round, lowered and\n"
                                   "compiled on abstract inputs. Loads no data, allocates nothing.\n"
                                   f"Exits {EXIT_DOES_NOT_FIT} when the round cannot fit a device, naming "
                                   "the knobs that lower it\nand one --set line that makes it fit.",
                       epilog="examples:\n  worldlm plan --config small\n"
                              "  worldlm plan --config paper-125m --platform gpu --device-memory 80 --json")
    _add_config_args(p)
    _add_device_memory_arg(p)
    p.add_argument("--platform", choices=("cpu", "gpu", "tpu"), default=None,
                   help="plan for this platform's layout (default: this host's): on GPU/TPU a device runs all "
                        "its clients at once, on CPU two (run.chunk: -1); another platform needs --device-memory "
                        "and is not compiled")
    p.add_argument("--no-compile", action="store_true",
                   help="the estimate only: skip compiling the round for XLA's figure (seconds faster)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON line")
    _add_plugin_arg(p, "plugins_after")
    p.set_defaults(func=commands.cmd_plan)


def _config_parser(sub) -> None:
    """config: the resolved config and where each federation's policy comes from."""
    p = sub.add_parser("config", help="the resolved config and each federation's policy", formatter_class=_RAW,
                       description="Print the resolved config as YAML (what 'worldlm train' saves as\n"
                                   "WORKDIR/config.yaml), then a table of every federation of the tree (by its\n"
                                   "path, e.g. world/en) with each policy field it does not leave at the\n"
                                   "defaults, its value, and where it comes from: set (in the federation's own\n"
                                   "policy:), inherited from an ancestor, inherited from the config's\n"
                                   "policy: section ('config policy'), or the root's rule the strategy brings\n"
                                   "where the config sets none ('default of strategy diloco'). The table is\n"
                                   "written as YAML comments,\n"
                                   "so the whole output loads back as a config. Loads no data.",
                       epilog="examples:\n  worldlm config --config tiny\n"
                              "  worldlm config --config my.yaml --set tree.policy.client_lr=1e-2 --short")
    _add_config_args(p)
    p.add_argument("--short", action="store_true", help="print only the table of policies per federation")
    _add_plugin_arg(p, "plugins_after")
    p.set_defaults(func=commands.cmd_config)


def _presets_parser(sub) -> None:
    """presets: the built-in configs."""
    p = sub.add_parser("presets", help="list the built-in configs (--show NAME: one, resolved)",
                       formatter_class=_RAW,
                       description="List the built-in configs, or print one (--show NAME) as 'worldlm config'\n"
                                   "does: its YAML and the table of policies per federation.",
                       epilog="example:\n  worldlm presets --show tiny")
    p.add_argument("--show", metavar="NAME", help="print this preset's resolved YAML and its policy table "
                                                   "('worldlm config --config NAME --short': the table alone)")
    p.set_defaults(func=commands.cmd_presets)


def main(argv: Sequence[str] | None = None) -> int:
    from worldlm_jax.run import training as train_lib
    train_lib.configure_devices()  # one CPU device per core, before JAX starts (as train() does)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from worldlm_jax import plugins
    from worldlm_jax.data.corpus import CorpusError
    from worldlm_jax.engine.releases import ReleaseError
    from worldlm_jax.outputs.checkpoint import CheckpointError
    from worldlm_jax.run import distributed
    from worldlm_jax.run.memory_plan import DoesNotFit
    from worldlm_jax.tree.policy import TopologyError

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
    except (CliError, ConfigError, TopologyError, ReleaseError, CheckpointError, CorpusError,
            distributed.DistributedError) as e:
        print(f"worldlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        # Config building raises plain ValueErrors too (e.g. an unknown algorithm); anything
        # raised once training has started is a bug and keeps its traceback.
        if _raised_while_building(e):
            print(f"worldlm {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


# Where a plain ValueError means bad input, not a failure of training: (module, function).
# tests/test_cli.py checks that every one of them exists, so a rename cannot silently undo this.
BUILDING_FUNCTIONS = (("worldlm_jax.cli.commands", "load_config"), ("worldlm_jax.cli.commands", "check_tree"),
                      ("worldlm_jax.cli.commands", "apply_privacy_target"), ("worldlm_jax.sweeps.grid", "parse_grid"),
                      ("worldlm_jax.sweeps.grid", "point_config"), ("worldlm_jax.config.schema", "from_dict"),
                      ("worldlm_jax.data.pipeline", "prepare"),  # data folders, specs and splits
                      ("worldlm_jax.config.schema", "apply_override"))


def _raised_while_building(error: BaseException) -> bool:
    """Whether the error comes from config/topology construction, not from training."""
    tb = error.__traceback__
    frames = set()
    while tb is not None:
        frames.add((tb.tb_frame.f_globals.get("__name__"), tb.tb_frame.f_code.co_name))
        tb = tb.tb_next
    return any(f in frames for f in BUILDING_FUNCTIONS)