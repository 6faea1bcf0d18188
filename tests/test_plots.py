"""Plots: one real PNG per call, clear errors on malformed input."""
import os

import matplotlib.image
import numpy as np
import pytest

from worldlm_jax.outputs.plots import plot_attention, plot_methods, plot_perplexity

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path, tmp_path):
    """A decodable PNG with varied pixels, and the only file written."""
    assert os.listdir(tmp_path) == [os.path.basename(path)]
    assert open(path, "rb").read(8) == PNG_MAGIC
    assert os.path.getsize(path) > 5_000
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert pixels.std() > 0.05  # not a blank canvas


def test_plot_perplexity(tmp_path):
    records = [{"round": r, "loss": 1.0,
                "eval": {"per_federation": {"en": 50.0 / (r + 1), "de": 60.0 / (r + 1)},
                         "perplexity": 55.0 / (r + 1)}} for r in range(5)]
    records.insert(2, {"round": 99, "loss": 2.0})  # an un-evaluated round is skipped
    out = tmp_path / "ppl.png"
    assert plot_perplexity(records, out) == str(out)
    assert_png(out, tmp_path)


def test_plot_perplexity_without_eval_raises(tmp_path):
    with pytest.raises(ValueError, match="no record has an 'eval' entry"):
        plot_perplexity([{"round": 0, "loss": 1.0}], tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


def test_plot_attention_dict_and_array(tmp_path):
    weights = {"root": [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]],
               "eu": np.array([[0.5, 0.5], [0.25, 0.75]])}
    labels = {"root": ["en", "de", "fr"], "eu": (["de", "fr"], ["de", "fr"])}
    out = plot_attention(weights, labels, tmp_path / "attn.png")
    assert_png(out, tmp_path)
    os.remove(out)
    out = plot_attention(np.full((2, 3), 1 / 3), (["a", "b"], ["a", "b", "residual"]),
                         tmp_path / "one.png")
    assert_png(out, tmp_path)


@pytest.mark.parametrize("weights, labels, match", [
    ([0.5, 0.5], ["a", "b"], r"shape \(2,\); expected a 2-D"),
    ([[0.5, 0.5], [1.0]], ["a", "b"], "not a numeric matrix"),
    ([[0.5, 0.5], [0.5, 0.5]], ["a", "b", "c"], r"shape \(2, 2\) but labels give 3 rows"),
])
def test_plot_attention_bad_input(tmp_path, weights, labels, match):
    with pytest.raises(ValueError, match=match):
        plot_attention(weights, labels, tmp_path / "x.png")
    assert os.listdir(tmp_path) == []


def test_plot_methods(tmp_path):
    results = {"worldlm": [(r, 40.0 - r) for r in range(10)],
               "fedavg": [(r, 45.0 - r) for r in range(10)],
               "local": [(0, 60.0), (5, 50.0), (9, 48.0)]}
    out = plot_methods(results, tmp_path / "sub" / "methods.png")
    assert os.path.exists(out) and os.path.getsize(out) > 5_000
    assert_png(out, tmp_path / "sub")


def test_plot_methods_bad_points(tmp_path):
    with pytest.raises(ValueError, match=r"results\['fedavg'\] has shape \(3,\)"):
        plot_methods({"fedavg": [1.0, 2.0, 3.0]}, tmp_path / "x.png")
