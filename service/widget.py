"""The embeddable "similar products" widget for storefronts: GET /widget.js (service/static/widget.js)."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, send_file

WIDGET_JS = Path(__file__).with_name("static") / "widget.js"

widget = Blueprint("widget", __name__)


@widget.get("/widget.js")
def widget_script():
    # An hour of caching, then a revalidation by ETag: a new widget reaches shops within the hour.
    return send_file(WIDGET_JS, mimetype="application/javascript", max_age=3600)
