"""A damaged file in a model directory -> `hierloc predict` exits 2 with one line naming the file: never a
traceback, never an internal error, never an answer from damaged parts (nor an uncalibrated one when
calibration.json is there but unreadable)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hierloc.cli import main
from hierloc.model import modeldir

pytestmark = pytest.mark.integration


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xffnot json at all")


def _flip(offset_of):
    """XOR one byte at offset_of(data) (same size)."""
    def damage(path: Path) -> None:
        data = bytearray(path.read_bytes())
        offset = offset_of(data)
        data[offset] ^= 0x20
        path.write_bytes(bytes(data))
    return damage


def _header_offset(data: bytes) -> int:
    """A byte in the middle of a safetensors file's JSON header."""
    return 8 + int.from_bytes(data[:8], "little") // 2


def _edit_json(edit):
    def damage(path: Path) -> None:
        content = json.loads(path.read_text(encoding="utf-8"))
        edit(content)
        path.write_text(json.dumps(content), encoding="utf-8")
    return damage


def _set(key, value):
    return _edit_json(lambda content: content.__setitem__(key, value))


def _first_concept(key, value):
    return _edit_json(lambda content: content["concepts"][0].__setitem__(key, value))


def _drop_last_concept(content):
    content["concepts"].pop()


def _replace_by_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


FLIP_DATA = _flip(lambda data: len(data) * 3 // 4)
FLIP_HEADER = _flip(_header_offset)

# (file, damage name) -> (damage, a fragment the message must contain besides the file's path)
CASES = {
    ("config.json", "truncated"): (_truncate, "not valid JSON"),
    ("config.json", "empty"): (_empty, "not valid JSON"),
    ("config.json", "garbage"): (_garbage, "not valid JSON"),
    ("config.json", "feature_dim text"): (_set("feature_dim", "wide"), "feature_dim"),
    ("config.json", "config a list"): (_set("config", [1, 2]), "config"),
    ("config.json", "n_concepts text"): (_set("n_concepts", "many"), "n_concepts"),
    ("config.json", "gazetteer_dir a number"): (_set("gazetteer_dir", 5), "gazetteer_dir"),
    ("concepts.json", "truncated"): (_truncate, "not valid JSON"),
    ("concepts.json", "garbage"): (_garbage, "not valid JSON"),
    ("concepts.json", "concepts a string"): (_set("concepts", "x"), "'concepts' list"),
    ("concepts.json", "name a number"): (_first_concept("name", 5), "concepts[0]"),
    ("concepts.json", "one concept fewer"): (_edit_json(_drop_last_concept), "concepts"),
    ("model.safetensors", "truncated"): (_truncate, "truncated"),
    ("model.safetensors", "header byte flipped"): (FLIP_HEADER, "model.safetensors"),
    ("model.safetensors", "data byte flipped"): (FLIP_DATA, "checksum"),
    ("backbone/model.safetensors", "truncated"): (_truncate, "model.safetensors"),
    ("backbone/model.safetensors", "data byte flipped"): (FLIP_DATA, "model.safetensors"),
    ("backbone/config.json", "truncated"): (_truncate, "config.json"),
    ("calibration.json", "truncated"): (_truncate, "not valid JSON"),
    ("calibration.json", "empty"): (_empty, "not valid JSON"),
    ("calibration.json", "a directory"): (_replace_by_directory, "calibration"),
}


def _calibrate(model: Path) -> None:
    """A valid calibration.json for the directory's weights (temperatures 2: visibly not T = 1)."""
    modeldir.write_calibration(model, modeldir.Calibration(temperatures=[2.0] * 4,
                                                           weights_sha256=modeldir.weights_digest(model)))


@pytest.mark.parametrize("calibrated", [True, False], ids=["calibrated", "uncalibrated"])
@pytest.mark.parametrize("name, damage", list(CASES), ids=[f"{n}-{d}".replace(" ", "_") for n, d in CASES])
def test_a_damaged_model_file_is_a_one_line_error_naming_it(name, damage, calibrated, tiny_model_dir,
                                                             tiny_demo_dir, tmp_path, capsys):
    if name == "calibration.json" and not calibrated:
        pytest.skip("the calibration cases need a calibration.json")
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / modeldir.CALIBRATION_NAME).unlink(missing_ok=True)
    if calibrated:
        _calibrate(model)
    make, fragment = CASES[(name, damage)]
    make(model / name)
    image = sorted((tiny_demo_dir / "images").rglob("*.jpg"))[0]
    capsys.readouterr()
    code = main(["predict", str(image), "--model", str(model), "--workers", "0", "--no-progress"])
    captured = capsys.readouterr()
    err = captured.err.strip()
    context = f"{name} / {damage}: exit {code}\n{captured.err}"
    assert code == 2, context
    assert len(err.splitlines()) == 1 and err.startswith("hierloc: error:"), context
    assert "Traceback" not in captured.err and "internal error" not in err, context
    assert str(model / name) in err or (str(model) in err and Path(name).name in err), context
    assert fragment in err, context
    assert captured.out == "", context                  # no answer at all


def test_the_backbone_weights_carry_a_digest_of_their_tensors_and_keep_transformers_metadata(tiny_model_dir):
    from safetensors import safe_open

    path = tiny_model_dir / "backbone" / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    assert metadata["format"] == "pt"                 # what transformers needs to read it
    assert metadata[modeldir.CHECKSUM_KEY] == modeldir.tensors_digest(tensors)
    modeldir.verify_tensors_file(path)                # the intact file passes


def test_calibrate_replaces_a_damaged_calibration_file_as_its_message_says(tiny_model_dir, tiny_demo_dir, tmp_path,
                                                                          capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / modeldir.CALIBRATION_NAME).write_text('{"temperatures": [1, -1, 1, 1]}')
    code = main(["-q", "calibrate", "--model", str(model), "--csv", str(tiny_demo_dir / "test_nearby.csv"),
                 "--workers", "0", "--no-progress", "--temperatures-only"])
    assert code == 0, capsys.readouterr().err
    fitted = modeldir.read_calibration(model)         # a valid file now, tied to these weights
    assert all(t > 0 for t in fitted.temperatures) and fitted.weights_sha256 == modeldir.weights_digest(model)
