"""`EncodedImage`: image bytes held in memory give what the same file gives (pixels, GPS, errors, answers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hierloc.data.encoded import EncodedImage
from hierloc.data.exif import read_gps
from hierloc.data.images import Preprocessor, load_image
from hierloc.data.prediction import load_pixels
from hierloc.errors import InputError
from tests.helpers import make_bomb_png, make_text_as_jpeg, make_truncated_jpeg, write_gps_jpeg


def encoded(path: Path, name: str | None = None) -> EncodedImage:
    return EncodedImage(name or path.name, path.read_bytes())


def test_bytes_decode_to_the_same_pixels_as_the_file_draft_decoding_included(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "large.jpg"
    Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(path, quality=90)
    pre = Preprocessor(image_size=32, resize_size=36)
    from_file, error_file = load_pixels(pre, str(path))
    from_bytes, error_bytes = load_pixels(pre, encoded(path))
    assert error_file is None and error_bytes is None
    assert torch.equal(from_file, from_bytes)
    # the JPEG draft (reduced-scale decoding) applies to bytes too: the decoded size is below the full 640x480
    assert load_image(encoded(path), min_side=36).size == load_image(path, min_side=36).size != (640, 480)


def test_gps_is_read_from_bytes_as_from_the_file(tmp_path):
    path = write_gps_jpeg(tmp_path / "gps.jpg", {1: "N", 2: (48.0, 51.0, 24.0), 3: "E", 4: (2.0, 21.0, 0.0)})
    assert read_gps(encoded(path)) == read_gps(path) is not None
    assert read_gps(EncodedImage("junk.jpg", b"not an image")) is None


@pytest.mark.parametrize("maker, fragment", [(make_truncated_jpeg, "truncated or corrupt"),
                                             (make_text_as_jpeg, "not a recognised image file"),
                                             (make_bomb_png, "image too large")])
def test_bad_bytes_raise_the_files_error_under_the_given_name(tmp_path, maker, fragment):
    path = maker(tmp_path)
    with pytest.raises(InputError) as from_file:
        load_image(path)
    with pytest.raises(InputError) as from_bytes:
        load_image(encoded(path, "upload.bin"))
    assert fragment in str(from_bytes.value) and str(from_bytes.value).startswith("upload.bin: ")
    assert str(from_bytes.value).removeprefix("upload.bin: ") == str(from_file.value).removeprefix(f"{path}: ")


def test_empty_bytes_are_an_empty_file():
    with pytest.raises(InputError, match=r"^upload\.jpg: empty file \(0 bytes\)"):
        load_image(EncodedImage("upload.jpg", b""))


def test_repr_never_prints_the_bytes():
    assert repr(EncodedImage("a.jpg", b"\xff" * 1000)) == "EncodedImage(name='a.jpg', 1000 bytes)"


def test_predict_answers_bytes_like_their_files_and_names_them(tiny_model_dir, tiny_demo_dir, tmp_path):
    from hierloc.inference.predictor import HierLoc

    model = HierLoc.from_pretrained(tiny_model_dir, device="cpu")
    paths = sorted((tiny_demo_dir / "images" / "test_nearby").glob("*.jpg"))[:3]
    bad = make_truncated_jpeg(tmp_path)
    from_files = model.predict([str(p) for p in paths + [bad]], on_error="return")
    from_bytes = model.predict([encoded(p, f"upload-{i}.jpg") for i, p in enumerate(paths + [bad])],
                               on_error="return")
    for index, (a, b) in enumerate(zip(from_files, from_bytes)):
        a_dict, b_dict = a.to_dict(), b.to_dict()
        assert b_dict.pop("image") == f"upload-{index}.jpg"
        a_dict.pop("image")
        assert a_dict == b_dict
    single = model.predict(encoded(paths[0]))        # one EncodedImage, not in a list
    assert len(single) == 1 and single[0].image == paths[0].name
