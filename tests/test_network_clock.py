"""The simulated network clock (run/network_clock.py) on hand-built trees and
hand-written round metrics: host-side arithmetic, no training."""
import dataclasses
import types

import numpy as np
import pytest

from worldlm_jax.engine import Plan
from worldlm_jax.run import network_clock
from worldlm_jax.tree.topology import build_topology

ALL = frozenset({"B", "K"})
SIZES = {"B": 1_000_000, "K": 250_000}  # 1.25 MB per message when both parts move
HIERFAVG = Plan(broadcast=(ALL, ALL), aggregate=(ALL, ALL))  # both parts on every edge
TOKENS_PER_STEP = 1000


def two_level(a=None, b=None, root=None):
    """world (80 Mbit/s = 1e7 B/s, 10 ms to each child) over leaf federations a and b
    (8 Mbit/s = 1e6 B/s, 50 ms to each client); clients train 2000 tokens/s."""
    leaf = {"link_bandwidth_mbps": 8.0, "link_latency_ms": 50.0}
    return build_topology({
        "name": "world", "policy": {"link_bandwidth_mbps": 80.0, "link_latency_ms": 10.0,
                                    "client_tokens_per_s": 2000.0, **(root or {})},
        "children": [
            {"name": "a", "clients": 2, "sources": ["x"], "policy": {**leaf, "rounds": 2, "local_steps": 4, **(a or {})}},
            {"name": "b", "clients": 3, "sources": ["x"], "policy": {**leaf, "local_steps": 10, **(b or {})}}]})


def paths(topo, participants, rounds, plan=None):
    plan = plan or Plan(broadcast=(ALL,) * topo.depth, aggregate=(ALL,) * topo.depth)
    work = network_clock.local_work_seconds(topo, TOKENS_PER_STEP, measured_tokens_per_s=0.0)
    return network_clock.critical_paths(topo, plan, SIZES, participants, rounds, work)


# every client of a and b takes part; a runs 2 rounds inside the root round, b one
EVERYONE = ({0: [2], 1: [4, 3]}, {0: [1], 1: [2, 1]})


def test_the_clock_of_a_two_level_tree_is_the_hand_computed_one():
    topo = two_level()
    # local work: a: 4 steps x 1000 tokens / 2000 tokens/s = 2 s; b: 10 x 1000 / 2000 = 5 s
    assert network_clock.local_work_seconds(topo, TOKENS_PER_STEP, 0.0) == pytest.approx([2.0, 5.0])
    # a message to a client: 0.05 s + 1.25e6 B / 1e6 B/s = 1.3 s
    # a: per round 1.3 + 2 + 1.3 = 4.6 s, times 2 rounds = 9.2 s; b: 1.3 + 5 + 1.3 = 7.6 s
    # world: a message to a child 0.01 + 1.25e6 / 1e7 = 0.135 s; slowest child a: 0.135 + 9.2 + 0.135
    clock = network_clock.round_clock(topo, HIERFAVG, SIZES, *EVERYONE,
                                      network_clock.local_work_seconds(topo, TOKENS_PER_STEP, 0.0))
    assert clock["seconds"] == pytest.approx(9.47)
    assert clock["compute_seconds"] == pytest.approx(4.0)  # a's 2 rounds of 2 s
    assert clock["per_level"] == pytest.approx({"level0": 0.27, "level1": 5.2})  # 2 x 0.135; 4 x 1.3
    leaf = paths(topo, *EVERYONE)[1]
    assert leaf.sum(1) == pytest.approx([9.2, 7.6])


def test_halving_a_links_bandwidth_doubles_its_transfer_time_and_nothing_else():
    no_latency = {"link_latency_ms": 0.0}
    fast = paths(two_level(a=no_latency, b=no_latency, root=no_latency), *EVERYONE)
    slow = paths(two_level(a={**no_latency, "link_bandwidth_mbps": 4.0}, b=no_latency, root=no_latency),
                 *EVERYONE)
    assert slow[1][0, 1] == pytest.approx(2 * fast[1][0, 1])  # a's links to its clients
    assert slow[1][0, 2] == fast[1][0, 2]  # a's compute
    np.testing.assert_array_equal(slow[1][1], fast[1][1])  # b, on its own links
    assert slow[0][0, 0] == fast[0][0, 0]  # the root's links


def test_an_absent_federation_costs_nothing():
    topo = two_level(b={"local_steps": 1000})  # b would be by far the slowest
    leaf_paths = paths(topo, {0: [1], 1: [4, 0]}, {0: [1], 1: [2, 0]})
    np.testing.assert_array_equal(leaf_paths[1][1], 0.0)
    assert leaf_paths[0][0].sum() == pytest.approx(9.47)  # what a alone takes, as above
    # a federation that ran but heard from none of its clients (all dropped) takes 0 too
    dropped = paths(topo, {0: [2], 1: [4, 0]}, {0: [1], 1: [2, 1]})
    np.testing.assert_array_equal(dropped[1][1], 0.0)


def three_level(fr_speed=2000.0):
    """world over eu (fr, de) and asia (jp); every link 8 Mbit/s, 0 ms."""
    link = {"link_bandwidth_mbps": 8.0, "link_latency_ms": 0.0, "client_tokens_per_s": 2000.0, "local_steps": 2}
    return build_topology({"name": "world", "policy": link, "children": [
        {"name": "eu", "children": [
            {"name": "fr", "clients": 1, "sources": ["x"], "policy": {"client_tokens_per_s": fr_speed}},
            {"name": "de", "clients": 1, "sources": ["x"]}]},
        {"name": "asia", "children": [{"name": "jp", "clients": 1, "sources": ["x"]}]}]})


def test_a_slower_child_slows_its_own_federation_and_the_root_but_not_a_sibling_federation():
    participants = {0: [2], 1: [2, 1], 2: [1, 1, 1]}
    rounds = {0: [1], 1: [1, 1], 2: [1, 1, 1]}
    same = paths(three_level(), participants, rounds)
    slow = paths(three_level(fr_speed=200.0), participants, rounds)  # fr's client: 10 s of work, not 1 s
    assert slow[2][0].sum() > same[2][0].sum()  # fr
    np.testing.assert_array_equal(slow[2][1:], same[2][1:])  # de, jp
    assert slow[1][0].sum() == pytest.approx(same[1][0].sum() + 9.0)  # eu waits for fr
    np.testing.assert_array_equal(slow[1][1], same[1][1])  # asia does not
    assert slow[0][0].sum() == pytest.approx(same[0][0].sum() + 9.0)  # nor does the root, which waits for eu
    assert slow[0][0, -1] == pytest.approx(10.0)  # fr's work is on the root's critical path


def test_residual_key_reads_count_on_the_readers_own_link():
    topo = two_level(root={"link_latency_ms": 0.0})
    worldlm = Plan(broadcast=(frozenset({"B"}), ALL), aggregate=(ALL, ALL), residuals="siblings")
    plain = Plan(broadcast=(frozenset({"B"}), ALL), aggregate=(ALL, ALL))
    with_residuals, without = paths(topo, *EVERYONE, plan=worldlm), paths(topo, *EVERYONE, plan=plain)
    # a reads b's K (its one sibling) once per root round: 250 kB over 1e7 B/s
    assert with_residuals[0][0, 0] - without[0][0, 0] == pytest.approx(0.025)
    np.testing.assert_array_equal(with_residuals[1], without[1])


def test_a_client_speed_of_zero_trains_at_the_measured_speed():
    topo = two_level(root={"client_tokens_per_s": 0.0}, b={"client_tokens_per_s": 1000.0})
    assert network_clock.local_work_seconds(topo, TOKENS_PER_STEP, 4000.0) == pytest.approx([1.0, 10.0])
    assert network_clock.local_work_seconds(topo, TOKENS_PER_STEP, 0.0) == pytest.approx([0.0, 10.0])


def test_an_overlapped_upload_costs_only_what_the_next_rounds_work_does_not_hide():
    """With link_overlap a round takes down + max(work, up): a's clients upload 1.3 s
    behind 2 s of local work in each of a's 2 rounds, b's behind 5 s; the compute is
    unchanged and a stays the root's slowest child."""
    plain, overlapped = paths(two_level(), *EVERYONE), paths(two_level(a={"link_overlap": True},
                                                                      b={"link_overlap": True}), *EVERYONE)
    assert overlapped[1].sum(1) == pytest.approx([9.2 - 2 * 1.3, 7.6 - 1.3])
    np.testing.assert_array_equal(overlapped[1][:, 2], plain[1][:, 2])  # the clients' local work
    assert overlapped[0].sum(1) == pytest.approx([0.135 + 6.6 + 0.135])
    # a slow upload hides only as much as the work lasts: a's clients upload 1.25e6 B at
    # 0.8 Mbit/s (12.55 s with the latency) behind 2 s of local work, twice
    slow = paths(two_level(a={"link_overlap": True, "link_bandwidth_mbps": 0.8}), *EVERYONE)
    slow_plain = paths(two_level(a={"link_bandwidth_mbps": 0.8}), *EVERYONE)
    assert slow[1][0].sum() == pytest.approx(slow_plain[1][0].sum() - 2 * 2.0)


def test_overlap_at_a_federation_of_federations_hides_its_childs_upload_behind_the_childs_next_round():
    """world -> r (2 rounds per root round, overlapped) -> a (2 clients, not overlapped):
    a's round is 1.3 + 2 + 1.3 = 4.6 s; r's link to a costs 0.135 s a message; each of
    r's two rounds costs 0.135 + max(4.6, 0.135)."""
    link = {"link_bandwidth_mbps": 80.0, "link_latency_ms": 10.0}
    topo = build_topology({
        "name": "world", "policy": {**link, "client_tokens_per_s": 2000.0},
        "children": [{"name": "r", "policy": {**link, "rounds": 2, "link_overlap": True}, "children": [
            {"name": "a", "clients": 2, "sources": ["x"],
             "policy": {"link_bandwidth_mbps": 8.0, "link_latency_ms": 50.0, "local_steps": 4, "rounds": 1,
                        "link_overlap": False}}]}]})  # a's own uploads: not overlapped
    participants, rounds = {0: [1], 1: [2], 2: [4]}, {0: [1], 1: [2], 2: [2]}
    r = paths(topo, participants, rounds)[1]
    assert r.sum() == pytest.approx(2 * (0.135 + 4.6))
    assert r[0, 2] == pytest.approx(2 * 2.6) and r[0, 3] == pytest.approx(2 * 2.0)  # a's links and work


# ---- deadlines ------------------------------------------------------------------------
def work_of(topo):
    return network_clock.local_work_seconds(topo, TOKENS_PER_STEP, 0.0)


def test_a_deadline_leaves_out_the_child_that_misses_it_and_its_parent_waits_it_out():
    """world waits 8 s for each child: a takes 0.135 + 9.2 + 0.135 s (late), b 7.87 s;
    the deadline is inherited, and a's and b's clients reply in 4.6 s and 7.6 s."""
    topo = two_level(root={"deadline_s": 8.0})
    on_time = network_clock.planned_on_time(topo, HIERFAVG, SIZES, work_of(topo))
    assert on_time[0] is None and on_time[1].tolist() == [False, True]
    assert network_clock.planned_on_time(two_level(root={"deadline_s": 9.5}), HIERFAVG, SIZES,
                                         work_of(topo))[1].tolist() == [True, True]
    # the round as it ran: a left out (no rounds, no participants), world counted it late
    ran = ({0: [1], 1: [0, 3]}, {0: [1], 1: [0, 1]})
    clock = network_clock.round_clock(topo, HIERFAVG, SIZES, *ran, work_of(topo), late={0: [1]})
    assert clock["seconds"] == pytest.approx(8.0)  # b's 7.87 s, then the wait for a
    assert clock["compute_seconds"] == pytest.approx(5.0)  # b's work
    assert clock["per_level"] == pytest.approx({"level0": 0.27 + 0.13, "level1": 2.6})  # the wait is world's
    assert network_clock.round_clock(topo, HIERFAVG, SIZES, *ran, work_of(topo))["seconds"] == pytest.approx(7.87)


def test_deadlines_apply_bottom_up_on_the_planned_clock():
    """eu waits 10 s for fr (15 s: late) and de (6 s), so eu replies to the root in
    1.25 + 10 + 1.25 = 12.5 s, inside the root's 13 s; without its own deadline eu
    would take 1.25 + 15 + 1.25 s and be late. (own_policy: the leaves keep none.)"""
    link = {"link_bandwidth_mbps": 8.0, "link_latency_ms": 0.0, "client_tokens_per_s": 2000.0, "local_steps": 2}
    topo = build_topology({"name": "world", "policy": link, "own_policy": {"deadline_s": 13.0}, "children": [
        {"name": "eu", "own_policy": {"deadline_s": 10.0}, "children": [
            {"name": "fr", "clients": 1, "sources": ["x"], "policy": {"client_tokens_per_s": 200.0}},
            {"name": "de", "clients": 1, "sources": ["x"]}]},
        {"name": "asia", "children": [{"name": "jp", "clients": 1, "sources": ["x"]}]}]})
    on_time = network_clock.planned_on_time(topo, HIERFAVG_3, SIZES, work_of(topo))
    assert dict(zip(topo.levels[1].names, on_time[1].tolist())) == {"eu": True, "asia": True}
    assert dict(zip(topo.levels[2].names, on_time[2].tolist())) == {"fr": False, "de": True, "jp": True}


HIERFAVG_3 = Plan(broadcast=(ALL,) * 3, aggregate=(ALL,) * 3)


def test_a_deadline_that_every_child_misses_is_refused():
    with pytest.raises(ValueError, match=r"federation 'a': policy field 'deadline_s' = 1 .*its clients .*in 4\.6 s"):
        network_clock.planned_on_time(two_level(root={"deadline_s": 1.0}), HIERFAVG, SIZES, work_of(two_level()))
    with pytest.raises(ValueError, match=r"federation 'world': .*'deadline_s' = 7\.7 .*child federations: .*in 7\.87 s"):
        network_clock.planned_on_time(two_level(root={"deadline_s": 7.7}), HIERFAVG, SIZES, work_of(two_level()))


def deadline_config(**world):
    """tiny (en, de, ru x 2 clients) where world waits 1 s for each language, and ru's
    clients train 10x slower: 2 steps x 64 tokens at 100 tokens/s = 1.28 s."""
    from worldlm_jax.config import presets

    config = presets.tiny()
    tree = dict(config.tree, own_policy={"deadline_s": 1.0, **world})
    tree["children"] = [dict(c, policy={"client_tokens_per_s": 100.0 if c["name"] == "ru" else 1000.0})
                        for c in tree["children"]]
    return dataclasses.replace(config, tree=tree)


def test_a_run_plans_its_deadlines_from_its_config():
    from worldlm_jax.config import ConfigError
    from worldlm_jax.run import blueprint

    run = blueprint.abstract_run(deadline_config())
    assert dict(zip(run.run_topology.levels[1].names, run.spec.on_time[1])) == {"en": True, "de": True, "ru": False}
    assert blueprint.abstract_run(deadline_config(deadline_s=0.0)).spec.on_time == ()  # no deadline: today's round
    config = deadline_config()
    config = dataclasses.replace(config, tree=dict(config.tree, children=[
        dict(c, policy={}) if c["name"] == "de" else c for c in config.tree["children"]]))
    with pytest.raises(ConfigError, match=r"'deadline_s' is set, but federation\(s\) de have client_tokens_per_s 0"):
        blueprint.abstract_run(config)


def test_the_round_record_prices_a_late_childs_wait():
    """records.simulated_time reads `level0/late`: world, which left ru out, ends its
    round at its 1 s deadline, not when en and de have replied."""
    from worldlm_jax.run import blueprint, communication, records

    run = blueprint.abstract_run(deadline_config())
    exp = types.SimpleNamespace(run_topology=run.run_topology, batch_size=run.batch_size, config=run.config,
                                init_params=run.params, spec=run.spec,
                                part_bytes=communication.part_bytes(run.params, run.spec.key_paths))
    metrics = {"level0/rounds": np.ones(1), "level1/rounds": np.array([1.0, 1.0, 0.0])}
    participants = {0: np.array([2.0]), 1: np.array([2.0, 2.0, 0.0])}
    waited = records.simulated_time(exp, run.spec.plan, {**metrics, "level0/late": np.ones(1)}, participants, 0.0)
    assert waited["sim_seconds"] == pytest.approx(1.0)
    no_wait = records.simulated_time(exp, run.spec.plan, metrics, participants, 0.0)
    assert 0.128 < no_wait["sim_seconds"] < 0.2  # en's and de's 0.128 s of work and their fast links


def test_the_config_table_says_which_children_a_deadline_leaves_out():
    from worldlm_jax.cli.commands import describe_config
    from worldlm_jax.config import presets

    table = describe_config(deadline_config(), short=True)
    assert table.splitlines()[-1] == "deadline: world waits 1 s and leaves out ru (the planned clock)"
    assert "deadline:" not in describe_config(presets.tiny(), short=True)
