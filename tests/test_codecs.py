"""Codecs on the tree's edges: every registered codec keeps its contract (shapes,
rows independent, its bits), the built-ins send what their formulas count, error
feedback loses nothing over rounds, and the engine's round aggregates what the
federations decode, with every buffer where it belongs."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_helpers import flat_tree, make_batches, make_spec, to_device, topo, toy_params, tree2
from worldlm_jax import engine
from worldlm_jax.engine import links
from worldlm_jax.plugins import codecs
from worldlm_jax.run import communication
from worldlm_jax.tree.policy import TopologyError

RNG = np.random.default_rng(0)
X = {"a": RNG.normal(size=(5, 300)).astype(np.float32), "b": RNG.normal(size=(5, 7, 3)).astype(np.float32)}


def variant(name, **args):
    return name, tuple(sorted(codecs.resolved_args(name, args).items()))


def roundtrip_rows(v, message, key=jax.random.PRNGKey(0)):
    part = links.PartCodecs((v,), np.zeros(1, np.int32))
    n = jax.tree.leaves(message)[0].shape[0]
    return jax.device_get(links._roundtrip_rows(part, jnp.zeros(n, jnp.int32), message, jax.random.split(key, n)))


@pytest.mark.parametrize("name", codecs.CODECS.names())
def test_every_codec_keeps_shapes_and_rows_independent(name):
    """Contract of every registered codec: each leaf keeps its shape and dtype; a
    NaN row (a broken child) leaves the other rows as they were without it; rows
    permuted with their keys decode permuted; `bits` is a positive integer."""
    v = variant(name)
    out = roundtrip_rows(v, X)
    for p in X:
        assert out[p].shape == X[p].shape and out[p].dtype == X[p].dtype
        assert np.all(np.isfinite(out[p]))
    broken = {p: x.copy() for p, x in X.items()}
    broken["a"][2] = np.nan
    got = roundtrip_rows(v, broken)
    for p in X:
        rows = [0, 1, 3, 4]
        np.testing.assert_array_equal(got[p][rows], out[p][rows])
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    perm = np.array([3, 0, 4, 1, 2])
    part = links.PartCodecs((v,), np.zeros(1, np.int32))
    permuted = jax.device_get(links._roundtrip_rows(part, jnp.zeros(5, jnp.int32), {p: x[perm] for p, x in X.items()},
                                                    keys[perm]))
    for p in X:
        np.testing.assert_array_equal(permuted[p], out[p][perm])
    for n in (1, 7, 300, 1000):
        bits = codecs.get(name).bits(n, dict(v[1]))
        assert isinstance(bits, int) and bits > 0


def _blocks_of(x, block):
    flat = x.reshape(-1)
    return [flat[i:i + block] for i in range(0, flat.size, block)]


@pytest.mark.parametrize("name, bits", [("int8", 8), ("int4", 4)])
def test_integer_codecs_send_integers_and_one_scale_per_block(name, bits):
    """What int8/int4 decode is an integer in [-(2^(b-1) - 1), 2^(b-1) - 1] times one
    scale per block, so b bits per value plus a float32 scale per block carry it; and
    each value is within half a step of what was sent."""
    v = variant(name)
    block, top = int(dict(v[1])["block"]), 2 ** (bits - 1) - 1
    x = X["a"][0]
    got = roundtrip_rows(v, {"a": X["a"][:1]})["a"][0]
    for sent, decoded in zip(_blocks_of(x, block), _blocks_of(got, block)):
        scale = np.abs(sent).max() / top
        q = decoded / scale
        np.testing.assert_allclose(q, np.round(q), atol=1e-3)
        assert np.abs(np.round(q)).max() <= top
        assert np.abs(decoded - sent).max() <= scale / 2 * (1 + 1e-5)
    n = x.size
    assert codecs.get(name).bits(n, dict(v[1])) == bits * n + 32 * math.ceil(n / block)


def test_casts_topk_and_sign_send_what_their_bits_count():
    x = X["a"][:1]
    bf = roundtrip_rows(variant("bf16"), {"a": x})["a"]
    np.testing.assert_array_equal(bf, bf.astype(jnp.bfloat16).astype(np.float32))  # 16 bits hold it
    big = roundtrip_rows(variant("fp16"), {"a": np.array([[1e6, -1e6, 1.0]], np.float32)})["a"]
    np.testing.assert_array_equal(big, [[65504.0, -65504.0, 1.0]])  # saturates, never inf
    v = variant("topk", fraction=0.05)
    top = roundtrip_rows(v, {"a": x})["a"][0]
    k = math.ceil(0.05 * x.size)
    assert np.count_nonzero(top) == k  # k values and their indices
    kept = np.sort(np.argsort(-np.abs(x[0]))[:k])
    np.testing.assert_array_equal(np.flatnonzero(top), kept)
    np.testing.assert_array_equal(top[kept], x[0][kept])
    assert codecs.get("topk").bits(x.size, dict(v[1])) == k * (32 + math.ceil(math.log2(x.size)))
    v = variant("sign", block=128)
    sign = roundtrip_rows(v, {"a": x})["a"][0]
    for sent, decoded in zip(_blocks_of(x[0], 128), _blocks_of(sign, 128)):
        np.testing.assert_allclose(np.abs(decoded), np.abs(sent).mean(), rtol=1e-6)  # one scale per block
        np.testing.assert_array_equal(np.sign(decoded), np.sign(sent))  # one bit per value
    assert codecs.get("sign").bits(x.size, dict(v[1])) == x.size + 32 * math.ceil(x.size / 128)


def test_stochastic_rounding_after_rotation_is_unbiased_and_on_its_grid():
    """The mean of many independent round trips converges to the message (within
    5 standard errors, per coordinate, from the trips' own spread), and each trip,
    rotated back, lies on 2^bits levels per block."""
    v = variant("stochastic", bits=2, block=64)
    x = np.repeat(X["a"][:1, :64], 2000, axis=0)
    trips = roundtrip_rows(v, {"a": x}, jax.random.PRNGKey(3))["a"]
    mean, se = trips.mean(0), trips.std(0) / np.sqrt(len(trips))
    assert np.all(np.abs(mean - x[0]) <= 5 * se + 1e-6)
    assert np.abs(trips[0] - x[0]).max() > 1e-3  # it does quantise
    assert codecs.get("stochastic").bits(64, dict(v[1])) == 2 * 64 + 64


def test_error_feedback_loses_nothing_over_rounds():
    """With error feedback, what a child's codec delivered over T rounds plus what
    it still holds is what it meant to send (float32, to rounding)."""
    part = links.level_codecs(topo(flat_tree(3, codec_up="topk", codec_args={"fraction": 0.02})), 0, "up", ("B",))
    assert part["B"].feedback
    rng = np.random.default_rng(1)
    error = {"B": {"w": jnp.zeros((3, 500))}}
    total_sent = total_meant = 0.0
    for _ in range(6):
        update = {"w": jnp.asarray(rng.normal(size=(3, 500)), jnp.float32)}
        sent, error = links.send_up(part, {"B": update}, error, jnp.zeros(3, jnp.int32), None)
        total_sent = total_sent + np.asarray(sent["B"]["w"], np.float64)
        total_meant = total_meant + np.asarray(update["w"], np.float64)
    np.testing.assert_allclose(total_sent + np.asarray(error["B"]["w"]), total_meant, atol=1e-4)
    assert np.abs(np.asarray(error["B"]["w"])).max() > 0.1  # topk left a lot out each round


def test_bytes_follow_each_federations_codec_and_participants():
    """Per level and direction: participants x each federation's message (its codec
    of each part, leaf by leaf in whole bytes); `none` is float32."""
    t = topo(tree2([2, 3], root_policy={"codec_up": "int8"},
                   fed_policies=[{"codec_up": {"B": "topk"}, "codec_args": {"fraction": 0.1}},
                                 {"codec_down": "bf16"}]))
    plan = engine.Plan(broadcast=(frozenset("B"), frozenset("BK")), aggregate=(frozenset("BK"),) * 2,
                       owner={"B": 0, "K": 1})
    params = toy_params()
    leaves = communication.part_leaves(params, frozenset({"blocks/0/w"}))
    sizes = {"B": 4 * sum(leaves["B"]), "K": 4 * sum(leaves["K"])}
    participants = {0: np.array([2.0]), 1: np.array([2.0, 3.0])}
    got = communication.round_bytes(t, plan, sizes, participants, leaves)
    int8 = lambda n: 8 * n + 32 * math.ceil(n / 256)
    B, K = leaves["B"], leaves["K"]
    assert got["level0"]["up"] == 2 * sum(math.ceil(int8(n) / 8) for n in B + K)
    assert got["level0"]["down"] == 2 * sizes["B"]
    topk = lambda n: math.ceil(0.1 * n) * (32 + max(1, math.ceil(math.log2(n))))
    # F0's clients: topk B (its own), K int8 (inherited from the root's codec_up); F1's: int8
    f0_up = sum(math.ceil(topk(n) / 8) for n in B) + sum(math.ceil(int8(n) / 8) for n in K)
    f1_up = sum(math.ceil(int8(n) / 8) for n in B + K)
    assert got["level1"]["up"] == 2 * f0_up + 3 * f1_up
    assert got["level1"]["down"] == 2 * (sizes["B"] + sizes["K"]) + 3 * (sizes["B"] + sizes["K"]) // 2
    none = communication.round_bytes(topo(tree2([2, 3])), plan, sizes, participants, leaves)
    assert none == communication.round_bytes(topo(tree2([2, 3])), plan, sizes, participants)  # float32 either way


def _round(tree, steps=2, seed=0, chunk=0, rounds=1, key_paths=frozenset(), plan=None):
    spec = make_spec(topo(tree), plan, client_optimizer="test_sgd", key_paths=key_paths, chunk=chunk)
    strategy = engine.make_strategy(spec)
    state = strategy.init(toy_params())
    metrics = []
    for batch in make_batches(spec.topology, rounds, seed=seed):
        state, m = strategy.run_round(state, to_device(batch), jax.random.PRNGKey(seed))
        metrics.append(m)
    return spec, jax.device_get(state), metrics


def test_a_federation_aggregates_what_it_decodes_and_each_client_keeps_what_it_left_out():
    """FedAvg with int4 uploads (error feedback on) equals FedAvg whose clients'
    updates went through int4 by hand: the root's new model is the mean of the
    decoded updates, and each client's buffer is its update minus what was decoded."""
    plain_spec, plain, _ = _round(flat_tree(3, local_steps=2, client_lr=0.1))
    spec, coded, _ = _round(flat_tree(3, local_steps=2, client_lr=0.1, codec_up="int4"))
    params = toy_params()
    # the clients' updates, as a run whose clients keep their model shows them (same start, same data)
    local_spec, local, _ = _round(flat_tree(3, local_steps=2, client_lr=0.1),
                                  plan=engine.strategies.local_plan())
    updates = {p: np.asarray(local.clients.B[p]) - np.asarray(params[p])[None] for p in params}
    decoded = roundtrip_rows(variant("int4"), updates)
    for p in params:
        np.testing.assert_allclose(coded.levels[0].B[p][0], params[p] + decoded[p].mean(0), atol=1e-6)
        np.testing.assert_allclose(coded.clients.up_error["B"][p], updates[p] - decoded[p], atol=1e-6)
        np.testing.assert_allclose(plain.levels[0].B[p][0], params[p] + updates[p].mean(0), atol=1e-6)
    assert not plain.clients.up_error and not plain.levels[0].down_copy  # none: nothing kept


def test_absent_and_diverged_clients_keep_their_buffers():
    """Clients sampled out of a round, or whose update is NaN, keep their error
    feedback as it was; those that took part replace theirs."""
    tree = flat_tree(4, local_steps=1, client_lr=0.1, codec_up="sign", sampling="fixed", clients_per_round=2)
    spec = make_spec(topo(tree), client_optimizer="test_sgd")
    strategy = engine.make_strategy(spec)
    state = strategy.init(toy_params())
    rng = np.random.default_rng(0)
    for r, chosen in enumerate(([0, 1], [2, 3])):  # round 1: client 3's data is garbage, its update NaN
        tokens = rng.integers(0, 10, size=engine.batch_shape(spec.topology, 2, 6)).astype(np.int32)
        if r == 1:
            tokens[1] = 10 ** 6
        batch = engine.RoundBatch(tokens, np.array(chosen, np.int32), np.ones(2, np.float32))
        before = jax.device_get(state.clients.up_error)
        state, _ = strategy.run_round(state, to_device(batch), jax.random.PRNGKey(r))
        after = jax.device_get(state.clients.up_error)
        for p in after["B"]:
            changed = [c for c in range(4) if not np.array_equal(after["B"][p][c], before["B"][p][c])]
            assert changed == ([0, 1] if r == 0 else [2]), (r, p, changed)
            assert np.all(np.isfinite(after["B"][p]))


def test_a_lossy_broadcast_sends_the_difference_from_the_childrens_copy():
    """Down through bf16: the clients start from the copy they hold plus the decoded
    difference from it, and the copy becomes what they decoded. So one FedAvg round
    from a model x the clients hold as c moves x exactly as a plain round moves the
    model they decoded, c + bf16(x - c) (to float32 rounding)."""
    params = toy_params()
    noise = {p: 0.01 * np.random.default_rng(2).normal(size=v.shape).astype(np.float32) for p, v in params.items()}
    tree = flat_tree(3, local_steps=1, client_lr=0.1)
    batch = to_device(make_batches(topo(tree), 1, seed=4)[0])

    def one_round(codec_policy, start):
        spec = make_spec(topo({**tree, "policy": {**tree["policy"], **codec_policy}}), client_optimizer="test_sgd")
        strategy = engine.make_strategy(spec)
        state = strategy.init(params)  # every copy starts as the initial model
        root = state.levels[0]._replace(B={p: jnp.asarray(start[p])[None] for p in params})
        state = state._replace(levels=(root,))
        new, _ = strategy.run_round(state, batch, jax.random.PRNGKey(0))
        return jax.device_get(new)

    x = {p: params[p] + noise[p] for p in params}
    decoded = {p: params[p] + np.asarray(jnp.asarray(noise[p]).astype(jnp.bfloat16).astype(jnp.float32))
               for p in params}
    coded = one_round({"codec_down": "bf16"}, x)
    plain = one_round({}, decoded)
    for p in params:
        np.testing.assert_array_equal(coded.levels[0].down_copy["B"][p][0], decoded[p])
        np.testing.assert_allclose(coded.levels[0].B[p][0] - x[p], plain.levels[0].B[p][0] - decoded[p],
                                   atol=1e-6)
    assert any(np.abs(decoded[p] - x[p]).max() > 0 for p in params)  # bf16 did round the difference


def test_unknown_codecs_and_bad_arguments_are_one_line_naming_the_field():
    from worldlm_jax.tree.topology import build_topology
    cases = [({"codec_up": "zip"}, "codec_up"), ({"codec_down": {"X": "int8"}}, "codec_down"),
             ({"codec_up": "topk", "codec_args": {"fraction": 2.0}}, "fraction"),
             ({"codec_up": "int8", "codec_args": {"fraction": 0.1}}, "codec_args"),
             ({"codec_up": "stochastic", "codec_args": {"block": 100}}, "power of two")]
    for policy, word in cases:
        with pytest.raises(TopologyError) as e:
            build_topology(flat_tree(2, **policy))
        assert word in str(e.value) and "\n" not in str(e.value)


def test_buffers_are_checkpointed_sharded_and_resume_bit_for_bit(tmp_path):
    """The tiny model (one block, so that it compiles in seconds) on 8 devices with
    lossy codecs both ways (a random one included), its state sharded: a round run
    from the restored checkpoint equals the round run from the state in memory, bit
    for bit, buffers included."""
    from worldlm_jax.config import apply_overrides, presets
    from worldlm_jax.outputs.checkpoint import Checkpointer
    from worldlm_jax.run import experiment as experiment_lib

    config = apply_overrides(presets.tiny(), [
        "run.rounds=2", "run.shard_state_mb=0", "policy.codec_up={B: stochastic, K: topk}",
        "policy.codec_args.fraction=0.05", "policy.codec_down=int8", "model.n_layers=1", "policy.local_steps=1"])
    exp = experiment_lib.build_experiment(config)
    state = experiment_lib.place_state(exp, exp.strategy.init(exp.init_params))
    key = jax.random.PRNGKey(config.run.seed + 1)
    batch = lambda r: experiment_lib._put(exp, experiment_lib.make_batch(exp, r))
    state, _ = exp.strategy.run_round(state, batch(0), key, exp.policies)
    held = jax.device_get(state)
    assert held.clients.up_error["K"] and held.levels[1].up_error["K"] and held.levels[0].down_copy["B"]
    assert "B" not in held.clients.up_error  # stochastic rounding is unbiased: no feedback by default
    assert jax.tree.leaves(held.clients.up_error)[0].shape[0] >= exp.run_topology.n_clients
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, state, {"round": 1, "privacy": {}}, force=True)
        ckpt.wait()
        restored, _ = experiment_lib.restore_state(exp, ckpt)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(held)):
        np.testing.assert_array_equal(np.asarray(a), b)
    straight, _ = exp.strategy.run_round(state, batch(1), key, exp.policies)
    resumed, _ = exp.strategy.run_round(restored, batch(1), key, exp.policies)
    assert exp.compiles() == 1
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed)), jax.tree.leaves(jax.device_get(straight))):
        np.testing.assert_array_equal(a, b)


def test_a_dp_federation_clips_what_it_decodes():
    """A DP federation (no noise, a tight clip) with int8 uploads releases the mean
    of its clients' clipped decoded updates: the codec is the client's own
    processing, before the clip, so each contribution stays bounded by the clip."""
    clip = 0.01
    tree = flat_tree(3, local_steps=2, client_lr=0.1, dp_clip=clip, codec_up="int8")
    _, coded, _ = _round(tree)
    _, local, _ = _round(flat_tree(3, local_steps=2, client_lr=0.1), plan=engine.strategies.local_plan())
    params = toy_params()
    updates = {p: np.asarray(local.clients.B[p], np.float64) - np.asarray(params[p])[None] for p in params}
    decoded = roundtrip_rows(variant("int8"), {p: v.astype(np.float32) for p, v in updates.items()})
    norms = np.sqrt(sum(np.sum(np.asarray(v, np.float64).reshape(3, -1) ** 2, axis=1) for v in decoded.values()))
    assert np.all(norms > clip)  # every client is clipped
    scale = np.minimum(1.0, clip / norms)
    for p in params:
        want = params[p] + np.tensordot(scale, np.asarray(decoded[p], np.float64), axes=1) / 3
        np.testing.assert_allclose(coded.levels[0].B[p][0], want, atol=1e-6)


def test_a_vectorised_sweep_refuses_points_that_differ_in_codecs():
    from worldlm_jax.config import apply_overrides, presets
    from worldlm_jax.sweeps import vectorized

    base = apply_overrides(presets.tiny(), ["run.rounds=1"])
    for override, field in (("policy.codec_up=int8", "codec_up"), ("policy.codec_args.feedback=1", "codec_args")):
        with pytest.raises(ValueError, match=field):
            vectorized.run([base, apply_overrides(base, [override])])
