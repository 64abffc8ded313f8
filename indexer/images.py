"""Turn image files or uploaded bytes into the model's input: decoding and resizing.

This is the only place where pixels are read, for catalog files and shopper
uploads alike, so the index and the queries always see images the same way.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Pillow refuses images above this many pixels (a few-KB PNG can claim 30000x30000).
MAX_PIXELS = 40_000_000
# Transparent pixels become white: catalog photos are shown on white.
BACKGROUND = (255, 255, 255)


class ImageError(ValueError):
    """The bytes are not an image we can use; the message says why."""


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


def load_pixels(source: bytes | str | Path, size: int) -> np.ndarray:
    """Decode and resize in one step: what both the indexer and the service call."""
    return to_model_input(open_image(source, target_size=size), size)


def thumbnail(source: bytes | str | Path, size: int = 256) -> Image.Image:
    """A small upright RGB copy for showing to people (pages, preview grids)."""
    image = open_image(source, target_size=size)
    image.thumbnail((size, size))
    return image
