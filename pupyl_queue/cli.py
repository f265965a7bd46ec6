"""``pupyl-queue``: run the stack or a worker, and index, search or remove images."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import Any

from pupyl_queue import constants as C


def _client(args: argparse.Namespace) -> Any:
    from pupyl_queue.client import PupylQueue

    return PupylQueue(
        characteristic=args.characteristic,
        collection=args.collection,
        model=args.model,
        precision=args.precision,
        descriptor=args.descriptor,
        whitening=args.whitening,
    )


def cmd_up(args: argparse.Namespace) -> int:
    from pupyl_queue.settings import Settings
    from pupyl_queue.stack import run_stack

    settings = Settings.from_env()
    if "PUPYL_LOCAL_REFERENCES" not in os.environ:  # one host: every worker reads the same files
        settings = settings.replace(local_references=True)
    return run_stack(settings)


def cmd_api(args: argparse.Namespace) -> int:
    from api.app import main as serve

    serve()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from pupyl_queue.settings import Settings
    from pupyl_queue.stack import pinned_env, worker_command

    env = {**os.environ, **pinned_env(args.gpu)}
    queue = args.kind
    if args.shard is not None:
        if args.kind != C.QUEUE_SEARCH:
            raise ValueError("--shard is for search workers")
        queue = C.shard_queue(args.shard)
        env["PUPYL_SEARCH_SHARD"] = str(args.shard)
    concurrency = Settings.from_env().embed_concurrency
    command = worker_command(queue, loglevel=args.loglevel, embed_concurrency=concurrency)
    os.execve(command[0], command, env)
    return 0  # pragma: no cover - execv does not return


def attribute_value(text: str) -> Any:
    """A ``--attr name=value`` value: JSON when it reads as a number, true/false, a list of strings or a
    quoted string ("42" stays the text 42); anything else is the text itself."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, (bool, int, float, list, str)):
        return value
    return text


def attributes_of(pairs: list[str] | None) -> dict[str, Any]:
    """``--attr`` options as an attributes object, checked (a bad one is a clear error)."""
    from pupyl_queue.attributes import check_attributes

    attributes: dict[str, Any] = {}
    for pair in pairs or []:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--attr takes name=value, not {pair!r}")
        if name.strip() in attributes:
            raise ValueError(f"--attr {name.strip()!r} is given twice")
        attributes[name.strip()] = attribute_value(text)
    return check_attributes(attributes)


def filter_of(text: str | None) -> dict[str, Any] | None:
    """``--where``: a JSON filter, checked here so a bad one says why before anything is sent."""
    from pupyl_queue.attributes import parse_filter

    if text is None:
        return None
    try:
        where = json.loads(text)
    except ValueError:
        raise ValueError(
            f'--where takes a JSON filter such as \'{{"color": "red"}}\', not {text!r}'
        ) from None
    parse_filter(where)
    return where


def cmd_upsert(args: argparse.Namespace) -> int:
    """``index --key``: one image under the caller's key (an upsert)."""
    client = _client(args)
    attributes = attributes_of(args.attr)
    if not args.wait:
        print(client.upsert_async(args.uri, args.key, attributes or None).id)
        return 0
    result = client.upsert(args.uri, args.key, attributes or None)
    print(json.dumps(result))
    return 0 if result.get("status") in ("indexed", "unchanged") else 1


def cmd_index(args: argparse.Namespace) -> int:
    if args.key is not None:
        return cmd_upsert(args)
    if args.attr:
        raise ValueError("--attr needs --key (a list file gives keys and attributes per line)")
    client = _client(args)
    job = client.index(args.uri, check_unique=args.check_unique, near_duplicate=args.near_duplicate)
    if not args.wait:
        print(job.id)
        return 0
    from tqdm import tqdm

    from pupyl_queue.client import JobFailed

    def show(state: dict[str, Any]) -> None:
        bar.total = int(state.get("total") or 0) or None
        bar.n = sum(int(state.get(k) or 0) for k in ("indexed", "duplicate", "failed"))
        bar.refresh()

    # Job.wait ends a job whose tasks are gone (PUPYL_JOB_STALL_S): this never waits for ever.
    # A failed job is printed below (exit status 1).
    with tqdm(desc="indexing", unit="img") as bar, contextlib.suppress(JobFailed):
        job.wait(poll=0.3, on_progress=show)
    return _print_job(job, args.json)


def _print_job(job: Any, as_json: bool) -> int:
    state = job.progress()
    failures = job.failures() if state.get("state") != "queued" else []
    if as_json:
        print(json.dumps({"job": job.id, **state, "failures": failures}, indent=2))
    else:
        print(
            f"job {job.id}: {state.get('state')} - {state.get('indexed', 0)} indexed, "
            f"{state.get('duplicate', 0)} duplicate, {state.get('failed', 0)} failed "
            f"of {state.get('total', '?')}"
        )
        if state.get("error"):
            print(f"error: {state['error']}")
        if state.get("retries"):  # transient failures its tasks rode out (store or Redis unreachable)
            print(f"retries: {state['retries']} (last: {state.get('last_retry')})")
        for item in failures:
            print(f"  failed: {item['ref']}: {item['error']}")
    return {"failed": 1, "partial": 2}.get(str(state.get("state")), 0)


def cmd_job(args: argparse.Namespace) -> int:
    return _print_job(_client(args).job(args.job_id), args.json)


def cmd_search(args: argparse.Namespace) -> int:
    client = _client(args)
    query: Any = int(args.query) if args.query.isdigit() else args.query
    where = filter_of(args.where)
    if not (args.metadata or args.json or args.copy):  # ids, with each hit's key when it has one
        from pupyl_queue.client import wait_result

        answer = wait_result(
            client.search_async(query, top=args.top, filter=where), client.settings.search_timeout
        )
        for rank, hit in enumerate(answer["results"], 1):
            distance = f"  distance {hit['distance']:.4f}" if args.distances else ""
            key = f"  key {hit['key']}" if hit.get("key") is not None else ""
            print(f"{rank:>3}. id {hit['id']}{distance}{key}")
        return 0
    results = client.search(
        query,
        top=args.top,
        return_metadata=args.metadata or args.json or args.copy,
        return_distances=args.distances,
        mode="copy" if args.copy else "similar",
        filter=where,
    )
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for rank, row in enumerate(results, 1):
        if isinstance(row, dict):
            path = os.path.join(row.get("original_path", ""), row.get("original_file_name", ""))
            score = f"  copy score {row['copy_score']:.3f}" if row.get("copy_score") is not None else ""
            key = f"  key {row['key']}" if row.get("key") is not None else ""
            print(f"{rank:>3}. id {row['id']}  distance {row['distance']:.4f}{score}{key}  {path}")
        elif isinstance(row, tuple):
            print(f"{rank:>3}. id {row[0]}  distance {row[1]:.4f}")
        else:
            print(f"{rank:>3}. id {row}")
    if args.copy:
        top = results[0] if results else {}
        if (top.get("copy_score") or 0.0) >= 0.5:
            print(f"copy found: id {top['id']} is the original (copy score {top['copy_score']:.3f})")
        else:
            print("no verified copy: none of the candidates is the original of this image")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    if (args.id is None) == (args.key is None):
        raise ValueError("remove takes an image id or --key KEY")
    result = _client(args).remove(args.id, key=args.key)
    print(json.dumps(result))
    return 0 if result.get("removed") else 1


def cmd_lookup(args: argparse.Namespace) -> int:
    found = _client(args).lookup(args.key)
    if found is None:
        print(f"pupyl-queue: no image with key {args.key!r}", file=sys.stderr)
        return 1
    print(json.dumps(found))
    return 0


def cmd_set_attributes(args: argparse.Namespace) -> int:
    """Replace a key's attributes (all of them) without embedding its image again."""
    result = _client(args).set_attributes(args.key, attributes_of(args.attr))
    print(json.dumps(result))
    return 0 if result.get("updated") else 1


def cmd_compact(args: argparse.Namespace) -> int:
    print(json.dumps(_client(args).compact(), indent=2))
    return 0


def cmd_collections(args: argparse.Namespace) -> int:
    client = _client(args)
    rows = [client.describe(name) for name in client.collections()]
    if args.json:
        print(json.dumps(rows, indent=2))
    for row in [] if args.json else rows:
        print(
            f"{row['name']:<24} {row['images']:>10} images  {row['model']['dim']:>5}-d  {row['index_type']}"
        )
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    print(json.dumps(_client(args).describe(args.name), indent=2))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    if not args.yes:
        print(
            f"pupyl-queue: deleting {args.name!r} removes all its images and index; add --yes",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(_client(args).delete_collection(args.name)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    query: Any = int(args.query) if args.query.isdigit() else args.query
    for path in _client(args).export(query, args.out, args.top, args.keep_ids, args.keep_names):
        print(path)
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    print(json.dumps(_client(args).backup(args.dest, args.name)))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    print(json.dumps(_client(args).restore(args.src, args.as_name)))
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    """Redis lost its state (flushed, or replaced by an empty one): derive it again from the store."""
    from pupyl_queue.rebuild import rebuild

    client = _client(args)
    names = client.collections() if args.all else [args.name or client.collection]
    for name in names:
        print(json.dumps(rebuild(client.store, client.redis, name, force=args.force)))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pupyl-queue", description=__doc__)
    p.add_argument("--collection", default=C.DEFAULT_COLLECTION)
    p.add_argument("--characteristic", default=None, help="1-9 or a name (new collections only)")
    p.add_argument("--model", default=None, help="a .keras model file instead of a characteristic")
    p.add_argument("--precision", choices=("float32", "int8"), default=None, help="new collections only")
    p.add_argument(
        "--descriptor",
        choices=C.DESCRIPTORS,
        default=None,
        help="global descriptor of a new collection (default PUPYL_DESCRIPTOR, avg)",
    )
    p.add_argument(
        "--whitening",
        default=None,
        help="whitening of a new collection: none, pca (s = 0.5) or pca:<s>, learned at compaction "
        "(default PUPYL_WHITENING, none)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "up",
        help="run Redis (embedded unless PUPYL_REDIS_URL), one worker per queue and Flower (PUPYL_FLOWER)",
    )
    sub.add_parser("api", help="run the HTTP API (PUPYL_API_HOST, PUPYL_API_PORT, PUPYL_API_TOKENS)")
    w = sub.add_parser("worker", help="run one Celery worker")
    w.add_argument("kind", choices=C.QUEUES)
    w.add_argument("--loglevel", default="INFO")
    w.add_argument(
        "--gpu", type=int, default=None, help="pin this worker to one GPU (one embed worker per GPU)"
    )
    i = sub.add_parser("index", help="index a folder, file, glob, archive, list, http(s) URL or s3:// prefix")
    i.add_argument("uri")
    i.add_argument("--check-unique", action="store_true", help="refuse exact copies of indexed images")
    i.add_argument(
        "--near-duplicate",
        type=float,
        default=None,
        metavar="DISTANCE",
        help="also refuse images within this cosine distance of an indexed one (e.g. 0.05)",
    )
    i.add_argument("--wait", action="store_true", help="show progress and a summary")
    i.add_argument(
        "--key", default=None, help="your key for this one image: an upsert (it replaces the key's image)"
    )
    i.add_argument(
        "--attr",
        action="append",
        metavar="NAME=VALUE",
        help="an attribute of the --key image (repeatable); VALUE is JSON when it reads as a number, "
        'true/false, a list or a quoted string ("42"), else text',
    )
    s = sub.add_parser("search", help="search by an image file or an indexed id")
    s.add_argument("query")
    s.add_argument("--top", type=int, default=4)
    s.add_argument(
        "--where",
        default=None,
        metavar="JSON",
        help='rank only what a filter allows: \'{"price": {"lt": 100}}\'',
    )
    s.add_argument("--metadata", action="store_true")
    s.add_argument("--distances", action="store_true")
    s.add_argument(
        "--copy",
        action="store_true",
        help="find the original of an edited copy: verified copies first, with their copy score",
    )
    r = sub.add_parser("remove", help="remove an image by id, or by your key (--key)")
    r.add_argument("id", type=int, nargs="?", default=None)
    r.add_argument("--key", default=None)
    lk = sub.add_parser("lookup", help="the image your key names now: id, sequence, sha256")
    lk.add_argument("key")
    sa = sub.add_parser("set-attributes", help="replace a key's attributes (no re-embedding)")
    sa.add_argument("key")
    sa.add_argument("--attr", action="append", metavar="NAME=VALUE", help="as for index (repeatable)")
    j = sub.add_parser("job", help="a job's state and failures")
    j.add_argument("job_id")
    sub.add_parser("compact", help="write a snapshot of the collection's index")
    sub.add_parser("collections", help="list collections with their sizes")
    d = sub.add_parser("describe", help="a collection's model, counts, index type and last snapshot")
    d.add_argument("name", nargs="?", default=None)
    x = sub.add_parser("delete", help="delete a collection: everything of it, and only it")
    x.add_argument("name")
    x.add_argument("--yes", action="store_true")
    e = sub.add_parser("export", help="write the ranked results' images to a folder")
    e.add_argument("query")
    e.add_argument("out")
    e.add_argument("--top", type=int, default=4)
    names = e.add_mutually_exclusive_group()
    names.add_argument("--keep-ids", action="store_true")
    names.add_argument("--keep-names", action="store_true")
    b = sub.add_parser("backup", help="back a collection up to an archive or an s3:// / file:// prefix")
    b.add_argument("name")
    b.add_argument("dest")
    r2 = sub.add_parser("restore", help="restore a backup into an empty collection")
    r2.add_argument("src")
    r2.add_argument("--as", dest="as_name", default=None)
    rb = sub.add_parser(
        "rebuild", help="after Redis lost its state: restore ids, commit log, dedup and jobs from the store"
    )
    rb.add_argument("name", nargs="?", default=None, help="a collection (default: --collection)")
    rb.add_argument("--all", action="store_true", help="every collection in the store")
    rb.add_argument("--force", action="store_true", help="drop what Redis still holds of it first")
    return p


COMMANDS = {
    "up": cmd_up,
    "api": cmd_api,
    "worker": cmd_worker,
    "index": cmd_index,
    "search": cmd_search,
    "remove": cmd_remove,
    "lookup": cmd_lookup,
    "set-attributes": cmd_set_attributes,
    "job": cmd_job,
    "compact": cmd_compact,
    "collections": cmd_collections,
    "describe": cmd_describe,
    "delete": cmd_delete,
    "export": cmd_export,
    "backup": cmd_backup,
    "restore": cmd_restore,
    "rebuild": cmd_rebuild,
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return COMMANDS[args.command](args)
    except (ValueError, LookupError, OSError, TimeoutError, RuntimeError) as exc:
        print(f"pupyl-queue: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
