#!/usr/bin/env bash
# The GPU checks, in one run on a one-GPU machine (16 cores): the product's GPU path, GPU
# scoring throughput, and the label-efficiency benchmark on the GPU. Results go to $OUT
# (default runs/bench/gpu); docs/GPU.md says what came out.
#
#   bash bench/gpu.sh                 # on a machine with the project installed
#
# On a bare machine with PyTorch but no Ray (the device machine), .gpu/ holds what is missing,
# prepared beside the checkout: the cp312 wheels of Ray 2.60 (its Java jar removed, 45 MB) and
# of the project's other pure dependencies, and a copy of ../shared/data/structures_10A.
# Budget: about 8.5 minutes, each step under its own timeout so that the results still come back.
set -u
OUT=${OUT:-runs/bench/gpu}
WORK=${WORK:-/tmp/cryoal-gpu}
LE_SECONDS=${LE_SECONDS:-270}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
if [ -d .gpu ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
    export CRYOAL_SHREC_MAPS=$PWD/.gpu/structures_10A
fi
PY=${PY:-python3}
step() { echo; echo "== $(date -u +%H:%M:%S) $*"; }

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, ray; print('torch', torch.__version__, torch.cuda.get_device_name(0), '| ray', ray.__version__)"

step "pool: SHREC'21 13 structures, SNR 0.05 (label-efficiency set)"
$PY -c "from pathlib import Path; from bench.label_efficiency import simulate; simulate('shrec13_snr0.05', Path('$WORK/le'))"
POOL=$WORK/le/pools/shrec13_snr0.05

step "GPU scoring throughput"
timeout 60 $PY bench/gpu_scoring.py --rows 4096 --batches 256 1024 --results "$WORK/gpu_scoring.csv"

step "the product's GPU path: orchestrator/run.py on a local Ray, Ray Train on the GPU (bf16), Ray Data scoring actors on the GPU"
timeout 120 $PY orchestrator/run.py --run-dir "$WORK/campaign" --set data.pool="$POOL" \
    --set train.num_workers=1 --set train.use_gpu=true --set train.amp=bf16 --set train.cpus_per_worker=4 \
    --set score.actors=2 --set score.gpus_per_actor=0.5 --set score.cpus_per_actor=2 --set score.batch_size=256 \
    --set budget.counts=[195,390] --set strategy.name=ema_kl
cp "$WORK"/campaign/metrics.csv "$WORK/campaign_metrics.csv" 2>/dev/null

step "label efficiency on the GPU (wave 1 and 2, 5 seeds) and three larger full-supervision recipes"
GPU_SETS=(--set train.amp=bf16 --set score.gpus_per_actor=1)
for v in e60:"--set train.epochs=60" w32e60:"--set model.width=32 --set train.epochs=60" \
         w32e100:"--set model.width=32 --set train.epochs=100"; do
    name=${v%%:*}; mkdir -p "$WORK/$name"; ln -sfn "$WORK/le/pools" "$WORK/$name/pools"
    # shellcheck disable=SC2086
    timeout "$LE_SECONDS" $PY bench/label_efficiency.py --strategies full --seeds 0 1 --jobs 2 \
        --out "$WORK/$name" --results "$WORK/recipe_$name.csv" --plots "$WORK" "${GPU_SETS[@]}" ${v#*:} \
        > "$WORK/recipe_$name.log" 2>&1 &
done
timeout "$LE_SECONDS" $PY bench/label_efficiency.py --jobs 10 --seeds 0 1 2 3 4 \
    --strategies random ema_kl ema_kl_reverse entropy badge bald hal ema_kl_semi \
    --out "$WORK/le" --results "$WORK/label_efficiency_gpu.csv" --plots "$WORK" "${GPU_SETS[@]}"
wait

step results
tail -n 3 "$WORK"/recipe_*.log
for f in "$WORK"/recipe_*.csv; do echo "$f"; cat "$f"; done
tar czf "$OUT/gpu_results.tgz" -C "$WORK" --exclude='*/pools' --exclude='*.pt' --exclude='*/ray_train' \
    --exclude='*.parquet' --exclude='*.star' --exclude=learning_curve.png --exclude='*/campaign/logs' .
ls -la "$OUT"
