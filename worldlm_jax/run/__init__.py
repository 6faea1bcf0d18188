"""One run from a config, in call order:

    training         train(config, workdir, callbacks): the entry point
    experiment       build_experiment: data, model, tree and compiled round of a config
    blueprint        the data-free half of a run (its tree, plan, spec, shapes)
    memory_plan      whether a run fits its devices (memory_estimate: the estimate)
    loop             RunLoop: resume, rounds, evaluations, checkpoints, the stop
    records          per-round records, summary.json, the printed table
    communication    bytes each edge of the tree carries
    distributed      jax.distributed set-up for multi-process runs
    dirs             a run directory and what resuming it requires

The names below are stable; the modules' other names are not.
"""
from worldlm_jax.run.training import train

__all__ = ["train"]
