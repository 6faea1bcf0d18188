"""Backbone B / key layers K: which parameters a federation keeps for itself.

WorldLM splits the model into a backbone B (aggregated up to the root, global)
and key layers K (localised per federation, aggregated with attention). This
module decides the split from parameter *paths* alone ('/'-joined, as produced by
model.py), so it needs no model object and works on real, stacked or abstract
(ShapeDtypeStruct) parameter dicts alike.

Path convention shared with model.py: transformer block l lives under
``blocks/<l>/``; per-block norms have a path segment ending in 'norm'
(``attn_norm``, ``mlp_norm``). Everything outside blocks (embeddings, learned
positions, final norm, tied head) is backbone unless a regex selects it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

_KINDS = ('last_fraction', 'first_fraction', 'blocks', 'regex', 'groups')
_AUTO = ('', 'probe')
_BLOCK_RE = re.compile(r'(?:^|/)blocks/(\d+)(?:/|$)')


@dataclasses.dataclass(frozen=True)
class KeyLayers:
    """Selects the key layers K. Default: the last ceil(0.3 * n_layers) blocks.

    kind:
      'last_fraction'  last ceil(fraction * n_layers) blocks (WorldLM default;
                       the top of the network is the most task/language specific).
      'first_fraction' first ceil(fraction * n_layers) blocks.
      'blocks'         the explicit block indices in `blocks`.
      'regex'          every path that `re.search`-matches one of `patterns`
                       (`include_block_norms` does not apply: patterns are explicit).
      'groups'         the parameter groups named in `groups` (`parameter_groups`:
                       block<l>_attn, block<l>_mlp, block<l>_other, embeddings),
                       each with its norms; what `split-search --probe` writes.
    include_block_norms: whether the selected blocks' LayerNorms are K too.
    auto: '' (the split above) or 'probe': `worldlm train` first runs `probe_rounds`
      rounds of HierFAVG (every group shared) in <workdir>/probe, ranks the parameter
      groups by how much their updates differ between federations relative to within
      them, and trains with the most divergent 30% localised (kind 'groups'; the
      choice is written into the run's config.yaml). The fields above are then
      replaced by the choice (`run.training.resolve_key_layers`).
    probe_rounds: the probe's rounds (auto: 'probe'); 0 = a tenth of run.rounds, at least 1.
    """

    kind: str = 'last_fraction'
    fraction: float = 0.3  # ~ a third of the blocks, as in the paper
    blocks: tuple[int, ...] = ()
    patterns: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    include_block_norms: bool = True
    auto: str = ''
    probe_rounds: int = 0

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f'KeyLayers.kind must be one of {_KINDS}, got {self.kind!r}.')
        if self.auto not in _AUTO:
            raise ValueError(f'KeyLayers.auto must be one of {_AUTO} ("" = the split as given), got {self.auto!r}.')
        if self.probe_rounds < 0:
            raise ValueError(f'KeyLayers.probe_rounds must be >= 0 (0 = a tenth of run.rounds), got '
                             f'{self.probe_rounds!r}.')
        if self.kind in ('last_fraction', 'first_fraction') and not 0 < self.fraction <= 1:
            raise ValueError(f'KeyLayers.fraction must be in (0, 1], got {self.fraction!r}.')
        # Lists from YAML/CLI become tuples so the selector stays hashable.
        object.__setattr__(self, 'blocks', tuple(self.blocks))
        object.__setattr__(self, 'patterns', tuple(self.patterns))
        object.__setattr__(self, 'groups', tuple(self.groups))
        if self.kind == 'groups' and not self.groups:
            raise ValueError('KeyLayers.kind="groups" needs a non-empty `groups` tuple, e.g. groups=("block1_attn",).')
        if self.kind == 'blocks' and not self.blocks:
            raise ValueError('KeyLayers.kind="blocks" needs a non-empty `blocks` tuple, e.g. blocks=(2,).')
        if self.kind == 'regex':
            if not self.patterns:
                raise ValueError('KeyLayers.kind="regex" needs a non-empty `patterns` tuple, '
                                 'e.g. patterns=(r"blocks/2/mlp",).')
            for p in self.patterns:
                try:
                    re.compile(p)
                except re.error as e:
                    raise ValueError(f'KeyLayers.patterns: invalid regex {p!r}: {e}.') from None


def block_index(path: str) -> int | None:
    """Transformer block index of a parameter path, or None outside the blocks."""
    m = _BLOCK_RE.search(path)
    return int(m.group(1)) if m else None


def key_blocks(selector: KeyLayers, n_layers: int) -> tuple[int, ...]:
    """The block indices a block-based selector picks (empty for 'regex')."""
    if selector.kind in ('regex', 'groups'):
        return ()
    if selector.kind == 'blocks':
        bad = sorted(b for b in selector.blocks if not 0 <= b < n_layers)
        if bad:
            raise ValueError(f'KeyLayers.blocks {bad} out of range for n_layers={n_layers} '
                             f'(valid indices 0..{n_layers - 1}).')
        return tuple(sorted(set(selector.blocks)))
    n = math.ceil(selector.fraction * n_layers - 1e-9)  # tolerate 0.3 * 10 = 3.0000000000000004
    n = max(1, min(n_layers, n))
    return tuple(range(n_layers - n, n_layers)) if selector.kind == 'last_fraction' else tuple(range(n))


def _is_norm(path: str) -> bool:
    return any(seg.endswith('norm') for seg in path.split('/'))


def key_layer_mask(param_paths: Iterable[str], selector: KeyLayers, n_layers: int) -> dict[str, bool]:
    """path -> True if the parameter is a key layer (K), False if backbone (B).

    Raises if K would be empty or the whole model: either makes WorldLM silently
    degenerate into plain FL or into purely local training.
    """
    paths = sorted(param_paths)
    if selector.kind == 'regex':
        regexes = [re.compile(p) for p in selector.patterns]
        mask = {p: any(r.search(p) for r in regexes) for p in paths}
    elif selector.kind == 'groups':
        groups = parameter_groups(paths)
        unknown = sorted(set(selector.groups) - set(groups.values()))
        if unknown:
            raise ValueError(f'KeyLayers.groups {unknown} name no parameter group of this model; its groups: '
                             f'{", ".join(sorted(set(groups.values())))}.')
        mask = {p: groups[p] in selector.groups for p in paths}
    else:
        chosen = set(key_blocks(selector, n_layers))
        mask = {p: block_index(p) in chosen and (selector.include_block_norms or not _is_norm(p))
                for p in paths}
    n_key = sum(mask.values())
    if n_key == 0 or n_key == len(paths):
        what = 'no parameter' if n_key == 0 else 'every parameter'
        raise ValueError(f'{selector} selects {what} as key layers (n_layers={n_layers}); K and B '
                         f'must both be non-empty. Example paths: {paths[:3] + paths[-3:]}.')
    return mask


def split(params: Mapping[str, Any], mask: Mapping[str, bool]) -> tuple[dict, dict]:
    """(backbone, key) sub-dicts of a flat params dict."""
    if set(params) != set(mask):
        missing = sorted(set(params) - set(mask))
        extra = sorted(set(mask) - set(params))
        raise ValueError(f'mask does not match params: paths without a mask entry {missing[:5]}, '
                         f'mask entries without a param {extra[:5]}. Rebuild the mask from these params.')
    backbone = {k: v for k, v in params.items() if not mask[k]}
    key = {k: v for k, v in params.items() if mask[k]}
    return backbone, key


def merge(backbone: Mapping[str, Any], key: Mapping[str, Any]) -> dict:
    """Inverse of `split`: one flat params dict."""
    overlap = sorted(set(backbone) & set(key))
    if overlap:
        raise ValueError(f'backbone and key share paths {overlap[:5]}; each parameter must be in '
                         f'exactly one of them (were they split with different masks?).')
    return {**backbone, **key}


def key_groups(key_paths: Iterable[str]) -> dict[str, int]:
    """K path -> dense group index; attention weights are computed per group.

    A group is one transformer block (all its leaves, as in WorldLM's per-layer
    attention); K paths outside blocks (regex selectors) are grouped by their
    top-level module. Groups are numbered blocks first (ascending), then modules
    alphabetically, so the numbering is deterministic.
    """
    def label(path: str) -> tuple[int, int | str]:
        b = block_index(path)
        return (0, b) if b is not None else (1, path.split('/')[0])

    paths = list(key_paths)
    labels = sorted({label(p) for p in paths})
    index = {lab: i for i, lab in enumerate(labels)}
    return {p: index[label(p)] for p in paths}


def parameter_groups(param_paths: Iterable[str]) -> dict[str, str]:
    """path -> the group a split may localise: ``block<l>_attn`` and ``block<l>_mlp``
    (each with its norm), ``block<l>_other`` for anything else in block l, and
    ``embeddings`` for everything outside the blocks (token and position embeddings,
    the tied head, the final norm)."""
    def group(path: str) -> str:
        b = block_index(path)
        if b is None:
            return 'embeddings'
        inner = path.split(f'blocks/{b}/', 1)[1]
        kind = 'attn' if inner.startswith('attn') else 'mlp' if inner.startswith('mlp') else 'other'
        return f'block{b}_{kind}'
    return {p: group(p) for p in param_paths}


def group_pattern(group: str) -> str:
    """A `regex` key-layer pattern selecting exactly the paths of `group` (parameter_groups)."""
    if group == 'embeddings':
        return r'^(?!blocks/)'
    m = re.fullmatch(r'block(\d+)_(attn|mlp|other)', group)
    if m is None:
        raise ValueError(f'unknown parameter group {group!r}; groups are block<l>_attn, block<l>_mlp, '
                         'block<l>_other and embeddings')
    block, kind = m.groups()
    return rf'^blocks/{block}/(?!attn|mlp)' if kind == 'other' else rf'^blocks/{block}/{kind}'


def describe(params: Mapping[str, Any], mask: Mapping[str, bool]) -> dict[str, Any]:
    """Parameter counts of B and K (pass per-model params, not tree-stacked ones)."""
    backbone, key = split(params, mask)
    n_backbone = sum(math.prod(v.shape) for v in backbone.values())
    n_key = sum(math.prod(v.shape) for v in key.values())
    key_paths = list(key)
    return {
        'n_backbone': n_backbone,
        'n_key': n_key,
        'fraction': n_key / max(1, n_key + n_backbone),
        'n_key_leaves': len(key_paths),
        'n_key_groups': len(set(key_groups(key_paths).values())),
        'key_blocks': sorted({b for b in map(block_index, key_paths) if b is not None}),
    }
