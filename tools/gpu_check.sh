#!/usr/bin/env bash
# The GPU check in one call, from the repository root, on a machine with one CUDA GPU:
#
#     OUT=/tmp/gpu_check bash tools/gpu_check.sh
#
# 1. the machine and the packages (torch, numpy, pillow, tqdm, pytest; timm for one table);
# 2. python bench.py --analysis --counts=0: analyze.py --metric all against plain forwards, and
#    a Hessian-vector product against a forward+backward, on the GPU (tiny/4 and B/16; 81 s on
#    an H200 with 16 host cores);
# 3. the CUDA tests, tests/test_cuda.py (4.5 minutes on an H200);
# 4. python bench.py --gpu: the MD step of ViT-B/16 at batch 128 and 64, bf16 + compile and
#    eager, teacher share, ours vs timm, peak memory; the key rows first (about 3 minutes on an
#    H100, most of it torch.compile).
# Each part has a time limit (ANALYSIS_TIMEOUT, TEST_TIMEOUT, BENCH_TIMEOUT seconds: 200, 360
# and 210 by default) so that a slow part does not starve the next; BENCH_ARGS go to bench.py
# --gpu (e.g. "--batch=128 --steps=10"). Logs go to $OUT (env.txt, analysis.txt, tests.txt,
# bench.txt); the rows and the test results are printed again at the end. No network.
set -u
if [ $# -gt 0 ] || ! nvidia-smi -L > /dev/null 2>&1; then  # it takes no arguments; a GPU is needed
  echo "error: usage: OUT=DIR bash tools/gpu_check.sh (no arguments) on a machine with a CUDA GPU" \
       "(nvidia-smi -L lists it); settings are environment variables, see the comment above" >&2
  exit 1
fi
OUT=${OUT:-out/gpu_check}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

{
    nvidia-smi -L
    $PYTHON - <<'PY'
import numpy, PIL, pytest, torch, tqdm
print("torch", torch.__version__, "CUDA", torch.version.cuda, "sees", torch.cuda.device_count(), "GPU(s)")
print("numpy", numpy.__version__, "pillow", PIL.__version__, "tqdm", tqdm.__version__,
      "pytest", pytest.__version__)
try:
    import timm
    print("timm", timm.__version__)
except ImportError:
    print("timm missing: bench.py skips the timm rows")
PY
} 2>&1 | tee "$OUT/env.txt"

SECONDS=0
timeout --kill-after=10 "${ANALYSIS_TIMEOUT:-200}" $PYTHON bench.py --analysis --counts=0 2>&1 \
    | tee "$OUT/analysis.txt"
status=${PIPESTATUS[0]}
echo "bench.py --analysis: exit $status after $SECONDS s (124: stopped at the time limit)" \
    | tee -a "$OUT/analysis.txt"

SECONDS=0
timeout --kill-after=10 "${TEST_TIMEOUT:-360}" \
    $PYTHON -m pytest -v -rs --durations=0 -p no:cacheprovider tests/test_cuda.py 2>&1 \
    | tee "$OUT/tests.txt"
status=${PIPESTATUS[0]}
echo "tests/test_cuda.py: exit $status after $SECONDS s (124: stopped at the time limit)" \
    | tee -a "$OUT/tests.txt"

SECONDS=0
timeout --kill-after=10 "${BENCH_TIMEOUT:-210}" $PYTHON bench.py --gpu ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt"
status=${PIPESTATUS[0]}
echo "bench.py --gpu: exit $status after $SECONDS s (124: stopped at the time limit)" \
    | tee -a "$OUT/bench.txt"

echo
echo "===== summary"
cat "$OUT/env.txt"
grep -E "^(analysis|eigenvalues of|Hessian-vector|bench.py --analysis)" "$OUT/analysis.txt"
grep -E "(PASSED|FAILED|ERROR|SKIPPED)|s (call|setup) |passed|failed|tests/test_cuda.py: exit" \
    "$OUT/tests.txt" | tail -n 30
grep -E "^(machine|timm|MD |ours vs timm|bench.py --gpu)" "$OUT/bench.txt"
sed -n '/^total /,$p' "$OUT/bench.txt"
