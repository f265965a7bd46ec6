"""Coordination state in Redis: ids, the commit log, dedup and job counters.

Every multi-step update is one Lua script so that concurrent workers, and a
task that runs twice after a redelivery, see it happen once or not at all.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from pupyl_queue import constants as C
from pupyl_queue.layout import Layout

# Allocate ``count`` ids to a batch once; a rerun of the batch gets the same ids. The range's first
# id also goes into the metadata range index (KEYS[3]): the batch's metadata object holds its ids.
_ALLOCATE = """
local have = redis.call('HGET', KEYS[2], ARGV[1])
if have then return tonumber(have) end
local last = redis.call('INCRBY', KEYS[1], ARGV[2])
local first = last - tonumber(ARGV[2]) + 1
redis.call('HSET', KEYS[2], ARGV[1], first)
if tonumber(ARGV[2]) > 0 then redis.call('ZADD', KEYS[3], first, ARGV[1]) end
return first
"""

# Publish one store object as the next commit, once: a second publish of the same key returns the
# sequence it already has (and what its first run replaced). ARGV: store key, images added (or
# removed: negative), an id this commit removes ('' none: its key is forgotten), the id the first
# keyed row's key must still name ('' any: else nothing is committed and the sequence is 0), the
# object's sha256 ('' none: recorded apart, before), the token of the write claim this run holds on
# the object (KEYS[11]; '' none: see _BEGIN_WRITE), the embed batch this object commits (its field
# in its job's ``:batches`` hash, KEYS[12]; '' none), then (caller's key, id, sha256) per keyed row.
# A claim another run holds now (this run's lease lapsed and it took over) commits nothing: {-1}.
# Nor does a batch its job already counted without this commit (failed for good: jobs.fail_batch,
# or finished by another delivery that kept nothing): {-2}. Checked here, in the commit itself, so
# of a live delivery's commit and a failure count exactly one wins (_FINISH_BATCH checks back).
# The checksum (KEYS[10]) is recorded by the very call that commits: no reader sees the commit
# without it, and a publish that finds the object committed leaves the first run's checksum alone.
# Each keyed row takes its key over; the id the key held before, if another, is tombstoned by this
# very commit (KEYS[8] records which), so readers drop it exactly when they add the new row.
# Deciding here, against the key map, makes the commit that runs last win.
_PUBLISH = """
local have = redis.call('HGET', KEYS[3], ARGV[1])
if have then return {tonumber(have), redis.call('HGET', KEYS[8], ARGV[1]) or '[]'} end
if ARGV[7] ~= '' and redis.call('HEXISTS', KEYS[12], ARGV[7]) == 1 then return {-2, '[]'} end
if ARGV[6] ~= '' then
  local holder = redis.call('GET', KEYS[11])
  if holder and holder ~= ARGV[6] then return {-1, '[]'} end
end
if ARGV[4] ~= '' then
  local entry = redis.call('HGET', KEYS[6], ARGV[8])
  if not entry or string.match(entry, '"id":(%d+)') ~= ARGV[4] then return {0, '[]'} end
end
if ARGV[6] ~= '' then redis.call('DEL', KEYS[11]) end
local seq = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], seq)
if ARGV[5] ~= '' then redis.call('HSET', KEYS[10], ARGV[1], ARGV[5]) end
redis.call('INCR', KEYS[4])
local images = tonumber(ARGV[2])
if ARGV[3] ~= '' then
  local key = redis.call('HGET', KEYS[7], ARGV[3])
  if key then
    redis.call('HDEL', KEYS[7], ARGV[3])
    local entry = redis.call('HGET', KEYS[6], key)
    if entry and string.match(entry, '"id":(%d+)') == ARGV[3] then redis.call('HDEL', KEYS[6], key) end
  end
end
local replaced = {}
for i = 8, #ARGV, 3 do
  local key, id, sha = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local entry = redis.call('HGET', KEYS[6], key)
  local old = entry and string.match(entry, '"id":(%d+)')
  if old and old ~= id then
    replaced[#replaced + 1] = {old, key}
    images = images - 1
    redis.call('HDEL', KEYS[7], old)
    local old_sha = string.match(entry, '"sha256":"(%x*)"')
    if old_sha and redis.call('HGET', KEYS[9], old_sha) == old then
      if old_sha == sha then redis.call('HSET', KEYS[9], sha, id)
      else redis.call('HDEL', KEYS[9], old_sha) end
    end
  end
  redis.call('HSET', KEYS[6], key, '{"id":' .. id .. ',"seq":' .. seq .. ',"sha256":"' .. sha .. '"}')
  redis.call('HSET', KEYS[7], id, key)
end
redis.call('INCRBY', KEYS[5], images)
if #replaced == 0 then return {seq, '[]'} end
local out = cjson.encode(replaced)
redis.call('HSET', KEYS[8], ARGV[1], out)
return {seq, out}
"""

# Claim the writing of a store object (ARGV[1]) that its commit (KEYS[1]: committed objects) will
# publish: -1 when it is committed already (a rerun writes nothing), 0 when this run (ARGV[2], a
# token) now holds the claim (KEYS[2]) for ARGV[3] ms, else the holder's remaining milliseconds.
# One round trip, in place of the "committed?" check it replaces.
_BEGIN_WRITE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return -1 end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then return math.max(redis.call('PTTL', KEYS[2]), 1) end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 0
"""

# A write claim's holder extends its lease (ARGV[2] ms), or lets it go (ARGV[2] = 0); 0 if not its own.
_KEEP_WRITE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then return redis.call('DEL', KEYS[1]) end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""

# Record a finished (or failed for good: ARGV[6] = 1) batch of a job once, adding its counts to the job
# (ARGV[8]: items whose key already held the same content). With ARGV[9] (the batch's segment), only
# while that segment is not committed (KEYS[3]: committed objects): -1 when it is. _PUBLISH refuses a
# batch once counted, so a failure count and a live delivery's commit cannot both happen.
_FINISH_BATCH = """
if ARGV[9] and ARGV[9] ~= '' and redis.call('HEXISTS', KEYS[3], ARGV[9]) == 1 then return -1 end
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'batches_done', 1)
redis.call('HINCRBY', KEYS[1], 'indexed', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'duplicate', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'failed', ARGV[5])
if ARGV[6] == '1' then redis.call('HINCRBY', KEYS[1], 'batches_failed', 1) end
if ARGV[8] and ARGV[8] ~= '0' then redis.call('HINCRBY', KEYS[1], 'unchanged', ARGV[8]) end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[7])
return 1
"""

# Claim content hashes for a batch's ids. A claim the batch holds (new, or its own from an earlier
# run) is also recorded as pending (sha256 -> "id@batch") until the batch commits or fails for good.
# ARGV: batch id, then (sha256, id, caller's key or '') per item. An item whose key already holds
# this very content is "unchanged" ('=' .. the key's id): nothing is claimed for it.
_CLAIM = """
local out = {}
for i = 2, #ARGV, 3 do
  local sha, id, key = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local entry = key ~= '' and redis.call('HGET', KEYS[3], key)
  if entry and string.match(entry, '"sha256":"(%x*)"') == sha then
    out[#out + 1] = '=' .. string.match(entry, '"id":(%d+)')
  else
    local owner = redis.call('HGET', KEYS[1], sha)
    if not owner then
      redis.call('HSET', KEYS[1], sha, id)
      owner = id
    end
    if owner == id and ARGV[1] ~= '' then redis.call('HSET', KEYS[2], sha, id .. '@' .. ARGV[1]) end
    out[#out + 1] = owner
  end
end
return out
"""

# A batch committed (ARGV[2] = 0: its claims stay) or failed for good (1: its claims go).
_SETTLE_CLAIMS = """
local pending = redis.call('HGETALL', KEYS[2])
local n = 0
local tail = '@' .. ARGV[1]
for i = 1, #pending, 2 do
  local sha, value = pending[i], pending[i + 1]
  if string.sub(value, -#tail) == tail then
    redis.call('HDEL', KEYS[2], sha)
    if ARGV[2] == '1' and redis.call('HGET', KEYS[1], sha) == string.sub(value, 1, -#tail - 1) then
      redis.call('HDEL', KEYS[1], sha)
      n = n + 1
    end
  end
end
return n
"""

# Drop one pending claim found dead, if it is still the one seen.
_DROP_CLAIM = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[3] then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"""

# Drop a content hash only while it still points at the removed image.
_RELEASE_HASH = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

# An ended job: note when it ended (once) and let its record expire; a job already gone stays gone.
_EXPIRE_JOB = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSETNX', KEYS[1], 'ended_at', ARGV[1])
if tonumber(ARGV[2]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return 1
"""

# Update a job only while it is in the state named.
_UPDATE_JOB_IF = """
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""


class WriteClaimLost(RuntimeError):
    """A run's write claim lapsed and another run took it over: this run committed nothing."""


class BatchCounted(RuntimeError):
    """The batch was counted into its job without this commit (failed for good, most often): a
    live delivery that comes after must not make its images searchable (nothing was committed)."""


class WriteClaimBusy(RuntimeError):
    """Another live run held a batch's write claim for longer than a run waits for it."""


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)


class Coordinator:
    """One collection's view of the shared Redis state."""

    def __init__(self, client: redis.Redis, layout: Layout) -> None:
        self.r = client
        self.layout = layout
        self._allocate = client.register_script(_ALLOCATE)
        self._publish = client.register_script(_PUBLISH)
        self._finish = client.register_script(_FINISH_BATCH)
        self._release = client.register_script(_RELEASE_HASH)
        self._expire = client.register_script(_EXPIRE_JOB)
        self._update_if = client.register_script(_UPDATE_JOB_IF)
        self._claim = client.register_script(_CLAIM)
        self._settle = client.register_script(_SETTLE_CLAIMS)
        self._drop_claim = client.register_script(_DROP_CLAIM)
        self._begin_write = client.register_script(_BEGIN_WRITE)
        self._keep_write = client.register_script(_KEEP_WRITE)

    def _k(self, name: str) -> str:
        return self.layout.key(name)

    # --- ids
    def allocate_ids(self, batch_id: str, count: int) -> list[int]:
        """``count`` contiguous ids for a batch, in one round trip (metadata.py finds them by range)."""
        keys = [self._k(C.KEY_ID_COUNTER), self._k(C.KEY_BATCH_IDS), self._k(C.KEY_META_RANGES)]
        first = int(self._allocate(keys=keys, args=[batch_id, count]))
        return list(range(first, first + count))

    def batch_ids(self, batch_id: str, count: int) -> list[int]:
        """The ids ``allocate_ids`` gave this batch ([]: none yet), without allocating any."""
        first = self.r.hget(self._k(C.KEY_BATCH_IDS), batch_id)
        return [] if first is None else list(range(int(first), int(first) + count))

    # --- dedup
    def claim_hash(self, sha256: str, image_id: int) -> int:
        """The id that owns this content: ``image_id`` if it is the first, else the earlier one."""
        return self.claim_hashes([(sha256, image_id)])[0]

    def claim_hashes(self, claims: list[tuple[str, int]], batch_id: str = "") -> list[int]:
        """Many claims in one round trip, in order: a content seen twice goes to its first id.

        With ``batch_id``, the batch's own claims stay pending until ``settle_claims``: a claim
        whose batch failed for good, or whose owner is neither committed nor in a live job, is
        taken over here instead of making its content a "duplicate" of an id that never existed.
        """
        return [owner for owner, _ in self.claim_items([(sha, i, "") for sha, i in claims], batch_id)]

    def claim_items(self, claims: list[tuple[str, int, str]], batch_id: str = "") -> list[tuple[int, bool]]:
        """``claim_hashes`` for (sha256, id, caller's key or ''): (owner, unchanged) per item.

        ``unchanged``: the key already holds this content (its owner is the key's id); nothing
        was claimed, and the item is not indexed again. Still one round trip.
        """
        if not claims:
            return []
        keys = [self._k(C.KEY_HASHES), self._k(C.KEY_PENDING_CLAIMS), self._k(C.KEY_KEYS)]
        args: list[Any] = [batch_id]
        for sha256, image_id, key in claims:
            args += [sha256, image_id, key]

        def run() -> list[tuple[int, bool]]:
            raw = [str(owner) for owner in self._claim(keys=keys, args=args)]
            return [(int(owner.lstrip("=")), owner.startswith("=")) for owner in raw]

        owners = run()
        if not batch_id:
            return owners
        taken = {
            sha for (sha, image_id, _), (owner, same) in zip(claims, owners) if owner != image_id and not same
        }
        if taken and self.drop_dead_claims(sorted(taken), batch_id):
            owners = run()
        return owners

    def drop_dead_claims(self, shas: list[str], batch_id: str = "") -> int:
        """Release the pending claims among ``shas`` whose batch neither committed nor can still run."""
        keys = [self._k(C.KEY_HASHES), self._k(C.KEY_PENDING_CLAIMS)]
        dropped = 0
        for sha, value in zip(shas, self.r.hmget(keys[1], shas)):
            if value is None or "@" not in value:
                continue  # settled: its batch committed
            owner, _, owner_batch = value.partition("@")
            if owner_batch == batch_id or self.batch_can_commit(owner_batch):
                continue
            dropped += int(self._drop_claim(keys=keys, args=[sha, value, owner]))
        return dropped

    def batch_can_commit(self, batch_id: str) -> bool:
        """True when a batch committed, or may still: its job is not over and the batch not finished."""
        if self.r.hexists(self._k(C.KEY_COMMIT_BY_OBJECT), self.layout.segment(batch_id)):
            return True
        job_id, _, number = batch_id.rpartition("-")
        state = self.r.hget(self.layout.job_key(job_id), "state")
        if state is None or state in C.JOB_ENDED:
            return False
        return not self.r.hexists(self.layout.job_key(job_id) + ":batches", str(int(number)))

    def settle_claims(self, batch_id: str, failed: bool = False) -> int:
        """The batch committed (its claims stay, no longer pending) or failed for good (they go)."""
        keys = [self._k(C.KEY_HASHES), self._k(C.KEY_PENDING_CLAIMS)]
        return int(self._settle(keys=keys, args=[batch_id, int(failed)]))

    def release_hash(self, sha256: str, image_id: int) -> None:
        self._release(keys=[self._k(C.KEY_HASHES)], args=[sha256, image_id])

    # --- commit log
    def publish(
        self,
        store_key: str,
        images: int = 0,
        removes: int | None = None,
        checksum: str | None = None,
        writer: str | None = None,
    ) -> int:
        """Commit a store object once; ``images`` (added or removed) goes into the image count.

        ``removes``: the id a tombstone removes; its key (if any) is forgotten in the same commit.
        ``checksum``: the object's sha256, recorded by the commit itself (see ``commit``); ``writer``
        the token of this run's write claim on it (``commit``; write_claim.py).
        """
        return self.commit(store_key, images, removes=removes, checksum=checksum, writer=writer)[0]

    def commit(
        self,
        store_key: str,
        images: int = 0,
        keyed: list[tuple[str, int, str]] | None = None,
        removes: int | None = None,
        expect: int | None = None,
        checksum: str | None = None,
        writer: str | None = None,
        batch: tuple[str, int] | None = None,
    ) -> tuple[int, list[tuple[int, str]]]:
        """Publish a segment whose ``keyed`` rows ((key, id, sha256)) take their keys over, in one script.

        Returns (sequence, [(replaced id, key), ...]): the ids this commit tombstoned because their
        key now names a row of this segment. A second publish of the same object returns the first
        one's answer, so a redelivered batch finishes the replacement its first run began.
        ``expect``: commit only while the first keyed row's key still names that id (else
        (0, []) and nothing changed): a change made from what the key named a moment ago.
        ``checksum``: the object's sha256 (integrity.py), recorded in the same script, only when
        this call commits: one round trip fewer than recording it first (issue #15), no reader
        sees the commit before its checksum, and a rerun never replaces the checksum of what it
        found committed (its own bytes were not written: embedding.py).
        ``writer``: the token of this run's write claim on the object (``WriteClaim``); the commit
        lets the claim go, and raises WriteClaimLost (nothing committed) when another run holds it.
        ``batch``: (job id, batch number) of the embed batch this segment commits; raises
        BatchCounted (nothing committed) when its job counted it already without this commit.
        """
        keys = [
            self._k(C.KEY_SEQUENCE),
            self._k(C.KEY_COMMITS),
            self._k(C.KEY_COMMIT_BY_OBJECT),
            self._k(C.KEY_CHANGES),
            self._k(C.KEY_COUNT),
            self._k(C.KEY_KEYS),
            self._k(C.KEY_KEY_OF),
            self._k(C.KEY_REPLACED),
            self._k(C.KEY_HASHES),
            self._k(C.KEY_CHECKSUMS),
            self.write_claim_key(store_key),
            self.layout.job_key(batch[0]) + ":batches" if batch else self._k(C.KEY_COMMITS),
        ]
        args: list[Any] = [
            store_key,
            images,
            "" if removes is None else int(removes),
            "" if expect is None else int(expect),
            checksum or "",
            writer or "",
            int(batch[1]) if batch else "",
        ]
        for key, image_id, sha in keyed or []:
            args += [key, int(image_id), sha]
        sequence, replaced = self._publish(keys=keys, args=args)
        if int(sequence) == -2:
            raise BatchCounted(f"{store_key}: its job counted the batch already; nothing committed")
        if int(sequence) < 0:
            raise WriteClaimLost(f"{store_key}: another run holds its write claim now; nothing committed")
        return int(sequence), [(int(old), key) for old, key in json.loads(replaced)]

    # --- write claims (one live run writes a batch's objects: WriteClaim)
    def write_claim_key(self, store_key: str) -> str:
        return self._k(f"{C.KEY_WRITE_CLAIM}:{store_key}")

    def begin_write(self, store_key: str, token: str, lease_ms: int) -> int:
        """-1: ``store_key`` is committed; 0: ``token`` holds its write claim for ``lease_ms``; else the
        milliseconds left to another holder's claim. One round trip (_BEGIN_WRITE)."""
        keys = [self._k(C.KEY_COMMIT_BY_OBJECT), self.write_claim_key(store_key)]
        return int(self._begin_write(keys=keys, args=[store_key, token, int(lease_ms)]))

    def keep_write(self, store_key: str, token: str, lease_ms: int) -> bool:
        """Extend ``token``'s claim to ``lease_ms`` from now (0: let it go); False when it is not its own."""
        return bool(self._keep_write(keys=[self.write_claim_key(store_key)], args=[token, int(lease_ms)]))

    def replaced(self, store_keys: list[str]) -> dict[str, list[int]]:
        """The ids each committed segment tombstoned by taking their keys over (one round trip)."""
        if not store_keys:
            return {}
        raw = self.r.hmget(self._k(C.KEY_REPLACED), store_keys)
        return {k: [int(old) for old, _ in json.loads(v)] for k, v in zip(store_keys, raw) if v}

    # --- callers' keys
    def lookup(self, key: str) -> dict[str, Any] | None:
        """The live image of a caller's key: {"key", "id", "sequence", "sha256"}, or None."""
        raw = self.r.hget(self._k(C.KEY_KEYS), key)
        if raw is None:
            return None
        entry = json.loads(raw)
        return {"key": key, "id": int(entry["id"]), "sequence": int(entry["seq"]), "sha256": entry["sha256"]}

    def keys_of(self, ids: list[int]) -> list[str | None]:
        """The caller's key of each id (None: it has none, or is not live)."""
        if not ids:
            return []
        return list(self.r.hmget(self._k(C.KEY_KEY_OF), [int(i) for i in ids]))

    def set_keys(self, entries: dict[str, tuple[int, int, str]]) -> None:
        """Write key -> (id, sequence, sha256) wholesale (rebuild and restore derive them from the store)."""
        if not entries:
            return
        with self.r.pipeline() as pipe:
            for chunk in _chunks(list(entries.items()), 10_000):
                pipe.hset(
                    self._k(C.KEY_KEYS),
                    mapping={
                        key: json.dumps({"id": i, "seq": seq, "sha256": sha}, separators=(",", ":"))
                        for key, (i, seq, sha) in chunk
                    },
                )
                pipe.hset(self._k(C.KEY_KEY_OF), mapping={str(i): key for key, (i, _, _) in chunk})
            pipe.execute()

    def image_count(self) -> int:
        return int(self.r.get(self._k(C.KEY_COUNT)) or 0)

    def commits_after(self, sequence: int) -> list[tuple[int, str]]:
        rows = self.r.zrangebyscore(self._k(C.KEY_COMMITS), f"({sequence}", "+inf", withscores=True)
        return [(int(score), key) for key, score in rows]

    def changes(self) -> int:
        return int(self.r.get(self._k(C.KEY_CHANGES)) or 0)

    def change_state(self) -> tuple[int, str]:
        """(changes, epoch) in one round trip: a reader is stale when either moved."""
        changes, epoch = self.r.mget(self._k(C.KEY_CHANGES), self._k(C.KEY_EPOCH))
        return int(changes or 0), epoch or ""

    def snapshot_watermark(self) -> int:
        """The watermark of the newest published snapshot (0: none yet)."""
        return int(self.r.get(self._k(C.KEY_SNAPSHOT)) or 0)

    def set_snapshot_watermark(self, watermark: int) -> None:
        self.r.set(self._k(C.KEY_SNAPSHOT), watermark)

    def trim_commits(self, up_to: int) -> int:
        """Take commits at or below ``up_to`` out of the log (their objects are inside a snapshot).

        Their ``commit-of`` entries stay: that hash is the "published once" record. A batch
        delivered again after its commit was trimmed must find its old sequence there, not get a
        new one (its images would be counted, and replayed, twice). One entry per commit.
        """
        return int(self.r.zremrangebyscore(self._k(C.KEY_COMMITS), "-inf", up_to))

    def last_sequence(self) -> int:
        return int(self.r.get(self._k(C.KEY_SEQUENCE)) or 0)

    # --- jobs
    def create_job(self, job_id: str, fields: dict[str, Any]) -> None:
        key = self.layout.job_key(job_id)
        base = {
            "state": "expanding",
            "total": 0,
            "batches_total": 0,
            "batches_done": 0,
            "indexed": 0,
            "duplicate": 0,
            "failed": 0,
            "created_at": time.time(),
        }
        base.update(fields)
        recent = f"{C.REDIS_PREFIX}:{C.KEY_RECENT_JOBS}"
        with self.r.pipeline() as pipe:
            pipe.hset(key, mapping={k: _text(v) for k, v in base.items()})
            pipe.zadd(recent, {job_id: float(base["created_at"])}, nx=True)
            pipe.zremrangebyrank(recent, 0, -C.RECENT_JOBS_KEPT - 1)
            pipe.execute()

    def update_job(self, job_id: str, **fields: Any) -> None:
        fields.setdefault("updated_at", time.time())  # the last sign of progress (jobs.py's sweep)
        self.r.hset(self.layout.job_key(job_id), mapping={k: _text(v) for k, v in fields.items()})

    def update_job_if(self, job_id: str, expected: str, **fields: Any) -> bool:
        """Update a job only while its state is still ``expected``; False when it moved on (or is gone).

        Two parties that may both end a job (an uploader finishing, housekeeping giving up on it)
        race here, and exactly one wins.
        """
        pairs = [item for k, v in fields.items() for item in (k, _text(v))]
        return bool(self._update_if(keys=[self.layout.job_key(job_id)], args=[expected, *pairs]))

    def expire_job(self, job_id: str, ttl: int) -> None:
        """Start the clock of an ended job's Redis record (``ended_at``; gone ``ttl`` s later, 0: never).

        Call it wherever a job reaches a terminal state: without it the job hash and its
        ``:batches`` stayed in Redis for good. The per-item report stays in the store.
        """
        self.expire_jobs([job_id], ttl)

    def expire_jobs(self, job_ids: list[str], ttl: int) -> None:
        """``expire_job`` for many jobs in one round trip (housekeeping's sweep)."""
        now, ttl = time.time(), max(0, int(ttl))
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                key = self.layout.job_key(job_id)
                self._expire(keys=[key, key + ":batches"], args=[now, ttl], client=pipe)
            pipe.execute()

    def finish_batch(
        self, job_id: str, batch: int, summary: dict[str, Any], unless_committed: str | None = None
    ) -> bool:
        """Count a batch into its job once; False when it was already counted.

        ``unless_committed``: the batch's segment; False too (nothing counted) when it is committed,
        checked in the same script (a failure count racing a live delivery's commit: _FINISH_BATCH).
        """
        key = self.layout.job_key(job_id)
        counts = [summary["indexed"], summary["duplicate"], summary["failed"]]
        failed = int(bool(summary.get("error")))
        done = self._finish(
            keys=[key, key + ":batches", self._k(C.KEY_COMMIT_BY_OBJECT)],
            args=[
                batch,
                json.dumps(summary),
                *counts,
                failed,
                time.time(),
                int(summary.get("unchanged") or 0),
                unless_committed or "",
            ],
        )
        return int(done) == 1

    def finished_batch(self, job_id: str, batch: int) -> dict[str, Any] | None:
        raw = self.r.hget(self.layout.job_key(job_id) + ":batches", str(batch))
        return None if raw is None else json.loads(raw)


def read_job(client: redis.Redis, job_id: str) -> dict[str, Any] | None:
    raw = client.hgetall(f"{C.REDIS_PREFIX}:{C.KEY_JOB}:{job_id}")
    if not raw:
        return None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        out[key] = _parse(value)
    return out


def recent_jobs(client: redis.Redis, limit: int = 20, collection: str | None = None) -> list[dict[str, Any]]:
    """The newest jobs first (of one collection when named), as read_job gives them."""
    ids = client.zrevrange(f"{C.REDIS_PREFIX}:{C.KEY_RECENT_JOBS}", 0, C.RECENT_JOBS_KEPT - 1)
    jobs = []
    for job_id in ids:
        job = read_job(client, job_id)
        if job is not None and (collection is None or job.get("collection") == collection):
            jobs.append({"job_id": job_id, **job})
            if len(jobs) >= limit:
                break
    return jobs


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[at : at + size] for at in range(0, len(items), size)]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _parse(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value
