#!/usr/bin/env bash
# Build libcublas.so.12 (forwarding to cuBLAS 13) and an empty libcublasLt.so.12 for a CUDA 12
# libfaiss.so, into OUTDIR. Needs gcc and readelf; see cublas_shim.c for why.
#   bench/gpu/build_shim.sh path/to/libfaiss.so OUTDIR
set -euo pipefail
lib=$1
out=$2
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

# every cuBLAS symbol libfaiss.so imports, as `name@libcublas.so.12`
mapfile -t syms < <(readelf --dyn-syms -W "$lib" | awk '$7 == "UND" {print $8}' |
    sed -n 's/@libcublas\.so\.12\( (.*)\)\?$//p' | sort -u)
[ ${#syms[@]} -gt 0 ] || { echo "no @libcublas.so.12 imports in $lib" >&2; exit 1; }
{
    printf '#define SHIM_SYMBOLS(X)'
    printf ' X(%s)' "${syms[@]}"
    printf '\n'
} >"$work/symbols.h"
{
    printf 'libcublas.so.12 {\n  global:\n'
    printf '    %s;\n' "${syms[@]}"
    printf '  local: *;\n};\n'
} >"$work/cublas.map"

gcc -O2 -fPIC -shared -Wall -Wextra -I"$work" -o "$out/libcublas.so.12" "$here/cublas_shim.c" \
    -Wl,-soname,libcublas.so.12 -Wl,--version-script="$work/cublas.map" -ldl
echo 'void cublas_lt_shim_unused(void) {}' >"$work/lt.c"
gcc -O2 -fPIC -shared -o "$out/libcublasLt.so.12" "$work/lt.c" -Wl,-soname,libcublasLt.so.12
echo "built $out/libcublas.so.12 forwarding ${#syms[@]} symbols: ${syms[*]}"
