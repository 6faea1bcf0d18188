"""`worldlm config` and `worldlm presets --show`: the resolved config, and where each
federation's policy comes from (tree.provenance), checked against what
build_topology resolves, so the table cannot drift from the run's own tree."""
import dataclasses
import os
import re

import pytest
import yaml

from worldlm_jax.config import load_yaml, presets as configs
from worldlm_jax.tree import POLICY_FIELDS, Policy, build_topology, policy_provenance
from worldlm_jax.tree.provenance import CONFIG_POLICY, format_value

from cli_helpers import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the config `policy:` sets local_steps; eu sets client_lr for en and de, and de overrides it
TREE = {"name": "world", "children": [
    {"name": "eu", "policy": {"client_lr": 0.01}, "children": [
        {"name": "en", "sources": ["man_en"], "clients": 2},
        {"name": "de", "sources": ["man_de"], "clients": 2, "policy": {"client_lr": 0.02}}]},
    {"name": "asia", "children": [{"name": "ru", "sources": ["man_ru"], "clients": 2}]}]}
ROOT_POLICY = Policy(local_steps=3)


def _write_config(tmp_path, tree=TREE, policy=ROOT_POLICY) -> str:
    path = tmp_path / "eu.yaml"
    policy = {f: getattr(policy, f) for f in POLICY_FIELDS if getattr(policy, f) != getattr(Policy(), f)}
    path.write_text(yaml.safe_dump({"base": "tiny", "policy": policy, "tree": tree}))
    return str(path)


def _table(out: str) -> dict[tuple[str, str], tuple[str, str]]:
    """(federation, field) -> (value, from), read back from the printed table."""
    lines = [line.removeprefix("# ") for line in out.splitlines()]
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["federation", "field"])
    rows = {}
    for line in lines[header + 1:]:
        path, field, value, source = re.split(r"\s{2,}", line.strip(), maxsplit=3)
        rows[(path, field)] = (value, source)
    return rows


def test_the_table_names_each_value_and_where_it_came_from(tmp_path):
    code, out, err = run_cli(["config", "--config", _write_config(tmp_path), "--short"])
    assert code == 0, err
    assert _table(out) == {
        ("world", "local_steps"): ("3", "inherited from config policy"),
        ("world", "client_lr"): ("0.003", "inherited from config policy"),  # tiny's, under the YAML's policy
        ("world/eu", "local_steps"): ("3", "inherited from config policy"),
        ("world/eu", "client_lr"): ("0.01", "set"),
        ("world/eu/en", "local_steps"): ("3", "inherited from config policy"),
        ("world/eu/en", "client_lr"): ("0.01", "inherited from world/eu"),
        ("world/eu/de", "local_steps"): ("3", "inherited from config policy"),
        ("world/eu/de", "client_lr"): ("0.02", "set"),
        ("world/asia", "local_steps"): ("3", "inherited from config policy"),
        ("world/asia", "client_lr"): ("0.003", "inherited from config policy"),
        ("world/asia/ru", "local_steps"): ("3", "inherited from config policy"),
        ("world/asia/ru", "client_lr"): ("0.003", "inherited from config policy"),
    }


@pytest.mark.parametrize("tree,root_policy", [
    (TREE, ROOT_POLICY),
    (TREE, Policy()),
    ({"name": "r", "policy": {"aggregator": "trimmed_mean", "aggregator_args": {"trim": 0.1}, "rounds": 2},
      "children": [{"name": "a", "policy": {"sampling": "fixed", "federations_per_round": 1}, "children": [
          {"name": "a1", "sources": ["man_en"], "clients": 3,
           "policy": {"clients_per_round": 2, "aggregator_args": {"trim": 0.2}, "dp_clip": "inf"}},
          {"name": "a2", "sources": ["man_de"], "clients": 1, "policy": {"rounds": 1}}]}]},
     Policy(client_lr=5e-3, server_optimizer="adam")),
    ({"name": "r", "policy": {"tau": 0.5}, "own_policy": {"server_optimizer": "momentum", "tau": 2.0},
      "children": [{"name": "a", "own_policy": {"client_lr": 0.05}, "policy": {"client_lr": 0.01}, "children": [
          {"name": "a1", "sources": ["man_en"], "clients": 2}]}]},
     Policy(local_steps=3)),
], ids=["mid-level", "no-config-policy", "depth-3-mixed", "own-policy"])
def test_provenance_agrees_with_the_resolved_topology(tree, root_policy):
    topology = build_topology(tree, root_policy=root_policy)
    resolved = {name: level.policies[i] for level in topology.levels for i, name in enumerate(level.names)}
    feds = policy_provenance(tree, root_policy)
    assert [f.path.rsplit("/", 1)[-1] for f in feds if f.level == 1] == list(topology.levels[1].names)
    assert len(feds) == sum(level.size for level in topology.levels)
    by_path = {f.path: f for f in feds}
    for fed in feds:
        name = fed.path.rsplit("/", 1)[-1]
        assert fed.policy == resolved[name], fed.path
        assert topology.levels[fed.level].names.count(name) == 1
        node = next(n for n in _nodes(tree) if n["name"] == name)
        own, alone = node.get("policy") or {}, node.get("own_policy") or {}
        listed = {r.field: r for r in fed.fields}
        # every field off the defaults (and every field set here) is listed, with the resolved value
        for f in POLICY_FIELDS:
            value = getattr(resolved[name], f)
            assert (f in listed) == (value != getattr(Policy(), f) or f in own or f in alone), (fed.path, f)
            if f in listed:
                assert listed[f].value == value, (fed.path, f)
        for r in fed.fields:  # and its origin really holds that value
            if r.source == "set":
                assert r.field in own and r.field not in alone
            elif r.source == "own (not inherited)":
                assert r.field in alone
            elif r.source == f"inherited from {CONFIG_POLICY}":
                assert getattr(root_policy, r.field) == r.value  # and no ancestor set it
                assert all(x.source != "set" for a, f in by_path.items() if fed.path.startswith(a + "/")
                           for x in f.fields if x.field == r.field)
            elif r.source.startswith("inherited from "):
                ancestor = r.source.removeprefix("inherited from ")
                assert fed.path.startswith(ancestor + "/")
                passed_on = next(n for n in _nodes(tree) if n["name"] == ancestor.rsplit("/", 1)[-1])
                assert r.field in (passed_on.get("policy") or {})  # its policy:, not its own_policy:
                if r.field not in (passed_on.get("own_policy") or {}):
                    assert getattr(by_path[ancestor].policy, r.field) == r.value
                    assert any(x.field == r.field and x.source.startswith("set") for x in by_path[ancestor].fields)
            else:
                assert r.source.startswith("set (merged with inherited from "), r.source


def _nodes(node):
    yield node
    for child in node.get("children", ()):
        yield from _nodes(child)


def test_merged_args_and_a_reset_to_the_default_are_shown_as_set():
    tree = {"name": "r", "policy": {"aggregator": "trimmed_mean", "aggregator_args": {"trim": 0.1}},
            "children": [{"name": "a", "sources": ["man_en"], "clients": 2,
                          "policy": {"client_lr": Policy().client_lr, "aggregator_args": {}}}]}
    rows = {r.field: r for r in policy_provenance(tree, Policy(client_lr=0.05))[1].fields}
    assert rows["client_lr"].source == "set" and rows["client_lr"].value == Policy().client_lr
    assert rows["aggregator"].source == "inherited from r"
    assert rows["aggregator_args"].source == "set (merged with inherited from r)"
    assert rows["aggregator_args"].value == {"trim": 0.1}
    assert format_value(rows["aggregator_args"].value) == "{trim: 0.1}"


def test_config_yaml_is_what_train_saves_and_loads_back(tmp_path):
    path = _write_config(tmp_path)
    code, out, err = run_cli(["config", "--config", path, "--set", "run.rounds=3"])
    assert code == 0, err
    saved = tmp_path / "out.yaml"
    saved.write_text(out)  # the table is YAML comments: the whole output is a config
    expected = dataclasses.replace(load_yaml(path), run=dataclasses.replace(load_yaml(path).run, rounds=3))
    assert load_yaml(str(saved)) == expected
    assert ("world/eu/de", "client_lr") in _table(out)


def test_presets_show_prints_a_yaml_that_loads_back_to_the_preset(tmp_path):
    code, out, err = run_cli(["presets", "--show", "tiny"])
    assert code == 0, err
    saved = tmp_path / "tiny.yaml"
    saved.write_text(out)
    assert load_yaml(str(saved)) == configs.get("tiny")
    table = _table(out)
    assert table[("world/en", "client_lr")] == (format_value(configs.get("tiny").policy.client_lr),
                                                "inherited from config policy")


def test_an_unknown_preset_is_one_line():
    code, out, err = run_cli(["presets", "--show", "tinny"])
    assert code == 2 and not out
    assert err.strip().splitlines() == [
        "worldlm presets: error: unknown preset 'tinny'; presets: " + ", ".join(configs.PRESETS)
        + " (or a path to a YAML file)"]


def test_a_bad_tree_is_one_line(tmp_path):
    tree = {"name": "world", "children": [{"name": "en", "sources": ["man_en"], "clients": 2,
                                           "policy": {"client_lrr": 0.1}}]}
    code, out, err = run_cli(["config", "--config", _write_config(tmp_path, tree)])
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and "client_lrr" in err


def test_the_readme_example_prints_what_the_readme_shows(tmp_path):
    readme = open(os.path.join(ROOT, "README.md")).read()
    example = readme[readme.index("`worldlm config --config eu.yaml --short` prints"):]
    config_yaml = readme[:readme.index("`worldlm config --config eu.yaml --short` prints")]
    config_yaml = config_yaml[config_yaml.rindex("```yaml\n") + 8:config_yaml.rindex("```")]
    shown = example[example.index("```\n") + 4:]
    shown = shown[:shown.index("```")]
    (tmp_path / "eu.yaml").write_text(config_yaml)
    code, out, err = run_cli(["config", "--config", str(tmp_path / "eu.yaml"), "--short"])
    assert code == 0, err
    assert out == shown


def test_train_prints_the_short_table_before_it_trains(tmp_path):
    """`worldlm train` states each federation's rules at start (issue: the run at a glance)."""
    from worldlm_jax.cli.commands import describe_config
    from worldlm_jax.config import apply_overrides

    argv = ["train", "--config", "tiny", "--workdir", str(tmp_path / "run"), "--skip-memory-check", "--no-progress",
            "--set", "run.rounds=1", "--set", "model.n_layers=1"]  # one block: it compiles faster
    code, out, _ = run_cli(argv)
    assert code == 0
    table = describe_config(apply_overrides(configs.tiny(), ["run.rounds=1", "model.n_layers=1"]), short=True)
    assert out.startswith(table), out[:500]
