r"""Great-circle distances on torch tensors (degrees in, km out), for the geo-weighted loss and evaluation.

The Earth is a sphere of radius ``EARTH_RADIUS_KM = 6371.0`` km (OSV5M's constant, shared with ``gazetteer.geo``).
Haversine (OSV5M's formula), with phi = latitude, lambda = longitude in radians:

    a = sin^2((phi2 - phi1)/2) + cos(phi1) cos(phi2) sin^2((lambda2 - lambda1)/2),   d = 2 R asin(sqrt(a))

Precision: every function computes in float64 internally (inputs are small: O(B + N) coordinates) and returns the
inputs' dtype (at least float32). Results are for use under ``torch.no_grad`` (the loss treats them as constants);
asin(sqrt(a)) has no finite derivative at d = 0 or at antipodes.
"""

from __future__ import annotations

import torch

from gazetteer.geo import EARTH_RADIUS_KM

__all__ = ["EARTH_RADIUS_KM", "great_circle_km", "haversine_km", "latlon_to_unit", "pairwise_haversine_km"]

# Row chunk of pairwise_haversine_km: bounds the float64 temporaries to ~32 MB whatever N is.
_CHUNK_ELEMENTS = 1 << 22


def _out_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _as_tensor(value, device=None) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value, dtype=torch.float64, device=device)


def latlon_to_unit(lat_deg, lon_deg) -> torch.Tensor:
    """Unit vectors of points on the sphere: lat, lon (...) degrees -> (..., 3).

    [cos(lat) cos(lon), cos(lat) sin(lon), sin(lat)], in the inputs' dtype (at least float32).
    """
    lat_deg, lon_deg = _as_tensor(lat_deg), _as_tensor(lon_deg)
    lat, lon = torch.deg2rad(lat_deg.double()), torch.deg2rad(lon_deg.double())
    cos_lat = torch.cos(lat)
    unit = torch.stack(torch.broadcast_tensors(cos_lat * torch.cos(lon), cos_lat * torch.sin(lon), torch.sin(lat)), -1)
    return unit.to(_out_dtype(lat_deg, lon_deg))


def haversine_km(lat1_deg, lon1_deg, lat2_deg, lon2_deg) -> torch.Tensor:
    """Great-circle distance in km, elementwise with broadcasting (OSV5M's haversine, R = 6371 km).

    Inputs: degrees, broadcast-compatible shapes; output: the broadcast shape, inputs' dtype (at least float32).
    a is clipped to [0, 1] (rounding can push it a hair above 1 at antipodes, where asin would give NaN).
    """
    tensors = [_as_tensor(v) for v in (lat1_deg, lon1_deg, lat2_deg, lon2_deg)]
    lat1, lon1, lat2, lon2 = (torch.deg2rad(t.double()) for t in tensors)
    a = torch.sin((lat2 - lat1) / 2.0).square()
    a = a + torch.cos(lat1) * torch.cos(lat2) * torch.sin((lon2 - lon1) / 2.0).square()
    return (2.0 * EARTH_RADIUS_KM * torch.asin(a.clamp(0.0, 1.0).sqrt())).to(_out_dtype(*tensors))


def great_circle_km(units_a: torch.Tensor, units_b: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    r"""Great-circle km between unit vectors: units_a (B, 3), units_b (N, 3) -> (B, N).

        a_ij = (1 - u_i . v_j) / 2  (= the haversine a),   d_ij = 2 R asin(sqrt(a_ij))

    a in the units' dtype (one matrix product, ``addmm``), the rest in ``dtype`` (default: the units'), in place.
    Precision is the caller's choice: float64 units make a exact to ~1e-16 (see `pairwise_haversine_km`); float32
    units lose a few km at very short range (1 - u.v cancels), which is immaterial for weights that vary on scales
    of tens of km (the training loss's hard-negative weights) and saves the float64 product.
    """
    half = units_a.new_full((), 0.5)
    half_chord_sq = torch.addmm(half, units_a, units_b.T, alpha=-0.5)  # (1 - u.v) / 2
    if dtype is not None:
        half_chord_sq = half_chord_sq.to(dtype)
    return half_chord_sq.clamp_(0.0, 1.0).sqrt_().asin_().mul_(2.0 * EARTH_RADIUS_KM)


def pairwise_haversine_km(lat_a_deg, lon_a_deg, lat_b_deg, lon_b_deg) -> torch.Tensor:
    r"""Great-circle distances between every point a (B,) and every point b (N,), in km: -> (B, N).

    Through unit vectors and one matrix product (no (B, N, 3) temporary):

        a_ij = ||u_i - v_j||^2 / 4 = (1 - u_i . v_j) / 2  (= the haversine a),   d_ij = 2 R asin(sqrt(a_ij))

    computed in float64 in row chunks (temporaries <= ~32 MB) and returned in the inputs' dtype (at least
    float32). Accuracy against the float64 haversine formula: 1 - u.v carries an absolute error of ~2e-16,
    which costs ~1e-8 km at d >= 1 km and at most 2R sqrt(2e-16) ~ 2e-4 km where the formula is least
    conditioned (d -> 0 and antipodes). A float32 result then adds its own rounding: relative 6e-8 (<= 1.2 m at
    20,000 km). (The same product in float32 would lose ~6 km at short range: 1 - u.v cancels.)
    """
    lat_a, lon_a, lat_b, lon_b = (_as_tensor(v) for v in (lat_a_deg, lon_a_deg, lat_b_deg, lon_b_deg))
    if lat_a.shape != lon_a.shape or lat_b.shape != lon_b.shape or lat_a.dim() != 1 or lat_b.dim() != 1:
        raise ValueError(
            f"expected lat/lon vectors a (B,), (B,) and b (N,), (N,), got {tuple(lat_a.shape)}, {tuple(lon_a.shape)}, "
            f"{tuple(lat_b.shape)}, {tuple(lon_b.shape)}"
        )
    dtype = _out_dtype(lat_a, lon_a, lat_b, lon_b)
    unit_a = latlon_to_unit(lat_a.double(), lon_a.double())  # (B, 3) float64
    unit_b = latlon_to_unit(lat_b.double(), lon_b.double())  # (N, 3) float64
    out = torch.empty(lat_a.shape[0], lat_b.shape[0], dtype=dtype, device=lat_a.device)
    rows = max(1, _CHUNK_ELEMENTS // max(1, lat_b.shape[0]))
    for start in range(0, lat_a.shape[0], rows):
        out[start : start + rows] = great_circle_km(unit_a[start : start + rows], unit_b)
    return out

