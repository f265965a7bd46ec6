"""Image metadata: one store object per embed batch, found by id through a range index in Redis.

Why (issue #15): one metadata object per image made the store work per indexed image two
writes (the stored copy and its metadata). An embed batch now writes ``meta/<batch id>.json``
once, holding every kept image of the batch, beside its segment ``segments/<batch id>.npz``.

Finding an id's object costs no write of its own: ids are allocated per batch as one contiguous
range (coordination._ALLOCATE), and the same Lua call records the range's first id in a sorted
set (``meta-ranges``: score = first id, member = batch id). The batch holding an id is the member
with the greatest score not above it: one ZREVRANGEBYSCORE, pipelined for all ids of a search.

Removal cannot take one image out of a shared object without rewriting it (a read-modify-write
that concurrent removals would race), so a removed id goes into the set ``removed``; readers
answer None for it. Both Redis structures are derived from the store (``rebuild_index``): the
ranges from the batch objects, the removed ids from tombstones and snapshots (only those some
batch object still holds); ``pupyl-queue rebuild`` and restore call it.

The set would grow by one id per removal for good, so compaction prunes it (``prune``), once a
published snapshot holds the ids as removed: each batch object holding some is written again
without them, under a new name (``<batch id>~<version>``; ``meta-version`` counts), and one Lua
call swaps the range's member to it (or drops the range when nothing is left), fenced by the
compaction lock's token (fencing.py); then the ids leave the set. An id its batch object does
not hold reads as absent. Why a new name rather than a rewrite in place: a fenced-out compaction's
late PUT (a write in flight when its lock lapsed) could otherwise put back entries that a later
prune took out and forgot; under a new name it is an orphan that no range names, and its swap
is refused. The objects swapped out are deleted by the next prune (``meta-superseded``), so a
reader that found the old name a moment before the swap still reads it. Only batches whose
segment is committed are pruned: a batch that may still run again rewrites its object. Every
version of a batch holds all its live ids (a prune only takes removed ids out), so ``rebuild_index``
takes any (the newest), and marks removed the removed ids that any version still holds.

The price is on the read side: a read fetches the whole batch object (about 470 bytes per image:
~120 KB for a batch of 256) where it fetched one image's; the hits of one search that sit in the
same batch share one GET. A removed image's entry stays in its batch object's bytes (hidden by
the set) until a compaction prunes it.

Redis is needed to find a batch object: after Redis lost its data, ids of batch objects read as
absent until ``pupyl-queue rebuild`` (which any Redis loss needs anyway: ids, commit log, dedup).

Collections written before this layout keep one ``images/<id>.json`` per image: an id that no
batch object holds is read there (the fallback), and removal still deletes that object.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import redis

from pupyl_queue import constants as C
from pupyl_queue.fencing import Fence, FencedOut
from pupyl_queue.layout import Layout
from pupyl_queue.store import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)

FORMAT = 1  # of a batch object: {"format": 1, "batch": <batch id>, "images": {"<id>": {...}}}
READ_THREADS = 16  # concurrent store GETs for one read (a search's hits sit in many batches)
VERSION_MARK = "~"  # a pruned batch object's name: <batch id>~<version> (batch ids never hold "~")
FORGET_CHUNK = 5_000  # ids per SREM (a Lua call's arguments)

# A prune's swap of one batch object, fenced. KEYS: lock, ranges, superseded. ARGV: token (0:
# unfenced), the member seen, its replacement ('' none: the range goes), this run's number. The
# replacement leaves the superseded set (recorded there before it was written, so that a run cut
# off before this swap leaves no orphan: the next prune deletes it), the member seen enters it.
# 0: the member is gone (another prune swapped it); -1: the lock is not this run's.
_SWAP = """
if ARGV[1] ~= '0' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local score = redis.call('ZSCORE', KEYS[2], ARGV[2])
if not score then return 0 end
redis.call('ZREM', KEYS[2], ARGV[2])
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[2], score, ARGV[3])
  redis.call('ZREM', KEYS[3], ARGV[3])
end
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
return 1
"""

# Forget pruned ids, fenced. KEYS: lock, removed. ARGV: token (0: unfenced), ids.
_FORGET = """
if ARGV[1] ~= '0' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
return redis.call('SREM', KEYS[2], unpack(ARGV, 2))
"""

Meta = dict[str, Any]
T = TypeVar("T")
R = TypeVar("R")


def encode_batch(batch_id: str, metas: Iterable[Meta]) -> bytes:
    """The batch object: each kept image's metadata under its id."""
    images = {str(meta["id"]): meta for meta in metas}
    return json.dumps({"format": FORMAT, "batch": batch_id, "images": images}).encode()


def decode_batch(data: bytes) -> dict[int, Meta]:
    return {int(image_id): meta for image_id, meta in json.loads(data)["images"].items()}


def read(store: ObjectStore, client: redis.Redis, layout: Layout, ids: list[int]) -> list[Meta | None]:
    """Each id's metadata, None when it is removed or unknown: one Redis round trip for all the
    ids, then one GET per distinct batch object (concurrently), and a GET of the old per-image
    object for an id that no batch object holds."""
    if not ids:
        return []
    batches = _batches_of(client, layout, ids)
    wanted: dict[str, list[int]] = defaultdict(list)
    for n, batch in enumerate(batches):
        if batch:
            wanted[batch].append(n)
    found: list[Meta | None] = [None] * len(ids)
    for batch, held in zip(wanted, _each(lambda b: _get_batch(store, layout, b), list(wanted))):
        for n in wanted[batch]:
            found[n] = held.get(ids[n])
    old = [n for n, batch in enumerate(batches) if batch is not None and found[n] is None]
    for n, meta in zip(old, _each(lambda n: _get_one(store, layout, ids[n]), old)):
        found[n] = meta
    return found


def _each(fn: Callable[[T], R], items: list[T]) -> list[R]:
    """``fn`` of every item, concurrently when there are several (each is a store round trip)."""
    if len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(min(READ_THREADS, len(items)), thread_name_prefix="pupyl-meta") as pool:
        return list(pool.map(fn, items))


def read_one(store: ObjectStore, client: redis.Redis, layout: Layout, image_id: int) -> Meta | None:
    return read(store, client, layout, [image_id])[0]


def mark_removed(client: redis.Redis, layout: Layout, ids: Iterable[int]) -> None:
    """From now on these ids read as absent (call it once the removal is committed)."""
    ids = [int(i) for i in ids]
    if ids:
        client.sadd(layout.key(C.KEY_REMOVED), *ids)


def _batches_of(client: redis.Redis, layout: Layout, ids: list[int]) -> list[str | None]:
    """Per id: the batch object whose range holds it, '' when none does (an id from before this
    layout), None when it was removed.

    One MULTI/EXEC, so the range and the removed set are read at one instant: a prune swaps an
    object's name before its ids leave the set, so an id not in the set names the pruned object."""
    with client.pipeline(transaction=True) as pipe:
        for image_id in ids:
            pipe.zrevrangebyscore(layout.key(C.KEY_META_RANGES), int(image_id), "-inf", start=0, num=1)
            pipe.sismember(layout.key(C.KEY_REMOVED), int(image_id))
        answers = pipe.execute()
    out: list[str | None] = []
    for hit, removed in zip(answers[::2], answers[1::2]):
        out.append(None if removed else _text(hit[0]) if hit else "")
    return out


def _get_batch(store: ObjectStore, layout: Layout, batch_id: str) -> dict[int, Meta]:
    try:
        return decode_batch(store.get(layout.batch_meta(batch_id)))
    except ObjectNotFound:
        return {}  # ids allocated to a batch that kept nothing (or has not committed yet)


def _get_one(store: ObjectStore, layout: Layout, image_id: int) -> Meta | None:
    try:
        return json.loads(store.get(layout.image_meta(image_id)))
    except ObjectNotFound:
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def batch_of(name: str) -> str:
    """The batch id of a batch object's name (a pruned one carries ``~<version>``)."""
    return name.split(VERSION_MARK, 1)[0]


def version_of(name: str) -> int:
    """0 for the object its embed batch wrote, the prune's version for a rewritten one."""
    _, mark, version = name.partition(VERSION_MARK)
    return int(version) if mark and version.isdigit() else 0


def rebuild_index(
    store: ObjectStore, client: redis.Redis, layout: Layout, removed: set[int]
) -> dict[str, int]:
    """Derive the range index and the removed set from the store; return sha256 -> id of every
    image still indexed (the dedup map), from both layouts.

    ``removed``: every id removed (tombstones in the store and the snapshots' removed lists). Only
    those that some object still holds go into the set: an id no object holds reads as absent,
    and the set stays as small as the last prune left it. A batch with several versions (a prune
    cut off, or one whose swapped-out object was not deleted yet) is read through its newest:
    every version holds all its live ids.
    """
    live: dict[str, int] = {}
    found: dict[str, list[tuple[int, str]]] = defaultdict(list)  # batch id -> (version, name)
    held_ids: set[int] = set()
    lowest: dict[str, int] = {}
    for key in store.list(f"{layout.root}/{C.STORE_META}/"):
        name = key.rsplit("/", 1)[-1].removesuffix(".json")
        held = decode_batch(store.get(key))
        found[batch_of(name)].append((version_of(name), name))
        if not held:
            continue
        base = batch_of(name)
        lowest[base] = min(min(held), lowest.get(base, min(held)))
        held_ids.update(held)
        for image_id, meta in held.items():
            if image_id not in removed:
                live[meta["sha256"]] = image_id
    ranges = {max(found[base])[1]: first for base, first in lowest.items()}
    for key in store.list(f"{layout.root}/{C.STORE_IMAGES}/"):
        if key.endswith(".json"):  # the layout before batch objects; removal deleted these
            meta = json.loads(store.get(key))
            held_ids.add(int(meta["id"]))  # one a removal was cut off before deleting must stay hidden
            if int(meta["id"]) not in removed:
                live[meta["sha256"]] = int(meta["id"])
    if ranges:
        client.zadd(layout.key(C.KEY_META_RANGES), ranges)
    others = {name: 0 for names in found.values() for _, name in sorted(names)[:-1]}
    if others:  # older versions, and objects a cut-off prune never swapped in: the next prune deletes them
        client.zadd(layout.key(C.KEY_META_SUPERSEDED), others)
    newest = max((version for names in found.values() for version, _ in names), default=0)
    if newest:  # later prunes name their objects above every version in the store
        client.eval(_AT_LEAST, 1, layout.key(C.KEY_META_VERSION), newest)
    mark_removed(client, layout, removed & held_ids)
    return live


_AT_LEAST = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
return 1
"""


def prune(
    store: ObjectStore, client: redis.Redis, layout: Layout, gone: set[int], fence: Fence | None = None
) -> dict[str, int]:
    """Take the removed ids that a published snapshot holds as removed (``gone``) out of the batch
    objects, then out of the ``removed`` set (see the module docstring).

    Crash-safe in any order a kill could cut it: until its ids leave the set they read as absent
    anyway; an object written but not swapped in is recorded as superseded first (the next prune
    deletes it); a rerun finds the swapped objects no longer holding their ids and finishes. A run
    that lost the compaction lock raises FencedOut and changes nothing in Redis (the Lua calls
    check the token). Returns counts: ids forgotten, objects rewritten, objects dropped (nothing
    left in them), swapped-out objects deleted.
    """
    fence = fence or Fence()
    removed_key = layout.key(C.KEY_REMOVED)
    superseded_key = layout.key(C.KEY_META_SUPERSEDED)
    candidates = sorted({int(i) for i in client.sscan_iter(removed_key, count=10_000)} & gone)
    counts = {"forgotten": 0, "rewritten": 0, "dropped": 0, "deleted": 0}
    if not candidates and not client.zcard(superseded_key):
        return counts
    version = int(client.incr(layout.key(C.KEY_META_VERSION)))  # names this run's objects
    run = fence.token or version  # orders runs: a fenced-out run's token is below the live one's
    counts["deleted"] = _delete_superseded(store, client, layout, run)
    plans = _plan(store, client, layout, candidates)
    lock = fence.key or layout.key("compact-lock")
    names = {m: f"{batch_of(m)}{VERSION_MARK}{version}" for m, _, drop, keep in plans if drop and keep}
    if names:
        fence.check()
        client.zadd(superseded_key, {name: run for name in names.values()})  # until swapped in
    done: list[int] = []  # ids that no batch object holds any more
    unheld: list[int] = []  # of those, ids their batch object did not hold: maybe an old per-image object
    for member, ids, drop, keep in plans:
        if drop:  # it holds some of them
            new = names.get(member, "")
            if new:
                fence.check()
                store.put(layout.batch_meta(new), encode_batch(batch_of(member), keep))
            fence.check()
            keys = [lock, layout.key(C.KEY_META_RANGES), superseded_key]
            answer = int(client.eval(_SWAP, 3, *keys, fence.token, member, new, run))
            if answer == -1:
                raise FencedOut(f"metadata prune of {layout.collection} lost the compaction lock")
            if answer == 0:  # another prune swapped this object meanwhile: its ids wait for the next
                continue
            counts["rewritten" if new else "dropped"] += 1
        unheld += [i for i in ids if i not in drop]
        done += ids
    for image_id in unheld:  # a removal cut off before it deleted the old layout's object
        store.delete(layout.image_meta(image_id))
    counts["forgotten"] = _forget(client, layout, fence, done)
    return counts


def _plan(
    store: ObjectStore, client: redis.Redis, layout: Layout, ids: list[int]
) -> list[tuple[str, list[int], set[int], list[Meta]]]:
    """Per batch object whose range holds some of ``ids`` ('' none): those ids, the ones it holds,
    and the entries it keeps once they are out. Objects of batches not committed are left out."""
    by_member: dict[str, list[int]] = defaultdict(list)
    for image_id, member in zip(ids, _members(client, layout, ids)):
        by_member[member].append(image_id)
    committed = _committed(client, layout, [m for m in by_member if m])
    plans: list[tuple[str, list[int], set[int], list[Meta]]] = []
    for member, held_ids in by_member.items():
        if member and not committed[member]:
            continue  # its batch may still run again and write its object once more: next time
        try:
            held = _get_batch(store, layout, member) if member else {}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("metadata prune passes over %s: unreadable (%s)", layout.batch_meta(member), exc)
            continue
        drop = {i for i in held_ids if i in held}
        plans.append((member, held_ids, drop, [m for i, m in held.items() if i not in drop]))
    return plans


def _forget(client: redis.Redis, layout: Layout, fence: Fence, ids: list[int]) -> int:
    """SREM the pruned ids from ``removed``, fenced: their objects no longer hold them."""
    lock = fence.key or layout.key("compact-lock")
    for start in range(0, len(ids), FORGET_CHUNK):
        chunk = ids[start : start + FORGET_CHUNK]
        fence.check()
        if int(client.eval(_FORGET, 2, lock, layout.key(C.KEY_REMOVED), fence.token, *chunk)) == -1:
            raise FencedOut(f"metadata prune of {layout.collection} lost the compaction lock")
    return len(ids)


def _members(client: redis.Redis, layout: Layout, ids: list[int]) -> list[str]:
    """The batch object whose range holds each id ('' none), in one round trip."""
    with client.pipeline(transaction=False) as pipe:
        for image_id in ids:
            pipe.zrevrangebyscore(layout.key(C.KEY_META_RANGES), int(image_id), "-inf", start=0, num=1)
        return [_text(hit[0]) if hit else "" for hit in pipe.execute()]


def _committed(client: redis.Redis, layout: Layout, members: list[str]) -> dict[str, bool]:
    """Whether each object's batch has committed its segment (then nothing writes its object again)."""
    if not members:
        return {}
    segments = [layout.segment(batch_of(m)) for m in members]
    return {
        m: v is not None for m, v in zip(members, client.hmget(layout.key(C.KEY_COMMIT_BY_OBJECT), segments))
    }


def _delete_superseded(store: ObjectStore, client: redis.Redis, layout: Layout, run: int) -> int:
    """Delete the objects earlier runs swapped out (a reader that found one just before has read
    it long since) or wrote and never swapped in (cut off, or fenced out)."""
    key = layout.key(C.KEY_META_SUPERSEDED)
    names = [_text(n) for n in client.zrangebyscore(key, "-inf", f"({run}")]
    store.delete_many(layout.batch_meta(name) for name in names)
    if names:
        client.zrem(key, *names)
    return len(names)
