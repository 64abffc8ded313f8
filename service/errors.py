"""Errors as JSON for the API and as a short page for people, with the right status."""

from __future__ import annotations

from flask import Flask, Response, jsonify, make_response, render_template, request
from werkzeug.exceptions import HTTPException

from indexer.errors import AttributesUnavailable, NotReady, UnknownProduct


class BadRequest(ValueError):
    """The request is unusable; the message tells the caller what to send instead."""

    status = 400


def _respond(status: int, error: str, message: str) -> Response:
    # A Response either way, so that handlers can add headers to the HTML page as well as to the JSON.
    if request.path.startswith("/api/") or request.accept_mimetypes.best == "application/json":
        return make_response(jsonify({"error": error, "message": message}), status)
    return make_response(render_template("error.html", status=status, error=error, message=message), status)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(BadRequest)
    def bad_request(exc: BadRequest):
        return _respond(400, "bad_request", str(exc))

    @app.errorhandler(AttributesUnavailable)
    def attributes_unavailable(exc: AttributesUnavailable):
        return _respond(400, "bad_request", str(exc))

    @app.errorhandler(UnknownProduct)
    def unknown_product(exc: UnknownProduct):
        return _respond(404, "not_found", f"no product with sku {exc.args[0][:200]!r}")

    @app.errorhandler(NotReady)
    def not_ready(exc: NotReady):
        response = _respond(503, "not_ready", str(exc))
        response.headers["Retry-After"] = "10"
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        message = exc.description or exc.name
        if exc.code == 413:
            message = _too_large(app)
        response = _respond(exc.code or 500, exc.name.lower().replace(" ", "_"), message)
        # The exception's own headers belong to the answer: Allow on a 405 (RFC 9110), WWW-Authenticate on a 401.
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def internal_error(exc: Exception):
        # A database the core cannot read (never migrated, locked, gone) is a wait, not a crash: the core says so.
        if (waiting := app.extensions["catalog_search"].unavailable(exc)) is not None:
            app.logger.error("database unavailable on %s %s: %s", request.method, request.path, exc)
            return not_ready(waiting)
        app.logger.exception("unhandled error on %s %s", request.method, request.path)
        return _respond(500, "internal_error", "something went wrong on our side; the error has been logged")


def _too_large(app: Flask) -> str:
    """Which limit a 413 hit: the whole request's, or (a request under it) one form field's or the number of parts."""
    whole = app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is not None and request.content_length <= whole:
        return (
            f"a form field is larger than the limit of {app.config['MAX_FORM_MEMORY_SIZE']:,} bytes, or the form has "
            f"more than {app.config['MAX_FORM_PARTS']:,} parts; send the photo as a file field named 'image'"
        )
    return f"the upload is larger than the limit of {whole:,} bytes"
