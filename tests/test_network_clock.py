"""The simulated network clock (run/network_clock.py) on hand-built trees and
hand-written round metrics: host-side arithmetic, no training."""
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
