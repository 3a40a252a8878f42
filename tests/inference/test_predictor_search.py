"""HierLoc's search on a model (`HierLoc.search_points`, `predict`) against the dense reference beam search
(`hierloc.inference.search.beam_search_dense`); the search itself is tested in tests/unit/test_search.py."""

from __future__ import annotations

import math

import pytest
import torch

from gazetteer import Gazetteer
from hierloc.config import Config, ModelConfig
from hierloc.inference.predictor import HierLoc
from hierloc.inference.search import beam_search_dense, local_parents
from hierloc.model.network import EntityTable, HierLocModel
from hierloc.training.losses import GWHInfoNCE
from tests.helpers import assert_same_result

# both tests search with the trained tiny model
pytestmark = pytest.mark.integration


# ------------------------------------------------------------------------------------------------ HierLoc
def _random_hierloc(gaz, geometry: str):
    cfg = Config(model=ModelConfig(embed_dim=16, geometry=geometry, curvature=1.5 if geometry == "poincare" else 1.0,
                                   head_hidden=32, entity_hidden=32, coord_scales=4))
    model = HierLocModel(cfg.model, EntityTable.from_gazetteer(gaz), feature_dim=16, seed=0).eval()
    loss = GWHInfoNCE(cfg.loss).eval()
    return HierLoc(cfg, model, loss.state_dict(), encoder=None, gaz=gaz, device="cpu")


def _dense_reference(hierloc, points, beam, top_k):
    model = hierloc.model
    return beam_search_dense(model.level_sqdists(points, hierloc.entity_points()),
                             local_parents(model.entity_parents, model.level_offsets), model.level_offsets,
                             hierloc.tau, beam=beam, top_k=top_k)


@pytest.mark.parametrize("geometry", ["poincare", "euclidean"])
def test_hierloc_search_points_equals_the_dense_reference(tiny_model_dir, geometry):
    hierloc = _random_hierloc(Gazetteer.load(tiny_model_dir / "gazetteer"), geometry)
    with torch.no_grad():
        points = hierloc.model.embed_features(torch.randn(40, 16, generator=torch.Generator().manual_seed(0)))
    for beam in (1, 10):
        # the dense reference's matrix-form distances differ from the direct ones by ~1e-6 relative
        reference = _dense_reference(hierloc, points, beam, 5)
        assert_same_result(hierloc.search_points(points, beam=beam, top_k=5), reference, atol=1e-4)
    assert hierloc.search_index() is hierloc.search_index()  # built once per model


def test_predict_agrees_with_the_dense_beam_search(tiny_model_dir, tiny_demo_dir):
    hierloc = HierLoc.from_pretrained(tiny_model_dir, device="cpu")
    pixels = hierloc.preprocess(sorted((tiny_demo_dir / "images" / "test_unseen").glob("*.jpg"))[:16])
    reference = _dense_reference(hierloc, hierloc.embed_pixels(pixels), beam=10, top_k=4)
    keys = hierloc.gazetteer.keys
    for row, prediction in enumerate(hierloc.predict(pixels, top_k=4, beam=10)):
        best = [int(e) for e in reference.paths[row, 0] if e >= 0]
        assert [level.entity_id for level in prediction.levels] == [keys[e] for e in best]
        assert [level.probability for level in prediction.levels] == pytest.approx(
            reference.level_probs[row, 0, :len(best)].tolist(), abs=1e-4)
        assert prediction.score == pytest.approx(float(reference.scores[row, 0]), abs=1e-4)
        alternatives = [[keys[int(e)] for e in path if e >= 0]
                        for path, score in zip(reference.paths[row, 1:], reference.scores[row, 1:])
                        if score > -math.inf]
        assert [[level.entity_id for level in alt.levels] for alt in prediction.alternatives] == alternatives
