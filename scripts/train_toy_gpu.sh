#!/usr/bin/env bash
# Train toy-checkpoint candidates side by side on one GPU, then grade each on CPU.
# Run from the repo root on a GPU machine (the device session's script; see BENCHMARKS.md):
#   BUDGET=330 OUT=/tmp/out bash scripts/train_toy_gpu.sh
# Wheels for packages the GPU image lacks may sit in .whl/ (installed to /tmp/site first).
set -u
OUT=${OUT:-/tmp/toy-train}; BUDGET=${BUDGET:-300}; DEVICE=${DEVICE:-cuda}; CK=${CK:-/tmp/ck}; LOGS=${LOGS:-/tmp/toy-logs}
mkdir -p "$OUT" "$CK" "$LOGS"
if [ -z "${NO_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" || exit 1

train() {  # name, then train.py options
  local name=$1; shift
  OMP_NUM_THREADS=1 python3 -m dgbatch.toy.train --out "$CK/$name" --device "$DEVICE" --workers 3 --layers 5 \
    --time-budget "$BUDGET" --steps 1000000 --save-every 2000 "$@" >"$LOGS/train-$name.log" 2>&1 &
}
train A --init-from models/toy-diffusiongemma --batch-size 256 --lr 1.5e-3 --count-weight 0.6 --eos-canvas-p 0.5
train B --batch-size 512 --lr 3e-3
train C --batch-size 256 --lr 3e-3 --count-weight 0.6 --eos-canvas-p 0.5
train D --init-from models/toy-diffusiongemma --batch-size 512 --lr 1e-3 --count-weight 0.7 --eos-canvas-p 0.6
wait
for n in A B C D; do tar -C "$CK" -cf "$OUT/ck-$n.tar" "$n"; done  # first, so a slow grading loses nothing
for n in A B C D; do grep -v Writing "$LOGS/train-$n.log" | tail -n 2; done
for n in A B C D; do
  ( OMP_NUM_THREADS=2 timeout 80 python3 -m dgbatch.toy.evaluate "$CK/$n" --n 210 --seed 1234 >"$LOGS/eval-$n.json" 2>/dev/null
    OMP_NUM_THREADS=2 timeout 80 python3 -m dgbatch.toy.evaluate "$CK/$n" --n 600 --seed 99 >"$LOGS/eval600-$n.json" 2>/dev/null ) &
done
wait
for n in A B C D; do
  python3 -c "import json,sys; a=json.load(open(sys.argv[1])); b=json.load(open(sys.argv[2])); print(sys.argv[3], 'seed1234', round(a['accuracy'],3), {k: round(v,3) for k,v in a['per_task'].items()}, 'tpf', round(a['mean_tokens_per_forward'],2), '| seed99 n600', round(b['accuracy'],3), {k: round(v,3) for k,v in b['per_task'].items()})" "$LOGS/eval-$n.json" "$LOGS/eval600-$n.json" $n
done
tar -C "$LOGS" -cf "$OUT/logs.tar" .
