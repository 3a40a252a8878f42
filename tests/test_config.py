"""Config files, overrides and their errors."""

import pytest

from hierloc.config import Config, config_from_json, load_config
from hierloc.errors import InputError


def test_defaults_validate_and_round_trip_through_json():
    cfg = load_config()
    again = config_from_json(cfg.to_json(), "x.json")
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
        config_from_json(text, "config.json")


def test_unparseable_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[loss\n")
    with pytest.raises(InputError, match="bad.toml"):
        load_config(bad)
