"""Config files, overrides and their errors."""

import dataclasses
import json
import logging

import pytest

from hierloc.cli import main
from hierloc.config import Config, from_dict, load_config
from hierloc.errors import InputError


def test_defaults_validate_and_round_trip_through_json():
    cfg = load_config()
    again = from_dict(json.loads(cfg.to_json()), "x.json")
    assert again == cfg


def test_toml_and_yaml_files_and_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[loss]\ntau = 0.2\n[train]\nepochs = 3\n")
    cfg = load_config(toml, ["model.embed_dim=32", "loss.betas=1,0.5,0.5,0.25", "model.entity_fusion=false"])
    assert cfg.loss.tau == 0.2 and cfg.train.epochs == 3 and cfg.model.embed_dim == 32
    assert cfg.loss.betas == [1.0, 0.5, 0.5, 0.25] and cfg.model.entity_fusion is False
    yaml = tmp_path / "c.yaml"
    yaml.write_text("model:\n  geometry: euclidean\n")
    assert load_config(yaml).model.geometry == "euclidean"


@pytest.mark.parametrize("overrides, fragment", [
    (["loss.tua=0.1"], "did you mean loss.tau"),
    (["modle.embed_dim=3"], "did you mean 'model'"),
    (["train.epochs=abc"], "train.epochs"),
    (["model.geometry=sphere"], "model.geometry"),
    (["epochs=3"], "section.key=value"),
    (["loss.weighting=margin"], "loss.weighting"),
    (["loss.weighting=logit", "loss.blocked=true"], "loss.blocked"),
])
def test_bad_overrides_are_one_line_errors(overrides, fragment):
    with pytest.raises(InputError) as err:
        load_config(None, overrides)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_newer_format_version_is_refused():
    cfg = Config()
    text = cfg.to_json().replace('"format_version": 1', '"format_version": 99')
    with pytest.raises(InputError, match="newer"):
        from_dict(json.loads(text), "config.json")


def test_unparseable_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[loss\n")
    with pytest.raises(InputError, match="bad.toml"):
        load_config(bad)


# ------------------------------------------------------------------ every key: refused before any work
def _bad_settings() -> list[tuple[str, str, object]]:
    """(section, key, a value the key's own check refuses), for every key of every section."""
    return [(section, key, bad) for section, key, _value, check in Config().settings() for bad in check.bad_values()]


def _as_argument(value) -> str:
    """As a user types it (integral numbers without ".0")."""
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def test_every_key_has_a_check_with_values_it_refuses():
    """A key added without a valid range fails here (`setting(default, check)` in hierloc.config)."""
    cfg = Config()
    for section in ("model", "loss", "train", "inference"):
        part = getattr(cfg, section)
        for item in dataclasses.fields(part):
            check = item.metadata.get("check")
            assert check is not None, f"{section}.{item.name} has no check"
            assert check.ok(getattr(part, item.name)), f"{section}.{item.name}: its default fails its own check"
            assert check.bad_values(), f"{section}.{item.name}: no value to test the check with"
    assert len(list(cfg.settings())) == sum(len(dataclasses.fields(getattr(cfg, s)))
                                            for s in ("model", "loss", "train", "inference"))


@pytest.mark.parametrize("section, key, bad", _bad_settings(),
                         ids=[f"{s}.{k}={_as_argument(b)}" for s, k, b in _bad_settings()])
def test_every_out_of_range_value_is_one_line_exit_2_before_any_work(section, key, bad, tmp_path, capsys):
    """`hierloc train ... key=bad` exits 2 with one line naming the key, the value and what is valid, before
    --out exists and before the CSV or the gazetteer is read (neither exists: an error about them would mean the
    config was checked too late)."""
    out = tmp_path / "model"
    argument = _as_argument(bad)
    code = main(["train", "--csv", str(tmp_path / "absent.csv"), "--gazetteer", str(tmp_path / "absent-gaz"),
                 "--out", str(out), "--no-progress", f"{section}.{key}={argument}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert f"{section}.{key}={argument or chr(39) * 2} is not valid: expected " in err[0]
    assert "absent" not in err[0]
    assert not out.exists()


@pytest.mark.parametrize("overrides, named", [
    (["loss.blocked=true", "loss.weighting=logit"], "loss.blocked=true"),
    (["loss.blocked=true", "loss.geo_soft=0.2"], "loss.blocked=true"),
    (["loss.blocked=true", "model.geometry=euclidean"], "loss.blocked=true"),
    (["loss.lam=0", "loss.learn_weights=true"], "loss.learn_weights=true"),
    (["model.coord_min_radius_km=500", "model.coord_max_radius_km=100"], "model.coord_min_radius_km=500"),
    (["model.cross_attention=true", "model.embed_dim=10", "model.attn_heads=4"], "model.attn_heads=4"),
    (["model.backbone=tiny-resnet", "model.pretrained=true"], "model.pretrained=true"),
])
def test_values_valid_alone_but_not_together_are_refused_before_any_work(overrides, named, tmp_path, capsys):
    out = tmp_path / "model"
    code = main(["train", "--csv", str(tmp_path / "absent.csv"), "--out", str(out), "--no-progress", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"{named} is not valid: expected" in err[0]
    assert not out.exists()
    for override in overrides:        # each value alone is valid
        load_config(None, [override])


def test_settings_without_effect_are_warned_about_once_by_name(caplog):
    with caplog.at_level(logging.WARNING, logger="hierloc.config"):
        cfg = load_config(None, ["model.freeze_backbone=true", "train.augment=false", "train.shift_frac=0.25",
                                 "loss.geo_soft_km=100", "model.attn_heads=4", "train.epochs=2"])
    warned = [record.getMessage() for record in caplog.records]
    assert sorted(message.split("=")[0] for message in warned) == [
        "loss.geo_soft_km", "model.attn_heads", "train.augment", "train.shift_frac"]
    assert all("has no effect with" in message for message in warned)
    assert cfg.train.augment is False and cfg.train.shift_frac == 0.25     # warned, not changed
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hierloc.config"):
        load_config(None, ["model.backbone=tiny-resnet", "train.shift_frac=0.25", "train.augment=true"])
    assert caplog.records == []                       # a backbone that trains: both take effect


def test_blocked_auto_follows_the_budget_and_the_device():
    import torch

    from hierloc.training.losses import BLOCKED_AUTO_BUDGET_BYTES, REFERENCE_BUFFERS, use_blocked_loss

    cfg = load_config(None, ["train.batch_size=256"])
    fits = BLOCKED_AUTO_BUDGET_BYTES // (REFERENCE_BUFFERS * 4 * 256)
    assert use_blocked_loss(cfg, [10, fits], torch.device("cpu"))[0] is False
    assert use_blocked_loss(cfg, [10, fits + 1], torch.device("cpu"))[0] is True
    assert use_blocked_loss(cfg, [10, 20], torch.device("cuda"))[0] is True
    for override in ("loss.weighting=logit", "loss.geo_soft=0.2", "model.geometry=euclidean"):
        assert use_blocked_loss(load_config(None, [override]), [10, 10**7], torch.device("cuda"))[0] is False
    assert use_blocked_loss(load_config(None, ["loss.blocked=false"]), [10**7], torch.device("cuda"))[0] is False
    assert use_blocked_loss(load_config(None, ["loss.blocked=true"]), [3], torch.device("cpu"))[0] is True
    old = from_dict(json.loads(Config().to_json().replace('"blocked": "auto"', '"blocked": false')), "old.json")
    assert old.loss.blocked == "false"                # model directories written before "auto" still load
