"""The Hub, offline: `from_pretrained` with a hub id (from a pre-populated Hugging Face cache), a model directory
written by `save_pretrained` read elsewhere, and the default backbone (DINOv2-small by hub id) failing fast with
a one-line message when it is not cached."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hierloc.cli import main
from hierloc.config import Config, load_config
from hierloc.errors import InputError
from hierloc.inference.predictor import HierLoc

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(cache: Path, repo_id: str, model_dir: Path) -> Path:
    """Lay `model_dir` out as the Hugging Face hub cache does: models--owner--name/refs/main holds the commit,
    snapshots/<commit>/ the files (the cache's blobs/ is an implementation detail snapshots may link into)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(model_dir, repo / "snapshots" / COMMIT)
    return repo / "snapshots" / COMMIT


@pytest.fixture(scope="module")
def images(tiny_demo_dir) -> list[str]:
    return [str(p) for p in sorted((tiny_demo_dir / "images" / "test_nearby").glob("*.jpg"))[:4]]


def _answers(model: HierLoc, images: list[str]) -> list:
    return [[(lv.entity_id, round(lv.probability, 6)) for lv in p.levels] for p in model.predict(images, top_k=2)]


def test_save_pretrained_is_read_on_another_machine(tiny_model_dir, images, tmp_path):
    """Written, moved elsewhere (the source gone), read back: the same answers. Nothing in it points back."""
    original = HierLoc.from_pretrained(tiny_model_dir, device="cpu")
    exported = original.save_pretrained(tmp_path / "exported")
    moved = tmp_path / "elsewhere" / "model"
    moved.parent.mkdir()
    shutil.move(str(exported), moved)
    text = "".join(p.read_text(errors="ignore") for p in moved.rglob("*.json"))
    assert str(exported) not in text                                        # no path of the writing machine
    assert _answers(HierLoc.from_pretrained(moved, device="cpu"), images) == _answers(original, images)


def test_from_pretrained_takes_a_hub_id_from_the_local_cache(tiny_model_dir, images, tmp_path, monkeypatch):
    exported = HierLoc.from_pretrained(tiny_model_dir, device="cpu").save_pretrained(tmp_path / "exported")
    cache = tmp_path / "hf-cache"
    fake_hub_cache(cache, "hierloc-tests/tiny-demo", exported)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)                                               # no local directory of that name
    model = HierLoc.from_pretrained("hierloc-tests/tiny-demo", device="cpu")
    assert _answers(model, images) == _answers(HierLoc.from_pretrained(exported, device="cpu"), images)


def test_cli_predict_takes_a_hub_id(tiny_model_dir, images, tmp_path, monkeypatch, capsys):
    exported = HierLoc.from_pretrained(tiny_model_dir, device="cpu").save_pretrained(tmp_path / "exported")
    cache = tmp_path / "hf-cache"
    fake_hub_cache(cache, "hierloc-tests/tiny-demo", exported)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert main(["predict", images[0], "--model", "hierloc-tests/tiny-demo", "--format", "json",
                 "--no-progress", "--workers", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["n_predicted"] == 1


def test_an_uncached_hub_id_is_one_line_and_downloads_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as error:
        HierLoc.from_pretrained("hierloc-tests/not-cached", device="cpu")
    message = str(error.value)
    assert "not-cached" in message and "--allow-download" in message and "\n" not in message
    assert not (tmp_path / "empty-cache").exists() or not any((tmp_path / "empty-cache").rglob("*.json"))


def test_a_missing_local_directory_is_still_named_as_such(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="model directory not found"):
        HierLoc.from_pretrained(tmp_path / "runs" / "nothing-here", device="cpu")


def test_the_default_backbone_is_dinov2_small_frozen():
    cfg = Config()
    assert (cfg.model.backbone, cfg.model.pretrained, cfg.model.freeze_backbone) == \
        ("facebook/dinov2-small", True, True)
    scratch = load_config(None, ["model.backbone=tiny-resnet"]).model      # built-ins train from scratch
    assert (scratch.pretrained, scratch.freeze_backbone) == (False, False)
    explicit = load_config(None, ["model.backbone=tiny-resnet", "model.freeze_backbone=true"]).model
    assert explicit.freeze_backbone is True                                  # explicit settings win


def test_default_backbone_offline_and_uncached_fails_first_in_one_line(tiny_demo_dir, tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    code = main(["train", "--csv", str(tiny_demo_dir / "train.csv"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "facebook/dinov2-small" in err and "--allow-download" in err
    assert "tiny-resnet" in err and "tiny-vit" in err
    assert not out.exists()
