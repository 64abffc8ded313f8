"""Whether two photos are one picture: the near-duplicate job's check of the pairs the index proposes
(indexer.jobs.duplicates), on the photos themselves.

A network's vector says what a photo shows, not which picture it is: two shots of one shelf a step apart score as
high as a photo and its re-encoded copy (eval/README.md "Near-duplicates"). So each proposed pair is compared on
small greyscale thumbnails, which a copy keeps and another shot does not: each photo is decoded (JPEGs at a reduced
scale, through the indexer's one decoding path), its uniform margins trimmed (a white or black frame), and shrunk to
SIDE x SIDE pixels, whole and its centre CENTRE; each thumbnail is centred and scaled (brightness and contrast do not
count). Two photos match when the best correlation of whole-whole, centre-whole and whole-centre reaches MATCH:
re-encoded, resized, brightened, framed and slightly cropped copies score 0.95-1.0, other shots of the same thing
rarely over 0.9.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image
from tqdm import tqdm

from indexer.config import cpu_count
from indexer.embedding.images import ImageError, open_image

SIDE = 32
# The centre kept by the second thumbnail (a fraction of each side): a copy cropped by up to 5 % a side.
CENTRE = 0.9
# A margin row or column is uniform when its pixels differ by less than this (of 255): a frame added around a copy.
UNIFORM = 16
# Two photos whose best correlation reaches this are one picture: measured on 300 copies planted in the grocery
# catalog against its other photos (eval/README.md "Near-duplicates").
MATCH = 0.92
# Decoded at least this large before the margins are trimmed and the thumbnails made.
DECODE_SIDE = 128
# Photos decoded per batch, and pairs scored per batch.
READ_BATCH = 4096
BATCH = 100_000


def thumbnails(path: str) -> np.ndarray | None:
    """(2, SIDE * SIDE) uint8: the photo's whole and centre thumbnails, margins trimmed; None when it cannot be read
    (no such file, not an image)."""
    if not os.path.isabs(path) or not os.path.isfile(path):
        return None
    try:
        photo = open_image(path, target_size=DECODE_SIDE)
    except ImageError:
        return None
    photo = photo.convert("L")
    photo.thumbnail((2 * DECODE_SIDE, 2 * DECODE_SIDE))
    pixels = _trimmed(np.asarray(photo))
    height, width = pixels.shape
    dy, dx = round(height * (1 - CENTRE) / 2), round(width * (1 - CENTRE) / 2)
    parts = (pixels, pixels[dy : height - dy or None, dx : width - dx or None])
    return np.stack([np.asarray(Image.fromarray(p).resize((SIDE, SIDE), Image.BILINEAR)).ravel() for p in parts])


def _trimmed(pixels: np.ndarray) -> np.ndarray:
    """The pixels without the uniform rows and columns at their edges (all of them when the photo is uniform)."""

    def kept(lines: np.ndarray) -> tuple[int, int]:
        busy = np.flatnonzero(lines.max(axis=1).astype(int) - lines.min(axis=1) >= UNIFORM)
        return (int(busy[0]), int(busy[-1]) + 1) if len(busy) else (0, len(lines))

    top, bottom = kept(pixels)
    left, right = kept(pixels.T)
    return pixels[top:bottom, left:right]


def read_thumbnails(paths: list[str], threads: int = 0, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(row, thumbnails): each photo's row in `thumbnails` ((readable photos, 2, SIDE * SIDE) uint8), -1 where it
    could not be read. Decoded on `threads` threads (0: a thread per core; decoding releases the interpreter), a
    batch at a time, so that a million photos hold their thumbnails and no more."""
    row = np.full(len(paths), -1, dtype=np.int64)
    made: list[np.ndarray] = []
    with ThreadPoolExecutor(threads or cpu_count()) as pool, tqdm(
        total=len(paths), desc="Photo thumbnails", unit="photo", disable=not progress
    ) as bar:  # fmt: skip
        for start in range(0, len(paths), READ_BATCH):
            for at, thumbnail in enumerate(pool.map(thumbnails, paths[start : start + READ_BATCH]), start):
                if thumbnail is not None:
                    row[at] = len(made)
                    made.append(thumbnail)
            bar.update(min(READ_BATCH, len(paths) - start))
    return row, np.stack(made) if made else np.zeros((0, 2, SIDE * SIDE), dtype=np.uint8)


def _standardised(thumbnails: np.ndarray) -> np.ndarray:
    values = thumbnails.astype(np.float32)
    values -= values.mean(axis=-1, keepdims=True)
    norms = np.linalg.norm(values, axis=-1, keepdims=True)
    return values / np.maximum(norms, 1e-6)


def match_scores(thumbnails: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """For pairs of rows of `thumbnails` (read_thumbnails'), how alike the two pictures are: the best correlation of
    whole-whole, centre-whole and whole-centre, from -1 to 1 (a uniform photo correlates with nothing: 0)."""
    scores = np.zeros(len(first), dtype=np.float32)
    for start in range(0, len(first), BATCH):
        a = _standardised(thumbnails[first[start : start + BATCH]])
        b = _standardised(thumbnails[second[start : start + BATCH]])
        whole = np.einsum("nd,nd->n", a[:, 0], b[:, 0])
        centre_whole = np.einsum("nd,nd->n", a[:, 1], b[:, 0])
        whole_centre = np.einsum("nd,nd->n", a[:, 0], b[:, 1])
        scores[start : start + BATCH] = np.maximum(whole, np.maximum(centre_whole, whole_centre))
    return scores
