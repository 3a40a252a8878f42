"""Pictures: the hyperbolic-aware disk projection, map windows, basemap crops and the drawn markers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hierloc.inference import maps
from hierloc.inference.explain import Candidate, Explanation, LevelExplanation


def _depth(points: np.ndarray, c: float) -> np.ndarray:
    return 2 * np.arctanh(np.sqrt(c) * np.linalg.norm(points, axis=1)) / np.sqrt(c)


@pytest.mark.parametrize("c", [1.0, 0.5])
def test_disk_projection_keeps_every_hyperbolic_distance_to_the_origin(c):
    rng = np.random.default_rng(0)
    tangent = rng.normal(size=(50, 16)) * rng.uniform(0.01, 1.0, size=(50, 1))  # d up to ~10, as in float64
    norm = np.linalg.norm(tangent, axis=1, keepdims=True)
    points = np.tanh(np.sqrt(c) * norm) * tangent / (np.sqrt(c) * norm)     # expmap0
    disk = maps.project_to_disk(points, c=c)
    assert disk.shape == (50, 2)
    assert (np.linalg.norm(disk, axis=1) < 1 / np.sqrt(c)).all()
    np.testing.assert_allclose(_depth(disk, c), _depth(points, c), rtol=1e-7)


def test_disk_projection_of_planar_points_is_an_isometry_and_keeps_the_origin():
    rng = np.random.default_rng(1)
    points = rng.uniform(-0.6, 0.6, size=(20, 2))
    points = np.vstack([np.zeros(2), points])
    disk = maps.project_to_disk(points)
    np.testing.assert_allclose(disk[0], [0, 0], atol=1e-12)
    before = np.linalg.norm(points[:, None] - points[None], axis=-1)
    after = np.linalg.norm(disk[:, None] - disk[None], axis=-1)
    np.testing.assert_allclose(after, before, atol=1e-9)


def test_fitted_region_holds_the_points_with_a_two_to_one_aspect():
    region = maps.fit_region([48.0, 52.0, 45.0], [2.0, 13.0, 7.0])
    assert region.max_lon - region.min_lon == pytest.approx(2 * (region.max_lat - region.min_lat))
    x, y = region.to_pixels(np.array([48.0, 52.0, 45.0]), np.array([2.0, 13.0, 7.0]), 1000, 500)
    assert ((0 < x) & (x < 1000) & (0 < y) & (y < 500)).all()


def test_region_across_the_antimeridian_stays_narrow_and_far_points_give_the_world():
    region = maps.fit_region([-40.0, -17.0], [175.0, -178.0])
    assert region.max_lon - region.min_lon < 90 and region != maps.Region.world()
    x, _ = region.to_pixels(np.array([-40.0, -17.0]), np.array([175.0, -178.0]), 1000, 500)
    assert (0 < x).all() and (x < 1000).all()
    assert maps.fit_region([48.0, -33.0], [2.0, 151.0]) == maps.Region.world()


def test_basemap_crop_is_the_same_picture_whichever_way_longitudes_are_written():
    east = np.asarray(maps.basemap_crop(maps.Region(-20.0, -10.0, 180.0, 200.0), 400, "bluemarble"), dtype=float)
    west = np.asarray(maps.basemap_crop(maps.Region(-20.0, -10.0, -180.0, -160.0), 400, "bluemarble"), dtype=float)
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


def test_prediction_map_puts_the_red_pin_on_the_predicted_point(tmp_path):
    region = maps.Region(50.0, 70.0, -10.0, 30.0)
    out = tmp_path / "map.png"
    image = maps.render_prediction_map(_explanation(), out, width=800, region=region)
    assert out.is_file() and image.size == (800, 400 + 78)
    x, y = region.to_pixels(60.25, 5.44, 800, 400)
    head = np.asarray(image)[int(y) + 78 - 18, int(x)]          # pin head: 2 radii (9 px) above the tip
    assert head[0] > 170 and head[1] < 90 and head[2] < 90


def test_truth_is_drawn_as_a_green_cross(tmp_path):
    region = maps.Region(50.0, 70.0, -10.0, 30.0)
    image = maps.render_prediction_map(_explanation(), width=800, region=region, truth=(55.0, 20.0))
    x, y = region.to_pixels(55.0, 20.0, 800, 400)
    pixel = np.asarray(image)[int(round(float(y))) + 78, int(round(float(x)))]
    assert pixel[1] > 150 and pixel[0] < 120


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
    image = maps.render_poincare_disk(points, levels, parents, ["A", "B", "a", "b"], out, size=400, label_countries=0)
    assert out.is_file() and image.size == (400, 470)
    with Image.open(out) as again:
        assert again.size == image.size
    # the full disk is shown (points reach 0.7 of the radius): (0.5, 0) sits at 0.46 * 400 * 0.5 right of centre
    pixel = np.asarray(image)[int(70 + 200), int(200 + 0.46 * 400 * 0.5)]
    assert pixel[0] > 150 and pixel[1] < 100


def test_legend_never_hides_the_truth_marker():
    """A truth in the bottom-left corner (where the key usually goes): the cross stays visible, the key moves."""
    region = maps.Region(50.0, 70.0, -10.0, 30.0)
    truth = (51.5, -8.0)                                                    # bottom-left of the window
    image = maps.render_prediction_map(_explanation(), width=800, region=region, truth=truth)
    x, y = region.to_pixels(*truth, 800, 400)
    pixel = np.asarray(image)[int(round(float(y))) + 78, int(round(float(x)))]
    assert pixel[1] > 150 and pixel[0] < 120                                # the green cross, not the white key


def test_legend_corner_avoids_truth_first_then_answer():
    box, w, h = (300.0, 100.0), 800, 400
    bottom_left, bottom_right, top_left = (8, 292), (492, 292), (8, 8)
    assert maps.legend_corner(box, w, h, 8, [], []) == bottom_left
    assert maps.legend_corner(box, w, h, 8, [(50, 350)], []) == bottom_right
    assert maps.legend_corner(box, w, h, 8, [(50, 350)], [(700, 350)]) == top_left
    # every corner holds the answer: the truth still wins
    everywhere = [(50, 350), (700, 350), (50, 50), (700, 50)]
    assert maps.legend_corner(box, w, h, 8, [(50, 350)], everywhere[1:]) == bottom_right
