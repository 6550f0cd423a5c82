#!/usr/bin/env bash
# The GPU checks and benchmarks in one run with a time budget (default 8 minutes). Parts run in order
# of importance, each under its own time limit, cut to what is left of the budget, with its own log, so a part that fails or overruns
# leaves the others theirs; a part that no longer fits is skipped and says so:
#   bisect     the fused-model fault at batch 2048 (benchmarks/gpu_bisect: first wrong op call, flag sweep)
#   tests      the CUDA tests (fused-model parity at the paper batch) and the Triton kernel's tests on CUDA
#   kernel     benchmarks/kernel_speed.py: the Triton cascaded-attention kernel against the PyTorch forms,
#              every variant's stages, batch 2048 and 1 in fp16 (CUDA graphs at batch 1), 2048 in bf16
#   kernel_sweep  the kernel's num_warps x register cap on M0 and M5, stages 1-2 (which the compiler says
#              spill: `python benchmarks/kernel_speed.py --compile-only` here, no GPU needed)
#   train      training throughput against timm's model in the same loop (224 px, then 128 px)
#   bench_fp16 / bench_bf16   `effvit bench --device cuda --vs timm`, batch 2048, every variant
#   forms      the all-forms table for M0 and M4
#
#   bash benchmarks/gpu_session.sh OUT
#   PARTS="tests bench_fp16" bash benchmarks/gpu_session.sh OUT   # only some parts
#   BUDGET=470 (seconds, default) caps the whole script.
#
# The logs are packed into OUT/logs.tgz after every part (so a run cut short keeps what it did);
# OUT/summary.txt is the short table printed last.
# Uses the machine's own python3 (PyTorch, Triton, timm, pytest); this checkout is put on PYTHONPATH.
set -u
out=${1:?usage: gpu_session.sh OUT}
py=${PYTHON:-python3}
budget=${BUDGET:-470}
parts=${PARTS:-bisect tests kernel kernel_sweep train bench_fp16 bench_bf16 forms}
logs=$(mktemp -d)/logs
mkdir -p "$out" "$logs"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

pack() { tar -czf "$out/logs.tgz" -C "$(dirname "$logs")" logs 2>/dev/null; }

part() {  # part NAME SECONDS CMD...: run CMD under min(SECONDS, budget left), output to logs/NAME.log
    local name=$1 limit=$2 left=$((budget - SECONDS)) t0=$SECONDS rc
    shift 2
    case " $parts " in *" $name "*) ;; *) return ;; esac
    if ((left < 20)); then
        echo "$name: skipped, ${left} s of the budget left" | tee -a "$logs/parts.txt"
        return
    fi
    ((limit > left)) && limit=$left
    timeout "$limit" "$@" >"$logs/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$logs/parts.txt"
    pack
}

{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $py -c 'import torch, triton, timm; print("torch", torch.__version__, "cuda", torch.version.cuda,
          "triton", triton.__version__, "timm", timm.__version__)'
    lscpu | grep -E "^Model name|^CPU\(s\)"
} >"$logs/env.txt" 2>&1

part bisect 150 env SWEEP_BUDGET=140 bash benchmarks/gpu_bisect/gpu_sweep.sh "$logs/bisect"
part tests 120 $py -m pytest -q -p no:cacheprovider -n 4 --durations=10 \
    -k "cuda or kernels and not script and not hopper" tests
kernel="$py benchmarks/kernel_speed.py --device cuda --iters 10 --rounds 2"
part kernel 110 bash -c "$kernel --batch 2048,1 --dtype fp16 --json $logs/kernel_fp16.json && \
    $kernel --batch 2048 --dtype bf16 --json $logs/kernel_bf16.json"
part kernel_sweep 70 $kernel --variants m0,m5 --stages 1,2 --batch 2048 --dtype fp16 --num-warps 4,8 \
    --maxnreg 0,128 --json "$logs/kernel_sweep.json"
part train 50 bash -c "$py benchmarks/train_throughput.py --device cuda --img-size 224 --in-chans 3 \
    --classes 1000 --batch-size 256 --steps 8 --rounds 5 && $py benchmarks/train_throughput.py \
    --device cuda --img-size 128 --steps 8 --rounds 5"
bench="$py -m effvit bench --device cuda --vs timm --seconds 1.5 --rounds 4 --warmup 1 --probe 0.2"
part bench_fp16 140 $bench --scenarios gpu --out "$logs/bench_fp16"
part bench_bf16 140 $bench --scenarios gpu-bf16 --out "$logs/bench_bf16"
part forms 80 $py benchmarks/inference_speed.py --device cuda --skip-bench --forms-models m0,m4 \
    --seconds 0.6 --rounds 4 --out "$logs/forms"

{
    echo "== $(head -1 "$logs/env.txt"); $(sed -n 3p "$logs/env.txt"); $(grep -h "^torch" "$logs/env.txt")"
    cat "$logs/parts.txt"
    [ -d "$logs/bisect" ] && { echo "== bisect (logits vs the fp32 model; first wrong op calls)"
        grep -h "logits max diff" "$logs"/bisect/*.log; grep -h -m 3 "^ *[0-9]* \(addmm\|baddbmm\|bmm\|conv\)" \
        "$logs"/bisect/m0_fp16_ops.log; } 2>/dev/null
    [ -f "$logs/tests.log" ] && { echo "== tests"; grep -E "passed|failed|error" "$logs/tests.log" | tail -3; }
    [ -f "$logs/kernel.log" ] && { echo "== kernel (best PyTorch form vs best kernel form, median ms)"
        grep -E "^\| (m[0-5]|variant)" "$logs/kernel.log"; grep "MISMATCH" "$logs/kernel.log" | head -5; }
    [ -f "$logs/kernel_sweep.log" ] && { echo "== kernel_sweep (median ms per form)"
        grep -E "^m[0-5] s" "$logs/kernel_sweep.log"; }
    [ -f "$logs/train.log" ] && { echo "== train"; grep "img/s" "$logs/train.log"; }
    for b in bench_fp16 bench_bf16; do
        [ -f "$logs/$b.log" ] && { echo "== $b"; tail -12 "$logs/$b.log"; }
    done
} >"$out/summary.txt" 2>&1
cp "$out/summary.txt" "$logs/"
pack
cat "$out/summary.txt"
