#!/usr/bin/env bash
# On a lent GPU machine, from the repository root, with .whl/ (build_pack.sh) carried:
#   bash bench/gpu/device_run.sh [seconds for the whole run] [bench/gpu_index.py options...]
# Unpacks faiss-gpu, points CUDA 12 code at the image's cuBLAS 13 (through the shim), then runs
# tests/test_gpu_index.py and bench/gpu_index.py; logs go to $OUT (the tool's output folder).
set -uo pipefail
repo=$PWD
out=${OUT:-/tmp/out}
total_s=${1:-300}
mkdir -p "$out"
exec > >(tee "$out/device_run.txt") 2>&1
started=$(date +%s)
stamp() { echo "== $(($(date +%s) - started))s: $*"; }

stamp machine
nvidia-smi -L
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 --version
nproc

stamp unpack
mkdir -p /tmp/site
tar -xJf .whl/faiss_gpu_sm90.tar.xz -C /tmp/site || exit 1
if command -v gcc >/dev/null; then  # this machine's own glibc; the packed shim needs glibc >= 2.34
    bench/gpu/build_shim.sh /tmp/site/faiss/libfaiss.so /tmp/site/cudalib || echo "shim: using the packed one"
fi
cublas13=$(find /opt /usr -name 'libcublas.so.13' 2>/dev/null | head -1)
echo "cuBLAS 13: $cublas13"
export LD_LIBRARY_PATH=/tmp/site/cudalib:$(dirname "$cublas13")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# pupyl_queue/vector_index.py without the package's __init__ (celery, redis... are not on this machine)
mkdir -p /tmp/stub/pupyl_queue
echo "__path__ = ['$repo/pupyl_queue']" >/tmp/stub/pupyl_queue/__init__.py
export PYTHONPATH=/tmp/stub:/tmp/site PYTHONUNBUFFERED=1
python3 -c "import faiss; print('faiss', faiss.__version__, 'GPUs', faiss.get_num_gpus())" || exit 1

stamp pytest
if [ -n "${SKIP_PYTEST:-}" ]; then
    echo "skipped (SKIP_PYTEST is set)"
else
    (cd /tmp && timeout -k 5 120 python3 -m pytest -c "$repo/pyproject.toml" --rootdir "$repo" \
        --import-mode=importlib --noconftest -p no:cacheprovider -q -rA "$repo/tests/test_gpu_index.py") \
        >"$out/pytest.txt" 2>&1
    echo "pytest exit $?"
    tail -n 40 "$out/pytest.txt"
fi

stamp bench
left=$((total_s - ($(date +%s) - started)))
timeout -s INT -k 15 "$left" python3 bench/gpu_index.py --vectors .whl/vectors.py \
    --deadline $((left > 150 ? left - 110 : 40)) "${@:2}" 2>&1 | tee "$out/bench.txt"
stamp done
