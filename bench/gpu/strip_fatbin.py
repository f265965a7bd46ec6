"""Keep one GPU architecture's machine code in a shared library's CUDA fat binaries, zero the rest.

Why: the faiss-gpu wheel's libfaiss.so carries kernels for seven architectures (sm_70 to sm_90 plus
PTX), about 180 MB. The device machine takes 64 MiB per call; with only sm_90 (H100/H200) kept, the
zeroed bytes compress to nothing and the whole faiss package travels as a ~35 MB tar.xz.

Each fat binary is a header (magic 0xBA55ED50, header size, payload size) followed by entries (kind:
1 = PTX, 2 = ELF cubin; the target architecture at byte 28 of the entry header). The kept entries are
moved to the front of their fat binary and the payload size is rewritten; the CUDA runtime reads no
further, and nothing else points inside a fat binary.

Usage: python strip_fatbin.py libfaiss.so [arch=90]   (rewrites the file in place)
"""

from __future__ import annotations

import struct
import subprocess
import sys

MAGIC = 0xBA55ED50
ELF = 2


def fatbin_section(path: str) -> tuple[int, int]:
    """File offset and size of the .nv_fatbin section (readelf, to need nothing beyond binutils)."""
    for line in subprocess.check_output(["readelf", "-S", "-W", path], text=True).splitlines():
        if ".nv_fatbin" in line:
            fields = line.split("]", 1)[1].split()
            return int(fields[3], 16), int(fields[4], 16)
    raise SystemExit(f"{path}: no .nv_fatbin section")


def entries(data: bytearray, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(offset, length, kind, arch) of each entry of the fat binary payload data[start:end]."""
    out = []
    pos = start
    while pos < end:
        kind, _, header_size, size = struct.unpack_from("<HHIQ", data, pos)
        arch = struct.unpack_from("<I", data, pos + 28)[0]
        out.append((pos, header_size + size, kind, arch))
        pos += header_size + size
    return out


def strip(data: bytearray, arch: int) -> tuple[int, int, int]:
    """Rewrite every fat binary in ``data`` to hold only ELF entries for ``arch``."""
    pos = blobs = kept = 0
    while pos + 16 <= len(data):
        magic, _, header_size, size = struct.unpack_from("<IHHQ", data, pos)
        if magic != MAGIC:
            pos += 8
            continue
        start, end = pos + header_size, pos + header_size + size
        keep = b"".join(
            bytes(data[o : o + n]) for o, n, kind, a in entries(data, start, end) if kind == ELF and a == arch
        )
        if not keep:
            raise SystemExit(f"fat binary at {pos:#x} has no sm_{arch} machine code")
        data[start:end] = keep + bytes(size - len(keep))
        struct.pack_into("<Q", data, pos + 8, len(keep))
        blobs, kept = blobs + 1, kept + len(keep)
        pos = end
    return blobs, kept, len(data)


def main() -> None:
    path, arch = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 90
    offset, size = fatbin_section(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(size))
        blobs, kept, total = strip(data, arch)
        f.seek(offset)
        f.write(data)
    print(f"{path}: {blobs} fat binaries, kept {kept / 1e6:.1f} of {total / 1e6:.1f} MB (sm_{arch} ELF)")


if __name__ == "__main__":
    main()
