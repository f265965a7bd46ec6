"""Copy detection (issue #18): the verifier on real and generated photos, and copy mode through workers."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from pupyl_queue import PupylQueue, Settings, copydetect, queries
from pupyl_queue.client import TaskFailed
from pupyl_queue.copysearch import list_length, merge_short_lists, query_views
from pupyl_queue.layout import Layout
from pupyl_queue.queries import QueryError
from tests.conftest import PHOTOS
from tests.imagegen import encode, pattern
from tests.workers import Workers

REAL = ["caer/camera.jpg", "caer/guitar.jpg", "caer/tent.jpg", "coral/owl.jpg", "coral/parrot.jpg"]


def textured(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A generated picture with corners and edges (shapes and text over a smooth pattern)."""
    rng = np.random.default_rng(seed)
    image = pattern(seed, size)
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1])
        w, h = rng.integers(8, 50, 2)
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape((int(x), int(y), int(x + w), int(y + h)), fill=colour, outline=(0, 0, 0))
    draw.text((10, 10), f"picture {seed}", fill=(255, 255, 255))
    return image


def edit(image: Image.Image, kinds: tuple[str, ...]) -> Image.Image:
    """The edits of bench/copies.py, at fixed strengths."""
    w, h = image.size
    for kind in kinds:
        if kind == "crop":
            image = image.crop((w // 8, h // 10, w - w // 6, h - h // 8))
        elif kind == "rotate":
            image = image.rotate(7, Image.Resampling.BILINEAR)
        elif kind == "jpeg":
            image = Image.open(io.BytesIO(encode(image, "JPEG", quality=12))).convert("RGB")
        elif kind == "mirror":
            image = ImageOps.mirror(image)
        elif kind == "gray":
            image = image.convert("L").convert("RGB")
        elif kind == "frame":
            image = ImageOps.expand(image, border=max(w, h) // 12, fill=(200, 30, 30))
        elif kind == "shrink":
            image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BILINEAR)
        elif kind == "caption":
            image = image.copy()
            ImageDraw.Draw(image).rectangle(
                (0, image.height * 5 // 6, image.width, image.height), fill=(0, 0, 0)
            )
        image = image.convert("RGB")
    return image


EDITS = [("crop", "jpeg"), ("rotate", "gray"), ("mirror", "caption"), ("frame", "shrink"), ("crop", "mirror")]


def photo(name: str) -> Image.Image:
    path = PHOTOS / name
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared test data folder is not mounted)")
    return Image.open(path).convert("RGB")


@pytest.mark.parametrize("kinds", EDITS, ids="+".join)
def test_edited_generated_picture_is_verified_against_its_original_only(kinds: tuple[str, ...]) -> None:
    originals = [copydetect.extract(textured(seed)) for seed in range(4)]
    query = copydetect.extract_query(edit(textured(2), kinds))
    verdicts = [copydetect.verify(query, original) for original in originals]
    assert [v.found for v in verdicts] == [False, False, True, False], [v.inliers for v in verdicts]
    assert verdicts[2].score > 0.9 and verdicts[2].mirrored == ("mirror" in kinds)
    assert verdicts[2].sure and not any(v.sure for v in verdicts[:2] + verdicts[3:])


@pytest.mark.parametrize("kinds", EDITS, ids="+".join)
def test_edited_real_photo_is_verified_against_its_original_only(kinds: tuple[str, ...]) -> None:
    originals = [copydetect.extract(photo(name)) for name in REAL]
    for position, name in enumerate(REAL):
        query = copydetect.extract_query(edit(photo(name), kinds))
        found = [copydetect.verify(query, original).found for original in originals]
        assert found == [i == position for i in range(len(REAL))], (name, found)


def test_distinct_photo_of_the_same_subject_is_no_copy() -> None:
    # Two different photos of hot dogs (and of cats): alike for a CNN, not copies of each other.
    pairs = [
        ("coral/imprinting/hotdog_train_0.bmp", "coral/imprinting/hotdog_test_0.bmp"),
        ("coral/imprinting/cat_train_0.bmp", "coral/imprinting/cat_test_0.bmp"),
    ]
    for a, b in pairs:
        verdict = copydetect.verify(copydetect.extract_query(photo(a)), copydetect.extract(photo(b)))
        assert not verdict.found and verdict.score < 0.5, (a, b, verdict)


def test_short_list_verification_stops_at_a_sure_copy_and_reranks() -> None:
    originals = [copydetect.extract(textured(seed)) for seed in range(5)]
    query = copydetect.extract_query(edit(textured(3), ("crop",)))
    verdicts = copydetect.verify_short_list(query, [originals[0], None, originals[3], originals[4]])
    assert len(verdicts) == 3 and verdicts[1] is None and verdicts[2].inliers >= copydetect.STRONG_INLIERS
    assert not verdicts[2].mirrored and not verdicts[0].found
    mirrored = copydetect.extract_query(edit(textured(3), ("mirror",)))
    again = copydetect.verify_short_list(mirrored, [originals[0], originals[3], originals[4]])
    assert [v.found for v in again] == [False, True] and again[1].mirrored  # originals[4]: not consumed
    hits = [(10, 0.1), (11, 0.2), (13, 0.3), (14, 0.4)]
    ranked = copydetect.rerank(hits, verdicts + [None])
    assert [r[0] for r in ranked] == [13, 10, 11, 14]
    # A mirrored copy whose original is the global top one stops the verification there, as an
    # unmirrored one does: each candidate is tried in both views before the next.
    others = [copydetect.extract(textured(seed)) for seed in range(10, 15)]
    first = copydetect.verify_short_list(mirrored, [originals[3], *others])
    assert len(first) == 1 and first[0].mirrored and first[0].found


def test_mirror_features_are_sifts_of_the_mirror_image() -> None:
    # Derived from the plain features (no second SIFT pass), they must be what SIFT finds on the
    # mirror image: the same descriptors at mirrored positions, and as many inliers against a copy.
    image = photo("caer/guitar.jpg")
    gray = copydetect.working_copy(image)
    derived = copydetect.extract(gray).mirrored(gray.shape[1])
    direct = copydetect.extract(np.ascontiguousarray(gray[:, ::-1]))
    gaps = []  # each derived keypoint's descriptor distance to SIFT's at its position (512: unrelated)
    for point, descriptor in zip(derived.points, derived.descriptors):
        near = np.flatnonzero(np.hypot(*(direct.points - point).T) < 0.6)
        gaps.append(
            min((np.linalg.norm(direct.descriptors[j] - descriptor.astype(float)) for j in near), default=512)
        )
    assert np.mean(np.array(gaps) == 0) >= 0.5 and np.mean(np.array(gaps) < 100) >= 0.8, sorted(gaps)
    copy = copydetect.extract(edit(ImageOps.mirror(image), ("crop", "jpeg")))
    by_derived, by_sift = copydetect._inliers(derived, copy), copydetect._inliers(direct, copy)
    assert by_derived >= copydetect.STRONG_INLIERS and by_derived >= 0.8 * by_sift, (by_derived, by_sift)
    query = copydetect.extract_query(image)
    assert np.array_equal(query.mirrored.descriptors, derived.descriptors)  # what verification uses


def test_ratio_matches_are_opencvs_brute_force_matches() -> None:
    # The matrix-product matcher must keep the matches of cv2.BFMatcher.knnMatch + Lowe's ratio test.
    import cv2

    images = [photo(name) for name in REAL[:4]]
    features = [copydetect.extract(image) for image in images]
    edited = [copydetect.extract(edit(image, ("crop", "jpeg"))) for image in images]
    for query in edited:
        for candidate in features:
            pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(query.root, candidate.root, k=2)
            expected = {
                (p[0].queryIdx, p[0].trainIdx)
                for p in pairs
                if len(p) == 2 and p[0].distance < copydetect.RATIO * p[1].distance
            }
            mine, theirs = copydetect._ratio_matches(query, candidate)
            assert set(zip(mine.tolist(), theirs.tolist())) == expected


def test_stored_features_are_cached_in_the_store_and_remade_when_damaged(tmp_path: Path) -> None:
    from pupyl_queue.copysearch import stored_features
    from pupyl_queue.runtime import Runtime

    rt = Runtime(Settings(data_dir=tmp_path))
    layout = Layout("copies")
    rt.store.put(layout.image(7), encode(textured(7), "JPEG", quality=92))
    first = stored_features(rt, "copies", 7)
    assert first is not None and len(first) > 50
    assert rt.store.get(layout.local_features(7)) == first.to_bytes()  # cached for the next search
    rt.store.put(layout.local_features(7), b"PK\x03\x04 damaged")
    again = stored_features(rt, "copies", 7)
    assert again is not None and np.array_equal(again.descriptors, first.descriptors)
    assert rt.store.get(layout.local_features(7)) == first.to_bytes()
    assert stored_features(rt, "copies", 8) is None  # no stored copy: removed meanwhile


def test_unknown_search_mode_is_refused_before_any_work() -> None:
    with pytest.raises(QueryError, match="mode must be one of similar, copy"):
        queries.search(None, {"query": {"id": 1}, "mode": "copies"})  # type: ignore[arg-type]


def test_features_round_trip_without_pickle() -> None:
    features = copydetect.extract(textured(7))
    again = copydetect.LocalFeatures.from_bytes(features.to_bytes())
    assert len(features) > 50 and features.descriptors.shape[1] == 128
    assert np.array_equal(again.points, features.points) and np.array_equal(
        again.descriptors, features.descriptors
    )


def test_query_views_add_the_mirror_and_drop_a_frame() -> None:
    image = textured(1)
    framed = ImageOps.expand(image, border=30, fill=(0, 0, 255))
    views = query_views(framed)
    assert len(views) == 3 and views[2].size == image.size
    assert len(query_views(image)) == 2  # no frame: nothing to trim
    assert merge_short_lists([[(1, 0.3), (2, 0.4)], [(2, 0.1), (3, 0.5)]], 2) == [(2, 0.1), (1, 0.3)]
    # A mirror-averaged descriptor gives the mirror image the query's own vector: no mirror view.
    assert [v.size for v in query_views(framed, mirror=False)] == [framed.size, image.size]
    assert len(query_views(image, mirror=False)) == 1


def test_a_gray_query_verifies_a_longer_short_list() -> None:
    settings = Settings(copy_short_list=50, copy_short_list_gray=200)
    colour = textured(4)
    gray = Image.open(io.BytesIO(encode(colour.convert("L").convert("RGB"), "JPEG", quality=20)))
    assert copydetect.is_gray(gray) and not copydetect.is_gray(colour)
    assert list_length(settings, gray) == 200 and list_length(settings, colour) == 50
    assert list_length(settings.replace(copy_short_list_gray=10), gray) == 50  # never shorter
    # A search asks with the network's squashed pixels, which it has made already: the same answers.
    squash = {
        name: np.asarray(im.convert("RGB").resize((224, 224))) for name, im in (("g", gray), ("c", colour))
    }
    assert copydetect.is_gray(squash["g"]) and not copydetect.is_gray(squash["c"])
    assert list_length(settings, squash["g"]) == 200 and list_length(settings, squash["c"]) == 50


# --- through real workers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def copy_stack(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path
) -> Iterator[tuple[PupylQueue, Workers]]:
    home = tmp_path_factory.mktemp("stack-copies")
    settings = Settings(
        data_dir=home / "data",
        redis_url=redis_url.rsplit("/", 1)[0] + "/5",
        near_duplicate_mode="copy",
        copy_short_list=20,
    )
    workers = Workers(settings, home)
    workers.start()
    client = PupylQueue(settings=settings, model=tiny_model)
    client.redis.flushdb()
    yield client, workers
    client.close()
    workers.stop_all()


def originals(folder: Path) -> dict[str, Image.Image]:
    """Real photos when the shared data is there, generated ones otherwise."""
    folder.mkdir()
    if PHOTOS.exists():
        images = {Path(name).stem: Image.open(PHOTOS / name).convert("RGB") for name in REAL}
    else:
        images = {f"picture{seed}": textured(seed) for seed in range(5)}
    for name, image in images.items():
        (folder / f"{name}.jpg").write_bytes(encode(image, "JPEG", quality=92))
    return images


@pytest.mark.slow
def test_copy_mode_finds_originals_through_workers(
    copy_stack: tuple[PupylQueue, Workers], tmp_path: Path
) -> None:
    client, workers = copy_stack
    images = originals(tmp_path / "originals")
    job = client.index(tmp_path / "originals")
    job.wait(timeout=300)
    ids = {Path(item["ref"]).stem: item["id"] for item in job.report()}
    assert set(ids) == set(images)
    rng = random.Random(18)
    for name, image in images.items():
        kinds = EDITS[rng.randrange(len(EDITS))]
        query = encode(edit(image, kinds), "JPEG", quality=85)
        verdict = client.find_original(query, timeout=120)
        assert verdict["found"] and verdict["id"] == ids[name], (name, kinds, verdict)
        rows = client.search(query, top=3, return_metadata=True, mode="copy", timeout=120)
        assert rows[0]["id"] == ids[name] and rows[0]["copy_score"] >= 0.5
        assert rows[0]["original_file_name"] == f"{name}.jpg"  # metadata in copy mode too
    distinct = encode(textured(99), "JPEG")
    verdict = client.find_original(distinct, timeout=120)
    assert not verdict["found"] and verdict["id"] is None and verdict["score"] < 0.5
    with pytest.raises(TaskFailed, match="copy mode needs a query image"):
        client.search(np.ones(256, np.float32), mode="copy", timeout=120)
    # Plain similarity search is as it was: no copy verdict, no re-ranking.
    answer = client.search_async(distinct, top=3).get(timeout=120)
    assert "copy" not in answer and [r["distance"] for r in answer["results"]] == sorted(
        r["distance"] for r in answer["results"]
    )
    workers.check_alive()


@pytest.mark.slow
def test_copy_mode_near_duplicate_check_refuses_edited_reuploads(
    copy_stack: tuple[PupylQueue, Workers], tmp_path: Path
) -> None:
    client, _ = copy_stack
    copies = client.for_collection("reuploads")
    images = originals(tmp_path / "originals")
    first = copies.index(tmp_path / "originals", near_duplicate=0.01)
    first.wait(timeout=300)
    ids = {Path(item["ref"]).stem: item["id"] for item in first.report()}
    assert all(item["status"] == "indexed" for item in first.report())
    # Their local features were made by the check: cached at ingestion, not on a first copy search.
    assert all(copies.store.exists(Layout("reuploads").local_features(i)) for i in ids.values())
    (tmp_path / "again").mkdir()
    for position, (name, image) in enumerate(images.items()):
        edited = edit(image, EDITS[position % len(EDITS)])
        (tmp_path / "again" / f"{name}-edited.jpg").write_bytes(encode(edited, "JPEG", quality=80))
    (tmp_path / "again" / "distinct.jpg").write_bytes(encode(textured(123), "JPEG"))
    second = copies.index(tmp_path / "again", near_duplicate=0.01)
    second.wait(timeout=300)
    report = {Path(item["ref"]).stem: item for item in second.report()}
    assert report["distinct"]["status"] == "indexed", report["distinct"]
    for name in images:
        item = report[f"{name}-edited"]
        assert item["status"] == "duplicate" and item["duplicate_of"] == ids[name], item
        assert item["copy_score"] >= 0.5


@pytest.mark.slow
def test_workers_embed_with_the_collection_descriptor(
    copy_stack: tuple[PupylQueue, Workers], tmp_path: Path, tiny_model: Path
) -> None:
    """The embed and the search worker both use the manifest's descriptor, per collection."""
    from pupyl_queue.images import decode
    from pupyl_queue.models import ModelSpec, extractor_for

    client, workers = copy_stack
    gem = client.for_collection("gem-mirror")
    gem.descriptor = "gem+mirror"
    plain = client.for_collection("plain-avg")  # the same workers, the default descriptor
    images = originals(tmp_path / "originals")
    for view in (gem, plain):
        view.index(tmp_path / "originals").wait(timeout=300)
    assert gem.store.exists(Layout("gem-mirror").manifest)
    first = next(iter(images))
    data = (tmp_path / "originals" / f"{first}.jpg").read_bytes()
    mirrored = encode(ImageOps.mirror(Image.open(io.BytesIO(data)).convert("RGB")), "PNG")
    # In process, the vectors the collection's descriptor gives (the workers must agree with them).
    spec = ModelSpec.from_json(json.loads(gem.store.get(Layout("gem-mirror").manifest))["model"])
    assert spec.descriptor == "gem+mirror"
    expected = extractor_for(spec, "", tiny_model)
    vectors = {
        name: expected.embed(
            decode((tmp_path / "originals" / f"{name}.jpg").read_bytes(), 10**8, target=224).pixels(224)[None]
        )[0]
        for name in images
    }
    for query in (data, mirrored):
        rows = gem.search(query, top=len(images), return_metadata=True, timeout=120)
        assert Path(rows[0]["original_file_name"]).stem == first and rows[0]["distance"] < 1e-3, rows[0]
        for row in rows:  # every distance is the gem+mirror one: the query and the index agree
            name = Path(row["original_file_name"]).stem
            assert abs(row["distance"] - (1 - float(vectors[first] @ vectors[name]))) < 2e-3, (name, row)
    # The avg collection on the same workers: its mirrored query is no longer at distance ~0.
    rows = plain.search(mirrored, top=1, return_metadata=True, timeout=120)
    assert rows[0]["distance"] > 5e-3, rows[0]
    workers.check_alive()


def small_model(path: Path, dim: int = 16) -> Path:
    """An own model with few outputs (RGB 0..255 in, ``dim`` out): whitening needs 2 vectors per
    dimension before compaction learns it, so 16-d needs 64 images, not the 512 of 256-d."""
    import keras

    inputs = keras.Input((224, 224, 3))
    pooled = keras.layers.AveragePooling2D(28)(keras.layers.Rescaling(1 / 255.0)(inputs))
    dense = keras.layers.Dense(
        dim,
        kernel_initializer=keras.initializers.RandomNormal(seed=3),
        bias_initializer=keras.initializers.RandomNormal(seed=4),
    )
    keras.Model(inputs, dense(keras.layers.Flatten()(pooled))).save(path)
    return path


@pytest.mark.slow
def test_workers_whiten_a_collection_with_the_option(
    copy_stack: tuple[PupylQueue, Workers], tmp_path: Path
) -> None:
    """Created with ``whitening="pca"``: the compaction (maintenance worker) learns the transform
    into the snapshot, the search worker ranks the snapshot and the commits after it whitened, as a
    numpy reference over the stored raw vectors does; a search by id starts from the raw vector."""
    from pupyl_queue.codecs import decode_segment_rows
    from pupyl_queue.coordination import Coordinator
    from pupyl_queue.models import normalize

    client, workers = copy_stack
    view = client.for_collection("whitened")
    view.model, view.whitening = str(small_model(tmp_path / "small.keras")), "pca"
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in range(70):
        (folder / f"{seed}.png").write_bytes(encode(pattern(seed + 1000), "PNG"))
    assert view.index(folder).wait(timeout=300)["indexed"] == 70
    layout = Layout("whitened")
    assert json.loads(view.store.get(layout.manifest))["model"]["whitening"] == "pca"
    manifest = view.compact(timeout=300)
    assert manifest["whitening"]["learned_from"] == 70 and "whitening.npz" in manifest["files"]
    tail = tmp_path / "tail"
    tail.mkdir()
    for seed in range(3):
        (tail / f"t{seed}.png").write_bytes(encode(pattern(seed + 2000), "PNG"))
    view.index(tail).wait(timeout=300)
    # The raw vectors the store holds: the snapshot's vector files, then the commits after it.
    keys = list(manifest["vector_files"])
    keys += [key for _, key in Coordinator(view.redis, layout).commits_after(manifest["watermark"])]
    parts = [decode_segment_rows(view.store.get(key))[:2] for key in keys]
    ids = np.concatenate([p[0] for p in parts])
    raw = np.concatenate([p[1] for p in parts]).astype(np.float64)
    assert len(ids) == 73
    snapshot_rows = np.isin(ids, np.concatenate([p[0] for p in parts[: len(manifest["vector_files"])]]))
    learned_on = raw[snapshot_rows]
    mean = learned_on.mean(axis=0)
    _, singular, directions = np.linalg.svd(learned_on - mean, full_matrices=False)
    eigen = np.maximum(singular**2, (singular**2).max() * 1e-6)

    def whiten(v: np.ndarray) -> np.ndarray:
        return normalize(((v - mean) @ directions.T) * eigen**-0.25)

    whitened = whiten(raw)
    differs = 0
    for row in (0, 5, 71):  # two from the snapshot, one committed after it
        want = np.argsort(-(whitened @ whitened[row]), kind="stable")[:10]
        hits = view.search(int(ids[row]), top=10, return_distances=True, timeout=120)
        assert [i for i, _ in hits] == ids[want].tolist(), (row, hits)
        np.testing.assert_allclose([d for _, d in hits], 1 - whitened[want] @ whitened[row], atol=1e-4)
        differs += ids[np.argsort(-(raw @ raw[row]))[:10]].tolist() != ids[want].tolist()
    assert differs  # the raw ranking is another: the workers really rank whitened vectors
    workers.check_alive()
