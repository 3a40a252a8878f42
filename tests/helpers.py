"""Helpers shared by test modules in more than one folder (fixtures stay in conftest.py, which imports from here).

Test modules import these (`from tests.helpers import ...`) instead of importing each other. conftest.py imports
this module for every test, the gazetteer's included, so torch, Pillow and hierloc are imported inside the functions
that need them, never at the top.

- paths: REPO (the repository), SHARED_DATA (reference data beside the repository; absent in a user's clone);
- the tiny world: SMALL_WITHIN (the countries of the small gazetteer), TINY_OVERRIDES (a tiny model's config),
  TINY_MODEL_OVERRIDES (the same, trained for 6 steps, as the tiny_model_dir fixture trains it);
- points: sphere_points (uniform on the sphere), random_directions and ball_points (in the Poincare ball);
- image files: noise_image, write_gps_jpeg, make_truncated_jpeg, make_text_as_jpeg, make_bomb_png;
- checks: assert_same_result (a fast search's result against the dense reference's, ties allowed);
- state: restored_log_levels (the project's logger levels put back after a block that changes them);
- training: tiny_cached_feature_module (a 61-entity model on cached features and a batch maker);
- serving: wait_for_health (a `hierloc serve` subprocess's first /health answer).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import struct
import zlib
from pathlib import Path

import numpy as np

# ------------------------------------------------------------------------------------------------------ paths
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# ------------------------------------------------------------------------------------------------ tiny world
# Small but varied: KI and NZ straddle the antimeridian, ME/WS lack some admin1, LU/ME lack some admin2.
SMALL_WITHIN = "FJ,KI,LU,ME,NZ,WS"

TINY_OVERRIDES = [
    "model.pretrained=false", "model.image_size=32", "model.embed_dim=16", "model.head_hidden=32", "model.entity_hidden=32",
    "model.coord_scales=4", "train.batch_size=16", "train.epochs=1", "train.num_workers=0", "train.log_every=1",
]
TINY_MODEL_OVERRIDES = [*TINY_OVERRIDES, "train.max_steps=6"]


# ----------------------------------------------------------------------------------------------------- points
def sphere_points(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n points uniform on the sphere: (lat_deg, lon_deg), each (n,)."""
    rng = np.random.default_rng(seed)
    return np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n))), rng.uniform(-180.0, 180.0, n)


def random_directions(n: int, dim: int, dtype):
    """n random unit vectors in R^dim (torch's global generator), as a (n, dim) tensor of `dtype`."""
    import torch

    v = torch.randn(n, dim, dtype=torch.float64)
    return (v / v.norm(dim=-1, keepdim=True)).to(dtype)


def ball_points(n: int, dim: int, dtype, c: float, max_radius: float | None = None):
    """n points of the Poincare ball of curvature -c with random directions and radii uniform in [0, max_radius)
    (default: the projection margin)."""
    import torch

    from hierloc.geometry import hyperbolic

    max_radius = (1.0 - hyperbolic.ball_eps(dtype)) if max_radius is None else max_radius
    radii = torch.rand(n, 1, dtype=torch.float64) * max_radius
    return (random_directions(n, dim, torch.float64) * radii / math.sqrt(c)).to(dtype)


# ------------------------------------------------------------------------------------------------ image files
GPS_IFD = 0x8825  # the EXIF tag of the GPSInfo IFD


def noise_image(size=(48, 32), seed=0, mode="RGB"):
    """A PIL image of uniform noise, `size` = (width, height), mode RGB or RGBA."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8), mode)


def write_gps_jpeg(path: Path, gps_tags: dict, size=(40, 30), colour=(10, 120, 200)) -> Path:
    """A small JPEG whose EXIF carries the given GPSInfo IFD tags (1..6, 9 as in the EXIF standard)."""
    from PIL import Image

    exif = Image.Exif()
    exif[GPS_IFD] = gps_tags
    Image.new("RGB", size, colour).save(path, exif=exif.tobytes())
    return path


def make_truncated_jpeg(d: Path) -> Path:
    """d/cut.jpg: the first half of a JPEG's bytes."""
    buffer = io.BytesIO()
    noise_image((64, 64)).save(buffer, format="JPEG", quality=90)
    (d / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return d / "cut.jpg"


def make_text_as_jpeg(d: Path) -> Path:
    """d/notes.jpg: a text file named like a photo."""
    (d / "notes.jpg").write_text("this is a text file, not a photo\n", encoding="utf-8")
    return d / "notes.jpg"


BOMB_SIDE = 100_000  # a 100000 x 100000 RGB PNG: 10^10 pixels, 30 GB decoded, from a 69-byte file


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def make_bomb_png(d: Path) -> Path:
    """d/bomb.png: a decompression bomb (BOMB_SIDE x BOMB_SIDE RGB declared in a 69-byte file)."""
    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 8, 2, 0, 0, 0)  # width, height, 8-bit, RGB
    data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))
    (d / "bomb.png").write_bytes(data)
    return d / "bomb.png"


# ----------------------------------------------------------------------------------------------------- checks
def assert_same_result(fast, dense, atol=1e-5):
    """Same shapes, scores and probabilities within atol, identical paths.

    Paths are compared up to the order of (near-)tied scores: inside a run of consecutive scores closer than
    atol both implementations must hold the same set of paths (float32 sums of log-probabilities do tie
    exactly now and then, and torch.topk orders ties arbitrarily)."""
    import torch

    assert fast.paths.shape == dense.paths.shape and fast.scores.shape == dense.scores.shape
    assert torch.equal(torch.isinf(fast.scores), torch.isinf(dense.scores))
    finite = torch.isfinite(dense.scores)
    torch.testing.assert_close(fast.scores[finite], dense.scores[finite], atol=atol, rtol=1e-6)
    assert (fast.paths[~finite] == -1).all() and (fast.level_probs[~finite] == 0).all()
    if torch.equal(fast.paths, dense.paths):  # the usual case: no ties to sort out
        torch.testing.assert_close(fast.level_probs, dense.level_probs, atol=atol, rtol=0)
        return
    scores = dense.scores.numpy()
    for row in range(scores.shape[0]):
        start = 0
        while start < scores.shape[1]:
            stop = start + 1
            while (stop < scores.shape[1] and math.isfinite(scores[row, stop])
                   and abs(scores[row, stop] - scores[row, stop - 1]) < atol):
                stop += 1
            key = lambda r: sorted(map(tuple, r.paths[row, start:stop].tolist()))  # noqa: E731
            assert key(fast) == key(dense), f"row {row}, paths {start}..{stop - 1}"
            for k in range(start, stop):
                match = (dense.paths[row, start:stop] == fast.paths[row, k]).all(-1).nonzero()[0, 0] + start
                torch.testing.assert_close(fast.level_probs[row, k], dense.level_probs[row, match], atol=atol, rtol=0)
            start = stop


# ------------------------------------------------------------------------------------------------------ state
@contextlib.contextmanager
def restored_log_levels(names=("hierloc", "gazetteer")):
    """Put the levels of the named loggers back after the block (e.g. a runtime of rank > 0 raises them)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# --------------------------------------------------------------------------------------------------- training
def tiny_cached_feature_module(blocked: bool):
    """A 4-level model of 61 entities (3 / 6 / 12 / 40, random tree and coordinates) on 12-dim cached features,
    dropout off, learned lambda and sigma, in a TrainModule with the reference or the blocked loss
    -> (cfg, module, batch): batch() draws (features (16, 12), lat (16,), lon (16,), targets (16, 4)) at random
    cities (3 rows without a city) from its own generator (seed 1)."""
    import torch

    from hierloc.config import Config
    from hierloc.model.network import EntityTable, HierLocModel
    from hierloc.training.losses import GWHInfoNCE
    from hierloc.training.module import TrainModule

    rng = np.random.default_rng(0)
    offsets = np.array([0, 3, 9, 21, 61])
    parents = np.concatenate([[-1] * 3, rng.integers(0, 3, 6), 3 + rng.integers(0, 6, 12), 9 + rng.integers(0, 12, 40)])
    table = EntityTable(offsets, parents, rng.uniform(-60, 60, 61), rng.uniform(-180, 180, 61))
    cfg = Config()
    cfg.model.embed_dim, cfg.model.head_hidden, cfg.model.entity_hidden, cfg.model.dropout = 8, 32, 16, 0.0
    cfg.loss.learn_weights = True
    torch.manual_seed(0)
    model = HierLocModel(cfg.model, table, feature_dim=12, entity_features=torch.randn(61, 12))
    module = TrainModule(model, GWHInfoNCE(cfg.loss), blocked=blocked)
    gen = torch.Generator().manual_seed(1)

    def batch():
        city = torch.randint(21, 61, (16,), generator=gen)
        path = [city]
        for _level in range(3):
            path.append(torch.as_tensor(parents)[path[-1]])
        targets = torch.stack(path[::-1], dim=1)
        targets[:3, 3] = -1
        lat = torch.as_tensor(table.lat_deg, dtype=torch.float32)[city] + torch.randn(16, generator=gen)
        lon = torch.as_tensor(table.lon_deg, dtype=torch.float32)[city] + torch.randn(16, generator=gen)
        return torch.randn(16, 12, generator=gen), lat, lon, targets

    return cfg, module, batch


# ---------------------------------------------------------------------------------------------------- serving
def wait_for_health(process, port: int, timeout_s: float = 120.0) -> dict:
    """Poll GET /health of a `hierloc serve` subprocess on 127.0.0.1:port until it answers -> its JSON body;
    fails if the process exits or nothing answers within timeout_s."""
    import http.client
    import json
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, process.stderr.read()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            body = json.loads(conn.getresponse().read())
            conn.close()
            return body
        except OSError:
            assert time.monotonic() < deadline, f"hierloc serve did not answer in {timeout_s:.0f} s"
            time.sleep(0.2)

