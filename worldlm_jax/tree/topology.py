"""The federation tree, compiled once into flat static arrays.

A tree spec (a dict, usually from YAML) names federations, their children and
their policies. Every federation is autonomous: its policy (`policy.Policy`) is
its own, and a field it leaves out is inherited from its parent.

Design decision (improving on "the tree is a padded array shape"): each level
of the tree is a flat axis of nodes plus a `parent` index into the level above.
Aggregating up one level is then a segment reduction, broadcasting down is a
gather. Ragged trees cost no padding, every level is handled by the same code,
and per-federation policies are plain arrays over a level's node axis. The only
padding left is the client-slot axis, rounded up to a multiple of the device
count so that clients shard evenly.

Levels: 0 is the root, D-1 the lowest federations ("leaf federations"), and
level D the clients. All leaf federations must sit at the same depth.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import numpy as np

from worldlm_jax.tree.policy import K_AGG_MODES, Policy, TopologyError, inherit_policy

__all__ = ["Topology", "Level", "build_topology", "SLOT_LAYOUTS", "federation_rows", "local_layout_fits"]

SLOT_LAYOUTS = ("spread", "local")


def federation_rows(n_federations: int, n_devices: int) -> tuple[int, int]:
    """(rows per device, devices per federation) of a federation-local layout:
    F >= M federations, padded to a multiple of the M devices, F_pad / M rows
    on each device (device j holds rows j*L .. j*L + L - 1); F < M federations
    dividing M, each on its own group of M / F consecutive devices (one row per
    device, its federation's). Raises where F < M does not divide M."""
    F, M = int(n_federations), int(n_devices)
    if F >= M:
        return -(-F // M), 1
    if M % F:
        raise TopologyError(f"{F} lowest federations on {M} devices: a federation-local slot layout needs at least "
                            f"as many federations as devices or a number that divides them; set "
                            f"run.slot_layout=spread, or run.devices to at most {F} or a multiple of it")
    return 1, M // F


def local_layout_fits(n_federations: int, n_devices: int) -> bool:
    """Whether `federation_rows` holds for this many federations and devices."""
    return n_federations >= n_devices or n_devices % n_federations == 0

NODE_FIELDS = ("name", "children", "clients", "sources", "split", "alpha", "policy", "own_policy")


@dataclasses.dataclass(frozen=True)
class Level:
    """Nodes of one federation level: names, parent index, policies as arrays."""

    names: tuple[str, ...]
    parent: np.ndarray  # (n,) index into the level above; -1 at the root
    policies: tuple[Policy, ...]

    @property
    def size(self) -> int:
        return len(self.names)

    def policy_array(self, field: str, dtype=np.float32) -> np.ndarray:
        values = [getattr(p, field) for p in self.policies]
        if field in ("clients_per_round", "federations_per_round"):
            values = [-1 if v is None else v for v in values]
        if field == "k_agg":
            values = [K_AGG_MODES.index(v) for v in values]
        return np.asarray(values, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class Topology:
    """A compiled federation tree: flat levels, clients, and client slots."""

    levels: tuple[Level, ...]  # levels[0] is the root
    client_names: tuple[str, ...]
    client_parent: np.ndarray  # (n_clients,) index into the leaf level
    client_sources: tuple[tuple[str, ...], ...]  # data sources of each client's federation
    client_weight: np.ndarray  # (n_clients,) data weight (tokens); set once data is loaded
    leaf_split: tuple[tuple[str, float], ...]  # per leaf federation: (split, alpha)
    slot_multiple: int = 1  # device blocks the slot axis is cut into (the mesh's device count)
    slot_layout: str = "spread"  # SLOT_LAYOUTS: how a leaf federation's slots sit on the device blocks

    # ---- sizes -------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Number of federation levels; clients are level `depth`."""
        return len(self.levels)

    @property
    def n_clients(self) -> int:
        return len(self.client_names)

    @property
    def leaf(self) -> Level:
        return self.levels[-1]

    def federations_sampled(self, level: int) -> np.ndarray:
        """(n_level,) child federations each node at an internal `level` lets take
        part per round (all of them where `federations_per_round` is unset)."""
        counts = self.children_count(level)
        k = self.levels[level].policy_array("federations_per_round", np.int64)
        return np.where(k > 0, np.minimum(k, counts), counts)

    def children_count(self, level: int) -> np.ndarray:
        """(n_level,) number of children of each node at `level`."""
        parent = self.client_parent if level == self.depth - 1 else self.levels[level + 1].parent
        return np.bincount(parent, minlength=self.levels[level].size)

    # ---- client slots: fixed-shape participation per round ------------------
    @property
    def slots_per_leaf(self) -> np.ndarray:
        """Slots each leaf federation fills per round: its clients per round."""
        counts = self.children_count(self.depth - 1)
        cpr = self.leaf.policy_array("clients_per_round", np.int64)
        sampling = [p.sampling for p in self.leaf.policies]
        per_round = np.where((cpr > 0) & (np.array(sampling) == "fixed"), np.minimum(cpr, counts), counts)
        return per_round.astype(np.int64)

    @functools.cached_property
    def _slot_layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(slot_parent, real, slot_row): the slots cut into `slot_multiple` equal
        device blocks, padding at the end of a block (a padding slot sits with its
        block's last federation, weight 0). `slot_row`: where the slot's
        federation sits among its block's federation rows (`federation_rows`).

        spread: each leaf federation's slots spread over all the blocks as evenly
        as possible (remainders rotating from one federation to the next),
        federation-major inside a block: every device holds a fair share of every
        federation, so sampling clients or federations thins all devices' work
        alike; a slot's row is its federation (every block sees every row).
        local: block j holds only the slots of the federations whose rows device
        j holds (`federation_rows`): the client step reads its federation's copy
        from the device's own rows and sums into them, nothing of the level is
        gathered; where a federation spans a group of devices its slots spread
        evenly over the group."""
        n_dev = max(self.slot_multiple, 1)
        counts = [int(m) for m in self.slots_per_leaf]
        blocks: list[list[int]] = [[] for _ in range(n_dev)]
        local = self.slot_layout == "local"
        rows_per_device, group = federation_rows(self.leaf.size, n_dev) if local else (self.leaf.size, 1)
        if local:
            for leaf, m in enumerate(counts):
                first = leaf * group if group > 1 else leaf // rows_per_device
                base, extra = divmod(m, group)
                for j in range(group):
                    blocks[first + j] += [leaf] * (base + (j < extra))
        else:
            first = 0
            for leaf, m in enumerate(counts):
                base, extra = divmod(m, n_dev)
                for j in range(n_dev):
                    blocks[(first + j) % n_dev] += [leaf] * (base + (j < extra))
                first = (first + extra) % n_dev
        size = max(len(b) for b in blocks)
        parent, real, row = [], [], []
        for j, b in enumerate(blocks):
            pad_parent = b[-1] if b else self._device_federation(j)
            parent += b + [pad_parent] * (size - len(b))
            real += [True] * len(b) + [False] * (size - len(b))
            if local:  # the device's own rows: its federation less its first row (0 in a group)
                own_row = lambda f: 0 if group > 1 else f - j * rows_per_device
                # (a device holding only padding rows points its padding slots at its first row)
                row += [own_row(f) for f in b] + [own_row(pad_parent) if b else 0] * (size - len(b))
            else:
                row += b + [pad_parent] * (size - len(b))
        arrays = tuple(np.asarray(a, dt) for a, dt in ((parent, np.int32), (real, bool), (row, np.int32)))
        for a in arrays:
            a.setflags(write=False)  # cached and shared: nobody may edit it in place
        return arrays

    @property
    def slot_parent(self) -> np.ndarray:
        """(S,) leaf federation of each slot (padding slots too: they weigh 0)."""
        return self._slot_layout[0]

    def _device_federation(self, j: int) -> int:
        """The federation whose row device block j holds first (`local`; the last
        federation where it holds only padding rows, or under `spread`)."""
        if self.slot_layout != "local":
            return self.leaf.size - 1
        rows_per_device, group = federation_rows(self.leaf.size, max(self.slot_multiple, 1))
        return min(j // group if group > 1 else j * rows_per_device, self.leaf.size - 1)

    @property
    def slot_row(self) -> np.ndarray:
        """(S,) the row of each slot's federation among its device block's
        federation rows: its federation under `spread`; under `local` an index
        into the device's own rows (`federation_rows`)."""
        return self._slot_layout[2]

    def leaf_slots(self, leaf: int) -> np.ndarray:
        """Positions of the (non-padding) slots of one leaf federation."""
        parent, real, _ = self._slot_layout
        return np.flatnonzero((parent == leaf) & real)

    @property
    def n_slots(self) -> int:
        return len(self.slot_parent)

    @property
    def padding_fraction(self) -> float:
        return 1.0 - float(self.slots_per_leaf.sum()) / self.n_slots

    # ---- weights -----------------------------------------------------------
    def node_weight(self, level: int) -> np.ndarray:
        """(n_level,) total data weight below each node."""
        weight = np.asarray(self.client_weight, np.float64)
        parent = self.client_parent
        for d in range(self.depth - 1, level - 1, -1):
            weight = np.bincount(parent, weights=weight, minlength=self.levels[d].size)
            parent = self.levels[d].parent
        return weight

    def with_client_weights(self, weights: Sequence[float]) -> "Topology":
        weights = np.asarray(weights, np.float64)
        if weights.shape != (self.n_clients,) or not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise TopologyError(f"client weights must be {self.n_clients} finite numbers >= 0, got shape {weights.shape}")
        return dataclasses.replace(self, client_weight=weights)

    def with_slot_multiple(self, multiple: int) -> "Topology":
        return dataclasses.replace(self, slot_multiple=int(multiple))

    def with_slot_layout(self, layout: str) -> "Topology":
        """The same tree with its slots laid out as `layout` (SLOT_LAYOUTS) on its
        `slot_multiple` device blocks; `local` needs `federation_rows` to hold."""
        if layout not in SLOT_LAYOUTS:
            raise TopologyError(f"slot layout {layout!r} is not one of {', '.join(SLOT_LAYOUTS)}")
        if layout == "local":
            federation_rows(self.leaf.size, max(self.slot_multiple, 1))
        return dataclasses.replace(self, slot_layout=layout)

    def ancestors(self, level: int) -> np.ndarray:
        """(n_clients,) index of each client's ancestor at `level`."""
        index = self.client_parent
        for d in range(self.depth - 1, level, -1):
            index = self.levels[d].parent[index]
        return index

    # ---- derived trees for baselines ---------------------------------------
    def clients_per_round(self) -> int:
        """Clients (expected, under Poisson sampling) that train in one round of every leaf federation."""
        counts = self.children_count(self.depth - 1)
        return int(sum(min(p.clients_per_round or n, n) if p.sampling != "full" else n
                       for p, n in zip(self.leaf.policies, counts)))

    def _flat_sampling(self) -> dict:
        """The sampling rule of one flat federation that samples clients as the
        leaf federations do: the same mode, and as many clients per round in all
        (so flat baselines train on as many clients' tokens as the tree)."""
        modes = {p.sampling for p in self.leaf.policies}
        if modes == {"full"}:
            return {"clients_per_round": None, "sampling": "full"}
        if len(modes) > 1:
            raise TopologyError(f"the lowest federations sample clients in different ways ({', '.join(sorted(modes))}),"
                                " which one flat federation cannot follow; use one sampling mode on every leaf")
        return {"clients_per_round": self.clients_per_round(), "sampling": modes.pop()}

    def flattened(self) -> "Topology":
        """One federation (the root's policy) over all clients: standard FL."""
        root = self.levels[0]
        leaf = self.leaf
        # Client-side rules (local steps, client lr) come from each client's own
        # leaf federation; a flat tree has a single leaf, so use the first one's.
        policy = dataclasses.replace(
            root.policies[0],
            local_steps=leaf.policies[0].local_steps,
            client_lr=leaf.policies[0].client_lr,
            **self._flat_sampling(),
        )
        # DP protects clients, so a rule set on the lowest federations carries over
        # to the flat federation when it is the same everywhere; mixed rules
        # cannot be expressed by one federation.
        dp_fields = ("dp_noise_multiplier", "dp_clip", "dp_delta", "dp_adaptive_clip", "dp_target_quantile",
                     "dp_clip_lr", "dp_clip_count_stddev", "dp_scope")
        leaf_dp = {tuple(getattr(p, f) for f in dp_fields) for p in leaf.policies}
        if any(p.uses_dp for p in leaf.policies) and not policy.uses_dp:
            if len(leaf_dp) > 1:
                raise TopologyError("the lowest federations have different DP rules, which one flat federation "
                                    "cannot follow; set DP on the root policy for flat baselines")
            policy = dataclasses.replace(policy, **dict(zip(dp_fields, leaf_dp.pop())))
        level = Level(names=root.names, parent=np.array([-1]), policies=(policy,))
        return dataclasses.replace(self, levels=(level,), client_parent=np.zeros(self.n_clients, np.int32),
                                   leaf_split=(("iid", 1.0),))

    def federation_of_client(self) -> tuple[str, ...]:
        return tuple(self.leaf.names[i] for i in self.client_parent)

    def summary(self) -> str:
        lines = [f"depth {self.depth}, {self.n_clients} clients, {self.n_slots} slots "
                 f"({100 * self.padding_fraction:.0f}% padding)"]
        for d, level in enumerate(self.levels):
            lines.append(f"  level {d}: {level.size} federations: {', '.join(level.names)}")
        return "\n".join(lines)


# ---- building from a spec ---------------------------------------------------
def build_topology(spec: Mapping[str, Any], known_sources: Sequence[str] | None = None,
                   root_policy: Policy | None = None) -> Topology:
    """Compile a tree spec into a Topology.

    A node is a mapping with `name` and either `children` (a list of nodes: an
    internal federation) or `clients` (an int: a leaf federation whose data are
    `sources`, split into that many clients by `split` = iid | dirichlet with
    concentration `alpha`). Every node may carry a `policy` mapping, which it and
    all its descendants run (each descendant's own `policy` over it), and an
    `own_policy` mapping, which only the node itself runs, over its `policy`: a
    rule for the root (a server optimizer, say) that the federations below do not
    inherit. Both are plain Policy fields, so DP, sampling, faults and robust
    rules compose the same way whichever mapping sets them.
    """
    if not isinstance(spec, Mapping):
        raise TopologyError(f"the tree spec must be a mapping with 'name' and 'children', got {type(spec).__name__}")
    levels_nodes: list[list[tuple[str, int, Policy]]] = []
    clients: list[tuple[str, int, tuple[str, ...]]] = []
    leaf_split: list[tuple[str, float]] = []
    seen: set[str] = set()
    leaf_depths: set[int] = set()

    def visit(node, depth, parent_index, inherited, path, ancestry):
        name = _check_node(node, f"tree node {'/'.join(path) or '<root>'}", seen, ancestry)
        where = f"federation '{name}'"
        inherited_by_children = inherit_policy(node, inherited, where)
        policy = inherit_policy(node, inherited_by_children, where, field="own_policy")  # this federation's alone
        if len(levels_nodes) <= depth:
            levels_nodes.append([])
        index = len(levels_nodes[depth])
        levels_nodes[depth].append((name, parent_index, policy))
        if "children" in node:
            for child in node["children"]:
                child_name = child.get("name", "?") if isinstance(child, Mapping) else "?"
                visit(child, depth + 1, index, inherited_by_children, path + [str(child_name)],
                      ancestry | {id(node)})
            return
        n, sources, split = _leaf_data(node, where, known_sources)
        if policy.sampling == "full" and policy.clients_per_round is not None and policy.clients_per_round < n:
            # every client trains under `full`: a smaller count would be silently ignored, and under DP
            # the release would divide by it (a step clients / clients_per_round times too large)
            raise TopologyError(f"{where}: policy field 'clients_per_round' = {policy.clients_per_round} with "
                                f"sampling=full, under which all {n} clients train; set sampling: fixed or poisson "
                                "to sample that many, or drop clients_per_round")
        leaf_depths.add(depth)
        leaf_split.append(split)
        clients.extend((f"{name}/{c}", index, sources) for c in range(n))

    visit(spec, 0, -1, root_policy or Policy(), [], frozenset())
    if not clients:
        raise TopologyError("the tree has no clients: give at least one leaf federation with 'clients' and 'sources'")
    if len(leaf_depths) > 1:
        raise TopologyError(f"leaf federations sit at different depths {sorted(leaf_depths)}; all must be at the "
                            "same depth (wrap a shallow one in a single-child federation)")
    levels = tuple(
        Level(names=tuple(n for n, _, _ in nodes), parent=np.array([p for _, p, _ in nodes], np.int32),
              policies=tuple(pol for _, _, pol in nodes))
        for nodes in levels_nodes[: max(leaf_depths) + 1])
    return Topology(
        levels=levels,
        client_names=tuple(c for c, _, _ in clients),
        client_parent=np.array([p for _, p, _ in clients], np.int32),
        client_sources=tuple(s for _, _, s in clients),
        client_weight=np.ones(len(clients)),
        leaf_split=tuple(leaf_split),
    )


def _check_node(node, where: str, seen: set, ancestry: frozenset) -> str:
    """A node's fields and name are well formed (names unique: `seen` grows);
    returns the name."""
    if not isinstance(node, Mapping):
        raise TopologyError(f"{where}: expected a mapping, got {type(node).__name__}")
    if id(node) in ancestry:
        raise TopologyError(f"{where}: the tree contains a cycle (a node is its own ancestor)")
    unknown = sorted(set(node) - set(NODE_FIELDS))
    if unknown:
        raise TopologyError(f"{where}: unknown field(s) {unknown}; valid fields: {', '.join(NODE_FIELDS)}")
    name = node.get("name")
    if not isinstance(name, str) or not name:
        raise TopologyError(f"{where}: every federation needs a non-empty string 'name'")
    if name in seen:
        raise TopologyError(f"{where}: duplicate federation name '{name}'; names must be unique")
    seen.add(name)
    where = f"federation '{name}'"
    if ("children" in node) == ("clients" in node):
        raise TopologyError(f"{where}: give exactly one of 'children' (sub-federations) or 'clients' (a number)")
    children = node.get("children", [None])
    if not isinstance(children, Sequence) or isinstance(children, str) or not children:
        raise TopologyError(f"{where}: 'children' must be a non-empty list of federations")
    return name


def _leaf_data(node, where: str, known_sources) -> tuple[int, tuple[str, ...], tuple[str, float]]:
    """A leaf federation's client count, data sources and (split, alpha)."""
    n = node["clients"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise TopologyError(f"{where}: 'clients' must be an integer >= 1, got {n!r}")
    sources = node.get("sources")
    if isinstance(sources, str):
        sources = [sources]
    if not sources or not all(isinstance(s, str) for s in sources):
        raise TopologyError(f"{where}: a leaf federation needs 'sources', a non-empty list of data sources")
    if known_sources is not None:
        for s in sources:
            if ":" not in s and s not in known_sources:
                raise TopologyError(f"{where}: unknown data source '{s}'; known sources: {', '.join(known_sources)} "
                                    "(or a 'dir:PATH' / 'tfds:NAME' spec)")
    split = node.get("split", "iid")
    alpha = float(node.get("alpha", 1.0))
    if split not in ("iid", "dirichlet") or alpha <= 0:
        raise TopologyError(f"{where}: split must be iid or dirichlet with alpha > 0, got {split!r}, {alpha}")
    return n, tuple(sources), (split, alpha)
