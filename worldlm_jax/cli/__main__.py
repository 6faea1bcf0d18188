"""`python -m worldlm_jax.cli ...` is the `worldlm` command."""
import sys

from worldlm_jax.cli.parser import main

sys.exit(main())
