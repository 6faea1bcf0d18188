"""A vectorised sweep is one compiled program and equals separate runs."""
import numpy as np
import pytest

from worldlm_jax import configs, train, vectorized
from worldlm_jax.config import apply_overrides


def test_four_learning_rates_in_one_program_equal_separate_runs(tmp_path):
    base = apply_overrides(configs.tiny(), ["run.rounds=2", "algorithm.name=worldlm"])
    points = [apply_overrides(base, [f"policy.client_lr={lr}"]) for lr in (3e-4, 1e-3, 3e-3, 1e-2)]
    evals, _, compiles = vectorized.run(points)
    assert compiles == 1
    separate = [train.train(c, str(tmp_path / f"p{i}"), quiet=True)["eval"] for i, c in enumerate(points)]
    for vec, sep in zip(evals, separate):
        np.testing.assert_allclose(vec["perplexity"], sep["perplexity"], rtol=2e-4)  # vmapped matmuls accumulate in another order
        for name in sep["per_federation"]:
            np.testing.assert_allclose(vec["per_federation"][name], sep["per_federation"][name], rtol=2e-4)  # vmapped matmuls accumulate in another order
    # the points really differ: the sweep is not four copies of one run
    assert len({round(e["perplexity"], 3) for e in evals}) == 4


def test_sweep_rejects_points_that_change_shapes():
    base = configs.tiny()
    with pytest.raises(ValueError, match="differ only"):
        vectorized.check_static([base, apply_overrides(base, ["data.batch_size=3"])])


def test_sweep_rejects_points_that_change_the_key_layer_rule():
    """k_agg decides whether the compiled round keeps every client's K (attention)
    or streams their mean, so one program cannot serve both."""
    base = apply_overrides(configs.tiny(), ["run.rounds=1", "algorithm.name=worldlm"])
    with pytest.raises(ValueError, match="k_agg"):
        vectorized.run([base, apply_overrides(base, ["policy.k_agg=mean"])])
