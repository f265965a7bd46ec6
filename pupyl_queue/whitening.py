"""PCA whitening of a collection's vectors: a per-collection option, learned at compaction (issue 18).

Why: CNN features of one collection share a few dominant directions (what every photo has in
common); cosine similarity is then driven by them more than by what tells images apart. PCA
whitening learned on the collection's own vectors (mean removed, each principal direction scaled
by its eigenvalue to the power ``-s/2``, the result normalised to unit length again) evens those
directions out. At half strength (``s = 0.5``) it put 98.6% of edited copies in copy mode's short
list of 50 instead of 96.1% (``gem+mirror``, BENCHMARKS.md, issue 18), but it moves similar-photo
P@10 by a few thousandths either way: hence an option of the collection (``PUPYL_WHITENING``,
recorded with its model in the manifest), off by default.

Where it lives: stored vectors never change (segments and vector files keep the network's
vectors). Compaction learns a :class:`Whitening` from a sample of the live vectors, once there
are enough of them (:func:`minimum_vectors`), and writes it into the snapshot (``whitening.npz``,
checked like every snapshot file). A :class:`pupyl_queue.vector_index.VectorIndex` built with it
applies it to every vector it adds or trains on and to every query, so the FAISS index (CPU or
GPU) holds whitened vectors and callers keep speaking raw ones; ``VectorIndex.vector`` gives a
stored vector back raw (:meth:`Whitening.invert`). A snapshot without the file behaves as before.

Plain numpy, no FAISS (the producer side validates the option): FAISS's PCAMatrix has the same
eigenvalue power, but no inverse for a non-orthonormal matrix, which search-by-id,
``set_attributes`` and the near-duplicate check's raw distances need.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from pupyl_queue import constants as C


def check_whitening(value: str) -> str:
    """The canonical form of a whitening option: ``none``, ``pca`` (s = 0.5) or ``pca:<s>``, 0 < s <= 1.

    Raises ValueError naming what is allowed.
    """
    text = str(value).strip().lower()
    if text in ("none", ""):
        return C.DEFAULT_WHITENING
    kind, _, strength = text.partition(":")
    if kind == "pca":
        if not strength:
            return "pca"
        try:
            s = float(strength)
        except ValueError:
            s = float("nan")
        if 0.0 < s <= 1.0:
            return "pca" if s == C.WHITENING_STRENGTH else f"pca:{s:g}"
    raise ValueError(
        f"whitening must be none, pca (s = {C.WHITENING_STRENGTH}) or pca:<s> with 0 < s <= 1, got {value!r}"
    )


def strength_of(option: str) -> float | None:
    """The eigenvalue power's ``s`` of a whitening option; None for ``none``."""
    option = check_whitening(option)
    if option == C.DEFAULT_WHITENING:
        return None
    _, _, s = option.partition(":")
    return float(s) if s else C.WHITENING_STRENGTH


def minimum_vectors(dim: int) -> int:
    """Live vectors a collection needs before compaction learns its whitening: a covariance from
    fewer than about two samples per dimension is mostly noise in its smallest directions, which
    whitening magnifies."""
    return max(C.WHITENING_MIN_VECTORS, C.WHITENING_MIN_PER_DIM * dim)


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-30)


@dataclass(frozen=True)
class Whitening:
    """``y = unit((x - mean) @ projection)``; float32, as stored in a snapshot."""

    mean: np.ndarray  # (dim,)
    projection: np.ndarray  # (dim, dim): principal directions as columns, scaled by eigenvalue^(-s/2)
    strength: float
    learned_from: int  # vectors the covariance was estimated on

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """Whitened unit vectors, float32 (what the index holds and what queries are compared in)."""
        x = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        return np.ascontiguousarray(_unit((x - self.mean) @ self.projection), dtype=np.float32)

    def invert(self, whitened: np.ndarray) -> np.ndarray:
        """The raw unit vectors that ``apply`` maps to ``whitened``, float32.

        ``apply`` forgets a length: ``whitened`` is ``(x - mean) A / c`` for some c > 0. Undoing A
        gives ``v = (x - mean) / c``, and ``x = mean + c v`` is the one point of that ray with unit
        length (raw vectors are unit vectors; ``|mean| < 1``): c is the positive root of
        ``|v|² c² + 2 (mean·v) c + |mean|² - 1 = 0``. Computed in float64; an approximate
        ``whitened`` (an IVF index's codes) gives an approximate raw vector.
        """
        y = _unit(np.asarray(whitened, dtype=np.float64).reshape(-1, self.dim))
        v = y @ self._inverse()
        mean = self.mean.astype(np.float64)
        a = np.maximum(np.einsum("ij,ij->i", v, v), 1e-300)
        b = v @ mean
        c = (-b + np.sqrt(np.maximum(b * b - a * (mean @ mean - 1.0), 0.0))) / a
        return _unit(mean + c[:, None] * v).astype(np.float32)

    def _inverse(self) -> np.ndarray:
        cached = self.__dict__.get("_inv")
        if cached is None:
            cached = np.linalg.inv(self.projection.astype(np.float64))
            object.__setattr__(self, "_inv", cached)  # frozen dataclass: a private cache
        return cached

    def describe(self) -> dict[str, Any]:
        """What a snapshot manifest records of it (its bytes are the snapshot file)."""
        return {
            "kind": "pca",
            "strength": self.strength,
            "learned_from": self.learned_from,
            "file": C.SNAPSHOT_WHITENING,
        }

    def to_bytes(self) -> bytes:
        out = io.BytesIO()
        np.savez(
            out,
            mean=self.mean.astype(np.float32),
            projection=self.projection.astype(np.float32),
            strength=np.float64(self.strength),
            learned_from=np.int64(self.learned_from),
        )
        return out.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Whitening:
        """Raises ValueError for bytes that are not a whitening (no pickle is ever loaded)."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                mean = np.asarray(npz["mean"], dtype=np.float32)
                projection = np.asarray(npz["projection"], dtype=np.float32)
                strength, learned = float(npz["strength"]), int(npz["learned_from"])
        except Exception as exc:  # noqa: BLE001 - a zip, key or dtype error alike: not a whitening
            raise ValueError(f"not a whitening file ({type(exc).__name__})") from None
        if mean.ndim != 1 or projection.shape != (len(mean), len(mean)):
            raise ValueError(f"whitening of mean {mean.shape} and projection {projection.shape}")
        return cls(mean, projection, strength, learned)


def learn(sample: np.ndarray, strength: float = C.WHITENING_STRENGTH) -> Whitening | None:
    """PCA whitening of ``sample`` (n, dim) at ``strength`` s: eigenvalues to the power -s/2.

    Eigenvalues are floored at WHITENING_EIGEN_FLOOR times the largest, so a direction the sample
    never moves in (a dead ReLU channel) is not scaled without bound, and the projection stays
    invertible. None when the sample has no spread at all (nothing to learn).
    """
    x = np.asarray(sample, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        return None
    mean = x.mean(axis=0)
    centred = x - mean
    covariance = centred.T @ centred / (len(x) - 1)
    eigenvalues, directions = np.linalg.eigh(covariance)
    top = float(eigenvalues[-1])
    if not top > 0.0:
        return None
    floored = np.maximum(eigenvalues, top * C.WHITENING_EIGEN_FLOOR)
    scale = (floored / top) ** (-strength / 2.0)  # largest direction scaled by 1: values stay near 1
    order = np.argsort(-floored)  # principal directions first
    projection = (directions * scale)[:, order]
    return Whitening(mean.astype(np.float32), projection.astype(np.float32), float(strength), len(x))
