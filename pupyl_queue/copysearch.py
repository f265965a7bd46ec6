"""Copy mode: find the original of an edited copy (a search) or refuse an edited re-upload (ingestion).

Two stages. The global stage ranks the index by the query's CNN vectors: the query
as it is, its mirror image (not with a mirror-averaged descriptor, ``gem+mirror``:
there the mirror image has the query's own vector) and, when it has a uniform frame,
the query without it (the views in one forward pass; a candidate's distance is its
best view's). The verification stage (pupyl_queue/copydetect.py) matches local
features of the query against each candidate of the short list
(``PUPYL_COPY_SHORT_LIST``, ``PUPYL_COPY_SHORT_LIST_GRAY`` for a gray query) and
re-ranks: verified copies first. Collections made for copy detection should use the
``gem+mirror`` descriptor: it puts more originals in the short list (BENCHMARKS.md).

Where it runs: on the search workers, in the ``pupyl.search`` task (``mode:
"copy"``). Copy mode needs what they hold, the index and the model, and its
verification is bounded: at most ``PUPYL_COPY_SHORT_LIST`` candidates, verified in
global order, the first sure copy ending it; the query's own features are made while
the network runs; candidates' features are read from a cache in the store (written at
ingestion by a copy-mode near-duplicate check, else by the first copy search that
needed them) and fetched concurrently. Measured end to end on this 2-core machine
(BENCHMARKS.md, session 8 of issue 18), a copy search takes about 3 times a plain one
(61-75 against 22-27 ms p50), so a plain search queued behind one waits that much
longer, and never behind ingestion. A separate queue would need a second worker process holding the
model (and the index, or a second round trip for the short list) on the same two
cores, for a gain only when copy searches are a large share of the traffic; then run
search workers dedicated to them. The near-duplicate check of the embed workers
(``PUPYL_NEAR_DUPLICATE_MODE=copy``) asks the search workers only for short lists
(``pupyl.nearest`` with ``top``) and verifies in the embed worker, which has the new
images' pixels: the search workers do no verification work for ingestion.
"""

from __future__ import annotations

import logging
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from pupyl_queue import copydetect
from pupyl_queue.copydetect import LocalFeatures, QueryFeatures, Verdict
from pupyl_queue.images import DecodedImage, ImageError, decode
from pupyl_queue.layout import Layout
from pupyl_queue.models import ModelSpec
from pupyl_queue.runtime import Runtime
from pupyl_queue.settings import Settings
from pupyl_queue.store import ObjectNotFound

log = logging.getLogger(__name__)

ShortLists = Callable[[str, np.ndarray, int], list[list[tuple[int, float]]]]


def stored_features(rt: Runtime, collection: str, image_id: int) -> LocalFeatures | None:
    """An indexed image's local features: from the store's cache, or from its stored copy.

    Written at ingestion when the collection's near-duplicate check runs in copy mode; otherwise
    computed from the stored copy on the first need and written back to the store, so the cluster
    pays it once per image (SIFT: 30-130 ms on this busy 2-core machine, against 1-2 ms to read the
    cache; bench/copies.py).
    None when the stored copy is gone (the image was removed meanwhile).
    """
    layout = Layout(collection)
    try:
        cached: bytes | None = rt.store.get(layout.local_features(image_id))
    except ObjectNotFound:
        cached = None
    if cached is not None:
        try:
            return LocalFeatures.from_bytes(cached)
        except (ValueError, KeyError, OSError, zipfile.BadZipFile):  # damaged: made again below
            log.warning("local features of image %d in %s are damaged; made again", image_id, collection)
    try:
        data = rt.store.get(layout.image(image_id))
    except ObjectNotFound:
        return None
    try:
        features = copydetect.extract(decode(data, rt.settings.max_pixels, target=copydetect.WORK_SIDE).rgb)
    except ImageError:
        log.warning("stored copy of image %d in %s does not decode; not verified", image_id, collection)
        return None
    rt.store.put(layout.local_features(image_id), features.to_bytes())
    return features


def query_views(image: Image.Image, mirror: bool = True) -> list[Image.Image]:
    """The query as it is, mirrored, and without its frame when it has one (global stage views).

    ``mirror=False`` for a collection whose descriptor is mirror-averaged (``+mirror``): there the
    mirror image has the query's own vector, and its view would cost a forward pass for nothing.
    """
    views = [image, ImageOps.mirror(image)] if mirror else [image]
    trimmed = copydetect.without_border(image)
    if trimmed is not image:
        views.append(trimmed)
    return views


def list_length(settings: Settings, image: Image.Image | np.ndarray) -> int:
    """How many candidates of the global stage to verify: more for a gray query.

    Gray copies of colour originals fall furthest in the global ranking (bench/copies.py: 85% of
    them reach a short list of 50, 95% one of 200); gray images are few, so the longer list costs
    little overall. The verification stops at the first sure copy either way.
    """
    if copydetect.is_gray(image):
        return max(settings.copy_short_list, settings.copy_short_list_gray)
    return settings.copy_short_list


def mirror_view(spec: ModelSpec) -> bool:
    """Whether the global stage needs the query's mirror image: not when the descriptor has it."""
    return not spec.descriptor.endswith("+mirror")


def merge_short_lists(per_view: Sequence[Sequence[tuple[int, float]]], size: int) -> list[tuple[int, float]]:
    """One short list from each view's hits: a candidate's distance is its nearest view's."""
    best: dict[int, float] = {}
    for hits in per_view:
        for image_id, distance in hits:
            if image_id not in best or distance < best[image_id]:
                best[image_id] = distance
    return sorted(best.items(), key=lambda item: item[1])[:size]


def query_image(rt: Runtime, collection: str, query: dict[str, Any], size: int) -> DecodedImage:
    """The query's image: its bytes, or an indexed image's stored copy (a vector is no image).

    Decoded for the network's input ``size`` as indexing does, so its plain view's vector is a
    plain search's.
    """
    from pupyl_queue.queries import QueryError, query_bytes

    data = query_bytes(rt, query)
    if data is None and "id" in query:
        try:
            data = rt.store.get(Layout(collection).image(int(query["id"])))
        except ObjectNotFound:
            raise QueryError(f"no stored copy of image {query['id']}") from None
    if data is None:
        raise QueryError("copy mode needs a query image (image_b64 or key) or an indexed id")
    return decode(data, rt.settings.max_pixels, target=size)


PREFETCH_FIRST, PREFETCH = 2, 8  # candidates' features read ahead: at first, then once one failed


def verify_candidates(
    rt: Runtime, collection: str, views: QueryFeatures, short_list: Sequence[tuple[int, float]]
) -> list[Verdict | None]:
    """Verify the candidates in order (the first sure copy stops), their features read concurrently.

    Reads run ``PREFETCH`` candidates ahead of the verification, not the whole list at once, and
    only ``PREFETCH_FIRST`` until the first candidate failed: most queries stop at the first
    candidate, and reading (and decoding) more candidates' features for them took CPU from its
    verification on a busy machine.
    """
    pool = rt.pool()
    ids = [image_id for image_id, _ in short_list]
    futures: list[Future[LocalFeatures | None]] = []

    def in_order() -> Iterator[LocalFeatures | None]:
        for position in range(len(ids)):
            ahead = min(len(ids), position + (PREFETCH_FIRST if position == 0 else PREFETCH))
            futures.extend(pool.submit(stored_features, rt, collection, i) for i in ids[len(futures) : ahead])
            yield futures[position].result()

    verdicts = copydetect.verify_short_list(views, in_order())
    for rest in futures[len(verdicts) :]:
        rest.cancel()
    return verdicts + [None] * (len(short_list) - len(verdicts))


def copy_answer(ranked: Sequence[tuple[int, float, Verdict | None]]) -> dict[str, Any]:
    """The answer's ``copy``: whether a verified copy was found, of which image, and how sure."""
    top = ranked[0] if ranked else None
    verdict = top[2] if top is not None else None
    if top is None or verdict is None or not verdict.found:
        best = max((r[2].score for r in ranked if r[2] is not None), default=0.0)
        return {"found": False, "id": None, "score": round(best, 4), "inliers": 0}
    return {
        "found": True,
        "id": top[0],
        "score": round(verdict.score, 4),
        "inliers": verdict.inliers,
        "mirrored": verdict.mirrored,
    }


def short_list(
    rt: Runtime, collection: str, vectors: np.ndarray, size: int, task: dict[str, Any], send: Any
) -> tuple[list[tuple[int, float]], dict[str, Any]]:
    """The global stage over every view: the searcher here, or the shards of a router."""
    from pupyl_queue.queries import rank

    per_view, info = rank(rt, collection, vectors, size, task, send)
    return merge_short_lists(per_view, size), info


def search_copies(
    rt: Runtime, task: dict[str, Any], collection: str, top: int, started: float, send: Any
) -> dict[str, Any]:
    """``pupyl.search`` with ``mode: "copy"``: the global short list re-ranked by verification."""
    from pupyl_queue.queries import metadata

    extractor = rt.extractor(collection)
    size = extractor.input_size
    image = query_image(rt, collection, task["query"], size)
    # The query's local features are made while the network runs (OpenCV and TensorFlow both
    # release the GIL): on 2 cores this hides most of the extraction.
    features_made = rt.pool().submit(copydetect.extract_query, image.rgb)
    views = query_views(image.rgb, mirror=mirror_view(extractor.spec))
    # The plain view as indexing sees it (same pixels, same vector as a plain search's).
    plain = image.pixels(size)
    others = [np.asarray(v.resize((size, size), Image.Resampling.BILINEAR)) for v in views[1:]]
    pixels = np.stack([plain, *others])
    vectors = extractor.embed(pixels)
    verified = list_length(rt.settings, plain)
    hits, info = short_list(rt, collection, vectors, max(top, verified), task, send)
    verified_at = time.perf_counter()
    features = features_made.result()
    verdicts = verify_candidates(rt, collection, features, hits[:verified])
    verdicts += [None] * (len(hits) - len(verdicts))  # past the short list when top is longer
    ranked = copydetect.rerank(hits, verdicts)
    results: list[dict[str, Any]] = []
    for image_id, distance, verdict in ranked[:top]:
        row: dict[str, Any] = {"id": image_id, "distance": distance}
        if verdict is not None:
            row["copy_score"] = round(verdict.score, 4)
            row["inliers"] = verdict.inliers
        results.append(row)
    if task.get("metadata"):
        for row, meta in zip(results, metadata(rt, Layout(collection), [r["id"] for r in results])):
            row["metadata"] = meta
    return {
        "collection": collection,
        **info,
        "mode": "copy",
        "copy": copy_answer(ranked),
        "verify_ms": round((time.perf_counter() - verified_at) * 1000, 2),
        "took_ms": round((time.perf_counter() - started) * 1000, 2),
        "results": results,
    }


def _item_short_lists(
    rt: Runtime,
    collection: str,
    vectors: np.ndarray,
    images: Sequence[DecodedImage],
    short_lists: ShortLists,
) -> list[list[tuple[int, float]]]:
    """Each new image's short list over its views, as a copy search's (one request for the batch).

    The plain views' vectors are the ones being indexed; the mirrored and unframed views cost one
    more forward pass here, only in copy mode.
    """
    extractor = rt.extractor(collection)
    side = extractor.input_size
    owners, extra = [], []
    for item, image in enumerate(images):
        for view in query_views(image.rgb, mirror=mirror_view(extractor.spec))[1:]:
            owners.append(item)
            extra.append(np.asarray(view.resize((side, side), Image.Resampling.BILINEAR)))
    every = np.concatenate([vectors, extractor.embed(np.stack(extra))]) if extra else vectors
    lengths = [list_length(rt.settings, image.rgb) for image in images]
    rows = short_lists(collection, every, max(lengths, default=rt.settings.copy_short_list))
    per_item: list[list[list[tuple[int, float]]]] = [[row] for row in rows[: len(images)]]
    for owner, row in zip(owners, rows[len(images) :]):
        per_item[owner].append(row)
    return [merge_short_lists(lists, length) for lists, length in zip(per_item, lengths)]


def drop_copies(
    rt: Runtime,
    task: dict[str, Any],
    keep: list[int],
    vectors: np.ndarray,
    ids: list[int],
    report: list[dict[str, Any]],
    images: Sequence[DecodedImage],
    short_lists: ShortLists,
) -> tuple[list[int], np.ndarray]:
    """The ingestion check in copy mode: an item surely verified (``Verdict.sure``) as a copy of an
    indexed image, or of an earlier item of its batch, is a duplicate (``duplicate_of``,
    ``copy_score``).

    The global stage asks the search workers for each item's short list; verification runs here,
    where the new images' pixels are. ``images[i]`` is the image of ``keep[i]``. The local
    features of the images kept are written to the store's cache here: copy searches then find
    them (SIFT costs 30-130 ms an image on this machine; reading the cache, 1 ms).
    """
    collection = task["collection"]
    found = _item_short_lists(rt, collection, vectors, images, short_lists)
    views = [copydetect.extract_query(image.rgb) for image in images]
    kept: list[int] = []
    for row, position in enumerate(keep):
        best: tuple[int, Verdict] | None = None
        verdicts = verify_candidates(rt, collection, views[row], found[row])
        for (image_id, _), verdict in zip(found[row], verdicts):
            if verdict is not None and verdict.sure and (best is None or verdict.inliers > best[1].inliers):
                best = (image_id, verdict)
        if kept:  # earlier items of this batch count as indexed: verify the nearest few of them
            rows = [keep.index(p) for p in kept]
            sims = vectors[rows] @ vectors[row]
            for k in np.argsort(-sims)[:3]:
                verdict = copydetect.verify(views[row], views[rows[int(k)]].plain)
                if verdict.sure and (best is None or verdict.inliers > best[1].inliers):
                    best = (ids[kept[int(k)]], verdict)
        if best is not None:
            before = report[position]
            report[position] = {
                "ref": before["ref"],
                **({"key": before["key"]} if "key" in before else {}),  # the caller's key stays
                "status": "duplicate",
                "duplicate_of": best[0],
                "copy_score": round(best[1].score, 4),
            }
            continue
        kept.append(position)
    # The kept images' features are made already: cache them now, not on their first copy search.
    layout, pool = Layout(collection), rt.pool()
    writes = [
        pool.submit(rt.store.put, layout.local_features(ids[p]), views[keep.index(p)].plain.to_bytes())
        for p in kept
    ]
    for write in writes:
        write.result()
    return kept, vectors[[keep.index(p) for p in kept]]
