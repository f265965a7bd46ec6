"""Edited copies: does a search find the original of a cropped, re-encoded, captioned... copy?

A fixed-seed benchmark from ../shared/data: the real photos and a sample of the
flowers are indexed (about 1,000 images) with the real ImageNet MobileNet 0.25 of
../shared/data/models, as pupyl-queue indexes them (same decode, same 224 input,
same stored normalized copy). Queries are indexed images with one to three edits
(crop, small rotation, low-quality JPEG, recolour, mirror, gray, frame, shrink,
blur, caption band); negatives are edited flowers that are not indexed (a copy
mode must not call them copies). The ranking is measured in process (numpy
cosine over the same vectors the index holds, and pupyl_queue.copydetect on the
global short list), recall@1 and recall@5 per edit kind, and the latency per
query of each stage.

    .venv/bin/python bench/copies.py                 # baseline vs copy mode
    .venv/bin/python bench/copies.py --pooling       # recall@50 of pooling variants, flowers P@10
    .venv/bin/python bench/copies.py --near-duplicate  # the ingestion check over all flowers
    .venv/bin/python bench/copies.py --workers       # end-to-end latency through real workers
    .venv/bin/python bench/copies.py --whitening pca --descriptor gem+mirror  # with / without whitening
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

EDITS = ("crop", "rotate", "jpeg", "recolour", "mirror", "gray", "frame", "shrink", "blur", "caption")
# Same photo at another size (cat_720p = cat.bmp, test_image = test_database_0_0) or byte-identical
# (check_unique_2 = _0): one of each, or an edited copy has two right answers.
SKIP_PHOTOS = {"cat_720p.jpg", "test_check_unique_2.jpg", "test_image.jpg"}
MAX_PIXELS = 10**8


def apply_edit(image: Image.Image, kind: str, rng: random.Random) -> Image.Image:
    w, h = image.size
    if kind == "crop":
        cw, ch = round(w * rng.uniform(0.6, 0.9)), round(h * rng.uniform(0.6, 0.9))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        return image.crop((x, y, x + cw, y + ch))
    if kind == "rotate":
        return image.rotate(rng.choice((-1, 1)) * rng.uniform(3, 10), Image.Resampling.BILINEAR)
    if kind == "jpeg":
        out = io.BytesIO()
        image.save(out, "JPEG", quality=rng.randint(8, 25))
        return Image.open(io.BytesIO(out.getvalue())).convert("RGB")
    if kind == "recolour":
        image = ImageEnhance.Color(image).enhance(rng.uniform(0.3, 1.8))
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))
        gains = np.array([rng.uniform(0.75, 1.25) for _ in range(3)])
        return Image.fromarray(np.clip(np.asarray(image) * gains, 0, 255).astype(np.uint8))
    if kind == "mirror":
        return ImageOps.mirror(image)
    if kind == "gray":
        return image.convert("L").convert("RGB")
    if kind == "frame":
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        return ImageOps.expand(image, border=round(max(w, h) * rng.uniform(0.04, 0.12)), fill=colour)
    if kind == "shrink":
        s = rng.uniform(0.35, 0.6)
        return image.resize((max(16, round(w * s)), max(16, round(h * s))), Image.Resampling.BILINEAR)
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 1.8) * max(w, h) / 400))
    if kind == "caption":
        image = image.copy()
        band = round(h * rng.uniform(0.12, 0.2))
        y = 0 if rng.random() < 0.5 else h - band
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, y, w, y + band), fill=(20, 20, 20))
        draw.text((4, y + band // 4), "SHARED " * 6, fill=(255, 255, 255))
        return image
    raise ValueError(kind)


def edited(image: Image.Image, kinds: tuple[str, ...], rng: random.Random) -> bytes:
    for kind in kinds:
        image = apply_edit(image.convert("RGB"), kind, rng)
    out = io.BytesIO()
    if "jpeg" not in kinds:
        image.save(out, "JPEG", quality=90)
    else:
        image.save(out, "JPEG", quality=rng.randint(10, 25))
    return out.getvalue()


@dataclass
class Dataset:
    indexed: list[bytes]  # files as uploaded
    names: list[str]
    queries: list[bytes]
    truth: list[int]  # position of the original in indexed, -1 for a negative (not indexed)
    kinds: list[tuple[str, ...]]
    unindexed_flowers: list[Path] = field(default_factory=list)


def flowers() -> list[Path]:
    return sorted(p for p in (SHARED / "flowers").glob("*/*.jpg"))


def build(seed: int, distractors: int, queries: int, negatives: int) -> Dataset:
    rng = random.Random(seed)
    photos = sorted(
        p
        for p in (SHARED / "photos").rglob("*")
        if p.suffix.lower() in (".jpg", ".bmp", ".png", ".gif") and p.name not in SKIP_PHOTOS
    )
    all_flowers = flowers()
    rng.shuffle(all_flowers)
    picked, rest = all_flowers[:distractors], all_flowers[distractors:]
    files = photos + picked
    indexed = [f.read_bytes() for f in files]
    names = [str(f.relative_to(SHARED)) for f in files]
    originals = [i for i in range(len(photos)) for _ in range(2)]  # each photo twice, other edits
    originals += rng.sample(range(len(photos), len(files)), max(0, queries - len(originals)))
    ds = Dataset(indexed, names, [], [], [], rest)
    for position in originals + [-1] * negatives:
        source = indexed[position] if position >= 0 else rest[len(ds.queries) % len(rest)].read_bytes()
        kinds = tuple(rng.sample(EDITS, rng.randint(1, 3)))
        image = Image.open(io.BytesIO(source)).convert("RGB")
        ds.queries.append(edited(image, kinds, rng))
        ds.truth.append(position)
        ds.kinds.append(kinds)
    return ds


def real_model(descriptor: str = "avg"):
    """The real MobileNet 0.25 as a collection with this global descriptor would run it."""
    from pupyl_queue.models import configure_backend, load_keras_model, wrap_mobilenet

    configure_backend(0, False)
    path = wrap_mobilenet(
        SHARED / "models" / "mobilenet_2_5_224_tf_no_top.h5", Path(tempfile.mkdtemp()) / "m.keras", alpha=0.25
    )
    extractor = load_keras_model(path)
    return extractor if descriptor == "avg" else extractor.with_descriptor(descriptor)


def pixels(data: bytes, size: int = 224) -> np.ndarray:
    from pupyl_queue.images import decode

    return decode(data, MAX_PIXELS, target=size).pixels(size)


def embed_all(extractor, files: list[bytes]) -> np.ndarray:
    out = []
    for i in range(0, len(files), 64):
        out.append(extractor.embed(np.stack([pixels(f) for f in files[i : i + 64]])))
    return np.concatenate(out)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def run_ranking(args: argparse.Namespace) -> None:
    from pupyl_queue import copydetect
    from pupyl_queue.copysearch import list_length, mirror_view
    from pupyl_queue.settings import Settings

    lengths = Settings(copy_short_list=args.short, copy_short_list_gray=args.short_gray)
    from pupyl_queue.images import decode

    ds = build(args.seed, args.distractors, args.queries, args.negatives)
    print(
        f"{len(ds.indexed)} indexed ({len(ds.indexed) - args.distractors} photos + "
        f"{args.distractors} flowers), "
        f"{sum(t >= 0 for t in ds.truth)} edited-copy queries, {sum(t < 0 for t in ds.truth)} negatives; "
        f"seed {args.seed}"
    )
    extractor = real_model(args.descriptor)
    started = time.perf_counter()
    stored = embed_all(extractor, ds.indexed)
    print(f"indexed vectors in {time.perf_counter() - started:.1f}s")
    # The stored copy is the normalized JPEG the pipeline keeps; its features as the cache would hold them.
    normalized = [decode(f, MAX_PIXELS).normalized_bytes() for f in ds.indexed]
    started = time.perf_counter()
    cache = [copydetect.extract(decode(n, MAX_PIXELS, target=copydetect.WORK_SIDE).rgb) for n in normalized]
    recompute_ms = (time.perf_counter() - started) * 1000 / len(normalized)
    cache_bytes = [c.to_bytes() for c in cache]
    started = time.perf_counter()
    for blob in cache_bytes:
        copydetect.LocalFeatures.from_bytes(blob)
    load_ms = (time.perf_counter() - started) * 1000 / len(cache_bytes)
    print(
        f"local features per stored copy: recompute (decode + SIFT) {recompute_ms:.1f} ms, "
        f"load from cache bytes {load_ms:.2f} ms, "
        f"{np.mean([len(b) for b in cache_bytes]) / 1024:.1f} KiB each"
    )

    base_rank: list[list[int]] = []
    short_rank: list[list[int]] = []
    copy_rank: list[list[int]] = []
    verdict_top: list[copydetect.Verdict | None] = []
    t_embed, t_global, t_query_features, t_verify = [], [], [], []
    positive_inliers, negative_inliers, verified = [], [], []
    for q, data in enumerate(ds.queries):
        t0 = time.perf_counter()
        query = decode(data, MAX_PIXELS, target=224)
        base_vector = extractor.embed(query.pixels(224)[None])[0]
        views = [query.rgb]
        if "mirror" in args.views and mirror_view(extractor.spec):
            views.append(ImageOps.mirror(query.rgb))
        if "trim" in args.views:
            trimmed = copydetect.without_border(query.rgb)
            if trimmed is not query.rgb:
                views.append(trimmed)
        vectors = extractor.embed(
            np.stack([np.asarray(v.resize((224, 224), Image.Resampling.BILINEAR)) for v in views])
        )
        t1 = time.perf_counter()
        base_order = np.argsort(-(stored @ base_vector))[:50]
        sims = (stored @ vectors.T).max(axis=1)
        length = list_length(lengths, query.rgb)
        order = np.argsort(-sims)[: max(50, length)]
        t2 = time.perf_counter()
        features = copydetect.extract_query(decode(data, MAX_PIXELS, target=copydetect.WORK_SIDE).rgb)
        t3 = time.perf_counter()
        hits = [(int(i), float(1 - sims[i])) for i in order[:length]]
        verdicts = copydetect.verify_short_list(features, [cache[i] for i, _ in hits])
        ranked = copydetect.rerank(hits, verdicts)
        t4 = time.perf_counter()
        t_embed.append(t1 - t0)
        t_global.append(t2 - t1)
        t_query_features.append(t3 - t2)
        t_verify.append(t4 - t3)
        base_rank.append([int(i) for i in base_order])
        short_rank.append([int(i) for i in order])
        copy_rank.append([r[0] for r in ranked])
        verdict_top.append(ranked[0][2])
        verified.append(sum(v is not None for v in verdicts))
        for (i, _), v in zip(hits, verdicts):
            if v is not None:
                (positive_inliers if i == ds.truth[q] else negative_inliers).append(v.inliers)
    report(ds, base_rank, short_rank, copy_rank, verdict_top, args.short)
    print(
        f"verifications per query: mean {np.mean(verified):.1f}, short list {args.short}, views {args.views}"
    )
    ms = lambda xs: 1000 * float(np.median(xs))  # noqa: E731
    total = [a + b + c + d for a, b, c, d in zip(t_embed, t_global, t_query_features, t_verify)]
    print(
        f"\nlatency per query, in process, p50: embed {ms(t_embed):.1f} ms, "
        f"global search {ms(t_global):.2f} ms, "
        f"query SIFT (plain, mirror if needed) {ms(t_query_features):.1f} ms, verify {args.short} cached "
        f"{ms(t_verify):.1f} ms; copy mode total p50 {ms(total):.1f} ms, p95 {1000 * pct(total, 95):.1f} ms; "
        f"recomputing candidates' features instead would add ~{recompute_ms * args.short:.0f} ms"
    )
    pos, neg = np.array(positive_inliers), np.array(negative_inliers)
    mid, width = calibrate(pos, neg)
    print(f"logistic fit of P(original | inliers) over the verified candidates: mid {mid:.1f}, width {width}")
    print(
        f"inliers: originals in the short list p5 {pct(pos, 5):.0f} p50 {pct(pos, 50):.0f}; other candidates "
        f"p50 {pct(neg, 50):.0f} p99 {pct(neg, 99):.0f} p99.9 {pct(neg, 99.9):.0f} max {neg.max()}"
    )


def calibrate(positives: np.ndarray, negatives: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood logistic curve of P(original | inliers), on a grid (copydetect's constants)."""
    x = np.concatenate([positives, negatives]).astype(np.float64)
    y = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    best = (-np.inf, 0.0, 0.0)
    for mid in np.arange(4.0, 40.0, 0.5):
        for width in np.arange(0.5, 8.0, 0.25):
            p = np.clip(1 / (1 + np.exp(-(x - mid) / width)), 1e-9, 1 - 1e-9)
            ll = float(np.sum(y * np.log(p) + (1 - y) * np.log(1 - p)))
            if ll > best[0]:
                best = (ll, mid, width)
    return best[1], best[2]


def report(
    ds: Dataset,
    base: list[list[int]],
    short_list: list[list[int]],
    copy: list[list[int]],
    top_verdict,
    short: int,
) -> None:
    rows: dict[str, list[int]] = defaultdict(list)
    for q, kinds in enumerate(ds.kinds):
        if ds.truth[q] < 0:
            continue
        rows["all"].append(q)
        for kind in kinds:
            rows[kind].append(q)

    def recall(ranks: list[list[int]], qs: list[int], k: int) -> float:
        return float(np.mean([ds.truth[q] in ranks[q][:k] for q in qs]))

    print(
        f"\n{'edit':<10} {'n':>4} {'base@1':>7} {'base@5':>7} {'short@' + str(short):>8} {'short@50':>8} "
        f"{'copy@1':>7} {'copy@5':>7} {'found':>6}"
    )
    for kind in ("all", *EDITS):
        qs = rows[kind]
        found = np.mean(
            [top_verdict[q] is not None and top_verdict[q].found and copy[q][0] == ds.truth[q] for q in qs]
        )
        print(
            f"{kind:<10} {len(qs):>4} {recall(base, qs, 1):>7.3f} {recall(base, qs, 5):>7.3f} "
            f"{recall(short_list, qs, short):>8.3f} {recall(short_list, qs, 50):>8.3f} "
            f"{recall(copy, qs, 1):>7.3f} "
            f"{recall(copy, qs, 5):>7.3f} {found:>6.3f}"
        )
    negatives = [q for q, t in enumerate(ds.truth) if t < 0]
    false = sum(1 for q in negatives if top_verdict[q] is not None and top_verdict[q].found)
    print(f"negatives (edited flowers not indexed) called a copy: {false} of {len(negatives)}")


def feature_maps(files: list[bytes], mirrored: bool = False) -> np.ndarray:
    """MobileNet 0.25's last feature maps (n, 7, 7, 256), before any pooling."""
    import keras

    global _maps_model
    if "_maps_model" not in globals():
        base = keras.applications.MobileNet(
            input_shape=(224, 224, 3),
            alpha=0.25,
            include_top=False,
            pooling=None,
            weights=str(SHARED / "models" / "mobilenet_2_5_224_tf_no_top.h5"),
        )
        _maps_model = base
    out = []
    for i in range(0, len(files), 64):
        x = np.stack([pixels(f) for f in files[i : i + 64]]).astype(np.float32)
        if mirrored:
            x = x[:, :, ::-1]
        out.append(np.asarray(_maps_model(x / 127.5 - 1.0, training=False)))
    return np.concatenate(out)


def pool(maps: np.ndarray, how: str) -> np.ndarray:
    from pupyl_queue.models import normalize

    if how == "avg":
        v = maps.mean(axis=(1, 2))
    elif how == "max":
        v = maps.max(axis=(1, 2))
    else:  # GeM, p = 3
        v = np.cbrt(np.mean(np.maximum(maps, 0) ** 3, axis=(1, 2)))
    return normalize(v)


def run_pooling(args: argparse.Namespace) -> None:
    """Recall@1/@50 on the edited copies and leave-one-out P@10 on all flowers, per global descriptor."""
    from bench.int8_quality import precision_at

    ds = build(args.seed, args.distractors, args.queries, 0)
    flower_files = flowers()
    labels = np.array(
        [sorted({p.parent.name for p in flower_files}).index(p.parent.name) for p in flower_files]
    )
    sets = {"indexed": ds.indexed, "queries": ds.queries, "flowers": [p.read_bytes() for p in flower_files]}
    maps = {k: feature_maps(v) for k, v in sets.items()}
    flipped = {k: feature_maps(v, mirrored=True) for k, v in sets.items()}
    truth = np.array(ds.truth)
    print(f"\n{'global descriptor':<22} {'copy@1':>7} {'copy@5':>7} {'copy@50':>8} {'flowers P@10':>13}")
    for how in ("avg", "max", "gem"):
        for mirror in (False, True):
            vec = {
                k: pool(maps[k], how) if not mirror else pool(maps[k], how) + pool(flipped[k], how)
                for k in sets
            }
            from pupyl_queue.models import normalize

            vec = {k: normalize(v) for k, v in vec.items()}
            order = np.argsort(-(vec["queries"] @ vec["indexed"].T), axis=1)[:, :50]
            hit = order == truth[:, None]
            p10 = precision_at(vec["flowers"], labels)[10]
            name = how + (" + mirror-averaged" if mirror else "")
            print(
                f"{name:<22} {hit[:, :1].any(1).mean():>7.3f} {hit[:, :5].any(1).mean():>7.3f} "
                f"{hit.any(1).mean():>8.3f} {p10:>13.3f}"
            )


def run_whitening(args: argparse.Namespace) -> None:
    """Recall@1/@50 of the plain query vector, copy mode's short list @50 (its views) and flowers
    leave-one-out P@10, without whitening and with each option of ``--whitening``.

    The same code as the cluster: ``whitening.learn`` on the indexed vectors (as a compaction of
    this collection would; the flowers' own for P@10, as a compaction of a flowers collection
    would; the last column applies the copies collection's to the flowers, as the session-2 table
    did), and the search through a ``VectorIndex`` built with it, as a search worker's.
    """
    from bench.int8_quality import precision_at
    from pupyl_queue.copysearch import merge_short_lists, mirror_view, query_views
    from pupyl_queue.images import decode
    from pupyl_queue.vector_index import VectorIndex
    from pupyl_queue.whitening import check_whitening, learn, strength_of

    options = ["none", *(check_whitening(o) for o in args.whitening.split(","))]
    ds = build(args.seed, args.distractors, args.queries, 0)
    extractor = real_model(args.descriptor)
    started = time.perf_counter()
    stored = embed_all(extractor, ds.indexed)
    plain = embed_all(extractor, ds.queries)
    view_vectors, owners = [], []  # copy mode's extra views (mirror unless +mirror, unframed)
    for q, data in enumerate(ds.queries):
        image = decode(data, MAX_PIXELS, target=224).rgb
        for view in query_views(image, mirror_view(extractor.spec))[1:]:
            view_vectors.append(np.asarray(view.resize((224, 224), Image.Resampling.BILINEAR)))
            owners.append(q)
    extra = extractor.embed(np.stack(view_vectors)) if view_vectors else np.zeros((0, stored.shape[1]))
    flower_files = flowers()
    labels = np.array(
        [sorted({p.parent.name for p in flower_files}).index(p.parent.name) for p in flower_files]
    )
    flower_vectors = embed_all(extractor, [p.read_bytes() for p in flower_files])
    print(
        f"{args.descriptor}: embedded {len(stored)} indexed, {len(plain)} queries (+{len(extra)} views), "
        f"{len(flower_vectors)} flowers in {time.perf_counter() - started:.0f}s; load {os.getloadavg()}"
    )
    truth = np.array(ds.truth)
    ids = np.arange(len(stored), dtype=np.int64)
    print(
        f"\n{'descriptor':<11} {'whitening':<10} {'copy@1':>7} {'copy@50':>8} {'short@50':>9} "
        f"{'P@10':>6} {'P@10 (copies-learned)':>22}"
    )
    for option in options:
        strength = strength_of(option)
        whitening = None if strength is None else learn(stored, strength)
        index = VectorIndex(stored.shape[1], "Flat", gpu=False, whitening=whitening)
        index.add(ids, stored)
        plain_hits = index.search(plain, 50)
        hit = np.array(
            [[i == t for i, _ in row] + [False] * (50 - len(row)) for row, t in zip(plain_hits, truth)]
        )
        per_query = [[row] for row in plain_hits]  # copy mode's global stage: a candidate's best view
        for owner, row in zip(owners, index.search(extra, 50) if len(extra) else []):
            per_query[owner].append(row)
        short = [t in [i for i, _ in merge_short_lists(rows, 50)] for rows, t in zip(per_query, truth)]
        flowers_whitening = None if strength is None else learn(flower_vectors, strength)
        p10 = precision_at(
            flower_vectors if flowers_whitening is None else flowers_whitening.apply(flower_vectors), labels
        )[10]
        p10_copies = precision_at(
            flower_vectors if whitening is None else whitening.apply(flower_vectors), labels
        )
        print(
            f"{args.descriptor:<11} {option:<10} {hit[:, :1].any(1).mean():>7.3f} {hit.any(1).mean():>8.3f} "
            f"{np.mean(short):>9.3f} {p10:>6.3f} {p10_copies[10]:>22.3f}"
        )
    print(f"load {os.getloadavg()}")


def run_near_duplicate(args: argparse.Namespace) -> None:
    """The copy-mode ingestion check: edited re-uploads refused, and no flower refused as a copy."""
    extractor = real_model(args.descriptor)
    if not args.flowers_only:
        reuploads(args, extractor)
    if not args.reuploads_only:
        flowers_check(args, extractor)


def reuploads(args: argparse.Namespace, extractor) -> None:
    """As the embed worker does it: each new image's views (plain, mirrored, unframed) give its
    short list of the indexed images, verified by local features."""
    from pupyl_queue import copydetect
    from pupyl_queue.copysearch import list_length, mirror_view, query_views
    from pupyl_queue.images import decode
    from pupyl_queue.settings import Settings

    lengths = Settings(copy_short_list=args.short, copy_short_list_gray=args.short_gray)

    ds = build(args.seed, args.distractors, args.queries, 0)
    stored = embed_all(extractor, ds.indexed)
    whitening = None
    if args.whitening:  # the short lists of a whitened collection (learned on it, as compaction does)
        from pupyl_queue.whitening import check_whitening, learn, strength_of

        strength = strength_of(check_whitening(args.whitening))
        whitening = None if strength is None else learn(stored, strength)
        stored = stored if whitening is None else whitening.apply(stored)
    cache = [copydetect.extract(decode(f, MAX_PIXELS, target=copydetect.WORK_SIDE).rgb) for f in ds.indexed]
    refused = 0
    missed: dict[str, int] = defaultdict(int)
    rows: list[dict[str, object]] = []  # --dump: each query's original, its rank, cosine and inliers
    for data, truth in zip(ds.queries, ds.truth):
        image = decode(data, MAX_PIXELS, target=copydetect.WORK_SIDE).rgb
        extra = [
            np.asarray(v.resize((224, 224), Image.Resampling.BILINEAR))
            for v in query_views(image, mirror_view(extractor.spec))[1:]
        ]
        vectors = extractor.embed(np.stack([pixels(data), *extra]))
        vectors = vectors if whitening is None else whitening.apply(vectors)
        views = copydetect.extract_query(image)
        similarity = (stored @ vectors.T).max(axis=1)
        short = np.argsort(-similarity)[: list_length(lengths, image)]
        verdicts = copydetect.verify_short_list(views, [cache[i] for i in short])
        found = [int(short[k]) for k, v in enumerate(verdicts) if v is not None and v.sure]
        refused += truth in found
        if args.dump:
            rank = int((similarity > similarity[truth]).sum())
            own = copydetect.verify(views, cache[truth]).inliers
            cosine = float(similarity[truth])
            rows.append({"rank": rank, "cosine": cosine, "inliers": own, "refused": truth in found})
        if truth not in found:
            if truth not in short:
                missed["not in the short list"] += 1
            else:  # the whole list in both views, to see the original's own inliers
                inliers = copydetect.verify(views, cache[truth]).inliers
                missed[f"in the short list, {inliers} inliers"] += 1
    print(f"edited re-uploads refused as a copy of their original: {refused} of {len(ds.queries)}")
    for why, count in sorted(missed.items()):
        print(f"   not refused, {why}: {count}")
    if args.dump:
        Path(f"{args.dump}.reuploads.json").write_text(json.dumps(rows))


def flowers_check(args: argparse.Namespace, extractor) -> None:
    """The flowers indexed one after the other, each checked against the short list (its plain
    vector's) of all the flowers before it: every copy found is a false duplicate, unless the
    set holds the same photo twice (listed, to look at)."""
    from pupyl_queue import copydetect
    from pupyl_queue.copysearch import list_length
    from pupyl_queue.images import decode
    from pupyl_queue.settings import Settings

    lengths = Settings(copy_short_list=args.short, copy_short_list_gray=args.short_gray)
    files = [p.read_bytes() for p in flowers()]
    names = [str(p.relative_to(SHARED)) for p in flowers()]
    vectors = embed_all(extractor, files)
    if args.whitening:  # the short lists of a whitened collection (learned on it, as compaction does)
        from pupyl_queue.whitening import check_whitening, learn, strength_of

        strength = strength_of(check_whitening(args.whitening))
        whitening = None if strength is None else learn(vectors, strength)
        vectors = vectors if whitening is None else whitening.apply(vectors)
        print(f"flowers' short lists by whitened vectors ({args.whitening}, learned on the flowers)")
    started = time.perf_counter()
    images = [decode(f, MAX_PIXELS, target=copydetect.WORK_SIDE).rgb for f in files]
    features = [copydetect.extract_query(image) for image in images]
    listed = [list_length(lengths, image) for image in images]
    print(
        f"gray flowers (verified against {args.short_gray} earlier ones): "
        f"{sum(n > args.short for n in listed)}"
    )
    false, worst = [], 0
    pairs: list[tuple[int, int, float, int]] = []  # --dump: every verified pair, cosine and inliers
    for i in range(1, len(files)):
        similarity = vectors[:i] @ vectors[i]
        short = np.argsort(-similarity)[: listed[i]]
        for j in short:
            verdict = copydetect.verify(features[i], features[j].plain)
            worst = max(worst, verdict.inliers)
            pairs.append((i, int(j), round(float(similarity[j]), 5), verdict.inliers))
            if verdict.sure:
                false.append((names[i], names[int(j)], verdict.inliers))
    if args.dump:
        Path(f"{args.dump}.flowers.json").write_text(json.dumps({"names": names, "pairs": pairs}))
    print(
        f"flowers refused as copies of an earlier flower: {len(false)} of {len(files)} "
        f"(most inliers of any pair {worst}; {time.perf_counter() - started:.0f}s)"
    )
    for pair in false:
        print("  ", *pair)


def run_workers(args: argparse.Namespace) -> None:
    """End to end: index through real workers, then search each query in both modes from a client."""
    import shutil

    from pupyl_queue import PupylQueue
    from pupyl_queue import constants as C
    from pupyl_queue.models import wrap_mobilenet
    from pupyl_queue.settings import Settings
    from pupyl_queue.stack import free_port, start_redis, start_worker, stop

    work = Path(tempfile.mkdtemp(prefix="pupyl-copies-"))
    ds = build(args.seed, args.distractors, args.queries, args.negatives)
    folder = work / "indexed"
    folder.mkdir()
    for i, (name, data) in enumerate(zip(ds.names, ds.indexed)):
        (folder / f"{i:05d}{Path(name).suffix}").write_bytes(data)
    model = wrap_mobilenet(SHARED / "models" / "mobilenet_2_5_224_tf_no_top.h5", work / "m.keras", alpha=0.25)
    port = free_port()
    redis = start_redis(work / "redis", port, appendonly=False)
    settings = Settings(
        data_dir=work / "data",
        redis_url=f"redis://127.0.0.1:{port}/0",
        copy_short_list=args.short,
        copy_short_list_gray=args.short_gray,
        tf_threads=args.tf_threads,
    )
    workers = [start_worker(q, settings, log_path=work / f"{q}.log") for q in C.QUEUES]
    client = PupylQueue(settings=settings, model=model, collection="copies", descriptor=args.descriptor)
    try:
        started = time.perf_counter()
        job = client.index(folder)
        job.wait(timeout=3600)
        print(
            f"indexed {len(ds.indexed)} through the workers in {time.perf_counter() - started:.0f}s "
            f"({args.descriptor} descriptor, short list {args.short}); load {os.getloadavg()}"
        )
        ids = {int(Path(item["ref"]).stem): item["id"] for item in job.report()}
        truth = [ids.get(t, -1) if t >= 0 else -1 for t in ds.truth]
        for mode in ("similar", "copy", "copy"):  # copy twice: the first run fills the feature cache
            took, hits, false, inside, verify = [], 0, 0, [], []
            for data, t in zip(ds.queries, truth):
                t0 = time.perf_counter()
                answer = client.search_async(data, top=5, mode=mode).get(timeout=120)
                took.append((time.perf_counter() - t0) * 1000)
                inside.append(answer.get("took_ms", np.nan))
                verify.append(answer.get("verify_ms", np.nan))
                top = answer["results"][0]["id"] if answer["results"] else None
                hits += t >= 0 and top == t
                false += t < 0 and bool(answer.get("copy", {}).get("found"))
            positives = sum(t >= 0 for t in truth)
            print(
                f"{mode:<8} recall@1 {hits / positives:.3f}, negatives called a copy {false}; end-to-end "
                f"latency p50 {np.median(took):.1f} ms, p95 {np.percentile(took, 95):.1f} ms "
                f"(in the worker p50 {np.median(inside):.1f} ms, verification {np.median(verify):.1f}); "
                f"load {os.getloadavg()}"
            )
    finally:
        client.close()
        for proc in workers:
            stop(proc)
        stop(redis)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--distractors", type=int, default=1000, help="flowers indexed besides the photos")
    parser.add_argument("--queries", type=int, default=207)
    parser.add_argument("--negatives", type=int, default=100)
    parser.add_argument("--short", type=int, default=50, help="short list verified in copy mode")
    parser.add_argument("--short-gray", type=int, default=200, help="the same for a gray query")
    parser.add_argument(
        "--descriptor", default="avg", help="global descriptor of the collection (avg, gem, gem+mirror...)"
    )
    parser.add_argument(
        "--views", default="plain,mirror,trim", help="query views of copy mode's global stage"
    )
    parser.add_argument("--pooling", action="store_true", help="compare pooling variants of the global stage")
    parser.add_argument("--near-duplicate", action="store_true", help="the copy-mode ingestion check")
    parser.add_argument("--flowers-only", action="store_true", help="--near-duplicate: the flowers part only")
    parser.add_argument("--reuploads-only", action="store_true", help="--near-duplicate: re-uploads only")
    parser.add_argument("--workers", action="store_true", help="end to end through real workers")
    parser.add_argument("--tf-threads", type=int, default=0, help="--workers: the workers' PUPYL_TF_THREADS")
    parser.add_argument("--dump", default="", help="--near-duplicate: each pair's cosine and inliers, here")
    parser.add_argument(
        "--whitening",
        default="",
        help="compare no whitening with these (comma-separated: pca, pca:<s>), in process; "
        "with --near-duplicate: the re-uploads' short lists in a collection with this one",
    )
    args = parser.parse_args()
    if args.whitening and not args.near_duplicate:
        run_whitening(args)
    elif args.workers:
        run_workers(args)
    elif args.pooling:
        run_pooling(args)
    elif args.near_duplicate:
        run_near_duplicate(args)
    else:
        run_ranking(args)


if __name__ == "__main__":
    main()
