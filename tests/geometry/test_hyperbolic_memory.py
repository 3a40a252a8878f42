"""hierloc.geometry.hyperbolic at the scale of a global gazetteer: the pairwise distance never builds a (B, N, D)
tensor (the accuracy and gradient tests are in tests/unit/test_hyperbolic.py)."""

from __future__ import annotations

import resource

import torch

from hierloc.geometry import hyperbolic
from tests.helpers import ball_points


def test_large_entity_table_never_materialises_a_broadcast_tensor():
    # A (B, N, D) float32 temporary would take 64 * 200_000 * 128 * 4 bytes = 6.5 GB; the matrix form needs ~0.2 GB.
    x = ball_points(64, 128, torch.float32, 1.0)
    y = ball_points(200_000, 128, torch.float32, 1.0)
    out = hyperbolic.pairwise_sqdist(x, y)
    assert out.shape == (64, 200_000)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    assert peak_gb < 4.0
