import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pupyl_queue.images import ImageError, decode
from tests.conftest import SHARED_DATA
from tests.imagegen import encode, pattern

LIMIT = 10_000_000


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"])
def test_formats(fmt: str) -> None:
    image = decode(encode(pattern(1), fmt), LIMIT)
    assert image.format == fmt
    assert (image.width, image.height) == (160, 120)
    assert image.rgb.mode == "RGB"
    assert image.pixels(64).shape == (64, 64, 3)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_modes_become_rgb(mode: str) -> None:
    source = pattern(2)
    if mode == "I;16":
        source = Image.fromarray(np.asarray(source.convert("L"), dtype=np.uint16) * 257)
        assert source.mode == "I;16"
        data = encode(source, "PNG")
    else:
        data = encode(source.convert(mode), "TIFF" if mode == "CMYK" else "PNG")
    image = decode(data, LIMIT)
    assert image.rgb.mode == "RGB"
    assert np.asarray(image.rgb).std() > 5  # picture content survived


def test_transparent_pixels_go_white() -> None:
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    image = decode(encode(rgba, "PNG"), LIMIT)
    assert np.asarray(image.rgb)[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_applied() -> None:
    source = pattern(3, size=(200, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image = decode(encode(source, "JPEG", exif=exif), LIMIT)
    assert (image.rgb.width, image.rgb.height) == (100, 200)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_as_pillow_does(orientation: int, fmt: str) -> None:
    """decode turns in place (no copy of an upright image): the same pixels as Pillow's copying form."""
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(pattern(3, size=(200, 100)), fmt, exif=exif)
    with Image.open(io.BytesIO(data)) as im:
        expected = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    image = decode(data, LIMIT)
    assert image.rgb.mode == "RGB"
    assert np.array_equal(np.asarray(image.rgb), expected)
    assert (image.width, image.height) == (200, 100)  # the file's own size, as stored


def test_animated_gif_is_mean_of_frames() -> None:
    frames = [Image.new("RGB", (8, 8), (0, 0, 0)), Image.new("RGB", (8, 8), (200, 200, 200))]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=10)
    image = decode(out.getvalue(), LIMIT)
    assert image.frames == 2
    assert np.asarray(image.rgb)[0, 0].tolist() == pytest.approx([100, 100, 100], abs=2)


def test_decompression_bomb_refused_before_decoding() -> None:
    bomb = encode(Image.new("L", (5000, 5000)), "PNG")  # tiny file, 25 M pixels
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match="decompression bomb"):
        decode(bomb, LIMIT)


def claimed_png(width: int, height: int) -> bytes:
    """A small real PNG whose header claims ``width``x``height`` (CRC fixed): a bomb's header, cheaply."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize("side", [10_000, 20_000])  # past Pillow's warning (89M pixels), past its error
def test_bomb_reason_quotes_pupyl_max_pixels_not_pillows_limit(side: int) -> None:
    with pytest.raises(ImageError) as caught:
        decode(claimed_png(side, side), LIMIT)
    reason = str(caught.value)
    assert f"{side}x{side}" in reason and str(LIMIT) in reason and "PUPYL_MAX_PIXELS" in reason
    assert "89478485" not in reason and "178956970" not in reason  # Pillow's warning and error limits


def test_pupyl_max_pixels_above_pillows_limit_is_the_limit() -> None:
    """100M pixels under PUPYL_MAX_PIXELS=200M passes the guard: what stops this one is its missing data."""
    with pytest.raises(ImageError) as caught:
        decode(claimed_png(10_000, 10_000), 200_000_000)
    assert "too large" not in str(caught.value)
    assert "corrupt or truncated PNG" in str(caught.value)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty file"),
        (b"hello world", "not an image"),
        (b"<!DOCTYPE html><html><body>a page</body></html>", "not an image"),
        (encode(pattern(4), "ICO"), "not an image: content matches none of JPEG"),  # unsupported format
        (encode(pattern(4), "JPEG")[:400], "corrupt or truncated JPEG"),
        (encode(pattern(4), "PNG")[:300], "corrupt or truncated PNG"),
    ],
)
def test_bad_bytes_are_clear_errors(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode(data, LIMIT)


def test_shared_bad_files() -> None:
    bad = SHARED_DATA / "bad"
    if not bad.exists():
        pytest.skip("../shared/data/bad is absent")
    with pytest.raises(ImageError, match="truncated"):
        decode((bad / "truncated.jpg").read_bytes(), LIMIT)
    with pytest.raises(ImageError, match="not an image"):
        decode((bad / "not_image.jpg").read_bytes(), LIMIT)


def test_normalized_copy_is_a_jpeg_of_the_same_size() -> None:
    image = decode(encode(pattern(5), "PNG"), LIMIT)
    again = Image.open(io.BytesIO(image.normalized_bytes()))
    assert again.format == "JPEG" and again.size == (160, 120)
    assert len(image.sha256) == 64


def test_plain_jpeg_is_its_own_normalized_copy_and_decodes_reduced() -> None:
    data = encode(pattern(6, size=(1600, 1200)), "JPEG", quality=90)
    full, reduced = decode(data, LIMIT * 10), decode(data, LIMIT * 10, target=224)
    assert reduced.normalized_bytes() == data == full.normalized_bytes()
    assert (reduced.width, reduced.height) == (1600, 1200)  # the original's size is recorded
    assert reduced.rgb.width < 1600 and reduced.rgb.width >= 224  # decoded at a reduced DCT scale
    diff = np.abs(full.pixels(224).astype(int) - reduced.pixels(224).astype(int))
    assert diff.mean() < 3  # the network sees nearly the same pixels


def test_rotated_jpeg_is_re_encoded_upright() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(pattern(3, size=(200, 100)), "JPEG", exif=exif)
    image = decode(data, LIMIT, target=64)
    copy = Image.open(io.BytesIO(image.normalized_bytes()))
    assert image.normalized_bytes() != data and copy.size == (100, 200)


@pytest.mark.parametrize("size", [(128, 128), (224, 97), (31, 200), (224, 224)])
def test_a_thumbnail_squashes_through_opencv_to_pillows_pixels_within_one(size: tuple[int, int]) -> None:
    """The fast path for images no larger than the network's input (pupyl_queue.images.squash)."""
    import cv2

    from pupyl_queue.images import squash

    rgb = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
    fast = squash(rgb, 224)
    assert fast.shape == (224, 224, 3) and fast.dtype == np.uint8
    assert np.array_equal(fast, cv2.resize(np.asarray(rgb), (224, 224), interpolation=cv2.INTER_LINEAR))
    pillow = np.asarray(rgb.resize((224, 224), Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(fast.astype(int) - pillow).max() <= 1


@pytest.mark.parametrize("size", [(640, 427), (300, 150)])
def test_a_larger_image_keeps_pillows_antialiased_squash(size: tuple[int, int]) -> None:
    from pupyl_queue.images import squash

    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
    assert np.array_equal(squash(rgb, 224), np.asarray(rgb.resize((224, 224), Image.Resampling.BILINEAR)))


def test_real_thumbnails_squash_within_one_of_pillow() -> None:
    from pupyl_queue.images import squash

    flowers = sorted((SHARED_DATA / "flowers").glob("*/*.jpg"))[:40]
    if not flowers:
        pytest.skip(f"no flowers under {SHARED_DATA}")
    for path in flowers:
        rgb = decode(path.read_bytes(), 10_000_000, target=224).rgb
        pillow = np.asarray(rgb.resize((224, 224), Image.Resampling.BILINEAR)).astype(int)
        assert np.abs(squash(rgb, 224).astype(int) - pillow).max() <= 1, path
