"""The federation tree, compiled once into flat static arrays.

A tree spec (a dict, usually from YAML) names federations, their children and
their policies. Every federation is autonomous: its policy (rounds, sampling,
local steps, learning rates, key-layer aggregation, privacy) is its own, and a
field it leaves out is inherited from its parent.

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
import math
from typing import Any, Mapping, Sequence

import numpy as np

K_AGG_MODES = ("attention", "mean", "local")
SAMPLING_MODES = ("full", "fixed", "poisson")
DP_SCOPES = ("backbone", "all")


class TopologyError(ValueError):
    """A malformed tree spec; the message names the node, the field and the fix."""


@dataclasses.dataclass(frozen=True)
class Policy:
    """Rules of one federation. Unset fields are inherited from the parent."""

    rounds: int = 1  # rounds with its children per round of its parent
    clients_per_round: int | None = None  # leaf federations: None = all clients
    # federations of federations: child federations taking part in each round
    # (None = all); k of n drawn without replacement, or each with probability
    # k / n under `sampling: poisson`
    federations_per_round: int | None = None
    sampling: str = "full"  # full | fixed (without replacement) | poisson
    local_steps: int = 10  # leaf federations: optimizer steps per client per round
    client_lr: float = 1e-3
    server_optimizer: str = "sgd"  # sgd with lr 1 = FedAvg; adam = FedAdam, ...
    server_lr: float = 1.0
    k_agg: str = "attention"  # attention | mean | local
    tau: float = 0.1  # attention temperature
    eta: float = 1.0  # key-layer server step
    residual_bias: float = 0.0  # logit bias of residual (sibling) candidates
    parent_bias: float = 0.0  # logit bias of the parent's K as a candidate
    dp_noise_multiplier: float = 0.0  # 0 = no DP at this federation
    dp_clip: float = math.inf  # per-child L2 clip (inf = no clipping)
    dp_delta: float = 1e-5
    dp_adaptive_clip: bool = False  # track a quantile of update norms (Andrew et al. 2021)
    dp_target_quantile: float = 0.5
    dp_clip_lr: float = 0.2  # geometric step of the adaptive clip
    dp_clip_count_stddev: float = 0.0  # noise on the clipped-count query (0 = expected participants / 20)
    dp_scope: str = "all"  # parts clipped and noised: all (B and K: both leave a federation) | backbone
    # learning rates over root rounds (worldlm_jax.schedules): client_lr at leaf
    # federations, server_lr everywhere, each times its schedule's factor
    client_lr_schedule: str = "constant"  # constant | linear_warmup | cosine | warmup_cosine | registered
    server_lr_schedule: str = "constant"
    warmup_rounds: int = 0
    decay_rounds: int = 0  # round the decay ends (0 = the run's last root round)
    min_lr_ratio: float = 0.0  # the decayed rate's floor, as a fraction of the rate
    aggregator: str = "mean"  # how children's backbone updates combine (worldlm_jax.aggregators)
    aggregator_args: Mapping[str, float] = dataclasses.field(default_factory=dict)  # e.g. {trim: 0.2}
    objective_args: Mapping[str, float] = dataclasses.field(default_factory=dict)  # e.g. {mu: 0.1} (leaf federations)

    def validate(self, where: str) -> None:
        def fail(field, value, allowed):
            raise TopologyError(f"{where}: policy field '{field}' = {value!r}; {allowed}")

        for name in ("rounds", "local_steps"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                fail(name, value, "expected an integer >= 1")
        for name in ("clients_per_round", "federations_per_round"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1):
                fail(name, value, "expected an integer >= 1 or null (all take part)")
        for name, allowed in (("sampling", SAMPLING_MODES), ("k_agg", K_AGG_MODES), ("dp_scope", DP_SCOPES)):
            if getattr(self, name) not in allowed:
                fail(name, getattr(self, name), f"allowed: {', '.join(allowed)}")
        for name in ("client_lr", "server_lr", "tau", "dp_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                fail(name, value, "expected a number > 0")
        for name in ("eta", "residual_bias", "parent_bias", "dp_noise_multiplier"):
            if not isinstance(getattr(self, name), (int, float)) or isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "expected a number")
        if self.dp_noise_multiplier < 0:
            fail("dp_noise_multiplier", self.dp_noise_multiplier, "expected a number >= 0 (0 = no DP)")
        if self.dp_noise_multiplier > 0 and not math.isfinite(self.dp_clip):
            fail("dp_clip", self.dp_clip, "DP noise needs a finite clip norm")
        if not isinstance(self.dp_adaptive_clip, bool):
            fail("dp_adaptive_clip", self.dp_adaptive_clip, "expected true or false")
        if not 0 < self.dp_target_quantile < 1:
            fail("dp_target_quantile", self.dp_target_quantile, "expected 0 < quantile < 1")
        if self.dp_clip_lr < 0 or self.dp_clip_count_stddev < 0:
            fail("dp_clip_lr / dp_clip_count_stddev", (self.dp_clip_lr, self.dp_clip_count_stddev), "expected >= 0")
        if self.dp_adaptive_clip and not math.isfinite(self.dp_clip):
            fail("dp_clip", self.dp_clip, "adaptive clipping starts from a finite initial clip")
        if not 0 < self.dp_delta < 1:
            fail("dp_delta", self.dp_delta, "expected 0 < delta < 1")
        self._validate_plugins(where, fail)

    def _validate_plugins(self, where: str, fail) -> None:
        """Named rules must be registered (plug-ins load before configs are read)."""
        from worldlm_jax import aggregators, optimizers, schedules
        from worldlm_jax.registry import UnknownNameError

        for name, registry in (("server_optimizer", optimizers.OPTIMIZERS), ("aggregator", aggregators.AGGREGATORS),
                               ("client_lr_schedule", schedules.SCHEDULES),
                               ("server_lr_schedule", schedules.SCHEDULES)):
            if not isinstance(getattr(self, name), str):
                fail(name, getattr(self, name), f"expected the name of a registered {registry.kind}")
            try:
                registry.check(getattr(self, name), f"{where}: policy field '{name}'")
            except UnknownNameError as e:
                raise TopologyError(str(e)) from None
        for name in ("warmup_rounds", "decay_rounds"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                fail(name, value, "expected an integer >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            fail("min_lr_ratio", self.min_lr_ratio, "expected 0 <= ratio <= 1")
        for name in ("aggregator_args", "objective_args"):
            args = getattr(self, name)
            if not isinstance(args, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                    for k, v in args.items()):
                fail(name, args, "expected a mapping of argument names to numbers, e.g. {trim: 0.2}")
        declared = aggregators.get(self.aggregator).args
        unknown = sorted(set(self.aggregator_args) - set(declared))
        if unknown:
            fail("aggregator_args", dict(self.aggregator_args),
                 f"aggregator {self.aggregator!r} takes {', '.join(declared) or 'no arguments'}, not {unknown}")
        if self.uses_dp and self.aggregator != "mean":
            fail("aggregator", self.aggregator, "a DP federation releases the clipped, noised mean; use mean "
                 "(or drop the DP fields)")

    @property
    def uses_dp(self) -> bool:
        return self.dp_noise_multiplier > 0 or math.isfinite(self.dp_clip)


POLICY_FIELDS = tuple(f.name for f in dataclasses.fields(Policy))
NODE_FIELDS = ("name", "children", "clients", "sources", "split", "alpha", "policy")


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
    slot_multiple: int = 1

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
    def _slot_layout(self) -> tuple[np.ndarray, np.ndarray]:
        """(slot_parent, real): the slots cut into `slot_multiple` equal device
        blocks, each leaf federation's slots spread over the blocks as evenly as
        possible (remainders rotating from one federation to the next),
        federation-major inside a block, padding at the end of a block. Every
        device holds a fair share of every federation, so sampling clients or
        federations thins all devices' work alike instead of idling some."""
        n_dev = max(self.slot_multiple, 1)
        blocks = [[] for _ in range(n_dev)]
        first = 0
        for leaf, m in enumerate(self.slots_per_leaf):
            base, extra = divmod(int(m), n_dev)
            for j in range(n_dev):
                blocks[(first + j) % n_dev] += [leaf] * (base + (j < extra))
            first = (first + extra) % n_dev
        size = max(len(b) for b in blocks)
        parent, real = [], []
        for b in blocks:  # a padding slot sits with its block's last federation (weight 0)
            parent += b + [b[-1] if b else self.leaf.size - 1] * (size - len(b))
            real += [True] * len(b) + [False] * (size - len(b))
        parent, real = np.asarray(parent, np.int32), np.asarray(real, bool)
        parent.setflags(write=False)  # cached and shared: nobody may edit it in place
        real.setflags(write=False)
        return parent, real

    @property
    def slot_parent(self) -> np.ndarray:
        """(S,) leaf federation of each slot (padding slots too: they weigh 0)."""
        return self._slot_layout[0]

    def leaf_slots(self, leaf: int) -> np.ndarray:
        """Positions of the (non-padding) slots of one leaf federation."""
        parent, real = self._slot_layout
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

    def ancestors(self, level: int) -> np.ndarray:
        """(n_clients,) index of each client's ancestor at `level`."""
        index = self.client_parent
        for d in range(self.depth - 1, level, -1):
            index = self.levels[d].parent[index]
        return index

    # ---- derived trees for baselines ---------------------------------------
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
            clients_per_round=None,
            sampling="full",
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
def _policy(node: Mapping[str, Any], inherited: Policy, where: str) -> Policy:
    raw = node.get("policy") or {}
    if not isinstance(raw, Mapping):
        raise TopologyError(f"{where}: 'policy' must be a mapping of fields, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(POLICY_FIELDS))
    if unknown:
        raise TopologyError(f"{where}: unknown policy field(s) {unknown}; valid fields: {', '.join(POLICY_FIELDS)}")
    values = dict(raw)
    for name in ("aggregator_args", "objective_args"):  # merged key by key with the inherited arguments
        if isinstance(values.get(name), Mapping):
            values[name] = {**getattr(inherited, name), **values[name]}
    for name in ("min_lr_ratio", "client_lr", "server_lr", "tau", "eta", "residual_bias", "parent_bias",
                 "dp_noise_multiplier", "dp_clip", "dp_delta", "dp_target_quantile", "dp_clip_lr",
                 "dp_clip_count_stddev"):
        value = values.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 and inf as strings
            try:
                values[name] = float(value.replace(".inf", "inf"))
            except ValueError:
                pass
    policy = dataclasses.replace(inherited, **values)
    policy.validate(where)
    return policy


def build_topology(spec: Mapping[str, Any], known_sources: Sequence[str] | None = None,
                   root_policy: Policy | None = None) -> Topology:
    """Compile a tree spec into a Topology.

    A node is a mapping with `name` and either `children` (a list of nodes: an
    internal federation) or `clients` (an int: a leaf federation whose data are
    `sources`, split into that many clients by `split` = iid | dirichlet with
    concentration `alpha`). Every node may carry a `policy` mapping.
    """
    if not isinstance(spec, Mapping):
        raise TopologyError(f"the tree spec must be a mapping with 'name' and 'children', got {type(spec).__name__}")
    levels_nodes: list[list[tuple[str, int, Policy]]] = []
    clients: list[tuple[str, int, tuple[str, ...]]] = []
    leaf_split: list[tuple[str, float]] = []
    seen: set[str] = set()
    leaf_depths: set[int] = set()

    def visit(node, depth, parent_index, inherited, path, ancestry):
        where = f"tree node {'/'.join(path) or '<root>'}"
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
        policy = _policy(node, inherited, where)
        if len(levels_nodes) <= depth:
            levels_nodes.append([])
        index = len(levels_nodes[depth])
        levels_nodes[depth].append((name, parent_index, policy))
        has_children, has_clients = "children" in node, "clients" in node
        if has_children == has_clients:
            raise TopologyError(f"{where}: give exactly one of 'children' (sub-federations) or 'clients' (a number)")
        if has_children:
            children = node["children"]
            if not isinstance(children, Sequence) or isinstance(children, str) or not children:
                raise TopologyError(f"{where}: 'children' must be a non-empty list of federations")
            for child in children:
                child_name = child.get("name", "?") if isinstance(child, Mapping) else "?"
                visit(child, depth + 1, index, policy, path + [str(child_name)], ancestry | {id(node)})
            return
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
        leaf_depths.add(depth)
        leaf_split.append((split, alpha))
        for c in range(n):
            clients.append((f"{name}/{c}", index, tuple(sources)))

    visit(spec, 0, -1, root_policy or Policy(), [], frozenset())
    if not clients:
        raise TopologyError("the tree has no clients: give at least one leaf federation with 'clients' and 'sources'")
    if len(leaf_depths) > 1:
        raise TopologyError(f"leaf federations sit at different depths {sorted(leaf_depths)}; all must be at the "
                            "same depth (wrap a shallow one in a single-child federation)")
    if len(levels_nodes) == len(leaf_depths) and max(leaf_depths) == 0:
        pass  # a single federation of clients: depth 1
    levels_nodes = levels_nodes[: max(leaf_depths) + 1]
    levels = tuple(
        Level(names=tuple(n for n, _, _ in nodes), parent=np.array([p for _, p, _ in nodes], np.int32),
              policies=tuple(pol for _, _, pol in nodes))
        for nodes in levels_nodes
    )
    return Topology(
        levels=levels,
        client_names=tuple(c for c, _, _ in clients),
        client_parent=np.array([p for _, p, _ in clients], np.int32),
        client_sources=tuple(s for _, _, s in clients),
        client_weight=np.ones(len(clients)),
        leaf_split=tuple(leaf_split),
    )
