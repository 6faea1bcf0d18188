"""Which part of its backbone a federation of federations syncs in a round, and
the rest waits: a federation's child federations hold their own backbone, so
between its syncs a part stays as each child trains it. Two rules, combined
(a part syncs when both say so):

- fragments (`sync_fragments: P`, Streaming DiLoCo): the blocks in P strided
  fragments (block l in fragment l mod P; the parameters outside the blocks,
  embeddings and the final norm, in fragment 0); the federation's n-th round
  over the run syncs fragment n mod P;
- intervals (`sync_every: {group: s}`, FedLAMA): a parameter group
  (`partition.parameter_groups`: block<l>_attn, block<l>_mlp, block<l>_other,
  embeddings) syncs in the rounds n with n mod s = 0; groups not named, every round.

    is_partial       a policy syncs part of its backbone a round
    syncs_at         the rule itself, host-side: does a leaf sync in round n (the byte count)
    levels           per level: some federation syncs part of its backbone
    check            what does not compose, refused with one line
    synced           {B path: (P,) bool}: what each federation syncs this round, from its
                     round ordinal (its rounds counted over the run, `round.fed_round`)
    where_synced     the broadcast, the children's deltas and the new backbone: a part
                     moves only in its turn
    in_turn          the same over {part: Params} (B only): the down copies
    send_up_in_turn  the upload through the codecs, for the part in turn only
    keep_unsynced    the server optimizer's state of the other parts stays as it was
                     (momentum and moments per part, as in Streaming DiLoCo)

How it composes: DP clips and noises the synced part's deltas (the others are
zeros and leave nothing); stacked and streamed aggregators see zeros outside
it; codecs on B compress the part in turn (`send_up_in_turn`): a part out of
turn sends nothing up and keeps its error feedback for its next turn, and the
children's copy of it (a lossy broadcast's reference) does not move; K,
residuals and attention are untouched; a leaf federation's clients keep no
backbone between rounds, so the fields do nothing there, and a tree where they
would do nothing anywhere is refused. The compiled round changes only at levels
that set them.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from worldlm_jax import tree_ops
from worldlm_jax.engine.plan import EngineSpec

__all__ = ["is_partial", "syncs_at", "levels", "check", "fragment_of", "synced", "where_synced", "in_turn",
           "send_up_in_turn", "keep_unsynced"]


def is_partial(policy) -> bool:
    return policy.sync_fragments > 1 or any(s > 1 for s in policy.sync_every.values())


def syncs_at(policy, block: int, group: str, n: int) -> bool:
    """Whether a backbone leaf of `block` (-1: outside the blocks) and `group` syncs in
    round `n` of a federation with `policy`: `synced`'s rule, on the host."""
    fragment = block % policy.sync_fragments if block >= 0 else 0
    return fragment == n % policy.sync_fragments and n % policy.sync_every.get(group, 1) == 0


def levels(spec: EngineSpec) -> tuple[bool, ...]:
    """Per level: some federation of federations there syncs part of its backbone."""
    topo, plan = spec.topology, spec.plan
    return tuple(d < topo.depth - 1 and "B" in plan.aggregate[d] and "B" in plan.broadcast[d]
                 and any(is_partial(p) for p in lvl.policies) for d, lvl in enumerate(topo.levels))


def check(spec: EngineSpec) -> None:
    """Refuse what partial syncs do not compose with (one line, naming the federation)."""
    topo = spec.topology
    where_set = [(d, n, p) for d, lvl in enumerate(topo.levels) for n, p in zip(lvl.names, lvl.policies)
                 if is_partial(p)]
    if not where_set:
        return
    active = levels(spec)
    if not any(active):
        d, name, p = where_set[0]
        field, value = ("sync_fragments", p.sync_fragments) if p.sync_fragments > 1 else ("sync_every",
                                                                                          dict(p.sync_every))
        raise ValueError(f"federation {name!r}: policy field '{field}' = {value} does nothing here: it syncs "
                         "part of the backbone a federation of federations shares with its child federations "
                         "(leaf federations' clients keep no backbone between rounds); set it on such a "
                         "federation, under a strategy that shares B there")
    blocks = sorted({b for path, b in spec.param_blocks.items() if path not in spec.key_paths})
    groups = sorted({g for path, g in spec.param_groups.items() if path not in spec.key_paths})
    for d, name, p in where_set:
        if not active[d]:
            continue
        empty = [k for k in range(p.sync_fragments) if not any(b % p.sync_fragments == k for b in blocks)]
        if empty:
            most = max((n for n in range(1, len(blocks) + 1) if {b % n for b in blocks} == set(range(n))), default=1)
            raise ValueError(f"federation {name!r}: policy field 'sync_fragments' = {p.sync_fragments} leaves "
                             f"fragment(s) {empty} without a backbone block (the backbone's blocks: "
                             f"{', '.join(map(str, blocks)) or 'none'}): expected 1..{most}")
        unknown = sorted(set(p.sync_every) - set(groups))
        if unknown:
            raise ValueError(f"federation {name!r}: policy field 'sync_every' names {unknown}, which are no "
                             f"parameter group of the backbone; its groups: {', '.join(groups) or 'none'} "
                             "(key layers are never synced)")


def fragment_of(block, fragments_P):
    """The fragment a block belongs to under P fragments (block < 0: outside the blocks -> 0)."""
    return jnp.where(block >= 0, jnp.asarray(block) % fragments_P, 0)


def synced(spec: EngineSpec, paths, fragments_P, every_P: Mapping[str, jax.Array], ordinal_P) -> dict:
    """{path: (P,) bool}: whether each federation syncs `path` in its round `ordinal_P`:
    its fragment is in turn, and its group's interval (`every_P[group]`, (P,)) divides
    the round."""
    turn = ordinal_P % fragments_P
    out = {}
    for path in paths:
        now = fragment_of(spec.param_blocks.get(path, -1), fragments_P) == turn
        every = every_P.get(spec.param_groups.get(path))
        out[path] = now if every is None else now & (ordinal_P % every == 0)
    return out


def where_synced(synced_P: dict, new: dict, old: dict) -> dict:
    """Leaf by leaf: rows whose federation syncs the leaf take `new`, the others keep `old`
    (`synced_P` indexed by row: gather it to the children first)."""
    return {path: tree_ops.where_rows(synced_P[path], new[path], old[path]) if path in synced_P else new[path]
            for path in new}


def in_turn(synced: dict, new: dict, old: dict) -> dict:
    """{part: Params} with B's leaves out of turn as in `old` (other parts as in `new`)."""
    return {**new, "B": where_synced(synced, new["B"], old["B"])} if "B" in new else new


def send_up_in_turn(send_up, synced_N: dict, delta_N: dict, error_N: dict) -> tuple[dict, dict]:
    """`send_up(delta, error) -> (decoded, new error)` (`links.send_up`) for the part in
    turn only: a leaf out of turn sends zeros and its error feedback waits for its next
    turn (it enters no message, so no codec spends bytes on it or changes it)."""
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
