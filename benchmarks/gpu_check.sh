#!/usr/bin/env bash
# The prepared GPU check: what one H100/H200 session (15 minutes with start-up, at most 10 per
# command, 8 files back, no network) should run first. Steps in order of value, each under its own
# time limit (the limits sum to at most 8 minutes; `--plan` prints them):
#   env           torch.__version__, CUDA, GPU name and capability, written first to OUT/env.txt;
#   model_b1      bench_model.py at the ~1.4B-activated size (the one size that measures the GPU
#                 rather than Python overhead): moepipe against torchtitan when it imports with this
#                 torch, else against the same model in plain eager PyTorch (per-expert loop, SDPA);
#                 MFU against the GPU's dense bf16 peak;
#   fp8_e2e       bench_fp8.py end to end, BF16 vs FP8 without Transformer Engine (rowwise through
#                 torch._scaled_grouped_mm, blockwise through scaled_mm), eager, warm-up untimed;
#   device_step   device_step.py: one training step with FP8 on, the expert all-to-all dispatcher
#                 forced through NCCL on a world of one;
#   tests         the CUDA tests: a whole step under torch.cuda.set_sync_debug_mode("error"),
#                 grouped experts, flex vs dense attention, FP8 backends; in one process without
#                 the suite's addopts (its xdist options need pytest-xdist >= 3.6);
#   model_medium  bench_model.py at the medium size.
# Output is unbuffered and every benchmark appends each table row to OUT the moment it is
# measured, so a step killed by its limit still returns what it measured. OUT holds at most 8
# files: env.txt, summary.txt (one line per step: exit code, limit, seconds), bench_model.md,
# bench_fp8.md, device_step.md and logs.tar.gz (every step's log, re-packed after each step).
# Wheels in ./.whl (e.g. torchtitan and its imports) are installed offline first when present.
# --cpu runs the same steps at tiny sizes on the CPU (tests/unit/test_gpu_check.py keeps it working).
#
#   bash benchmarks/gpu_check.sh [--cpu | --plan] [OUT_DIR]      (default OUT_DIR: gpu_check_out)
set -uo pipefail

MODE=cuda
case "${1:-}" in
    --cpu) MODE=cpu; shift ;;
    --plan) MODE=plan; shift ;;
esac
export PYTHONUNBUFFERED=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
BUDGET=480   # seconds: the step limits of a CUDA run sum to at most this

NAMES=() LIMITS=() CMDS=()
add() {  # add NAME LIMIT COMMAND: one step
    NAMES+=("$1") LIMITS+=("$2") CMDS+=("$3")
}

if [ "$MODE" = cpu ]; then
    MICRO="--set data.seq_len=32 model.max_seq_len=32 train.micro_batch_size=1 model.vocab_size=512 data.tokenizer=bpe:512"
    add env 30 "python benchmarks/gpu_env.py cpu"
    add model_b1 240 "python benchmarks/bench_model.py --size micro --rounds 1 --device cpu --no-memory --out \$OUT"
    add fp8_e2e 240 "python benchmarks/bench_fp8.py --device cpu --no-compile --skip gemm --model-config configs/tiny.yaml $MICRO --out \$OUT/bench_fp8.md"
    add device_step 240 "python benchmarks/device_step.py --device cpu --fp8 auto --out \$OUT/device_step.md --set model.num_layers=2 data.seq_len=32"
    add tests 240 "python -m pytest -q -o addopts= -p no:cacheprovider tests/unit/test_host_syncs.py tests/unit/test_collective_sites.py tests/unit/test_moe.py::test_grouped_gemm_equals_the_expert_loop_on_cpu tests/unit/test_attention_paths.py::test_flex_forward_equals_dense_on_cpu"
    add model_medium 240 "python benchmarks/bench_model.py --size micro --models moepipe moepipe-loop --rounds 1 --device cpu --no-memory --out \$OUT"
else
    if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
        add wheels 20 "python -m pip install --no-index --no-deps .whl/*.whl"
    fi
    add env 15 "python benchmarks/gpu_env.py cuda && nvidia-smi"
    add model_b1 160 "python benchmarks/bench_model.py --size b1 --rounds 3 --models moepipe torchtitan --out \$OUT"
    add fp8_e2e 100 "python benchmarks/bench_fp8.py --quick --skip gemm grouped --no-compile --recipes rowwise blockwise --out \$OUT/bench_fp8.md"
    add device_step 50 "python benchmarks/device_step.py --device cuda --fp8 rowwise --out \$OUT/device_step.md"
    add tests 80 "python -m pytest -q -o addopts= -p no:cacheprovider tests/unit/test_host_syncs.py tests/unit/test_moe.py tests/unit/test_attention_paths.py tests/unit/test_fp8_backends.py"
    add model_medium 55 "python benchmarks/bench_model.py --size medium --rounds 3 --models moepipe torchtitan --out \$OUT"
fi

TOTAL=0
for limit in "${LIMITS[@]}"; do TOTAL=$((TOTAL + limit)); done
if [ "$MODE" = plan ]; then
    for i in "${!NAMES[@]}"; do printf '%-13s %4ss  %s\n' "${NAMES[$i]}" "${LIMITS[$i]}" "${CMDS[$i]}"; done
    echo "total ${TOTAL}s of a ${BUDGET}s budget"
    [ "$TOTAL" -le "$BUDGET" ]
    exit
fi

OUT=$(mkdir -p "${1:-gpu_check_out}" && cd "${1:-gpu_check_out}" && pwd)
export OUT
LOGS=$(mktemp -d)
cd "$ROOT"
: > "$OUT/summary.txt"
for i in "${!NAMES[@]}"; do
    name=${NAMES[$i]} limit=${LIMITS[$i]}
    start=$(date +%s)
    timeout "$limit" bash -c "${CMDS[$i]}" > "$LOGS/$name.log" 2>&1
    rc=$?
    [ "$name" = env ] && cp "$LOGS/env.log" "$OUT/env.txt"
    echo "$name rc=$rc ${limit}s-limit $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.txt"
    tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .
done
rm -rf "$LOGS"
! grep -qv " rc=0 " "$OUT/summary.txt"
