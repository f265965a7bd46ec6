"""JAX on the GPU against JAX on the CPU: the same photos, the same model files, vectors compared.

    python bench/gpu/parity.py /tmp/photos

The CPU side is the figure measured on the CPU machine (JAX = TensorFlow within
1.2e-6, tests/test_models.py); this measures what a GPU adds (TF32 convolutions), in
float32; bench/mixed_precision.py measures float16 (PUPYL_MIXED_PRECISION) with real
weights. Children run tests/backend_parity.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from pupyl_queue.characteristics import Characteristic
    from pupyl_queue.images import decode

    photos = sorted(Path(sys.argv[1]).glob("*.jpg"))[:32]
    work = Path(tempfile.mkdtemp(prefix="parity-"))
    pixels = np.stack([decode(p.read_bytes(), 10**8, target=224).pixels(224) for p in photos])
    np.save(work / "pixels.npy", pixels)
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    setup = (
        "import sys; sys.path.insert(0, sys.argv[1]); from bench.ingest import write_weights; "
        "from pupyl_queue.models import wrap_mobilenet; from pathlib import Path; "
        "wrap_mobilenet(None, Path(sys.argv[2]) / 'own.keras', alpha=0.25); "
        "from pupyl_queue.characteristics import Characteristic; "
        "write_weights(Characteristic(1), Path(sys.argv[2]))"
    )
    subprocess.run([sys.executable, "-c", setup, str(ROOT), str(work)], env=env, check=True)
    weights = work / "models" / Characteristic(1).network.weights_file
    out = {}
    for platform in ("gpu", "cpu"):
        args = [work / f"{platform}.npz", work / "pixels.npy", work / "own.keras", weights]
        device = os.environ.get("PARITY_GPU_PLATFORM", "cuda")  # cpu: a dry run of this script
        child = {**env, "JAX_PLATFORMS": device if platform == "gpu" else "cpu"}
        subprocess.run(
            [sys.executable, "-m", "tests.backend_parity", *map(str, args)], env=child, cwd=ROOT, check=True
        )
        out[platform] = np.load(work / f"{platform}.npz")
    for name in ("own", "characteristic"):
        a, b = out["gpu"][name], out["cpu"][name]
        cosine = np.sum(a * b, axis=1)
        diff = np.abs(a - b).max()
        print(f"{name}: max |gpu - cpu| {diff:.2e}, min cosine {cosine.min():.6f} over {len(a)} photos")


if __name__ == "__main__":
    main()
