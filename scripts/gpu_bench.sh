#!/usr/bin/env bash
# The engine's GPU checks, as one prepared run on a lent GPU machine (see BENCHMARKS.md):
#   OUT=/tmp/gpu bash scripts/gpu_bench.sh      # at most ~9 min in all (T_* bound each part)
# 1. engine vs reference on a random-weight 26B-A4B-shape model cut to 4 layers, bf16 (+ compiled engine);
# 2. the GPU-only tests; 3. engine vs reference on the toy checkpoint on the GPU, batch 32 and 256;
# 4. the sharded code path at world size 1 vs the unsharded engine (issue 5).
set -u
OUT=${OUT:-/tmp/gpu}; mkdir -p "$OUT"
if [ -z "${NO_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout ${T_REAL:-180} python3 benchmarks/real_shape_bench.py --layers 4 --device cuda --dtype bfloat16 \
  --prompts 48 --batch-size 16 --max-new-tokens 512 --steps 32 --out "$OUT/real-shape.json" 2>&1 | grep -v Warning
echo "== GPU tests"
timeout ${T_TESTS:-100} python3 -m pytest -q -p no:cacheprovider -m gpu tests/engine/test_gpu.py tests/engine/test_compile.py 2>&1 | tail -15
echo "== toy checkpoint on the GPU"
for b in 32 256; do
  timeout ${T_TOY:-60} python3 benchmarks/engine_bench.py --device cuda --prompts 1024 --batch-size $b \
    --out "$OUT/toy-gpu-$b.json" 2>&1 | grep -v Warning | tail -8
done
echo "== sharded path at world size 1"
timeout ${T_PAR:-150} python3 benchmarks/parallel_bench.py gpu --layers 4 --batch 8 32 \
  --out "$OUT/parallel-gpu.json" 2>&1 | grep -v Warning | tail -20
