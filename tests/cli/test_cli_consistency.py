"""One CLI: the same names, defaults and conventions on every command (global flags, progress, bad rows, top-k,
--out -, the model's beam), `hierloc config`, `locate` on points, `explain` on predict's inputs, and the train
command's order of work (validate, then create --out, locked against a second run)."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import pytest

from gazetteer import Gazetteer
from hierloc.cli import build_parser, main, parse_args
from hierloc.config import Config, load_config
from hierloc.inference import explain as X
from hierloc.inference.predictor import HierLoc
from hierloc.serve.app import EXPLAIN_DEFAULTS, PREDICT_DEFAULTS
from hierloc.training import checkpoint as ckpt
from hierloc.version import __version__
from tests.helpers import TINY_OVERRIDES


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


# ----------------------------------------------------------------------------------------------- the parser
def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"hierloc {__version__}"


@pytest.mark.parametrize("where", ["before", "after"])
def test_global_flags_before_or_after_the_command(where):
    flags = ["-q", "--debug"]
    argv = flags + ["config"] if where == "before" else ["config"] + flags
    args = parse_args(argv)
    assert args.quiet and args.debug and not args.verbose


def test_quiet_silences_progress_bars():
    assert parse_args(["predict", "x.jpg", "--model", "m", "-q"]).no_progress is True
    assert parse_args(["predict", "x.jpg", "--model", "m"]).no_progress is False


def test_every_command_with_a_progress_bar_has_no_progress():
    with_bars = {"build-gazetteer", "locate", "demo-data", "train", "predict", "eval"}
    for name in with_bars:
        assert "--no-progress" in _commands()[name]._option_string_actions, name


def test_bad_rows_are_one_option_everywhere():
    for name, command in _commands().items():
        options = command._option_string_actions
        assert "--skip-bad" not in options, name
        if "--on-bad" in options:
            assert options["--on-bad"].choices in (("error", "skip"), ["error", "skip"]), name
    assert {"build-gazetteer", "locate", "eval", "train"} <= {n for n, c in _commands().items()
                                                      if "--on-bad" in c._option_string_actions}


def test_one_top_k_default():
    """Every command that keeps alternatives defaults --top-k to the model's inference.top_k (None here, resolved
    once by `HierLoc.search_options`), as serve's options do."""
    defaults = {name: c._option_string_actions["--top-k"].default for name, c in _commands().items()
                if "--top-k" in c._option_string_actions}
    assert set(defaults) >= {"predict", "explain"}
    assert set(defaults.values()) == {None}
    assert PREDICT_DEFAULTS["top_k"] is EXPLAIN_DEFAULTS["top_k"] is None


def test_beam_defaults_to_the_model():
    for name in ("predict", "eval", "explain"):
        assert _commands()[name]._option_string_actions["--beam"].default is None, name


def test_help_texts_have_no_default_none(capsys):
    for name, command in _commands().items():
        text = command.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, name
    assert "(default: city)" in _commands()["predict"].format_help()  # real defaults are still shown


# ----------------------------------------------------------------------------------------------- config
def test_config_prints_the_full_default_config_as_loadable_toml(capsys, tmp_path):
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert load_config(path) == Config()
    for section in ("[model]", "[loss]", "[train]", "[inference]"):
        assert section in text
    assert main(["config", "loss.tau=0.3", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"]["tau"] == 0.3


def test_config_error_is_one_line(capsys):
    assert main(["config", "loss.tauu=0.3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean loss.tau" in err


# ----------------------------------------------------------------------------------------------- locate
@pytest.mark.integration
def test_locate_points_on_the_command_line_match_the_csv_route(small_gazetteer_dir, tmp_path, capsys):
    gaz = Gazetteer.load(small_gazetteer_dir)
    inside = gaz.lat_deg[gaz.level_offsets[3]], gaz.lon_deg[gaz.level_offsets[3]]  # a city of the gazetteer
    points = [f"{inside[0]:.4f},{inside[1]:.4f}", "0.5,-30.25"]
    assert main(["locate", "--gazetteer", str(small_gazetteer_dir), "--", *points]) == 0
    printed = capsys.readouterr().out.splitlines()
    csv_in = tmp_path / "in.csv"
    csv_in.write_text("lat,lon\n" + "\n".join(points) + "\n")
    assert main(["locate", "--gazetteer", str(small_gazetteer_dir), "--csv", str(csv_in), "--out",
                 str(tmp_path / "out.csv"), "--no-progress"]) == 0
    assert printed == (tmp_path / "out.csv").read_text().splitlines()
    assert printed[1].split(",")[2] != ""                                    # the city point has a country


def test_locate_bad_point_is_one_line_before_loading(tmp_path, capsys):
    assert main(["locate", "--gazetteer", str(tmp_path / "missing"), "91,0"]) == 2
    err = capsys.readouterr().err
    assert "point '91,0'" in err and err.count("\n") == 1
    assert main(["locate", "--gazetteer", str(tmp_path), "1,2", "--csv", "x.csv"]) == 2
    assert "not both" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- predict / eval
@pytest.fixture(scope="module")
def beam_one_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with inference.beam = 1 saved in its config."""
    out = tmp_path_factory.mktemp("beam1") / "model"
    shutil.copytree(tiny_model_dir, out)
    meta = json.loads((out / "config.json").read_text())
    meta["config"]["inference"]["beam"] = 1
    (out / "config.json").write_text(json.dumps(meta))
    return out


def test_predict_uses_the_models_beam_unless_told(beam_one_model, tiny_demo_dir, capsys):
    image = sorted((tiny_demo_dir / "images" / "test_nearby").glob("*.jpg"))[0]
    base = ["predict", str(image), "--model", str(beam_one_model), "--format", "json", "--no-progress",
            "--workers", "0"]
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out)["model"]["search"]["beam"] == 1
    assert main(base + ["--beam", "4", "--out", "-"]) == 0                   # --out -: standard output
    assert json.loads(capsys.readouterr().out)["model"]["search"]["beam"] == 4


def test_eval_uses_the_models_beam_and_on_bad(beam_one_model, tiny_demo_dir, capsys):
    csv_path = tiny_demo_dir / "test_nearby.csv"
    assert main(["eval", str(csv_path), "--model", str(beam_one_model), "--format", "json", "--no-progress",
                 "--workers", "0", "--on-bad", "skip", "--out", "-"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["search"] == "beam 1" and summary["n"] > 0


def test_loading_a_model_trained_here_says_trained_from_scratch(tiny_model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="hierloc.model.backbones"):
        HierLoc.from_pretrained(tiny_model_dir, device="cpu")
    text = caplog.text
    assert "trained from scratch" in text and "pretrained weights" not in text


# ----------------------------------------------------------------------------------------------- explain
def test_explain_takes_predicts_inputs(tiny_model_dir, tiny_demo_dir, tmp_path, capsys):
    images = sorted((tiny_demo_dir / "images" / "test_nearby").glob("*.jpg"))[:3]
    listing = tmp_path / "list.csv"
    listing.write_text("image\n" + "\n".join(p.name for p in images) + "\n")
    out = tmp_path / "explained.json"
    assert main(["explain", str(listing), "--image-root", str(images[0].parent), "--model", str(tiny_model_dir),
                 "--format", "json", "--out", str(out), "--exif", "ignore", "--min-prob", "1.0"]) == 0
    records = json.loads(out.read_text())
    assert [r["source"] for r in records] == [str(p) for p in images]
    # --min-prob 1.0: every level below the country is cut (the country is always kept)
    assert all(len(r["levels"]) == 1 and r["levels"][0]["level"] == "country" for r in records)
    assert capsys.readouterr().out == ""                                     # the output went to the file


def _level(chosen_p: float, runner_ps: list[float]) -> X.LevelExplanation:
    def cand(i, p):
        return X.Candidate(i, f"k{i}", f"E{i}", p, 0.0, 0.0)

    return X.LevelExplanation("region", cand(0, chosen_p), [cand(i + 1, p) for i, p in enumerate(runner_ps)], "E1")


def test_explain_labels_say_which_entity_is_on_the_path_and_which_is_more_probable():
    explanation = X.Explanation("img.jpg", 0.0, 0.0, [_level(0.3, [0.5, 0.1])], [], [], {"model_dir": "m"}, False)
    text = X.format_text(explanation)
    assert "E0  p=0.300 on the best path" in text
    assert "E1 0.500 (higher at this level alone)" in text and "E2 0.100 (higher" not in text
    assert explanation.to_dict()["levels"][0]["runner_up_more_probable"] is True
    plain = X.Explanation("img.jpg", 0.0, 0.0, [_level(0.6, [0.3])], [], [], {"model_dir": "m"}, False)
    assert "(higher" not in X.format_text(plain) and not plain.levels[0].runner_up_more_probable


def test_cut_levels_keeps_the_country():
    levels = [_level(0.2, []), _level(0.9, []), _level(0.4, []), _level(0.9, [])]
    assert len(X.cut_levels(levels, 0.5)) == 2 and len(X.cut_levels(levels, None)) == 4
    assert len(X.cut_levels(levels, 0.95)) == 1


# ----------------------------------------------------------------------------------------------- train
@pytest.mark.integration
def test_train_checks_backbone_and_csv_before_creating_out(tiny_demo_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    code = main(["train", "--csv", str(tiny_demo_dir / "train.csv"), "--out", str(out), "--no-progress",
                 "model.backbone=hierloc-tests/no-such-model", "model.pretrained=true"])
    err = capsys.readouterr().err
    assert code == 2 and "--allow-download" in err and "tiny-resnet" in err and err.count("\n") == 1
    assert not out.exists()                                                   # nothing was created
    code = main(["train", "--csv", str(tmp_path / "missing.csv"), "--out", str(out), "model.backbone=tiny-resnet"])
    assert code == 2 and not out.exists()


def test_train_on_bad_error_stops_at_a_bad_row_before_out(tiny_demo_dir, tmp_path, capsys):
    rows = (tiny_demo_dir / "train.csv").read_text().splitlines()
    bad = tmp_path / "train.csv"
    bad.write_text("\n".join(rows[:3] + [rows[3].rsplit(",", 2)[0] + ",north,2.0"] + rows[4:20]) + "\n")
    for name in {line.split(",")[0] for line in rows[1:20]}:
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((tiny_demo_dir / name).read_bytes())
    out = tmp_path / "run"
    code = main(["train", "--csv", str(bad), "--out", str(out), "--on-bad", "error", "--no-progress",
                 "model.backbone=tiny-resnet"])
    err = capsys.readouterr().err
    assert code == 2 and "row 3" in err and "'north'" in err and not out.exists()


def test_a_locked_out_dir_refuses_a_second_train(tiny_demo_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    handle = ckpt.lock_directory(out)                                         # a first run holds --out
    try:
        with pytest.raises(Exception) as error:
            ckpt.lock_directory(out)
        assert "another `hierloc train` is writing" in str(error.value)
        code = main(["train", "--csv", str(tiny_demo_dir / "train.csv"), "--out", str(out), "--no-progress",
                     "model.backbone=tiny-resnet", "train.max_steps=1"])
        err = capsys.readouterr().err
        assert code == 2 and "another `hierloc train` is writing" in err
    finally:
        ckpt.unlock_directory(handle)
    ckpt.unlock_directory(ckpt.lock_directory(out))                           # released: free again


@pytest.mark.integration  # trains twice
def test_quiet_train_draws_no_progress_bar(tiny_demo_dir, tiny_backbone_dir, tmp_path, capsys):
    common = ["train", "--csv", str(tiny_demo_dir / "train.csv"), f"model.backbone={tiny_backbone_dir}",
              "train.max_steps=2", *TINY_OVERRIDES]
    assert main([*common, "--out", str(tmp_path / "loud")]) == 0
    assert "train:" in capsys.readouterr().err                               # the bar, without -q
    assert main([*common, "--out", str(tmp_path / "quiet"), "-q"]) == 0
    assert capsys.readouterr().err == ""
