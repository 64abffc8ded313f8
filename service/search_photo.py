"""The photo a search is about, from an upload, an image_url or a recent query's token, and the region of it
(box) to search for: one reader for the API, the preview grid and the search page."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flask import Request
from PIL import Image
from werkzeug.datastructures import MultiDict
from werkzeug.exceptions import NotFound
from werkzeug.utils import cached_property

from indexer.config import Settings
from indexer.embedding.images import Box, BoxError, ImageError, thumbnail
from indexer.embedding.model import Embedder
from service.errors import BadRequest
from service.fetch import EVERYWHERE, fetch_image
from service.recent_queries import Query, RecentQueries

# Media types of a request whose whole body is the photo (its other fields then come in the query string).
RAW_IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp")
SOURCES = (
    "a multipart/form-data file field named 'image', the photo's bytes as the whole body (Content-Type "
    f"{', '.join(RAW_IMAGE_TYPES)}), an image_url, or query=<token from an earlier search>"
)


class ServiceRequest(Request):
    """The service's requests (Flask.request_class): a raw image body's fields are read from the query string
    alone. Such a body holds no form, and parsing it as one to find that out cost a noticeable share of a
    search's CPU time."""

    @cached_property
    def values(self) -> MultiDict:
        if self.mimetype in RAW_IMAGE_TYPES:
            return self.args
        return super().values


@dataclass(frozen=True)
class SearchQuery:
    """A remembered query photo and the vector searched for: the whole photo's, or its box's."""

    query: Query
    box: Box | None
    vector: np.ndarray

    @property
    def token(self) -> str:
        return self.query.token

    def thumbnail(self) -> Image.Image:
        """What was searched for: the box's region of the photo, or the whole photo."""
        return thumbnail(self.query.photo, box=self.box)


def read_box(request: Request) -> Box | None:
    """box=x0,y0,x1,y1 (fractions of the upright photo's width and height), or None when absent or empty."""
    raw = request.values.get("box", "").strip()
    if not raw:
        return None
    parts = raw.split(",")
    try:
        if len(parts) != 4:
            raise ValueError
        values = [float(part) for part in parts]
    except ValueError:
        raise BadRequest(
            f"box must be four numbers x0,y0,x1,y1, fractions of the photo's width and height "
            f"(e.g. 0,0,0.5,1 for the left half), not {raw[:60]!r}"
        ) from None
    try:
        return Box(*values)
    except BoxError as exc:
        raise BadRequest(str(exc)) from None


def fetch_photo(url: str, settings: Settings) -> bytes:
    """image_url's bytes within the service's limits; 400 when refused, 502 when the fetch fails."""
    fetched = fetch_image(
        url,
        max_bytes=settings.max_upload_bytes,
        timeout_s=settings.fetch_timeout_s,
        allowed_networks=EVERYWHERE if settings.fetch_allow_private else (),
        ports=settings.fetch_ports,
    )
    return fetched.data


def names_a_photo(request: Request) -> bool:
    """Whether the request names a photo in any way (an upload, a raw image body, image_url or a query token); a
    search by words alone names none."""
    if request.mimetype in RAW_IMAGE_TYPES or request.values.get("image_url", "").strip():
        return True
    if request.values.get("query", "").strip():
        return True
    upload = request.files.get("image")
    if upload is None:
        return False
    if upload.filename:
        return True
    # A part without a filename: a photo if it holds bytes (a browser's empty file input holds none).
    held = bool(upload.stream.read(1))
    upload.stream.seek(0)
    return held


def read_search_query(request: Request, settings: Settings, embedder: Embedder, recent: RecentQueries) -> SearchQuery:
    """The one photo the request names (an 'image' upload, a raw image body, image_url, or query token) and its
    optional box, embedded; 400 for a missing, doubled or unusable photo or a bad box, 404 for a forgotten token."""
    box = read_box(request)  # checked before any download or embedding
    data = None
    if request.mimetype in RAW_IMAGE_TYPES:
        data = request.get_data(cache=False)  # the whole body is the photo, counted as "image"
        if request.content_length is None:
            # Sent in chunks: reading it all stops at max_upload_bytes without a word (werkzeug), and a photo cut
            # short would be refused as corrupt. One more byte asked for answers 413 when the limit was reached.
            request.stream.read(1)
    elif (upload := request.files.get("image")) is not None:
        data = upload.read()
        if not data and not upload.filename:
            data = None  # what a browser sends for a form's empty file input: no upload at all
    url = request.values.get("image_url", "").strip()
    token = request.values.get("query", "").strip()
    given = [name for name, value in (("image", data is not None), ("image_url", url), ("query", token)) if value]
    if not given:
        raise BadRequest(f"send the photo as {SOURCES}")
    if len(given) > 1:
        raise BadRequest(f"send only one of image, image_url and query, not {' and '.join(given)}")
    if data is not None and not data:
        raise BadRequest("the uploaded image is empty (0 bytes)")
    if url:
        data = fetch_photo(url, settings)
    if data is None:
        query = recent.get(token)
        if query is None:
            raise NotFound("that query is no longer remembered; upload the photo again")
    else:
        # The photo as kept (decoded and re-encoded) is what is searched, here and by its token anywhere.
        query = recent.add(data)
    if box is None:
        query = recent.embedded(query, embedder)  # the whole photo, embedded once and remembered
        return SearchQuery(query=query, box=None, vector=query.vector)
    # A region search embeds only the region.
    return SearchQuery(query=query, box=box, vector=embed_region(query.photo, box, embedder))


def embed_region(photo: bytes, box: Box, embedder: Embedder) -> np.ndarray:
    """The vector of the box's region of a query photo, through the same decoding and resizing as a whole one."""
    try:
        return embedder.embed_image(photo, box=box)
    except BoxError as exc:
        raise BadRequest(str(exc)) from None
    except ImageError as exc:
        raise BadRequest(f"the upload is not a usable image: {exc}") from None
