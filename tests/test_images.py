"""Decoding of catalog photos and shopper uploads (indexer/embedding/images.py), on real image files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.embedding.images import MAX_PIXELS, ImageError, load_pixels, open_image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
ORIENTATION = 0x0112


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def pixel(image: Image.Image, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in image.getpixel((x, y)))


def assert_colour(actual, expected, tolerance: int = 0) -> None:
    assert len(actual) == len(expected)
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True)), (actual, expected)


def upright_layout(width: int = 40, height: int = 80) -> Image.Image:
    """A portrait image that looks different under every rotation and mirror:
    top-left red, top-right green, bottom half blue."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 2, height // 2))
    image.paste(GREEN, (width // 2, 0, width, height // 2))
    return image


def assert_upright_layout(image: Image.Image, width: int = 40, height: int = 80) -> None:
    assert image.mode == "RGB"
    assert image.size == (width, height)
    assert_colour(pixel(image, width // 4, height // 4), RED, 40)
    assert_colour(pixel(image, 3 * width // 4, height // 4), GREEN, 40)
    assert_colour(pixel(image, width // 2, 3 * height // 4), BLUE, 40)


def noisy_jpeg(width: int = 64, height: int = 64) -> bytes:
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)), "JPEG", quality=90)


# --- orientation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "stored_as"),
    [
        # the file holds the upright picture turned by the inverse of what the tag tells viewers to do
        (3, Image.Transpose.ROTATE_180),
        (6, Image.Transpose.ROTATE_90),  # viewers turn it 90 degrees clockwise
        (8, Image.Transpose.ROTATE_270),  # viewers turn it 90 degrees counter-clockwise
    ],
    ids=["orientation-3", "orientation-6", "orientation-8"],
)
def test_exif_rotated_photo_comes_out_upright(tmp_path, orientation, stored_as):
    stored = upright_layout().transpose(stored_as)
    path = tmp_path / "phone.jpg"
    stored.save(path, "JPEG", quality=95, exif=exif_orientation(orientation))
    if orientation in (6, 8):
        assert Image.open(path).size == (80, 40)  # stored landscape, shown portrait

    assert_upright_layout(open_image(path))


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_photo_decoded_at_reduced_scale_comes_out_upright(orientation):
    stored_as = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    stored = upright_layout(400, 800).transpose(stored_as)  # 800x400 in the file
    data = encode(stored, "JPEG", quality=95, exif=exif_orientation(orientation))

    image = open_image(data, target_size=100)

    assert_upright_layout(image, 100, 200)  # decoded at 1/4 scale, then turned


def exif_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif.tobytes()


def test_photo_without_orientation_tag_is_left_as_stored(tmp_path):
    path = tmp_path / "plain.jpg"
    upright_layout().save(path, "JPEG", quality=95)

    assert_upright_layout(open_image(path))


# --- colour modes ----------------------------------------------------------------------------------


def test_grayscale_image_becomes_rgb_with_equal_channels():
    image = Image.new("L", (4, 3), 77)
    image.putpixel((0, 0), 200)

    result = open_image(encode(image, "PNG"))

    assert result.mode == "RGB"
    assert result.size == (4, 3)
    assert pixel(result, 0, 0) == (200, 200, 200)
    assert pixel(result, 3, 2) == (77, 77, 77)


def test_transparent_rgba_pixels_are_composited_on_white():
    image = Image.new("RGBA", (3, 1), (10, 20, 30, 255))
    image.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent black
    image.putpixel((2, 0), (0, 0, 0, 128))  # half transparent black

    result = open_image(encode(image, "PNG"))

    assert result.mode == "RGB"
    assert pixel(result, 0, 0) == (10, 20, 30)
    assert pixel(result, 1, 0) == WHITE
    assert_colour(pixel(result, 2, 0), (127, 127, 127), 1)


def test_transparent_grayscale_alpha_pixels_are_composited_on_white():
    image = Image.new("LA", (2, 1), (50, 255))
    image.putpixel((1, 0), (0, 0))

    result = open_image(encode(image, "PNG"))

    assert result.mode == "RGB"
    assert pixel(result, 0, 0) == (50, 50, 50)
    assert pixel(result, 1, 0) == WHITE


def test_palette_image_without_transparency_keeps_its_colours():
    image = Image.new("P", (3, 1))
    image.putpalette([*RED, *GREEN, *BLUE])
    image.putdata([0, 1, 2])
    data = encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"

    result = open_image(data)

    assert result.mode == "RGB"
    assert [pixel(result, x, 0) for x in range(3)] == [RED, GREEN, BLUE]


def test_palette_image_transparent_index_becomes_white():
    image = Image.new("P", (3, 1))
    image.putpalette([*RED, *GREEN, *BLUE])
    image.putdata([0, 1, 2])
    data = encode(image, "PNG", transparency=1)  # green is the transparent entry
    assert Image.open(io.BytesIO(data)).info.get("transparency") is not None

    result = open_image(data)

    assert [pixel(result, x, 0) for x in range(3)] == [RED, WHITE, BLUE]


@pytest.mark.parametrize(
    ("mode", "colour", "transparent"),
    [("L", 128, 0), ("RGB", (10, 20, 30), (0, 0, 0))],
)
def test_png_transparent_colour_key_becomes_white(mode, colour, transparent):
    # PNG can mark one grey level or one RGB colour as transparent (a tRNS chunk) without an alpha channel
    image = Image.new(mode, (2, 1), transparent)
    image.putpixel((1, 0), colour)

    result = open_image(encode(image, "PNG", transparency=transparent))

    assert pixel(result, 0, 0) == WHITE
    expected = (colour,) * 3 if mode == "L" else colour
    assert pixel(result, 1, 0) == expected


def test_cmyk_jpeg_is_converted_to_rgb():
    image = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # red in CMYK
    image.paste((255, 0, 255, 0), (8, 0, 16, 8))  # green
    data = encode(image, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"

    result = open_image(data)

    assert result.mode == "RGB"
    assert_colour(pixel(result, 3, 4), RED, 20)
    assert_colour(pixel(result, 12, 4), GREEN, 20)


def test_cmyk_jpeg_with_target_size_is_converted_to_rgb():
    data = encode(Image.new("CMYK", (800, 400), (0, 255, 255, 0)), "JPEG", quality=95)

    result = open_image(data, target_size=100)

    assert result.mode == "RGB"
    assert min(result.size) >= 100
    assert_colour(pixel(result, 10, 10), RED, 20)


def sixteen_bit_png(values: list[int]) -> bytes:
    image = Image.fromarray(np.array([values], dtype=np.uint16))
    data = encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    return data


def test_sixteen_bit_grayscale_maps_full_range_to_eight_bits():
    result = open_image(sixteen_bit_png([0, 32768, 65535]))

    assert result.mode == "RGB"
    black, mid, white = (pixel(result, x, 0) for x in range(3))
    assert black == (0, 0, 0)
    assert_colour(mid, (128, 128, 128), 1)  # not clipped to white
    assert white == WHITE


def test_dark_sixteen_bit_image_stays_dark():
    # 16-bit values below 256 are nearly black, not 8-bit values that happen to be stored in 16 bits
    result = open_image(sixteen_bit_png([0, 200, 255]))

    assert all(max(pixel(result, x, 0)) <= 1 for x in range(3))


def test_one_by_one_image_decodes_and_resizes():
    data = encode(Image.new("RGB", (1, 1), GREEN), "JPEG", quality=95)

    image = open_image(data, target_size=224)
    pixels = load_pixels(data, 32)

    assert image.size == (1, 1)
    assert_colour(pixel(image, 0, 0), GREEN, 10)
    assert pixels.shape == (32, 32, 3)
    assert pixels.dtype == np.uint8


@pytest.mark.parametrize("suffix", [".webp", ".png"])
def test_animated_image_gives_its_first_frame(tmp_path, suffix):
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, GREEN, BLUE)]
    path = tmp_path / f"spin{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    assert Image.open(path).n_frames == 3

    result = open_image(path)

    assert result.mode == "RGB"
    assert result.size == (8, 8)
    assert pixel(result, 4, 4) == RED


def test_lossless_webp_decodes_exactly():
    image = upright_layout(20, 10)

    result = open_image(encode(image, "WEBP", lossless=True))

    assert result.mode == "RGB"
    assert np.array_equal(np.asarray(result), np.asarray(image))


def test_webp_with_alpha_is_composited_on_white():
    image = Image.new("RGBA", (4, 2), (*BLUE, 255))
    image.paste((0, 0, 0, 0), (2, 0, 4, 2))

    result = open_image(encode(image, "WEBP", lossless=True))

    assert pixel(result, 0, 0) == BLUE
    assert pixel(result, 3, 1) == WHITE


# --- broken input ----------------------------------------------------------------------------------


def test_truncated_jpeg_raises_image_error():
    data = noisy_jpeg()

    with pytest.raises(ImageError, match="truncated"):
        open_image(data[: len(data) // 2])


def test_truncated_jpeg_file_raises_image_error(tmp_path):
    data = noisy_jpeg()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(ImageError):
        open_image(path)


def test_truncated_png_raises_image_error():
    rng = np.random.default_rng(1)
    data = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")

    with pytest.raises(ImageError):
        open_image(data[: len(data) // 2])


def test_text_bytes_are_not_an_image():
    with pytest.raises(ImageError, match="not a recognised image format"):
        open_image(b"sku,image\nA1,shoes/red.jpg\n")


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a JPEG, whatever its name says\n")

    with pytest.raises(ImageError, match="not a recognised image format"):
        open_image(path)


def test_empty_bytes_raise_image_error():
    with pytest.raises(ImageError, match="empty"):
        open_image(b"")


def test_missing_file_raises_image_error(tmp_path):
    with pytest.raises(ImageError):
        open_image(tmp_path / "nowhere.jpg")


def png_claiming_size(width: int, height: int) -> bytes:
    """A real Pillow PNG whose header is rewritten to claim width x height pixels.

    Decoders read the size from the IHDR header before any pixel data, which is what a
    decompression bomb exploits; writing a genuine 30000x30000 PNG would take seconds.
    """
    data = bytearray(encode(Image.new("1", (8, 8)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_decompression_bomb_is_refused_before_decoding():
    data = png_claiming_size(30000, 30000)
    assert len(data) < 1_000
    assert struct.unpack(">II", data[16:24]) == (30000, 30000)

    with pytest.raises(ImageError, match="pixels"):
        open_image(data)


def test_image_over_the_pixel_limit_is_refused(tmp_path):
    # 48 million pixels: above MAX_PIXELS but below Pillow's own bomb threshold
    path = tmp_path / "huge.png"
    Image.new("1", (8000, 6000)).save(path)
    assert path.stat().st_size < 50_000
    assert MAX_PIXELS < 8000 * 6000

    with pytest.raises(ImageError, match="pixels"):
        open_image(path)


# --- inputs and outputs ----------------------------------------------------------------------------


def test_bytes_str_path_and_path_object_give_the_same_image(tmp_path):
    data = encode(upright_layout(), "JPEG", quality=90)
    path = tmp_path / "same.jpg"
    path.write_bytes(data)

    from_bytes = np.asarray(open_image(data))
    from_bytearray = np.asarray(open_image(bytearray(data)))
    from_path = np.asarray(open_image(path))
    from_str = np.asarray(open_image(str(path)))

    assert np.array_equal(from_bytes, from_path)
    assert np.array_equal(from_bytes, from_str)
    assert np.array_equal(from_bytes, from_bytearray)
    assert np.array_equal(load_pixels(data, 24), load_pixels(path, 24))


@pytest.mark.parametrize("size", [1, 24, 224])
def test_load_pixels_returns_square_uint8_rgb_array(size):
    data = encode(Image.new("RGB", (300, 100), (12, 34, 56)), "PNG")

    pixels = load_pixels(data, size)

    assert pixels.shape == (size, size, 3)
    assert pixels.dtype == np.uint8
    assert np.all(pixels == np.array([12, 34, 56], dtype=np.uint8))


def test_load_pixels_of_grayscale_image_has_three_channels():
    pixels = load_pixels(encode(Image.new("L", (10, 10), 99), "PNG"), 8)

    assert pixels.shape == (8, 8, 3)
    assert np.all(pixels == 99)


@pytest.mark.parametrize("target_size", [100, 224, 299, 500])
def test_big_jpeg_with_target_size_is_decoded_smaller_but_never_below_target(target_size):
    data = encode(Image.new("RGB", (2400, 1600), (200, 100, 50)), "JPEG", quality=90)

    image = open_image(data, target_size=target_size)

    assert min(image.size) >= target_size
    assert image.size[0] < 2400  # the reduced-scale decode was used
    assert image.size[0] * 2 == image.size[1] * 3  # aspect ratio kept
    assert_colour(pixel(image, 5, 5), (200, 100, 50), 10)


def test_jpeg_smaller_than_twice_the_target_is_decoded_full_size():
    data = encode(Image.new("RGB", (400, 300)), "JPEG")

    assert open_image(data, target_size=224).size == (400, 300)


def test_target_size_does_not_shrink_png():
    data = encode(Image.new("RGB", (1000, 800)), "PNG")

    assert open_image(data, target_size=100).size == (1000, 800)


def test_grayscale_jpeg_with_target_size_comes_out_rgb():
    data = encode(Image.new("L", (1600, 1200), 90), "JPEG")

    image = open_image(data, target_size=224)

    assert image.mode == "RGB"
    assert min(image.size) >= 224
    assert_colour(pixel(image, 0, 0), (90, 90, 90), 3)


def test_load_pixels_reads_webp_file(tmp_path: Path):
    path = tmp_path / "red.webp"
    Image.new("RGB", (64, 48), RED).save(path, "WEBP", lossless=True)

    pixels = load_pixels(path, 16)

    assert pixels.shape == (16, 16, 3)
    assert np.all(pixels == np.array(RED, dtype=np.uint8))
