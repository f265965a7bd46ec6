"""Decoding untrusted image bytes into RGB, with the checks that keep a worker alive.

Rules (documented in the README):
- formats: JPEG, PNG, GIF, BMP, WebP, TIFF; the content is sniffed, names are ignored;
- EXIF orientation is applied; grayscale, palette, RGBA (over white), CMYK and
  16-bit/float images become 8-bit RGB;
- an animated image becomes the pixel mean of up to ``MAX_FRAMES`` frames sampled
  evenly over the animation (pupyl also summarises a GIF as one image);
- more than ``max_pixels`` pixels (per frame) is refused before decoding.
"""

from __future__ import annotations

import functools
import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
MAX_FRAMES = 16
NORMALIZED_FORMAT = "JPEG"
NORMALIZED_QUALITY = 92

# Pillow's own bomb guard (a warning past 89M pixels, an error past 179M, at Image.open) is replaced
# by decode's check against PUPYL_MAX_PIXELS, made as soon as Image.open has read the header and
# before any pixel is decoded. Left on, it fired first: the failure reason quoted Pillow's limit, and
# images that a PUPYL_MAX_PIXELS above 89M allows were refused. decode() is the package's only way
# into Pillow for untrusted bytes.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """Bytes that cannot become an image; the message is the per-item failure reason."""


@dataclass
class ImageInfo:
    """What the metadata and dedup need of a decoded image: small, so it crosses processes cheaply."""

    sha256: str
    width: int
    height: int
    format: str
    frames: int
    size_bytes: int


@dataclass
class DecodedImage(ImageInfo):
    rgb: Image.Image
    original: bytes = b""  # set when the original file already is a normalized copy

    def info(self) -> ImageInfo:
        """The facts without the pixels (a decode process sends these back)."""
        return ImageInfo(self.sha256, self.width, self.height, self.format, self.frames, self.size_bytes)

    def pixels(self, size: int) -> np.ndarray:
        """The image squashed to ``size``×``size`` (as pupyl: no crop), uint8 HWC."""
        return squash(self.rgb, size)

    def normalized_bytes(self) -> bytes:
        """An RGB JPEG of the image: the original bytes when they already are one."""
        if self.original:
            return self.original
        out = io.BytesIO()
        self.rgb.save(out, NORMALIZED_FORMAT, quality=NORMALIZED_QUALITY)
        return out.getvalue()


def decode(data: bytes, max_pixels: int, target: int | None = None) -> DecodedImage:
    """Decode untrusted bytes; ``target`` (the network's input size) allows a faster reduced decode.

    A plain RGB JPEG (no rotation) is kept as its own normalized copy, and is
    decoded straight at the smallest DCT scale still at least ``target`` pixels
    on each side (Pillow's draft mode): several times less work for big photos.
    Queries pass the same ``target`` as indexing, so both see the same pixels.
    """
    if not data:
        raise ImageError("empty file")
    sha = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # if someone re-enables it
            im = Image.open(io.BytesIO(data), formats=FORMATS)
            fmt = im.format or "unknown"
            width, height = im.size
            if width * height > max_pixels:
                raise ImageError(
                    f"image too large: {width}x{height} = {width * height} pixels exceeds the "
                    f"limit of {max_pixels} (decompression bomb guard, PUPYL_MAX_PIXELS)"
                )
            frames = int(getattr(im, "n_frames", 1) or 1)
            original = b""
            if fmt == "JPEG" and frames == 1 and im.mode == "RGB" and im.getexif().get(0x0112, 1) == 1:
                original = data
                if target:
                    im.draft("RGB", (target, target))
            if frames > 1:
                rgb = _mean_of_frames(im, frames)
            else:
                im.load()
                # In place: the copying form copies even an image that needs no turn (most photos),
                # a whole frame per image (7% of a decode process on photo-sized JPEGs, BENCHMARKS.md).
                ImageOps.exif_transpose(im, in_place=True)
                rgb = _to_rgb(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image: content matches none of " + ", ".join(FORMATS)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"image too large: over the limit of {max_pixels} pixels "
            "(decompression bomb guard, PUPYL_MAX_PIXELS)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt or truncated {fmt_name(data)} image: {exc}") from None
    return DecodedImage(sha, width, height, fmt, frames, len(data), rgb, original)


def squash(rgb: Image.Image, size: int) -> np.ndarray:
    """``rgb`` resized to ``size``×``size`` with Pillow's bilinear filter, uint8 HWC.

    An image no larger than ``size`` on either side (a thumbnail: nothing to antialias) goes
    through OpenCV's bilinear resize instead: the same filter and pixel centres, and the same
    pixels within 1 (fixed-point rounding), 6-7 times faster than Pillow's, whose resize was half
    of a 128 px JPEG's whole decode (BENCHMARKS.md, "Session 11"). A larger image keeps Pillow:
    its downscale antialiases, OpenCV's does not. OpenCV comes with the workers' extras; without
    it (a producer, the GPU bench's pack) Pillow squashes everything.
    """
    width, height = rgb.size
    if width <= size and height <= size and (cv2 := _opencv()) is not None:
        return cv2.resize(np.asarray(rgb), (size, size), interpolation=cv2.INTER_LINEAR)
    return np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


@functools.cache
def _opencv() -> Any:
    """OpenCV, or None without it. Its thread count is left alone: a 224 px resize runs on one
    thread either way (measured), and a search worker's copy detection shares the setting."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def fmt_name(data: bytes) -> str:
    signatures = {
        b"\xff\xd8": "JPEG",
        b"\x89PNG": "PNG",
        b"GIF8": "GIF",
        b"BM": "BMP",
        b"RIFF": "WebP",
        b"II*\x00": "TIFF",
        b"MM\x00*": "TIFF",
    }
    for magic, name in signatures.items():
        if data.startswith(magic):
            return name
    return "unknown"


def _mean_of_frames(im: Image.Image, frames: int) -> Image.Image:
    picks = np.unique(np.linspace(0, frames - 1, num=min(frames, MAX_FRAMES)).astype(int))
    total = np.zeros((im.size[1], im.size[0], 3), dtype=np.float64)
    for index in picks:
        im.seek(int(index))
        total += np.asarray(_to_rgb(im.copy()), dtype=np.float64)
    return Image.fromarray(np.round(total / len(picks)).astype(np.uint8), "RGB")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im if im.mode == "RGB" else im.convert("RGB")  # convert() copies an RGB image whole
