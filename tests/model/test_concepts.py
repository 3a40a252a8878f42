"""hierloc.model.concepts: the vocabulary (location rules and CSV columns), the head, the loss, profiles, AUROC (the
location rules themselves are in tests/gazetteer/test_concepts.py)."""

from __future__ import annotations

import csv
import itertools
import json

import numpy as np
import pytest
import torch

from gazetteer import concepts as location
from gazetteer.errors import InputError
from hierloc.model import concepts as C


# ------------------------------------------------------------------------------------------------ vocabulary
def test_vocabulary_file_matches_the_location_rules_and_documents_every_concept():
    vocab = C.ConceptVocabulary.load()
    assert vocab.names == list(location.LOCATION_CONCEPTS)
    assert all(c.group and len(c.description) > 15 for c in vocab.concepts)
    raw = json.loads((location.assets_dir() / "concepts.json").read_text(encoding="utf-8"))
    assert {c["source"] for c in raw["concepts"]} <= set(raw["sources"])
    assert {"land_cover", "climate", "soil", "drive_side", "dist_sea", "road_index"} <= set(vocab.csv_columns)


OSV5M_LIKE = {
    "climate": np.array(["14", "14.0", "3", "", "nan", "29", "3", "14"]),
    "drive_side": np.array(["0", "1", "1", "1", "0", "0", "1", "1"]),
    "dist_sea": np.array(["0.5", "2", "3", "40", "", "90", "120", "7"]),
    "unused": np.array(["a"] * 8),
}


def test_categorical_columns_give_one_concept_per_value_and_numeric_ones_tertile_bins():
    vocab = C.ConceptVocabulary.load().fit_csv_columns(OSV5M_LIKE)
    csv_names = [c.name for c in vocab.concepts if c.source == "csv"]
    assert csv_names == ["climate=3", "climate=14", "climate=29", "drive_side=0", "drive_side=1",
                         "dist_sea:low", "dist_sea:mid", "dist_sea:high"]
    assert "Cfa" in vocab.concepts[vocab.index("climate=14")].description  # Koppen legend of the climate codes


def test_csv_labels_are_one_hot_per_known_value_and_nan_where_missing():
    vocab = C.ConceptVocabulary.load().fit_csv_columns(OSV5M_LIKE)
    lat = np.zeros(8)
    labels = C.concept_labels(lat, lat, OSV5M_LIKE, vocabulary=vocab)
    climate = labels[:, [vocab.index(n) for n in ("climate=3", "climate=14", "climate=29")]]
    known = ~np.isnan(climate).any(axis=1)
    assert known.tolist() == [True, True, True, False, False, True, True, True]
    assert (climate[known].sum(axis=1) == 1).all()
    assert climate[1].tolist() == [0, 1, 0]  # "14.0" is the category "14"
    bins = labels[:, [vocab.index(f"dist_sea:{b}") for b in ("low", "mid", "high")]]
    assert np.isnan(bins[4]).all() and (bins[[0, 1, 2, 3, 5, 6, 7]].sum(axis=1) == 1).all()
    assert bins[0].tolist() == [1, 0, 0] and bins[6].tolist() == [0, 0, 1]  # 0.5 km is low, 120 km high


def test_validation_rows_with_an_unseen_category_are_zero_not_unknown():
    vocab = C.ConceptVocabulary.load().fit_csv_columns({"drive_side": np.array(["0", "1"])})
    labels = C.concept_labels([0.0], [0.0], {"drive_side": np.array(["7"])}, vocabulary=vocab)
    assert labels[0, [vocab.index("drive_side=0"), vocab.index("drive_side=1")]].tolist() == [0, 0]


def test_non_numeric_value_in_a_numeric_column_names_the_column_and_row():
    vocab = C.ConceptVocabulary.load().fit_csv_columns({"dist_sea": np.array(["1", "2", "3"])})
    with pytest.raises(InputError, match=r"'dist_sea'.*'far'.*row 2"):
        C.concept_labels([0.0, 0.0], [0.0, 0.0], {"dist_sea": np.array(["1", "far"])}, vocabulary=vocab)


def test_fitted_vocabulary_round_trips_through_its_json_file(tmp_path):
    vocab = C.ConceptVocabulary.load().fit_csv_columns(OSV5M_LIKE)
    path = vocab.save(tmp_path)
    again = C.ConceptVocabulary.load(path)
    assert again.names == vocab.names and again.concepts == vocab.concepts
    lat = np.zeros(8)
    np.testing.assert_array_equal(C.concept_labels(lat, lat, OSV5M_LIKE, vocabulary=again),
                                  C.concept_labels(lat, lat, OSV5M_LIKE, vocabulary=vocab))


def test_malformed_vocabulary_file_is_a_one_line_input_error(tmp_path):
    path = tmp_path / "concepts.json"
    path.write_text('{"concepts": [{"name": "x"}]}', encoding="utf-8")
    with pytest.raises(InputError, match="concepts\\[0\\]"):
        C.ConceptVocabulary.load(path)


def test_read_concept_columns_aligns_with_requested_rows(tmp_path):
    path = tmp_path / "train.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "lat", "lon", "climate", "dist_sea"])
        for i in range(5):
            writer.writerow([f"{i}.jpg", 0, 0, str(10 + i), str(i * 1.5)])
    columns = C.read_concept_columns(path, rows=np.array([2, 5]))
    assert set(columns) == {"climate", "dist_sea"}
    assert columns["climate"].tolist() == ["11", "14"]


# ------------------------------------------------------------------------------------------- head and loss
def test_concept_head_shapes_and_zero_bottleneck_at_initialisation():
    torch.manual_seed(0)
    head = C.ConceptHead(feature_dim=12, n_concepts=5, embed_dim=4, hidden=8, dropout=0.1)
    logits, delta = head(torch.randn(3, 12))
    assert logits.shape == (3, 5) and delta.shape == (3, 4)
    assert torch.equal(delta, torch.zeros(3, 4))


def test_tangent_delta_is_a_linear_map_of_centred_concept_probabilities():
    torch.manual_seed(0)
    head = C.ConceptHead(feature_dim=6, n_concepts=3, embed_dim=2, hidden=8, dropout=0.1).eval()
    with torch.no_grad():
        head.to_tangent.weight.copy_(torch.randn(2, 3))
    feats = torch.randn(4, 6)
    logits, delta = head(feats)
    expected = (torch.sigmoid(logits) - 0.5) @ head.to_tangent.weight.T
    torch.testing.assert_close(delta, expected)


def test_bottleneck_weight_receives_gradient_from_the_tangent_path():
    head = C.ConceptHead(feature_dim=6, n_concepts=3, embed_dim=2, hidden=8, dropout=0.1)
    _, delta = head(torch.randn(4, 6))
    delta.sum().backward()
    assert head.to_tangent.weight.grad.abs().sum() > 0


def test_concept_loss_ignores_unknown_labels():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]], requires_grad=True)
    labels = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    loss = C.concept_loss(logits, labels)
    known = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.stack([logits[0, 0], logits[1, 0], logits[1, 1]]), torch.tensor([1.0, 0.0, 1.0]))
    torch.testing.assert_close(loss, known)
    loss.backward()
    assert logits.grad[0, 1] == 0 and torch.isfinite(logits.grad).all()


def test_concept_loss_with_no_known_label_is_zero_and_differentiable():
    logits = torch.zeros(2, 3, requires_grad=True)
    loss = C.concept_loss(logits, torch.full((2, 3), float("nan")))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------------ profiles
def test_entity_profiles_are_nan_aware_means_over_every_level():
    labels = np.array([[1, 0], [0, np.nan], [1, 1], [np.nan, np.nan]], dtype=np.float32)
    targets = np.array([[0, 2, -1, -1], [0, 3, -1, -1], [1, 4, -1, -1], [1, 4, -1, -1]])
    profiles = C.entity_concept_profiles(labels, targets, n_entities=6)
    np.testing.assert_allclose(profiles[0], [0.5, 0.0])          # images 0 and 1; concept 1 known once
    np.testing.assert_allclose(profiles[1], [1.0, 1.0])          # image 3 unknown everywhere
    np.testing.assert_allclose(profiles[3], [0.0, np.nan])
    assert np.isnan(profiles[5]).all()                           # no image at all


def test_prior_strength_shrinks_small_entities_towards_the_global_mean():
    labels = np.array([[1.0], [0.0], [0.0], [0.0]])
    targets = np.array([[0, -1, -1, -1], [1, -1, -1, -1], [1, -1, -1, -1], [1, -1, -1, -1]])
    profiles = C.entity_concept_profiles(labels, targets, 2, prior_strength=1.0)
    np.testing.assert_allclose(profiles[:, 0], [(1 + 0.25) / 2, (0 + 0.25) / 4])


# --------------------------------------------------------------------------------------------------- quality
def _auroc_by_pairs(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)]
    return float(np.mean(wins))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_equals_the_share_of_correctly_ordered_pairs_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 40) / 5.0  # many ties
    labels = rng.integers(0, 2, 40)
    assert C.auroc(scores, labels) == pytest.approx(_auroc_by_pairs(scores, labels))


def test_concept_quality_reports_per_concept_auroc_accuracy_and_means():
    probs = np.array([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5], [0.8, 0.4, 0.5], [0.3, 0.6, 0.5]])
    labels = np.array([[1, 0, 1], [0, 1, 1], [1, np.nan, 1], [0, 0, np.nan]])
    quality = C.concept_quality(probs, labels, ["a", "b", "c"])
    assert quality["auroc"]["a"] == 1.0 and quality["accuracy"]["a"] == 1.0
    assert quality["auroc"]["b"] == pytest.approx(1.0) and quality["n_known"]["b"] == 3
    assert np.isnan(quality["auroc"]["c"])                       # one class only
    assert quality["mean_auroc"] == pytest.approx(1.0)
    assert quality["mean_accuracy"] == pytest.approx(np.mean([1.0, 2 / 3, 1.0]))
