#!/usr/bin/env bash
# One-GPU check (H100/H200), about 7 minutes: workload W vmap vs sequential at 16 and 64
# clients, the 125m preset in bfloat16 (seq 512, batch 8, 4 clients, 2 local steps) for MFU
# with fused (cuDNN) and explicit attention, and one 400m round in bfloat16.
# Assumes `python` already has jax[cuda] + the project's deps (no internet there).
# Run from the repository root:   OUT=/some/dir bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
{
  date -u; hostname
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
  $PY -c "import jax; print('jax', jax.__version__, jax.devices())"
} > "$OUT/env.txt" 2>&1

# 1. Workload W (f32), chunk 0 (vmap all clients) vs 1 (lax.map, one at a time), interleaved;
#    16 clients (the CPU workload) and 64 (enough work per round to fill a large GPU).
timeout 110 $PY benchmarks/throughput.py --devices 0 --chunk 0,1 --rounds 5 \
  > "$OUT/w16_vmap_vs_seq.txt" 2>&1
echo "W16 rc=$?" >> "$OUT/env.txt"
timeout 110 $PY benchmarks/throughput.py --devices 0 --chunk 0,1 --rounds 3 --clients 64 --no-clients-alone \
  > "$OUT/w64_vmap_vs_seq.txt" 2>&1
echo "W64 rc=$?" >> "$OUT/env.txt"

# 2. 125m in bfloat16, seq 512, batch 8, 4 clients x 2 steps, vmap: MFU vs a bf16 matmul peak;
#    attention through jax.nn.dot_product_attention (cuDNN where available) vs the explicit kernel.
timeout 170 $PY benchmarks/throughput.py --devices 0 --preset 125m --dtype bfloat16 --seq 512 --batch 8 \
  --clients 4 --steps 2 --chunk 0 --rounds 3 --no-clients-alone --attention fused,explicit \
  > "$OUT/m125_bf16.txt" 2>&1
echo "125m rc=$?" >> "$OUT/env.txt"

# 3. 400m in bfloat16, same shape of round, fused attention.
timeout 150 $PY benchmarks/throughput.py --devices 0 --preset 400m --dtype bfloat16 --seq 512 --batch 8 \
  --clients 4 --steps 2 --chunk 0 --rounds 2 --no-clients-alone --attention fused \
  > "$OUT/m400_bf16.txt" 2>&1
echo "400m rc=$?" >> "$OUT/env.txt"

grep -h '^{' "$OUT"/w16_vmap_vs_seq.txt "$OUT"/w64_vmap_vs_seq.txt "$OUT"/m125_bf16.txt "$OUT"/m400_bf16.txt \
  > "$OUT/results.jsonl"
cat "$OUT/env.txt"; for f in "$OUT"/w16_vmap_vs_seq.txt "$OUT"/w64_vmap_vs_seq.txt "$OUT"/m125_bf16.txt \
  "$OUT"/m400_bf16.txt; do echo "== $f"; grep -v '^{' "$f" | tail -14; done
