#!/usr/bin/env bash
# Everything BENCHMARKS.md records from a lent GPU, in one go (device time is short and a fresh machine
# takes a minute to start). Each part runs under its own time limit and writes its own results, so a part
# that fails or overruns leaves the others theirs:
#   1. the CUDA tests (parity of the fused model at the paper's batch of 2048 included);
#   2. inference by the paper's GPU protocol: `effvit bench --device cuda --vs timm`, batch 2048, every
#      variant, fp16 autocast then bf16 autocast, and the all-forms table for M0 and M4;
#   3. training throughput against timm's model in the same loop.
# Fashion-MNIST training is not in it: on the H200 the training step of M0 is bound by Python and kernel
# launches (about 1,800 img/s at batch 256 whatever the input size), so 16 epochs at 128 px take about
# 10 minutes, more than a session's device time allows (BENCHMARKS.md, "GPU").
#
#   bash benchmarks/gpu_session.sh OUT        # about 8 minutes on an H200
#
# Uses the machine's own python3 (PyTorch, timm); this checkout is put on PYTHONPATH.
set -u
out=${1:?usage: gpu_session.sh OUT}
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

part tests 150 $py -m pytest -q -p no:cacheprovider -k cuda tests
bench="$py -m effvit bench --device cuda --vs timm --seconds 1.5 --rounds 4 --warmup 1 --probe 0.2"
part bench_fp16 140 $bench --scenarios gpu --out "$out/bench_fp16"
part bench_bf16 140 $bench --scenarios gpu-bf16 --out "$out/bench_bf16"
part forms 80 $py benchmarks/inference_speed.py --device cuda --skip-bench --forms-models m0,m4 \
    --seconds 0.6 --rounds 4 --out "$out/forms"
part train_throughput 50 bash -c "$py benchmarks/train_throughput.py --device cuda --img-size 224 \
    --in-chans 3 --classes 1000 --batch-size 256 --steps 8 --rounds 5 && $py benchmarks/train_throughput.py \
    --device cuda --img-size 128 --steps 8 --rounds 5"
