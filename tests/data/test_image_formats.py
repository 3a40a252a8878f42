"""HEIC / HEIF (iPhone photos, with their EXIF GPS) and AVIF in every command that reads images: pixels, EXIF,
directory expansion, `hierloc predict` end to end. Files are written in the test with pillow-heif and Pillow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from PIL import Image, features

from hierloc.data.exif import read_gps
from hierloc.data.images import load_image
from hierloc.data.prediction import expand_inputs
from tests.helpers import GPS_IFD
MILAN = {1: "N", 2: (45.0, 27.0, 51.0), 3: "E", 4: (9.0, 11.0, 25.0)}       # 45.4642 N, 9.1903 E
MILAN_DEG = (45 + 27 / 60 + 51 / 3600, 9 + 11 / 60 + 25 / 3600)


def pattern(size=(48, 32)) -> Image.Image:
    """A smooth colour ramp: survives lossy codecs well enough to compare pixel means."""
    y, x = np.mgrid[0:size[1], 0:size[0]]
    rgb = np.stack([x * 255 // size[0], y * 255 // size[1], np.full_like(x, 90)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def write_heic(path: Path, gps_tags: dict | None = None, size=(48, 32)) -> Path:
    """Encoded with pillow-heif directly: Pillow's HEIF opener is not registered by writing the file, so a test
    reading it in a fresh process shows that hierloc registers it itself."""
    exif = Image.Exif()
    if gps_tags:
        exif[GPS_IFD] = gps_tags
    pillow_heif.from_pillow(pattern(size)).save(path, quality=95, exif=exif.tobytes())
    return path


def test_heic_pixels_load_like_the_source_image(tmp_path):
    path = write_heic(tmp_path / "photo.heic")
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (48, 32)
    difference = np.abs(np.asarray(image, dtype=np.float64) - np.asarray(pattern(), dtype=np.float64))
    assert difference.mean() < 8.0                                   # lossy, but the same picture


def test_heic_exif_gps_is_read(tmp_path):
    gps = read_gps(write_heic(tmp_path / "IMG_0001.HEIC", MILAN))
    assert gps is not None
    assert (gps.lat_deg, gps.lon_deg) == pytest.approx(MILAN_DEG, abs=1e-9)
    assert read_gps(write_heic(tmp_path / "no_gps.heic")) is None


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow is built without AVIF (libavif)")
def test_avif_pixels_load(tmp_path):
    path = tmp_path / "photo.avif"
    pattern().save(path, format="AVIF", quality=95)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (48, 32)


def test_directories_include_heic_heif_and_avif_files(tmp_path):
    for name in ("a.jpg", "b.HEIC", "c.heif", "d.avif", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    found = [Path(p).name for p in expand_inputs([tmp_path])]
    assert found == ["a.jpg", "b.HEIC", "c.heif", "d.avif"]


def test_predict_answers_a_heic_photo_and_compares_its_gps_in_a_fresh_process(tiny_model_dir, tmp_path):
    path = write_heic(tmp_path / "IMG_0002.heic", MILAN, size=(64, 64))
    result = subprocess.run([sys.executable, "-m", "hierloc", "predict", "--no-progress", "--model",
                             str(tiny_model_dir), "--workers", "0", "--format", "json", str(path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)["predictions"][0]
    assert record["status"] == "ok", record
    assert (record["exif"]["lat_deg"], record["exif"]["lon_deg"]) == pytest.approx(MILAN_DEG, abs=1e-9)
