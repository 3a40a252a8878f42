"""The prediction map's layout at every width the package draws it: the key (legend) and the title lines never cover
the answer, the candidates or the true point, and everything lies inside the picture.

Widths: `hierloc explain --map` draws 1200 px; `hierloc serve`'s /explain 900 px by default and any `map_width` in
its range (300 to 2000; the page asks for its own width on a phone). The scenarios are the hard ones: an answer in
the Andes with Chilean candidates to the south-west, an answer near each corner of the window, a window across the
antimeridian, the whole world with an answer on its seam, a street-level answer (everything in the middle), a far
true point, many candidates, a polar answer.
"""

from __future__ import annotations

import numpy as np
import pytest

from hierloc.inference import map_layout, maps
from hierloc.inference.explain import Candidate, ConceptReason, Explanation, LevelExplanation
from hierloc.serve.app import EXPLAIN_DEFAULTS, MAP_WIDTH_RANGE

LOW, HIGH = MAP_WIDTH_RANGE
CLI_WIDTH = 1200                        # hierloc explain --map (render_prediction_map's default)
SERVE_WIDTH = EXPLAIN_DEFAULTS["map_width"]
WIDTHS = sorted({LOW, 320, 360, 375, 390, 414, 480, 600, 768, SERVE_WIDTH, map_layout.COMPACT_LEGEND_PX - 1,
                 map_layout.COMPACT_LEGEND_PX, CLI_WIDTH, 1600, HIGH} | set(range(LOW, HIGH + 1, 200)))
MODEL = {"model_dir": "runs/osv5m-vit-small-hyperbolic", "backbone": "vit_small_patch16_224", "pretrained": True,
         "n_train_images": 120000, "steps": 30000,
         "gazetteer_entities_per_level": {"country": 210, "region": 3100, "subregion": 24000, "city": 51000}}


def _c(name: str, p: float, lat: float, lon: float) -> Candidate:
    return Candidate(abs(hash(name)) % 100000, name, name, p, lat, lon)


def _why(*names: str) -> list[ConceptReason]:
    return [ConceptReason(n, n, "cover", 0.9, 0.8, 0.1, 0.9 * 0.7 - 0.1 * k) for k, n in enumerate(names)]


def _explanation(path: list[Candidate], countries: list[Candidate], alternatives: list[tuple], truth=None,
                 radius_km: float | None = None, source: str = "photo.jpg") -> Explanation:
    """path: chosen country, region, subregion, city; countries: the country runners-up; alternatives:
    (names coarse to fine, lat, lon)."""
    names = ("country", "region", "subregion", "city")
    levels = [LevelExplanation(names[k], node, countries if k == 0 else [],
                               countries[0].name if k == 0 and countries else f"{path[k - 1].name} (parent)",
                               _why("snow or ice", "drives on the right", "palm trees") if k < 2 else [])
              for k, node in enumerate(path)]
    alts = [{"names": list(n), "keys": list(n), "score": -1.0 - k, "lat_deg": lat, "lon_deg": lon}
            for k, (n, lat, lon) in enumerate(alternatives)]
    return Explanation(source, path[-1].lat_deg, path[-1].lon_deg, levels, [], alts, MODEL, True,
                       truth[0] if truth else None, truth[1] if truth else None, radius_km)


def argentina(truth=None) -> Explanation:
    """The user's report: Argentina > Mendoza > Santa Rosa, Chile and its cities to the south-west."""
    path = [_c("Argentina", 0.52, -35.4, -65.2), _c("Mendoza", 0.61, -34.6, -68.4),
            _c("Departamento Santa Rosa", 0.7, -33.6, -67.6), _c("Santa Rosa", 0.8, -33.25, -68.15)]
    countries = [_c("Chile", 0.33, -35.7, -71.5), _c("Uruguay", 0.06, -32.8, -56.0), _c("Bolivia", 0.04, -16.3, -63.6)]
    alts = [(("Chile", "Región Metropolitana de Santiago", "Santiago"), -33.45, -70.66),
            (("Chile", "Región de Valparaíso", "Valparaíso"), -33.05, -71.62),
            (("Argentina", "San Juan", "San Juan"), -31.54, -68.53),
            (("Chile", "Región de Coquimbo", "La Serena"), -29.9, -71.25)]
    return _explanation(path, countries, alts, truth, radius_km=420.0,
                        source="IMG_20240312_181455_mendoza_vineyard_road_with_a_very_long_file_name.jpg")


def street() -> Explanation:
    """A street photo: every point within a few kilometres, so everything sits in the middle of the window."""
    path = [_c("France", 0.93, 46.6, 2.4), _c("Île-de-France", 0.88, 48.7, 2.5), _c("Paris", 0.9, 48.86, 2.35),
            _c("Paris 5e Arrondissement", 0.7, 48.845, 2.35)]
    countries = [_c("Belgium", 0.04, 50.6, 4.6), _c("Switzerland", 0.02, 46.8, 8.2)]
    alts = [(("France", "Île-de-France", "Paris", "Paris 6e Arrondissement"), 48.85, 2.33),
            (("France", "Île-de-France", "Hauts-de-Seine", "Boulogne-Billancourt"), 48.835, 2.24),
            (("France", "Île-de-France", "Seine-Saint-Denis", "Saint-Denis"), 48.936, 2.357)]
    return _explanation(path, countries, alts, radius_km=6.0, source="street.jpg")


def street_with_truth() -> Explanation:
    e = street()
    e.gps_lat_deg, e.gps_lon_deg = 48.853, 2.349
    return e


def corner(lat_sign: int, lon_sign: int) -> Explanation:
    """The answer near one corner of the fitted window: the other points pull the window the other way."""
    lat0, lon0 = 10.0, 20.0
    far_lat, far_lon = lat0 - lat_sign * 14.0, lon0 - lon_sign * 30.0
    path = [_c("Answerland", 0.7, lat0 - lat_sign * 1.0, lon0 - lon_sign * 1.5), _c("North Province", 0.6, lat0, lon0),
            _c("Capital District", 0.8, lat0, lon0), _c("Capital", 0.9, lat0, lon0)]
    countries = [_c("Farland", 0.25, far_lat, far_lon)]
    alts = [(("Farland", "Far Province", "Far City"), far_lat, far_lon),
            (("Farland", "Mid Province", "Mid City"), (lat0 + far_lat) / 2, (lon0 + far_lon) / 2)]
    return _explanation(path, countries, alts)


def fiji() -> Explanation:
    """A window across the antimeridian: Fiji, Tonga and Samoa east of 180, New Zealand west of it."""
    path = [_c("Fiji", 0.55, -17.8, 178.0), _c("Central", 0.6, -18.0, 178.3), _c("Rewa", 0.7, -18.1, 178.5),
            _c("Suva", 0.8, -18.14, 178.44)]
    countries = [_c("New Zealand", 0.2, -41.0, 174.0), _c("Tonga", 0.12, -21.2, -175.2), _c("Samoa", 0.1, -13.8, -172.0)]
    alts = [(("Tonga", "Tongatapu", "Nukuʻalofa"), -21.14, -175.2), (("Samoa", "Tuamasaga", "Apia"), -13.83, -171.76),
            (("New Zealand", "Auckland", "Auckland"), -36.85, 174.76)]
    return _explanation(path, countries, alts, radius_km=900.0)


def fiji_truth_in_europe() -> Explanation:
    """Answer on the world map's seam (178 E) and a true point on the other side of the world."""
    e = fiji()
    e.gps_lat_deg, e.gps_lon_deg = 48.2, 16.37
    return e


def argentina_truth_far() -> Explanation:
    return argentina(truth=(35.68, 139.69))


def many_candidates() -> Explanation:
    """Ten European countries as candidates, four alternatives and a true point nearby."""
    path = [_c("Germany", 0.3, 51.2, 10.4), _c("Bavaria", 0.4, 48.9, 11.4), _c("Upper Bavaria", 0.5, 48.1, 11.6),
            _c("Munich", 0.6, 48.14, 11.58)]
    others = [("Austria", 0.18, 47.6, 14.1), ("Switzerland", 0.12, 46.8, 8.2), ("France", 0.09, 46.6, 2.4),
              ("Czechia", 0.07, 49.8, 15.5), ("Poland", 0.06, 52.1, 19.4), ("Italy", 0.05, 42.8, 12.5),
              ("Netherlands", 0.04, 52.1, 5.3), ("Belgium", 0.03, 50.6, 4.6), ("Denmark", 0.02, 56.0, 10.0),
              ("Slovenia", 0.015, 46.1, 14.8)]
    alts = [(("Austria", "Tyrol", "Innsbruck"), 47.27, 11.39), (("Switzerland", "Zurich", "Zurich"), 47.37, 8.54),
            (("Austria", "Salzburg", "Salzburg"), 47.8, 13.04), (("Czechia", "Prague", "Prague"), 50.08, 14.43)]
    return _explanation(path, [_c(*o) for o in others], alts, truth=(47.07, 15.44), radius_km=350.0)


def svalbard(truth=None) -> Explanation:
    """An answer far north: on a world map (a far true point) the pin sits near the top edge."""
    path = [_c("Norway", 0.7, 64.5, 12.0), _c("Svalbard", 0.8, 78.5, 16.0), _c("Spitsbergen", 0.9, 78.3, 15.8),
            _c("Longyearbyen", 0.9, 78.22, 15.65)]
    return _explanation(path, [_c("Russia", 0.2, 61.5, 98.0)],
                        [(("Russia", "Arkhangelsk Oblast", "Nagurskoye"), 80.8, 47.7)], truth=truth)


def no_answer() -> Explanation:
    return Explanation("blank.jpg", float("nan"), float("nan"), [], [], [], MODEL, False)


SCENARIOS = {"argentina": argentina, "argentina_truth_near": lambda: argentina(truth=(-32.9, -68.8)),
             "argentina_truth_far": argentina_truth_far, "street": street, "street_truth": street_with_truth,
             "corner_ne": lambda: corner(1, 1), "corner_nw": lambda: corner(1, -1),
             "corner_se": lambda: corner(-1, 1), "corner_sw": lambda: corner(-1, -1), "fiji": fiji,
             "fiji_world_seam": fiji_truth_in_europe, "many_candidates": many_candidates, "svalbard": svalbard,
             "svalbard_truth_far": lambda: svalbard(truth=(-33.87, 151.21)),
             "no_answer": no_answer}


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _clip(box, frame):
    clipped = (max(box[0], frame[0]), max(box[1], frame[1]), min(box[2], frame[2]), min(box[3], frame[3]))
    return clipped if clipped[0] < clipped[2] and clipped[1] < clipped[3] else None


def _inside(box, frame, slack: float = 0.5) -> bool:
    return (box[0] >= frame[0] - slack and box[1] >= frame[1] - slack and box[2] <= frame[2] + slack
            and box[3] <= frame[3] + slack)


def layout_problems(layout: map_layout.MapLayout) -> list[str]:
    """What is wrong with one layout: a key or a title line covering a marker or a candidate's name (the visible
    part of it), a key or title outside the picture, the answer's pin or name cut by the map's edge, the true
    point outside the map."""
    width, height = layout.size
    canvas = (0, 0, width, height)
    problems = []
    covers = ([("legend", layout.legend)] if layout.legend else []) + [
        (f"title line {k + 1}", box) for k, box in enumerate(layout.header)]
    for name, box in covers:
        if not _inside(box, canvas):
            problems.append(f"{name} {box} outside the {width} x {height} picture")
    for kind in ("answer", "candidates", "truth", "labels"):
        for name, box in covers:
            hidden = [m for m in getattr(layout, kind) if (seen := _clip(m, layout.map_box)) and _overlap(box, seen)]
            if hidden:
                problems.append(f"{name} ({layout.legend_place if name == 'legend' else 'header'}) covers "
                                f"{len(hidden)} {kind} boxes, e.g. {tuple(round(v) for v in hidden[0])}")
    for name, box in (("pin", layout.pin), ("answer's name", layout.pin_label)):
        if box is not None and not _inside(box, layout.map_box):
            problems.append(f"{name} {tuple(round(v) for v in box)} cut by the map's edge {layout.map_box}")
    for box in layout.truth:
        x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        if not _inside((x, y, x, y), layout.map_box, 0):
            problems.append(f"true point {(round(x), round(y))} outside the map")
    return problems


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_key_and_titles_cover_no_marker_at_any_width(scenario):
    explanation = SCENARIOS[scenario]()
    problems = [f"{width} px: {problem}" for width in WIDTHS
                for problem in layout_problems(map_layout.prediction_map_layout(explanation, width=width))]
    assert not problems, f"{scenario}: {len(problems)} problems, e.g.\n" + "\n".join(problems[:12])


@pytest.mark.parametrize("scenario,width", [("street", 390), ("argentina", SERVE_WIDTH)])
def test_the_picture_is_drawn_where_its_layout_says(scenario, width):
    """render_prediction_map draws from prediction_map_layout: same size, the key's white box and the red pin
    where the layout puts them."""
    explanation = SCENARIOS[scenario]()
    layout = map_layout.prediction_map_layout(explanation, width=width)
    image = maps.render_prediction_map(explanation, width=width)
    assert image.size == layout.size and image.info["layout"] == layout
    pixels = np.asarray(image).astype(int)
    x0, y0, x1, y1 = (round(v) for v in layout.legend)
    key = pixels[y0 + 2:y1 - 1, x0 + 2:x1 - 1]
    assert (key.min(axis=2) > 200).mean() > 0.6                 # mostly white: the key's background
    x0, y0, x1, y1 = layout.pin
    head = pixels[round((y0 + y1) / 2 - (y1 - y0) / 6), round((x0 + x1) / 2)]   # the pin's round head
    assert head[0] > 170 and head[1] < 90 and head[2] < 90
