"""What crosses an edge of the tree: messages through each federation's codecs.

A level-d federation's policy names the codec of each part (B, K) on its
edges, per direction (`codec_up`: its children's updates; `codec_down`: its
broadcast; `plugins.codecs`). Here, inside the compiled round:

    send_up      each child's update (rows N) -> what its federation decodes;
                 error feedback (what was not sent is added to the child's next
                 update) for the rows whose codec keeps it
    broadcast    each federation's parameters (rows P) -> what its children
                 decode: the copy they hold plus the decoded difference from it

A level traces each codec variant (a name and its arguments) its federations
use once and selects it per row; rows whose codec is `none` pass their message
through untouched, so a tree of `none` codecs runs today's round bit for bit
(and neither keeps nor splits anything). Codec variants are static: their
arguments shape the message.

How it composes: a DP federation clips and noises what it decodes of its
children's messages, so its release and its accounting are unchanged (a
codec is the child's own processing of its update, before the clip); what a DP
federation sends up is its release, and a codec of it is post-processing.
A NaN or diverged child is excluded by its weight and keeps its old error
feedback; absent, padding and unsampled rows keep theirs too; the buffers
are engine state, sharded like their level and checkpointed (a resumed run
continues them bit for bit); a vectorised sweep's points must agree on codecs
(`sweeps.vectorized` refuses others); several processes hold the rows of the
state they hold today.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from worldlm_jax import tree_ops
from worldlm_jax.engine.plan import PARTS, Params
from worldlm_jax.plugins import codecs
from worldlm_jax.tree.topology import Topology


class PartCodecs(NamedTuple):
    """One part's codecs on one direction of a level's edges."""

    variants: tuple  # ((name, ((arg, value), ...)), ...): each traced once
    choice: np.ndarray  # (n_d,) each federation's index into variants

    @property
    def lossless(self) -> bool:
        return all(name == "none" for name, _ in self.variants)

    @property
    def feedback(self) -> bool:
        return any(codecs.uses_feedback(v) for v in self.variants)

    @property
    def random(self) -> bool:
        return any(codecs.get(name).random for name, _ in self.variants)


def variant(policy, direction: str, part: str) -> tuple:
    name = policy.codec(direction, part)
    return name, tuple(sorted(codecs.resolved_args(name, policy.codec_args).items()))


def level_codecs(topology: Topology, d: int, direction: str, parts) -> dict:
    """{part: PartCodecs} of level d's edges in `direction` for `parts` (what the plan moves there)."""
    out = {}
    for part in parts:
        per_node = [variant(p, direction, part) for p in topology.levels[d].policies]
        variants = tuple(sorted(set(per_node)))
        out[part] = PartCodecs(variants, np.asarray([variants.index(v) for v in per_node], np.int32))
    return out


def needs_key(up: dict, down: dict) -> bool:
    return any(c.random for c in (*up.values(), *down.values()))


def _split_rows(key_N, n: int):
    """(N, n, ...) n keys of each row's key (None: no keys)."""
    return None if key_N is None else jax.vmap(lambda k: jax.random.split(k, n))(key_N)


def _roundtrip_rows(part: PartCodecs, choice_N, message_N: Params, key_N) -> Params:
    """What each row's receiver decodes of its message (rows whose codec is none:
    the message). A random codec draws each leaf's key from its row's key, so
    what a row decodes depends on its own key only (not on how rows are chunked)."""
    out, paths = message_N, sorted(message_N)
    variant_keys = _split_rows(key_N, len(part.variants)) if part.random else None
    for k, (name, args) in enumerate(part.variants):
        if name == "none":
            continue
        codec, args_ = codecs.get(name), dict(args)
        if codec.random:
            leaf_keys = _split_rows(variant_keys[:, k], len(paths))
            decoded = {p: jax.vmap(lambda x, kk: codec.roundtrip(x, kk, args_))(message_N[p], leaf_keys[:, i])
                       for i, p in enumerate(paths)}
        else:
            decoded = {p: jax.vmap(lambda x: codec.roundtrip(x, None, args_))(message_N[p]) for p in paths}
        out = tree_ops.where_rows(choice_N == k, decoded, out)
    return out


def send_up(codecs_: dict, delta_N: dict, error_N: dict, parent_N, key_N) -> tuple[dict, dict]:
    """({part: decoded update}, {part: new error feedback}) of N children's
    updates `delta_N` ({part: Params}, the parts the level aggregates), each
    through its federation's up codec (`parent_N`); `error_N` is the children's
    error feedback ({part: Params}, {} where no codec of the part keeps one) and
    `key_N` their keys (None: no codec of the level draws). The new error is the
    update plus the old error minus what was decoded; the caller keeps it only
    for children that took part."""
    sent, error = dict(delta_N), {}
    part_keys = _split_rows(key_N, len(PARTS))
    for j, (part, message) in enumerate(sorted(delta_N.items())):
        part_codecs = codecs_.get(part)
        if not message or part_codecs is None or part_codecs.lossless:
            continue
        choice_N = jnp.asarray(part_codecs.choice)[parent_N]
        if part_codecs.feedback:
            keeps_N = jnp.asarray([codecs.uses_feedback(v) for v in part_codecs.variants])[choice_N]
            message = tree_ops.add(message, tree_ops.where_rows(keeps_N, error_N[part],
                                                                jax.tree.map(jnp.zeros_like, error_N[part])))
        sent[part] = _roundtrip_rows(part_codecs, choice_N, message,
                                     None if part_keys is None else part_keys[:, j])
        if part_codecs.feedback:
            error[part] = tree_ops.where_rows(keeps_N, tree_ops.sub(message, sent[part]),
                                              jax.tree.map(jnp.zeros_like, error_N[part]))
    return sent, error


def broadcast(codecs_: dict, value_P: dict, copy_P: dict, key_P) -> tuple[dict, dict]:
    """({part: what the children decode}, {part: the copy they now hold}) of each
    federation's parameters `value_P` ({part: Params}): through a lossy codec the
    message is the difference from the copy the children hold (`copy_P`), which
    then moves by what was decoded; through `none`, the parameters themselves."""
    sent, copy = dict(value_P), {}
    part_keys = _split_rows(key_P, len(PARTS))
    for j, (part, value) in enumerate(sorted(value_P.items())):
        part_codecs = codecs_.get(part)
        if not value or part_codecs is None or part_codecs.lossless:
            continue
        choice_P = jnp.asarray(part_codecs.choice)
        difference = _roundtrip_rows(part_codecs, choice_P, tree_ops.sub(value, copy_P[part]),
                                     None if part_keys is None else part_keys[:, j])
        lossy_P = jnp.asarray([name != "none" for name, _ in part_codecs.variants])[choice_P]
        sent[part] = tree_ops.where_rows(lossy_P, tree_ops.add(copy_P[part], difference), value)
        copy[part] = sent[part]
    return sent, copy


def broadcast_level(codecs_: dict, parts, lvl, active_P, keys_P):
    """(the level's state with the copies its children now hold, {part: what each
    federation broadcasts, as its children decode it}) of the `parts` a level
    broadcasts (`lvl`: its LevelState; a federation that did not run sent nothing)."""
    value_P = {part: getattr(lvl, part) for part in PARTS if part in parts}
    sent_P, copy_P = broadcast(codecs_, value_P, lvl.down_copy, keys_P)
    if copy_P:
        lvl = lvl._replace(down_copy={**lvl.down_copy, **{
            part: tree_ops.where_rows(active_P, c, lvl.down_copy[part]) for part, c in copy_P.items()}})
    return lvl, sent_P


def row_keys(key, rows: int):
    """(rows,) keys of one level's rows for its codecs, or None where no codec draws."""
    return None if key is None else jax.random.split(key, rows)


def lossy_parts(codecs_: dict) -> frozenset:
    return frozenset(part for part, c in codecs_.items() if not c.lossless)


def init_error(codecs_: dict, parts: dict, rows: int) -> dict:
    """{part: zeros with `rows` rows} for the parts whose up codecs keep error feedback."""
    return {part: jax.tree.map(lambda x: jnp.zeros((rows,) + x.shape, x.dtype), parts[part])
            for part, c in codecs_.items() if c.feedback and parts[part]}


def init_copy(codecs_: dict, parts: dict, rows: int) -> dict:
    """{part: the initial parameters per federation} for the parts broadcast through a lossy codec
    (every child starts from the run's initial model)."""
    return {part: tree_ops.stack_rows(parts[part], rows) for part, c in codecs_.items()
            if not c.lossless and parts[part]}
