"""Differential privacy per federation: the mechanism inside the round, the
accounting outside it.

    mechanism   clipping, the noised DP-FedAvg release, adaptive clipping (JAX)
    accounting  dp_accounting: epsilon of a number of releases, noise for a budget
    ledger      per-federation accountants: who releases, at which level, and
                (epsilon, delta) so far; calibration to privacy.target_epsilon

Which parts leave a DP federation, and whether a config is refused, is decided
in `engine.releases`. The names below are stable; the modules' other names are not.
"""
from worldlm_jax.privacy import accounting, ledger, mechanism

__all__ = ["mechanism", "accounting", "ledger"]
