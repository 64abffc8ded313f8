"""The preview grid: the query photo and its matches with titles and scores, as a PNG.

Uses Matplotlib's object API on the Agg canvas (no pyplot), so concurrent
requests share no global figure state.
"""

from __future__ import annotations

import io
import textwrap
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from indexer.embedding.images import ImageError, thumbnail
from indexer.records import ShownProduct

COLUMNS = 5


def _thumbnail(source: Image.Image | Path) -> Image.Image | None:
    if isinstance(source, Image.Image):
        return source
    try:
        return thumbnail(source)
    except ImageError:  # a catalog file broken since it was indexed: leave its panel empty
        return None


@dataclass(frozen=True)
class Panel:
    image: Image.Image | Path | None
    caption: str
    colour: str = "black"


def render_preview(query: Image.Image | Path, matches: list[tuple[ShownProduct, Path]]) -> bytes:
    """PNG bytes of a grid: the query first, then each (match, image path), COLUMNS to a row."""
    panels = [Panel(query, "query", "#c0392b")] + [
        Panel(path, f"{textwrap.shorten(match.title, 28)}\nscore {match.score:.3f}") for match, path in matches
    ]
    return render_grid([panels[i : i + COLUMNS] for i in range(0, len(panels), COLUMNS)])


def render_grid(rows: list[list[Panel]]) -> bytes:
    """PNG bytes of rows of captioned photos, axes off (also used by `make eval`)."""
    # Imported here: Matplotlib costs start-up time and memory that searches never need.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = max(len(row) for row in rows)
    figure = Figure(figsize=(2.4 * columns, 2.7 * len(rows)), dpi=80)
    FigureCanvasAgg(figure)
    for row_number, row in enumerate(rows):
        for column, panel in enumerate(row):
            axes = figure.add_subplot(len(rows), columns, row_number * columns + column + 1)
            image = _thumbnail(panel.image) if panel.image is not None else None
            if image is not None:
                axes.imshow(image)
            # Drawn as given: a "$" or a backslash in a title is text, never TeX or mathtext (which fails on some).
            axes.set_title(panel.caption, fontsize=9, color=panel.colour, usetex=False, parse_math=False)
            axes.axis("off")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
