"""Explanations: contributions, runner-ups and reasons on synthetic numbers; the CLI end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hierloc.inference import explain as X
from hierloc.model.concepts import Concept, ConceptVocabulary

# A toy tree: countries 0 (Alpha), 1 (Beta); regions 2, 3 under 0 and 4 under 1; subregion 5 under 2; city 6.
TABLE = {
    "keys": np.array(["A", "B", "A|r1", "A|r2", "B|r3", "A|r1|s", "A|r1|s|c"], dtype=object),
    "names": np.array(["Alpha", "Beta", "North", "South", "Lone", "Sub", "Town"], dtype=object),
    "lat_deg": np.arange(7, dtype=float), "lon_deg": -np.arange(7, dtype=float),
    "parents": np.array([-1, -1, 0, 0, 1, 2, 5]), "level_offsets": np.array([0, 2, 5, 6, 7]),
}
VOCAB = ConceptVocabulary([Concept("snow", "cover", "snow or ice around"), Concept("left", "driving", "drives left"),
                           Concept("desert", "cover", "desert around")])
# profiles (E, K): Alpha snowy and left-driving, Beta neither; North vs South differ by desert.
PROFILES = np.array([[0.9, 1.0, 0.1], [0.1, 0.0, 0.2], [0.5, 1.0, 0.8], [0.5, 1.0, 0.1], [0.1, 0.0, 0.2],
                     [0.5, 1.0, 0.8], [0.5, 1.0, 0.8]], dtype=np.float32)


def test_contribution_is_image_probability_times_profile_difference():
    contrib = X.level_contributions(np.array([0.8, 0.5, 0.1]), np.array([0.9, 1.0, np.nan]), np.array([0.1, 0.0, 0.5]))
    np.testing.assert_allclose(contrib, [0.8 * 0.8, 0.5 * 1.0, 0.0])


def _candidates(p_alpha=0.7, p_north=0.6):
    return [(np.array([0, 1]), np.array([p_alpha, 1 - p_alpha])), (np.array([2, 3]), np.array([p_north, 1 - p_north])),
            (np.array([5]), np.array([1.0])), (np.array([6]), np.array([1.0]))]


def test_explain_path_compares_with_the_runner_up_and_orders_reasons_by_contribution():
    levels = X.explain_path(np.array([0, 2, 5, 6]), _candidates(), TABLE, np.array([0.95, 0.6, 0.9]), PROFILES, VOCAB)
    country = levels[0]
    assert country.chosen.name == "Alpha" and country.chosen.probability == pytest.approx(0.7)
    assert [r.name for r in country.runners_up] == ["Beta"] and country.compared_with == "Beta"
    assert [r.name for r in country.supporting] == ["snow", "left"]      # 0.95*0.8 = 0.76 > 0.6*1.0 = 0.6
    assert country.supporting[0].contribution == pytest.approx(0.95 * 0.8, abs=1e-4)
    assert [r.name for r in country.against] == ["desert"]               # active, more typical of Beta
    assert country.against[0].contribution == pytest.approx(0.9 * (0.1 - 0.2), abs=1e-4)
    region = levels[1]
    assert region.compared_with == "South" and [r.name for r in region.supporting] == ["desert"]


def test_concepts_absent_from_the_image_are_never_reasons():
    levels = X.explain_path(np.array([0, 2, 5, 6]), _candidates(), TABLE, np.array([0.2, 0.1, 0.3]), PROFILES, VOCAB)
    assert all(not lv.supporting and not lv.against for lv in levels)


def test_active_concept_characteristic_of_the_runner_up_counts_against():
    levels = X.explain_path(np.array([0, 3, -1, -1]), [(np.array([0, 1]), np.array([0.6, 0.4])),
                                                       (np.array([3, 2]), np.array([0.55, 0.45]))] + [
        (np.zeros(0, int), np.zeros(0))] * 2, TABLE, np.array([0.1, 0.1, 0.9]), PROFILES, VOCAB)
    assert len(levels) == 2
    assert [r.name for r in levels[1].against] == ["desert"] and levels[1].against[0].contribution < 0


def test_single_candidate_is_compared_with_its_parent():
    levels = X.explain_path(np.array([1, 4, -1, -1]), [(np.array([1, 0]), np.array([0.9, 0.1])),
                                                       (np.array([4]), np.array([1.0]))] + [
        (np.zeros(0, int), np.zeros(0))] * 2, TABLE, np.array([0.9, 0.9, 0.9]), PROFILES, VOCAB)
    assert levels[1].compared_with == "Beta (parent)" and levels[1].runners_up == []


def test_without_concepts_the_tree_is_still_explained():
    levels = X.explain_path(np.array([0, 2, 5, 6]), _candidates(), TABLE)
    assert [lv.chosen.name for lv in levels] == ["Alpha", "North", "Sub", "Town"]
    assert all(lv.supporting == [] for lv in levels)


def test_candidates_from_paths_keep_each_entity_once_with_its_best_probability():
    paths = np.array([[0, 2, 5, 6], [0, 3, -1, -1], [1, 4, -1, -1]])
    probs = np.array([[0.7, 0.6, 1, 1], [0.7, 0.4, 0, 0], [0.3, 1.0, 0, 0]])
    cands = X.candidates_from_paths(paths, probs)
    assert cands[0][0].tolist() == [0, 1] and cands[0][1].tolist() == [0.7, 0.3]
    assert cands[1][0].tolist() == [4, 2, 3]


def test_sibling_candidates_are_a_softmax_over_the_chosen_parents_children():
    sq = [np.array([1.0, 3.0]), np.array([0.5, 1.5, 0.1]), np.array([2.0]), np.array([0.3])]
    cands = X.sibling_candidates(sq, np.array([0, 2, 5, 6]), TABLE["level_offsets"], TABLE["parents"], tau=1.0)
    assert cands[1][0].tolist() == [2, 3]                                # region 4 belongs to Beta
    np.testing.assert_allclose(cands[1][1], np.exp([-0.5, -1.5]) / np.exp([-0.5, -1.5]).sum())
    np.testing.assert_allclose(cands[0][1].sum(), 1.0)


def test_sibling_candidates_at_temperatures_are_the_softmax_at_tau_times_t():
    sq = [np.array([1.0, 3.0]), np.array([0.5, 1.5, 0.1]), np.array([2.0]), np.array([0.3])]
    path = np.array([0, 2, 5, 6])
    hot = X.sibling_candidates(sq, path, TABLE["level_offsets"], TABLE["parents"], tau=1.0,
                               temperatures=[2.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(hot[0][1], np.exp([-0.5, -1.5]) / np.exp([-0.5, -1.5]).sum())
    np.testing.assert_allclose(hot[1][1], np.exp([-1.0, -3.0]) / np.exp([-1.0, -3.0]).sum())
    plain = X.sibling_candidates(sq, path, TABLE["level_offsets"], TABLE["parents"], tau=1.0)
    assert [ids.tolist() for ids, _ in hot] == [ids.tolist() for ids, _ in plain]


def test_text_tree_indents_levels_and_shows_runner_ups_and_reasons():
    levels = X.explain_path(np.array([0, 2, 5, 6]), _candidates(), TABLE, np.array([0.95, 0.6, 0.9]), PROFILES, VOCAB)
    e = X.Explanation("img.jpg", 6.0, -6.0, levels, [], [], {"model_dir": "m"})
    lines = X.format_text(e).splitlines()
    assert lines[1].startswith("  country: Alpha  p=0.700") and "Beta 0.300" in lines[1]
    assert lines[2].startswith("    + snow: in image 0.95, 90% of Alpha vs 10% of Beta")
    assert any(line.startswith("    region: North") for line in lines)


def test_json_is_deterministic_and_writes_nan_as_null():
    levels = X.explain_path(np.array([0, 2, 5, 6]), _candidates(), TABLE, np.array([0.95, 0.6, 0.9]),
                            PROFILES.copy(), VOCAB)
    levels[0].supporting[0].profile_other = float("nan")
    e = X.Explanation("img.jpg", 6.0, -6.0, levels, [], [], {"model_dir": "m"})
    text = X.to_json([e])
    assert text == X.to_json([e]) and "NaN" not in text
    assert json.loads(text)[0]["levels"][0]["supporting"][0]["profile_other"] is None


# ----------------------------------------------------------------------------------- with a real (tiny) model
def _photos(shared_data_dir: Path) -> list[str]:
    return sorted(str(p) for p in (shared_data_dir / "photos" / "osv5m").glob("*.jpg"))[:2]


def test_explain_images_with_a_concept_head_gives_reasons_from_the_profiles(tiny_model_dir, shared_data_dir):
    from hierloc.inference.predictor import HierLoc
    from hierloc.model.concepts import ConceptHead

    hl = HierLoc.from_pretrained(tiny_model_dir, device="cpu")
    vocab = ConceptVocabulary.load()
    torch.manual_seed(0)
    hl.model.concept_head = ConceptHead(hl.model.feature_dim, len(vocab), hl.cfg.model.embed_dim, hidden=16,
                                        dropout=0.0)
    rng = np.random.default_rng(0)
    profiles = rng.uniform(0, 1, (hl.model.n_entities, len(vocab))).astype(np.float32)
    images = _photos(shared_data_dir)
    first = X.explain_images(hl, images, model_dir=tiny_model_dir, vocabulary=vocab, profiles=profiles)
    again = X.explain_images(hl, images, model_dir=tiny_model_dir, vocabulary=vocab, profiles=profiles)
    assert X.to_json(first) == X.to_json(again)
    e = first[0]
    assert [lv.level for lv in e.levels] == ["country", "region", "subregion", "city"]
    assert e.concepts_available and len(e.image_concepts) == 8
    probs = {c["name"]: c["probability"] for c in e.image_concepts}
    for lv in e.levels:
        for reason in lv.supporting:
            assert reason.image_prob >= 0.5 and reason.contribution > 0
            assert reason.profile_chosen == pytest.approx(profiles[lv.chosen.entity, vocab.index(reason.name)], abs=1e-4)
            if reason.name in probs:
                assert reason.image_prob == pytest.approx(probs[reason.name], abs=1e-4)
    # the chosen country's probability is its softmax over all countries
    assert sum(c.probability for c in [e.levels[0].chosen] + e.levels[0].runners_up) <= 1.0 + 1e-6


def test_cli_explain_prints_a_tree_with_provenance_and_json(tiny_model_dir, shared_data_dir, capsys):
    from hierloc.cli import main

    images = _photos(shared_data_dir)
    assert main(["-q", "explain", *images, "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# model {tiny_model_dir.name};") and "trained on 240 images" in out
    assert str(tiny_model_dir) not in out      # names, not the paths of this machine
    assert out.count("  country: ") == 2
    # the trained model carries a concept head: the image's active concepts are listed, not the fallback line
    assert "no concept reasons" not in out
    vocab = json.loads((tiny_model_dir / "concepts.json").read_text())
    names = [c["name"] for c in vocab["concepts"]]
    assert any(name in out for name in names)
    assert main(["-q", "explain", images[0], "--model", str(tiny_model_dir), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 1 and data[0]["model"]["n_train_images"] == 240
    assert [lv["level"] for lv in data[0]["levels"]] == ["country", "region", "subregion", "city"]


def test_cli_explain_map_writes_one_png_per_image(tiny_model_dir, shared_data_dir, tmp_path):
    from PIL import Image

    from hierloc.cli import main

    images = _photos(shared_data_dir)
    assert main(["-q", "explain", *images, "--model", str(tiny_model_dir), "--map", str(tmp_path / "map.png"),
                 "--format", "json"]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == [f"map-{i + 1}-{Path(img).stem}.png" for i, img in enumerate(images)]
    with Image.open(tmp_path / written[0]) as picture:
        assert picture.width == 1200


@pytest.mark.parametrize("args, message", [
    (["--truth", "91,0"], "--truth"),
    (["--map", "out.gif"], "out.gif"),
])
def test_cli_explain_bad_options_are_one_line_errors(tiny_model_dir, shared_data_dir, capsys, args, message, tmp_path,
                                                      monkeypatch):
    from hierloc.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["explain", _photos(shared_data_dir)[0], "--model", str(tiny_model_dir), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hierloc: error:") and message in err[0]


def test_cli_plot_embeddings_draws_the_disk(tiny_model_dir, tmp_path):
    from PIL import Image

    from hierloc.cli import main

    out = tmp_path / "emb.png"
    assert main(["-q", "plot-embeddings", "--model", str(tiny_model_dir), "--out", str(out), "--size", "400"]) == 0
    with Image.open(out) as picture:
        assert picture.width == 400
