#!/usr/bin/env bash
# Everything BENCHMARKS.md records from a lent GPU, in one go (device time is short and a fresh machine
# takes minutes to start). Each part runs under its own time limit, so a part that fails or overruns
# leaves the others their results:
#   1. the CUDA tests;
#   2. inference by the paper's GPU protocol: `effvit bench --device cuda --vs timm` (batch 2048, fp16 and
#      bf16 autocast, every variant) and the all-forms table for M0 and M4;
#   3. training throughput against timm's model in the same loop;
#   4. M0 from scratch on Fashion-MNIST at 128 and 96 px, three runs side by side on the one GPU.
#
#   bash benchmarks/gpu_session.sh OUT [FASHION_MNIST_DIR]
#
# Uses the machine's own python3 (PyTorch, timm); this checkout is put on PYTHONPATH.
set -u
out=${1:?usage: gpu_session.sh OUT [FASHION_MNIST_DIR]}
data=${2:-/usr/share/datasets/fashion-mnist}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

part() {  # part NAME SECONDS CMD...: run CMD under a limit, output to $out/NAME.log, say how it ended
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/parts.txt"
}

{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $py -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)'
    lscpu | grep -E "^Model name|^CPU\(s\)"
} >"$out/env.txt" 2>&1

part tests 90 $py -m pytest -q -p no:cacheprovider -k cuda tests
part bench 170 $py -m effvit bench --device cuda --vs timm --seconds 1.5 --rounds 4 --warmup 1 \
    --probe 0.2 --out "$out/bench"
part forms 80 $py benchmarks/inference_speed.py --device cuda --skip-bench --forms-models m0,m4 \
    --seconds 0.6 --rounds 4 --out "$out/forms"
part train_throughput 50 bash -c "$py benchmarks/train_throughput.py --device cuda --img-size 224 \
    --in-chans 3 --classes 1000 --batch-size 256 --steps 8 --rounds 5 && $py benchmarks/train_throughput.py \
    --device cuda --img-size 128 --steps 8 --rounds 5"

# Fashion-MNIST: the shipped recipe, only the input size (and for one run the length) changed
train() {  # train NAME OVERRIDES...
    local name=$1
    shift
    part "fmnist_$name" 230 $py -m effvit train --config fashion_mnist_m0 --name "$name" --no-progress \
        run.device=cuda run.threads=2 data.num_workers=4 "data.root=$data" "run.output=$out/fmnist" "$@"
}
train m0-128px model.img_size=128 &
train m0-128px-24ep model.img_size=128 sched.epochs=24 &
train m0-96px model.img_size=96 &
wait
rm -f "$out"/fmnist/*/*.pth  # checkpoints stay behind: the logs are the result
