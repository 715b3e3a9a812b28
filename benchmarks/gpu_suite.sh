#!/usr/bin/env bash
# The GPU suite, one command on a CUDA machine (about 10 minutes on one GPU): the CUDA-marked tests, B1
# (fedlora vs PEFT step time), B2 (DP overhead, Opacus) and quantised bases against bf16 on SmolLM2-135M
# and Gemma-3-270M, and the vectorised-clients round on SmolLM2-135M. Writes results/*_gpu.json (each
# names the device) and prints one table of them all.
#
#     FEDLORA_DATA_DIR=../shared/data bash benchmarks/gpu_suite.sh
#
# --dry-run runs every step on the CPU at a tiny size (tiny random models of the same architectures) and
# writes to a fresh temporary folder instead of results/: it checks the suite without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}

if [ "${1:-}" = "--dry-run" ]; then
    DRY=(--dry-run)
    OUT=$(mktemp -d)
else
    DRY=()
    OUT=results
    if ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
        echo "gpu_suite: no CUDA device here; 'bash benchmarks/gpu_suite.sh --dry-run' checks the suite on the CPU" >&2
        exit 2
    fi
fi
export PYTHONUNBUFFERED=1

# The presets whose weights are installed (a dry run builds tiny ones); a missing one is named, not fatal.
MODELS=($("$PYTHON" benchmarks/gpu_table.py --available "${DRY[@]}" smollm2-135m gemma3-270m))
FAILED=()

run() {  # run NAME SECONDS COMMAND...: a failing or overlong step is reported and the suite goes on
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$@" || FAILED+=("$name")
}

# every CUDA-marked test lives in tests/test_cuda.py (tests/test_gpu_suite.py checks that no other file has one)
run "CUDA-marked tests" 200 "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py \
    --junitxml="$OUT/cuda_tests_gpu.xml"
if [ ${#MODELS[@]} -gt 0 ]; then
    run "B1 throughput" 150 "$PYTHON" benchmarks/throughput.py "${DRY[@]}" --models "${MODELS[@]}" \
        --batch 8 --tokens 256 --repeats 5 --out "$OUT/throughput_gpu.json"
    run "B2 DP overhead" 150 "$PYTHON" benchmarks/dp_overhead.py "${DRY[@]}" --models "${MODELS[@]}" \
        --batch 8 --tokens 256 --repeats 5 --out "$OUT/dp_overhead_gpu.json"
fi
run "vectorised clients" 100 "$PYTHON" benchmarks/parallel_clients.py "${DRY[@]}" --setups smollm2-135m/gsm8k/cuda \
    --settings 10x8 10x32 --out "$OUT/parallel_clients_gpu.json"
if [ ${#MODELS[@]} -gt 0 ]; then
    run "quantised bases" 100 "$PYTHON" benchmarks/quantization.py "${DRY[@]}" --models "${MODELS[@]}" \
        --batch 8 --tokens 256 --repeats 5 --out "$OUT/quantization_gpu.json"
fi

"$PYTHON" benchmarks/gpu_table.py "$OUT" || FAILED+=("table")
if [ ${#FAILED[@]} -gt 0 ]; then
    printf 'gpu_suite: failed: %s\n' "${FAILED[@]}" >&2
    exit 1
fi
echo "gpu_suite: all steps passed; results in $OUT"
