"""The entity hierarchy in the Poincare disk, drawn with Pillow (`hierloc plot-embeddings`): the projection of the
entities to 2-D (`project_to_disk`) and the picture (`render_poincare_disk`: the disk, rings at hyperbolic distances
from the origin, parent -> child edges coloured by level, country names, the mean depth per level).

Entities of any dimension D are shown in 2-D with their hyperbolic distance to the origin kept exactly:
v = logmap0(x); the 2-D direction is v's projection on the two leading right-singular vectors of the (uncentred)
tangent vectors, the length stays |v|; then expmap0 in 2-D. So the radius in the picture is the true depth of each
entity (d(0, x) = 2 |v| on the ball of curvature -c with geoopt's convention, d = 2 artanh(sqrt(c) |x|) / sqrt(c)),
and only the angles are a projection.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from gazetteer.atomic import atomic_write_bytes
from hierloc.errors import InputError
from hierloc.inference.pictures import LEVEL_COLOURS, SUPERSAMPLE, default_font, fit_width, output_path, png_bytes


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

    small, medium, large = default_font(12 * s), default_font(15 * s), default_font(19 * s)
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
    draw.text((14 * s, 10 * s), fit_width(title or "Entity hierarchy in the Poincare disk", large, fit),
              fill=(10, 10, 10), font=large)
    draw.text((14 * s, 38 * s), fit_width(subtitle, small, fit), fill=(90, 90, 90), font=small)
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
