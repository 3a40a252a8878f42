"""hierloc.geometry.geodesy: the great-circle distances that feed the loss weights, against a numpy float64
haversine written here (OSV5M's formula, R = 6371 km), and the unit vectors of the blocked kernels."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from hierloc.geometry import geodesy
from tests.helpers import sphere_points as sphere


def numpy_haversine_km(lat1, lon1, lat2, lon2):
    """OSV5M's formula in float64 numpy: 2R asin(sqrt(sin^2(dlat/2) + cos lat1 cos lat2 sin^2(dlon/2)))."""
    lat1, lon1, lat2, lon2 = (np.radians(np.asarray(v, dtype=np.float64)) for v in (lat1, lon1, lat2, lon2))
    a = np.sin((lat2 - lat1) / 2) ** 2 + np.cos(lat1) * np.cos(lat2) * np.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371.0 * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def test_earth_radius_is_osv5ms():
    assert geodesy.EARTH_RADIUS_KM == 6371.0


def test_known_distances():
    one_degree = geodesy.haversine_km(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0))
    assert one_degree.item() == pytest.approx(6371.0 * math.pi / 180.0, rel=1e-6)
    antipodes = geodesy.pairwise_haversine_km(torch.tensor([0.0, 90.0]), torch.tensor([0.0, 0.0]),
                                              torch.tensor([0.0, -90.0]), torch.tensor([180.0, 0.0]))
    assert antipodes[0, 0].item() == pytest.approx(6371.0 * math.pi, rel=1e-6)
    assert antipodes[1, 1].item() == pytest.approx(6371.0 * math.pi, rel=1e-6)
    assert torch.isfinite(antipodes).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_haversine_matches_numpy_and_broadcasts(dtype):
    lat1, lon1 = sphere(200, 1)
    lat2, lon2 = sphere(200, 2)
    expected = numpy_haversine_km(lat1, lon1, lat2, lon2)
    t = lambda v: torch.tensor(v, dtype=dtype)  # noqa: E731
    out = geodesy.haversine_km(t(lat1), t(lon1), t(lat2), t(lon2))
    assert out.dtype == dtype
    tolerance = {torch.float64: 1e-9, torch.float32: 1e-2}[dtype]  # float32: coordinates rounded to ~1e-6 deg
    expected32 = numpy_haversine_km(*(np.asarray(t(v), dtype=np.float64) for v in (lat1, lon1, lat2, lon2)))
    np.testing.assert_allclose(out.double().numpy(), expected32 if dtype == torch.float32 else expected, atol=tolerance)
    grid = geodesy.haversine_km(t(lat1[:5])[:, None], t(lon1[:5])[:, None], t(lat2[:7])[None], t(lon2[:7])[None])
    assert grid.shape == (5, 7)


def test_pairwise_haversine_matches_numpy_in_float64_within_a_metre():
    lat_a, lon_a = sphere(40, 3)
    lat_b, lon_b = sphere(300, 4)
    # add hard cases: coincident, 1-10 km away, nearly antipodal
    lat_b = np.concatenate([lat_b, lat_a, lat_a + 0.01, lat_a + 0.05, -lat_a + 1e-5])
    lon_b = np.concatenate([lon_b, lon_a, lon_a, lon_a - 0.03, lon_a + 180.0])
    expected = numpy_haversine_km(lat_a[:, None], lon_a[:, None], lat_b[None], lon_b[None])
    out = geodesy.pairwise_haversine_km(*(torch.tensor(v) for v in (lat_a, lon_a, lat_b, lon_b)))
    assert out.shape == (40, lat_b.size) and out.dtype == torch.float64
    err = np.abs(out.numpy() - expected)
    assert err[expected > 1.0].max() < 1e-3  # the contract: within 1 m beyond 1 km
    assert err.max() < 1e-3  # and in fact everywhere, coincident and antipodal points included


def test_pairwise_haversine_in_float32_is_within_a_few_metres():
    lat_a, lon_a = sphere(30, 5)
    lat_b, lon_b = sphere(200, 6)
    lat_b, lon_b = np.concatenate([lat_b, lat_a + 0.001]), np.concatenate([lon_b, lon_a])
    lat_a, lon_a, lat_b, lon_b = (torch.tensor(v, dtype=torch.float32) for v in (lat_a, lon_a, lat_b, lon_b))
    # reference on the float32-rounded coordinates, in float64
    expected = numpy_haversine_km(lat_a.double().numpy()[:, None], lon_a.double().numpy()[:, None],
                                  lat_b.double().numpy()[None], lon_b.double().numpy()[None])
    out = geodesy.pairwise_haversine_km(lat_a, lon_a, lat_b, lon_b)
    assert out.dtype == torch.float32
    assert np.abs(out.double().numpy() - expected).max() < 5e-3  # float32 rounding of the result (<= 1.2 m)


def test_pairwise_haversine_works_in_row_chunks(monkeypatch):
    monkeypatch.setattr(geodesy, "_CHUNK_ELEMENTS", 64)  # 64 / 50 -> one row per chunk
    lat_a, lon_a = sphere(7, 7)
    lat_b, lon_b = sphere(50, 8)
    out = geodesy.pairwise_haversine_km(*(torch.tensor(v) for v in (lat_a, lon_a, lat_b, lon_b)))
    expected = numpy_haversine_km(lat_a[:, None], lon_a[:, None], lat_b[None], lon_b[None])
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_pairwise_haversine_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="lat/lon"):
        geodesy.pairwise_haversine_km(torch.zeros(3), torch.zeros(2), torch.zeros(4), torch.zeros(4))


def test_latlon_to_unit_gives_unit_vectors_with_the_usual_axes():
    lat, lon = sphere(100, 9)
    unit = geodesy.latlon_to_unit(torch.tensor(lat), torch.tensor(lon))
    assert unit.shape == (100, 3) and unit.dtype == torch.float64
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(100, dtype=torch.float64))
    axes = geodesy.latlon_to_unit(torch.tensor([0.0, 0.0, 90.0]), torch.tensor([0.0, 90.0, 0.0]))
    torch.testing.assert_close(axes, torch.eye(3), atol=1e-7, rtol=0)
    assert geodesy.latlon_to_unit(torch.zeros(2, 3), torch.zeros(2, 3)).shape == (2, 3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert geodesy.latlon_to_unit(10.0, 20.0).shape == (3,)
