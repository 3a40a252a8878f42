"""The prediction map's layout, computed before anything is drawn: `prediction_map_layout` returns a `MapLayout`
whose plan `hierloc.inference.maps.render_prediction_map` draws.

It owns the map window (`Region`; `fit_region` around the answer, its candidates, its alternatives and the truth;
`world_window`: where a world map's left/right edge goes so that no marker is cut in two at the antimeridian), the
header lines above the map and their shortening with "…", where each marker goes, the names beside the markers
(placed to cover no other marker or name), and the key's place: the first map corner where it covers nothing
(`legend_corner`), else a band under the map. Boxes are in pixels of the drawn picture.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from gazetteer.geo import destination_deg
from hierloc.inference.explain import provenance_line
from hierloc.inference.pictures import LEVEL_COLOURS, SUPERSAMPLE, Box, default_font, fit_width, text_box, text_length

PIN_COLOUR = (220, 20, 30)      # the answer: its pin, its 90 % circle
ALT_COLOUR = (255, 150, 0)      # the other top paths' end points
TRUTH_COLOUR = (0, 200, 60)     # the true location's cross


# ------------------------------------------------------------------------------------------------ map window
@dataclass(frozen=True)
class Region:
    """Equirectangular window in degrees; max_lon may exceed 180 (a window across the antimeridian)."""

    min_lat: float
    max_lat: float
    min_lon: float
    max_lon: float

    @classmethod
    def world(cls) -> "Region":
        """The whole world, its edge at 180 degrees."""
        return cls(-90.0, 90.0, -180.0, 180.0)

    def unwrap(self, lon_deg) -> np.ndarray:
        """Longitudes moved by multiples of 360 into [min_lon, min_lon + 360)."""
        return (np.asarray(lon_deg, dtype=np.float64) - self.min_lon) % 360.0 + self.min_lon

    def to_pixels(self, lat_deg, lon_deg, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) in a width x height picture of the window (y down from its top)."""
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
RADIUS_IN_WINDOW_KM = 1500.0   # a larger 90 % circle is not fitted into the map window (it would show a continent)


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


def crop_height(region: Region, width: int) -> int:
    """Height in pixels of `region` drawn `width` pixels wide (equirectangular: degrees of latitude and of
    longitude take the same length)."""
    return max(1, round(width * (region.max_lat - region.min_lat) / (region.max_lon - region.min_lon)))


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


# ------------------------------------------------------------------------------ markers, names, header, key
HEADER_PX = 78                 # the band above the map: image and answer, points and radius, provenance
COMPACT_LEGEND_PX = 1000       # maps narrower than this (serve: 900) show a short key only (no alternatives, no reasons)
LEGEND_MARGIN_PX = 8           # between the key and the map's edge
CLEAR_PX = 4                   # the key keeps at least this far from what it must not cover


@dataclass
class MapPlan:
    """What `hierloc.inference.maps.render_prediction_map` draws and where, in supersampled pixels: markers in the
    map's own coordinates (the map starts `top` pixels below the picture's top), header lines and the key in the
    picture's."""

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
    """Where `hierloc.inference.maps.render_prediction_map` draws each thing, computed before any drawing
    (`prediction_map_layout`) and used by the drawing; boxes are (x0, y0, x1, y1) in pixels of the returned picture
    (render_prediction_map leaves it in ``image.info["layout"]``)."""

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
    plan: MapPlan = field(repr=False, compare=False)


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
    """Whether any of `box` lies in the w x h map."""
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
    small, medium, large = fonts = default_font(12 * s), default_font(15 * s), default_font(19 * s)

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
    plan = MapPlan(s, region, w, h, top, legend["band"], fonts, header, discs, alternatives, path, pin, truth_xy,
                   (e.lat_deg, e.lon_deg, radius) if radius is not None and e.levels else None, legend)

    def out(box, dy=0.0):
        return (box[0] / s, (box[1] + dy) / s, box[2] / s, (box[3] + dy) / s)

    return MapLayout((width, (top + h + plan.band) // s), out((0, 0, w, h), top),
                     [out(text_box(font, xy_, text)) for xy_, text, _, font in header],
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
        box = text_box(font, xy, text, anchor, stroke)
        if box[0] >= edge and box[2] <= w - edge:
            whole.append((xy, text, anchor))
        elif room >= text_length(font, text[:4] + "…") + 2 * stroke:
            short.append((xy, fit_width(text, font, room - 2 * stroke), anchor))
    if not whole and not short:
        xy, anchor, room = max(sides, key=lambda side: side[2])
        short.append((xy, fit_width(text, font, room - 2 * stroke), anchor))
    placed = []
    for xy, label, anchor in whole + short:
        box = text_box(font, xy, label, anchor, stroke)
        shift = max(0.0, -box[1]) - max(0.0, box[3] - h)
        placed.append(((xy[0], xy[1] + shift), label, anchor, (box[0], box[1] + shift, box[2], box[3] + shift)))
    return min(placed, key=lambda option: sum(_overlaps(option[3], other) for other in avoid))


def _overlaps(a: Box, b: Box) -> bool:
    """Whether boxes `a` and `b` share some area."""
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
    return [((10 * s, y * s), fit_width(text, font, width), fill, font)
            for y, text, fill, font in ((8, _title(Path(str(e.source)).name, answer, large, width), (10, 10, 10),
                                         large),
                                        (34, point, (40, 40, 40), medium),
                                        (56, provenance_line(e.model), (90, 90, 90), small))]


def _title(name: str, answer: str, font, width: float) -> str:
    """"name:  answer"; when it is too wide, the name's end gives way first (down to 40 % of the width; its
    extension stays), then the answer's."""
    rest = f":  {answer}"
    if text_length(font, name + rest) <= width:
        return name + rest
    budget = max(width - text_length(font, rest), 0.4 * width)
    if text_length(font, name) > budget:
        suffix = Path(name).suffix[1:] if len(Path(name).suffix) <= 6 else ""
        name = fit_width(name[:len(name) - len(suffix)].rstrip("."), font, budget - text_length(font, suffix)) + suffix
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
    rows = [(kind, colour, fit_width(label, font, w - 2 * margin - (40 if kind != "text" else 16) * s))
            for kind, colour, label in rows]
    line_h = 17 * s
    box_w = max(0 if compact else 380 * s, max(text_length(font, row[2]) for row in rows) + 40 * s)
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
    col_w = max(text_length(font, row[2]) for row in icons) + 40 * s
    columns = int(max(1, min(len(icons), (w - 2 * margin) // col_w)))
    icon_lines = math.ceil(len(icons) / columns)
    cells = [divmod(i, columns) if i < len(icons) else (icon_lines + i - len(icons), 0) for i in range(len(rows))]
    texts = [text_length(font, row[2]) + 16 * s for row in rows if row[0] == "text"]
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


def _ellipsis(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, the last one "…" when cut."""
    return text if len(text) <= limit else text[:limit - 1] + "…"
