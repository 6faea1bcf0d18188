"""Many runs of one config: a grid of separate runs, or one vmapped program.

    grid         `key=v1,v2` axes -> one run dir per point (resumable), sweep.md
    vectorized   the points batched along a sweep axis of one compiled round
    split_search one run per candidate key-layer split, ranked by perplexity and bytes

The names below are stable; the modules' other names are not.
"""
from worldlm_jax.sweeps.grid import run_sweep, run_vectorized
from worldlm_jax.sweeps.vectorized import run

__all__ = ["run_sweep", "run_vectorized", "run"]
