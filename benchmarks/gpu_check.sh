#!/usr/bin/env bash
# One-GPU check (H100), about 4 minutes: workload W vmap vs sequential, and
# the 125m preset in bfloat16 (seq 512, batch 8, 4 clients, 2 local steps) for MFU.
# Assumes `python` already has jax[cuda] + the project's deps (no internet there).
# Run from the repository root:   OUT=/some/dir bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
{
  date -u; hostname
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
  $PY -c "import jax; print('jax', jax.__version__, jax.devices())"
} > "$OUT/env.txt" 2>&1

# 1. Workload W (f32), chunk 0 (vmap all 16 clients) vs 1 (lax.map, one at a time), interleaved.
timeout 150 $PY benchmarks/throughput.py --devices 0 --chunk 0,1 --rounds 5 \
  > "$OUT/w_vmap_vs_seq.txt" 2>&1
echo "W rc=$?" >> "$OUT/env.txt"

# 2. 125m in bfloat16, seq 512, batch 8, 4 clients x 2 steps, vmap: MFU vs a bf16 matmul peak;
#    attention through jax.nn.dot_product_attention (cuDNN where available) vs the explicit kernel.
timeout 200 $PY benchmarks/throughput.py --devices 0 --preset 125m --dtype bfloat16 --seq 512 --batch 8 \
  --clients 4 --steps 2 --chunk 0 --rounds 3 --no-clients-alone --attention fused,explicit \
  > "$OUT/m125_bf16.txt" 2>&1
echo "125m rc=$?" >> "$OUT/env.txt"
grep -h '^{' "$OUT"/w_vmap_vs_seq.txt "$OUT"/m125_bf16.txt > "$OUT/results.jsonl"
cat "$OUT/env.txt" "$OUT/w_vmap_vs_seq.txt" "$OUT/m125_bf16.txt" | grep -v '^{' | tail -40
