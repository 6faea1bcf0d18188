"""One federation's rules (`Policy`), validated, and inherited down the tree.

Every federation is autonomous: its policy (rounds, sampling, local steps,
learning rates and their schedules, aggregation, key-layer rule, privacy) is
its own, and a field it leaves out is inherited from its parent. Named rules
(optimizers, schedules, aggregators) must be registered before a tree is built.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

K_AGG_MODES = ("attention", "mean", "local", "robust_attention", "adaptive_attention", "personalized")
# key-layer rules that score every child (so the round keeps each child's K);
# robust_attention first bounds each child's K delta by the median norm of its siblings';
# adaptive_attention divides the similarities by their spread across the children;
# personalized (leaf federations) gives each client its own similarity-weighted mixture
# of its siblings' K, while the federation's own K is their weighted mean
ATTENDING = ("attention", "robust_attention", "adaptive_attention", "personalized")
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
    k_agg: str = "attention"  # attention | mean | local | robust_attention | adaptive_attention | personalized
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
    # faults, simulated inside the round (leaf federations; worldlm_jax.attacks). Dropped
    # clients and attackers are not known to the DP accountant, which stays an upper bound.
    dropout: float = 0.0  # probability that a sampled client fails to report this round
    stragglers: float = 0.0  # probability that a client completes only a random part of its local steps
    attack: str = "none"  # what the federation's attackers send
    attackers: int = 0  # its first k clients attack (every round)
    attacker_fraction: float = 0.0  # ... or this fraction of its clients (rounded up), if more
    attack_args: Mapping[str, float] = dataclasses.field(default_factory=dict)  # e.g. {factor: 10}
    # the simulated network clock (worldlm_jax/run/network_clock.py): the link from this
    # federation to each of its children (a leaf federation's: to each of its clients)
    link_bandwidth_mbps: float = 10000.0  # megabits per second (10 Gbit/s: a datacentre link)
    link_latency_ms: float = 1.0  # per message, one way
    client_tokens_per_s: float = 0.0  # leaf federations: a client's training speed (0 = the run's measured one)
    link_overlap: bool = False  # the clock hides the children's uploads behind their next round's work
    # seconds this federation waits for each child's reply in one of its rounds (0 = no
    # deadline); a child whose planned time exceeds it is late, and left out like a dropout
    deadline_s: float = 0.0
    # federations of federations: the backbone is synced with the child federations in this
    # many fragments of blocks, one fragment per round in turn (Streaming DiLoCo), and a
    # parameter group named in sync_every only every s-th round (FedLAMA), e.g. {embeddings: 4}
    # (engine/partial_sync.py)
    sync_fragments: int = 1
    sync_every: Mapping[str, int] = dataclasses.field(default_factory=dict)
    # compressed links (worldlm_jax.codecs): what this federation's children send up to it
    # (their updates; a leaf federation's: its clients') and what it sends down to them;
    # a codec's name, or {B: name, K: name} per part
    codec_up: Any = "none"
    codec_down: Any = "none"
    codec_args: Mapping[str, float] = dataclasses.field(default_factory=dict)  # e.g. {block: 128, fraction: 0.05}

    def validate(self, where: str) -> None:
        def fail(field, value, allowed):
            raise TopologyError(f"{where}: policy field '{field}' = {value!r}; {allowed}")

        for name in ("rounds", "local_steps", "sync_fragments"):
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
        self._validate_clock(fail)
        self._validate_codecs(where, fail)

    def codec(self, direction: str, part: str) -> str:
        """The codec of `part` ("B" or "K") on this federation's edges, `direction` "up" or "down"."""
        value = getattr(self, f"codec_{direction}")
        return value.get(part, "none") if isinstance(value, Mapping) else value

    def _validate_codecs(self, where: str, fail) -> None:
        from worldlm_jax.plugins import codecs
        from worldlm_jax.plugins.registry import UnknownNameError

        for direction in ("up", "down"):
            field = f"codec_{direction}"
            value = getattr(self, field)
            names = dict(value) if isinstance(value, Mapping) else {"B": value, "K": value}
            if set(names) - {"B", "K"} or not all(isinstance(v, str) for v in names.values()):
                fail(field, value, "expected a codec's name, or a mapping {B: name, K: name}")
            for name in names.values():
                try:
                    codecs.CODECS.check(name, f"{where}: policy field '{field}'")
                except UnknownNameError as e:
                    raise TopologyError(str(e)) from None
        args = self.codec_args
        if not isinstance(args, Mapping) or not all(isinstance(k, str) and isinstance(v, (int, float))
                                                    and not isinstance(v, bool) for k, v in args.items()):
            fail("codec_args", args, "expected a mapping of argument names to numbers, e.g. {block: 128}")
        used = {self.codec(d, part) for d in ("up", "down") for part in ("B", "K")}
        declared = {codecs.FEEDBACK_ARG}.union(*(codecs.get(name).args for name in used))
        unknown = sorted(set(args) - declared)
        if unknown:
            fail("codec_args", dict(args), f"the codecs {sorted(used)} take {', '.join(sorted(declared))}, "
                 f"not {unknown}")
        for name in sorted(used):
            problem = codecs.check_args(name, args)
            if problem:
                fail("codec_args", dict(args), f"codec {name!r}: {problem}")

    def _validate_clock(self, fail) -> None:
        """The network clock's inputs: a link carries bytes (bandwidth > 0), its latency and
        a client's speed are finite and >= 0."""
        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)

        if not number(self.link_bandwidth_mbps) or not self.link_bandwidth_mbps > 0:
            fail("link_bandwidth_mbps", self.link_bandwidth_mbps, "expected a number > 0 (megabits per second)")
        if not number(self.link_latency_ms) or not 0 <= self.link_latency_ms < math.inf:
            fail("link_latency_ms", self.link_latency_ms, "expected a finite number >= 0 (milliseconds)")
        if not isinstance(self.link_overlap, bool):
            fail("link_overlap", self.link_overlap, "expected true or false")
        if not number(self.client_tokens_per_s) or not 0 <= self.client_tokens_per_s < math.inf:
            fail("client_tokens_per_s", self.client_tokens_per_s,
                 "expected a finite number >= 0 (tokens per second; 0 = the run's measured speed)")
        every = self.sync_every
        if not isinstance(every, Mapping) or not all(
                isinstance(k, str) and isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
                for k, v in every.items()):
            fail("sync_every", every, "expected a mapping of parameter groups to integers >= 1, e.g. {embeddings: 4}")
        if not number(self.deadline_s) or not 0 <= self.deadline_s < math.inf:
            fail("deadline_s", self.deadline_s, "expected a finite number of seconds >= 0 (0 = no deadline)")
        if self.deadline_s > 0 and self.link_overlap:
            fail("deadline_s", self.deadline_s, "a deadline times each child's whole reply, which link_overlap "
                 "hides behind the next round: set one of them on this federation")

    def _validate_plugins(self, where: str, fail) -> None:
        """Named rules must be registered (plug-ins load before configs are read)."""
        from worldlm_jax.plugins import aggregators, attacks, optimizers, schedules
        from worldlm_jax.plugins.registry import UnknownNameError

        for name, registry in (("server_optimizer", optimizers.OPTIMIZERS), ("aggregator", aggregators.AGGREGATORS),
                               ("attack", attacks.ATTACKS),
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
        for name in ("dropout", "stragglers", "attacker_fraction"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
                fail(name, value, "expected a probability, 0 <= p <= 1")
        if not isinstance(self.attackers, (int, np.integer)) or isinstance(self.attackers, bool) or self.attackers < 0:
            fail("attackers", self.attackers, "expected an integer >= 0 (the federation's first k clients attack)")
        for name in ("aggregator_args", "objective_args", "attack_args"):
            args = getattr(self, name)
            if not isinstance(args, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                    for k, v in args.items()):
                fail(name, args, "expected a mapping of argument names to numbers, e.g. {trim: 0.2}")
        for kind, entry in (("aggregator", aggregators.get(self.aggregator)), ("attack", attacks.get(self.attack))):
            unknown = sorted(set(getattr(self, f"{kind}_args")) - set(entry.args))
            if unknown:
                fail(f"{kind}_args", dict(getattr(self, f"{kind}_args")), f"{kind} {getattr(self, kind)!r} takes "
                     f"{', '.join(entry.args) or 'no arguments'}, not {unknown}")
        if self.uses_dp and self.aggregator != "mean":
            fail("aggregator", self.aggregator, "a DP federation releases the clipped, noised mean; use mean "
                 "(or drop the DP fields)")

    @property
    def uses_dp(self) -> bool:
        return self.dp_noise_multiplier > 0 or math.isfinite(self.dp_clip)


POLICY_FIELDS = tuple(f.name for f in dataclasses.fields(Policy))


def inherit_policy(node: Mapping[str, Any], inherited: Policy, where: str, field: str = "policy") -> Policy:
    """The policy of tree node `node`: the fields of its mapping `field` over `inherited`.

    `field="policy"` gives what the node and its descendants run; `field="own_policy"`
    applied over that gives what the node alone runs (`topology.build_topology`)."""
    raw = node.get(field) or {}
    if not isinstance(raw, Mapping):
        raise TopologyError(f"{where}: '{field}' must be a mapping of fields, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(POLICY_FIELDS))
    if unknown:
        raise TopologyError(f"{where}: unknown {field.replace('_', ' ')} field(s) {unknown}; valid fields: "
                            f"{', '.join(POLICY_FIELDS)}")
    values = dict(raw)
    for name in ("aggregator_args", "objective_args", "attack_args", "codec_args", "sync_every"):  # key by key
        if isinstance(values.get(name), Mapping):
            values[name] = {**getattr(inherited, name), **values[name]}
    for name in ("codec_up", "codec_down"):  # {B: ..} over an inherited name or mapping: part by part
        if isinstance(values.get(name), Mapping):
            old = getattr(inherited, name)
            values[name] = {**({"B": old, "K": old} if isinstance(old, str) else old), **values[name]}
    for name in ("dropout", "stragglers", "attacker_fraction", "min_lr_ratio", "client_lr", "server_lr", "tau",
                 "eta", "residual_bias", "parent_bias",
                 "dp_noise_multiplier", "dp_clip", "dp_delta", "dp_target_quantile", "dp_clip_lr",
                 "dp_clip_count_stddev", "link_bandwidth_mbps", "link_latency_ms", "client_tokens_per_s",
                 "deadline_s"):
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
