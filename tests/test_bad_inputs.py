"""Every bad input a user can type or point at ends in one line that names the
field, the value and what is allowed, with a non-zero exit and no traceback.

`CASES` is the table of docs/errors.md: each row is run through the CLI
in-process (`cli.main`), and the documented table must list every case.
"""
import contextlib
import io
import os
import textwrap

import pytest

from worldlm_jax.cli import parser as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN = ["plan", "--config", "tiny", "--no-compile"]


def yaml_file(text):
    return {"bad.yaml": textwrap.dedent(text)}


def run_with_steps(*steps):
    """Writes a healthy run dir: tiny's config.yaml and checkpoints of `steps` (a small state)."""
    def write(path):
        import jax.numpy as jnp

        from worldlm_jax.config import presets as configs, save_yaml
        from worldlm_jax.outputs.checkpoint import Checkpointer

        path.mkdir(parents=True, exist_ok=True)
        save_yaml(configs.get("tiny"), str(path / "config.yaml"))
        with Checkpointer(path) as ckpt:
            for step in steps:
                ckpt.save(step, {"w": jnp.zeros(2)}, {"round": step}, force=True)
    return write


UNREDUCED_AGGREGATOR = textwrap.dedent("""\
    from worldlm_jax.plugins import aggregators


    def my_mean(delta_N, weight_N, parent_N, n_parents, args_P):
        return delta_N  # the children's rows, not reduced to one per federation


    aggregators.register("my_mean", aggregators.Aggregator(combine=my_mean))
    """)

# a strategy with DiLoCo's plan and root defaults (the {} filled in per case)
BAD_STRATEGY_DEFAULTS = textwrap.dedent("""\
    from worldlm_jax.engine import strategies

    strategies.register("my_diloco", strategies.StrategyDef(plan=lambda depth, algo: strategies.diloco_plan(depth),
                                                            policy_defaults={{{}}}))
    """)


# (id, what the user did, argv (in a tmp dir holding `files`), files, words the one-line message must contain)
CASES = [
    ("unknown-preset", "a preset that does not exist", ["plan", "--config", "tinny", "--no-compile"], {},
     ["tinny", "presets", "tiny"]),
    ("missing-yaml", "a YAML path that does not exist", ["plan", "--config", "nope.yaml", "--no-compile"], {},
     ["nope.yaml", "not found"]),
    ("invalid-yaml", "a YAML file that does not parse", ["plan", "--config", "bad.yaml", "--no-compile"],
     yaml_file("run: {rounds: 2\n"), ["bad.yaml", "not valid YAML"]),
    ("yaml-not-mapping", "a YAML file holding a list", ["plan", "--config", "bad.yaml", "--no-compile"],
     yaml_file("- 1\n- 2\n"), ["bad.yaml", "mapping"]),
    ("yaml-section-string", "a section given as a preset name", ["plan", "--config", "bad.yaml", "--no-compile"],
     yaml_file("model: tiny\n"), ["model", "base: tiny"]),
    ("unknown-base", "base: naming no preset or file", ["plan", "--config", "bad.yaml", "--no-compile"],
     yaml_file("base: tinny\n"), ["tinny"]),
    ("unknown-key", "a misspelt config key", PLAN + ["--set", "run.roundz=3"], {}, ["run.roundz", "run.rounds"]),
    ("unknown-federation", "an override naming a federation the tree lacks",
     PLAN + ["--set", "tree.fr.policy.client_lr=0.01"], {}, ["tree.fr.policy.client_lr", "'fr'", "en, de, ru"]),
    ("unknown-slot-layout", "a slot layout that does not exist", PLAN + ["--set", "run.slot_layout=packed"], {},
     ["run.slot_layout", "packed", "auto, local, spread"]),
    ("local-slots-uneven", "federation-local slots where the federations cannot divide the devices",
     PLAN + ["--set", "run.slot_layout=local", "--set", "run.devices=4"], {},
     ["run.slot_layout=local", "3 lowest federations on 4 devices", "run.slot_layout=spread"]),
    ("model-parallel-uneven", "a model axis that does not divide the devices",
     PLAN + ["--set", "run.devices=4", "--set", "run.model_parallel=3"], {},
     ["run.model_parallel=3", "4 devices", "1, 2, 4"]),
    ("model-parallel-below-1", "a model axis of 0", PLAN + ["--set", "run.model_parallel=0"], {},
     ["run.model_parallel=0", ">= 1"]),
    ("key-layers-unknown-auto", "a way of choosing the key layers that does not exist",
     PLAN + ["--set", "algorithm.key_layers.auto=learned"], {},
     ["algorithm.key_layers.auto", "'probe'", "learned"]),
    ("key-layers-auto-unresolved", "a probe-chosen split where no run trains first",
     PLAN + ["--set", "algorithm.key_layers.auto=probe"], {},
     ["algorithm.key_layers.auto=probe", "worldlm train", "drop auto"]),
    ("key-layers-probe-under-dp", "a probe-chosen split on a tree with DP federations",
     ["train", "--config", "tiny", "--workdir", "run", "--set", "algorithm.key_layers.auto=probe",
      "--set", "policy.dp_clip=1.0", "--set", "policy.dp_noise_multiplier=1.0"], {},
     ["algorithm.key_layers.auto=probe", "no DP release", "split-search --probe"]),
    ("key-layers-probe-without-key-layers", "a probe-chosen split for a strategy without key layers",
     ["train", "--config", "tiny", "--workdir", "run", "--set", "algorithm.key_layers.auto=probe",
      "--set", "algorithm.name=fedavg"], {}, ["algorithm.key_layers.auto=probe", "'fedavg'", "drop auto"]),
    ("bad-override", "an override without '='", PLAN + ["--set", "run.rounds"], {}, ["run.rounds", "key.path=value"]),
    ("wrong-type", "a word where a number goes", PLAN + ["--set", "run.rounds=many"], {},
     ["run.rounds", "many", "integer"]),
    ("zero-rounds", "zero rounds", PLAN + ["--set", "run.rounds=0"], {}, ["run.rounds", ">= 1"]),
    ("val-fraction", "a validation fraction of 1.5", PLAN + ["--set", "data.val_fraction=1.5"], {},
     ["data.val_fraction", "1.5"]),
    ("seq-over-max-len", "sequences longer than the model's context", PLAN + ["--set", "data.seq_len=4096"], {},
     ["data.seq_len", "model.max_len"]),
    ("unknown-algorithm", "an algorithm nobody registered", PLAN + ["--set", "algorithm.name=fedsgd"], {},
     ["algorithm.name", "fedsgd", "registered", "worldlm"]),
    ("unknown-client-optimizer", "a client optimizer nobody registered",
     PLAN + ["--set", "algorithm.client_optimizer=adamx"], {}, ["client_optimizer", "adamx", "adamw"]),
    ("unknown-server-optimizer", "a server optimizer nobody registered",
     PLAN + ["--set", "policy.server_optimizer=fedadamm"], {}, ["server_optimizer", "fedadamm", "registered"]),
    ("unknown-aggregator", "an aggregator nobody registered", PLAN + ["--set", "policy.aggregator=medain"], {},
     ["aggregator", "medain", "median"]),
    ("undeclared-aggregator-arg", "an argument the aggregator does not take",
     PLAN + ["--set", "policy.aggregator=median", "--set", "policy.aggregator_args.trim=0.2"], {},
     ["aggregator_args", "trim", "median"]),
    ("dp-with-robust-aggregator", "a DP federation with a robust aggregator",
     PLAN + ["--set", "policy.aggregator=median", "--set", "policy.dp_clip=1.0"], {}, ["aggregator", "DP", "mean"]),
    ("unknown-schedule", "a schedule nobody registered", PLAN + ["--set", "policy.client_lr_schedule=cosin"], {},
     ["client_lr_schedule", "cosin", "warmup_cosine"]),
    ("negative-warmup", "a negative warmup", PLAN + ["--set", "policy.warmup_rounds=-2"], {},
     ["warmup_rounds", "-2"]),
    ("unknown-objective", "a client objective nobody registered",
     PLAN + ["--set", "algorithm.client_objective=fedproxx"], {}, ["client_objective", "fedproxx", "fedprox"]),
    ("undeclared-objective-arg", "an objective argument the objective does not take",
     PLAN + ["--set", "algorithm.client_objective=fedprox", "--set", "policy.objective_args.nu=0.1"], {},
     ["objective_args", "nu", "mu"]),
    ("dropout-probability", "a dropout probability above 1", PLAN + ["--set", "policy.dropout=1.5"], {},
     ["dropout", "1.5", "probability"]),
    ("unknown-attack", "an attack nobody registered", PLAN + ["--set", "policy.attack=flip"], {},
     ["attack", "flip", "sign_flip"]),
    ("negative-attackers", "a negative attacker count", PLAN + ["--set", "policy.attackers=-1"], {},
     ["attackers", "-1"]),
    ("negative-lr", "a negative learning rate", PLAN + ["--set", "policy.client_lr=-0.1"], {},
     ["client_lr", "-0.1", "> 0"]),
    ("zero-bandwidth", "a link with no bandwidth", PLAN + ["--set", "policy.link_bandwidth_mbps=0"], {},
     ["link_bandwidth_mbps", "0.0", "> 0"]),
    ("negative-latency", "a link with negative latency", PLAN + ["--set", "policy.link_latency_ms=-5"], {},
     ["link_latency_ms", "-5.0", ">= 0"]),
    ("unknown-codec", "a codec nobody registered", PLAN + ["--set", "policy.codec_up=zip"], {},
     ["codec_up", "zip", "registered codec", "int8"]),
    ("undeclared-codec-arg", "an argument none of the federation's codecs takes",
     PLAN + ["--set", "policy.codec_up=int8", "--set", "policy.codec_args.fraction=0.1"], {},
     ["codec_args", "fraction", "block"]),
    ("codec-block", "a rotation block that is not a power of two",
     PLAN + ["--set", "policy.codec_up=stochastic", "--set", "policy.codec_args.block=100"], {},
     ["codec_args", "block = 100", "power of two"]),
    ("unknown-k-agg", "an unknown key-layer rule", PLAN + ["--set", "policy.k_agg=max"], {},
     ["k_agg", "max", "attention"]),
    ("personalized-on-some-leaves", "personal key layers in one leaf federation only",
     PLAN + ["--set", "tree={name: w, children: [{name: a, clients: 2, sources: [man_en], policy: {k_agg: "
                      "personalized}}, {name: b, clients: 2, sources: [man_de]}]}"], {},
     ["k_agg=personalized", "not on b", "every federation"]),
    ("flat-baseline-mixed-sampling", "a flat baseline over federations that sample differently",
     PLAN + ["--set", "algorithm.name=fedavg", "--set", "tree={name: w, children: [{name: a, clients: 2, "
                      "sources: [man_en], policy: {sampling: poisson, clients_per_round: 1}}, {name: b, "
                      "clients: 2, sources: [man_de]}]}"], {}, ["sample clients in different ways", "one sampling mode"]),
    ("dp-noise-without-clip", "DP noise without a clip norm", PLAN + ["--set", "policy.dp_noise_multiplier=1.0"], {},
     ["dp_clip", "finite clip"]),
    ("bad-delta", "a DP delta of 2", PLAN + ["--set", "privacy.target_delta=2"], {}, ["target_delta", "0 < delta < 1"]),
    ("unknown-accountant", "an unknown accountant", PLAN + ["--set", "privacy.accountant=moments"], {},
     ["accountant", "moments", "rdp"]),
    ("unknown-callback", "a callback nobody registered", PLAN + ["--set", "run.callbacks=[early_stop]"], {},
     ["run.callbacks", "early_stop", "registered"]),
    ("callback-arg-not-taken", "an argument the callback's factory does not take",
     PLAN + ["--set", "run.callbacks=[csv, {name: jsonl, args: {pth: x.jsonl}}]"], {},
     ["run.callbacks[1].args", "'pth'", "takes path", "correct or remove"]),
    ("vectorized-sweep-callbacks", "callbacks in a vectorised sweep, which runs none",
     ["sweep", "--config", "tiny", "--vectorized", "--grid", "policy.client_lr=0.1,0.2", "--workdir", "sweep",
      "--set", "run.callbacks=[csv]"], {}, ["--vectorized", "run.callbacks", "run.callbacks=[]"]),
    ("tree-node-without-name", "a tree node without a name",
     PLAN + ["--set", "tree={children: [{clients: 2, sources: [man_en]}]}"], {}, ["name"]),
    ("tree-duplicate-name", "two federations with one name",
     PLAN + ["--set", "tree={name: w, children: [{name: a, clients: 1, sources: [man_en]}, "
                      "{name: a, clients: 1, sources: [man_de]}]}"], {}, ["duplicate", "'a'"]),
    ("tree-unknown-source", "a data source that does not exist",
     PLAN + ["--set", "tree={name: w, children: [{name: a, clients: 1, sources: [man_xx]}]}"], {},
     ["man_xx", "known sources"]),
    ("tree-children-and-clients", "a federation with both children and clients",
     PLAN + ["--set", "tree={name: w, clients: 2, sources: [man_en], children: [{name: a, clients: 1, "
                      "sources: [man_de]}]}"], {}, ["exactly one of 'children'", "'clients'"]),
    ("tree-uneven-depth", "leaf federations at different depths",
     PLAN + ["--set", "tree={name: w, children: [{name: a, clients: 1, sources: [man_en]}, {name: b, children: "
                      "[{name: c, clients: 1, sources: [man_de]}]}]}"], {}, ["different depths"]),
    ("tree-unknown-policy-field", "a misspelt policy field in the tree",
     PLAN + ["--set", "tree={name: w, policy: {client_rl: 0.1}, children: [{name: a, clients: 1, "
                      "sources: [man_en]}]}"], {}, ["client_rl", "policy field"]),
    ("missing-plugin", "a plug-in file that does not exist", ["--plugin", "nope.py"] + PLAN, {}, ["nope.py"]),
    ("broken-plugin", "a plug-in that fails to import", ["--plugin", "broken.py"] + PLAN,
     {"broken.py": "import not_a_module_anywhere\n"}, ["broken.py", "not_a_module_anywhere"]),
    ("strategy-default-unknown-field", "a strategy whose policy defaults name no policy field",
     ["--plugin", "my_strategy.py"] + PLAN, {"my_strategy.py": BAD_STRATEGY_DEFAULTS.format('"server_rate": 0.7')},
     ["my_strategy.py", "StrategyDef.policy_defaults", "server_rate", "server_lr"]),
    ("strategy-default-bad-value", "a strategy whose policy defaults hold a value no federation may take",
     ["--plugin", "my_strategy.py"] + PLAN, {"my_strategy.py": BAD_STRATEGY_DEFAULTS.format('"server_lr": -1')},
     ["my_strategy.py", "StrategyDef.policy_defaults", "server_lr", "-1", "> 0"]),
    ("policy-default-shadowed", "a config-level policy field written at its default, which the strategy replaces at "
     "the root", PLAN + ["--set", "algorithm.name=diloco", "--set", "policy.server_lr=1.0"], {},
     ["policy.server_lr=1.0", "diloco", "0.7", "tree.policy.server_lr=1.0"]),
    ("key-layers-select-nothing", "key layers that match no parameter",
     PLAN + ["--set", "algorithm.key_layers={kind: regex, patterns: [nomatch]}"], {},
     ["algorithm.key_layers", "nomatch", "no parameter", "hierfavg"]),
    ("key-layers-block-out-of-range", "a key-layer block the model does not have",
     PLAN + ["--set", "algorithm.key_layers={kind: blocks, blocks: [5]}"], {},
     ["algorithm.key_layers", "[5]", "0..1"]),
    ("key-layers-unknown-group", "a key-layer group the model does not have",
     PLAN + ["--set", "algorithm.key_layers={kind: groups, groups: [block2_attn]}"], {},
     ["algorithm.key_layers", "block2_attn", "block1_mlp", "embeddings"]),
    ("link-overlap-not-bool", "an overlap that is not true or false",
     PLAN + ["--set", "tree.policy.link_overlap=3"], {}, ["world", "link_overlap", "3", "true or false"]),
    ("deadline-negative", "a negative deadline", PLAN + ["--set", "tree.policy.deadline_s=-1"], {},
     ["world", "deadline_s", "-1", ">= 0"]),
    ("deadline-without-speed", "a deadline where the clients' speed is only measured during the run",
     PLAN + ["--set", "tree.policy.deadline_s=10"], {}, ["deadline_s", "en, de, ru", "client_tokens_per_s > 0"]),
    ("deadline-misses-everyone", "a deadline no child can meet",
     PLAN + ["--set", "tree.policy.deadline_s=0.01", "--set", "tree.policy.client_tokens_per_s=1000"], {},
     ["'en'", "deadline_s", "0.01", "every one of its clients", "raise it"]),
    ("deadline-with-overlap", "a deadline and an overlapped upload at one federation",
     PLAN + ["--set", "tree.policy.deadline_s=5", "--set", "tree.policy.link_overlap=true"], {},
     ["world", "deadline_s", "link_overlap", "one of them"]),
    ("vectorized-sweep-model-axis", "a model axis in a vectorised sweep",
     ["sweep", "--config", "tiny", "--vectorized", "--grid", "policy.client_lr=0.1,0.2", "--workdir", "sweep",
      "--set", "run.model_parallel=2"], {}, ["vectorised sweep", "run.model_parallel=2", "run.model_parallel=1"]),
    ("vectorized-sweep-deadline", "deadlines in a vectorised sweep",
     ["sweep", "--config", "tiny", "--vectorized", "--grid", "policy.client_lr=0.1,0.2", "--workdir", "sweep",
      "--set", "tree.policy.deadline_s=10", "--set", "tree.policy.client_tokens_per_s=1000"], {},
     ["--vectorized", "deadline_s", "worldlm sweep"]),
    ("fragments-do-nothing", "fragments where no federation of federations shares the backbone",
     PLAN + ["--set", "algorithm.name=fedavg", "--set", "policy.sync_fragments=2"], {},
     ["'world'", "sync_fragments", "does nothing", "federation of federations"]),
    ("fragments-without-blocks", "more fragments than the backbone has blocks",
     PLAN + ["--set", "tree.policy.sync_fragments=2"], {}, ["'world'", "sync_fragments", "[1]", "1..1"]),
    ("sync-every-bad-interval", "a sync interval below 1",
     PLAN + ["--set", "tree.own_policy.sync_every={embeddings: 0}"], {}, ["'world'", "sync_every", "0", ">= 1"]),
    ("sync-every-unknown-group", "a sync interval for a group the backbone does not have",
     PLAN + ["--set", "algorithm.name=hierfavg", "--set", "tree.own_policy.sync_every={block7_attn: 2}"], {},
     ["'world'", "sync_every", "block7_attn", "block0_attn", "embeddings"]),
    ("split-search-no-key-layers", "a split search for a strategy without key layers",
     ["split-search", "--config", "tiny", "--set", "algorithm.name=fedavg", "--workdir", "runs/split"], {},
     ["algorithm.name='fedavg'", "no key layers", "worldlm or fedper"]),
    ("split-search-dp", "a split search over DP federations",
     ["split-search", "--config", "tiny", "--set", "policy.dp_clip=1.0", "--workdir", "runs/split"], {},
     ["split-search", "no DP release", "dp_*"]),
    # traced, not compiled: the check fires while `plan` lowers the round (plugins/contract.py)
    ("plugin-output-shape", "an aggregator that returns every child's update instead of one per federation",
     ["--plugin", "my_plugins.py", "plan", "--config", "tiny", "--set", "policy.aggregator=my_mean"],
     {"my_plugins.py": UNREDUCED_AGGREGATOR},
     ["aggregator 'my_mean' (combine, my_plugins.py:4)", "expected (3, 32, 32) float32", "one row per federation",
      "not one per child"]),
    ("process-id-out-of-range", "a process id outside the process count",
     ["train", "--config", "tiny", "--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "5"],
     {}, ["--process-id", "5"]),
    ("eval-missing-run", "evaluating a run directory that does not exist",
     ["eval", "--workdir", "no_such_run"], {}, ["no_such_run"]),
    ("workdir-is-a-file", "a run directory that is a file",
     ["train", "--config", "tiny", "--workdir", "a_file", "--quiet"], {"a_file": "not a directory\n"},
     ["a_file", "not a directory"]),
    ("empty-data-folder", "a dir: source with no .txt files",
     ["train", "--config", "tiny", "--workdir", "run", "--quiet", "--set",
      "tree={name: w, children: [{name: a, clients: 1, sources: ['dir:empty']}]}"], {"empty/README": "x\n"},
     ["dir:empty", ".txt"]),
    ("missing-tokenizer", "a tokenizer model path that does not exist",
     ["train", "--config", "tiny", "--workdir", "run", "--quiet", "--set", "data.tokenizer=nope.model"], {},
     ["nope.model"]),
    ("client-too-little-text", "a Dirichlet split that leaves a client too little text in every draw",
     ["train", "--config", "tiny", "--workdir", "run", "--quiet", "--set", "data.max_bytes_per_source=400",
      "--set", "tree={name: w, children: [{name: a, clients: 6, sources: [fortunes_en], "
               "split: dirichlet, alpha: 0.01}]}"], {},
     ["federation 'a'", "100 Dirichlet(0.01) draws", "fewer than 66 bytes", "seq_len"]),
    ("eval-step-never-saved", "evaluating a step a healthy run never saved",
     ["eval", "--workdir", "run", "--step", "1"], {"run": run_with_steps(2, 3)},
     ["step 1 was never saved", "available steps: [2, 3]"]),
    ("from-step-not-saved", "resuming from a step the run does not hold",
     ["train", "--config", "tiny", "--workdir", "run", "--from-step", "1", "--quiet", "--skip-memory-check"],
     {"run": run_with_steps(2, 3)}, ["--from-step=1", "no step 1", "saved steps: [2, 3]"]),
    ("eval-set-trained-field", "changing at evaluation what the run trained",
     ["eval", "--workdir", "run", "--set", "model.d_model=64"], {"run": run_with_steps(2)},
     ["--set model.d_model=64", "may change only data.eval_batches"]),
    ("nonfinite-state", "a run whose state turns non-finite (a scale attack of 1e30)",
     ["train", "--config", "tiny", "--workdir", "run", "--quiet", "--set",
      "tree={name: w, children: [{name: en, clients: 2, sources: [man_en]}]}", "--set", "policy.attack=scale",
      "--set", "policy.attackers=1", "--set", "policy.attack_args={factor: 1.0e+30}"], {},
     ["round 0", "federation 'en' (level 1, w/en)", "non-finite"]),
    # nothing leaves a DP federation but through its release (worldlm_jax/releases.py)
    ("dp-personal-keys", "personal key layers in a DP federation",
     PLAN + ["--set", "policy.k_agg=personalized", "--set", "policy.dp_noise_multiplier=1.0", "--set",
             "policy.dp_clip=1.0"], {}, ["federation 'en'", "k_agg=personalized", "no DP release"]),
    ("dp-scope-backbone-with-key-layers", "DP on the backbone only while the key layers are aggregated",
     PLAN + ["--set", "policy.dp_scope=backbone", "--set", "policy.dp_clip=1.0"], {},
     ["federation 'world'", "dp_scope=backbone", "k_agg=attention", "dp_scope: all"]),
    ("dp-residuals-across-a-dp-release", "sibling residuals under a DP federation of federations",
     PLAN + ["--set", "tree.policy.dp_noise_multiplier=1.0", "--set", "tree.policy.dp_clip=1.0"], {},
     ["federation 'world'", "algorithm.residuals=siblings", "algorithm.residuals: none"]),
    ("dp-stateful-objective", "a stateful client objective in a DP federation",
     ["--plugin", os.path.join(ROOT, "scripts", "examples", "scaffold.py")] + PLAN
     + ["--set", "algorithm.client_objective=scaffold", "--set", "policy.dp_clip=1.0"], {},
     ["federation 'en'", "algorithm.client_objective=scaffold", "stateless objective"]),
    ("dp-client-metrics", "per-client metrics in a run with a DP federation",
     PLAN + ["--set", "run.client_metrics=true", "--set", "policy.dp_clip=1.0"], {},
     ["federation 'world'", "run.client_metrics=true", "no DP release", "run.client_metrics: false"]),
    ("full-sampling-fewer-clients", "clients_per_round below the client count under sampling: full",
     PLAN + ["--set", "policy.clients_per_round=1"], {}, ["'clients_per_round' = 1", "sampling=full",
                                                          "sampling: fixed or poisson"]),
    ("unknown-privacy-level", "a privacy level that does not exist", PLAN + ["--set", "privacy.level=orgs"], {},
     ["privacy.level='orgs'", "clients, federations, all"]),
    ("privacy-level-without-federations", "organisation-level DP for a flat baseline",
     PLAN + ["--set", "algorithm.name=fedavg", "--set", "privacy.target_epsilon=8", "--set",
             "privacy.level=federations"], {}, ["privacy.level=federations", "privacy.level: clients"]),
]


def run_cli(argv, tmp_path, files):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(text):  # a case's own directory (e.g. a run dir), written by it
            text(path)
        else:
            path.write_text(text)
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as e:  # argparse's own errors
                code = e.code
    finally:
        os.chdir(cwd)
    return code, err.getvalue().strip()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_naming_what_is_wrong(case, tmp_path):
    _, _, argv, files, words = case
    code, message = run_cli(argv, tmp_path, files)
    assert code not in (0, None), message
    assert "Traceback" not in message, message
    lines = [line for line in message.splitlines() if line.strip()]
    assert len(lines) == 1 or (lines[0].startswith("usage:") and len(lines) == 2), message
    assert all(word in lines[-1] for word in words), message


def test_the_documented_table_lists_every_case():
    with open(os.path.join(ROOT, "docs", "errors.md")) as f:
        doc = f.read()
    missing = [c[0] for c in CASES if f"`{c[0]}`" not in doc]
    assert not missing, f"docs/errors.md lacks rows for {missing}"
