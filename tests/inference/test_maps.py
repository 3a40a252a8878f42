"""Pictures: the hyperbolic-aware disk projection, map windows, basemap crops and the drawn markers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hierloc.inference import disk_plot, map_layout, maps
from hierloc.inference.explain import Candidate, Explanation, LevelExplanation


def _depth(points: np.ndarray, c: float) -> np.ndarray:
    return 2 * np.arctanh(np.sqrt(c) * np.linalg.norm(points, axis=1)) / np.sqrt(c)


@pytest.mark.parametrize("c", [1.0, 0.5])
def test_disk_projection_keeps_every_hyperbolic_distance_to_the_origin(c):
    rng = np.random.default_rng(0)
    tangent = rng.normal(size=(50, 16)) * rng.uniform(0.01, 1.0, size=(50, 1))  # d up to ~10, as in float64
    norm = np.linalg.norm(tangent, axis=1, keepdims=True)
    points = np.tanh(np.sqrt(c) * norm) * tangent / (np.sqrt(c) * norm)     # expmap0
    disk = disk_plot.project_to_disk(points, c=c)
    assert disk.shape == (50, 2)
    assert (np.linalg.norm(disk, axis=1) < 1 / np.sqrt(c)).all()
    np.testing.assert_allclose(_depth(disk, c), _depth(points, c), rtol=1e-7)


def test_disk_projection_of_planar_points_is_an_isometry_and_keeps_the_origin():
    rng = np.random.default_rng(1)
    points = rng.uniform(-0.6, 0.6, size=(20, 2))
    points = np.vstack([np.zeros(2), points])
    disk = disk_plot.project_to_disk(points)
    np.testing.assert_allclose(disk[0], [0, 0], atol=1e-12)
    before = np.linalg.norm(points[:, None] - points[None], axis=-1)
    after = np.linalg.norm(disk[:, None] - disk[None], axis=-1)
    np.testing.assert_allclose(after, before, atol=1e-9)


def test_fitted_region_holds_the_points_with_a_two_to_one_aspect():
    region = map_layout.fit_region([48.0, 52.0, 45.0], [2.0, 13.0, 7.0])
    assert region.max_lon - region.min_lon == pytest.approx(2 * (region.max_lat - region.min_lat))
    x, y = region.to_pixels(np.array([48.0, 52.0, 45.0]), np.array([2.0, 13.0, 7.0]), 1000, 500)
    assert ((0 < x) & (x < 1000) & (0 < y) & (y < 500)).all()


def test_region_across_the_antimeridian_stays_narrow_and_far_points_give_the_world():
    region = map_layout.fit_region([-40.0, -17.0], [175.0, -178.0])
    assert region.max_lon - region.min_lon < 90 and region != map_layout.Region.world()
    x, _ = region.to_pixels(np.array([-40.0, -17.0]), np.array([175.0, -178.0]), 1000, 500)
    assert (0 < x).all() and (x < 1000).all()
    assert map_layout.fit_region([48.0, -33.0], [2.0, 151.0]) == map_layout.Region.world()


def test_basemap_crop_is_the_same_picture_whichever_way_longitudes_are_written():
    east_window = map_layout.Region(-20.0, -10.0, 180.0, 200.0)
    west_window = map_layout.Region(-20.0, -10.0, -180.0, -160.0)       # the same window, longitudes written west
    east = np.asarray(maps.basemap_crop(east_window, 400, "bluemarble"), dtype=float)
    west = np.asarray(maps.basemap_crop(west_window, 400, "bluemarble"), dtype=float)
    assert east.shape == (200, 400, 3)
    assert np.abs(east - west).mean() < 2.0


def _explanation(truth=None) -> Explanation:
    def cand(entity, name, p, lat, lon):
        return Candidate(entity, name, name, p, lat, lon)

    levels = [LevelExplanation("country", cand(0, "Norway", 0.6, 61.0, 9.0), [cand(1, "Sweden", 0.3, 62.0, 16.0)],
                               "Sweden"),
              LevelExplanation("region", cand(2, "Vestland", 0.5, 60.9, 6.2), [], "Norway (parent)"),
              LevelExplanation("subregion", cand(3, "Os", 1.0, 60.2, 5.5), [], "Vestland (parent)"),
              LevelExplanation("city", cand(4, "Syfteland", 1.0, 60.25, 5.44), [], "Os (parent)")]
    alt = [{"names": ["Sweden", "Dalarna"], "keys": ["SE", "SE|W"], "score": -2.0, "lat_deg": 60.6, "lon_deg": 15.6}]
    return Explanation("photo.jpg", 60.25, 5.44, levels, [], alt, {"model_dir": "runs/demo", "n_train_images": 10,
                                                                  "steps": 3}, False)


@pytest.mark.integration
def test_prediction_map_puts_the_red_pin_on_the_predicted_point(tmp_path):
    region = map_layout.Region(50.0, 70.0, -10.0, 30.0)
    out = tmp_path / "map.png"
    image = maps.render_prediction_map(_explanation(), out, width=800, region=region)
    assert out.is_file() and image.size == (800, 400 + 78)
    x, y = region.to_pixels(60.25, 5.44, 800, 400)
    head = np.asarray(image)[int(y) + 78 - 18, int(x)]          # pin head: 2 radii (9 px) above the tip
    assert head[0] > 170 and head[1] < 90 and head[2] < 90


@pytest.mark.integration
def test_truth_is_drawn_as_a_green_cross(tmp_path):
    region = map_layout.Region(50.0, 70.0, -10.0, 30.0)
    image = maps.render_prediction_map(_explanation(), width=800, region=region, truth=(55.0, 20.0))
    x, y = region.to_pixels(55.0, 20.0, 800, 400)
    pixel = np.asarray(image)[int(round(float(y))) + 78, int(round(float(x)))]
    assert pixel[1] > 150 and pixel[0] < 120


@pytest.mark.integration
def test_html_map_inlines_the_picture_and_escapes_the_text(tmp_path):
    out = tmp_path / "map.html"
    maps.render_prediction_map(_explanation(), out, width=400, text="<b>Norway</b>")
    page = out.read_text(encoding="utf-8")
    assert "data:image/png;base64," in page and "&lt;b&gt;Norway&lt;/b&gt;" in page


def test_unsupported_map_extension_is_an_input_error(tmp_path):
    from hierloc.errors import InputError

    with pytest.raises(InputError, match="map.gif"):
        maps.render_prediction_map(_explanation(), tmp_path / "map.gif")


def test_poincare_disk_picture_puts_countries_at_their_projected_positions(tmp_path):
    points = np.array([[0.5, 0.0], [-0.3, 0.3], [0.7, 0.1], [-0.5, 0.5]])
    levels, parents = np.array([0, 0, 1, 1]), np.array([-1, -1, 0, 1])
    out = tmp_path / "disk.png"
    image = disk_plot.render_poincare_disk(points, levels, parents, ["A", "B", "a", "b"], out, size=400,
                                           label_countries=0)
    assert out.is_file() and image.size == (400, 470)
    with Image.open(out) as again:
        assert again.size == image.size
    # the full disk is shown (points reach 0.7 of the radius): (0.5, 0) sits at 0.46 * 400 * 0.5 right of centre
    pixel = np.asarray(image)[int(70 + 200), int(200 + 0.46 * 400 * 0.5)]
    assert pixel[0] > 150 and pixel[1] < 100


@pytest.mark.integration
def test_legend_never_hides_the_truth_marker():
    """A truth in the bottom-left corner (where the key usually goes): the cross stays visible, the key moves."""
    region = map_layout.Region(50.0, 70.0, -10.0, 30.0)
    truth = (51.5, -8.0)                                                    # bottom-left of the window
    image = maps.render_prediction_map(_explanation(), width=800, region=region, truth=truth)
    x, y = region.to_pixels(*truth, 800, 400)
    pixel = np.asarray(image)[int(round(float(y))) + 78, int(round(float(x)))]
    assert pixel[1] > 150 and pixel[0] < 120                                # the green cross, not the white key


def test_legend_corner_is_the_first_corner_clear_of_the_markers_else_none():
    box, w, h = (300.0, 100.0), 800, 400
    bottom_left, bottom_right, top_left = ("bottom-left", (8, 292)), ("bottom-right", (492, 292)), ("top-left", (8, 8))
    left, right, up_left, up_right = (40, 340, 60, 360), (700, 340, 720, 360), (40, 40, 60, 60), (700, 40, 720, 60)
    assert map_layout.legend_corner(box, w, h, 8, []) == bottom_left
    assert map_layout.legend_corner(box, w, h, 8, [left]) == bottom_right
    assert map_layout.legend_corner(box, w, h, 8, [left, right]) == top_left
    assert map_layout.legend_corner(box, w, h, 8, [left, right, up_left, up_right]) is None  # under the map, then
    assert map_layout.legend_corner((300.0, 390.0), w, h, 8, []) is None                      # too tall for the map


def test_world_map_moves_its_edge_away_from_the_points():
    assert map_layout.world_window([2.0, 151.0, -74.0]) == map_layout.Region.world()
    seam = map_layout.world_window([178.4, 16.4, -171.8])  # Fiji, Vienna, Samoa: the edge falls in the Atlantic
    assert -171.8 < seam.min_lon < 16.4 and seam.max_lon - seam.min_lon == 360.0
    x, _ = seam.to_pixels(np.array([0.0, 0.0, 0.0]), np.array([178.4, 16.4, -171.8]), 360, 180)
    assert (x > 15).all() and (x < 345).all()
    assert map_layout.fit_region([-18.1, 48.2], [178.4, 16.4]) == map_layout.world_window([178.4, 16.4])


def test_place_names_with_accents_are_drawn_not_replaced_by_a_box():
    """Türkiye, Côte d'Ivoire, São Paulo: each accented letter has its own glyph (Pillow's built-in font, the
    fallback, draws a missing-glyph box for all of them alike)."""
    from PIL import Image, ImageDraw

    from hierloc.inference.pictures import PLACE_NAME_FONTS, default_font

    font = default_font(19)
    if not isinstance(getattr(font, "path", None), str):     # the built-in font is loaded from bytes
        pytest.skip("no TrueType font with place-name letters installed (the built-in fallback is in use)")
    assert font.path.endswith(PLACE_NAME_FONTS)

    def glyph(char: str) -> bytes:
        image = Image.new("L", (40, 40))
        ImageDraw.Draw(image).text((5, 5), char, fill=255, font=font)
        return image.tobytes()

    missing = glyph("\uffff")                      # a noncharacter: no font has it
    assert all(glyph(char) != missing for char in "üôãéñç")
    assert len({glyph(char) for char in "üôãéñç"}) == 6
