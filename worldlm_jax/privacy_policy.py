"""Validated DP settings of one federation (`PrivacyPolicy`), and their stacking
into the per-federation arrays that `privacy.dp_mean` and
`privacy.adaptive_clip_update` take.

Host side, plain Python: a bad setting fails here, naming the federation and the
fix, before anything compiles. `PrivacyPolicy.calibrate` asks `accounting.py` for
the noise that meets a budget; with adaptive clipping, part of the accounted noise
pays for the clip-count query (`privacy.split_noise_multiplier`).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, NamedTuple, NoReturn, Sequence

import numpy as np

from worldlm_jax.accounting import ACCOUNTANTS, SAMPLINGS, FederationAccountant, calibrate_noise
from worldlm_jax.privacy import split_noise_multiplier


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


def accountant_for(policy: PrivacyPolicy, sampling_rate: float,
                   population: int | None = None) -> FederationAccountant:
    """The ledger of a federation that releases under `policy`."""
    return FederationAccountant(policy.name, float(policy.noise_multiplier), float(sampling_rate),
                                policy.accountant, policy.sampling, population)
