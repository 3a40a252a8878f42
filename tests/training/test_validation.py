"""`hierloc train --val-csv` with a frozen backbone, end to end: the validation images are encoded once into their
own feature cache (<feature cache>/val), every epoch's validation and the calibration run the head on it, and the
model directory then calibrates, evaluates, predicts and serves."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from hierloc.cli import main
from hierloc.device import Runtime
from hierloc.inference.predictor import HierLoc
from hierloc.model import encoders, modeldir
from hierloc.training.features import FeatureCache
from tests.helpers import TINY_OVERRIDES

pytestmark = pytest.mark.integration   # trains


def frozen_overrides(backbone: Path) -> list[str]:
    """A frozen local backbone (random weights: no download) and a tiny head."""
    return [f"model.backbone={backbone}", *TINY_OVERRIDES, "model.pretrained=false", "model.freeze_backbone=true"]


def summary_of_last_epoch(caplog) -> dict:
    """The metrics of the last "epoch N validation: k=v, ..." log line."""
    line = [r.getMessage() for r in caplog.records if " validation: " in r.getMessage()][-1]
    return {k: float(v) for k, v in (item.split("=") for item in line.split(" validation: ")[1].split(", "))}


def test_frozen_run_encodes_validation_once_then_calibrates_evaluates_predicts_and_serves(
        tiny_demo_dir, tiny_backbone_dir, tmp_path, monkeypatch, capsys, caplog):
    encoded = []
    forward = encoders.ImageEncoder.forward

    def counting(self, pixel_values):
        encoded.append(int(pixel_values.shape[0]))
        return forward(self, pixel_values)

    monkeypatch.setattr(encoders.ImageEncoder, "forward", counting)
    out = tmp_path / "model"
    val_csv = tiny_demo_dir / "val.csv"
    with caplog.at_level(logging.INFO, logger="hierloc.training.train"):
        assert main(["-q", "train", "--csv", str(tiny_demo_dir / "train.csv"), "--val-csv", str(val_csv),
                     "--out", str(out), "--no-progress", *frozen_overrides(tiny_backbone_dir),
                     "train.epochs=2", "train.batch_size=48"]) == 0
    summary = json.loads((out / modeldir.TRAIN_SUMMARY_NAME).read_text())
    assert summary["epochs"] == 2
    validated = [r.getMessage() for r in caplog.records if " validation: " in r.getMessage()]
    assert [m.split(" validation")[0] for m in validated] == ["epoch 1", "epoch 2"]
    assert any(r.getMessage().startswith("the saved model (prototypes placed) on the validation CSV: ")
               for r in caplog.records)
    # the backbone saw each training and each validation image exactly once: the extraction; the validation of
    # both epochs and the calibration ran on the cached features
    assert sum(encoded) == summary["n_train"] + 20
    val_cache = FeatureCache.open(out / "feature_cache" / "val")
    assert len(val_cache) == 20 and val_cache.n_failed == 0
    assert summary["validation"]["n"] == 20 and summary["validation"]["n_failed"] == 0
    # the summary's metrics are those of the model directory as written (prototypes placed after the last epoch)
    saved = HierLoc.from_pretrained(out, device="cpu", calibrated=False)
    again = HierLoc.validation_metrics(str(val_csv), saved.cfg, saved.model, saved.loss_state, saved.encoder,
                                       saved.gazetteer, Runtime(torch.device("cpu")), val_cache)
    assert again.keys() == summary["validation"].keys()
    assert [k for k, v in again.items() if not (v == summary["validation"][k] or (math.isnan(v) and
                                                math.isnan(summary["validation"][k])))] == []
    assert again["geoscore"] != summary_of_last_epoch(caplog)["geoscore"]    # the prototypes did move entities
    fitted = modeldir.read_calibration(out)
    assert fitted.fitted_on == "val.csv" and fitted.n == 20 and summary["calibration"]["temperatures"] == \
        fitted.temperatures
    monkeypatch.setattr(encoders.ImageEncoder, "forward", forward)
    capsys.readouterr()

    # `hierloc calibrate` on the images gives the temperatures training fitted on the cached (float16) features
    assert main(["-q", "calibrate", "--model", str(out), "--csv", str(val_csv), "--temperatures-only",
                 "--workers", "0", "--no-progress"]) == 0
    refitted = modeldir.read_calibration(out)
    assert refitted.n == 20
    assert refitted.temperatures == pytest.approx(fitted.temperatures, rel=0.02)

    capsys.readouterr()
    assert main(["-q", "eval", str(tiny_demo_dir / "test_unseen.csv"), "--model", str(out), "--workers", "0",
                 "--no-progress", "--format", "json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["n"] == 40 and evaluated["n_failed"] == 0
    assert evaluated["calibration"]["fitted_on"] == "val.csv"

    image = sorted((tiny_demo_dir / "images" / "test_unseen").glob("*.jpg"))[0]
    assert main(["predict", str(image), "--model", str(out), "--workers", "0", "--no-progress",
                 "--format", "json"]) == 0
    predicted = json.loads(capsys.readouterr().out)
    [prediction] = predicted["predictions"]
    assert prediction["status"] == "ok"

    pytest.importorskip("starlette", reason="starlette is not installed")
    pytest.importorskip("python_multipart", reason="python-multipart is not installed")
    pytest.importorskip("httpx", reason="httpx (Starlette's test client) is not installed")
    from starlette.testclient import TestClient

    from hierloc.serve.app import create_app

    with TestClient(create_app(HierLoc.from_pretrained(out, device="cpu"), out),
                    raise_server_exceptions=False) as client:
        response = client.post("/predict", files=[("file", (image.name, image.read_bytes(), "image/jpeg"))])
    assert response.status_code == 200, response.text
    served = response.json()
    assert served["model"] == predicted["model"]
    prediction["image"] = image.name       # the server names an image by its upload's file name
    assert served["predictions"] == [prediction]
