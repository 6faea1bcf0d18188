"""A backbone synced part by part (engine/partial_sync.py): in fragments of blocks,
one a round (policy `sync_fragments`), and by parameter group every s-th round
(`sync_every`). A part goes down, comes up and moves only in its turn, the rest
stays as each child federation trains it, and one fragment is today's round."""
import dataclasses
import functools

import jax
import numpy as np
import pytest

from engine_helpers import POLICY, assert_tree_equal, make_batches, make_spec, to_device, toy_params, topo, tree2
from worldlm_jax import engine
from worldlm_jax.engine import partial_sync

# the toy has one block; calling its norm block 1 gives two fragments: 0 = embed and
# head_bias (outside the blocks) with blocks/0/w, 1 = the norm
BLOCKS = {"blocks/0/w": 0, "blocks/0/norm/scale": 1}
FRAGMENT = {0: ("embed", "head_bias", "blocks/0/w"), 1: ("blocks/0/norm/scale",)}
OUTER = {"server_optimizer": "nesterov", "server_lr": 0.7}  # momentum would move a fragment out of turn
LEAF = {**POLICY, "server_optimizer": "sgd", "server_lr": 1.0}  # the root's outer rule is not inherited


@functools.cache
def fragmented(root_policy=(), blocks=tuple(BLOCKS.items())):
    t = topo(tree2([2, 2], root_policy={"sync_fragments": 2, **OUTER, **dict(root_policy)},
                   fed_policies=[LEAF, LEAF]))
    return t, engine.make_strategy(dataclasses.replace(make_spec(t, client_optimizer="test_sgd"),
                                                             param_blocks=dict(blocks)))


def rounds(strategy, batches, policies=()):
    """The state after each round (round r runs with `policies[r]` where given)."""
    state, out = strategy.init(toy_params()), []
    for r, b in enumerate(batches):
        extra = (policies[r],) if r < len(policies) and policies[r] is not None else ()
        state, _ = strategy.run_round(state, to_device(b), jax.random.PRNGKey(r), *extra)
        out.append(jax.tree.map(np.asarray, state))
    return out


def root(state, paths):
    return {p: state.levels[0].B[p][0] for p in paths}


def test_each_fragment_moves_only_in_its_turn_with_its_own_optimizer_state():
    t, strategy = fragmented()
    after = rounds(strategy, make_batches(t, 3))
    init = toy_params()
    assert_tree_equal(root(after[0], FRAGMENT[1]), {p: init[p] for p in FRAGMENT[1]})  # round 0: fragment 0
    assert all(np.any(after[0].levels[0].B[p][0] != init[p]) for p in FRAGMENT[0])
    assert_tree_equal(root(after[1], FRAGMENT[0]), root(after[0], FRAGMENT[0]))  # round 1: fragment 1 only,
    assert all(np.any(after[1].levels[0].B[p][0] != init[p]) for p in FRAGMENT[1])  # though fragment 0 has momentum
    momentum = lambda s: {jax.tree_util.keystr(path): leaf
                          for path, leaf in jax.tree_util.tree_flatten_with_path(s.levels[0].server)[0]
                          if any(getattr(k, "key", None) in FRAGMENT[0] for k in path)}
    assert momentum(after[0]) and all(np.any(v != 0) for v in momentum(after[0]).values())
    assert_tree_equal(momentum(after[1]), momentum(after[0]))  # its momentum waits for its turn too
    assert all(np.any(after[2].levels[0].B[p][0] != after[1].levels[0].B[p][0]) for p in FRAGMENT[0])


def test_a_fragment_out_of_turn_stays_as_each_child_trained_it():
    """Round 1 (fragment 1's turn) with every client's rate zeroed, so nothing trains:
    each child federation then holds fragment 1 as the root sent it and fragment 0 as
    it had it after its own round 0, and the root's fragment 1 does not move."""
    t, strategy = fragmented()
    policies = engine.spec_policies(make_spec(t))
    frozen = policies._replace(client_lr=policies.client_lr * 0.0)
    after = rounds(strategy, make_batches(t, 2), policies=(None, frozen))
    children = lambda s, paths: {p: s.levels[1].B[p] for p in paths}
    assert_tree_equal(children(after[1], FRAGMENT[0]), children(after[0], FRAGMENT[0]))
    sent = {p: np.broadcast_to(after[0].levels[0].B[p], after[1].levels[1].B[p].shape) for p in FRAGMENT[1]}
    assert_tree_equal(children(after[1], FRAGMENT[1]), sent)
    assert not np.array_equal(after[0].levels[1].B["embed"][0], after[0].levels[0].B["embed"][0])  # a real test
    assert_tree_equal(root(after[1], FRAGMENT[1]), root(after[0], FRAGMENT[1]))


def test_one_fragment_is_todays_round_bit_for_bit():
    t = topo(tree2([2, 2], root_policy=OUTER, fed_policies=[POLICY, POLICY]))
    plain = engine.make_strategy(make_spec(t, client_optimizer="test_sgd"))
    one = engine.make_strategy(dataclasses.replace(make_spec(t, client_optimizer="test_sgd"), param_blocks=BLOCKS))
    batches = make_batches(t, 2)
    assert_tree_equal(rounds(plain, batches)[-1], rounds(one, batches)[-1])


def test_a_dp_federation_releases_only_its_fragment():
    """The noise of the release lands on every coordinate; the fragment out of turn
    still does not move, and the clip budget goes to the fragment in turn."""
    t, strategy = fragmented((("dp_noise_multiplier", 1.0), ("dp_clip", 0.5)))
    after = rounds(strategy, make_batches(t, 1))
    init = toy_params()
    assert_tree_equal(root(after[0], FRAGMENT[1]), {p: init[p] for p in FRAGMENT[1]})
    assert all(np.any(after[0].levels[0].B[p][0] != init[p]) for p in FRAGMENT[0])


def refusal(root_policy=None, blocks=tuple(BLOCKS.items()), tree=None):
    t = topo(tree or tree2([2, 2], root_policy={"sync_fragments": 2, **(root_policy or {})},
                           fed_policies=[POLICY, POLICY]))
    with pytest.raises(ValueError) as e:
        partial_sync.check(dataclasses.replace(make_spec(t), param_blocks=dict(blocks)))
    return str(e.value)


def test_what_fragments_do_not_compose_with_is_refused():
    assert "does nothing here" in refusal(tree={"name": "root", "clients": 3, "sources": ["s"],
                                                "policy": {"sync_fragments": 2}})
    assert "fragment(s) [1] without a backbone block (the backbone's blocks: 0): expected 1..1" in refusal(
        blocks=(("blocks/0/w", 0),))


def test_a_fragmented_backbone_sends_one_fragment_a_round_on_the_byte_count_and_the_clock():
    """Backbone leaves of 25 values outside the blocks, 75 in block 0 and 150 in block 1
    (100, 300 and 600 float32 bytes): under two fragments the root sends 400 bytes of B
    (fragment 0) in even rounds and 600 in odd ones, its int8 uploads a byte a value
    plus a 4-byte scale a leaf; eu, with 2 rounds per root round, sends each fragment
    once per root round (500 bytes on average)."""
    from worldlm_jax.engine import Plan
    from worldlm_jax.run import communication, network_clock
    from worldlm_jax.tree.topology import build_topology

    link = {"link_bandwidth_mbps": 8.0, "link_latency_ms": 0.0, "client_tokens_per_s": 1000.0}
    tree = build_topology({"name": "world", "policy": link, "own_policy": {"sync_fragments": 2, "codec_up": "int8"},
                           "children": [
        {"name": "eu", "own_policy": {"sync_fragments": 2, "rounds": 2}, "children": [
            {"name": "fr", "clients": 1, "sources": ["x"], "policy": {"sync_fragments": 2}}]}]})
    leaves = ((-1, "embeddings", 25), (0, "block0_mlp", 75), (1, "block1_mlp", 150))
    odd, even = (communication.partial_sync_bytes(tree, leaves, r) for r in (1, 2))
    assert even[(0, "down")].tolist() == [400.0] and odd[(0, "down")].tolist() == [600.0]
    assert even[(0, "up")].tolist() == [25 + 4 + 75 + 4] and odd[(0, "up")].tolist() == [150 + 4]
    assert odd[(1, "down")].tolist() == [500.0] == even[(1, "up")].tolist()
    assert (2, "down") not in odd  # fr's clients keep no backbone: nothing to fragment
    plan = Plan(broadcast=(frozenset("B"),) * 3, aggregate=(frozenset("B"),) * 3)
    sizes, participants = {"B": 1000, "K": 0}, {0: [1], 1: [2], 2: [2]}
    whole = communication.round_bytes(tree, plan, sizes, participants)
    split = communication.round_bytes(tree, plan, sizes, participants, backbone=odd)
    assert split["level0"]["down"] == 600 and whole["level0"]["down"] == 1000
    assert split["level1"]["up"] == 0.5 * whole["level1"]["up"] and split["level2"] == whole["level2"]
    # the clock: the root's messages at 1e6 B/s carry 600 bytes down and 154 up, not 1000 each way
    rounds = {0: [1], 1: [2], 2: [2]}
    work = network_clock.local_work_seconds(tree, 10, 0.0)
    at = lambda b: network_clock.critical_paths(tree, plan, sizes, participants, rounds, work, backbone=b)[0][0, 0]
    assert at(odd) == pytest.approx((600 + 154) / 1e6) and at(None) == pytest.approx(2 * 1000 / 1e6)


def test_a_fragment_out_of_turn_keeps_its_error_feedback_and_sends_nothing():
    """The world's uploads through top-10% with error feedback and its broadcast through
    int8 (the children's copy as reference): each fragment's error buffers and copy move
    only in its turn, so what fragment 0 left unsent in round 0 waits through round 1."""
    spec = tree2([2, 2], root_policy={"sync_fragments": 2, **OUTER}, fed_policies=[LEAF, LEAF])
    t = topo({**spec, "own_policy": {"codec_up": "topk", "codec_down": "int8", "codec_args": {"fraction": 0.1}}})
    strategy = engine.make_strategy(dataclasses.replace(make_spec(t, client_optimizer="test_sgd"),
                                                        param_blocks=BLOCKS))
    after = rounds(strategy, make_batches(t, 2))
    error = lambda r, k: {p: after[r].levels[1].up_error["B"][p] for p in FRAGMENT[k]}
    copy = lambda r, k: {p: after[r].levels[0].down_copy["B"][p][0] for p in FRAGMENT[k]}
    init = toy_params()
    assert all(np.all(v == 0) for v in error(0, 1).values()) and all(np.any(v != 0) for v in error(0, 0).values())
    assert_tree_equal(error(1, 0), error(0, 0))  # kept for fragment 0's next turn, not sent in round 1
    assert all(np.any(v != 0) for v in error(1, 1).values())
    assert_tree_equal(copy(0, 1), {p: init[p] for p in FRAGMENT[1]})
    assert_tree_equal(copy(1, 0), copy(0, 0))
    assert_tree_equal(root(after[1], FRAGMENT[0]), root(after[0], FRAGMENT[0]))


def test_a_run_syncs_the_backbone_in_fragments_and_counts_one_fragment_a_round(tmp_path):
    """worldlm train (hierfavg, two blocks) with world syncing in two fragments: the
    bytes world sends down alternate between fragment 0 (the embeddings and block 0)
    and fragment 1 (block 1), and the run trains."""
    import json
    import math

    from cli_helpers import run_cli
    from worldlm_jax.config import apply_overrides, presets
    from worldlm_jax.run import blueprint, communication

    overrides = ["algorithm.name=hierfavg", "tree.policy.sync_fragments=2", "run.rounds=2", "run.devices=1"]
    code, _, err = run_cli(["train", "--config", "tiny", "--workdir", str(tmp_path), "--quiet"]
                           + [a for o in overrides for a in ("--set", o)])
    assert code == 0, err
    run = blueprint.abstract_run(apply_overrides(presets.get("tiny"), overrides))
    leaves = communication.backbone_leaves(run.params, run.spec.key_paths, run.spec.param_blocks,
                                           run.spec.param_groups)
    fragment = {k: 4 * sum(n for block, _, n in leaves if max(block, 0) == k) for k in (0, 1)}  # float32
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    down = [r["bytes_communicated"]["level0"]["down"] for r in records if "train_loss" in r]
    assert down == [3 * fragment[0], 3 * fragment[1]]  # three languages, one message each
    assert math.isfinite(json.loads((tmp_path / "summary.json").read_text())["eval"]["perplexity"])


# ---- intervals per parameter group (sync_every) ---------------------------------------
GROUPS = {"embed": "embeddings", "head_bias": "embeddings", "blocks/0/w": "block0_mlp",
          "blocks/0/norm/scale": "block0_other"}


def test_a_group_synced_every_second_round_waits_in_between_with_its_momentum():
    t = topo(tree2([2, 2], root_policy={"sync_every": {"embeddings": 2}, **OUTER}, fed_policies=[LEAF, LEAF]))
    spec = dataclasses.replace(make_spec(t, client_optimizer="test_sgd"), param_blocks=BLOCKS, param_groups=GROUPS)
    after = rounds(engine.make_strategy(spec), make_batches(t, 3))
    embeddings, block = ("embed", "head_bias"), ("blocks/0/w", "blocks/0/norm/scale")
    moved = lambda a, b, paths: all(np.any(a.levels[0].B[p] != b.levels[0].B[p]) for p in paths)
    assert moved(after[0], after[1], block) and moved(after[1], after[2], block)  # every round
    assert_tree_equal(root(after[1], embeddings), root(after[0], embeddings))  # round 1: not its turn
    assert moved(after[1], after[2], embeddings)  # round 2: its turn again


def test_intervals_and_fragments_combine_on_the_byte_count():
    """Embeddings every 3rd round; then two fragments with embeddings every 2nd round
    (they are in fragment 0, whose turns are the even rounds: always with it); then
    three fragments with embeddings every 2nd round (fragment 0's turns 0, 3, 6, ...:
    the embeddings only in the even ones)."""
    from worldlm_jax.run import communication
    from worldlm_jax.tree.topology import build_topology

    tree = build_topology({"name": "world", "own_policy": {"sync_every": {"embeddings": 3}},
                           "children": [{"name": "r", "children": [{"name": "a", "clients": 1, "sources": ["x"]}]}]})
    leaves = ((-1, "embeddings", 25), (0, "block0_mlp", 75), (1, "block1_mlp", 150))
    down = [communication.partial_sync_bytes(tree, leaves, r)[(0, "down")].tolist() for r in range(4)]
    assert down == [[1000.0], [900.0], [900.0], [1000.0]]  # embeddings (100 bytes) in rounds 0 and 3
    both = build_topology({"name": "world", "own_policy": {"sync_fragments": 2, "sync_every": {"embeddings": 2}},
                           "children": [{"name": "r", "children": [{"name": "a", "clients": 1, "sources": ["x"]}]}]})
    down = [communication.partial_sync_bytes(both, leaves, r)[(0, "down")].tolist() for r in range(4)]
    assert down == [[400.0], [600.0], [400.0], [600.0]]  # embeddings join fragment 0's even turns: always
    leaves_odd = ((-1, "embeddings", 25), (0, "block0_mlp", 75), (1, "block1_mlp", 150), (2, "block2_mlp", 50))
    three = build_topology({"name": "world", "own_policy": {"sync_fragments": 3, "sync_every": {"embeddings": 2}},
                            "children": [{"name": "r", "children": [{"name": "a", "clients": 1, "sources": ["x"]}]}]})
    down = [communication.partial_sync_bytes(three, leaves_odd, r)[(0, "down")].tolist() for r in range(6)]
    assert down == [[400.0], [600.0], [200.0], [300.0], [600.0], [200.0]]  # embeddings in rounds 0 and 6, not 3


def test_a_group_the_backbone_does_not_have_is_refused():
    t = topo(tree2([2, 2], root_policy={"sync_every": {"block3_attn": 2}}, fed_policies=[POLICY, POLICY]))
    with pytest.raises(ValueError, match=r"'root': policy field 'sync_every' names \['block3_attn'\].*block0_mlp"):
        partial_sync.check(dataclasses.replace(make_spec(t), param_blocks=BLOCKS, param_groups=GROUPS))


# ---- with sharding and a resume ------------------------------------------------------------
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices, see conftest.py")
def test_on_a_mesh_with_the_level_sharded_a_fragment_out_of_turn_stays_exactly_as_it_was():
    """16 federations under a root that syncs in two fragments, the federations' state split
    by rows over 8 devices: after round 0 the root's fragment 1 is still the initial model,
    bit for bit, and after round 1 its fragment 0 is still round 0's, as without a mesh."""
    from worldlm_jax.engine import parallel

    t = topo(tree2([2] * 16, root_policy={"sync_fragments": 2, **OUTER}, fed_policies=[LEAF] * 16),
             slot_multiple=8)
    spec = dataclasses.replace(make_spec(t, client_optimizer="test_sgd", mesh=parallel.make_mesh(8)),
                               param_blocks=BLOCKS)
    strategy = engine.make_strategy(spec)
    state = strategy.init(toy_params())
    assert state.levels[1].B["embed"].sharding.spec == parallel.P(parallel.AXIS)  # the level is sharded
    after = []
    for r, b in enumerate(make_batches(t, 2)):
        state, _ = strategy.run_round(state, to_device(b), jax.random.PRNGKey(r))
        after.append(jax.tree.map(np.asarray, engine.unpad_state(spec, state)))
    init = toy_params()
    assert_tree_equal(root(after[0], FRAGMENT[1]), {p: init[p] for p in FRAGMENT[1]})
    assert_tree_equal(root(after[1], FRAGMENT[0]), root(after[0], FRAGMENT[0]))
    assert all(np.any(after[1].levels[0].B[p][0] != init[p]) for p in FRAGMENT[1])


def test_a_run_resumed_from_its_state_syncs_the_fragment_an_uninterrupted_run_would():
    """The fragment in turn follows the state's round counter: a fresh round function
    given round 1's state on the host (what a restore hands it) continues exactly as the
    run that never stopped."""
    t, strategy = fragmented()
    batches = make_batches(t, 3)
    straight = rounds(strategy, batches)[-1]
    first = rounds(strategy, batches[:1])[-1]
    resumed = engine.make_strategy(dataclasses.replace(make_spec(t, client_optimizer="test_sgd"),
                                                       param_blocks=BLOCKS))
    state = jax.tree.map(jax.numpy.asarray, first)
    for r, b in enumerate(batches[1:], start=1):
        state, _ = resumed.run_round(state, to_device(b), jax.random.PRNGKey(r))
    assert_tree_equal(jax.tree.map(np.asarray, state), straight)
