"""The `worldlm` command (entry point `worldlm_jax.cli:main`).

    parser     the argument parser and main()
    commands   train, eval, sweep, report, presets

The names below are stable; the modules' other names are not.
"""
from worldlm_jax.cli.parser import main

__all__ = ["main"]
