"""Test set-up before JAX starts: fake 8 CPU devices, so sharding is exercised on CPU, and
turn XLA's transpose folding off, so bf16 products take their AMX form (model.CPU_BF16_XLA_FLAG;
the form without the flag is tested by patching kernels.cpu_transposes_materialise)."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_disable_hlo_passes=transpose-folding"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
