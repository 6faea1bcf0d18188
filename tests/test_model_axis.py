"""A model axis (8 fake CPU devices): every weight split over `model` devices.

A (clients 4 x model 2) mesh holds each weight in halves, in the stored state
and inside a client's step; XLA's partitioner gathers them where a matmul needs
them. It changes where numbers are added (a split contraction is summed in
parts), not what is computed: the round equals the 4-device round without a
model axis up to float32 summation order, in one compilation, and each device
stores half of every split weight.
"""
import jax
import numpy as np
import pytest

from engine_helpers import (POLICY, STEPS, TOY_KEY_PATHS, assert_close_up_to_summation_order, change, make_batches,
                            make_spec, summation_order_excess, to_device, topo, toy_params, toy_summands, toy_updates,
                            tree2, ulp_perturbed)
from worldlm_jax import engine
from worldlm_jax.engine import parallel, strategies

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake CPU) devices, see conftest.py")


def test_a_weight_is_split_along_its_largest_dimension_the_model_axis_divides():
    assert parallel.model_dim((768, 3072), 4) == 1 and parallel.model_dim((50304, 768), 8) == 0
    assert parallel.model_dim((6, 9), 4) is None and parallel.model_dim((768,), 4) is None  # vectors stay whole
    assert parallel.model_dim((768, 768), 1) is None
    assert parallel.model_spec((5, 768, 3072), 4, lead=("clients",)) == parallel.P("clients", None, "model")


def trained(mesh, t, batches, params):
    spec = make_spec(t, strategies.worldlm_plan(2), key_paths=TOY_KEY_PATHS, client_optimizer="adamw", mesh=mesh)
    run = engine.make_strategy(spec)
    state = run.init(params)
    initial = jax.tree.map(np.asarray, engine.unpad_state(spec, state))
    for r, b in enumerate(batches):
        state, metrics = run.run_round(state, to_device(b), jax.random.PRNGKey(r))
    assert run.run_round._cache_size() == 1  # one compilation for every round
    return state, jax.tree.map(np.asarray, (engine.unpad_state(spec, state), metrics)), initial


@pytest.mark.parametrize("layout,dp", [("local", False), ("spread", False), ("local", True)],
                         ids=["local", "spread", "local-under-dp"])
def test_a_model_axis_of_2_by_4_equals_no_model_axis(layout, dp):
    # (under DP the clip norms are summed over the split weights' shards, and the noise,
    # drawn from the same keys, does not depend on how the arrays are laid out)
    sizes = [2, 3, 1, 2]
    private = {"dp_clip": 0.05, "dp_noise_multiplier": 0.5} if dp else {}  # clips every update
    spec = tree2(sizes, root_policy=dict(POLICY, client_lr=0.5, tau=0.5),
                 fed_policies=[{"server_optimizer": "adam", "server_lr": 0.1, **private}] * len(sizes))
    t = topo(spec, slot_multiple=4).with_slot_layout(layout)
    batches = make_batches(t, 2, seed=5)
    _, (want, m_want), initial = trained(parallel.make_mesh(4), t, batches, toy_params())
    _, (noisy, _), _ = trained(parallel.make_mesh(4), t, batches, ulp_perturbed(toy_params()))
    stored, (got, m_got), _ = trained(parallel.make_mesh(8, model=2), t, batches, toy_params())

    # the same sums in parts (a contraction split over the model axis), within float32
    # summation order plus ten times what one rounding of the inputs grows into
    n = toy_summands(2, STEPS, children=max(sizes) + len(sizes))
    bound = dict(values=jax.tree.map(np.abs, want), n_updates=toy_updates(2, STEPS, levels=2),
                 sensitivity=change(noisy, want))
    assert_close_up_to_summation_order(got, want, change(want, initial), n, **bound, err="state")
    assert_close_up_to_summation_order(m_got, m_want, jax.tree.map(np.abs, m_want), n, err="metrics")
    # the bound is no blanket: two federations' rows swapped exceed it
    swapped = got._replace(levels=(got.levels[0], jax.tree.map(lambda x: x[[1, 0, 2, 3]] if x.ndim else x,
                                                               got.levels[1])))
    assert summation_order_excess(swapped, want, change(want, initial), n, **bound)[0] > 100

    # stored split: a device holds half of each matrix of every federation row it holds
    w = stored.levels[1].K["blocks/0/w"]
    assert w.sharding.spec == parallel.P("clients", None, "model")
    assert w.addressable_shards[0].data.shape == (w.shape[0] // 4, w.shape[1], w.shape[2] // 2)


def round_bytes(mesh, width: int = 256) -> int:
    """XLA's bytes per device (arguments + outputs - aliased + temporaries) of one
    compiled WorldLM round: 4 federations x 2 clients, one slot per `clients`
    device, a toy model `width` wide."""
    import jax.numpy as jnp
    t = topo(tree2([2] * 4, root_policy=POLICY), slot_multiple=4).with_slot_layout("local")
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    params = {"embed": 0.1 * jax.random.normal(keys[0], (11, width)),
              "blocks/0/w": 0.1 * jax.random.normal(keys[1], (width, width)),
              "blocks/0/norm/scale": jnp.ones((width,)), "head_bias": jnp.zeros((11,))}
    run = engine.make_strategy(make_spec(t, strategies.worldlm_plan(2), key_paths=TOY_KEY_PATHS,
                                         client_optimizer="adamw", mesh=mesh))
    b = to_device(make_batches(t, 1, seed=4)[0])
    stats = run.run_round.lower(run.init(params), b, jax.random.PRNGKey(0)).compile().memory_analysis()
    return stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + \
        stats.temp_size_in_bytes


def test_a_model_axis_of_2_halves_what_a_device_holds_for_the_same_slots():
    # the same 4 `clients` devices, one slot each; a model axis of 2 splits every matrix
    # (state, the client's weights, gradients and Adam moments) and the client's batch
    # (measured: 0.50 of the bytes; the vectors and the batch's integers stay whole)
    assert round_bytes(parallel.make_mesh(8, model=2)) <= 0.6 * round_bytes(parallel.make_mesh(4))
