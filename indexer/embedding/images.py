"""Turn image files or uploaded bytes into the model's input: decoding and resizing.

This is the only place where pixels are read, for catalog files and shopper
uploads alike, so the index and the queries always see images the same way.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow refuses images above this many pixels (a few-KB PNG can claim 30000x30000).
MAX_PIXELS = 40_000_000
# Transparent pixels become white: catalog photos are shown on white.
BACKGROUND = (255, 255, 255)
# A region searched on its own must cover at least this share of the photo, and this many pixels a side.
MIN_BOX_AREA = 0.01
MIN_BOX_PIXELS = 16
# The "crop" catalog view (index.catalog_views): the middle 80 % of each side, a closer scale of the product.
CENTRE_FRACTION = 0.8


class ImageError(ValueError):
    """The bytes are not an image we can use; the message says why."""


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
    target_size) which is several times faster for large photos.
    """
    if isinstance(source, bytes | bytearray):
        if not source:
            raise ImageError("the image is empty (0 bytes)")
        stream = io.BytesIO(source)
    else:
        stream = Path(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream)
            _check_size(image)
            if target_size and image.format == "JPEG":
                image.draft("RGB", (target_size, target_size))
            image.load()
            # In place: otherwise an upright photo (most of them) is copied for nothing.
            ImageOps.exif_transpose(image, in_place=True)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not a recognised image format (expected JPEG, PNG or WebP)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"the image has too many pixels (limit {MAX_PIXELS:,})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"the image could not be decoded ({exc}); it may be truncated or corrupt") from None
    return _to_rgb(image)


def _check_size(image: Image.Image) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError("the image has no pixels")
    if width * height > MAX_PIXELS:
        raise ImageError(f"the image is {width}x{height}, over the limit of {MAX_PIXELS:,} pixels")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit and float images: map the full range to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float32)
        peak = float(array.max(initial=0))
        if image.mode == "F":
            top = max(peak, 1.0)
        elif image.mode.startswith("I;16") or peak > 255:  # I;16* is 16-bit even when dark
            top = 65535.0
        else:  # plain I may hold 8-bit values
            top = 255.0
        image = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:
        # a transparent palette entry, grey level or colour (PNG tRNS, GIF)
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


def open_region(source: bytes | str | Path, target_size: int, box: Box | None = None) -> Image.Image:
    """open_image, then the box's region of the upright photo (decoded at a scale that keeps it target_size)."""
    if box is None:
        return open_image(source, target_size=target_size)
    return box.crop(open_image(source, target_size=box.decode_size(target_size)))


def load_pixels(source: bytes | str | Path, size: int, box: Box | None = None) -> np.ndarray:
    """Decode (and crop to a box) and resize in one step: what both the indexer and the service call."""
    return to_model_input(open_region(source, size, box), size)


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
    image = open_region(source, size, box)
    image.thumbnail((size, size))
    return image


def reencoded(source: bytes | str | Path, max_side: int, quality: int = 90) -> bytes:
    """The photo as decoded here (upright, RGB, at most max_side pixels a side), written again as a JPEG: what is
    kept of a photo, never the bytes as sent (trailing data, metadata and other formats' quirks are not kept)."""
    # JPEGs decode at a reduced scale that keeps the long side at least max_side: a square target would keep the
    # short side there, and a 12-megapixel photo would be decoded whole.
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes | bytearray) else source) as header:
            width, height = header.size
        target = max(1, math.ceil(max_side * min(width, height) / max(width, height, 1)))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # open_image says what is wrong
        target = max_side
    image = open_image(source, target_size=target)
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()
