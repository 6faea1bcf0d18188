"""Streaming DiLoCo's fragments: a federation of federations that sets
`sync_fragments: P` syncs its backbone in P fragments of blocks, one fragment
per round in turn; between its syncs a fragment stays as each child federation
trains it (a child holds its own backbone: federations keep their state).

    fragment_of      block l -> fragment l mod P (strided, as Streaming DiLoCo
                     interleaves them); parameters outside the blocks (embeddings,
                     the final norm) -> fragment 0
    synced           {B path: (P,) bool}: what each federation syncs this round, from
                     its round ordinal (its rounds counted over the run, `round.fed_round`)
    where_synced     the broadcast, the children's deltas and the new backbone: a fragment
                     moves only in its turn
    in_turn          the same over {part: Params} (B only): the down copies
    send_up_in_turn  the upload through the codecs, for the fragment in turn only
    keep_unsynced    the server optimizer's state of the other fragments stays as it was
                     (momentum and moments are per fragment, as in Streaming DiLoCo)

How it composes: DP clips and noises the synced fragment's deltas (the others
are zeros and leave nothing); stacked and streamed aggregators see zeros
outside the fragment; codecs on B compress the fragment in turn
(`send_up_in_turn`): a fragment out of turn sends nothing up and keeps its
error feedback for its next turn, and the children's copy of it (a lossy
broadcast's reference) does not move; K, residuals and attention are
untouched; a leaf federation's clients keep no backbone between rounds, so the
field does nothing there, and a tree where it would do nothing anywhere is
refused. The compiled round changes only at levels that set it.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from worldlm_jax import tree_ops
from worldlm_jax.engine.plan import EngineSpec

__all__ = ["levels", "check", "fragment_of", "synced", "where_synced", "in_turn", "send_up_in_turn", "keep_unsynced"]


def levels(spec: EngineSpec) -> tuple[bool, ...]:
    """Per level: some federation of federations there syncs its backbone in fragments."""
    topo, plan = spec.topology, spec.plan
    return tuple(d < topo.depth - 1 and "B" in plan.aggregate[d] and "B" in plan.broadcast[d]
                 and any(p.sync_fragments > 1 for p in lvl.policies) for d, lvl in enumerate(topo.levels))


def check(spec: EngineSpec) -> None:
    """Refuse what fragments do not compose with (one line, naming the federation)."""
    topo = spec.topology
    where_set = [(d, n, p) for d, lvl in enumerate(topo.levels) for n, p in zip(lvl.names, lvl.policies)
                 if p.sync_fragments > 1]
    if not where_set:
        return
    active = levels(spec)
    if not any(active):
        d, name, p = where_set[0]
        raise ValueError(f"federation {name!r}: policy field 'sync_fragments' = {p.sync_fragments} does nothing "
                         "here: fragments sync the backbone a federation of federations shares with its child "
                         "federations (leaf federations' clients keep no backbone between rounds); set it on "
                         "such a federation, under a strategy that shares B there")
    blocks = sorted({b for path, b in spec.param_blocks.items() if path not in spec.key_paths})
    for d, name, p in where_set:
        if not active[d]:
            continue
        empty = [k for k in range(p.sync_fragments) if not any(b % p.sync_fragments == k for b in blocks)]
        if empty:
            most = max((n for n in range(1, len(blocks) + 1) if {b % n for b in blocks} == set(range(n))), default=1)
            raise ValueError(f"federation {name!r}: policy field 'sync_fragments' = {p.sync_fragments} leaves "
                             f"fragment(s) {empty} without a backbone block (the backbone's blocks: "
                             f"{', '.join(map(str, blocks)) or 'none'}): expected 1..{most}")


def fragment_of(block, fragments_P):
    """The fragment a block belongs to under P fragments (block < 0: outside the blocks -> 0)."""
    return jnp.where(block >= 0, jnp.asarray(block) % fragments_P, 0)


def synced(param_blocks: Mapping[str, int], paths, fragments_P, ordinal_P) -> dict:
    """{path: (P,) bool}: whether each federation syncs `path` in its round `ordinal_P`."""
    turn = ordinal_P % fragments_P
    return {path: fragment_of(param_blocks.get(path, -1), fragments_P) == turn for path in paths}


def where_synced(synced_P: dict, new: dict, old: dict) -> dict:
    """Leaf by leaf: rows whose federation syncs the leaf take `new`, the others keep `old`
    (`synced_P` indexed by row: gather it to the children first)."""
    return {path: tree_ops.where_rows(synced_P[path], new[path], old[path]) if path in synced_P else new[path]
            for path in new}


def in_turn(synced: dict, new: dict, old: dict) -> dict:
    """{part: Params} with B's fragments out of turn as in `old` (other parts as in `new`)."""
    return {**new, "B": where_synced(synced, new["B"], old["B"])} if "B" in new else new


def send_up_in_turn(send_up, synced_N: dict, delta_N: dict, error_N: dict) -> tuple[dict, dict]:
    """`send_up(delta, error) -> (decoded, new error)` (`links.send_up`) for the fragment
    in turn only: a fragment out of turn sends zeros and its error feedback waits for
    its next turn (it enters no message, so no codec spends bytes or changes it)."""
    zeros = {part: jax.tree.map(jnp.zeros_like, tree) for part, tree in {**delta_N, **error_N}.items()}
    decoded, error = send_up(in_turn(synced_N, delta_N, zeros), in_turn(synced_N, error_N, zeros))
    return in_turn(synced_N, decoded, zeros), in_turn(synced_N, error, error_N)


def keep_unsynced(synced_P: dict, new_state, old_state):
    """The server optimizer's state: a leaf that belongs to a parameter path (its
    momentum, its moments) moves only in that path's turn; the rest (step counts) moves."""
    def select(key_path, new, old):
        for entry in key_path:
            if isinstance(entry, jax.tree_util.DictKey) and entry.key in synced_P:
                return jnp.where(tree_ops.expand_rows(synced_P[entry.key], new), new, old)
        return new

    return jax.tree_util.tree_map_with_path(select, new_state, old_state)
