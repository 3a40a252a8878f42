"""The Python API: inputs of every kind, the answer's contract (tree paths, backoff, flat, beam), EXIF, saving."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hierloc.data.prediction import expand_inputs
from hierloc.inference.answers import Failure, Prediction
from hierloc.inference.predictor import HierLoc
from hierloc.errors import InputError

LEVELS = ("country", "region", "subregion", "city")


@pytest.fixture(scope="module")
def hierloc(tiny_model_dir) -> HierLoc:
    return HierLoc.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def images(tiny_demo_dir) -> list[Path]:
    return sorted((tiny_demo_dir / "images" / "test_unseen").glob("*.jpg"))[:12]


def _ids(prediction: Prediction) -> list[str]:
    return [level.entity_id for level in prediction.levels]


def _greedy_path(hierloc: HierLoc, sqdists: list[torch.Tensor], row: int) -> list[int]:
    """Beam width 1 by hand: the nearest country, then the nearest of its children, ... (global ids)."""
    gaz, offsets = hierloc.gazetteer, hierloc.model.level_offsets
    path = [int(torch.argmin(sqdists[0][row]))]
    for level in range(1, 4):
        children = gaz.children(path[-1])
        if children.size == 0:
            break
        local = torch.as_tensor(children - offsets[level])
        path.append(int(children[int(torch.argmin(sqdists[level][row, local]))]))
    return path


# -------------------------------------------------------------------------------------- inputs of every kind
def test_paths_pil_images_and_tensors_give_the_same_answers(hierloc, images):
    from_paths = [p.to_dict() for p in hierloc.predict(images, top_k=3)]
    pil = [Image.open(path) for path in images]
    from_pil = [p.to_dict() for p in hierloc.predict(pil, top_k=3)]
    from_tensor = [p.to_dict() for p in hierloc.predict(hierloc.preprocess(images), top_k=3)]
    strip = lambda records: [{k: v for k, v in r.items() if k != "image"} for r in records]  # noqa: E731
    assert strip(from_paths) == strip(from_pil) == strip(from_tensor)
    assert [r["image"] for r in from_paths] == [str(p) for p in images]
    assert from_pil[0]["image"] == "<PIL image 0>" and from_tensor[1]["image"] == "<tensor 1>"


def test_a_single_path_gives_a_list_of_one(hierloc, images):
    assert len(hierloc.predict(images[0])) == 1


def test_batch_size_does_not_change_answers(hierloc, images):
    # same paths; numbers equal up to float32 rounding (a GEMM's blocking depends on the batch size)
    small = [p.to_dict() for p in hierloc.predict(images, batch_size=5)]
    large = [p.to_dict() for p in hierloc.predict(images, batch_size=64)]
    assert [[lv["entity_id"] for lv in p["levels"]] for p in small] == \
        [[lv["entity_id"] for lv in p["levels"]] for p in large]
    for a, b in zip(small, large):
        assert a["score_logprob"] == pytest.approx(b["score_logprob"], rel=1e-5, abs=1e-6)
        for la, lb in zip(a["levels"], b["levels"]):
            assert la["probability"] == pytest.approx(lb["probability"], rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------------------------------- answer contract
def test_answer_is_a_path_down_the_tree_and_its_point_is_the_deepest_entity(hierloc, images):
    gaz = hierloc.gazetteer
    for prediction in hierloc.predict(images):
        ids = [gaz.index_of(key) for key in _ids(prediction)]
        assert [level.level for level in prediction.levels] == list(LEVELS[:len(ids)])
        assert gaz.parents[ids[0]] == -1
        assert all(gaz.parents[child] == parent for parent, child in zip(ids, ids[1:]))
        assert (prediction.lat_deg, prediction.lon_deg) == (gaz.lat_deg[ids[-1]], gaz.lon_deg[ids[-1]])
        assert all(0.0 < level.probability <= 1.0 for level in prediction.levels)
        assert prediction.source == "model"


def test_beam_of_one_is_greedy_descent(hierloc, images):
    pixels = hierloc.preprocess(images)
    sqdists = hierloc.model.level_sqdists(hierloc.embed_pixels(pixels), hierloc.entity_points())
    for row, prediction in enumerate(hierloc.predict(pixels, beam=1, top_k=1)):
        expected = [hierloc.gazetteer.keys[i] for i in _greedy_path(hierloc, sqdists, row)]
        assert _ids(prediction) == expected


def test_flat_answer_is_the_nearest_city_and_its_ancestors(hierloc, images):
    gaz = hierloc.gazetteer
    pixels = hierloc.preprocess(images)
    city_sq = hierloc.model.level_sqdists(hierloc.embed_pixels(pixels), hierloc.entity_points())[3]
    for row, prediction in enumerate(hierloc.predict(pixels, flat=True, top_k=1)):
        city = int(torch.argmin(city_sq[row])) + hierloc.model.level_offsets[3]
        assert _ids(prediction) == [gaz.keys[i] for i in gaz.path(city)]


@pytest.mark.parametrize("max_level", LEVELS)
def test_max_level_reports_a_prefix_of_the_full_answer(hierloc, images, max_level):
    gaz = hierloc.gazetteer
    full = hierloc.predict(images, top_k=3)
    capped = hierloc.predict(images, top_k=3, max_level=max_level)
    depth = LEVELS.index(max_level) + 1
    for whole, cut in zip(full, capped):
        assert _ids(cut) == _ids(whole)[:depth]
        tip = gaz.index_of(_ids(cut)[-1])
        assert (cut.lat_deg, cut.lon_deg) == (gaz.lat_deg[tip], gaz.lon_deg[tip])
        assert all(len(alt.levels) <= depth for alt in cut.alternatives)
        assert len({tuple(lv.entity_id for lv in alt.levels) for alt in cut.alternatives}) == len(cut.alternatives)


def test_min_prob_stops_before_the_first_unsure_level_and_always_keeps_the_country(hierloc, images):
    full = hierloc.predict(images, top_k=1)
    region_probabilities = sorted(p.levels[1].probability for p in full)
    threshold = region_probabilities[len(region_probabilities) // 2]  # some answers are cut at the country
    cut = hierloc.predict(images, top_k=1, min_prob=threshold)
    depths = []
    for whole, short in zip(full, cut):
        depth = 1
        while depth < len(whole.levels) and whole.levels[depth].probability >= threshold:
            depth += 1
        assert _ids(short) == _ids(whole)[:depth]
        depths.append(depth)
    assert len(set(depths)) > 1
    for sure_only in hierloc.predict(images, top_k=1, min_prob=1.0):
        assert len(sure_only.levels) >= 1 and all(lv.probability >= 1.0 for lv in sure_only.levels[1:])


@pytest.mark.parametrize("kwargs", [{"min_prob": 1.5}, {"min_prob": -0.1}, {"max_level": "street"},
                                    {"exif": "trust"}, {"beam": 0}, {"top_k": 0}])
def test_bad_options_are_input_errors(hierloc, images, kwargs):
    with pytest.raises(InputError):
        hierloc.predict(images[:1], **kwargs)


def test_alternatives_are_distinct_sorted_and_at_most_top_k_minus_one(hierloc, images):
    for prediction in hierloc.predict(images, top_k=4):
        scores = [prediction.score] + [alt.score for alt in prediction.alternatives]
        assert scores == sorted(scores, reverse=True)
        assert len(prediction.alternatives) <= 3
        paths = {tuple(_ids(prediction))} | {tuple(lv.entity_id for lv in alt.levels)
                                             for alt in prediction.alternatives}
        assert len(paths) == 1 + len(prediction.alternatives)


def test_to_dict_is_strict_json_and_geojson_is_lon_lat(hierloc, images):
    prediction = hierloc.predict(images[:1])[0]
    record = json.loads(json.dumps(prediction.to_dict(), allow_nan=False))
    assert record["levels"][0]["level"] == "country" and record["status"] == "ok"
    feature = prediction.to_geojson()
    assert feature["geometry"]["coordinates"] == [prediction.lon_deg, prediction.lat_deg]
    assert feature["properties"]["lat_deg"] == prediction.lat_deg


# ----------------------------------------------------------------------------------- caching and streaming
def test_entity_points_are_computed_once_per_model(tiny_model_dir, images, monkeypatch):
    fresh = HierLoc.from_pretrained(tiny_model_dir, device="cpu")
    calls = []
    original = fresh.model.entity_points
    monkeypatch.setattr(fresh.model, "entity_points", lambda: calls.append(1) or original())
    fresh.predict(images, batch_size=4)
    fresh.predict(images, batch_size=4)
    assert len(calls) == 1


def test_iter_predict_yields_the_first_batch_before_reading_the_rest(hierloc, images, monkeypatch):
    searched = []
    original = hierloc.search_points
    monkeypatch.setattr(hierloc, "search_points", lambda *a, **k: searched.append(1) or original(*a, **k))
    stream = hierloc.iter_predict(images, batch_size=4)
    first = next(stream)
    assert first.image == str(images[0]) and len(searched) == 1
    assert len(list(stream)) == len(images) - 1 and len(searched) == 3


def test_unreadable_images_raise_or_come_back_as_failures_in_place(hierloc, images, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(images[0].read_bytes()[:100])
    inputs = [images[0], broken, tmp_path / "missing.jpg", images[1]]
    with pytest.raises(InputError, match="broken.jpg"):
        hierloc.predict(inputs)
    records = hierloc.predict(inputs, on_error="return", batch_size=2)
    assert [r.ok for r in records] == [True, False, False, True]
    assert isinstance(records[1], Failure) and "truncated" in records[1].error
    assert "not found" in records[2].error and records[2].image == str(tmp_path / "missing.jpg")
    assert records[1].to_geojson()["geometry"] is None


# ------------------------------------------------------------------------------------------------- EXIF
@pytest.fixture
def gps_photo(hierloc, tmp_path):
    """A noise JPEG whose EXIF GPS is the coordinate of one of the tiny gazetteer's cities."""
    gaz = hierloc.gazetteer
    city = int(gaz.level_offsets[3])
    lat, lon = float(gaz.lat_deg[city]), float(gaz.lon_deg[city])

    def dms(value):
        value = abs(value)
        return (float(int(value)), float(int(value * 60 % 60)), round(value * 3600 % 60, 4))

    path = tmp_path / "gps.jpg"
    noise = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x8825] = {1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W", 4: dms(lon)}
    Image.fromarray(noise).save(path, exif=exif.tobytes())
    from hierloc.data.exif import read_gps

    gps = read_gps(path)
    return path, gps.lat_deg, gps.lon_deg


def test_exif_compare_reports_the_gps_and_its_distance_to_the_answer(hierloc, gps_photo):
    from hierloc.inference.metrics import haversine_km

    path, lat, lon = gps_photo
    compared = hierloc.predict([path])[0]
    ignored = hierloc.predict([path], exif="ignore")[0]
    assert ignored.exif is None and compared.source == "model"
    assert _ids(compared) == _ids(ignored)
    assert (compared.exif.lat_deg, compared.exif.lon_deg) == (lat, lon)
    assert compared.exif.dist_km == pytest.approx(float(haversine_km(compared.lat_deg, compared.lon_deg, lat, lon)))


def test_exif_use_answers_from_the_gps_through_the_gazetteer(hierloc, gps_photo):
    path, lat, lon = gps_photo
    gaz = hierloc.gazetteer
    checksum = hashlib.sha256(path.read_bytes()).hexdigest()
    answer = hierloc.predict([path], exif="use")[0]
    located = [int(i) for i in gaz.locate([lat], [lon])[0] if i >= 0]
    assert answer.source == "exif" and (answer.lat_deg, answer.lon_deg) == (lat, lon)
    assert _ids(answer) == [gaz.keys[i] for i in located] and len(located) >= 1
    assert all(level.probability == 1.0 for level in answer.levels)
    country_only = hierloc.predict([path], exif="use", max_level="country")[0]
    assert (country_only.lat_deg, country_only.lon_deg) == (gaz.lat_deg[located[0]], gaz.lon_deg[located[0]])
    assert hashlib.sha256(path.read_bytes()).hexdigest() == checksum


def test_exif_use_falls_back_to_the_model_without_gps(hierloc, images):
    assert all(p.source == "model" and p.exif is None for p in hierloc.predict(images[:3], exif="use"))


# ---------------------------------------------------------------------------------------- saving, describe
def test_save_pretrained_refuses_to_replace_without_overwrite_or_a_non_model_directory(hierloc, images, tmp_path):
    target = hierloc.save_pretrained(tmp_path / "copy")
    with pytest.raises(InputError, match="already exists"):
        hierloc.save_pretrained(target)
    hierloc.save_pretrained(target, overwrite=True)
    again = HierLoc.from_pretrained(target, device="cpu")
    assert [p.to_dict() for p in again.predict(images[:3])] == [p.to_dict() for p in hierloc.predict(images[:3])]
    assert again.describe()["training"] == hierloc.describe()["training"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a model directory"):
        hierloc.save_pretrained(other, overwrite=True)
    assert (other / "a.txt").read_text() == "keep me"


def test_describe_names_the_model_directory_and_training_data(hierloc, tiny_model_dir, tiny_demo_dir):
    description = hierloc.describe()
    # names, not the paths of this machine (the description is what `hierloc serve` shows its clients)
    assert description["model_dir"] == tiny_model_dir.name
    assert str(tiny_model_dir.parent) not in json.dumps(description)
    assert str(tiny_demo_dir) not in json.dumps(description)
    # the fixture's gazetteer was built from the training points, so only the image count is known
    n_train_rows = len((tiny_demo_dir / "train.csv").read_text().splitlines()) - 1
    assert description["training"]["n_images"] == n_train_rows
    assert sum(description["gazetteer_entities"].values()) == hierloc.gazetteer.n_entities


# ---------------------------------------------------------------------------------------- input expansion
def test_expand_inputs_reads_directories_globs_csv_and_list_files(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for name in ("b.jpg", "a.PNG", "sub/c.jpeg"):
        Image.new("RGB", (4, 4)).save(folder / name)
    (folder / "notes.txt").write_text("x")
    expected = sorted(str(p) for p in (folder / "a.PNG", folder / "b.jpg", folder / "sub" / "c.jpeg"))
    assert expand_inputs([folder]) == expected
    assert expand_inputs([str(folder / "**" / "*.jp*g")]) == sorted([str(folder / "b.jpg"),
                                                                     str(folder / "sub" / "c.jpeg")])
    (tmp_path / "list.txt").write_text("# my photos\nphotos/b.jpg\n\nphotos/sub/c.jpeg\n")
    assert expand_inputs([tmp_path / "list.txt"]) == [str(folder / "b.jpg"), str(folder / "sub" / "c.jpeg")]
    (tmp_path / "table.csv").write_text("IMG_FILE,LAT,LON\nphotos/b.jpg,1,2\n")
    assert expand_inputs([tmp_path / "table.csv"]) == [str(folder / "b.jpg")]
    (tmp_path / "osv5m.csv").write_text("id,latitude,longitude\n123,1,2\n")
    assert expand_inputs([tmp_path / "osv5m.csv"]) == [str(tmp_path / "images" / "123.jpg")]
    assert expand_inputs(["missing.jpg"]) == ["missing.jpg"]  # reported when read, with the others


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "empty").mkdir() or d / "empty", "contains no images"),
    (lambda d: str(d / "*.nothing"), "matches no file"),
    (lambda d: (d / "t.csv").write_text("lat,lon\n1,2\n") and d / "t.csv", "no image column"),
    (lambda d: (d / "l.txt").write_text("# only a comment\n") and d / "l.txt", "names no image"),
])
def test_expand_inputs_errors_name_the_input(tmp_path, make, message):
    with pytest.raises(InputError, match=message):
        expand_inputs([make(tmp_path)])


def test_points_are_finite_and_probabilities_sum_below_one_per_level(hierloc, images):
    for prediction in hierloc.predict(images, top_k=5):
        assert math.isfinite(prediction.lat_deg) and math.isfinite(prediction.lon_deg)
        first_levels = [prediction.levels[0]] + [alt.levels[0] for alt in prediction.alternatives]
        distinct = {lv.entity_id: lv.probability for lv in first_levels}
        assert sum(distinct.values()) <= 1.0 + 1e-5
