"""Validation and calibration split across ranks (`hierloc.inference.sharded`): from cached features they equal
the image path, and any number of ranks (threads standing in for processes, sharing an all-gather) give the
one-process metrics and temperatures. The real multi-process run is in tests/training/test_distributed.py.

Tolerances: a rank embeds and searches its rows in other batches than one process does, which changes the last
bits of float32 points (BLAS kernels differ with the batch shape). Metrics move by that much (rel 1e-6); a
temperature moves more (rel 1e-3): on 20 rows the binary NLL is so flat near its minimum that the golden-section
search's last steps follow that noise."""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hierloc.data import tables
from hierloc.device import Runtime
from hierloc.inference import evaluate, sharded
from hierloc.inference.predictor import HierLoc
from hierloc.training.features import extract_features

TEMPERATURE_RTOL = 1e-3
ECE_ATOL = 1e-4


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return HierLoc.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def table(tiny_demo_dir):
    """The validation rows plus a missing image (a row every path must report as unreadable)."""
    val = tables.read_image_table(tiny_demo_dir / "val.csv")
    paths = [str(p) for p in val.paths] + [str(tiny_demo_dir / "images" / "missing.jpg")]
    return tables.ImageTable.from_arrays(paths, np.append(val.lat_deg, 48.85), np.append(val.lon_deg, 2.35),
                                         source=str(tiny_demo_dir / "val.csv"))


@pytest.fixture(scope="module")
def features(model, table, tmp_path_factory):
    """The model's own backbone features of the table, cached in float32 (the comparison then has no float16
    rounding: the image path computes the same features)."""
    dataset = tables.ImageDataset(table, model.encoder.preprocessor, train=False)
    return extract_features(model.encoder, dataset, tmp_path_factory.mktemp("val_features"), dtype=np.float32,
                            progress=False, amp=False)


class ThreadGroup:
    """`world_size` ranks run as threads; `all_gather` is `hierloc.device.all_gather_objects` between them."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.values: list = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=120)

    def all_gather(self, runtime: Runtime, value):
        self.values[runtime.rank] = value
        self.barrier.wait()
        gathered = list(self.values)
        self.barrier.wait()
        return gathered

    def run(self, monkeypatch, function) -> list:
        """function(runtime) on every rank -> the results in rank order (a rank's exception is re-raised)."""
        monkeypatch.setattr(sharded, "all_gather_objects", self.all_gather)
        results: list = [None] * self.world_size
        errors: list = []

        def one(rank: int) -> None:
            try:
                results[rank] = function(Runtime(torch.device("cpu"), rank=rank, world_size=self.world_size))
            except BaseException as error:  # noqa: BLE001 - re-raised below
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=one, args=(rank,)) for rank in range(self.world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


def assert_same_metrics(got: dict, expected: dict, rtol: float = 1e-5) -> None:
    """Equal up to float32 rounding: ranks embed in other batch shapes (and threads), which moves the last bits of
    the points; binned statistics (ECE) move by ~1e-6 relative with them."""
    assert list(got) == list(expected)
    for key, value in expected.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, rel=rtol, abs=1e-9), key


def test_validation_on_cached_features_equals_the_image_path_without_running_the_backbone(model, table, features,
                                                                                          monkeypatch):
    expected = evaluate.evaluate_model(model, table)
    assert expected["n"] == len(table) - 1 and expected["n_failed"] == 1
    calls = []
    monkeypatch.setattr(model, "encoder", lambda pixels: calls.append(pixels) or pytest.fail("backbone ran"))
    got = sharded.evaluate_sharded(model, table, Runtime(torch.device("cpu")), features=features)
    assert calls == []
    assert_same_metrics(got, expected)


@pytest.mark.parametrize("world_size", [2, 3])
def test_validation_split_across_ranks_equals_one_process(model, table, features, monkeypatch, world_size):
    expected = evaluate.evaluate_model(model, table)
    results = ThreadGroup(world_size).run(
        monkeypatch, lambda runtime: sharded.evaluate_sharded(model, table, runtime, features=features))
    assert all(result == {} for result in results[1:])       # the metrics are rank 0's
    assert_same_metrics(results[0], expected)
    # the image path split across ranks gives them too
    results = ThreadGroup(world_size).run(monkeypatch, lambda runtime: sharded.evaluate_sharded(model, table, runtime))
    assert_same_metrics(results[0], expected)


def test_calibration_split_across_ranks_equals_the_one_process_fit(model, table, features, monkeypatch):
    expected = evaluate.calibrate_table(model, table)
    assert expected.n == len(table) - 1
    results = ThreadGroup(3).run(
        monkeypatch, lambda runtime: sharded.calibrate_sharded(model, table, runtime, features=features))
    for got in results:   # every rank fits the same temperatures on all the rows
        assert got.n == expected.n and got.fitted_on == expected.fitted_on == "val.csv"
        for name in ("temperatures", "flat_temperatures"):
            np.testing.assert_allclose(getattr(got, name), getattr(expected, name), rtol=TEMPERATURE_RTOL,
                                       err_msg=name)
        # ECE is binned: a confidence that float32 rounding moves across a bin edge shifts it by ~1/n of a bin
        for name in ("ece_before", "ece_after", "flat_ece_before", "flat_ece_after"):
            np.testing.assert_allclose(getattr(got, name), getattr(expected, name), rtol=0, atol=ECE_ATOL,
                                       err_msg=name)
    assert results[0].temperatures != [1.0] * 4          # a fit happened (not the default)


def test_a_cache_of_another_table_or_another_backbone_is_refused(model, table, features):
    with pytest.raises(ValueError, match="feature cache has 21 rows"):
        sharded.evaluate_sharded(model, table.subset(np.arange(5)), Runtime(torch.device("cpu")), features=features)
    assert sharded.features_of_encoder(features, model.encoder) is features
    other = SimpleNamespace(manifest={"components": {"encoder": "another backbone's fingerprint"}}, cache_dir="x")
    assert sharded.features_of_encoder(other, model.encoder) is None


def test_ranks_without_rows_take_part(model, table, features, monkeypatch):
    """More ranks than rows: the ranks with an empty share still join every gather; nothing changes."""
    world_size = len(table) + 2
    expected = evaluate.evaluate_model(model, table)
    results = ThreadGroup(world_size).run(
        monkeypatch, lambda runtime: sharded.evaluate_sharded(model, table, runtime, features=features))
    assert_same_metrics(results[0], expected)
    fitted = evaluate.calibrate_table(model, table)
    results = ThreadGroup(world_size).run(
        monkeypatch, lambda runtime: sharded.calibrate_sharded(model, table, runtime, features=features))
    np.testing.assert_allclose(results[-1].temperatures, fitted.temperatures, rtol=TEMPERATURE_RTOL)
    np.testing.assert_allclose(results[-1].flat_temperatures, fitted.flat_temperatures, rtol=TEMPERATURE_RTOL)
