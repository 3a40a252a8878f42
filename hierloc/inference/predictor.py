"""The Python API, mirroring `hierloc predict` / `hierloc eval`: the `HierLoc` predictor.

    from hierloc import HierLoc
    model = HierLoc.from_pretrained("runs/demo")
    for p in model.predict(["photo.jpg"], top_k=3):
        print(p.country.name, p.country.probability, p.lat_deg, p.lon_deg)

A model directory holds config.json, model.safetensors, backbone/ and gazetteer/ (see `hierloc.model.modeldir`).

Answers (`hierloc.inference.answers`; see docs/inference.md for the full contract):

* Search: beam search down country -> region -> subregion -> city (`hierloc.inference.search.beam_search`, beam width
  `beam`, default the model's `inference.beam` = 10) or, with `flat=True`, the nearest cities over all cities.
  The answer is the best path; `alternatives` are the next best of the top-k paths.
* Level probabilities: at each level, the softmax of -d^2/tau over that level's candidates (beam: the children of
  the surviving beam; flat: the whole level). A model directory with a calibration.json reports them at its
  per-level temperatures T_l, softmax(-d^2/(tau T_l)) over the same candidates (docs/calibration.md); the paths
  and their order do not change. `calibrated=False` (CLI: `--no-calibration`) reports them at T = 1.
* Backoff: the answer is a *prefix* of the best full path. `max_level` cuts it at that level; `min_prob` cuts it
  before the first level whose probability is below `min_prob` (so every answered level reaches it), except that
  the country is always answered. A capped answer therefore never contradicts the uncapped one.
* Point: the coordinate of the deepest answered entity (mean of its training images' coordinates).
* EXIF (`exif=`): "compare" (default) reports the GPS position stored in the file, if any, next to the
  prediction, with the distance between them; "use" answers images that carry GPS from the GPS itself (the model
  is skipped: path = the gazetteer's entities containing the point, probability 1, point = the GPS position, or
  the deepest answered entity's coordinate when `max_level` is coarser than city; `source == "exif"`);
  "ignore" does not read EXIF. Input files are only ever opened for reading.
"""


from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from gazetteer.geo import haversine_km
from gazetteer.schema import LEVELS, N_LEVELS
from hierloc.config import Config
from hierloc.data import tables
from hierloc.data.encoded import EncodedImage, source_name
from hierloc.data.exif import gps_from_image, read_gps
from hierloc.data.images import to_rgb
from hierloc.data.prediction import is_path_like, load_pixels, make_item, path_batches, with_progress
from hierloc.device import Runtime, encoder_autocast, pin_memory_for, to_device
from hierloc.errors import InputError
from hierloc.inference import evaluate, sharded
from hierloc.inference.names import path_name
from hierloc.inference.familiarity import FamiliarityCalibration, calibrate_result, point_signals
from hierloc.inference.answers import (Alternative, ExifPosition, Failure, LevelAnswer, Prediction, SetMember,
                                       check_options, cut_paths, deepest_entity)
from hierloc.inference.search import EntityDistances, beam_search, child_index, flat_search
from hierloc.model import modeldir
from hierloc.version import __version__


# --------------------------------------------------------------------------------------------- the model
class HierLoc:
    """A trained model ready for inference: encoder, image head, entity table, temperature and gazetteer."""

    def __init__(self, cfg: Config, model, loss_state: dict[str, torch.Tensor], encoder, gaz,
                 device: torch.device | str = "cpu", source: str = "<in memory>",
                 calibration: modeldir.Calibration | None = None, calibrated: bool = True):
        """cfg: the run config; model: the `HierLocModel` (encoder attached); loss_state: the loss's tensors as
        saved in the model directory (the temperature tau comes from them); gaz: the gazetteer it was trained on;
        calibration: the model directory's per-level temperatures (None: uncalibrated); calibrated: report
        probabilities with them (False: at T = 1; the attribute can be changed later)."""
        self.cfg = cfg
        self.calibration = calibration
        self.calibrated = calibrated
        self.familiarity = (None if calibration is None or calibration.familiarity is None else
                            FamiliarityCalibration.from_dict(calibration.familiarity,
                                                             f"{source}/{modeldir.CALIBRATION_NAME}"))
        self.model = model
        self.loss_state = loss_state
        self.tau = modeldir.temperature_of(loss_state)
        self.encoder = encoder
        self.gazetteer = gaz
        self.device = torch.device(device)
        self.source = source
        self._entity_points: torch.Tensor | None = None
        self._search_index: tuple | None = None   # (EntityDistances, ChildIndex), built on first beam search
        self._train_summary: dict | None = None

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str = "auto", calibrated: bool = True,
                        allow_download: bool = False) -> "HierLoc":
        """Load a model directory written by `hierloc train` or `save_pretrained` (`hierloc.model.modeldir`), or a
        Hugging Face Hub id of one (`owner/name`): from the local cache, downloaded only with allow_download.
        device: auto, cpu or cuda. calibrated: report probabilities at the directory's calibration.json
        temperatures, if it has one (False: uncalibrated, T = 1)."""
        parts = modeldir.load_model_dir(model_dir, device=device, allow_download=allow_download)
        return cls(parts.cfg, parts.model, parts.loss_state, parts.encoder, parts.gazetteer, device=parts.device,
                   source=parts.source, calibration=parts.calibration, calibrated=calibrated)

    @classmethod
    def validation_metrics(cls, csv_path: str, cfg: Config, model, loss_state: dict[str, torch.Tensor], encoder,
                           gaz, runtime: Runtime, features=None) -> dict:
        """Metrics of a model in training on a labelled CSV (what `hierloc train --val-csv` reports per epoch;
        passed to `hierloc.training.train.train` as its `validate`). Every rank of the run calls it and scores
        its share of the rows (`sharded.evaluate_sharded`): from ``features`` (the CSV's cached backbone features,
        a frozen backbone) or from the images (cfg.train.num_workers loader workers). -> the metrics on rank 0,
        {} on the others."""
        predictor = cls(cfg, model, loss_state, encoder.to(runtime.device), gaz, device=runtime.device)
        table = tables.read_image_table(csv_path, on_bad="skip")
        return sharded.evaluate_sharded(predictor, table, runtime, features=features,
                                        num_workers=cfg.train.num_workers)

    @classmethod
    def calibrate_in_training(cls, model_dir: str | Path, csv_path: str, runtime: Runtime,
                              features=None) -> modeldir.Calibration:
        """What `hierloc train --val-csv` runs on the model directory it has just written (its `calibrate`): every
        rank loads the directory and searches its share of the CSV's rows (from ``features``, the CSV's cached
        backbone features, when they come from this model's backbone), the per-level temperatures are fitted on
        all the rows (`sharded.calibrate_sharded`) and rank 0 writes calibration.json. -> the calibration."""
        parts = modeldir.load_model_dir(model_dir, device=str(runtime.device))
        model = cls(parts.cfg, parts.model, parts.loss_state, parts.encoder, parts.gazetteer,
                    device=parts.device, source=parts.source)
        table = tables.read_image_table(csv_path, on_bad="skip")
        result = sharded.calibrate_sharded(model, table, runtime,
                                           features=sharded.features_of_encoder(features, parts.encoder),
                                           num_workers=parts.cfg.train.num_workers)
        if runtime.is_main:
            result.weights_sha256 = modeldir.weights_digest(model_dir)
            modeldir.write_calibration(model_dir, result)
        return result

    @classmethod
    def calibrate_model_dir(cls, model_dir: str | Path, csv_path, device: torch.device | str = "auto",
                            image_root: str | None = None, beam: int | None = None, flat: bool = True,
                            batch_size: int = 64, num_workers: int = 0, progress: bool = False,
                            on_bad: str = "error", train_csv: str | Path | None = None,
                            train_sample: int = 2000, unlike_share: float = evaluate.UNLIKE_SHARE
                            ) -> modeldir.Calibration:
        """`hierloc calibrate`: fit the model directory's calibration on labelled CSVs (`calibrate`) and write it
        to its calibration.json (atomically), tied to its weights. Returns the calibration. (`hierloc train
        --val-csv` fits the temperatures with `calibrate_in_training`, split across its ranks.)"""
        parts = modeldir.load_model_dir(model_dir, device=str(device),   # an old calibration is not read
                                        with_calibration=False)           # (it may be damaged): it is replaced
        model = cls(parts.cfg, parts.model, parts.loss_state, parts.encoder, parts.gazetteer,
                    device=parts.device, source=parts.source)
        result = model.calibrate(csv_path, image_root=image_root, beam=beam, flat=flat, batch_size=batch_size,
                                 num_workers=num_workers, progress=progress, on_bad=on_bad, train_csv=train_csv,
                                 train_sample=train_sample, unlike_share=unlike_share)
        result.weights_sha256 = modeldir.weights_digest(model_dir)
        modeldir.write_calibration(model_dir, result)
        return result

    def calibrate(self, csv_path, image_root: str | None = None, beam: int | None = None,
                  flat: bool = True, batch_size: int = 64, num_workers: int = 0, progress: bool = False,
                  on_bad: str = "error", train_csv: str | Path | None = None,
                  train_sample: int = 2000, unlike_share: float = evaluate.UNLIKE_SHARE) -> modeldir.Calibration:
        """Fit the calibration of the reported probabilities on labelled CSVs (one path or a list: validation
        splits, never the test set) and use it from now on (`evaluate.calibrate_table`; `save_pretrained` keeps
        it). beam: the beam width fitted for (default: the model's); flat: also fit the flat search's. train_csv:
        the training CSV, of which ``train_sample`` rows (a seeded draw) tell what a familiar image looks like:
        with it, the calibration is conditioned on familiarity and adds prediction sets and an error radius
        (docs/calibration.md), fitted with degraded copies of a share ``unlike_share`` of the calibration images;
        without it, one temperature per level."""
        paths = [csv_path] if isinstance(csv_path, (str, os.PathLike)) else list(csv_path)
        table = [tables.read_image_table(path, image_root=image_root, on_bad=on_bad) for path in paths]
        train_table = None
        if train_csv is not None:
            if train_sample < 3:
                raise InputError(f"train_sample {train_sample!r}: expected an integer >= 3")
            if not 0.0 <= unlike_share <= 1.0:
                raise InputError(f"unlike_share {unlike_share!r}: expected a share in [0, 1]")
            train_table = tables.read_image_table(train_csv, on_bad="skip")
            if len(train_table) > train_sample:
                chosen = np.sort(np.random.default_rng(0).choice(len(train_table), train_sample, replace=False))
                train_table = train_table.subset(chosen)
        self.calibration = evaluate.calibrate_table(self, table, beam=beam, flat=flat, batch_size=batch_size,
                                                    num_workers=num_workers, progress=progress,
                                                    train_table=train_table, unlike_share=unlike_share)
        self.familiarity = (None if self.calibration.familiarity is None else
                            FamiliarityCalibration.from_dict(self.calibration.familiarity, "the fitted calibration"))
        self.calibrated = True
        return self.calibration

    def save_pretrained(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write a complete model directory that `from_pretrained` reloads (atomically: all or nothing).

        An existing directory is replaced only with overwrite=True and only if it is a model directory (has
        config.json) or empty. The training summary of the source directory, if any, is copied along.
        """
        parts = modeldir.ModelDir(self.cfg, self.model, self.loss_state, self.encoder, self.gazetteer, self.device,
                                  self.source, self.calibration)
        return modeldir.write_model_dir(out_dir, parts, overwrite=overwrite)

    def describe(self) -> dict:
        """Where the model comes from: model dir, backbone, geometry, gazetteer and training data (JSON-able).
        Files and directories are named by their base names (`names.path_name`), never by absolute paths: the
        description is what `hierloc serve` shows its clients."""
        gaz = self.gazetteer
        counts = {name: int(gaz.level_offsets[i + 1] - gaz.level_offsets[i]) for i, name in enumerate(LEVELS)}
        source = gaz.metadata.get("source") or {}
        summary = self._read_train_summary()
        train_csv = summary.get("train_csv") or (source.get("path") if source.get("kind") == "csv" else None)
        training = {"csv": path_name(train_csv),
                    "n_images": summary.get("n_train", source.get("n_points")),
                    "epochs": summary.get("epochs"), "steps": summary.get("steps")}
        return {"model_dir": path_name(self.source), "hierloc_version": __version__,
                "backbone": path_name(self.cfg.model.backbone),
                "feature_dim": int(self.model.feature_dim), "embed_dim": int(self.cfg.model.embed_dim),
                "geometry": self.cfg.model.geometry, "gazetteer_hash": gaz.content_hash,
                "gazetteer_entities": counts, "training": training, "calibration": self.describe_calibration()}

    def describe_calibration(self) -> dict | None:
        """The calibration in use: {"temperatures", "flat_temperatures", "fitted_on", "n"}; None when the
        probabilities are reported uncalibrated (no calibration.json, or `calibrated` is False)."""
        if not (self.calibrated and self.calibration is not None):
            return None
        c = self.calibration
        fitted_on = ", ".join(path_name(name) for name in c.fitted_on.split(", ")) if c.fitted_on else c.fitted_on
        return {"temperatures": c.temperatures, "flat_temperatures": c.flat_temperatures, "fitted_on": fitted_on,
                "n": c.n}

    def report_temperatures(self, flat: bool = False) -> list[float] | None:
        """Per-level temperatures (4,) the reported probabilities use for this search (None: T = 1)."""
        if not (self.calibrated and self.calibration is not None):
            return None
        return self.calibration.flat_temperatures if flat else self.calibration.temperatures

    def search_calibration(self, flat: bool = False):
        """The familiarity calibration of this search (`familiarity.SearchCalibration`), None when the model has
        none or reports uncalibrated probabilities."""
        if not self.calibrated or self.familiarity is None:
            return None
        return self.familiarity.search(flat)

    @torch.no_grad()
    def familiarity_features(self, points: torch.Tensor, novelty) -> np.ndarray:
        """(B, D) image points and their (B,) `feature_novelty` -> (B, F) standardised familiarity features
        (`familiarity.FamiliarityCalibration.features`)."""
        if novelty is None or len(novelty) != points.shape[0]:
            raise ValueError("this model's calibration needs each image's feature novelty: pass "
                             "novelty=model.feature_novelty(features) with the features of embed_pixels(..., "
                             "features=True)")
        c = float(self.cfg.model.curvature) if self.model.is_hyperbolic else None
        return self.familiarity.features(point_signals(points, self.entity_points(), c), np.asarray(novelty))

    def _read_train_summary(self) -> dict:
        if self._train_summary is None:
            path = Path(self.source) / modeldir.TRAIN_SUMMARY_NAME
            try:
                self._train_summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            except (OSError, ValueError):
                self._train_summary = {}
        return self._train_summary

    # -------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def entity_points(self) -> torch.Tensor:
        """(E, D) entity points, computed once per model (the fusion MLP is not rerun per query)."""
        if self._entity_points is None:
            self.model.eval()
            self._entity_points = self.model.entity_points().detach()
        return self._entity_points

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """Paths, `EncodedImage`s or PIL images -> (B, 3, S, S) normalised pixels for this model's encoder."""
        pre = self.encoder.preprocessor
        return torch.stack([pre.preprocess_one(img if isinstance(img, Image.Image) else pre.load(img))
                            for img in images]) if len(images) else torch.empty(0, 3, pre.image_size,
                                                                                 pre.image_size)

    @torch.no_grad()
    def embed_pixels(self, pixel_values: torch.Tensor, features: bool = False):
        """(B, 3, H, W) pixels, uint8 (the datasets') or float normalised (`preprocess`) -> (B, D) image points, or with ``features`` (points, (B, F) backbone
        features)."""
        self.model.eval()
        with encoder_autocast(self.device):
            # the predictor's encoder: the model's own, or the frozen backbone a model trained on cached
            # features was trained beside (validation during training)
            feats = self.encoder(to_device(pixel_values, self.device)).float()
        points = self.embed_features(feats)
        return (points, feats) if features else points

    @torch.no_grad()
    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) backbone features (e.g. read from a feature cache) -> (B, D) image points (the model's head)."""
        self.model.eval()
        return self.model.embed_features(features.to(self.device).float())

    def feature_novelty(self, features: torch.Tensor) -> np.ndarray | None:
        """(B, F) backbone features -> (B,) how unlike the training images they are (`familiarity.FeatureNovelty`),
        None when the model's calibration does not use it."""
        if not self.calibrated or self.familiarity is None:
            return None
        return self.familiarity.feature_novelty(features.cpu().double().numpy())

    def search_index(self):
        """(search.EntityDistances, search.ChildIndex) of this model (`hierloc.inference.search`), built once (with
        the cached entity points) and reused by every beam search: the geometry (Poincare of curvature
        model.curvature, or Euclidean), the entities' conformal denominators and the CSR children index, on the
        model's device."""
        points = self.entity_points()
        if self._search_index is None or self._search_index[0].entity_points is not points:
            c = float(self.cfg.model.curvature) if self.model.is_hyperbolic else None
            children = child_index(self.model.entity_parents.cpu(), self.model.level_offsets).to(points.device)
            self._search_index = (EntityDistances(points, c=c), children)
        return self._search_index

    def search_options(self, beam: int | None = None, top_k: int | None = None) -> tuple[int, int]:
        """(beam, top_k) as given, or this model's inference.beam / inference.top_k where None: the one place the
        search's defaults are applied (the commands, serve, explain, eval and calibration pass None for "the
        model's")."""
        return (self.cfg.inference.beam if beam is None else int(beam),
                self.cfg.inference.top_k if top_k is None else int(top_k))

    @torch.no_grad()
    def search_points(self, points: torch.Tensor, beam: int | None = None, top_k: int | None = None,
                      flat: bool = False,
                      temperatures=None, coverage=None, novelty=None):
        """(B, D) image points -> `hierloc.inference.search.SearchResult` (paths (B, K, 4) global ids, level_probs,
        scores, and with a calibration by familiarity radius90_km (B,)).

        Beam: `search.beam_search`, distances measured for the candidates only. Flat: all cities (and every level,
        for the ancestors' probabilities) in matrix form. temperatures: (4,) per-level temperatures of the reported probabilities (default: the model's calibration: by familiarity
        (`familiarity.calibrate_result`, which also sets radius90_km) when it has one, else
        `report_temperatures(flat)`); they never change the paths or the scores. coverage: prediction sets
        (`SearchResult.sets`) of that coverage (one value or one per level). novelty: (B,) the images'
        `feature_novelty`, which a familiarity calibration needs."""
        beam, top_k = self.search_options(beam, top_k)
        fitted = self.search_calibration(flat) if temperatures is None else None
        if fitted is not None:   # the model's own probabilities, recalibrated below (`familiarity`)
            temperatures = [1.0] * N_LEVELS
        elif temperatures is None:
            temperatures = self.report_temperatures(flat)
        search_coverage = 1.0 if fitted is not None and coverage is not None else coverage
        if flat:
            sq = self.model.level_sqdists(points, self.entity_points())
            result = flat_search(sq, self.model.entity_parents, self.model.level_offsets, self.tau, top_k=top_k,
                                 temperatures=temperatures, coverage=search_coverage)
        else:
            distances, children = self.search_index()
            result = beam_search(points, distances, children, self.tau, beam=beam,
                                 top_k=top_k, temperatures=temperatures, coverage=search_coverage)
        if fitted is not None and points.shape[0]:
            calibrate_result(fitted, result, self.familiarity_features(points, novelty), coverage)
        return result

    def predict(self, images, top_k: int | None = None, beam: int | None = None, flat: bool = False,
                min_prob: float | None = None, max_level: str = "city", exif: str = "compare",
                batch_size: int = 64, num_workers: int = 0, on_error: str = "raise",
                progress: bool = False, coverage: float | None = None) -> list:
        """Paths, PIL images or a (B, 3, H, W) tensor of preprocessed pixels -> one Prediction per image.

        on_error="raise": InputError naming the first unreadable image; "return": a `Failure` in its place.
        Other arguments as `iter_predict`.
        """
        if on_error not in ("raise", "return"):
            raise InputError(f"on_error {on_error!r}: expected 'raise' or 'return'")
        out = []
        for record in self.iter_predict(images, top_k=top_k, beam=beam, flat=flat, min_prob=min_prob,
                                        max_level=max_level, exif=exif, batch_size=batch_size,
                                        num_workers=num_workers, progress=progress, coverage=coverage):
            if not record.ok and on_error == "raise":
                raise InputError(f"{record.image}: {record.error}")
            out.append(record)
        return out

    def iter_predict(self, images, top_k: int | None = None, beam: int | None = None, flat: bool = False,
                     min_prob: float | None = None, max_level: str = "city", exif: str = "compare",
                     batch_size: int = 64, num_workers: int = 0, progress: bool = False,
                     coverage: float | None = None) -> Iterator[Prediction | Failure]:
        """Stream one `Prediction` or `Failure` per image, in input order, batch by batch (memory stays flat).

        images: a path, a sequence of paths (read by a DataLoader with `num_workers` worker processes), PIL
        images, `hierloc.data.encoded.EncodedImage`s (image files held in memory: decoded in this process, with
        the same guards and pixels as the files, answers named by their `name`), or a (B, 3, H, W) / (3, H, W) tensor of pixels already preprocessed for this model
        (`preprocess`). top_k: number of paths kept (the answer + top_k - 1 alternatives); beam: beam width
        (None: the model's inference.top_k / inference.beam, `search_options`); flat: nearest city over all cities instead of the beam;
        min_prob / max_level / exif: see the module docstring. progress: a tqdm bar on stderr. coverage: per
        level down to max_level, the prediction set of that coverage (`Prediction.sets`: the smallest set of
        candidates whose reported probabilities reach it; calibrate the model for sets that keep their promise).
        """
        max_level_index = check_options(min_prob, max_level, exif, beam, top_k)
        beam, top_k = self.search_options(beam, top_k)
        if coverage is not None and not (isinstance(coverage, (int, float)) and 0.0 < float(coverage) < 1.0):
            raise InputError(f"coverage {coverage!r}: expected a probability in (0, 1), e.g. 0.9")
        if batch_size < 1:
            raise InputError(f"batch_size {batch_size!r}: expected an integer >= 1")
        options = {"top_k": top_k, "beam": beam, "flat": flat, "min_prob": min_prob, "coverage": coverage,
                   "max_level": max_level_index}
        if isinstance(images, torch.Tensor):
            pixels = images if images.ndim == 4 else images.unsqueeze(0)
            for start in range(0, len(pixels), batch_size):
                chunk = pixels[start:start + batch_size]
                batch = tables.collate([make_item(start + i, f"<tensor {start + i}>", chunk[i], None, None, 0, True)
                                        for i in range(len(chunk))])
                yield from self._batch_records(batch, options)
            return
        items = [images] if is_path_like(images) or isinstance(images, EncodedImage) else list(images)
        if all(is_path_like(item) for item in items):
            batches = path_batches(items, self.encoder.preprocessor, exif, batch_size, num_workers,
                                   pin_memory=pin_memory_for(self.device))
        else:
            batches = (self._memory_batch(items[start:start + batch_size], start, exif)
                       for start in range(0, len(items), batch_size))
        for batch in with_progress(batches, len(items), "predict", progress):
            yield from self._batch_records(batch, options)

    def _memory_batch(self, items: list, start: int, exif: str) -> dict:
        """PIL images and/or paths, in this process -> a collated batch."""
        pre = self.encoder.preprocessor
        out = []
        for offset, item in enumerate(items):
            index = start + offset
            if isinstance(item, Image.Image):
                gps = gps_from_image(item) if exif != "ignore" else None
                if exif == "use" and gps is not None:
                    out.append(make_item(index, f"<PIL image {index}>", None, None, gps, pre.image_size, False))
                    continue
                try:
                    pixels, error = pre.preprocess_one(to_rgb(item), train=False), None
                except Exception as exc:  # noqa: BLE001 - reported as a Failure like an unreadable file
                    pixels, error = None, f"cannot use this PIL image ({type(exc).__name__}: {exc})"
                out.append(make_item(index, f"<PIL image {index}>", pixels, error, gps, pre.image_size, True))
            elif is_path_like(item) or isinstance(item, EncodedImage):
                path = item if isinstance(item, EncodedImage) else os.fspath(item)
                gps = read_gps(path) if exif != "ignore" else None
                if exif == "use" and gps is not None:
                    out.append(make_item(index, source_name(path), None, None, gps, pre.image_size, False))
                    continue
                pixels, error = load_pixels(pre, path)
                out.append(make_item(index, source_name(path), pixels, error, gps, pre.image_size, True))
            else:
                raise InputError(f"image {index}: expected a path, an EncodedImage, a PIL image or a tensor, got "
                                 f"{type(item).__name__}")
        return tables.collate(out)

    def _batch_records(self, batch: dict, options: dict) -> list[Prediction | Failure]:
        """One collated batch -> records in index order (failures in their place)."""
        records: dict[int, Prediction | Failure] = {}
        for index, path, reason in batch["failed"]:
            records[int(index)] = Failure(str(path), str(reason))
        indices = batch["index"].tolist()
        if indices:
            names = list(batch["path"])
            exif_lat = batch["exif_lat_deg"].numpy()
            exif_lon = batch["exif_lon_deg"].numpy()
            has_pixels = batch["has_pixels"].numpy().astype(bool)
            answers: list[Prediction | None] = [None] * len(indices)
            rows = np.flatnonzero(has_pixels)
            if rows.size:
                points, feats = self.embed_pixels(batch["pixel_values"][torch.from_numpy(rows)], features=True)
                result = self.search_points(points, beam=options["beam"], top_k=options["top_k"],
                                            flat=options["flat"], coverage=options["coverage"],
                                            novelty=self.feature_novelty(feats))
                for row, answer in zip(rows.tolist(), self._answers(result, [names[r] for r in rows.tolist()],
                                                                    options["min_prob"], options["max_level"],
                                                                    options["coverage"])):
                    answers[row] = answer
            rows = np.flatnonzero(~has_pixels)
            if rows.size:
                for row, answer in zip(rows.tolist(), self._exif_answers(
                        [names[r] for r in rows.tolist()], exif_lat[rows], exif_lon[rows], options["max_level"])):
                    answers[row] = answer
            for row, answer in enumerate(answers):
                if np.isfinite(exif_lat[row]) and answer.exif is None:
                    dist = (float(haversine_km(answer.lat_deg, answer.lon_deg, exif_lat[row], exif_lon[row]))
                            if math.isfinite(answer.lat_deg) else None)
                    answer.exif = ExifPosition(float(exif_lat[row]), float(exif_lon[row]), dist)
                records[int(indices[row])] = answer
        return [records[key] for key in sorted(records)]

    def _level_answer(self, level: int, idx: int, prob: float) -> LevelAnswer:
        gaz = self.gazetteer
        return LevelAnswer(LEVELS[level], str(gaz.keys[idx]), str(gaz.names[idx]), float(prob),
                           float(gaz.lat_deg[idx]), float(gaz.lon_deg[idx]))

    def _answers(self, result, names: list[str], min_prob: float | None, max_level: int,
                 coverage: float | None = None) -> list[Prediction]:
        """SearchResult (B rows) -> Predictions: best path cut by the backoff rules, alternatives cut at max_level;
        the error radius (from the best full path's point, widened by the distance to the answered point when the
        backoff moved it) and the prediction sets down to max_level."""
        gaz = self.gazetteer
        paths = result.paths.cpu().numpy()            # (B, K, 4)
        probs = result.level_probs.cpu().numpy()      # (B, K, 4)
        scores = result.scores.cpu().numpy()          # (B, K)
        n_rows, n_paths = paths.shape[:2]
        best = cut_paths(paths[:, 0], probs[:, 0], min_prob, max_level)
        capped = cut_paths(paths.reshape(-1, N_LEVELS), probs.reshape(-1, N_LEVELS), None,
                           max_level).reshape(n_rows, n_paths, N_LEVELS)
        answers = []
        for row, name in enumerate(names):
            levels = [self._level_answer(lv, int(best[row, lv]), probs[row, 0, lv])
                      for lv in range(N_LEVELS) if best[row, lv] >= 0]
            deepest = int(deepest_entity(best[row:row + 1])[0])
            seen = {tuple(capped[row, 0].tolist())}
            alternatives = []
            for k in range(1, n_paths):
                key = tuple(capped[row, k].tolist())
                if capped[row, k, 0] < 0 or not np.isfinite(scores[row, k]) or key in seen:
                    continue
                seen.add(key)
                tip = int(deepest_entity(capped[row, k:k + 1])[0])
                alternatives.append(Alternative(
                    [self._level_answer(lv, int(capped[row, k, lv]), probs[row, k, lv])
                     for lv in range(N_LEVELS) if capped[row, k, lv] >= 0],
                    float(scores[row, k]), float(gaz.lat_deg[tip]), float(gaz.lon_deg[tip])))
            answer = Prediction(name, levels, float(gaz.lat_deg[deepest]) if deepest >= 0 else math.nan,
                                float(gaz.lon_deg[deepest]) if deepest >= 0 else math.nan,
                                float(scores[row, 0]), alternatives)
            if result.radius90_km is not None and deepest >= 0:
                full = int(deepest_entity(paths[row:row + 1, 0])[0])
                moved = float(haversine_km(gaz.lat_deg[full], gaz.lon_deg[full], answer.lat_deg, answer.lon_deg))
                answer.radius90_km = float(result.radius90_km[row]) + moved
            if result.sets is not None:
                answer.coverage = float(coverage)
                answer.sets = {LEVELS[lv]: [SetMember(str(gaz.keys[i]), str(gaz.names[i]), float(p))
                                            for i, p in zip(*result.sets[row][lv])]
                               for lv in range(max_level + 1)}
            answers.append(answer)
        return answers

    def _exif_answers(self, names: list[str], lat_deg: np.ndarray, lon_deg: np.ndarray,
                      max_level: int) -> list[Prediction]:
        """Answers from EXIF GPS (exif="use"): the gazetteer's entities containing each point, probability 1."""
        gaz = self.gazetteer
        located = cut_paths(gaz.locate(lat_deg, lon_deg), np.ones((len(names), N_LEVELS)), None, max_level)
        answers = []
        for row, name in enumerate(names):
            levels = [self._level_answer(lv, int(located[row, lv]), 1.0)
                      for lv in range(N_LEVELS) if located[row, lv] >= 0]
            if max_level == N_LEVELS - 1:
                lat, lon = float(lat_deg[row]), float(lon_deg[row])
            else:  # a capped answer must not reveal more than its level
                tip = int(deepest_entity(located[row:row + 1])[0])
                lat = float(gaz.lat_deg[tip]) if tip >= 0 else math.nan
                lon = float(gaz.lon_deg[tip]) if tip >= 0 else math.nan
            exif = ExifPosition(float(lat_deg[row]), float(lon_deg[row]), None)
            answer = Prediction(name, levels, lat, lon, 0.0, [], source="exif", exif=exif)
            if math.isfinite(lat):
                exif.dist_km = float(haversine_km(lat, lon, exif.lat_deg, exif.lon_deg))
            answers.append(answer)
        return answers

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, csv_path: str | Path, image_root: str | None = None, beam: int | None = None,
                 flat: bool = False, min_prob: float | None = None, max_level: str = "city",
                 missing: str = "skip", batch_size: int = 64, num_workers: int = 0, progress: bool = True,
                 per_sample: str | Path | None = None, on_bad: str = "error",
                 reliability: str | Path | None = None) -> dict:
        """`hierloc eval CSV --model DIR`: metrics on a labelled CSV (see `evaluate.evaluate_model`)."""
        table = tables.read_image_table(csv_path, image_root=image_root, on_bad=on_bad)
        return evaluate.evaluate_model(self, table, beam=beam, flat=flat, min_prob=min_prob, max_level=max_level,
                                       missing=missing, batch_size=batch_size, num_workers=num_workers,
                                       progress=progress, per_sample=per_sample, reliability=reliability)

    def predict_table(self, table, beam: int | None = None, flat: bool = False, batch_size: int = 128,
                      progress: bool = True) -> dict[str, np.ndarray]:
        """Best paths of every image of an ImageTable: {"paths" (N, 4) global ids, "pred_lat_deg",
        "pred_lon_deg" (N,), "probs" (N, 4), "ok" (N,) bool (False = image unreadable)}."""
        return evaluate.predict_table(self, table, beam=beam, flat=flat, batch_size=batch_size, progress=progress)

    def evaluate_csv(self, csv_path: str, image_root: str | None = None, beam: int | None = None,
                     flat: bool = False, progress: bool = True) -> dict:
        """Metrics on a labelled CSV, skipping bad rows (what training's validation calls)."""
        return self.evaluate(csv_path, image_root=image_root, beam=beam, flat=flat, progress=progress,
                             on_bad="skip")
