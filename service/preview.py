"""The preview grid: the query photo and its matches with titles and scores, as a PNG.

Uses Matplotlib's object API on the Agg canvas (no pyplot), so concurrent
requests share no global figure state.
"""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

from PIL import Image

from indexer.images import ImageError, thumbnail

COLUMNS = 5


def _thumbnail(source: Image.Image | Path) -> Image.Image | None:
    if isinstance(source, Image.Image):
        return source
    try:
        return thumbnail(source)
    except ImageError:  # a catalog file broken since it was indexed: leave its panel empty
        return None


def render_preview(query: Image.Image | Path, matches: list[tuple[object, Path]]) -> bytes:
    """PNG bytes of a grid: the query first, then each (match, image path) in order."""
    # Imported here: Matplotlib costs start-up time and memory that searches never need.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [(_thumbnail(query), "query")] + [
        (_thumbnail(path), f"{textwrap.shorten(match.title, 28)}\nscore {match.score:.3f}") for match, path in matches
    ]
    columns = min(COLUMNS, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(2.4 * columns, 2.7 * rows), dpi=80)
    FigureCanvasAgg(figure)
    for position, (image, caption) in enumerate(panels, start=1):
        axes = figure.add_subplot(rows, columns, position)
        if image is not None:
            axes.imshow(image)
        axes.set_title(caption, fontsize=9, color="#c0392b" if position == 1 else "black")
        axes.axis("off")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
