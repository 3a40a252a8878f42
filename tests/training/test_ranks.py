"""What each rank of a torchrun job does on its own: its random streams, its logging, its share of the entity
feature means, its RNG state in a checkpoint. The collectives run in two real gloo processes (spawned)."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from hierloc.device import Runtime, all_gather_objects, init_runtime, log_from_main_only, shutdown
from hierloc.config import Config
from hierloc.model.network import EntityTable, HierLocModel
from hierloc.training.module import entity_feature_means, entity_feature_sums, update_entity_features
from hierloc.training.resume import rank_rng_state, rng_state
from hierloc.training.step import rank_seed, seed_everything, seed_rank
from tests.helpers import restored_log_levels


def test_rank_zero_keeps_the_seed_and_other_ranks_get_distinct_reproducible_ones():
    assert rank_seed(7, 0) == 7
    seeds = [rank_seed(7, rank) for rank in range(1, 9)]
    assert len(set(seeds)) == 8 and 7 not in seeds
    assert seeds == [rank_seed(7, rank) for rank in range(1, 9)]          # a function of (seed, rank) only
    assert rank_seed(8, 1) != rank_seed(7, 1)
    assert all(0 <= s < 2**63 for s in seeds)


def test_seed_rank_gives_rank_zero_the_single_process_stream_and_other_ranks_another():
    def dropout_mask(rank: int) -> torch.Tensor:
        seed_everything(3)
        seed_rank(3, rank)
        return torch.nn.functional.dropout(torch.ones(256), 0.5)

    seed_everything(3)
    single = torch.nn.functional.dropout(torch.ones(256), 0.5)
    assert torch.equal(dropout_mask(0), single)
    assert not torch.equal(dropout_mask(1), single)
    assert torch.equal(dropout_mask(1), dropout_mask(1))


def test_each_rank_restores_its_own_rng_state_and_falls_back_to_rank_zeros_with_a_warning(caplog):
    states = [{"torch": [rank]} for rank in range(2)]
    trainer_state = {"rng": states[0], "rng_ranks": states}
    for rank in range(2):
        assert rank_rng_state(trainer_state, Runtime(torch.device("cpu"), rank, 2)) == states[rank]
    with caplog.at_level(logging.WARNING, logger="hierloc.training.resume"):
        assert rank_rng_state(trainer_state, Runtime(torch.device("cpu"), 2, 4)) == states[0]
    assert "the random states of 2 rank(s), this run has 4" in caplog.text
    single = {"rng": states[0]}                    # a single-process checkpoint
    assert rank_rng_state(single, Runtime(torch.device("cpu"))) == states[0]


def test_ranks_other_than_zero_log_warnings_only():
    loggers = [logging.getLogger(name) for name in ("hierloc", "gazetteer")]
    with restored_log_levels():
        for logger in loggers:
            logger.setLevel(logging.INFO)
        log_from_main_only(0)
        assert [logger.getEffectiveLevel() for logger in loggers] == [logging.INFO] * 2
        log_from_main_only(1)
        assert [logger.getEffectiveLevel() for logger in loggers] == [logging.WARNING] * 2
        assert not logging.getLogger("hierloc.training.train").isEnabledFor(logging.INFO)
        assert logging.getLogger("hierloc.training.train").isEnabledFor(logging.WARNING)


def _features_and_targets(n: int = 103, dim: int = 5, n_entities: int = 12):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(n, dim)).astype(np.float32)
    feats[[4, 50]] = np.nan                                    # failed images
    targets = np.stack([rng.integers(0, 3, n), rng.integers(3, 6, n), rng.integers(6, 9, n),
                        rng.integers(9, n_entities, n)], axis=1)
    targets[::7, 3] = -1                                       # no city
    return feats, targets, n_entities


def test_entity_feature_sums_over_row_shares_add_up_to_the_whole():
    feats, targets, n_entities = _features_and_targets()
    whole_sums, whole_counts = entity_feature_sums(feats, targets, n_entities)
    cuts = [0, 30, 31, 103]
    parts = [entity_feature_sums(feats, targets, n_entities, (a, b), chunk_rows=8) for a, b in zip(cuts, cuts[1:])]
    assert torch.allclose(sum(p[0] for p in parts), whole_sums, rtol=0, atol=1e-12)
    assert torch.equal(sum(p[1] for p in parts), whole_counts)
    reference = np.zeros((n_entities, feats.shape[1]))
    for row, ids in zip(feats.astype(np.float64), targets):
        if np.isfinite(row).all():
            for entity in ids[ids >= 0]:
                reference[entity] += row
    assert np.allclose(whole_sums.numpy(), reference, rtol=0, atol=1e-12)


def _reference_ema(buf, seen, features, targets, momentum):
    """float64, entity by entity: a first sighting takes the batch mean, later ones move by `momentum`."""
    buf, seen = buf.double().clone(), seen.clone()
    for level in range(targets.shape[1]):
        for entity in sorted(set(targets[:, level].tolist()) - {-1}):
            mean = features[targets[:, level] == entity].double().mean(0)
            buf[entity] += (momentum if seen[entity] else 1.0) * (mean - buf[entity])
            seen[entity] = True
    return buf, seen


def test_update_entity_features_matches_an_entity_by_entity_reference_and_leaves_the_rest_bitwise():
    cfg = Config()
    table = _tiny_entity_table(12)
    model = HierLocModel(cfg.model, table, feature_dim=5, entity_features=torch.randn(12, 5))
    model.entity_seen[:6] = True
    start = model.entity_features.clone()
    torch.manual_seed(1)
    features = torch.randn(9, 5)
    targets = torch.tensor([[0, 3, 6, 9], [0, 3, 6, -1], [1, 4, 7, 10], [1, 4, 7, -1], [0, 3, 6, 9],
                            [2, 5, 8, 11], [0, 3, -1, -1], [1, 4, 7, 10], [0, 3, 6, 9]])
    expected, expected_seen = _reference_ema(start, model.entity_seen.clone(), features, targets, 0.1)
    update_entity_features(model, features, targets, 0.1)
    assert torch.allclose(model.entity_features.double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(model.entity_seen, expected_seen)
    touched = torch.zeros(12, dtype=torch.bool)
    touched[targets[targets >= 0]] = True
    assert torch.equal(model.entity_features[~touched], start[~touched])     # bitwise untouched


def _tiny_entity_table(n: int) -> EntityTable:
    """Three countries, each with one region, one subregion and one city (n = 12)."""
    return EntityTable(np.array([0, 3, 6, 9, n]), np.array([-1, -1, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8]),
                       np.linspace(-50, 50, n), np.linspace(-150, 150, n))


# ------------------------------------------------------------------------------------ two real gloo processes
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    logging.getLogger("hierloc").setLevel(logging.INFO)
    runtime = init_runtime("cpu")
    feats, targets, n_entities = _features_and_targets()
    means = entity_feature_means(feats, targets, n_entities, runtime, chunk_rows=8)
    seed_everything(5)
    seed_rank(5, runtime.rank)
    gathered = all_gather_objects(runtime, rng_state()["torch"][:64])
    result = {"means": means.tolist(), "log_level": logging.getLogger("hierloc").getEffectiveLevel(),
              "gathered_rng_heads": gathered}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    shutdown(runtime)


@pytest.mark.integration   # two processes
def test_two_gloo_ranks_share_the_entity_means_log_once_and_draw_their_own_streams(tmp_path):
    mp.start_processes(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    feats, targets, n_entities = _features_and_targets()
    single = entity_feature_means(feats, targets, n_entities)
    for result in results:        # each rank read half the rows; all-reduced: the single-process means
        assert torch.allclose(torch.tensor(result["means"]), single, rtol=0, atol=1e-7)
    assert results[0]["means"] == results[1]["means"]
    assert [r["log_level"] for r in results] == [logging.INFO, logging.WARNING]
    heads = results[0]["gathered_rng_heads"]
    assert heads == results[1]["gathered_rng_heads"] and heads[0] != heads[1]
