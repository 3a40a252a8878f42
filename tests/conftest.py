"""Shared fixtures: real reference data, a small restricted gazetteer built once per session, its saved copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# Small but varied: KI and NZ straddle the antimeridian, ME/WS lack some admin1, LU/ME lack some admin2.
SMALL_WITHIN = "FJ,KI,LU,ME,NZ,WS"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """../shared/data beside the repository (absent in a user's clone: tests using it skip)."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"reference data folder {path} is absent")
    return path


@pytest.fixture(scope="session")
def small_gazetteer():
    """A global-type gazetteer restricted to a few countries (built once per session, a few seconds)."""
    from gazetteer import Gazetteer

    return Gazetteer.build_global(within=SMALL_WITHIN, progress=False)


@pytest.fixture(scope="session")
def small_gazetteer_dir(small_gazetteer, tmp_path_factory) -> Path:
    """`small_gazetteer` saved to a session temp dir (treat as read-only)."""
    directory = tmp_path_factory.mktemp("gazetteer") / "small"
    small_gazetteer.save(directory)
    return directory


def sphere_points(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n points uniform on the sphere: (lat_deg, lon_deg), each (n,)."""
    rng = np.random.default_rng(seed)
    return np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n))), rng.uniform(-180.0, 180.0, n)


@pytest.fixture
def random_sphere_points():
    """Factory fixture: random_sphere_points(n, seed=0) -> (lat_deg, lon_deg) uniform on the sphere."""
    return sphere_points
