"""Config: presets build, YAML round trips, `a.b=v` overrides are type checked with helpful errors."""
import copy
import dataclasses
import math

import pytest

from worldlm_jax.config import (Config, ConfigError, apply_override, apply_overrides, from_dict, load_yaml,
                                presets as configs, save_yaml)
from worldlm_jax.data import corpus
from worldlm_jax.tree.policy import Policy, TopologyError
from worldlm_jax.tree.topology import build_topology


@pytest.mark.parametrize("name", list(configs.PRESETS))
def test_every_preset_builds_and_its_tree_compiles(name):
    config = configs.get(name)
    assert isinstance(config, Config)
    assert config.validate() == config  # cross-section checks pass
    assert configs.PRESETS[name].__doc__, f"preset {name} needs a docstring (worldlm presets shows it)"
    topology = build_topology(config.tree, known_sources=corpus.list_sources(), root_policy=config.policy)
    assert topology.n_clients >= 2
    assert topology.depth >= 1
    # every leaf federation got the preset's default policy where it sets none
    assert all(p.local_steps == config.policy.local_steps for p in topology.leaf.policies)
    assert config.data.seq_len <= config.model.max_len


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="presets: tiny, demo"):
        configs.get("tinny")


@pytest.mark.parametrize("name", list(configs.PRESETS))
def test_yaml_round_trip(name, tmp_path):
    config = configs.get(name)
    path = tmp_path / "config.yaml"
    save_yaml(config, str(path))
    assert load_yaml(str(path)) == config


def test_yaml_round_trip_keeps_infinities_tuples_and_none(tmp_path):
    config = apply_overrides(configs.get("tiny"), [
        "algorithm.max_update_norm=inf",
        "algorithm.key_layers={kind: blocks, blocks: [0, 1]}",  # a whole section at once
        "policy.clients_per_round=null", "policy.dp_clip=inf"])
    assert config.algorithm.key_layers.kind == "blocks"
    assert config.algorithm.key_layers.blocks == (0, 1)
    path = tmp_path / "c.yaml"
    save_yaml(config, str(path))
    loaded = load_yaml(str(path))
    assert loaded == config
    assert math.isinf(loaded.algorithm.max_update_norm) and loaded.policy.clients_per_round is None


def test_yaml_unknown_key_and_non_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  roundz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'run.roundz'.*run.rounds"):
        load_yaml(str(path))
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_yaml(str(path))


def test_override_sets_typed_values():
    config = apply_overrides(configs.get("tiny"), ["run.rounds=3", "policy.client_lr=0.01",
                                                   "algorithm.name=fedavg", "policy.clients_per_round=1"])
    assert config.run.rounds == 3
    assert config.policy.client_lr == 0.01 and isinstance(config.policy.client_lr, float)
    assert config.algorithm.name == "fedavg"
    assert config.policy.clients_per_round == 1
    # the original is untouched (frozen dataclasses, replaced not mutated)
    assert configs.get("tiny").run.rounds == 2


def test_override_yaml11_float_forms():
    assert apply_override(configs.get("tiny"), "policy.client_lr=1.0e-2").policy.client_lr == 0.01
    assert apply_override(configs.get("tiny"), "policy.client_lr=.5").policy.client_lr == 0.5


def test_override_plain_scientific_notation():
    # PyYAML (YAML 1.1) reads 1e-2 as a string; numbers are still accepted
    assert apply_override(configs.get("tiny"), "policy.client_lr=1e-2").policy.client_lr == 0.01
    tree = {"name": "r", "clients": 1, "sources": ["man_en"], "policy": {"client_lr": "1e-2"}}
    from worldlm_jax.tree.topology import build_topology
    assert build_topology(tree).leaf.policies[0].client_lr == 0.01


def test_override_int_to_float_field_is_coerced():
    config = apply_override(configs.get("tiny"), "policy.tau=1")
    assert config.policy.tau == 1.0 and isinstance(config.policy.tau, float)


def test_unknown_key_suggests_near_typo_and_lists_valid_keys():
    with pytest.raises(ConfigError) as info:
        apply_override(configs.get("tiny"), "run.round=3")
    message = str(info.value)
    assert "run.round'" in message
    assert "Did you mean run.rounds?" in message
    for key in ("rounds", "seed", "eval_every", "checkpoint_every"):
        assert key in message  # the valid keys of the section
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'.*Did you mean model"):
        apply_override(configs.get("tiny"), "modle.d_model=8")


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"run\.rounds='abc': expected an integer"):
        apply_override(configs.get("tiny"), "run.rounds=abc")
    with pytest.raises(ConfigError, match=r"policy\.client_lr='fast': expected a number"):
        apply_override(configs.get("tiny"), "policy.client_lr=fast")
    with pytest.raises(ConfigError, match=r"algorithm\.use_parent=3: expected true or false"):
        apply_override(configs.get("tiny"), "algorithm.use_parent=3")


def test_invalid_values_name_the_key():
    with pytest.raises(ConfigError, match=r"rounds=0; expected an integer >= 1"):
        apply_override(configs.get("tiny"), "run.rounds=0")
    with pytest.raises(ConfigError, match=r"algorithm\.name.*fedavg"):
        apply_override(configs.get("tiny"), "algorithm.name=fedsgd")
    with pytest.raises((ConfigError, TopologyError), match=r"policy.*sampling.*sometimes.*allowed: full"):
        apply_overrides(configs.get("tiny"), ["policy.sampling=sometimes"])


def test_override_needs_an_equals_sign():
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_override(configs.get("tiny"), "run.rounds")


def test_nested_overrides():
    config = apply_overrides(configs.get("tiny"), ["algorithm.key_layers.fraction=0.5", "policy.tau=1.0",
                                                   "model.n_layers=4"])
    assert config.algorithm.key_layers.fraction == 0.5
    assert config.algorithm.key_layers.kind == "last_fraction"  # siblings untouched
    assert config.policy.tau == 1.0
    assert config.model.n_layers == 4
    with pytest.raises(ConfigError, match=r"algorithm\.key_layers\.fractoin.*algorithm\.key_layers\.fraction"):
        apply_override(configs.get("tiny"), "algorithm.key_layers.fractoin=0.5")
    with pytest.raises(ConfigError, match="not a config section"):
        apply_override(configs.get("tiny"), "run.rounds.x=1")


def test_tree_overrides_via_dict_path():
    base = configs.get("tiny")
    config = apply_overrides(base, [
        "tree.children=[{name: a, sources: [man_en], clients: 3}, {name: b, sources: [man_de], clients: 1}]",
        "tree.policy.local_steps=7",  # creates the root node's policy mapping
        "tree.name=earth"])
    assert config.tree["name"] == "earth"
    assert config.tree["policy"] == {"local_steps": 7}
    assert base.tree["name"] == "world" and "policy" not in base.tree
    topology = build_topology(config.tree, known_sources=corpus.list_sources(), root_policy=config.policy)
    assert topology.n_clients == 4
    assert topology.leaf.names == ("a", "b") or list(topology.leaf.names) == ["a", "b"]
    assert all(p.local_steps == 7 for p in topology.leaf.policies)  # inherited from the root


DEEP_TREE = """
tree:
  name: world
  children:
  - name: eu
    children:
    - name: west
      children:
      - {name: en, sources: [man_en], clients: 2}
      - {name: fr, sources: [man_de], clients: 2}
  - name: asia
    children:
    - name: north
      children:
      - {name: ru, sources: [man_ru], clients: 2}
"""


def _deep(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("base: tiny\n" + DEEP_TREE)
    return load_yaml(str(path))


def _policies(config):
    topology = build_topology(config.tree, known_sources=corpus.list_sources(), root_policy=config.policy)
    return {name: policy for level in topology.levels for name, policy in zip(level.names, level.policies)}


def test_a_federation_named_in_an_override_is_found_at_any_depth(tmp_path):
    base = _deep(tmp_path)
    by_name = apply_overrides(base, ["tree.en.policy.client_lr=0.01", "tree.north.policy.tau=0.5"])
    written = copy.deepcopy(base.tree)  # the same, typed into the nodes
    written["children"][0]["children"][0]["children"][0]["policy"] = {"client_lr": 0.01}
    written["children"][1]["children"][0]["policy"] = {"tau": 0.5}
    assert by_name.tree == written
    assert apply_override(base, "tree.children.1.children.0.policy={tau: 0.5}").tree["children"][1] == \
        written["children"][1]  # lists index by position
    got = _policies(by_name)
    assert got["en"].client_lr == 0.01 and got["fr"].client_lr == base.policy.client_lr  # depth 3, sibling untouched
    assert got["north"].tau == got["ru"].tau == 0.5 and got["eu"].tau == base.policy.tau
    assert "policy" not in base.tree["children"][0]["children"][0]["children"][0]  # the base is not mutated
    with pytest.raises(ConfigError, match=r"no federation named 'es'.*federations: world, eu, west, en, fr"):
        apply_override(base, "tree.es.policy.client_lr=0.01")
    with pytest.raises(ConfigError, match=r"'tree.children' has 2 items"):
        apply_override(base, "tree.children.2.policy.tau=1")


def test_own_policy_applies_to_its_federation_only():
    tree = {"name": "world", "policy": {"tau": 0.5}, "own_policy": {"server_optimizer": "momentum", "tau": 2.0},
            "children": [{"name": "eu", "children": [{"name": "en", "sources": ["man_en"], "clients": 1}]}]}
    topology = build_topology(tree, known_sources=corpus.list_sources())
    (root,), (eu,), (en,) = (level.policies for level in topology.levels)
    assert (root.server_optimizer, root.tau) == ("momentum", 2.0)  # own_policy over its policy
    assert (eu.server_optimizer, eu.tau) == (en.server_optimizer, en.tau) == (Policy().server_optimizer, 0.5)
    with pytest.raises(TopologyError, match=r"federation 'world': unknown own policy field\(s\) \['tua'\]"):
        build_topology({**tree, "own_policy": {"tua": 1.0}}, known_sources=corpus.list_sources())


def test_bad_tree_fails_at_compile_naming_the_federation():
    config = apply_override(configs.get("tiny"), "tree.children=[{name: a, sources: [nope], clients: 2}]")
    with pytest.raises(TopologyError, match=r"federation 'a'.*unknown data source 'nope'"):
        build_topology(config.tree, known_sources=corpus.list_sources(), root_policy=config.policy)


def test_seq_len_longer_than_max_len_is_rejected():
    with pytest.raises(ConfigError, match=r"data\.seq_len=4096 exceeds model\.max_len=.*raise model\.max_len"):
        apply_overrides(configs.get("tiny"), ["data.seq_len=4096"])
    with pytest.raises(ConfigError, match="exceeds model.max_len"):
        from_dict(Config, {"data": {"seq_len": 256}, "model": {"max_len": 128}}).validate()
    with pytest.raises(ConfigError, match="exceeds model.max_len"):
        load_yaml_text("data: {seq_len: 256}\nmodel: {max_len: 128}\n")
    # raising max_len too makes the same seq_len valid, in either order
    for order in (["model.max_len=4096", "data.seq_len=4096"], ["data.seq_len=4096", "model.max_len=4096"]):
        assert apply_overrides(configs.get("tiny"), order).data.seq_len == 4096


def load_yaml_text(text):
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    return load_yaml(f.name)


def test_to_dict_is_plain_yaml_data():
    plain = configs.get("demo").to_dict()
    assert set(plain) == {f.name for f in dataclasses.fields(Config)}
    assert plain["algorithm"]["max_update_norm"] == "inf"
    assert isinstance(plain["algorithm"]["key_layers"]["blocks"], list)


def test_malformed_yaml_file_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tree: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_yaml(str(path))


# ---- base: and plugins: ----------------------------------------------------------
def test_base_preset_with_one_override_equals_the_preset_with_it(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("base: tiny\nmodel: {n_layers: 1}\n")
    assert load_yaml(str(path)) == apply_overrides(configs.get("tiny"), ["model.n_layers=1"])
    # a base YAML (relative to this one's folder), itself on a preset; tree: replaces the base's whole
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text(
        "base: ../exp.yaml\nrun: {seed: 3}\ntree: {name: w, children: [{name: en, sources: [man_en], clients: 2}]}\n")
    child = load_yaml(str(tmp_path / "sub" / "child.yaml"))
    assert child == apply_overrides(configs.get("tiny"), [
        "model.n_layers=1", "run.seed=3",
        "tree={name: w, children: [{name: en, sources: [man_en], clients: 2}]}"])
    assert child.run.rounds == configs.get("tiny").run.rounds  # the rest of the section kept
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="is a cycle"):
        load_yaml(str(tmp_path / "loop.yaml"))
    (tmp_path / "nobase.yaml").write_text("base: tinny\n")
    with pytest.raises(ConfigError, match=r"base='tinny' is neither a preset \(tiny, demo"):
        load_yaml(str(tmp_path / "nobase.yaml"))


def test_a_string_where_a_section_goes_suggests_base(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model: tiny\n")
    with pytest.raises(ConfigError) as error:
        load_yaml(str(path))
    message = str(error.value)
    assert "model must be a mapping of ModelConfig fields, got 'tiny'" in message
    assert "write 'base: tiny' at the top level" in message and "\n" not in message


def test_plugins_in_a_yaml_load_first_relative_to_it(tmp_path):
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "opts.py").write_text(
        "import optax\nfrom worldlm_jax.plugins import optimizers\n"
        "optimizers.OPTIMIZERS.register('config_test_sgd', lambda: optax.sgd(1.0), replace=False)\n")
    path = tmp_path / "exp.yaml"
    path.write_text("base: tiny\nplugins: [lab/opts.py]\n"
                    "algorithm: {client_optimizer: config_test_sgd}\npolicy: {server_optimizer: config_test_sgd}\n")
    config = load_yaml(str(path))
    assert config.plugins == (str(tmp_path / "lab" / "opts.py"),)  # absolute: the saved config finds it anywhere
    assert config.algorithm.client_optimizer == config.policy.server_optimizer == "config_test_sgd"
    save_yaml(config, str(tmp_path / "saved.yaml"))
    assert load_yaml(str(tmp_path / "saved.yaml")) == config  # loaded again: not re-run (replace=False)
    path.write_text("base: tiny\nplugins: [lab/missing.py]\n")
    with pytest.raises(ConfigError, match=r"plugin file '.*lab/missing.py' not found"):
        load_yaml(str(path))
    path.write_text("plugins: lab/opts.py\n")
    with pytest.raises(ConfigError, match="expected a list of module names or .py paths"):
        load_yaml(str(path))


def test_unknown_registered_names_fail_up_front_in_one_line():
    for override, field in (("policy.server_optimizer=nope", "server_optimizer"),
                            ("algorithm.client_optimizer=nope", "algorithm.client_optimizer='nope'"),
                            ("run.callbacks=[nope]", "run.callbacks='nope'")):
        with pytest.raises(ConfigError) as error:
            apply_overrides(configs.get("tiny"), [override])
        message = str(error.value)
        assert field in message and "is not a registered" in message and "\n" not in message
        assert "--plugin" in message  # how to add one
