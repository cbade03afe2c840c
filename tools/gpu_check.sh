#!/usr/bin/env bash
# The GPU check in one call, from the repository root, on a machine with one CUDA GPU:
#
#     OUT=/tmp/gpu_check bash tools/gpu_check.sh
#
# 1. the machine and the packages (torch, numpy, pillow, tqdm, pytest; timm for one table);
# 2. python bench.py --gpu: the MD step of ViT-B/16 at batch 128 and 64, bf16 + compile and
#    eager, teacher share, ours vs timm, peak memory; the key rows first (about 3 minutes on an
#    H100, most of it torch.compile);
# 3. the CUDA tests, tests/test_cuda.py (about 3 to 4 minutes).
# Each part has a time limit (BENCH_TIMEOUT, TEST_TIMEOUT seconds; together under 8 minutes) so
# that the tests run even if the benchmark is slow; BENCH_ARGS go to bench.py (e.g. "--batch=128
# --steps=10"). Logs go to $OUT (env.txt, bench.txt,
# tests.txt); the rows, tables and test results are printed again at the end. No network.
set -u
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
timeout --kill-after=10 "${BENCH_TIMEOUT:-210}" $PYTHON bench.py --gpu ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt"
status=${PIPESTATUS[0]}
echo "bench.py --gpu: exit $status after $SECONDS s (124: stopped at the time limit)" \
    | tee -a "$OUT/bench.txt"

SECONDS=0
timeout --kill-after=10 "${TEST_TIMEOUT:-250}" \
    $PYTHON -m pytest -v -rs --durations=0 -p no:cacheprovider tests/test_cuda.py 2>&1 \
    | tee "$OUT/tests.txt"
status=${PIPESTATUS[0]}
echo "tests/test_cuda.py: exit $status after $SECONDS s (124: stopped at the time limit)" \
    | tee -a "$OUT/tests.txt"

echo
echo "===== summary"
cat "$OUT/env.txt"
grep -E "^(machine|timm|MD |ours vs timm|bench.py --gpu)" "$OUT/bench.txt"
sed -n '/^total /,$p' "$OUT/bench.txt"
grep -E "(PASSED|FAILED|ERROR|SKIPPED)|s (call|setup) |passed|failed|tests/test_cuda.py: exit" \
    "$OUT/tests.txt" | tail -n 30
