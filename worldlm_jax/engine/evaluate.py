"""Validation loss of the model each client would deploy.

Per client: the mean next-token NLL of its deployed parameters (WorldLM: root
backbone + its federation's key layers) on fixed validation windows. One
jitted function; clients are mapped in chunks and each chunk gathers its own
deployed parameters, so memory holds a chunk of models, not one per client.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from worldlm_jax.engine import parallel
from worldlm_jax.engine.plan import EngineSpec
from worldlm_jax.engine.state import EngineState, deployed_params


def make_evaluator(spec: EngineSpec, loss_fn, eval_tokens_CxNxBxL1: np.ndarray, deploy_index_C: np.ndarray,
                   chunk: int = 1):
    """Returns `evaluate(state) -> (C,) mean NLL per evaluated client`.

    `deploy_index_C[c]` is the engine client whose deployed model client c uses
    (the identity, or all zeros for the centralised baseline's single model).
    """
    tokens = jnp.asarray(eval_tokens_CxNxBxL1)
    index = jnp.asarray(deploy_index_C, jnp.int32)

    def one_client(state: EngineState, client: jax.Array, tokens_NxBxL1: jax.Array):
        params = jax.tree.map(lambda x: x[0], deployed_params(spec, state, client[None]))
        losses, _ = jax.lax.map(lambda t: loss_fn(params, t), tokens_NxBxL1)
        return jnp.mean(losses)

    def evaluate(state: EngineState):
        return jax.lax.map(lambda xs: one_client(state, *xs), (index, tokens), batch_size=chunk)

    # replicated: every process of a multi-process run can read the result
    return jax.jit(evaluate, out_shardings=None if spec.mesh is None else parallel.replicated(spec.mesh))
