#!/usr/bin/env bash
# The one command for the device machine (one NVIDIA H200, lent for minutes): install the
# wheels carried in .whl/ into /tmp/site, print the GPU and the versions, run the GPU tests
# (pytest -m gpu), then benchmarks/bench_gpu.py. Ends within ~8 minutes.
#
#   device tool: carry [".whl"], command "bash benchmarks/gpu_check.sh", timeout_s 540
#   (arguments go to bench_gpu.py, e.g. "bash benchmarks/gpu_check.sh --quick")
#
# Logs: $OUT/pytest_gpu.log and $OUT/bench_gpu.log ($OUT: the device tool's folder that
# comes back; /tmp/scalign_gpu_logs when unset). Exit status: pytest's (non-zero when a GPU
# test failed, none ran (5) or it timed out (124)); bench_gpu.py's is on the last line.
# Refresh the wheels: see benchmarks/README.md, "GPU (device machine)".
set -u -o pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/scalign_gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T_TESTS=${T_TESTS:-190}   # seconds for pytest (CuPy compiles each new kernel on first use)
T_BENCH=${T_BENCH:-280}   # seconds for bench_gpu.py
# the GPU tests: the two named, then every other test file with a gpu mark
TESTS=${GPU_TESTS:-$(
    echo tests/test_gpu.py tests/test_torch.py
    grep -l "mark.gpu" tests/test_*.py | grep -v -e test_gpu.py -e test_torch.py
)}
t0=$SECONDS

echo "== wheels"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "gpu_check: wheel install failed"; exit 3; }
    export PYTHONPATH=/tmp/site:$PWD
    echo "installed $(ls .whl/*.whl | wc -l) wheels into /tmp/site ($((SECONDS - t0)) s)"
else
    echo "no .whl/ carried: dask, zarr, finufft ... must already be there"
    export PYTHONPATH=$PWD
fi

echo "== device"
timeout 30 nvidia-smi || echo "(nvidia-smi failed)"
timeout 90 python3 - <<'EOF'
import importlib
import platform
import sys

print(f"python {platform.python_version()} at {sys.executable}")
names = (
    "numpy scipy cupy torch xarray pandas dask distributed zarr numcodecs array_api_compat "
    "finufft cufinufft dask_cuda mrcfile starfile threadpoolctl hypothesis pytest"
)
for name in names.split():
    try:
        mod = importlib.import_module(name)
    except Exception as exc:
        print(f"  {name:<17} NOT importable ({type(exc).__name__}: {exc})")
        continue
    where = "carried" if "/tmp/site" in (getattr(mod, "__file__", "") or "") else "image"
    print(f"  {name:<17} {getattr(mod, '__version__', '?'):<14} ({where})")
try:
    import cupy

    rt = cupy.cuda.runtime.runtimeGetVersion()
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    print(f"cupy: CUDA runtime {rt}, device 0 {name!r}, is_available {cupy.is_available()}")
except Exception as exc:
    print(f"cupy: no device ({type(exc).__name__}: {exc})")
try:
    import torch

    print(f"torch: CUDA {torch.version.cuda}, cuda.is_available {torch.cuda.is_available()}")
except Exception as exc:
    print(f"torch: {type(exc).__name__}: {exc}")
import scalign

print(f"scalign {scalign.__version__} from {scalign.__file__}, gpu_available {scalign.gpu_available()}")
EOF

echo "== pytest -m gpu ($(echo $TESTS)), at most ${T_TESTS} s"
# shellcheck disable=SC2086
timeout -k 10 "$T_TESTS" python3 -m pytest -m gpu -q -p no:cacheprovider --durations=5 \
    $TESTS 2>&1 | tee "$OUT/pytest_gpu.log"
rc_tests=${PIPESTATUS[0]}

echo "== bench_gpu.py $*, at most ${T_BENCH} s"
timeout -k 10 "$T_BENCH" python3 benchmarks/bench_gpu.py "$@" 2>&1 | tee "$OUT/bench_gpu.log"
rc_bench=${PIPESTATUS[0]}

echo "gpu_check: pytest exit ${rc_tests}, bench_gpu exit ${rc_bench} (124: timed out); $((SECONDS - t0)) s in all"
exit "$rc_tests"
