"""A learning-rate schedule: an optax warmup + cosine decay registered by name.

Schedules multiply a federation's `client_lr` (leaf federations) or
`server_lr` and are evaluated inside the compiled round from the root round
index. Built-ins take their lengths from the policy (`warmup_rounds`,
`decay_rounds`, `min_lr_ratio`: arrays, so a vectorised sweep over them is one
program); an optax schedule registered with `register_optax` carries its own.

    worldlm train --plugin scripts/examples/schedule.py --config scripts/examples/schedule.yaml
"""
import optax

from worldlm_jax.plugins import schedules

# 0 -> 1 over 2 rounds, then a cosine down to 0.1 at round 6
WARMUP_COSINE = optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=1.0, warmup_steps=2,
                                                   decay_steps=6, end_value=0.1)
schedules.register_optax("optax_warmup_cosine", WARMUP_COSINE)
