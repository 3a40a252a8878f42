"""What the package's two pictures share: the prediction map (`hierloc.inference.map_layout` lays it out,
`hierloc.inference.maps` draws it) and the entity hierarchy in the Poincare disk (`hierloc.inference.disk_plot`).

Pillow's built-in font and text measurement (remembered: a layout measures the same names and prefixes again and
again), text shortened with "…" to a width, the colours of the four levels, the supersampling factor both draw at,
the check of an output path and PNG encoding.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Sequence

from hierloc.errors import InputError

LEVEL_COLOURS = ((200, 30, 45), (235, 135, 20), (40, 150, 70), (40, 90, 200))   # country, region, subregion, city
SUPERSAMPLE = 2                 # pictures are drawn this many times larger, then shrunk (smooth edges)

Box = tuple  # (x0, y0, x1, y1)


# TrueType fonts with the accented Latin letters of place names (Türkiye, Côte d'Ivoire, São Paulo), tried in
# order; Pillow finds a bare file name in the system's font directories. Pillow's built-in font draws only ASCII
# and a few symbols (an unknown letter becomes a box): it is the fallback when none is installed.
PLACE_NAME_FONTS = ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "Arial.ttf")
# Those fonts run wider than the built-in one the layouts were made with: drawn at this share of the size, a line
# holds about as many letters as before.
PLACE_NAME_FONT_SCALE = 0.88


@functools.lru_cache(maxsize=16)
def default_font(size: int):
    """A font at `size` pixels with the letters of place names: the first of PLACE_NAME_FONTS installed, else
    Pillow's built-in font (one object per size: measuring text reuses its glyph cache)."""
    from PIL import ImageFont

    for name in PLACE_NAME_FONTS:
        try:
            return ImageFont.truetype(name, max(1, round(size * PLACE_NAME_FONT_SCALE)))
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


@functools.lru_cache(maxsize=8192)
def text_length(font, text: str) -> float:
    """font.getlength(text), remembered: a layout measures the same names and prefixes again and again."""
    return font.getlength(text)


@functools.lru_cache(maxsize=8192)
def _bbox(font, text: str, anchor: str, stroke: int) -> tuple:
    """font.getbbox(text, ...), remembered (as `text_length`)."""
    return font.getbbox(text, anchor=anchor, stroke_width=stroke)


def text_box(font, xy, text: str, anchor: str = "la", stroke: int = 0) -> Box:
    """The box `text` covers when drawn at `xy` with `anchor` and a `stroke`-pixel outline."""
    x0, y0, x1, y1 = _bbox(font, text, anchor, stroke)
    return (xy[0] + x0, xy[1] + y0, xy[0] + x1, xy[1] + y1)


def fit_width(text: str, font, width: float) -> str:
    """``text``, or its longest prefix + "…" that ``font`` draws within ``width`` pixels."""
    if text_length(font, text) <= width:
        return text
    low, high = 0, len(text)
    while low < high:                       # the longest prefix that fits with the ellipsis
        middle = (low + high + 1) // 2
        if text_length(font, text[:middle].rstrip() + "…") <= width:
            low = middle
        else:
            high = middle - 1
    return text[:low].rstrip() + "…"


def output_path(path: str | Path, kinds: Sequence[str]) -> Path:
    """`path` as a Path, checked before any work: it ends in one of `kinds` and its directory exists."""
    path = Path(path)
    if path.suffix.lower() not in kinds:
        raise InputError(f"{path}: output must end in {' or '.join(kinds)}")
    if path.parent and not path.parent.exists():
        raise InputError(f"{path}: directory {path.parent} does not exist")
    return path


def png_bytes(image) -> bytes:
    """A Pillow image encoded as PNG (optimised)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
