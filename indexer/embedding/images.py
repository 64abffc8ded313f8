"""Turn image files or uploaded bytes into the model's input: decoding and resizing.

This is the only place where pixels are read, for catalog files and shopper
uploads alike, so the index and the queries always see images the same way.
"""

from __future__ import annotations

import ctypes
import functools
import io
import math
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError, WebPImagePlugin

from indexer.config import Settings

T = TypeVar("T")

# The only formats decoded, by Pillow's name, with the file suffixes a catalog folder's photos have (MPO, the JPEG
# of many phones holding a second view, is read by the JPEG decoder). Every other file, however Pillow could read
# it, is refused before a decoder runs: each format's decoder is code that hostile uploads reach.
ACCEPTED_FORMATS: dict[str, tuple[str, ...]] = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",), "WEBP": (".webp",)}
FORMAT_NAMES = "JPEG, PNG or WebP"
# Pillow refuses images above this many pixels (a few-KB PNG can claim 30000x30000).
# A photo's bytes, a file's path, or a photo decoded here already (upright RGB).
Source = bytes | str | Path | Image.Image
MAX_PIXELS = 40_000_000
# Memory per pixel of the upright RGB photo (Pillow keeps RGB in 4 bytes), and of a WebP decoder's own buffers
# (its canvas, the frame it hands over and a copy of it), on top of the decoded pixels.
RGB_BYTES = 4
WEBP_BUFFERS = 12
# Other modes are converted to RGB a band of rows at a time, each band's conversion holding up to
# BAND_BYTES_PER_PIXEL bytes a pixel (float copies of 16-bit values, an RGBA copy and its white background), so
# that it holds about BAND_BYTES, not several copies of a large photo.
BAND_BYTES = 8 * 2**20
BAND_BYTES_PER_PIXEL = 24
# What a decoding holds beyond its pixels: a band, the model input, the decoder's tables.
DECODE_OVERHEAD = BAND_BYTES + 16 * 2**20
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# mallopt's parameter for the size from which glibc maps a buffer on its own, and the size chosen (_map_large_buffers).
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 2**20
# Transparent pixels become white: catalog photos are shown on white.
BACKGROUND = (255, 255, 255)
# A region searched on its own must cover at least this share of the photo, and this many pixels a side.
MIN_BOX_AREA = 0.01
MIN_BOX_PIXELS = 16
# The "crop" catalog view (index.catalog_views): the middle 80 % of each side, a closer scale of the product.
CENTRE_FRACTION = 0.8


class ImageError(ValueError):
    """The bytes are not an image we can use; the message says why."""


class DecodeBudget:
    """The bytes this process's decodings may hold at once (model.image_max_mb): a photo that alone would take
    more is refused, and decodings that together would take more wait for one another, so that request threads
    times large photos cannot multiply the memory a process uses."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, cost: int, size: tuple[int, int] | None = None) -> Iterator[None]:
        """Hold `cost` bytes (of a size[0] x size[1] image) until the block ends; ImageError when over the limit."""
        if cost > self.limit:
            shown = f"this {size[0]}x{size[1]} image" if size else "this image"
            raise ImageError(
                f"{shown} would take {math.ceil(cost / 2**20)} MB of memory to decode, over the limit of "
                f"{self.limit // 2**20} MB (model.image_max_mb); send a smaller photo, or a JPEG"
            )
        if cost <= 0:
            yield
            return
        with self._changed:
            self._changed.wait_for(lambda: self.held + cost <= self.limit)
            self.held += cost
        try:
            yield
        finally:
            with self._changed:
                self.held -= cost
                self._changed.notify_all()


# Every decoding in this process holds its bytes from here (the service's request threads, indexing's workers).
DECODING = DecodeBudget(Settings.image_max_mb * 2**20)


def limit_decoding(max_mb: int) -> None:
    """Set the bytes this process's decodings may hold at once (model.image_max_mb); decodings already holding
    theirs keep them. And have large buffers mapped on their own, so that what a decoding frees goes back to the
    system at once."""
    with DECODING._changed:
        DECODING.limit = max_mb * 2**20
        DECODING._changed.notify_all()
    _map_large_buffers()


@functools.cache
def _map_large_buffers() -> None:
    """glibc's malloc keeps freed memory for reuse by the thread arena it came from, and raises its threshold for
    mapping a buffer on its own after each large free: decodings on several request threads then leave a photo's
    worth of memory stranded in each thread's arena, and the process's memory passes the decoding budget. A fixed
    threshold maps every buffer of 1 MB or more on its own, returned to the system when freed."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: its own allocator's ways
        pass


class BoxError(ValueError):
    """The region asked for makes no sense for this photo; the message says why."""


@dataclass(frozen=True)
class Box:
    """A region of the upright photo as fractions of its width and height (x0, y0) to (x1, y1)."""

    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self) -> None:
        values = (self.x0, self.y0, self.x1, self.y1)
        if not all(math.isfinite(v) for v in values):
            raise BoxError("box must be four finite numbers x0,y0,x1,y1")
        if not (0 <= self.x0 < self.x1 <= 1 and 0 <= self.y0 < self.y1 <= 1):
            raise BoxError(
                f"box must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (fractions of the photo), not {self}"
            )
        if self.area < MIN_BOX_AREA:
            raise BoxError(f"box covers {self.area:.2%} of the photo; it must cover at least {MIN_BOX_AREA:.0%}")

    @property
    def area(self) -> float:
        return (self.x1 - self.x0) * (self.y1 - self.y0)

    def as_list(self) -> list[float]:
        return [self.x0, self.y0, self.x1, self.y1]

    def __str__(self) -> str:
        return ",".join(f"{v:g}" for v in self.as_list())

    def decode_size(self, target_size: int) -> int:
        """The reduced-scale decoding target that still leaves the region target_size pixels a side."""
        return math.ceil(target_size / min(self.x1 - self.x0, self.y1 - self.y0))

    def crop(self, image: Image.Image) -> Image.Image:
        """The region of an upright decoded image; BoxError when it is under MIN_BOX_PIXELS a side."""
        width, height = image.size
        left, top = round(self.x0 * width), round(self.y0 * height)
        right, bottom = round(self.x1 * width), round(self.y1 * height)
        if right - left < MIN_BOX_PIXELS or bottom - top < MIN_BOX_PIXELS:
            raise BoxError(
                f"box is {right - left}x{bottom - top} pixels of this {width}x{height} photo; "
                f"it must be at least {MIN_BOX_PIXELS} pixels a side"
            )
        return image.crop((left, top, right, bottom))


def open_image(source: bytes | str | Path, target_size: int | None = None) -> Image.Image:
    """Decode an image into an upright RGB Pillow image, or raise ImageError.

    Applies the EXIF orientation, takes the first frame of animations, scales
    16-bit images down to 8 bits and puts transparency on a white background.
    With target_size, JPEGs are decoded at a reduced scale (never below
    target_size) which is several times faster for large photos. The decoding
    holds its bytes of this process's decoding budget (limit_decoding).
    """
    return _decoded(source, target_size, lambda image: image)


def _decoded(source: Source, target_size: int | None, finish: Callable[[Image.Image], T]) -> T:
    """finish(the upright RGB photo), with the memory the decoding and `finish` take held from DECODING.

    A WebP decoder allocates its canvas as it opens the file: its size is read from the header and held first. A
    source that is an image already (decoded here, upright RGB) goes to `finish` as it is."""
    if isinstance(source, Image.Image):
        return finish(source)
    with _stream(source) as stream:
        with _decode_errors():
            canvas = _webp_canvas(stream)
        planned = 0 if canvas is None else _cost(canvas, "RGBA", webp=True)
        with DECODING.hold(planned, canvas):
            with _decode_errors():
                image = Image.open(stream, formats=list(ACCEPTED_FORMATS))
                _check_size(image.size)
                if target_size and isinstance(image, JpegImagePlugin.JpegImageFile):  # MPO (phones' JPEGs) too
                    image.draft("RGB", (target_size, target_size))
            cost = 0 if canvas is not None else _cost(image.size, image.mode, webp=False)
            with DECODING.hold(cost, image.size):
                with _decode_errors():
                    image.load()  # the first frame only: nothing here seeks to another
                    upright = _upright_rgb(image)
                return finish(upright)


def _stream(source: bytes | str | Path) -> BinaryIO:
    if isinstance(source, bytes | bytearray):
        if not source:
            raise ImageError("the image is empty (0 bytes)")
        return io.BytesIO(source)
    try:
        return open(source, "rb")  # closed by the caller's with
    except OSError as exc:
        raise ImageError(f"the image file cannot be read ({exc.strerror or exc})") from None


@contextmanager
def _decode_errors() -> Iterator[None]:
    """Whatever a decoder raises on a hostile or broken file becomes an ImageError that says what to send."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not a recognised image format; send a {FORMAT_NAMES} photo") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"the image has too many pixels (limit {MAX_PIXELS:,})") from None
    except MemoryError:
        raise ImageError("the image is too large to decode; send a smaller photo") from None
    except Exception as exc:  # any decoder's failure on a file it was given: never the service's own error
        raise ImageError(
            f"the image could not be decoded ({type(exc).__name__}: {str(exc)[:200]}); it may be truncated or "
            f"corrupt; send a {FORMAT_NAMES} photo"
        ) from None


def _webp_canvas(stream: BinaryIO) -> tuple[int, int] | None:
    """A WebP file's canvas size from its header (Pillow's own reading, before any allocation), else None."""
    head = stream.read(30)
    stream.seek(0)
    if not (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    size = WebPImagePlugin._get_size(head)
    if size is None:
        raise ImageError(f"the WebP header gives no size; it may be truncated or corrupt; send a {FORMAT_NAMES} photo")
    _check_size(size)
    return size


def _check_size(size: tuple[int, int]) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageError("the image has no pixels")
    if width * height > MAX_PIXELS:
        raise ImageError(f"the image is {width}x{height}, over the limit of {MAX_PIXELS:,} pixels")


def _bytes_per_pixel(mode: str) -> int:
    """What Pillow holds in memory per pixel of a mode (RGB takes 4 bytes, as RGBA does)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def _cost(size: tuple[int, int], mode: str, *, webp: bool) -> int:
    """The most bytes decoding an image of this size and mode holds at once, up to the upright RGB photo and a
    copy of it (a rotation, a region): the decoded pixels, the decoder's own buffers and the RGB photo."""
    decoding = _bytes_per_pixel(mode) + (WEBP_BUFFERS if webp else 0) + RGB_BYTES
    return size[0] * size[1] * max(decoding, 2 * RGB_BYTES) + DECODE_OVERHEAD


def _upright_rgb(image: Image.Image) -> Image.Image:
    """The loaded image as RGB (band by band, so the conversion holds no second full-size copy), then upright."""
    rgb = _to_rgb(image)
    if rgb is not image:
        image.close()  # frees the decoded pixels before a rotation copies the photo
    # In place: otherwise an upright photo (most of them) is copied for nothing.
    ImageOps.exif_transpose(rgb, in_place=True)
    return rgb


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    top = _full_scale(image)
    width, height = image.size
    rows = max(1, BAND_BYTES // (width * BAND_BYTES_PER_PIXEL))
    if rows >= height:
        return _band_to_rgb(image, top)
    rgb = Image.new("RGB", image.size)
    for y in range(0, height, rows):
        rgb.paste(_band_to_rgb(image.crop((0, y, width, min(height, y + rows))), top), (0, y))
    return rgb


def _full_scale(image: Image.Image) -> float | None:
    """The value that 16-bit, 32-bit and float images map to white (None for 8-bit modes): the whole image's."""
    if image.mode not in WIDE_MODES:
        return None
    peak = float(image.getextrema()[1])
    if image.mode == "F":
        return max(peak, 1.0)
    if image.mode.startswith("I;16") or peak > 255:  # I;16* is 16-bit even when dark
        return 65535.0
    return 255.0  # plain I may hold 8-bit values


def _band_to_rgb(image: Image.Image, top: float | None) -> Image.Image:
    if top is not None:
        # 16-bit and float images: map the full range to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float32)
        image = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        # a transparent palette entry, grey level or colour (PNG tRNS)
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def to_model_input(image: Image.Image, size: int) -> np.ndarray:
    """Resize an RGB image to size x size and return it as a uint8 HxWx3 array."""
    resized = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.uint8)


def _region(source: Source, target_size: int, box: Box | None, finish: Callable[[Image.Image], T]) -> T:
    """finish(the upright photo, or the box's region of it decoded at a scale that keeps it target_size), all of
    it within the decoding's hold on memory."""
    if box is None:
        return _decoded(source, target_size, finish)
    return _decoded(source, box.decode_size(target_size), lambda image: finish(box.crop(image)))


def open_region(source: bytes | str | Path, target_size: int, box: Box | None = None) -> Image.Image:
    """open_image, then the box's region of the upright photo (decoded at a scale that keeps it target_size)."""
    return _region(source, target_size, box, lambda image: image)


def load_pixels(source: Source, size: int, box: Box | None = None) -> np.ndarray:
    """Decode (and crop to a box) and resize in one step: what both the indexer and the service call."""
    return _region(source, size, box, lambda image: to_model_input(image, size))


def load_views(source: bytes | str | Path, size: int, views: tuple[str, ...] = ()) -> np.ndarray:
    """(1 + len(views), size, size, 3) uint8: the photo exactly as load_pixels gives it, then each extra catalog
    view in order (index.catalog_views): "flip", its mirror image; "crop", its centre, decoded again at the scale
    that region needs, as a region search of that box would be."""
    photo = load_pixels(source, size)
    pixels = [photo]
    for view in views:
        if view == "flip":
            pixels.append(photo[:, ::-1])
        elif view == "crop":
            margin = (1 - CENTRE_FRACTION) / 2
            try:
                pixels.append(load_pixels(source, size, Box(margin, margin, 1 - margin, 1 - margin)))
            except BoxError:  # a photo of a few pixels has no closer view: the photo stands in for it
                pixels.append(photo)
        else:
            raise ValueError(f"unknown catalog view {view!r}")
    return np.stack(pixels)


def thumbnail(source: bytes | str | Path, size: int = 256, box: Box | None = None) -> Image.Image:
    """A small upright RGB copy (of the box's region, with one) for showing to people (pages, preview grids)."""

    def shrink(image: Image.Image) -> Image.Image:
        image.thumbnail((size, size))
        return image

    return _region(source, size, box, shrink)


def reencoded(source: bytes | str | Path, max_side: int, quality: int = 90) -> tuple[bytes, Image.Image]:
    """The photo as decoded here (upright, RGB, at most max_side pixels a side), written again as a JPEG: what is
    kept of a photo, never the bytes as sent (trailing data, metadata and other formats' quirks are not kept); and
    that decoded photo, which a caller may embed at once instead of decoding the JPEG again."""
    # JPEGs decode at a reduced scale that keeps the long side at least max_side: a square target would keep the
    # short side there, and a 12-megapixel photo would be decoded whole.
    try:
        with Image.open(
            io.BytesIO(source) if isinstance(source, bytes | bytearray) else source, formats=list(ACCEPTED_FORMATS)
        ) as header:
            width, height = header.size
        target = max(1, math.ceil(max_side * min(width, height) / max(width, height, 1)))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # open_image says what is wrong
        target = max_side
    image = open_image(source, target_size=target)
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue(), image
