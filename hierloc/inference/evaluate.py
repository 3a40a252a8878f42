"""Evaluation shared by `hierloc eval`, the Python API (`HierLoc.evaluate`) and the benchmarks.

Two entry points, one set of metrics (`hierloc.inference.metrics`, OSV5M's definitions):

* `evaluate_model(model, table)`: predicts every image of a labelled table (streamed in batches through a
  DataLoader) and scores the predicted points and paths.
* `evaluate_predictions_csv(path)`: scores an existing predictions CSV (`pred_lat,pred_lon,true_lat,true_lon` by
  default), so any model's output is scored with the same protocol; no model needed.

Summary keys (numbers only, so training can log them; fractions in [0, 1], NaN when a level has no valid row):

    n                      rows scored
    mean_km, median_km     haversine distance (R = 6371 km)
    geoscore               mean of 5000 exp(-d_km / 1492.7)
    acc_1km ... acc_2500km fraction with d < r (strict, as OSV5M)
    acc_country ... acc_city, n_country ... n_city
        OSV5M's protocol: reverse-geocode the predicted point and the true point with reverse_geocoder and compare
        the keys cc, admin1_cc, admin2_admin1_cc, name_admin2_admin1_cc; rows whose true key is missing are left
        out of that level (missing="skip") or counted as misses (missing="official", OSV5M's published code).
    path_acc_country ... path_acc_city, path_n_country ... path_n_city        (model evaluation only)
        the predicted path's entity ids vs the true path (`Gazetteer.locate` of the true point), on the same rows
        as the OSV5M protocol; a true entity missing from the model's gazetteer is a miss (no path can reach it).
    ece_country ... ece_city, coverage90_country ... coverage90_city, minprob90_country ... minprob90_city
        (model evaluation only) calibration of the best full path's reported probabilities against the true path
        (`hierloc.inference.calibration.calibration_summary`; docs/calibration.md).
    n_failed               images that could not be read (left out of every metric)
    n_skipped_rows         CSV rows skipped for bad coordinates (on_bad="skip")
"""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gazetteer import csvio
from gazetteer.atomic import atomic_open, is_same_file
from gazetteer.schema import LEVELS, N_LEVELS
from hierloc.data.prediction import path_batches, with_progress
from hierloc.device import pin_memory_for, to_device
from hierloc.errors import InputError
from hierloc.inference import calibration, familiarity_fit, metrics, unlike
from hierloc.inference.answers import cut_paths
from hierloc.model import modeldir

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("n", "mean_km", "median_km", "geoscore", "acc_1km", "acc_25km", "acc_200km", "acc_750km",
                 "acc_2500km", "acc_country", "acc_region", "acc_subregion", "acc_city")
PER_SAMPLE_SCORE_COLUMNS = ("distance_km", "geoscore") + tuple(f"hit_{level}" for level in LEVELS)
OUTSIDE_GAZETTEER_KEY = "<outside the gazetteer>"
UNLIKE_SHARE = 0.5   # degraded copies added to a familiarity calibration, as a share of the calibration images


# ------------------------------------------------------------------------------------------- prediction
def embed_table(model, table, batch_size: int = 64, num_workers: int = 0, progress: bool = False,
                features: bool = False, transform=None) -> tuple:
    """Image points of every row of an ImageTable: (N, D) float32 (zeros where unreadable), ok (N,) bool, and
    {row index: reason} for the unreadable images; with ``features`` also the (N, F) backbone features.
    transform: applied to each batch of normalised pixels (b, 3, S, S) float32 (the loader's uint8 pixels through
    the encoder's preprocessor's `normalise`) -> (b, 3, S, S) before the encoder."""
    points, feats = None, None
    ok = np.zeros(len(table), dtype=bool)
    errors: dict[int, str] = {}
    for batch in _batches(model, table, batch_size, num_workers, progress):
        errors.update({int(index): str(reason) for index, _path, reason in batch["failed"]})
        index = batch["index"].numpy()
        if not index.size:
            continue
        pixels = batch["pixel_values"]
        if transform is not None:
            pixels = transform(model.encoder.preprocessor.normalise(pixels), index)
        embedded, batch_feats = model.embed_pixels(pixels, features=True)
        if points is None:
            points = torch.zeros(len(table), embedded.shape[1], dtype=torch.float32)
            feats = torch.zeros(len(table), batch_feats.shape[1], dtype=torch.float32)
        points[torch.from_numpy(index)] = embedded.float().cpu()
        feats[torch.from_numpy(index)] = batch_feats.float().cpu()
        ok[index] = True
    if points is None:
        points = torch.zeros(len(table), int(model.cfg.model.embed_dim), dtype=torch.float32)
        feats = torch.zeros(len(table), 0, dtype=torch.float32)
    return (points, ok, errors, feats) if features else (points, ok, errors)


def paths_from_points(model, points: torch.Tensor, beam: int | None = None, flat: bool = False,
                      min_prob: float | None = None, max_level: str = "city", batch_size: int = 256,
                      novelty: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Best answers for (N, D) image points: paths (N, 4) global ids after the backoff cut (-1 = not answered),
    best_paths (N, 4) the best full paths before the cut, probs (N, 4) level probabilities of the best path,
    pred_lat_deg / pred_lon_deg (N,) (deepest answered entity's coordinate, NaN for an empty path)."""
    if max_level not in LEVELS:
        raise InputError(f"max_level {max_level!r}: expected one of {', '.join(LEVELS)}")
    n = points.shape[0]
    paths = np.full((n, N_LEVELS), -1, dtype=np.int64)
    best_paths = paths.copy()
    probs = np.zeros((n, N_LEVELS), dtype=np.float32)
    for start in range(0, n, batch_size):
        chunk = to_device(points[start:start + batch_size], model.device)
        result = model.search_points(chunk, beam=beam, top_k=1, flat=flat,
                                     novelty=None if novelty is None else novelty[start:start + batch_size])
        best = result.paths[:, 0].cpu().numpy()
        best_probs = result.level_probs[:, 0].cpu().numpy()
        paths[start:start + len(chunk)] = cut_paths(best, best_probs, min_prob, LEVELS.index(max_level))
        best_paths[start:start + len(chunk)] = best
        probs[start:start + len(chunk)] = best_probs
    return {"paths": paths, "best_paths": best_paths, "probs": probs, **_points_of(model.gazetteer, paths)}


def _points_of(gaz, paths: np.ndarray) -> dict[str, np.ndarray]:
    deepest = paths.max(axis=1)
    lat = np.where(deepest >= 0, np.asarray(gaz.lat_deg)[deepest.clip(0)], np.nan)
    lon = np.where(deepest >= 0, np.asarray(gaz.lon_deg)[deepest.clip(0)], np.nan)
    return {"pred_lat_deg": lat, "pred_lon_deg": lon}


def predict_table(model, table, beam: int | None = None, flat: bool = False, min_prob: float | None = None,
                  max_level: str = "city", batch_size: int = 64, num_workers: int = 0, progress: bool = False,
                  keep_points: bool = False, embedded=None) -> dict[str, Any]:
    """Stream an ImageTable through the model: `paths_from_points`' arrays for all N rows plus ok (N,) bool
    (False = unreadable image; its path is all -1) and errors {row index: reason}. Memory: O(N) small arrays;
    with keep_points also "points" (N, D) float32, the image points (zeros where unreadable).
    embedded: the image points already at hand, as `_embedded_batches` yields them (e.g. from cached backbone
    features; rows never yielded count as unreadable): the images are then not read."""
    n = len(table)
    out: dict[str, Any] = {"paths": np.full((n, N_LEVELS), -1, dtype=np.int64),
                           "best_paths": np.full((n, N_LEVELS), -1, dtype=np.int64),
                           "probs": np.zeros((n, N_LEVELS), dtype=np.float32), "ok": np.zeros(n, dtype=bool),
                           "errors": {}}
    if keep_points:
        out["points"] = torch.zeros(n, int(model.cfg.model.embed_dim), dtype=torch.float32)
        out["novelty"] = np.full(n, np.nan)
    if embedded is None:
        embedded = _embedded_batches(model, table, out["errors"], batch_size, num_workers, progress)
    for index, points, novelty in embedded:
        answer = paths_from_points(model, points, beam=beam, flat=flat, min_prob=min_prob, max_level=max_level,
                                   batch_size=len(index), novelty=novelty)
        if keep_points and novelty is not None:
            out["novelty"][index] = novelty
        for key in ("paths", "best_paths", "probs"):
            out[key][index] = answer[key]
        out["ok"][index] = True
        if keep_points:
            out["points"][torch.from_numpy(index)] = points.float().cpu()
    return {**out, **_points_of(model.gazetteer, out["paths"])}


def _embedded_batches(model, table, errors: dict[int, str], batch_size: int, num_workers: int, progress: bool):
    """Yield (row indices (b,) int64, image points (b, D), their `feature_novelty` (b,) or None) per batch of
    readable images; the unreadable ones go into ``errors`` {row index: reason}."""
    for batch in _batches(model, table, batch_size, num_workers, progress):
        errors.update({int(index): str(reason) for index, _path, reason in batch["failed"]})
        index = batch["index"].numpy()
        if index.size:
            points, feats = model.embed_pixels(batch["pixel_values"], features=True)
            yield index, points, model.feature_novelty(feats)


def _batches(model, table, batch_size: int, num_workers: int, progress: bool):
    batches = path_batches(table.paths, model.encoder.preprocessor, "ignore", batch_size, num_workers,
                           pin_memory=pin_memory_for(model.device))
    return with_progress(batches, len(table.paths), "evaluate", progress)


# ---------------------------------------------------------------------------------------------- scoring
def score_points(pred_lat_deg, pred_lon_deg, true_lat_deg, true_lon_deg, missing: str = "skip",
                 true_fields: tuple | None = None) -> tuple[dict, dict]:
    """Distance metrics and OSV5M administrative accuracy of N predicted points against N true points.

    All inputs (N,) degrees. true_fields: reverse-geocoder fields (cc, admin1, admin2, name) of the true points,
    when already known (else computed). Returns (summary, per_row): summary has the keys of the module docstring
    (without path_*); per_row has distance_km, geoscore (N,) float64 and hit_<level> (N,) object arrays holding
    1/0, or "" where that row does not count for the level.
    """
    if missing not in metrics.MISSING_MODES:
        raise InputError(f"missing={missing!r}: expected one of {', '.join(metrics.MISSING_MODES)}")
    summary = metrics.distance_metrics(pred_lat_deg, pred_lon_deg, true_lat_deg, true_lon_deg)
    samples = metrics.per_sample(pred_lat_deg, pred_lon_deg, true_lat_deg, true_lon_deg)
    if true_fields is None:
        true_fields = metrics.reverse_geocode(true_lat_deg, true_lon_deg)
    true_keys = metrics.osv5m_level_keys(*true_fields)
    pred_keys = metrics.osv5m_level_keys(*metrics.reverse_geocode(pred_lat_deg, pred_lon_deg))
    summary.update(metrics.osv5m_level_accuracy(pred_keys, true_keys, missing=missing))
    hits = metrics.osv5m_level_hits(pred_keys, true_keys, missing=missing)
    per_row: dict[str, np.ndarray] = dict(samples)
    for level in LEVELS:
        column = np.where(hits[f"hit_{level}"], 1, 0).astype(object)
        column[~hits[f"valid_{level}"]] = ""
        per_row[f"hit_{level}"] = column
    return summary, per_row


def path_accuracy(pred_paths: np.ndarray, true_paths: np.ndarray, true_fields: tuple,
                  missing: str = "skip") -> dict[str, float]:
    """Per-level accuracy of predicted entity ids against the true path.

    pred_paths, true_paths: (N, 4) global entity ids (-1: not answered / true entity not in the gazetteer).
    true_fields: reverse-geocoder fields (cc, admin1, admin2, name) (N,) of the true points, which decide, as in
    the OSV5M protocol, which rows have a truth at each level. Returns path_acc_<level> and path_n_<level>.
    """
    osv5m_true = metrics.osv5m_level_keys(*true_fields)
    true_keys, pred_keys = [], []
    for level in range(N_LEVELS):
        truth = true_paths[:, level]
        keys = np.where(truth >= 0, truth.astype(str).astype(object), OUTSIDE_GAZETTEER_KEY).astype(object)
        keys[osv5m_true[level] == metrics.MISSING_KEY] = metrics.MISSING_KEY
        true_keys.append(keys)
        pred = pred_paths[:, level]
        pred_keys.append(np.where(pred >= 0, pred.astype(str).astype(object), metrics.MISSING_KEY).astype(object))
    accuracy = metrics.osv5m_level_accuracy(pred_keys, true_keys, missing=missing)
    return {f"path_{key}": value for key, value in accuracy.items()}


def summarize_model_predictions(model, predictions: dict, table, missing: str = "skip"
                                ) -> tuple[dict, dict | None]:
    """Metrics (summary, per-row arrays of the scored rows) for `predict_table`'s output on an ImageTable."""
    scored = predictions["ok"] & np.isfinite(predictions["pred_lat_deg"])
    n_failed = int((~scored).sum())
    if not scored.any():
        raise InputError(f"{table.source or 'evaluation table'}: none of the {len(table)} images could be "
                         "predicted (see the warnings above for the reasons)")
    true_lat, true_lon = np.asarray(table.lat_deg)[scored], np.asarray(table.lon_deg)[scored]
    true_fields = metrics.reverse_geocode(true_lat, true_lon)
    summary, per_row = score_points(predictions["pred_lat_deg"][scored], predictions["pred_lon_deg"][scored],
                                    true_lat, true_lon, missing=missing, true_fields=true_fields)
    true_paths = model.gazetteer.locate(true_lat, true_lon)
    summary.update(path_accuracy(predictions["paths"][scored], true_paths, true_fields, missing=missing))
    summary["n_failed"] = n_failed
    summary["n_skipped_rows"] = int(getattr(table, "n_skipped", 0))
    per_row["true_paths"] = true_paths
    per_row["scored"] = scored
    return summary, per_row


def evaluate_model(model, table, beam: int | None = None, flat: bool = False, min_prob: float | None = None,
                   max_level: str = "city", missing: str = "skip", batch_size: int = 64, num_workers: int = 0,
                   progress: bool = False, per_sample: str | os.PathLike | None = None,
                   reliability: str | os.PathLike | None = None) -> dict:
    """Predict every image of a labelled ImageTable with a `HierLoc` model and score it (keys: module docstring).

    per_sample: write one CSV row per table row (atomically): row, image, status, error, true_lat, true_lon,
    pred_lat, pred_lon, precision, pred_<level>_id, pred_<level>_prob, true_<level>_id, distance_km, geoscore,
    hit_<level>. Its pred_lat/pred_lon/true_lat/true_lon columns are what `hierloc eval --predictions` reads.
    reliability: write the reliability diagram (PNG) of beam and flat search on the scored rows
    (`calibration.write_search_reliability_diagram`; the images are embedded once).
    """
    for output in (per_sample, reliability):
        if output is not None and table.source and is_same_file(table.source, output):
            raise InputError(f"output {output} is the input CSV; inputs are never modified")
    if reliability is not None and Path(reliability).suffix.lower() != ".png":
        raise InputError(f"reliability diagram {reliability}: expected a .png file name")
    predictions = predict_table(model, table, beam=beam, flat=flat, min_prob=min_prob, max_level=max_level,
                                batch_size=batch_size, num_workers=num_workers, progress=progress,
                                keep_points=True)
    summary, per_row = summarize_model_predictions(model, predictions, table, missing=missing)
    scored = per_row["scored"]
    summary.update(calibration.calibration_summary(predictions["best_paths"][scored], predictions["probs"][scored],
                                                   per_row["true_paths"]))
    summary.update(familiarity_fit.sets_and_radius_summary(
        model, predictions["points"][torch.from_numpy(scored)], per_row["true_paths"],
        np.asarray(table.lat_deg)[scored], np.asarray(table.lon_deg)[scored], beam=beam, flat=flat,
        novelty=predictions["novelty"][scored]))
    if per_sample is not None:
        _write_model_per_sample(per_sample, model.gazetteer, table, predictions, per_row)
    if reliability is not None:
        calibration.write_search_reliability_diagram(
            model, predictions["points"][torch.from_numpy(scored)], per_row["true_paths"], reliability, beam=beam,
            title=f"reliability on {Path(table.source).name if table.source else 'the table'} "
                  f"({int(scored.sum())} images): accuracy against reported probability")
    return summary


def calibrate_table(model, table, beam: int | None = None, flat: bool = True, batch_size: int = 64,
                    num_workers: int = 0, progress: bool = False, train_table=None,
                    unlike_share: float = UNLIKE_SHARE) -> modeldir.Calibration:
    """Fit the calibration of a `HierLoc` model's reported probabilities on labelled ImageTables.

    table: one ImageTable or a list of them (pooled: e.g. held-out places plus held-out images of familiar places).
    The images are embedded once. Always: one temperature per level for beam search (and, with ``flat``, the flat
    search), re-running the search at each trial temperature (`calibration.fit_search_temperatures`). With a
    ``train_table`` (a sample of the training images): also the calibration conditioned on familiarity, the
    prediction-set references and the error radius (`familiarity_fit.fit_familiarity`), which then replace the
    temperatures; that fit also sees degraded copies of a share ``unlike_share`` of the calibration images
    (`hierloc.inference.unlike`). A row counts at level l when its best path answers that level; it is correct when that entity
    is the true point's (`Gazetteer.locate`). Returns the `modeldir.Calibration` (weights_sha256 unset: the caller
    knows which weights file it belongs to).
    """
    tables_in = table if isinstance(table, (list, tuple)) else [table]
    parts, unlike_parts = [], []
    pre = model.encoder.preprocessor
    for one in tables_in:
        points, ok, _, feats = embed_table(model, one, batch_size=batch_size, num_workers=num_workers,
                                           progress=progress, features=True)
        if not ok.any():
            raise InputError(f"{one.source or 'calibration table'}: none of the {len(one)} images could be read")
        parts.append((points[torch.from_numpy(ok)], feats[torch.from_numpy(ok)], np.asarray(one.lat_deg)[ok],
                      np.asarray(one.lon_deg)[ok]))
        if train_table is not None and unlike_share > 0:
            rows = np.sort(np.random.default_rng(len(unlike_parts)).permutation(np.flatnonzero(ok))[
                :int(round(unlike_share * ok.sum()))])
            if rows.size:
                sub = one.subset(rows)
                u_points, u_ok, _, u_feats = embed_table(
                    model, sub, batch_size=batch_size, num_workers=num_workers, progress=progress, features=True,
                    transform=lambda pixels, index, r=rows: unlike.degrade(pixels, pre.mean, pre.std, r[index]))
                unlike_parts.append((u_points[torch.from_numpy(u_ok)], u_feats[torch.from_numpy(u_ok)],
                                     np.asarray(sub.lat_deg)[u_ok], np.asarray(sub.lon_deg)[u_ok]))
    points = torch.cat([p[0] for p in parts])
    true_lat, true_lon = np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])
    true_paths = model.gazetteer.locate(true_lat, true_lon)
    searcher = familiarity_fit.CachedSearch(model, points)
    fields: dict[str, Any] = calibration.search_temperature_fields(searcher, searcher.points, true_paths, beam=beam,
                                                                   flat=flat)
    n_unlike = 0
    if train_table is not None:
        train_points, train_ok, _, train_feats = embed_table(model, train_table, batch_size=batch_size,
                                                             num_workers=num_workers, progress=progress,
                                                             features=True)
        if train_ok.sum() < 3:
            raise InputError(f"{train_table.source or 'training table'}: fewer than 3 readable training images")
        every = parts + unlike_parts
        n_unlike = sum(len(p[0]) for p in unlike_parts)
        all_lat, all_lon = np.concatenate([p[2] for p in every]), np.concatenate([p[3] for p in every])
        fitted = familiarity_fit.fit_familiarity(
            model, torch.cat([p[0] for p in every]), torch.cat([p[1] for p in every]).double().numpy(),
            model.gazetteer.locate(all_lat, all_lon), all_lat, all_lon, train_points[torch.from_numpy(train_ok)],
            train_feats[torch.from_numpy(train_ok)].double().numpy(), beam=beam, flat=flat)
        fields["familiarity"] = fitted.to_dict()
    names = [Path(one.source).name if one.source else "<table>" for one in tables_in]
    return modeldir.Calibration(**fields, fitted_on=", ".join(names), n=int(points.shape[0]), n_unlike=n_unlike,
                                beam=model.search_options(beam)[0])


def _write_model_per_sample(out_path, gaz, table, predictions: dict, per_row: dict) -> None:
    keys = np.append(np.asarray(gaz.keys, dtype=object), "")  # index -1 -> ""
    scored = per_row["scored"]
    position = np.cumsum(scored) - 1  # row -> index among scored rows
    header = (["row", "image", "status", "error", "true_lat", "true_lon", "pred_lat", "pred_lon", "precision"]
              + [f"pred_{level}_id" for level in LEVELS] + [f"pred_{level}_prob" for level in LEVELS]
              + [f"true_{level}_id" for level in LEVELS] + list(PER_SAMPLE_SCORE_COLUMNS))
    with atomic_open(out_path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        for i in range(len(table)):
            row: list[Any] = [int(table.rows[i]), str(table.paths[i])]
            if scored[i]:
                j = int(position[i])
                path = predictions["paths"][i]
                depth = int((path >= 0).sum())
                row += ["ok", "", repr(float(table.lat_deg[i])), repr(float(table.lon_deg[i])),
                        repr(float(predictions["pred_lat_deg"][i])), repr(float(predictions["pred_lon_deg"][i])),
                        LEVELS[depth - 1] if depth else ""]
                row += [keys[p] for p in path]
                row += [f"{predictions['probs'][i, lv]:.6g}" if path[lv] >= 0 else "" for lv in range(N_LEVELS)]
                row += [keys[p] for p in per_row["true_paths"][j]]
                row += [repr(float(per_row["distance_km"][j])), repr(float(per_row["geoscore"][j]))]
                row += [per_row[f"hit_{level}"][j] for level in LEVELS]
            else:
                reason = predictions["errors"].get(i, "no prediction")
                row += ["error", reason, repr(float(table.lat_deg[i])), repr(float(table.lon_deg[i]))]
                row += [""] * (len(header) - len(row))
            writer.writerow(row)


# ------------------------------------------------------------------------------------ predictions files
def evaluate_predictions_csv(path: str | os.PathLike, pred_lat_col: str = "pred_lat",
                             pred_lon_col: str = "pred_lon", true_lat_col: str = "true_lat",
                             true_lon_col: str = "true_lon", missing: str = "skip", on_bad: str = "error",
                             per_sample: str | os.PathLike | None = None) -> dict:
    """Score a CSV of predicted and true points (no model): `score_points` summary + n_skipped_rows.

    Truth levels come from reverse-geocoding the true points (OSV5M's labels). on_bad="error": InputError naming
    the first row with an empty, non-numeric or out-of-range coordinate; "skip": such rows are dropped and counted.
    per_sample: a copy of the input with distance_km, geoscore, hit_<level> appended (replaced when the input
    already has such columns), scored rows only; written atomically, never over the input.
    """
    path = Path(path)
    if on_bad not in ("error", "skip"):
        raise InputError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    header = csvio.read_header(path)
    columns = [csvio.find_column(header, name, (), path, role) for name, role in
               ((pred_lat_col, "predicted latitude"), (pred_lon_col, "predicted longitude"),
                (true_lat_col, "true latitude"), (true_lon_col, "true longitude"))]
    if len(set(columns)) < 4:
        raise InputError(f"{path}: the predicted and true latitude/longitude columns must be 4 different columns, "
                         f"got {', '.join(columns)}")
    if per_sample is not None and is_same_file(path, per_sample):
        raise InputError(f"--per-sample {per_sample} is the input file; choose another path (inputs are never "
                         "modified)")
    parts: dict[str, list[np.ndarray]] = {"pred_lat": [], "pred_lon": [], "true_lat": [], "true_lon": [], "rows": []}
    n_rows = n_skipped = 0
    for chunk, rows in csvio.iter_chunks(path, columns):
        pred_lat, pred_lon, keep_pred, _ = csvio.parse_coordinates(chunk[columns[0]], chunk[columns[1]], rows, path,
                                                                    columns[0], columns[1], on_bad)
        true_lat, true_lon, keep_true, _ = csvio.parse_coordinates(chunk[columns[2]], chunk[columns[3]], rows, path,
                                                                    columns[2], columns[3], on_bad)
        keep = keep_pred & keep_true
        n_rows += len(rows)
        n_skipped += int((~keep).sum())
        for name, values in (("pred_lat", pred_lat), ("pred_lon", pred_lon), ("true_lat", true_lat),
                             ("true_lon", true_lon), ("rows", rows)):
            parts[name].append(np.asarray(values)[keep])
    if n_rows == 0:
        raise InputError(f"{path}: no data rows (only a header)")
    if n_skipped == n_rows:
        raise InputError(f"{path}: all {n_rows} rows have a bad coordinate; nothing to score")
    if n_skipped:
        logger.warning("%s: skipped %d of %d rows with a bad coordinate", path, n_skipped, n_rows)
    arrays = {name: np.concatenate(values) for name, values in parts.items()}
    summary, per_row = score_points(arrays["pred_lat"], arrays["pred_lon"], arrays["true_lat"], arrays["true_lon"],
                                    missing=missing)
    summary["n_skipped_rows"] = n_skipped
    if per_sample is not None:
        _write_predictions_per_sample(path, per_sample, header, arrays["rows"], per_row)
    return summary


def _write_predictions_per_sample(in_path: Path, out_path, header: list[str], scored_rows: np.ndarray,
                                  per_row: dict) -> None:
    """Copy the scored input rows, appending (or replacing) the per-row score columns."""
    out_header = list(header)
    positions = []
    for name in PER_SAMPLE_SCORE_COLUMNS:
        if name not in out_header:
            out_header.append(name)
        positions.append(out_header.index(name))
    values = [[repr(float(v)) for v in per_row["distance_km"]], [repr(float(v)) for v in per_row["geoscore"]]]
    values += [per_row[f"hit_{level}"].tolist() for level in LEVELS]
    position_of_row = {int(row): i for i, row in enumerate(scored_rows.tolist())}
    with atomic_open(out_path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(out_header)
        for rows, numbers in csvio.iter_rows(in_path):
            for fields, number in zip(rows, numbers.tolist()):
                j = position_of_row.get(int(number))
                if j is None:
                    continue
                fields = fields + [""] * (len(out_header) - len(fields))
                for position, column in zip(positions, values):
                    fields[position] = column[j]
                writer.writerow(fields)


# ------------------------------------------------------------------------------------------- reporting
def _pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100.0 * value:5.1f}%"


def _set_cell(summary: dict, prefix: str, level: str) -> str:
    """"coverage, mean size" of one kind of prediction set at one level ("-" when no row has a true entity)."""
    size = summary[f"{prefix}size_{level}"]
    if not math.isfinite(size):
        return "-"
    return f"{_pct(summary[f'{prefix}coverage_{level}'])}, {size:.1f}"


def format_table(summary: dict, title: str = "") -> str:
    """A human-readable table of a summary (what `hierloc eval` prints by default)."""
    lines = [title] if title else []
    failed = summary.get("n_failed")
    extra = []
    if failed is not None:
        extra.append(f"{failed} images unreadable")
    if summary.get("n_skipped_rows"):
        extra.append(f"{summary['n_skipped_rows']} bad rows skipped")
    lines.append(f"  samples scored     {summary['n']}" + (f"  ({', '.join(extra)})" if extra else ""))
    lines.append(f"  mean distance      {summary['mean_km']:.1f} km")
    lines.append(f"  median distance    {summary['median_km']:.1f} km")
    lines.append(f"  GeoScore           {summary['geoscore']:.1f}  (mean of 5000 exp(-d / 1492.7 km))")
    radii = "  ".join(f"{radius} km {_pct(summary[f'acc_{radius}km']).strip()}" for radius in metrics.RADII_KM)
    lines.append(f"  within             {radii}")
    has_path = "path_acc_country" in summary
    lines.append("")
    lines.append(f"  {'level':<11}{'OSV5M protocol (reverse geocoding)':<38}"
                 + ("predicted path vs true path (entity ids)" if has_path else ""))
    for level in LEVELS:
        osv5m = f"{_pct(summary[f'acc_{level}'])}  (n={summary[f'n_{level}']})"
        path = f"{_pct(summary[f'path_acc_{level}'])}  (n={summary[f'path_n_{level}']})" if has_path else ""
        lines.append(f"  {level:<11}{osv5m:<38}{path}")
    if "ece_country" in summary:
        lines.append("")
        lines.append(f"  {'level':<11}{'calibration error (ECE)':<26}answers kept at 90% precision (with --min-prob)")
        for level in LEVELS:
            ece = summary[f"ece_{level}"]
            threshold = summary[f"minprob90_{level}"]
            kept = (f"{_pct(summary[f'coverage90_{level}'])}  (--min-prob {threshold:.3g})"
                    if math.isfinite(threshold) else "none")
            lines.append(f"  {level:<11}{'-' if not math.isfinite(ece) else f'{ece:.3f}':<26}{kept}")
    if "set_coverage_country" in summary:
        lines.append("")
        lines.append(f"  {'level':<11}{'mean p':<10}{'90% sets: coverage, mean size':<32}"
                     + ("conformal reference" if "conformal_set_coverage_country" in summary else ""))
        for level in LEVELS:
            sets = _set_cell(summary, "set_", level)
            reference = (_set_cell(summary, "conformal_set_", level)
                         if f"conformal_set_coverage_{level}" in summary else "")
            mean_p = summary[f"mean_prob_{level}"]
            lines.append(f"  {level:<11}{'-' if not math.isfinite(mean_p) else f'{mean_p:.3f}':<10}{sets:<32}"
                         f"{reference}")
    if "radius90_coverage" in summary:
        lines.append(f"  radius90_km        truth within it {_pct(summary['radius90_coverage']).strip()}, median "
                     f"{summary['radius90_median_km']:,.0f} km (fixed {summary['fixed_radius_km']:,.0f} km: "
                     f"{_pct(summary['fixed_radius_coverage']).strip()})")
    return "\n".join(line.rstrip() for line in lines)
