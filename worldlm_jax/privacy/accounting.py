"""Privacy accounting over Google's dp_accounting: what DP-FedAvg rounds cost in
epsilon, the noise that meets a budget, and a per-federation ledger.

Host side, plain Python. A federation's rounds are one fixed mechanism (the
Gaussian on the clipped sum, `privacy.dp_release`) under the federation's child
sampling, so the ledger (`FederationAccountant`) is a round count and epsilon is
recomputed, cached, from it: RDP (fast, conservative) or PLD (tighter).
`dp_ledger.py` keeps one per DP federation of a topology.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import dp_accounting
from dp_accounting import pld, rdp


SAMPLINGS = ("poisson", "fixed", "full")
ACCOUNTANTS = ("rdp", "pld")


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
