"""Copy detection: is this query an edited copy of that indexed image? Local features and RANSAC.

Global CNN vectors find images that look alike; they cannot tell the original of a
cropped, rotated, re-encoded or captioned copy from a similar photo of the same
subject. This module verifies a short list from the index geometrically:

- SIFT keypoints (OpenCV's main package since 4.4, the patent expired in 2020),
  compared as RootSIFT, on a grayscale working copy whose longer side is
  ``WORK_SIDE`` pixels: gray and recoloured copies look the same to them, and small
  images are scaled up so they still give keypoints. ORB was measured too
  (bench/copies.py): five times faster to extract, but on small, blurred or shrunk
  copies its chance matches between unrelated images reach the inlier counts of true
  copies, so it refused fewer copies at the same false-copy rate;
- the query's mirror image too (a mirrored copy matches its original's mirror), its
  features derived from the query's own (``LocalFeatures.mirrored``: no second SIFT pass);
- Lowe's ratio test on the two nearest descriptors (one matrix product: RootSIFT vectors
  have unit length, so the distance follows from the dot product; 3-4 times faster than
  OpenCV's brute-force matcher on these sizes, same matches), then a RANSAC similarity
  (rotation, uniform scale, translation: what cropping, rotating, shrinking and
  framing do) with ``cv2.estimateAffinePartial2D``;
- the score is the number of RANSAC inliers, turned into a probability by a
  logistic curve fitted (maximum likelihood) on bench/copies.py: over the short
  lists there, originals had 24 inliers or more in 95% of cases (median 79),
  other candidates 2 (99.9th percentile 7, at most 12). ``found`` is
  ``score >= 0.5``, 13 inliers or more.

Workers only (it imports OpenCV, a worker dependency): the producer never verifies.
"""

from __future__ import annotations

import functools
import io
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageChops

WORK_SIDE = 256  # longer side of the working copy, in pixels
MAX_FEATURES = 500
CONTRAST = 0.01  # SIFT's contrastThreshold: low, so small and blurred images still give keypoints
STRONG_INLIERS = 20  # a verdict this sure ends the verification of a short list (no doubt left)
RATIO = 0.8  # Lowe's ratio test
REPROJECTION_PX = 6.0  # RANSAC inlier threshold, in working-copy pixels
# Logistic calibration of the inlier count (bench/copies.py): p = 1 / (1 + exp(-(inliers - MID) / WIDTH)).
INLIERS_MID = 12.5
INLIERS_WIDTH = 1.5
MIN_SCALE, MAX_SCALE = 0.15, 6.0  # a similarity outside this range is no plausible edit


def _mirror_order() -> np.ndarray:
    """Where each value of a mirror image's SIFT descriptor comes from in the original's.

    OpenCV lays a descriptor out as 4×4 cells of 8 orientation bins, ``(row * 4 + col) * 8 + bin``,
    in the keypoint's own frame; mirroring the image reverses the rows and the bins.
    """
    order = np.zeros(128, np.int64)
    for row, col, b in itertools.product(range(4), range(4), range(8)):
        order[((3 - row) * 4 + col) * 8 + (-b) % 8] = (row * 4 + col) * 8 + b
    return order


_MIRROR_ORDER = _mirror_order()


@dataclass
class LocalFeatures:
    """Keypoint positions (n, 2) float32 in working-copy pixels and SIFT descriptors (n, 128) uint8.

    OpenCV's SIFT descriptors are whole numbers up to 255 in float32: uint8 keeps them exactly in
    a quarter of the bytes. ``root`` is their RootSIFT form, made once and kept with them.
    """

    points: np.ndarray
    descriptors: np.ndarray

    @functools.cached_property
    def root(self) -> np.ndarray:
        d = self.descriptors.astype(np.float32)
        return np.sqrt(d / (d.sum(axis=1, keepdims=True) + 1e-7))

    def __len__(self) -> int:
        return len(self.points)

    def mirrored(self, width: int) -> LocalFeatures:
        """The features of the image's mirror image (``width`` pixels wide), without a second SIFT pass.

        SIFT is mirror-symmetric: a mirror image's keypoint at ``width - 1 - x`` has the original's
        descriptor with its rows of cells and its orientation bins reversed (``_MIRROR_ORDER``).
        Checked on real photos: at 56-73% of the keypoints SIFT run on the mirror image gives the
        very same descriptor, at ~90% one within a fifth of its length (pixel-grid effects), and
        copy detection's recall is unchanged (tests/test_copies.py; BENCHMARKS.md, session 8).
        """
        points = self.points.copy()
        points[:, 0] = width - 1 - points[:, 0]
        flipped = LocalFeatures(points, self.descriptors[:, _MIRROR_ORDER])
        if "root" in self.__dict__:  # a permutation commutes with RootSIFT's per-row normalization
            flipped.__dict__["root"] = self.root[:, _MIRROR_ORDER]
        return flipped

    def to_bytes(self) -> bytes:
        """A compact, pickle-free encoding (npz) for a cache in the store."""
        out = io.BytesIO()
        np.savez(out, points=self.points.astype(np.float32), descriptors=self.descriptors.astype(np.uint8))
        return out.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> LocalFeatures:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return cls(npz["points"], npz["descriptors"])


@dataclass
class Verdict:
    """How well a query matches one candidate: inliers of the best model and their probability."""

    inliers: int
    score: float
    mirrored: bool = False

    @property
    def found(self) -> bool:
        return self.score >= 0.5

    @property
    def sure(self) -> bool:
        """Sure enough to refuse an upload as a duplicate (``STRONG_INLIERS``).

        Stricter than ``found``: on the 4,317 flowers (bench/copies.py --near-duplicate), the
        few pairs of distinct photos called copies had 13-19 inliers; from 20 on, every pair was
        the same photo (again, recoloured, cropped) or a burst shot of the same scene. A refused
        upload is lost to its user, a missed copy costs a little storage.
        """
        return self.inliers >= STRONG_INLIERS


def _detector() -> cv2.SIFT:
    # One per call: cheap to make, and not documented as thread-safe.
    return cv2.SIFT_create(nfeatures=MAX_FEATURES, contrastThreshold=CONTRAST)


def working_copy(image: Image.Image) -> np.ndarray:
    """The grayscale copy features are computed on: longer side ``WORK_SIDE`` (scaled up or down)."""
    gray = image.convert("L")
    w, h = gray.size
    scale = WORK_SIDE / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(gray.resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)


def extract(image: Image.Image | np.ndarray) -> LocalFeatures:
    """SIFT features of an image (a PIL image, or a working copy from ``working_copy``)."""
    gray = working_copy(image) if isinstance(image, Image.Image) else image
    keypoints, descriptors = _detector().detectAndCompute(gray, None)
    if descriptors is None or not keypoints:
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8))
    points = np.array([k.pt for k in keypoints], np.float32)
    return LocalFeatures(points, np.clip(np.rint(descriptors), 0, 255).astype(np.uint8))


class QueryFeatures:
    """A query's features, and its mirror image's, derived from them when first asked for."""

    def __init__(self, gray: np.ndarray) -> None:
        self._width = gray.shape[1]
        self.plain = extract(gray)
        self._mirrored: LocalFeatures | None = None

    @property
    def mirrored(self) -> LocalFeatures:
        if self._mirrored is None:
            self._mirrored = self.plain.mirrored(self._width)
        return self._mirrored


def extract_query(image: Image.Image) -> QueryFeatures:
    """A query's features (its mirror image's follow when a verification needs them)."""
    return QueryFeatures(working_copy(image))


def probability(inliers: int) -> float:
    return 1.0 / (1.0 + math.exp(-(inliers - INLIERS_MID) / INLIERS_WIDTH))


def _ratio_matches(query: LocalFeatures, candidate: LocalFeatures) -> tuple[np.ndarray, np.ndarray]:
    """Query and candidate indices of the matches that pass Lowe's ratio test.

    RootSIFT descriptors have unit length, so squared distances are ``2 - 2 * dot``: one matrix
    product and two row maxima find each query descriptor's two nearest, where OpenCV's
    brute-force ``knnMatch`` took 1.1-1.5 ms a pair and a partial sort 0.5 ms (BENCHMARKS.md, session 7
    of issue 18).
    """
    similarity = query.root @ candidate.root.T
    rows = np.arange(len(similarity))
    nearest = similarity.argmax(axis=1)
    first = similarity[rows, nearest]
    similarity[rows, nearest] = -np.inf
    second = similarity.max(axis=1)
    d1 = np.sqrt(np.maximum(2.0 - 2.0 * first, 0.0))
    d2 = np.sqrt(np.maximum(2.0 - 2.0 * second, 0.0))
    good = np.flatnonzero(d1 < RATIO * d2)
    return good, nearest[good]


def _inliers(query: LocalFeatures, candidate: LocalFeatures) -> int:
    if len(query) < 3 or len(candidate) < 3:
        return 0
    mine, theirs = _ratio_matches(query, candidate)
    if len(mine) < 3:
        return 0
    model, mask = cv2.estimateAffinePartial2D(
        query.points[mine],
        candidate.points[theirs],
        method=cv2.RANSAC,
        ransacReprojThreshold=REPROJECTION_PX,
        maxIters=500,
        confidence=0.995,
    )
    if model is None or mask is None:
        return 0
    scale = math.hypot(float(model[0, 0]), float(model[1, 0]))
    if not MIN_SCALE <= scale <= MAX_SCALE:
        return 0
    return int(mask.sum())


def verify(query: QueryFeatures, candidate: LocalFeatures) -> Verdict:
    """The better of the query and its mirror image against one candidate."""
    plain = _inliers(query.plain, candidate)
    mirrored = _inliers(query.mirrored, candidate)
    return Verdict(max(plain, mirrored), probability(max(plain, mirrored)), mirrored > plain)


def verify_short_list(
    query: QueryFeatures, candidates: Iterable[LocalFeatures | None]
) -> list[Verdict | None]:
    """Verify candidates in their global order, each in both views; stop at the first sure copy
    (``STRONG_INLIERS``).

    The mirror image's features cost no second SIFT pass (``LocalFeatures.mirrored``), so each
    candidate is tried in the query's plain view, then its mirror image: a mirrored copy whose
    original ranks first stops at the first candidate, as an unmirrored one does. Before, the
    mirror view waited for its own SIFT pass (16 ms) and for the plain view to fail on the global
    top 5. One verdict per candidate consumed (``None`` for one without features); the candidates
    after a sure copy are not consumed.
    """
    verdicts: list[Verdict | None] = []
    for candidate in candidates:
        if candidate is None:
            verdicts.append(None)
            continue
        inliers = _inliers(query.plain, candidate)
        verdict = Verdict(inliers, probability(inliers))
        if inliers < STRONG_INLIERS:
            flipped = _inliers(query.mirrored, candidate)
            if flipped > inliers:
                verdict = Verdict(flipped, probability(flipped), mirrored=True)
        verdicts.append(verdict)
        if verdict.inliers >= STRONG_INLIERS:
            break
    return verdicts


def is_gray(image: Image.Image | np.ndarray, tolerance: float = 2.0) -> bool:
    """Whether an image has no colour (its channels equal, up to JPEG's rounding).

    A gray copy of a colour original is the edit the global stage finds worst (its CNN vector
    moves most): copy mode verifies a longer short list for it. ``image`` may be the network's
    squashed uint8 pixels (HWC), which a search has made already: the same answer as the image
    shrunk to 64 px for all 1,343 images of bench/copies.py, for 0.1 ms less than 0.8 (session 8).
    """
    if isinstance(image, np.ndarray):
        rgb = image.astype(np.int16)
    else:
        rgb = np.asarray(image.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), dtype=np.int16)
    spread = np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2])
    return float(spread.mean()) <= tolerance


def without_border(image: Image.Image, tolerance: int = 24) -> Image.Image:
    """The image without a uniform frame around it (the colour of its top-left pixel).

    A query-side view for the global stage: a framed copy's vector is far from its original's.
    Left as is when the frame would take less than 2% or more than half of a side.
    """
    rgb = image.convert("RGB")
    background = Image.new("RGB", rgb.size, rgb.getpixel((0, 0)))
    diff = ImageChops.difference(rgb, background).convert("L").point(lambda v: 255 if v > tolerance else 0)
    box = diff.getbbox()
    if box is None:
        return image
    w, h = rgb.size
    kept_w, kept_h = box[2] - box[0], box[3] - box[1]
    if kept_w * kept_h > 0.96 * w * h or kept_w < w / 2 or kept_h < h / 2:
        return image
    return rgb.crop(box)


def rerank(
    hits: Sequence[tuple[int, float]], verdicts: Sequence[Verdict | None]
) -> list[tuple[int, float, Verdict | None]]:
    """Verified copies first (most inliers first), then the rest in their global order.

    A candidate that could not be verified (``None``: its stored copy is gone) keeps its place
    among the unverified.
    """
    rows = list(zip((h[0] for h in hits), (h[1] for h in hits), verdicts))
    found = sorted((r for r in rows if r[2] is not None and r[2].found), key=lambda r: -r[2].inliers)  # type: ignore[union-attr]
    rest = [r for r in rows if r[2] is None or not r[2].found]
    return found + rest
