"""A server optimizer: FedAvg with Nesterov momentum 0.95 (FedAvgM, Hsu et al. 2019;
the built-in `nesterov` uses 0.9), registered by name and chosen per federation in
a tree policy.

A server optimizer is any optax transformation built with learning rate 1: the
engine feeds it the pseudo-gradient -mean(child updates) and multiplies its
output by the federation's own `server_lr` (and schedule).

    worldlm train --plugin scripts/examples/server_optimizer.py --config scripts/examples/server_optimizer.yaml
"""
import optax

from worldlm_jax.plugins import optimizers

optimizers.register("nesterov95", lambda: optax.sgd(1.0, momentum=0.95, nesterov=True))
