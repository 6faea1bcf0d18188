"""Test set-up before JAX starts: fake 8 CPU devices, so sharding is exercised on CPU;
turn XLA's transpose folding off, so bf16 products take their AMX form (model.CPU_BF16_XLA_FLAG;
the form without the flag is tested by patching kernels.cpu_transposes_materialise); and
compile for compile time. The suite compiles hundreds of small rounds and runs each a few
steps, so compiling dominates it:
- LLVM's optimisation level 0 takes about 30% less CPU time for a tiny run (40 s -> 27 s) with
  the same perplexity to the last digit, since it changes neither XLA's HLO passes nor its
  buffer assignment (memory_estimate._COMPILER_OPTIONS uses it for the same reason), only how
  LLVM optimises the emitted loops;
- XLA CPU's older loop emitters instead of its MLIR fusion emitters
  (--xla_cpu_use_fusion_emitters=false) take another third off XLA's compile time of an
  example run (13.3 s -> 8.7 s of backend compilation), again with the same perplexity to the
  last digit: the same fused computations, emitted to LLVM by a shorter path.
Subprocesses the tests start inherit the flags (cli_helpers.subprocess_env)."""
import os

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_disable_hlo_passes=transpose-folding"
    + " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One XLA compilation per distinct program in the session: many tests build the same
# small rounds from fresh closures (a new jit each time), and JAX's persistent cache
# turns every compilation after the first of a program into a load. The directory is
# set before the xdist workers start, so they share it; it is fresh for each session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="worldlm-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)  # the creator cleans up
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


@pytest.fixture(autouse=True)
def _session_compilation_cache():
    """A test that points the compilation cache elsewhere (a run with its own
    run.compilation_cache sets it process-wide) hands the session's back after."""
    yield
    import jax

    from worldlm_jax.run import training

    if (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir) != (
            True, os.environ["JAX_COMPILATION_CACHE_DIR"]):
        training.enable_compilation_cache(os.environ["JAX_COMPILATION_CACHE_DIR"])
