"""The core's exceptions: each carries the HTTP status a service answers it with, so callers map them in one place."""

from __future__ import annotations


class CatalogError(Exception):
    """Something the caller can act on; `status` is what an HTTP service answers, `error` its short name."""

    status = 500
    error = "internal_error"


class NotReady(CatalogError, RuntimeError):
    """There is no usable index yet, or a dependency is away for now; the message says what to do. Try again."""

    status = 503
    error = "not_ready"


class UnknownProduct(CatalogError, LookupError):
    """No live product has this sku."""

    status = 404
    error = "not_found"


class AttributesUnavailable(CatalogError, ValueError):
    """The index cannot filter by attribute (a base written before attribute postings, or a Milvus collection);
    the message says what to do."""

    status = 400
    error = "bad_request"


class BackupError(CatalogError):
    """A snapshot that cannot be taken, verified or restored (indexer.backup); the message says why and what to do."""
