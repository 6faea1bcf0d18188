"""The federation tree: building, inheritance, errors, slot layout, weights."""
import numpy as np
import pytest

from worldlm_jax.data import pipeline
from worldlm_jax.tree.policy import POLICY_FIELDS, Policy, TopologyError
from worldlm_jax.tree.topology import build_topology


def leaf(name, n, **policy):
    node = {"name": name, "clients": n, "sources": ["s"]}
    if policy:
        node["policy"] = policy
    return node


FAMILY = {"name": "world", "children": [
    {"name": "germanic", "children": [leaf("en", 2), leaf("de", 1)]},
    {"name": "romance", "children": [leaf("fr", 1), leaf("es", 3), leaf("it", 1)]},
]}


def test_depth_1_single_federation_of_clients():
    t = build_topology(leaf("solo", 3))
    assert t.depth == 1 and t.n_clients == 3
    assert t.levels[0].names == ("solo",) and t.leaf is t.levels[0]
    assert list(t.client_parent) == [0, 0, 0]
    assert t.client_names == ("solo/0", "solo/1", "solo/2")
    assert list(t.levels[0].parent) == [-1]


def test_depth_2_tree():
    t = build_topology({"name": "root", "children": [leaf("A", 2), leaf("B", 3)]})
    assert t.depth == 2 and t.n_clients == 5
    assert t.levels[0].names == ("root",) and t.leaf.names == ("A", "B")
    assert list(t.levels[1].parent) == [0, 0]
    assert list(t.client_parent) == [0, 0, 1, 1, 1]
    assert t.federation_of_client() == ("A", "A", "B", "B", "B")
    assert list(t.children_count(0)) == [2] and list(t.children_count(1)) == [2, 3]


def test_depth_3_tree():
    t = build_topology(FAMILY)
    assert t.depth == 3 and t.n_clients == 8
    assert t.levels[1].names == ("germanic", "romance")
    assert t.leaf.names == ("en", "de", "fr", "es", "it")
    assert list(t.levels[2].parent) == [0, 0, 1, 1, 1]
    assert list(t.client_parent) == [0, 0, 1, 2, 3, 3, 3, 4]
    assert list(t.children_count(1)) == [2, 3]


def test_ancestors():
    t = build_topology(FAMILY)
    assert list(t.ancestors(2)) == list(t.client_parent)
    assert list(t.ancestors(1)) == [0, 0, 0, 1, 1, 1, 1, 1]
    assert list(t.ancestors(0)) == [0] * 8


def test_policy_inheritance_child_inherits_unset_fields():
    spec = {"name": "world", "policy": {"local_steps": 3, "client_lr": 0.01, "tau": 0.5}, "children": [
        {"name": "g", "policy": {"client_lr": 0.2}, "children": [
            leaf("en", 1, tau=2.0), leaf("de", 1)]},
        {"name": "r", "children": [leaf("fr", 1, local_steps=7)]},
    ]}
    t = build_topology(spec, root_policy=Policy(server_lr=0.3))
    pol = dict(zip(t.leaf.names, t.leaf.policies))
    # set at the node itself
    assert pol["en"].tau == 2.0 and pol["fr"].local_steps == 7
    # from the nearest ancestor that sets it
    assert pol["en"].client_lr == pol["de"].client_lr == 0.2
    assert pol["fr"].client_lr == 0.01
    assert pol["de"].tau == pol["fr"].tau == 0.5 and pol["en"].local_steps == 3
    # from root_policy, then dataclass defaults
    assert all(p.server_lr == 0.3 for p in t.leaf.policies)
    assert all(p.rounds == Policy().rounds for p in t.leaf.policies)
    assert t.levels[1].policies[0].client_lr == 0.2 and t.levels[0].policies[0].client_lr == 0.01
    np.testing.assert_allclose(t.leaf.policy_array("client_lr"), [0.2, 0.2, 0.01])


def _cyclic():
    spec = {"name": "loop", "children": []}
    spec["children"].append(spec)
    return spec


ERRORS = [
    ("duplicate", {"name": "r", "children": [leaf("A", 1), leaf("A", 2)]}, r"duplicate federation name 'A'"),
    ("both", {"name": "r", "clients": 2, "sources": ["s"], "children": [leaf("A", 1)]},
     r"federation 'r'.*exactly one of 'children'.*'clients'"),
    ("neither", {"name": "r", "children": [{"name": "A", "sources": ["s"]}]},
     r"federation 'A'.*exactly one of 'children'.*'clients'"),
    ("empty children", {"name": "r", "children": []}, r"federation 'r'.*'children' must be a non-empty list"),
    ("rounds str", {"name": "r", "children": [leaf("A", 1, rounds="a")]},
     r"federation 'A'.*policy field 'rounds' = 'a'.*integer >= 1"),
    ("tau negative", {"name": "r", "children": [leaf("A", 1, tau=-1)]},
     r"federation 'A'.*policy field 'tau' = -1.*number > 0"),
    ("k_agg", {"name": "r", "children": [leaf("A", 1, k_agg="max")]},
     r"policy field 'k_agg' = 'max'.*attention, mean, local"),
    ("depths", {"name": "r", "children": [leaf("A", 1), {"name": "B", "children": [leaf("C", 1)]}]},
     r"different depths \[1, 2\]"),
    ("cycle", _cyclic(), r"cycle"),
    ("federations_per_round", {"name": "r", "policy": {"federations_per_round": 0}, "children": [leaf("A", 1)]},
     r"federation 'r'.*policy field 'federations_per_round' = 0.*integer >= 1 or null"),
]


@pytest.mark.parametrize("spec, match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_name_the_problem(spec, match):
    with pytest.raises(TopologyError, match=match):
        build_topology(spec)


def test_unknown_policy_field_lists_valid_fields():
    with pytest.raises(TopologyError) as info:
        build_topology({"name": "r", "children": [leaf("A", 1, roundz=2)]})
    msg = str(info.value)
    assert "federation 'A'" in msg and "roundz" in msg
    assert all(field in msg for field in POLICY_FIELDS)


def test_unknown_source_lists_known_sources():
    spec = {"name": "r", "children": [{"name": "A", "clients": 1, "sources": ["man_xx"]}]}
    with pytest.raises(TopologyError, match=r"federation 'A'.*unknown data source 'man_xx'.*known sources: s1, s2"):
        build_topology(spec, known_sources=["s1", "s2"])
    assert build_topology(spec, known_sources=["man_xx"]).n_clients == 1
    assert build_topology(spec).n_clients == 1  # no check without known_sources


def test_slot_layout_and_padding():
    t = build_topology({"name": "r", "children": [leaf("A", 2), leaf("B", 3)]})
    assert list(t.slots_per_leaf) == [2, 3]
    assert list(t.slot_parent) == [0, 0, 1, 1, 1] and t.n_slots == 5 and t.padding_fraction == 0
    p = t.with_slot_multiple(4)
    assert p.n_slots == 8 and p.n_slots % 4 == 0
    # 4 device blocks of 2: A's 2 slots and B's 3 spread over the blocks, padding last in a block
    assert list(p.slot_parent) == [0, 1, 0, 0, 1, 1, 1, 1]
    assert [list(p.leaf_slots(i)) for i in range(2)] == [[0, 2], [1, 4, 6]]
    assert p.padding_fraction == pytest.approx(3 / 8)
    assert t.with_slot_multiple(5).n_slots == 5  # already a multiple: no padding
    # padding slots hold no client and weigh 0
    p = p.with_client_weights([1, 2, 3, 4, 5])
    client, weight = pipeline.sample_slots(p, round_index=0, salt=0, seed=0)
    assert list(client) == [0, 2, 1, -1, 3, -1, 4, -1]
    np.testing.assert_array_equal(weight, [1, 3, 2, 0, 4, 0, 5, 0])


def test_every_device_block_gets_a_fair_share_of_every_federation():
    """8 federations of 8 clients on 4 devices: 2 slots of each per device, so a
    federation left out of a round idles no device more than another."""
    t = build_topology({"name": "r", "children": [leaf(f"F{i}", 8) for i in range(8)]}).with_slot_multiple(4)
    blocks = t.slot_parent.reshape(4, -1)
    for b in blocks:
        assert list(np.bincount(b, minlength=8)) == [2] * 8
    uneven = build_topology({"name": "r", "children": [leaf(f"F{i}", 3) for i in range(4)]}).with_slot_multiple(4)
    assert uneven.n_slots == 12  # remainders rotate across blocks: no extra padding


def test_fixed_sampling_fills_clients_per_round_slots():
    t = build_topology({"name": "r", "policy": {"sampling": "fixed", "clients_per_round": 2},
                        "children": [leaf("A", 3), leaf("B", 1)]})
    assert list(t.slots_per_leaf) == [2, 1]
    client, weight = pipeline.sample_slots(t, 0, 0, 0)
    assert len(set(client[:2])) == 2 and set(client[:2]) <= {0, 1, 2} and client[2] == 3
    assert np.all(weight == 1)


def test_node_weight_sums_client_weights():
    w = np.arange(1.0, 9.0)
    t = build_topology(FAMILY).with_client_weights(w)
    np.testing.assert_allclose(t.node_weight(3 - 1), [1 + 2, 3, 4, 5 + 6 + 7, 8])
    np.testing.assert_allclose(t.node_weight(1), [1 + 2 + 3, 4 + 5 + 6 + 7 + 8])
    np.testing.assert_allclose(t.node_weight(0), [w.sum()])
    for d in range(t.depth):  # every level partitions the same total
        assert t.node_weight(d).sum() == pytest.approx(w.sum())


@pytest.mark.parametrize("bad", [[1, 2], [1, 2, 3, 4, 5, 6, 7, -1], [np.nan] * 8])
def test_client_weights_are_validated(bad):
    with pytest.raises(TopologyError, match="client weights must be 8"):
        build_topology(FAMILY).with_client_weights(bad)


def test_flattened_is_one_federation_over_the_same_clients():
    spec = dict(FAMILY, policy={"server_optimizer": "adam", "server_lr": 0.5})
    spec["children"] = [dict(c, policy={"local_steps": 4, "client_lr": 0.02}) for c in FAMILY["children"]]
    t = build_topology(spec).with_client_weights(np.arange(1.0, 9.0))
    f = t.flattened()
    assert f.depth == 1 and f.n_clients == t.n_clients
    assert f.client_names == t.client_names
    assert list(f.client_parent) == [0] * 8
    np.testing.assert_allclose(f.client_weight, t.client_weight)
    (pol,) = f.levels[0].policies
    assert pol.server_optimizer == "adam" and pol.server_lr == 0.5  # the root's server rule
    assert pol.local_steps == 4 and pol.client_lr == 0.02  # the leaves' client rule
    assert pol.sampling == "full" and pol.clients_per_round is None
    assert list(f.slots_per_leaf) == [8]
    np.testing.assert_allclose(f.node_weight(0), [36.0])


@pytest.mark.parametrize("mode", ["fixed", "poisson"])
def test_flattened_samples_as_many_clients_per_round_as_the_leaves(mode):
    """A flat baseline over sampled federations samples the same way, as many
    clients per round in all (else it would train on more tokens than the tree)."""
    spec = dict(FAMILY)
    spec["children"] = [dict(c, policy={"sampling": mode, "clients_per_round": 1}) for c in FAMILY["children"]]
    t = build_topology(spec)
    (pol,) = t.flattened().levels[0].policies
    per_round = sum(min(1, n) for n in t.children_count(t.depth - 1))
    assert t.clients_per_round() == per_round < t.n_clients
    assert pol.sampling == mode and pol.clients_per_round == per_round
    mixed = dict(spec, children=[dict(c) for c in spec["children"]])
    mixed["children"][0] = dict(mixed["children"][0], policy={"sampling": "full"})
    with pytest.raises(TopologyError, match="sample clients in different ways"):
        build_topology(mixed).flattened()


def test_poisson_slots_put_takers_first_and_spread_them_over_devices():
    """Absent clients sit at the ends of the device blocks (whole chunks of them
    are skipped) and every device gets an even share of the takers."""
    t = build_topology({"name": "r", "policy": {"sampling": "poisson", "clients_per_round": 3},
                        "children": [leaf("A", 12)]}).with_slot_multiple(4)
    takers = 0
    for r in range(40):
        client, weight = pipeline.sample_slots(t, r, 0, 0)
        takers += int(np.sum(weight > 0))
        assert sorted(client) == list(range(12))  # everyone has a slot, takers or not
        blocks = (weight > 0).reshape(4, -1)
        for b in blocks:  # takers first within a block
            assert not np.any(b[1:] & ~b[:-1])
        assert blocks.sum(1).max() - blocks.sum(1).min() <= 1
    assert 80 <= takers <= 160  # each of 12 clients with probability 3 / 12: 120 expected
