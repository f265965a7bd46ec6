#!/usr/bin/env bash
# Pack faiss-gpu for a lent H100/H200 machine (no network, CUDA 13 libraries only, 64 MiB per call)
# into .whl/faiss_gpu_sm90.tar.xz (~21 MB) at the repository root (.whl/ is in .git/info/exclude):
#   - the faiss-gpu 1.15.1 wheel (CUDA 12, 135 MB) with only its sm_90 kernels kept (strip_fatbin.py);
#     faiss/_gpu_build.py removed, so faiss does not look for nvidia-*-cu12 wheels: the libraries
#     come from LD_LIBRARY_PATH;
#   - cudart/libcudart.so.12 from nvidia-cuda-runtime-cu12 (small; the driver runs CUDA 12 code);
#   - cudalib/libcublas.so.12 and libcublasLt.so.12: the shim forwarding to the image's cuBLAS 13
#     (cublas_shim.c), instead of the cuBLAS 12 wheel (hundreds of MB).
# Needs: the two wheels (pip download, see the device README), unzip, gcc, readelf, xz.
#   bench/gpu/build_pack.sh faiss_gpu-1.15.1-*.whl nvidia_cuda_runtime_cu12-12.9.79-*.whl
set -euo pipefail
faiss_wheel=$(realpath "$1")
cudart_wheel=$(realpath "$2")
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

cd "$stage"
unzip -q "$faiss_wheel" 'faiss/*' 'faiss_gpu.libs/*'
rm -f faiss/_gpu_build.py
python3 "$here/strip_fatbin.py" faiss/libfaiss.so 90
mkdir -p cudalib wheel
unzip -q -o "$cudart_wheel" -d wheel
cp wheel/nvidia/cuda_runtime/lib/libcudart.so.12 cudalib/
"$here/build_shim.sh" faiss/libfaiss.so cudalib
mkdir -p "$root/.whl"
tar -cf - faiss faiss_gpu.libs cudalib | xz -T0 -6 >"$root/.whl/faiss_gpu_sm90.tar.xz"
cp "$root/../shared/bench/vectors.py" "$root/.whl/vectors.py"
ls -l "$root/.whl"
