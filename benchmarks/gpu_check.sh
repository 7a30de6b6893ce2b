#!/usr/bin/env bash
# One prepared GPU check for the hot path: every GPU step of a session with one H100/H200, in at
# most 8 minutes, no network. PyTorch must be installed; anything else travels as wheels in
# ./.whl (installed offline first). Each step has its own time limit; every step's log and table
# goes to OUT_DIR, and OUT_DIR/summary.txt has one line per step with its exit code and seconds.
#   1. the CUDA test subset: grouped experts (bf16, no host sync), flex vs dense attention
#      (forward and gradients), compile and recompute, FP8 backends;
#   2. benchmarks/bench_model.py on CUDA in bf16 (the ~1B-activated size, medium, and medium on one
#      row of 2048 and 4096 tokens: attention memory at L and 2L), moepipe
#      against torchtitan's DeepSeek-V3 model when torchtitan travels as a wheel (else moepipe
#      rows only, the reason printed with the table);
#   3. benchmarks/bench_fp8.py --quick.
# --cpu runs the same plumbing at tiny sizes on the CPU (CI keeps it from rotting).
#
#   bash benchmarks/gpu_check.sh [--cpu] [OUT_DIR]      (default OUT_DIR: gpu_check_out)
set -uo pipefail

MODE=cuda
if [ "${1:-}" = "--cpu" ]; then MODE=cpu; shift; fi
OUT=$(mkdir -p "${1:-gpu_check_out}" && cd "${1:-gpu_check_out}" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
: > "$OUT/summary.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc ${limit}s-limit $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.txt"
}

if compgen -G ".whl/*.whl" > /dev/null; then
    step wheels 30 python -m pip install --no-index --no-deps .whl/*.whl
fi
python -c "import torch; print(torch.__version__, torch.cuda.is_available())" > "$OUT/env.txt" 2>&1

if [ "$MODE" = cpu ]; then
    step tests 120 python -m pytest -q -x -p no:cacheprovider tests/unit/test_moe.py::test_grouped_gemm_equals_the_expert_loop_on_cpu \
        tests/unit/test_attention_paths.py::test_flex_forward_equals_dense_on_cpu
    step bench_model 120 python benchmarks/bench_model.py --size micro --rounds 1 --device cpu --out "$OUT"
    step bench_fp8 120 python benchmarks/bench_fp8.py --device cpu --no-compile --skip step \
        --model-config configs/tiny.yaml --set data.seq_len=32 model.max_seq_len=32
else
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    step tests 150 python -m pytest -q -p no:cacheprovider tests/unit/test_moe.py tests/unit/test_attention_paths.py \
        tests/unit/test_block_policies.py tests/unit/test_fp8_backends.py tests/unit/test_fp8_emulate.py
    step bench_model 190 python benchmarks/bench_model.py --size b1 medium medium-2k medium-4k --rounds 4 --out "$OUT"
    step bench_fp8 140 python benchmarks/bench_fp8.py --quick
fi
cp "$OUT/bench_fp8.log" "$OUT/bench_fp8.md" 2>/dev/null
! grep -qv " rc=0 " "$OUT/summary.txt"
