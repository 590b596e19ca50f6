#!/usr/bin/env bash
# The checks that need a GPU, for a machine that has one and its own torch (no venv is
# made: the extension is built in place against whatever `$PYTHON` imports):
#   1. builds codetr._C in place with the CUDA sources for the visible GPU's architecture;
#   2. runs tests/test_cuda.py (CUDA kernels vs the references, the model and trainer on CUDA);
#   3. the CUDA op tests again under compute-sanitizer's memcheck, where it is installed;
#   4. the kernel benchmarks with CUDA timings (JSON per benchmark).
# Each step has its own time limit, so that one slow step still leaves the others' results.
# On an H200 with 16 cores: build 40 s, tests 40 s, memcheck 70 s, each benchmark 1-2 min.
# BENCHES (default: all four) names the benchmarks to run.
# Writes run.log, build.log, sanitizer.log and the benchmarks' JSON into $OUT (default: gpu_check/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1 CODETR_CUDA=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || exit 1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
echo "torch $($PY -c 'import torch; print(torch.__version__)'), TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"

start=$SECONDS
if ! timeout 300 $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    tail -n 40 "$OUT/build.log"
    echo "BUILD FAILED"
    exit 1
fi
echo "build: $((SECONDS - start)) s"
$PY -m codetr env

start=$SECONDS
timeout 180 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
echo "tests: $((SECONDS - start)) s"

if command -v compute-sanitizer >/dev/null; then
    start=$SECONDS
    timeout 120 compute-sanitizer --tool memcheck --log-file "$OUT/sanitizer.log" \
        $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "not trainer and not co_detr"
    echo "memcheck: exit $?, $((SECONDS - start)) s"
    grep -m 20 "ERROR SUMMARY\|Invalid" "$OUT/sanitizer.log"
fi

for bench in ${BENCHES:-ms_deform_attn box_ops assign roi_align}; do
    start=$SECONDS
    timeout 120 $PY benchmarks/bench_$bench.py --device cuda --repeats 10 --out "$OUT/$bench.json"
    echo "bench_$bench: $((SECONDS - start)) s"
done

