"""Differential privacy for federations: DP-FedAvg aggregation and accounting.

Device side (pure JAX, jit/vmap friendly). A federation's children's updates
are stacked along a leading axis N, one row per child slot; `participate_N`
says which rows count and `parent_N` which federation (0..P-1) each row
belongs to, so every federation of a tree level is aggregated in one call with
per-federation policies given as arrays over P.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models") gives user-level DP to the children of a federation: clip
each child's whole update to L2 norm `clip`, sum with weight 1 per participant
(a data-size weight would unbound one child's influence), add N(0, (z*clip)^2)
per coordinate and divide by a *fixed* expected participant count, so the
sensitivity of the released mean is clip / expected_count whoever took part.

Host side: `PrivacyPolicy` (validated per-federation settings),
`epsilon_after` / `calibrate_noise` over Google's dp_accounting (RDP or PLD),
and `FederationAccountant`, a checkpointable per-federation round counter.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, NamedTuple, NoReturn, Sequence

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
from dp_accounting import pld, rdp

Tree = dict  # flat {path: jax.Array}; any pytree works
f32 = jnp.float32

SAMPLINGS = ("poisson", "fixed", "full")
ACCOUNTANTS = ("rdp", "pld")


# ----------------------------------------------------------------- device side
def _bcast(v_N: jax.Array, leaf: jax.Array) -> jax.Array:
    """Shape a per-row vector (N,) to broadcast against a leaf (N, ...)."""
    return v_N.reshape(v_N.shape + (1,) * (leaf.ndim - 1))


def global_norms(updates_N: Tree) -> jax.Array:
    """L2 norm of each row over *all* leaves (fp32), shape (N,).

    User-level DP bounds a child's whole contribution, so the norm is global
    over every leaf that leaves the federation, not per leaf.
    """
    sq = [jnp.sum(jnp.square(x.astype(f32)).reshape(x.shape[0], -1), axis=1)
          for x in jax.tree.leaves(updates_N)]
    return jnp.sqrt(sum(sq))


def clip_updates(updates_N: Tree, clip_N: jax.Array) -> tuple[Tree, jax.Array]:
    """Scale row i by min(1, clip_i / norm_i); returns (clipped fp32, norms).

    Safe at norm 0 and with clip = +inf (both leave the row unchanged). Rows
    with non-finite norms pass through: filtering faulty children is the job
    of the fault/robust-aggregation step before DP.
    """
    norms_N = global_norms(updates_N)
    clip_N = jnp.asarray(clip_N, f32)
    scale_N = jnp.where(norms_N > clip_N, clip_N / norms_N, 1.0)
    clipped = jax.tree.map(lambda x: x.astype(f32) * _bcast(scale_N, x), updates_N)
    return clipped, norms_N


def leaf_keys(key: jax.Array, tree: Tree) -> Tree:
    """One PRNG key per leaf: fold_in(key, leaf index in flatten order).

    Depends only on the tree structure (dict keys flatten sorted), never on
    leaf values, so two same-shaped leaves get independent noise and the
    noise is reproducible from the key alone.
    """
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [jax.random.fold_in(key, i) for i in range(len(leaves))])


def gaussian_noise(key: jax.Array, like_tree_P: Tree, std_P: jax.Array) -> Tree:
    """N(0, std_P[p]^2) noise (fp32) shaped like a stacked (P, ...) tree."""
    std_P = jnp.asarray(std_P, f32)
    return jax.tree.map(
        lambda k, x: jax.random.normal(k, x.shape, f32) * _bcast(std_P, x),
        leaf_keys(key, like_tree_P), like_tree_P)


class DpStats(NamedTuple):
    """Diagnostics of one DP aggregation. Not privatised: log, don't release."""
    norms_N: jax.Array           # pre-clip global norm per child row
    clipped_fraction_P: jax.Array  # share of participants that were clipped
    count_P: jax.Array           # number of participants per federation


def dp_mean(updates_N: Tree, participate_N: jax.Array, parent_N: jax.Array,
            n_parents: int, clip_P: jax.Array, noise_multiplier_P: jax.Array,
            expected_count_P: jax.Array, key: jax.Array) -> tuple[Tree, DpStats]:
    """DP-FedAvg mean per federation: clip, sum, add noise, divide by E[count].

    Args:
      updates_N: stacked child updates, leaves (N, ...).
      participate_N: (N,) participation; anything > 0 counts as weight 1
        (DP needs each child's contribution bounded by one clipped update).
      parent_N: (N,) int federation id of each row, in [0, n_parents).
      clip_P, noise_multiplier_P, expected_count_P: (P,) per-federation policy.
      key: one key for the whole call; split per leaf by `leaf_keys`.

    Returns ({path: (P, ...) fp32 mean}, DpStats).

    The two halves, `clipped_sums` and `dp_release`, also work apart: the
    engine streams `clipped_sums` over chunks of clients and releases once.
    """
    clip_P = jnp.asarray(clip_P, f32)
    sums_P, norms_N = clipped_sums(updates_N, participate_N, parent_N, n_parents, clip_P[parent_N])
    stats = dp_stats(norms_N, participate_N, parent_N, n_parents, clip_P)
    return dp_release(sums_P, stats.count_P, clip_P, noise_multiplier_P, expected_count_P, key), stats


def clipped_sums(updates_N: Tree, participate_N: jax.Array, parent_N: jax.Array, n_parents: int,
                 clip_N: jax.Array) -> tuple[Tree, jax.Array]:
    """Per federation, the sum of its participants' clipped updates; and every
    row's pre-clip norm. Sums over disjoint sets of rows add up, so this can
    run chunk by chunk."""
    clipped, norms_N = clip_updates(updates_N, clip_N)
    w_N = participate_N > 0
    # `where`, not a product: padding rows may hold garbage (even NaN).
    masked = jax.tree.map(lambda x: jnp.where(_bcast(w_N, x), x, 0.0), clipped)
    sums_P = jax.tree.map(lambda x: jax.ops.segment_sum(x, parent_N, num_segments=n_parents), masked)
    return sums_P, norms_N


def dp_stats(norms_N: jax.Array, participate_N: jax.Array, parent_N: jax.Array, n_parents: int,
             clip_P: jax.Array) -> DpStats:
    w_N = participate_N > 0
    seg = functools.partial(jax.ops.segment_sum, segment_ids=parent_N, num_segments=n_parents)
    count_P = seg(w_N.astype(f32))
    clipped_P = seg((w_N & (norms_N > jnp.asarray(clip_P, f32)[parent_N])).astype(f32))
    return DpStats(norms_N, clipped_P / jnp.maximum(count_P, 1.0), count_P)


def dp_release(sums_P: Tree, count_P: jax.Array, clip_P: jax.Array, noise_multiplier_P: jax.Array,
               expected_count_P: jax.Array, key: jax.Array) -> Tree:
    """Noised mean from clipped sums: (sum + N(0, (z clip)^2)) / E[count].

    A federation with noise_multiplier 0 has no guarantee to protect, so it
    divides by its actual participant count instead: with clip = inf that is
    exactly the plain participant mean (and 0 when nobody took part).
    """
    clip_P = jnp.asarray(clip_P, f32)
    z_P = jnp.asarray(noise_multiplier_P, f32)
    std_P = jnp.where(z_P > 0, z_P * clip_P, 0.0)  # 0 * inf would be NaN
    noise_P = gaussian_noise(key, sums_P, std_P)
    denom_P = jnp.where(z_P > 0, jnp.asarray(expected_count_P, f32), jnp.maximum(count_P, 1.0))
    return jax.tree.map(lambda s, e: (s + e) / _bcast(denom_P, s), sums_P, noise_P)


# ------------------------------------------------------------ adaptive clipping
class AdaptiveClipState(NamedTuple):
    """Per-federation clip norm for adaptive clipping (Andrew et al. 2021)."""
    clip: jax.Array                # (P,) current clip norm
    unclipped_fraction: jax.Array  # (P,) last noised estimate b_hat (for logs)


def adaptive_clip_init(clip_P: jax.Array) -> AdaptiveClipState:
    clip_P = jnp.asarray(clip_P, f32)
    return AdaptiveClipState(clip_P, jnp.zeros_like(clip_P))


def adaptive_clip_update(state: AdaptiveClipState, norms_N: jax.Array,
                         participate_N: jax.Array, parent_N: jax.Array,
                         target_quantile: jax.Array | float, lr: jax.Array | float,
                         noise_std_for_count: jax.Array | float, key: jax.Array, *,
                         expected_count_P: jax.Array) -> AdaptiveClipState:
    """Geometric quantile tracking: clip <- clip * exp(-lr * (b_hat - target)).

    Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning
    with Adaptive Clipping". b_i = [norm_i <= clip] among participants; the
    count is centred, sum(b_i - 1/2) (sensitivity 1/2), noised with
    N(0, noise_std_for_count^2) and divided by the expected count m:
    b_hat = (sum(b_i - 1/2) + noise) / m + 1/2. The privacy cost is paid by
    raising the update's noise, see `split_noise_multiplier`. Scalars or (P,)
    arrays for the settings; lr = 0 keeps a federation's clip fixed.
    """
    n_parents = state.clip.shape[0]
    w_N = participate_N > 0
    b_N = jnp.where(w_N, (norms_N <= state.clip[parent_N]).astype(f32) - 0.5, 0.0)
    centred_P = jax.ops.segment_sum(b_N, parent_N, num_segments=n_parents)
    noise_P = jax.random.normal(key, (n_parents,), f32) * jnp.asarray(noise_std_for_count, f32)
    b_hat_P = (centred_P + noise_P) / jnp.asarray(expected_count_P, f32) + 0.5
    lr = jnp.asarray(lr, f32)
    clip_P = state.clip * jnp.exp(-lr * (b_hat_P - jnp.asarray(target_quantile, f32)))
    # lr = 0 must keep the clip even where b_hat is undefined (expected count 0).
    return AdaptiveClipState(jnp.where(lr > 0, clip_P, state.clip), b_hat_P)


def split_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """Update noise z_u so update + centred count together cost a Gaussian z.

    Andrew et al. 2021, Thm 1: z_u = (z^-2 - (2 sigma_b)^-2)^(-1/2).
    """
    if noise_multiplier == 0:
        return 0.0
    if count_stddev <= noise_multiplier / 2:
        raise ValueError(
            f"clip_count_stddev={count_stddev} is too small for noise_multiplier="
            f"{noise_multiplier}: adaptive clipping needs clip_count_stddev > "
            f"noise_multiplier / 2 = {noise_multiplier / 2}; raise it (default: "
            f"expected participants / 20).")
    return (noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5


# ----------------------------------------------------------------- host policy
@dataclasses.dataclass(frozen=True)
class PrivacyPolicy:
    """DP settings of one federation (`dp:` in the topology), validated early.

    noise_multiplier is the *total* z accounted for; with adaptive clipping a
    part of it pays for the clip-count query (`update_noise_multiplier`).
    """
    name: str
    noise_multiplier: float = 1.0
    clip: float = 1.0
    delta: float = 1e-5
    sampling: str = "poisson"        # how children are drawn each round
    accountant: str = "rdp"          # rdp is fast and conservative; pld is tighter
    target_epsilon: float | None = None  # stop training before exceeding it
    adaptive_clip: bool = False
    target_quantile: float = 0.5     # Andrew et al. 2021: median works well
    clip_lr: float = 0.2             # Andrew et al. 2021 default eta_C
    clip_count_stddev: float | None = None  # None: expected participants / 20

    def _fail(self, field: str, value: Any, need: str) -> NoReturn:
        raise ValueError(f"privacy policy of federation {self.name!r}: {field}={value!r} "
                         f"is invalid; {need}")

    def __post_init__(self):
        z, c, d = self.noise_multiplier, self.clip, self.delta
        real = lambda x: isinstance(x, numbers.Real) and not isinstance(x, bool)  # noqa: E731
        if not (real(z) and math.isfinite(z) and z >= 0):
            self._fail("noise_multiplier", z, "set a finite value >= 0 (0 disables noise).")
        if not (real(c) and c > 0):
            self._fail("clip", c, "set a positive L2 norm bound, e.g. 1.0 (inf: no clipping).")
        if z > 0 and math.isinf(c):
            self._fail("clip", c, "noise needs a finite clip (noise std is noise_multiplier*clip).")
        if not (real(d) and 0 < d < 1):
            self._fail("delta", d, "set 0 < delta < 1, typically below 1/number of children.")
        if self.sampling not in SAMPLINGS:
            self._fail("sampling", self.sampling, f"use one of {SAMPLINGS}.")
        if self.accountant not in ACCOUNTANTS:
            self._fail("accountant", self.accountant, f"use one of {ACCOUNTANTS}.")
        if self.sampling == "fixed" and self.accountant == "pld":
            self._fail("accountant", self.accountant,
                       "dp_accounting's PLD has no fixed-size sampling; use accountant='rdp' "
                       "or sampling='poisson'.")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            self._fail("target_epsilon", self.target_epsilon, "set a value > 0 or None.")
        if not 0 <= self.target_quantile <= 1:
            self._fail("target_quantile", self.target_quantile, "set a value in [0, 1].")
        if not self.clip_lr >= 0:
            self._fail("clip_lr", self.clip_lr, "set a value >= 0.")
        if self.clip_count_stddev is not None:
            if not self.clip_count_stddev >= 0:
                self._fail("clip_count_stddev", self.clip_count_stddev, "set a value >= 0.")
            if self.adaptive_clip and z > 0 and self.clip_count_stddev <= z / 2:
                self._fail("clip_count_stddev", self.clip_count_stddev,
                           f"adaptive clipping needs it > noise_multiplier/2 = {z / 2}.")

    def calibrate(self, sampling_rate: float, rounds: int,
                  population: int | None = None) -> "PrivacyPolicy":
        """This policy with the smallest noise that keeps target_epsilon after `rounds`."""
        if self.target_epsilon is None:
            self._fail("target_epsilon", None, "set a budget to calibrate the noise to.")
        try:
            z = calibrate_noise(self.target_epsilon, self.delta, sampling_rate, rounds,
                                self.accountant, self.sampling, population)
        except ValueError as e:
            raise ValueError(f"privacy policy of federation {self.name!r}: {e}") from None
        return dataclasses.replace(self, noise_multiplier=z)

    def count_stddev(self, expected_count: float) -> float:
        if not self.adaptive_clip:
            return 0.0
        return self.clip_count_stddev if self.clip_count_stddev is not None else expected_count / 20

    def update_noise_multiplier(self, expected_count: float) -> float:
        """Noise multiplier for the model update (total z minus the count's share)."""
        if not self.adaptive_clip:
            return float(self.noise_multiplier)
        try:
            return split_noise_multiplier(self.noise_multiplier, self.count_stddev(expected_count))
        except ValueError as e:
            raise ValueError(f"privacy policy of federation {self.name!r}: {e}") from None


class PolicyArrays(NamedTuple):
    """Per-federation (P,) fp32 arrays for `dp_mean` / `adaptive_clip_update`."""
    clip: np.ndarray
    noise_multiplier: np.ndarray  # update noise (after the adaptive split)
    target_quantile: np.ndarray
    clip_lr: np.ndarray           # 0 where clipping is not adaptive
    count_stddev: np.ndarray


def stack_policies(policies: Sequence[PrivacyPolicy | None],
                   expected_counts: Sequence[float]) -> PolicyArrays:
    """Stack per-federation policies; None (no DP) becomes z = 0, clip = inf."""
    none = PrivacyPolicy("<no dp>", noise_multiplier=0.0, clip=math.inf)
    rows = [(p or none, m) for p, m in zip(policies, expected_counts, strict=True)]
    col = lambda f: np.asarray([f(p, m) for p, m in rows], np.float32)  # noqa: E731
    return PolicyArrays(
        clip=col(lambda p, m: p.clip),
        noise_multiplier=col(lambda p, m: p.update_noise_multiplier(m)),
        target_quantile=col(lambda p, m: p.target_quantile),
        clip_lr=col(lambda p, m: p.clip_lr if p.adaptive_clip else 0.0),
        count_stddev=col(lambda p, m: p.count_stddev(m)))


# ------------------------------------------------------------------ accounting
def round_event(noise_multiplier: float, sampling_rate: float, sampling: str = "poisson",
                population: int | None = None) -> dp_accounting.DpEvent:
    """The dp_accounting event of one DP-FedAvg round at a federation.

    'fixed' (m of n children without replacement) is analysed under the
    replace-one relation (Wang et al. 2019), where the clipped sum's L2
    sensitivity is 2*clip, hence the Gaussian's multiplier z/2.
    """
    gauss = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(sampling_rate, gauss)
    if sampling == "full":
        if sampling_rate != 1:
            raise ValueError(f"sampling='full' means sampling_rate=1, got {sampling_rate}; "
                             "use sampling='poisson' or 'fixed' for partial participation.")
        return gauss
    if sampling == "fixed":
        if population is None or int(population) < 1:
            raise ValueError(f"sampling='fixed' needs population (number of children) >= 1, "
                             f"got {population!r}.")
        m = int(round(sampling_rate * population))
        if not 1 <= m <= population:
            raise ValueError(f"sampling_rate={sampling_rate} of population={population} gives "
                             f"sample size {m}; need 1 <= size <= population.")
        return dp_accounting.SampledWithoutReplacementDpEvent(
            int(population), m, dp_accounting.GaussianDpEvent(noise_multiplier / 2))
    raise ValueError(f"sampling={sampling!r} is unknown; use one of {SAMPLINGS}.")


def make_accountant(accountant: str = "rdp", sampling: str = "poisson"):
    """A fresh dp_accounting accountant for the given sampling scheme."""
    if accountant == "rdp":
        rel = dp_accounting.NeighboringRelation
        return rdp.RdpAccountant(neighboring_relation=rel.REPLACE_ONE if sampling == "fixed"
                                 else rel.ADD_OR_REMOVE_ONE)
    if accountant == "pld":
        if sampling == "fixed":
            raise ValueError("accountant='pld' does not support sampling='fixed' in "
                             "dp_accounting; use accountant='rdp'.")
        return pld.PLDAccountant()
    raise ValueError(f"accountant={accountant!r} is unknown; use one of {ACCOUNTANTS}.")


@functools.lru_cache(maxsize=4096)  # logging asks the same question every round
def epsilon_after(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float,
                  accountant: str = "rdp", sampling: str = "poisson",
                  population: int | None = None) -> float:
    """epsilon of `rounds` DP-FedAvg rounds at (noise, sampling rate), for delta."""
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta} must be in (0, 1).")
    if not 0 <= sampling_rate <= 1:
        raise ValueError(f"sampling_rate={sampling_rate} must be in [0, 1].")
    if rounds < 0 or noise_multiplier < 0:
        raise ValueError(f"rounds={rounds} and noise_multiplier={noise_multiplier} must be >= 0.")
    event = round_event(noise_multiplier, sampling_rate, sampling, population)
    if rounds == 0 or sampling_rate == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = make_accountant(accountant, sampling)
    acc.compose(dp_accounting.SelfComposedDpEvent(event, int(rounds)))
    return float(acc.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, delta: float, sampling_rate: float, rounds: int,
                    accountant: str = "rdp", sampling: str = "poisson",
                    population: int | None = None, max_noise: float = 1e3,
                    rtol: float = 1e-3) -> float:
    """Smallest noise multiplier (within rtol) with epsilon_after <= target.

    Doubling to bracket, then bisection; epsilon is decreasing in the noise.
    The returned value is the upper end, so the budget is never exceeded.
    """
    eps = functools.partial(epsilon_after, sampling_rate=sampling_rate, rounds=rounds,
                            delta=delta, accountant=accountant, sampling=sampling,
                            population=population)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon={target_epsilon} must be > 0.")
    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        if hi >= max_noise:
            raise ValueError(
                f"target_epsilon={target_epsilon} is unreachable: even noise_multiplier="
                f"{hi:g} gives epsilon={eps(hi):.4g} (delta={delta}, rate={sampling_rate}, "
                f"rounds={rounds}); raise the target, lower rounds or sampling rate, or max_noise.")
        lo, hi = hi, min(2 * hi, max_noise)
    while hi - lo > rtol * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi


@dataclasses.dataclass
class FederationAccountant:
    """Privacy ledger of one federation: the rounds composed so far.

    The mechanism is fixed per run, so the ledger is just a round count and
    epsilon is recomputed (cached) from it; `to_dict`/`from_dict` put it in a
    checkpoint as plain JSON.
    """
    name: str
    noise_multiplier: float
    sampling_rate: float
    accountant: str = "rdp"
    sampling: str = "poisson"
    population: int | None = None
    rounds: int = 0

    def __post_init__(self):
        # plain Python numbers, so `to_dict` is JSON-ready
        self.noise_multiplier, self.sampling_rate = float(self.noise_multiplier), float(self.sampling_rate)
        self.rounds = int(self.rounds)
        if self.population is not None:
            self.population = int(self.population)
        try:  # fail at construction, not at the first log line
            round_event(self.noise_multiplier, self.sampling_rate, self.sampling, self.population)
            make_accountant(self.accountant, self.sampling)
        except ValueError as e:
            raise ValueError(f"accountant of federation {self.name!r}: {e}") from None

    @classmethod
    def from_policy(cls, policy: PrivacyPolicy, sampling_rate: float,
                    population: int | None = None) -> "FederationAccountant":
        return cls(policy.name, float(policy.noise_multiplier), float(sampling_rate),
                   policy.accountant, policy.sampling, population)

    def step(self, n: int = 1) -> None:
        self.rounds += int(n)

    def epsilon(self, delta: float, extra_rounds: int = 0) -> float:
        return epsilon_after(self.noise_multiplier, self.sampling_rate, self.rounds + extra_rounds,
                             delta, self.accountant, self.sampling, self.population)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FederationAccountant":
        return cls(**d)


def would_exceed(accountant: FederationAccountant, target_epsilon: float, delta: float,
                 rounds: int = 1) -> bool:
    """True if `rounds` more rounds would push epsilon past the target."""
    return accountant.epsilon(delta, extra_rounds=rounds) > target_epsilon
