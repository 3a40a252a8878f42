"""Validation and calibration split across the ranks of a run, as `hierloc train --val-csv` runs them after every
epoch (`evaluate_sharded`) and on the model directory it has written (`calibrate_sharded`).

Every rank takes its contiguous share of the table's rows (`hierloc.device.shard_bounds`, the split of feature
extraction), embeds it - from the rows' cached backbone features with a frozen backbone (no backbone forward), else
from the images - and searches it. The per-row outcomes are gathered on every rank
(`hierloc.device.all_gather_objects`; gloo and NCCL) and the metrics, or the temperatures, are computed on all the
rows as in one process (`evaluate.evaluate_model`, `evaluate.calibrate_table`): the same numbers up to the float32
rounding of embedding and searching in other batch shapes. In a single process the share is the whole table.

features: an object with a feature cache's interface (`hierloc.training.features.FeatureCache`: len() = N,
valid_mask (N,) bool, [rows] -> (k, F) float32) whose rows are the table's rows.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from hierloc.device import Runtime, all_gather_objects, shard_bounds
from hierloc.errors import InputError
from hierloc.inference import calibration, evaluate, familiarity_fit
from hierloc.model import modeldir

logger = logging.getLogger(__name__)

FEATURE_FAILED = "the image could not be read when its features were extracted"
GATHERED = ("paths", "best_paths", "probs", "ok", "novelty", "pred_lat_deg", "pred_lon_deg")


def local_rows(n_rows: int, runtime: Runtime) -> np.ndarray:
    """(n_r,) int64: this rank's contiguous share of n_rows rows."""
    start, stop = shard_bounds(n_rows, runtime.rank, runtime.world_size)
    return np.arange(start, stop, dtype=np.int64)


def check_features(features, table) -> None:
    """The cached features must have one row per table row (ValueError: a cache of another CSV)."""
    if features is not None and len(features) != len(table):
        raise ValueError(f"the feature cache has {len(features)} rows but {table.source or 'the table'} has "
                         f"{len(table)}")


def feature_batches(model, features, rows: np.ndarray, batch_size: int = 64) -> Iterator[tuple]:
    """Image points of the cached features of table rows ``rows`` (n,), batch_size rows at a time: yields
    (positions in ``rows`` (b,) int64, points (b, D), `feature_novelty` (b,) or None) for the rows whose image was
    read at extraction (the others are never yielded)."""
    valid_mask = np.asarray(features.valid_mask, dtype=bool)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        valid = valid_mask[chunk]
        if not valid.any():
            continue
        feats = torch.from_numpy(features[chunk[valid]])
        yield np.flatnonzero(valid) + start, model.embed_features(feats), model.feature_novelty(feats)


def predict_rows(model, table, rows: np.ndarray, features=None, batch_size: int = 64,
                 num_workers: int = 0) -> dict[str, Any]:
    """`evaluate.predict_table` (with the points) of table rows ``rows``: from the cached features when given,
    else from the images. Indices (arrays, errors) are positions in ``rows``."""
    sub = table.subset(rows)
    if features is None:
        return evaluate.predict_table(model, sub, batch_size=batch_size, num_workers=num_workers, keep_points=True)
    out = evaluate.predict_table(model, sub, keep_points=True,
                                 embedded=feature_batches(model, features, rows, batch_size))
    failed = np.flatnonzero(~np.asarray(features.valid_mask, dtype=bool)[rows])
    out["errors"].update({int(i): FEATURE_FAILED for i in failed})
    return out


def gather_predictions(gather, local: dict[str, Any], start: int) -> dict[str, Any]:
    """Every rank's `predict_rows` (its rows starting at table row ``start``) -> the predictions of the whole
    table (arrays concatenated in rank order, errors keyed by table row)."""
    parts = gather(({key: local[key] for key in GATHERED}, start,
                    {start + index: reason for index, reason in local["errors"].items()}))
    out: dict[str, Any] = {key: np.concatenate([part[0][key] for part in parts]) for key in GATHERED}
    out["errors"] = {index: reason for part in parts for index, reason in part[2].items()}
    return out


def evaluate_sharded(model, table, runtime: Runtime, features=None, batch_size: int = 64, num_workers: int = 0,
                     missing: str = "skip") -> dict:
    """`evaluate.evaluate_model`'s summary of a `HierLoc` model on a labelled ImageTable (default search options),
    each rank predicting its share of the rows (collective: every rank calls it). -> the summary on rank 0, {} on
    the other ranks."""
    check_features(features, table)
    rows = local_rows(len(table), runtime)
    gather = functools.partial(all_gather_objects, runtime)
    local = predict_rows(model, table, rows, features, batch_size, num_workers)
    full = gather_predictions(gather, local, int(rows[0]) if len(rows) else len(table))
    if not (full["ok"] & np.isfinite(full["pred_lat_deg"])).any():
        evaluate.summarize_model_predictions(model, full, table, missing=missing)   # the InputError, on every rank
    scored = local["ok"] & np.isfinite(local["pred_lat_deg"])
    lat, lon = np.asarray(table.lat_deg)[rows][scored], np.asarray(table.lon_deg)[rows][scored]
    sets = familiarity_fit.sets_and_radius_summary(model, local["points"][torch.from_numpy(scored)],
                                                   model.gazetteer.locate(lat, lon), lat, lon,
                                                   novelty=local["novelty"][scored], gather=gather)
    if not runtime.is_main:
        return {}
    summary, per_row = evaluate.summarize_model_predictions(model, full, table, missing=missing)
    all_scored = per_row["scored"]
    summary.update(calibration.calibration_summary(full["best_paths"][all_scored], full["probs"][all_scored],
                                                   per_row["true_paths"]))
    summary.update(sets)
    return summary


def embed_rows(model, table, rows: np.ndarray, features=None, batch_size: int = 64,
               num_workers: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Image points of table rows ``rows`` (n,): (n, D) float32 (zeros where unreadable) and ok (n,) bool."""
    if features is None:
        points, ok, _ = evaluate.embed_table(model, table.subset(rows), batch_size=batch_size,
                                             num_workers=num_workers)
        return points, ok
    points = torch.zeros(len(rows), int(model.cfg.model.embed_dim), dtype=torch.float32)
    ok = np.zeros(len(rows), dtype=bool)
    for index, embedded, _novelty in feature_batches(model, features, rows, batch_size):
        points[torch.from_numpy(index)] = embedded.float().cpu()
        ok[index] = True
    return points, ok


def calibrate_sharded(model, table, runtime: Runtime, features=None, beam: int | None = None, flat: bool = True,
                      batch_size: int = 64, num_workers: int = 0) -> modeldir.Calibration:
    """`evaluate.calibrate_table`'s per-level temperatures (no familiarity) of a `HierLoc` model on a labelled
    ImageTable: each rank embeds its share of the rows and searches it at every trial temperature; the outcomes
    are gathered and every rank fits the same temperatures on all the rows (collective). -> the Calibration
    (weights_sha256 unset), the same on every rank."""
    check_features(features, table)
    rows = local_rows(len(table), runtime)
    gather = functools.partial(all_gather_objects, runtime)
    points, ok = embed_rows(model, table, rows, features, batch_size, num_workers)
    n = sum(gather(int(ok.sum())))
    if n == 0:
        raise InputError(f"{table.source or 'calibration table'}: none of the {len(table)} images could be read")
    lat, lon = np.asarray(table.lat_deg)[rows][ok], np.asarray(table.lon_deg)[rows][ok]
    searcher = familiarity_fit.CachedSearch(model, points[torch.from_numpy(ok)])
    fields = calibration.search_temperature_fields(searcher, searcher.points, model.gazetteer.locate(lat, lon),
                                                   beam=beam, flat=flat, gather=gather)
    return modeldir.Calibration(**fields, fitted_on=Path(table.source).name if table.source else "<table>", n=n,
                                n_unlike=0, beam=model.search_options(beam)[0])


def features_of_encoder(features, encoder):
    """``features`` when the cache was extracted by this encoder (same weights: its manifest's fingerprint), else
    None (logged): the images are then encoded again."""
    if features is None:
        return None
    cached = getattr(features, "manifest", {}).get("components", {}).get("encoder")
    if cached != encoder.fingerprint():
        logger.warning("feature cache %s was extracted by another backbone; encoding the images again",
                       getattr(features, "cache_dir", ""))
        return None
    return features
