"""A collection's manifest: the model it was created with, fixed for its life.

The first index request creates it; every later request must name the same
model (DESIGN.md principle 7). Redis decides the race between two first
requests (SET NX); the store keeps the manifest for good.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import redis

from pupyl_queue import constants as C
from pupyl_queue.catalog import CollectionMissing
from pupyl_queue.codecs import read_manifest
from pupyl_queue.layout import Layout
from pupyl_queue.models import ModelSpec, check_descriptor, load_keras_model, sha256_file
from pupyl_queue.store import ObjectStore
from pupyl_queue.whitening import check_whitening


def model_spec(store: ObjectStore, layout: Layout) -> ModelSpec:
    manifest = read_manifest(store, layout)
    if manifest is None:
        raise CollectionMissing(f"collection {layout.collection!r} is empty: index images first")
    return ModelSpec.from_json(manifest["model"])


def requested_spec(request: dict[str, Any]) -> tuple[ModelSpec, Path | None]:
    """What an index request asks for: a Keras model file on disk, or a characteristic.

    ``request`` holds ``model`` (a path), ``characteristic``, ``precision``,
    ``descriptor`` and ``whitening`` (named explicitly by the caller) and
    ``default_characteristic`` / ``default_precision`` / ``default_descriptor`` /
    ``default_whitening`` (the caller's settings, used only to create). A request from
    before descriptors (or whitening) existed names none: the default one.
    """
    precision = request.get("precision") or request.get("default_precision") or "float32"
    descriptor = check_descriptor(
        request.get("descriptor") or request.get("default_descriptor") or C.DEFAULT_DESCRIPTOR
    )
    whitening = check_whitening(
        request.get("whitening") or request.get("default_whitening") or C.DEFAULT_WHITENING
    )
    if request.get("model"):
        path = Path(request["model"]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} not found on this worker")
        spec = load_keras_model(path).spec.with_precision(precision)
        return spec.with_descriptor(descriptor).with_whitening(whitening), path
    chosen = request.get("characteristic") or request.get("default_characteristic") or 1
    spec = ModelSpec.for_characteristic(chosen, precision).with_descriptor(descriptor)
    return spec.with_whitening(whitening), None


def ensure_collection(
    store: ObjectStore, client: redis.Redis, layout: Layout, request: dict[str, Any]
) -> ModelSpec:
    """The collection's spec, creating the collection from ``request`` if it is new.

    Raises ModelMismatchError when the request names another model than the
    collection's; a request that names none adopts the collection's.
    """
    existing = read_manifest(store, layout)
    if existing is not None:
        spec = ModelSpec.from_json(existing["model"])
        precision = request.get("precision") or spec.precision
        if request.get("model"):
            wanted = sha256_file(request["model"])
            if wanted != spec.sha256:
                spec.check_same(
                    ModelSpec(
                        "keras",
                        0,
                        0,
                        sha256=wanted,
                        precision=precision,
                        descriptor=spec.descriptor,
                        whitening=spec.whitening,
                    )
                )
        elif request.get("characteristic"):
            asked = ModelSpec.for_characteristic(request["characteristic"], precision)
            spec.check_same(asked.with_descriptor(spec.descriptor).with_whitening(spec.whitening))
        spec.check_same(spec.with_precision(precision))
        if request.get("descriptor"):  # named by the caller: it must be the collection's
            spec.check_same(spec.with_descriptor(check_descriptor(request["descriptor"])))
        if request.get("whitening"):  # the same: a collection's whitening is fixed at creation
            spec.check_same(spec.with_whitening(check_whitening(request["whitening"])))
        return spec
    spec, path = requested_spec(request)
    claim = json.dumps(spec.to_json(), sort_keys=True)
    client.set(layout.key("model"), claim, nx=True)
    winner = ModelSpec.from_json(json.loads(client.get(layout.key("model"))))
    winner.check_same(spec)
    if path is not None:
        store.put(layout.model_file, path.read_bytes())
    manifest = {
        "schema": C.SCHEMA_VERSION,
        "collection": layout.collection,
        "model": spec.to_json(),
        "created_at": time.time(),
    }
    store.put(layout.manifest, json.dumps(manifest, indent=2).encode())
    return spec
