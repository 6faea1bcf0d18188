"""Backbone / key-layer partition: selectors, errors, split/merge, groups, counts."""

import math

import jax
import pytest

from worldlm_jax.model import lm as M, partition as P

# Shapes only: the partition never needs real values.
_, PARAMS10 = M.abstract_init(M.preset('tiny', n_layers=10))
_, PARAMS3 = M.abstract_init(M.preset('small'))


def _key_blocks(mask):
    return sorted({P.block_index(k) for k, v in mask.items() if v})


def test_default_selects_last_ceil_30_percent_of_blocks_only():
    for n_layers, params in [(10, PARAMS10), (3, PARAMS3)]:
        mask = P.key_layer_mask(params, P.KeyLayers(), n_layers)
        n_key = math.ceil(0.3 * n_layers - 1e-9)
        assert _key_blocks(mask) == list(range(n_layers - n_key, n_layers))
        for path, is_key in mask.items():
            b = P.block_index(path)
            assert is_key == (b is not None and b >= n_layers - n_key), path
        # Embeddings, positions, final norm are backbone; key blocks include their norms.
        for path in ('embed/embedding', 'pos_embed/embedding', 'final_norm/scale'):
            assert not mask[path]
        assert mask[f'blocks/{n_layers - 1}/attn_norm/scale']


def test_first_fraction_and_explicit_blocks():
    first = P.key_layer_mask(PARAMS10, P.KeyLayers('first_fraction', fraction=0.2), 10)
    assert _key_blocks(first) == [0, 1]
    explicit = P.key_layer_mask(PARAMS10, P.KeyLayers('blocks', blocks=[7, 2]), 10)
    assert _key_blocks(explicit) == [2, 7]
    assert sum(explicit.values()) == 2 * sum(1 for k in PARAMS10 if k.startswith('blocks/2/'))


def test_excluding_block_norms():
    mask = P.key_layer_mask(PARAMS3, P.KeyLayers(include_block_norms=False), 3)
    assert not mask['blocks/2/attn_norm/scale'] and not mask['blocks/2/mlp_norm/bias']
    assert mask['blocks/2/attn/qkv/kernel'] and mask['blocks/2/mlp/up/kernel']


def test_regex_selector():
    mask = P.key_layer_mask(PARAMS3, P.KeyLayers('regex', patterns=(r'blocks/2/mlp/', r'^final_norm/')), 3)
    assert sorted(k for k, v in mask.items() if v) == [
        'blocks/2/mlp/down/kernel', 'blocks/2/mlp/up/kernel', 'final_norm/bias', 'final_norm/scale']


def test_out_of_range_blocks_raise_naming_them():
    with pytest.raises(ValueError, match=r'\[3, 9\].*n_layers=3'):
        P.key_layer_mask(PARAMS3, P.KeyLayers('blocks', blocks=(0, 3, 9)), 3)


def test_nothing_or_everything_raises_with_examples():
    with pytest.raises(ValueError, match=r'no parameter.*embed/embedding'):
        P.key_layer_mask(PARAMS3, P.KeyLayers('regex', patterns=('nonexistent',)), 3)
    with pytest.raises(ValueError, match=r'every parameter.*Example paths'):
        P.key_layer_mask(PARAMS3, P.KeyLayers('regex', patterns=('.',)), 3)


def test_selector_validation():
    with pytest.raises(ValueError, match='kind'):
        P.KeyLayers('middle')
    with pytest.raises(ValueError, match='fraction'):
        P.KeyLayers(fraction=0.0)
    with pytest.raises(ValueError, match='patterns'):
        P.KeyLayers('regex')
    with pytest.raises(ValueError, match='invalid regex'):
        P.KeyLayers('regex', patterns=('(',))
    assert hash(P.KeyLayers('blocks', blocks=[1])) == hash(P.KeyLayers('blocks', blocks=(1,)))


def test_split_merge_round_trip_on_real_params():
    model_def, params = M.init(M.preset('tiny'), jax.random.key(0))
    mask = P.key_layer_mask(params, P.KeyLayers(), 2)
    backbone, key = P.split(params, mask)
    assert set(backbone).isdisjoint(key) and set(backbone) | set(key) == set(params)
    assert all(k.startswith('blocks/1/') for k in key)
    merged = P.merge(backbone, key)
    assert set(merged) == set(params)
    for k in params:
        assert merged[k] is params[k]
    jax.eval_shape(model_def.apply, merged, jax.numpy.zeros((1, 8), int))  # accepted by the model
    with pytest.raises(ValueError, match='share paths'):
        P.merge(backbone, {**key, 'embed/embedding': params['embed/embedding']})
    with pytest.raises(ValueError, match='mask does not match'):
        P.split(params, {k: v for k, v in mask.items() if k != 'final_norm/scale'})


def test_key_groups_one_dense_group_per_block():
    mask = P.key_layer_mask(PARAMS10, P.KeyLayers('blocks', blocks=(8, 3, 5)), 10)
    groups = P.key_groups(k for k, v in mask.items() if v)
    assert sorted(set(groups.values())) == [0, 1, 2]
    for path, g in groups.items():
        assert g == [3, 5, 8].index(P.block_index(path))
    regex_groups = P.key_groups(['final_norm/scale', 'blocks/4/mlp/up/kernel', 'final_norm/bias',
                                 'embed/embedding'])
    assert regex_groups == {'blocks/4/mlp/up/kernel': 0, 'embed/embedding': 1,
                            'final_norm/scale': 2, 'final_norm/bias': 2}


def test_describe_counts_add_up():
    mask = P.key_layer_mask(PARAMS3, P.KeyLayers(), 3)
    d = P.describe(PARAMS3, mask)
    total = M.count_params(M.preset('small'))
    assert d['n_backbone'] + d['n_key'] == total
    assert d['n_key'] == sum(math.prod(v.shape) for k, v in PARAMS3.items() if k.startswith('blocks/2/'))
    assert d['fraction'] == pytest.approx(d['n_key'] / total)
    assert d['key_blocks'] == [2] and d['n_key_groups'] == 1
