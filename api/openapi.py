"""The OpenAPI 3.1 document of the HTTP API, served at /v1/openapi.json (a test keeps it = the routes)."""

from __future__ import annotations

from typing import Any

ERROR = {"$ref": "#/components/schemas/Error"}


def _responses(ok: str, *errors: int, body: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {ok: {"description": "OK", "content": {"application/json": {"schema": body or {}}}}}
    for code in errors:
        out[str(code)] = {"description": "error", "content": {"application/json": {"schema": ERROR}}}
    return out


BINARY = {"type": "string", "format": "binary"}
OPTIONS: dict[str, Any] = {
    "top": {"type": "integer", "minimum": 1, "maximum": 1000},
    "metadata": {"type": "boolean"},
    "distances": {"type": "boolean", "description": "false leaves distances out (default true)"},
    "wait": {"type": "boolean", "description": "false answers 202 with the task id at once"},
    "mode": {
        "type": "string",
        "enum": ["similar", "copy"],
        "description": "copy: find the original of an edited copy; the answer adds "
        "copy: {found, id, score, inliers}",
    },
    "collection": {"$ref": "#/components/schemas/CollectionName"},
}
INDEX_OPTIONS: dict[str, Any] = {
    "check_unique": {"type": "boolean"},
    "near_duplicate": {"type": "number", "minimum": 0, "maximum": 2},
    "collection": {"$ref": "#/components/schemas/CollectionName"},
}
ATTRIBUTES = {
    "type": "object",
    "maxProperties": 64,
    "additionalProperties": {
        "anyOf": [
            {"type": "string", "maxLength": 1024},
            {"type": "number"},
            {"type": "boolean"},
            {"type": "array", "items": {"type": "string"}, "maxItems": 64},
        ]
    },
    "description": "flat JSON object (at most 64 fields, 8 KiB): strings, numbers, booleans, lists of "
    "strings; names are letters, digits, '_', '.', '-' and not a built-in (format, width, height, job, "
    "indexed_at, path, id, key, distance, and, or, not)",
}
KEY = {
    "type": "string",
    "minLength": 1,
    "maxLength": 256,
    "description": "the caller's key (a SKU, a record id)",
}
FILTER = {
    "type": "object",
    "description": 'only images it allows: {"category": "shoes", "price": {"lt": 100}}; operators eq, in, '
    "any, gt, gte, lt, lte; and, or, not (docs/tasks.md, pupyl.search)",
}
FILTER_TEXT = {"type": "string", "description": "the filter as JSON text"}
FORM_OPTIONS: dict[str, Any] = {**OPTIONS, "filter": FILTER_TEXT}
NAME = {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{0,62}$", "maxLength": 63}
COLLECTION = {"name": "collection", "in": "query", "required": False, "schema": NAME}
# Path parameters carry their exact shape, so a fuzzer's negative cases include the long and odd ones
# (251-digit ids once gave 500s).
IMAGE_ID = {"type": "string", "pattern": "^[0-9]{1,19}$", "maxLength": 19, "description": "0 to 2**63 - 1"}
TASK_ID = {"type": "string", "format": "uuid"}
JOB_ID = {"type": "string", "pattern": "^[0-9A-Za-z_-]{1,64}$", "maxLength": 64}


KEY_PATH = {
    "type": "string",
    "minLength": 1,
    "maxLength": 768,
    "description": "the caller's key, percent-encoded (at most 256 bytes of UTF-8 decoded)",
}


def _id(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def document() -> dict[str, Any]:
    search_json = {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
            "vector": {
                "type": "array",
                "items": {"type": "number"},
                "minItems": 1,
                "maxItems": 8192,
                "description": "as many values as the collection's feature size; not all zero",
            },
            "image_b64": {"type": "string", "contentEncoding": "base64", "minLength": 1},
            "uri": {
                "type": "string",
                "minLength": 1,
                "maxLength": 4096,
                "description": "http(s) URL, or a path under PUPYL_ALLOWED_ROOTS",
            },
            **OPTIONS,
            "filter": FILTER,
        },
    }
    item = {
        "type": "object",
        "properties": {
            "uri": {"type": "string", "minLength": 1, "maxLength": 4096},
            "url": {"type": "string", "minLength": 1, "maxLength": 4096, "description": "uri's other name"},
            "key": KEY,
            "attributes": ATTRIBUTES,
        },
        "description": "one image: an http(s) URL or an absolute path under PUPYL_ALLOWED_ROOTS; a bad "
        "row fails alone, with its reason (items:<row>)",
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pupyl-queue",
            "version": "1",
            "description": "Reverse image search as a task queue.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "CollectionName": NAME,
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                        }
                    },
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/index": {
                "post": {
                    "summary": "Queue a bulk index job",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        {
                                            "type": "object",
                                            "required": ["uri"],
                                            "properties": {
                                                "uri": {"type": "string", "minLength": 1, "maxLength": 4096},
                                                **INDEX_OPTIONS,
                                            },
                                        },
                                        {
                                            "type": "object",
                                            "required": ["items"],
                                            "properties": {
                                                "items": {
                                                    "type": "array",
                                                    "items": item,
                                                    "minItems": 1,
                                                    "maxItems": 1000,
                                                    "description": "images with their keys and "
                                                    "attributes (1 MiB of JSON at most)",
                                                },
                                                **INDEX_OPTIONS,
                                            },
                                        },
                                    ]
                                }
                            },
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["files"],
                                    "properties": {
                                        "files": {
                                            "type": "array",
                                            "items": BINARY,
                                        },
                                        "key": {
                                            **KEY,
                                            "description": "a part named key after a file part is "
                                            "that file's key",
                                        },
                                        "attributes": {
                                            "type": "string",
                                            "description": "a part named attributes after a file part"
                                            " is that file's attributes, as JSON text",
                                        },
                                        **INDEX_OPTIONS,
                                    },
                                }
                            },
                        },
                    },
                    "responses": _responses("202", 400, 401, 403, 413),
                }
            },
            "/v1/jobs": {
                "get": {
                    "summary": "The newest jobs first",
                    "parameters": [
                        COLLECTION,
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                    ],
                    "responses": _responses("200", 400, 401),
                }
            },
            "/v1/jobs/{job_id}": {
                "get": {
                    "summary": "A job's state, counts and failures",
                    "parameters": [
                        _id("job_id", JOB_ID),
                        COLLECTION,
                        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                    ],
                    "responses": _responses("200", 400, 401, 404),
                }
            },
            "/v1/search": {
                "post": {
                    "summary": "Rank images by an uploaded image, a URL, an indexed id, or a vector",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": search_json},
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["image"],
                                    "properties": {"image": BINARY, **FORM_OPTIONS},
                                }
                            },
                        },
                    },
                    "parameters": [
                        {"name": "filter", "in": "query", "required": False, "schema": FILTER_TEXT}
                    ],
                    "responses": {
                        **_responses("200", 400, 401, 403, 404, 413, 422, 504),
                        "202": {"description": "queued (wait=false)"},
                    },
                }
            },
            "/v1/keys/{key}": {
                "get": {
                    "summary": "The image a caller's key names now: key, id, sequence, sha256",
                    "parameters": [_id("key", KEY_PATH), COLLECTION],
                    "responses": _responses("200", 400, 401, 404),
                },
                "delete": {
                    "summary": "Remove the image a caller's key names (the key goes with it)",
                    "parameters": [_id("key", KEY_PATH), COLLECTION],
                    "responses": _responses("200", 400, 401, 404, 409, 422),
                },
            },
            "/v1/keys/{key}/attributes": {
                "put": {
                    "summary": "Replace a key's attributes without embedding its image again",
                    "parameters": [_id("key", KEY_PATH), COLLECTION],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["attributes"],
                                    "properties": {
                                        "attributes": ATTRIBUTES,
                                        "collection": {"$ref": "#/components/schemas/CollectionName"},
                                    },
                                    "additionalProperties": False,
                                }
                            }
                        },
                    },
                    "responses": _responses("200", 400, 401, 404, 409, 422, 504),
                }
            },
            "/v1/tasks/{task_id}": {
                "get": {
                    "summary": "A Celery task's state and result",
                    "parameters": [_id("task_id", TASK_ID), COLLECTION],
                    "responses": _responses("200", 400, 401, 404),
                }
            },
            "/v1/images/{image_id}": {
                "get": {
                    "summary": "An image's metadata",
                    "parameters": [_id("image_id", IMAGE_ID), COLLECTION],
                    "responses": _responses("200", 400, 401, 404),
                },
                "delete": {
                    "summary": "Remove an image",
                    "parameters": [_id("image_id", IMAGE_ID), COLLECTION],
                    "responses": _responses("200", 400, 401, 404, 422),
                },
            },
            "/v1/images/{image_id}/file": {
                "get": {
                    "summary": "The stored (normalized) image",
                    "parameters": [_id("image_id", IMAGE_ID), COLLECTION],
                    "responses": {
                        **_responses("200", 400, 401, 404),
                        "200": {"description": "JPEG", "content": {"image/jpeg": {}}},
                    },
                }
            },
            "/v1/collections": {
                "get": {"summary": "Every collection, described", "responses": _responses("200", 401)}
            },
            "/v1/collections/{name}": {
                "get": {
                    "summary": "A collection's model, counts, index type and last snapshot",
                    "parameters": [_id("name", NAME)],
                    "responses": _responses("200", 400, 401, 404),
                },
                "delete": {
                    "summary": "Delete a collection: everything of it, and only it",
                    "parameters": [_id("name", NAME)],
                    "responses": _responses("200", 400, 401, 404),
                },
            },
            "/": {
                "get": {
                    "summary": "The search page",
                    "security": [],
                    "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}},
                }
            },
            "/v1/openapi.json": {
                "get": {"summary": "This document", "security": [], "responses": _responses("200")}
            },
            "/healthz": {
                "get": {"summary": "The process is up", "security": [], "responses": _responses("200")}
            },
            "/readyz": {
                "get": {
                    "summary": "Redis, the store and a search worker answer",
                    "security": [],
                    "responses": {**_responses("200"), "503": {"description": "not ready"}},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (an API token or one of PUPYL_METRICS_TOKENS)",
                    "responses": {**_responses("200", 401), "200": {"description": "text exposition format"}},
                }
            },
        },
    }
