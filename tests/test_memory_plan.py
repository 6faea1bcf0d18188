"""`worldlm plan`: per-device memory from the config alone, against XLA's figure for the round.

Every test here runs with the data pipeline disabled: a plan must not load data.
"""
import concurrent.futures
import dataclasses
import json

import pytest

from worldlm_jax import model
from worldlm_jax.cli import commands as cli_commands, parser as cli
from worldlm_jax.config import apply_overrides, presets as configs
from worldlm_jax.data import corpus, pipeline
from worldlm_jax.run import memory_estimate, memory_plan


@pytest.fixture(autouse=True)
def no_data(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the memory plan loaded data")

    for name in ("prepare", "leaf_documents", "make_tokenizer"):
        monkeypatch.setattr(pipeline, name, refuse)


def check_estimates_against_xla(names):
    # The presets as they are (8 CPU devices, the tests' mesh); nothing is
    # allocated, paper-125m (35 GiB a device) is only compiled. Rounds are
    # lowered here, then compiled two at a time (XLA's compiler releases the GIL).
    # a name is a preset, or "preset key=value ...": the preset with those overrides
    runs = {name: memory_plan.abstract_run(cli_commands.load_config(name.split()[0], name.split()[1:]))
            for name in names}
    estimates = {name: sum(memory_estimate.estimate(run)[0].values()) for name, run in runs.items()}
    lowered = {name: memory_estimate.lower_round(run) for name, run in runs.items()}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        xla = dict(zip(names, pool.map(memory_estimate.compiled_memory, [lowered[n] for n in names])))
    ratios = {name: estimates[name] / xla[name]["total"] for name in names}
    print("estimate / XLA:", {n: round(r, 3) for n, r in ratios.items()})
    for name, ratio in ratios.items():
        assert 0.75 <= ratio <= 1.25, (name, ratio, estimates[name], xla[name])
    # the donated state comes back in place: XLA's arguments hold the federation state
    for name, run in runs.items():
        state = memory_estimate.device_bytes(run.abstract_state())
        assert xla[name]["alias"] >= 0.99 * state, (name, xla[name], state)


def test_estimate_within_25_percent_of_xla_for_the_presets():
    # (and with a model axis: every weight's split counted, as XLA lays it out)
    check_estimates_against_xla(("small", "tiny", "tiny run.model_parallel=2"))


@pytest.mark.slow  # paper-125m compiles for 35-50 s; the same estimate is checked on tiny and small above
def test_estimate_within_25_percent_of_xla_for_paper_125m():
    check_estimates_against_xla(("paper-125m",))


def test_plan_exits_non_zero_with_one_table_of_knobs_and_one_set_line_that_fits(capsys, tmp_path):
    # one device: small's 28 clients in chunks of 2, so every knob that lowers memory on CPU applies
    argv = ["plan", "--config", "small", "--set", "run.devices=1", "--no-compile", "--device-memory", "0.2"]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == cli_commands.EXIT_DOES_NOT_FIT != 0
    assert "DOES NOT FIT" in out and "planned for cpu: each device runs 2 client(s) at once (run.chunk: -1" in out
    for knob in ("run.chunk", "model.matmul_dtype", "run.devices", "policy.clients_per_round"):
        assert out.count(f"  {knob}: ") == 1, knob  # listed once, in the table
    # XLA:CPU keeps the activations anyway: no saving to promise on CPU
    assert "model.remat" not in out and "model.attention" not in out
    [line] = err.strip().splitlines()  # one line, without the table's knobs again
    assert line.startswith("worldlm plan: error: the round needs") and "knobs that lower it" not in line
    fit = line.split("to fit (estimate): ")[1].split()
    assert fit[::2] == ["--set"] * (len(fit) // 2) and f"  to fit (estimate): {' '.join(fit)}" in out
    # the line does what it says: with it, the same plan fits
    assert cli.main(argv + fit) == 0, capsys.readouterr()
    assert "fits:" in capsys.readouterr().out
    # train runs the same check first, before any data is loaded (the fixture) or any file written;
    # it prints no table, so its one line names the knobs too
    code = cli.main(["train", *argv[1:5], "--device-memory", "0.2", "--workdir", str(tmp_path / "run")])
    assert code == cli_commands.EXIT_DOES_NOT_FIT
    err = capsys.readouterr().err
    assert f"to fit (estimate): {' '.join(fit)}; knobs that lower it: run.chunk" in err, err
    assert not (tmp_path / "run").exists()


def test_a_gpu_plan_from_a_cpu_host_assumes_the_gpu_layout(capsys):
    config = dataclasses.replace(configs.get("small"), run=dataclasses.replace(configs.get("small").run, devices=1))
    cpu = memory_plan.plan(config, compile=False, device_memory_gib=0.5, platform="cpu")
    gpu = memory_plan.plan(config, compile=False, device_memory_gib=0.5, platform="gpu")
    assert (cpu.chunk, gpu.chunk) == (2, gpu.slots_per_device) and gpu.slots_per_device > 2  # all at once on a GPU
    # a GPU's fused attention keeps no probabilities for the backward, as `recompute` keeps none
    recompute = memory_plan.plan(apply_overrides(config, ["model.attention=recompute"]), compile=False,
                                 device_memory_gib=0.5, platform="cpu")
    assert recompute.components["activations"] < cpu.components["activations"]
    per_client = recompute.components["activations"] / 2
    assert abs(gpu.components["activations"] - gpu.chunk * per_client) <= gpu.chunk  # rounded to bytes
    assert cpu.fits and not gpu.fits
    assert gpu.xla is None and "planned for gpu on a cpu host" in gpu.xla_note
    assert "all its client slots at once" in gpu.layout
    assert "model.remat" in [k.knob for k in gpu.knobs]
    # the explicit kernel on a GPU keeps the probabilities: recomputing them is a knob there
    explicit = memory_plan.plan(apply_overrides(config, ["model.attention=explicit"]), compile=False,
                                device_memory_gib=0.5, platform="gpu")
    assert explicit.components["activations"] > gpu.components["activations"]
    assert "model.attention" in [k.knob for k in explicit.knobs] and "model.attention" not in [k.knob for k in gpu.knobs]
    fixed = memory_plan.plan(apply_overrides(config, gpu.fit), compile=False, device_memory_gib=0.5,
                             platform="gpu")
    assert fixed.fits and fixed.estimate < gpu.estimate
    code = cli.main(["plan", "--config", "small", "--platform", "tpu", "--no-compile"])
    assert code == 2 and "--platform=tpu on a cpu host: give the device's memory with --device-memory" in \
        capsys.readouterr().err


def test_plan_loads_no_data_and_prints_json(capsys):
    code = cli.main(["plan", "--config", "tiny", "--no-compile", "--json", "--set", "data.tokenizer=spm:512"])
    out, _ = capsys.readouterr()
    assert code == 0
    result = json.loads(out)
    assert result["fits"] and result["xla"] is None and result["knobs"] == []
    assert result["estimate"] == sum(result["components"].values())
    # spm:512 sets the vocabulary without training a tokenizer
    assert result["n_params"] == model.count_params(dataclasses.replace(configs.get("tiny").model, vocab_size=512))


def test_federation_state_per_device_falls_with_the_device_count():
    sources = corpus.list_sources()
    tree = {"name": "world", "children": [{"name": f"f{i}", "sources": [sources[i % len(sources)]], "clients": 1}
                                          for i in range(16)]}
    config = dataclasses.replace(configs.get("tiny"), tree=tree)
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, shard_state_mb=0.0))  # a toy-sized state
    state = {}
    for devices in (1, 8):
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, devices=devices))
        result = memory_plan.plan(config, compile=False)
        assert result.devices == devices
        state[devices] = result.federation_levels
    wide_1, wide_8 = state[1]["level 1 (16 nodes, replicated)"], state[8]["level 1 (16 nodes, sharded)"]
    assert wide_8 * 8 == wide_1
    assert sum(state[8].values()) < sum(state[1].values()) / 4
