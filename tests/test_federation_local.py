"""Federation-local client slots (8 fake CPU devices): a device trains only the
slots of the federations whose rows it holds, reads their broadcast from its own
rows and sums into them, so the leaf level is never gathered whole.

The layout changes where numbers are added, not what is computed: the round
equals the spread layout's up to float32 summation order, for trees with more
federations than devices, as many, and fewer (a federation spanning a group of
devices), in one compilation; and XLA's per-device temporaries of a wide tree
fall with the device count.
"""
import jax
import numpy as np
import pytest

from engine_helpers import (POLICY, STEPS, TOY_KEY_PATHS, assert_close_up_to_summation_order, change, make_batches,
                            make_spec, summation_order_excess, to_device, topo, toy_params, toy_summands, toy_updates,
                            tree2, ulp_perturbed, with_distinct_residuals)
from worldlm_jax import engine
from worldlm_jax.engine import parallel, strategies
from worldlm_jax.tree.policy import TopologyError
from worldlm_jax.tree.topology import federation_rows

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices, see conftest.py")


def tree(sizes, layout, devices=8, dp=False, aggregator="mean"):
    n = len(sizes)
    private = {"dp_clip": 0.05, "dp_noise_multiplier": 0.5} if dp else {}  # clips every update: the sums change
    spec = tree2(sizes, root_policy=dict(POLICY, client_lr=0.5, tau=0.5),
                 fed_policies=[{"server_optimizer": "adam", "server_lr": 0.1, "aggregator": aggregator, **private}] * n)
    return topo(spec, slot_multiple=devices).with_slot_layout(layout)


@pytest.mark.parametrize("sizes", [[2] * 12, [3, 1, 2, 2, 1, 3, 2, 2], [3, 1, 2, 2]],
                         ids=["12-federations", "8-federations", "4-federations"])
def test_every_slot_sits_on_a_device_that_holds_its_federation(sizes):
    t = tree(sizes, "local")
    M, F = 8, len(sizes)
    rows_per_device, group = federation_rows(F, M)
    block = t.n_slots // M
    real = np.zeros(t.n_slots, bool)
    for leaf in range(F):
        real[t.leaf_slots(leaf)] = True
        assert len(t.leaf_slots(leaf)) == sizes[leaf]  # every client of a federation has a slot
    for s in range(t.n_slots):
        device, fed, row = s // block, t.slot_parent[s], t.slot_row[s]
        held = ([device // group] if group > 1 else
                [f for f in range(device * rows_per_device, (device + 1) * rows_per_device)])
        assert 0 <= row < rows_per_device
        if real[s]:
            assert fed in held and (group > 1 or fed == held[row]), (s, device, fed, row)
    if group > 1:  # a federation's slots spread evenly over its group of devices
        for leaf in range(F):
            per_device = np.bincount(t.leaf_slots(leaf) // block, minlength=M)[leaf * group:(leaf + 1) * group]
            assert per_device.max() - per_device.min() <= 1 and per_device.sum() == sizes[leaf]


def test_a_layout_the_devices_cannot_hold_is_refused():
    with pytest.raises(TopologyError, match="run.slot_layout=spread"):
        tree([2, 2, 2], "local")  # 3 federations on 8 devices: 3 does not divide 8


def strategy(t, chunk):
    return engine.make_strategy(make_spec(t, strategies.worldlm_plan(2), key_paths=TOY_KEY_PATHS,
                                          client_optimizer="test_sgd", mesh=parallel.make_mesh(8), chunk=chunk))


def host(tree_):
    return jax.tree.map(np.asarray, tree_)


def trained(t, batches, params, n_feds, chunk=0):
    run = strategy(t, chunk)
    spec = make_spec(t, strategies.worldlm_plan(2), key_paths=TOY_KEY_PATHS, mesh=parallel.make_mesh(8))
    state = with_distinct_residuals(run.init(params), 1, n_feds)
    initial = host(engine.unpad_state(spec, state))
    for r, b in enumerate(batches):
        state, metrics = run.run_round(state, to_device(b), jax.random.PRNGKey(r))
    assert run.run_round._cache_size() == 1  # one compilation for every round
    return host((engine.unpad_state(spec, state), metrics)), initial


@pytest.mark.parametrize("sizes,chunk,dp,aggregator", [([2] * 12, 1, False, "mean"),
                                                       ([2, 3, 2, 1, 2, 2, 3, 2], 0, False, "mean"),
                                                       ([3, 2], 0, True, "mean"),
                                                       ([3, 2, 2, 3, 1, 2, 2, 3, 2, 2, 3, 2, 2, 3, 2, 2], 0, False,
                                                        "median")],
                         ids=["more-federations-than-devices-in-chunks", "as-many", "fewer-under-dp",
                              "a-stacked-aggregator"])
def test_the_federation_local_round_equals_the_spread_round(sizes, chunk, dp, aggregator):
    # (under DP the clipped sums of a federation's group of devices add up outside the map;
    # the noise is drawn per federation from the same keys in both layouts)
    n_feds = len(sizes)
    # (a stacked aggregator, the median, sees each device's own federations and their slots)
    spread, local = (tree(sizes, layout, dp=dp, aggregator=aggregator) for layout in ("spread", "local"))
    # the same clients in the same rounds: batches are drawn per client, so re-laid out by slot
    batches = make_batches(spread, 2, seed=3)
    moved = [relaid(b, spread, local) for b in batches]
    (want, m_want), initial = trained(spread, batches, toy_params(), n_feds)
    (got, m_got), _ = trained(local, moved, toy_params(), n_feds, chunk)  # (chunk 1: a scan over a device's slots)
    (noisy, m_noisy), _ = trained(spread, batches, ulp_perturbed(toy_params()), n_feds)
    # Same sums in another order (a federation's slots on one device or a group, not spread
    # over all): within float32 summation order plus ten times the measured noise one
    # rounding of the inputs grows into (attention, FedAdam), as tests/test_sharded_state.py.
    n = toy_summands(2, STEPS, children=max(sizes) + n_feds)
    bound = dict(values=jax.tree.map(np.abs, want), n_updates=toy_updates(2, STEPS, levels=2),
                 sensitivity=change(noisy, want))
    assert_close_up_to_summation_order(got, want, change(want, initial), n, **bound, err="state")
    m_got, m_want, m_noisy = slots_in_client_order(m_got, local), *(slots_in_client_order(m, spread)
                                                                     for m in (m_want, m_noisy))
    assert_close_up_to_summation_order(m_got, m_want, jax.tree.map(np.abs, m_want), n,
                                       sensitivity=change(m_noisy, m_want), err="metrics")
    # the bound is no blanket: two federations' rows swapped exceed it
    swapped = got._replace(levels=(got.levels[0], jax.tree.map(
        lambda x: x[[1, 0, *range(2, n_feds)]] if x.ndim else x, got.levels[1])))
    assert summation_order_excess(swapped, want, change(want, initial), n, **bound)[0] > 100


def slots_in_client_order(metrics, t):
    """Per-slot metrics (the leaf level's per-child values) of the real slots,
    federation by federation: comparable across slot layouts."""
    order = np.concatenate([t.leaf_slots(f) for f in range(t.leaf.size)])
    def one(x):
        for axis in range(x.ndim):
            if x.shape[axis] == t.n_slots:
                x = np.take(x, order, axis=axis)
        return x
    return {k: one(v) if k.startswith(f"level{t.depth - 1}/child_") else v for k, v in metrics.items()}


def relaid(batch, src, dst):
    """A batch laid out for `src`'s slots, moved to `dst`'s: each client's tokens
    go with it; `dst`'s padding slots hold no client (weight 0)."""
    order = np.zeros(dst.n_slots, np.int64)  # dst slot -> the src slot whose tokens it takes
    real = np.zeros(dst.n_slots, bool)
    for f in range(src.leaf.size):
        order[dst.leaf_slots(f)] = src.leaf_slots(f)
        real[dst.leaf_slots(f)] = True
    tokens = np.take(np.asarray(batch.tokens), order, axis=-4)
    client = np.where(real, np.take(np.asarray(batch.slot_client), order, axis=-1), -1).astype(np.int32)
    weight = np.where(real, np.take(np.asarray(batch.slot_weight), order, axis=-1), 0.0).astype(np.float32)
    return engine.RoundBatch(tokens, client, weight)


def round_temporaries(layout: str, n_devices: int, width: int = 16, n_feds: int = 64) -> int:
    """XLA's per-device temporaries of one compiled HierFAVG round on a tree of
    `n_feds` federations of 2 clients, a toy model `width` wide."""
    import jax.numpy as jnp
    t = tree([2] * n_feds, layout, devices=n_devices)
    mesh = parallel.make_mesh(n_devices)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    params = {"embed": 0.1 * jax.random.normal(keys[0], (11, width)),
              "blocks/0/w": 0.1 * jax.random.normal(keys[1], (width, width)),
              "blocks/0/norm/scale": jnp.ones((width,)), "head_bias": jnp.zeros((11,))}
    run = engine.make_strategy(make_spec(t, strategies.averaging_plan(2), client_optimizer="adamw", mesh=mesh))
    state = run.init(params)
    b = to_device(make_batches(t, 1, seed=4)[0])
    placed = parallel.NamedSharding(mesh, parallel.P(*([None] * (b.tokens.ndim - 4)), parallel.AXIS))
    b = engine.RoundBatch(jax.device_put(b.tokens, placed),
                          *(jax.device_put(x, parallel.replicated(mesh)) for x in b[1:]))
    key = jax.device_put(jax.random.PRNGKey(0), parallel.replicated(mesh))
    return run.run_round.lower(state, b, key).compile().memory_analysis().temp_size_in_bytes


def test_per_device_temporaries_of_a_wide_tree_fall_with_the_device_count():
    # 64 federations: the spread layout's client step reads every federation's broadcast
    # on every device and all-reduces sums for every federation, so its temporaries fall
    # slower than the devices grow (measured 2.5x from 2 to 8 devices); federation-local,
    # a device holds its own federations' rows only (measured 3.8x for 4x the devices)
    local = {m: round_temporaries("local", m) for m in (2, 8)}
    spread_8 = round_temporaries("spread", 8)
    assert local[8] <= local[2] / 3
    assert local[8] <= 0.75 * spread_8


def test_auto_lays_slots_out_locally_where_no_device_idles_for_padding_rows():
    from worldlm_jax.config import ConfigError
    from worldlm_jax.run.blueprint import slot_layout
    # F divides M or M divides F: local; otherwise (padding rows would idle devices) spread
    assert [slot_layout("auto", F, M) for F, M in ((16, 8), (64, 64), (2, 8), (8, 8))] == ["local"] * 4
    assert [slot_layout("auto", F, M) for F, M in ((12, 8), (3, 8), (5, 1))] == ["spread"] * 3
    assert slot_layout("local", 12, 8) == "local" and slot_layout("spread", 16, 8) == "spread"
    with pytest.raises(ConfigError, match="run.slot_layout=local: 3 lowest federations on 8 devices"):
        slot_layout("local", 3, 8)
