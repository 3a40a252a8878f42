"""hierloc.training.prototypes: entities placed at the mean tangent of their training images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hierloc.geometry import hyperbolic
from hierloc.training import prototypes
from hierloc.config import ModelConfig, load_config
from hierloc.device import Runtime
from hierloc.errors import InputError
from hierloc.model.network import EntityTable, HierLocModel

# 2 countries, 2 regions, 2 subregions, 4 cities (city k's parent is subregion k // 2)
ENTITIES = EntityTable(np.array([0, 2, 4, 6, 10]), np.array([-1, -1, 0, 1, 2, 3, 4, 4, 5, 5]),
                       np.linspace(-40, 40, 10), np.linspace(-100, 100, 10))
TARGETS = torch.tensor([[0, 2, 4, 6], [0, 2, 4, 6], [0, 2, 4, 7], [1, 3, 5, 8], [1, 3, 5, -1], [1, 3, 5, 8]])


def _model(**changes) -> HierLocModel:
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=8, head_hidden=16, entity_hidden=16, coord_scales=2, concepts=False, **changes)
    return HierLocModel(cfg, ENTITIES, feature_dim=6)


@pytest.mark.parametrize("changes", [{}, {"entity_fusion": False}, {"geometry": "euclidean"}])
def test_set_entity_tangents_moves_exactly_the_chosen_entities(changes):
    model = _model(**changes)
    before = model.entity_tangent().detach().clone()
    ids = torch.tensor([6, 8])
    wanted = torch.randn(2, 8) * 0.7
    model.set_entity_tangents(ids, wanted)
    after = model.entity_tangent().detach()
    torch.testing.assert_close(after[ids], wanted, atol=2e-5, rtol=1e-4)
    others = torch.tensor([i for i in range(10) if i not in (6, 8)])
    torch.testing.assert_close(after[others], before[others])


def test_tangent_sums_match_a_loop_and_skip_absent_levels():
    tangents = torch.randn(6, 8)
    sums, counts = prototypes.tangent_sums(tangents, TARGETS, [3], 10)
    for entity in range(10):
        rows = [i for i in range(6) if int(TARGETS[i, 3]) == entity]
        assert counts[entity] == len(rows)
        expected = tangents[rows].double().sum(0) if rows else torch.zeros(8, dtype=torch.float64)
        torch.testing.assert_close(sums[entity], expected)
    assert counts[:6].sum() == 0   # only the city level was asked for


def test_refresh_places_cities_at_their_images_mean_and_leaves_coarser_levels():
    model = _model()
    features = torch.randn(6, 6)
    dataset = [{"features": features[i], "targets": TARGETS[i], "ok": True} for i in range(6)]
    before = model.entity_tangent().detach().clone()
    moved = prototypes.refresh_prototypes(model, dataset, [3], Runtime(torch.device("cpu")), batch_size=4,
                                          inputs_are_features=True)
    assert moved == 3                                   # city 9 has no image
    model.eval()
    image_tangents = hyperbolic.logmap0(model.embed_features(features), c=1.0).detach()
    after = model.entity_tangent().detach()
    torch.testing.assert_close(after[6], image_tangents[:2].mean(0), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(after[8], image_tangents[[3, 5]].mean(0), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(after[:6], before[:6])
    torch.testing.assert_close(after[9], before[9])


def test_level_names_parse_and_bad_names_are_one_line_errors():
    assert prototypes.parse_levels("city") == [3]
    assert prototypes.parse_levels("city, subregion") == [2, 3]
    assert prototypes.parse_levels("none") == [] and prototypes.parse_levels("") == []
    with pytest.raises(InputError, match="unknown level 'town'"):
        prototypes.parse_levels("town")
    with pytest.raises(InputError, match="train.prototype_levels"):
        load_config(None, ["train.prototype_levels=town"])
