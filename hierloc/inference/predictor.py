"""The Python API, mirroring `hierloc predict` / `hierloc eval`.

    from hierloc.inference.predictor import HierLoc
    model = HierLoc.from_pretrained("runs/demo")
    for p in model.predict(["photo.jpg"], top_k=3):
        print(p.country.name, p.country.probability, p.lat_deg, p.lon_deg)

A model directory holds config.json, model.safetensors, backbone/ and gazetteer/ (see `hierloc.checkpoint`).

Answers (see docs/inference.md for the full contract):

* Search: beam search down country -> region -> subregion -> city (`hierloc.search.beam_search`, beam width
  `beam`, default the model's `inference.beam` = 10) or, with `flat=True`, the nearest cities over all cities.
  The answer is the best path; `alternatives` are the next best of the top-k paths.
* Level probabilities: at each level, the softmax of -d^2/tau over that level's candidates (beam: the children of
  the surviving beam; flat: the whole level).
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
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from hierloc.training import checkpoint as ckpt
from hierloc.config import Config, from_dict
from hierloc.errors import InputError

log = logging.getLogger(__name__)

from gazetteer import LEVELS  # noqa: E402 - the one definition of the levels
N_LEVELS = 4
EXIF_MODES = ("compare", "use", "ignore")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
LIST_EXTENSIONS = (".txt", ".lst", ".list")
TRAIN_SUMMARY_NAME = "train_summary.json"


# ------------------------------------------------------------------------------------------------- results
@dataclass
class LevelAnswer:
    """One level of a predicted path."""

    level: str              # "country", "region", "subregion" or "city"
    entity_id: str          # the gazetteer key (a unique path 'cc|admin1|admin2|name')
    name: str               # display name (country: English name)
    probability: float      # among that level's candidates (beam: children of the surviving beam)
    lat_deg: float          # the entity's coordinate (mean of its training images)
    lon_deg: float


@dataclass
class ExifPosition:
    """The GPS position stored in the image file, and its haversine distance to the answer's point (km)."""

    lat_deg: float
    lon_deg: float
    dist_km: float | None   # None when the answer has no point


@dataclass
class Alternative:
    """Another of the top-k paths (cut at `max_level`, not at `min_prob`)."""

    levels: list[LevelAnswer]
    score: float            # sum of the path's per-level log-probabilities
    lat_deg: float          # coordinate of the path's deepest entity
    lon_deg: float


@dataclass
class Prediction:
    """The answer for one image: the best path (possibly cut short by min_prob/max_level), and alternatives."""

    image: str                               # the file, or "<PIL image i>" / "<tensor i>"
    levels: list[LevelAnswer]
    lat_deg: float                           # predicted point = coordinate of the deepest answered entity
    lon_deg: float
    score: float                             # sum of per-level log-probabilities of the best FULL path
    alternatives: list[Alternative] = field(default_factory=list)
    source: str = "model"                    # "model", or "exif" (answered from the file's GPS, exif="use")
    exif: ExifPosition | None = None         # the file's GPS position, if it has one and EXIF was read

    ok = True

    def level(self, name: str) -> LevelAnswer | None:
        """The answer at one level ("country", ...), or None when the answer stops above it."""
        return next((lv for lv in self.levels if lv.level == name), None)

    @property
    def precision(self) -> str | None:
        """The deepest answered level's name (None for an empty answer)."""
        return self.levels[-1].level if self.levels else None

    @property
    def country(self) -> LevelAnswer | None:
        return self.level("country")

    @property
    def region(self) -> LevelAnswer | None:
        return self.level("region")

    @property
    def subregion(self) -> LevelAnswer | None:
        return self.level("subregion")

    @property
    def city(self) -> LevelAnswer | None:
        return self.level("city")

    def to_dict(self) -> dict:
        """JSON-able nested dict (the `--format json/jsonl` record)."""
        return {"image": self.image, "status": "ok", "source": self.source, "lat_deg": self.lat_deg,
                "lon_deg": self.lon_deg, "precision": self.precision, "score_logprob": self.score,
                "levels": [asdict(lv) for lv in self.levels],
                "alternatives": [{"levels": [asdict(lv) for lv in alt.levels], "score_logprob": alt.score,
                                  "lat_deg": alt.lat_deg, "lon_deg": alt.lon_deg} for alt in self.alternatives],
                "exif": asdict(self.exif) if self.exif is not None else None}

    def flat(self) -> dict:
        """One flat row (the `--format csv` row and the GeoJSON properties); missing levels are empty strings."""
        row: dict[str, Any] = {"image": self.image, "status": "ok", "source": self.source, "lat_deg": self.lat_deg,
                               "lon_deg": self.lon_deg, "precision": self.precision or "",
                               "score_logprob": self.score}
        for name in LEVELS:
            answer = self.level(name)
            row[f"{name}_id"] = answer.entity_id if answer else ""
            row[f"{name}_name"] = answer.name if answer else ""
            row[f"{name}_prob"] = answer.probability if answer else ""
        row["exif_lat_deg"] = self.exif.lat_deg if self.exif else ""
        row["exif_lon_deg"] = self.exif.lon_deg if self.exif else ""
        row["exif_dist_km"] = self.exif.dist_km if self.exif and self.exif.dist_km is not None else ""
        row["error"] = ""
        return row

    def to_geojson(self) -> dict:
        """A GeoJSON Feature (RFC 7946: coordinates [lon, lat] in degrees); properties = `flat()`."""
        geometry = ({"type": "Point", "coordinates": [self.lon_deg, self.lat_deg]}
                    if math.isfinite(self.lat_deg) and math.isfinite(self.lon_deg) else None)
        return {"type": "Feature", "geometry": geometry, "properties": self.flat()}


@dataclass
class Failure:
    """An image that could not be predicted (unreadable, not an image, ...)."""

    image: str
    error: str

    ok = False

    def to_dict(self) -> dict:
        return {"image": self.image, "status": "error", "error": self.error}

    def flat(self) -> dict:
        row: dict[str, Any] = {"image": self.image, "status": "error", "source": "", "lat_deg": "", "lon_deg": "",
                               "precision": "", "score_logprob": ""}
        for name in LEVELS:
            row.update({f"{name}_id": "", f"{name}_name": "", f"{name}_prob": ""})
        row.update({"exif_lat_deg": "", "exif_lon_deg": "", "exif_dist_km": "", "error": self.error})
        return row

    def to_geojson(self) -> dict:
        return {"type": "Feature", "geometry": None, "properties": self.flat()}


# --------------------------------------------------------------------------------------- path bookkeeping
def cut_paths(paths: np.ndarray, probs: np.ndarray, min_prob: float | None, max_level: int) -> np.ndarray:
    """Apply the backoff rules to best paths.

    paths: (B, 4) global entity ids (-1 = absent); probs: (B, 4) level probabilities. Returns (B, 4) with -1 after
    the cut: levels deeper than `max_level` (0..3) are dropped, and, with `min_prob`, every level from the first
    one (below country) whose probability is < min_prob. The result is always a prefix of the input path.
    """
    keep = np.asarray(paths) >= 0
    keep[:, max_level + 1:] = False
    if min_prob is not None:
        sure = np.asarray(probs) >= min_prob
        sure[:, 0] = True  # the country is always answered: an answer without a place is no answer
        keep &= sure
    keep = np.cumprod(keep, axis=1).astype(bool)  # a prefix: nothing below a dropped level
    return np.where(keep, paths, -1)


def deepest_entity(paths: np.ndarray) -> np.ndarray:
    """(B, 4) paths -> (B,) id of the deepest present entity, -1 for an empty path (ids grow with the level)."""
    return np.asarray(paths).max(axis=1)


def check_options(min_prob: float | None, max_level: str, exif: str, beam: int | None, top_k: int) -> int:
    """InputError for an invalid prediction option; returns the index of `max_level`."""
    if max_level not in LEVELS:
        raise InputError(f"max_level {max_level!r}: expected one of {', '.join(LEVELS)}")
    if min_prob is not None and not 0.0 <= float(min_prob) <= 1.0:
        raise InputError(f"min_prob {min_prob!r}: expected a probability in [0, 1]")
    if exif not in EXIF_MODES:
        raise InputError(f"exif {exif!r}: expected one of {', '.join(EXIF_MODES)}")
    if beam is not None and int(beam) < 1:
        raise InputError(f"beam {beam!r}: expected an integer >= 1")
    if int(top_k) < 1:
        raise InputError(f"top_k {top_k!r}: expected an integer >= 1")
    return LEVELS.index(max_level)


# ------------------------------------------------------------------------------------------- input files
def expand_inputs(items: Iterable[str | os.PathLike], image_root: str | os.PathLike | None = None,
                  image_col: str | None = None) -> list[str]:
    """Files, directories, glob patterns, CSV files and list files -> image paths, in the given order.

    - a directory: every image below it (extensions `IMAGE_EXTENSIONS`, case-insensitive), sorted;
    - a pattern with * ? or [ ]: the matching files, sorted (`**` recurses);
    - a `.csv` file: its image column (detected like `hierloc.data.read_image_table`: image, IMG_FILE, id, ...;
      or `image_col`), relative paths resolved against `image_root` (default: the CSV's directory); an `id` column
      is OSV5M's layout `<root>/images/<id>.jpg`;
    - a `.txt`/`.lst`/`.list` file: one path per line (blank lines and lines starting with # skipped), relative to
      `image_root` (default: the list's directory);
    - anything else: an image path, kept as given (a missing file is reported when it is read, not here).
    InputError for a directory without images, a pattern matching nothing, or a bad CSV/list file.
    """
    import glob

    out: list[str] = []
    for item in items:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            if not found:
                raise InputError(f"{path}: directory contains no images ({', '.join(IMAGE_EXTENSIONS)})")
            out.extend(found)
        elif not path.exists() and any(ch in text for ch in "*?["):
            found = sorted(p for p in glob.glob(text, recursive=True) if os.path.isfile(p))
            if not found:
                raise InputError(f"{text}: pattern matches no file")
            out.extend(found)
        elif path.suffix.lower() == ".csv" and path.is_file():
            out.extend(_paths_from_csv(path, image_root, image_col))
        elif path.suffix.lower() in LIST_EXTENSIONS and path.is_file():
            out.extend(_paths_from_list(path, image_root))
        else:
            out.append(text)
    return out


iter_image_paths = expand_inputs  # the first-cut name


def _paths_from_csv(path: Path, image_root, image_col: str | None) -> list[str]:
    from gazetteer import csvio
    from hierloc.data import tables as data

    header = csvio.read_header(path)
    column = csvio.find_column(header, image_col, data.IMAGE_CANDIDATES, path, "image")
    root = Path(os.path.abspath(image_root if image_root is not None else path.parent))
    osv5m = column.strip().lower() == data.OSV5M_ID_COLUMN
    out: list[str] = []
    for chunk, rows in csvio.iter_chunks(path, [column], duplicate_rows=None):
        for name, row in zip(chunk[column].tolist(), rows.tolist()):
            name = name.strip()
            if not name:
                raise InputError(f"{path}: row {row}: column {column!r} is empty, expected an image path")
            if osv5m:
                out.append(str(root / data.OSV5M_IMAGE_DIR / (name + data.OSV5M_EXTENSION)))
            else:
                out.append(os.path.normpath(os.path.join(root, name)))
    if not out:
        raise InputError(f"{path}: no data rows (only a header)")
    return out


def _paths_from_list(path: Path, image_root) -> list[str]:
    root = Path(os.path.abspath(image_root if image_root is not None else path.parent))
    out: list[str] = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                name = line.strip()
                if name and not name.startswith("#"):
                    out.append(os.path.normpath(os.path.join(root, name)))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file (expected one image path per line)") from None
    if not out:
        raise InputError(f"{path}: list file names no image (one path per line expected)")
    return out


# ------------------------------------------------------------------------------------------ datasets
def _load_pixels(preprocessor, path: str) -> tuple[torch.Tensor | None, str | None]:
    """(3, S, S) pixels or (None, reason without the path)."""
    try:
        return preprocessor.preprocess_one(preprocessor.load(path, train=False), train=False), None
    except InputError as error:
        message = str(error)
        return None, message[len(path) + 2:] if message.startswith(f"{path}: ") else message
    except Exception as error:  # noqa: BLE001 - one odd file must not end a long run; it is reported
        return None, f"{type(error).__name__}: {' '.join(str(error).split())}"


def _item(index: int, name: str, pixels: torch.Tensor | None, error: str | None, gps, size: int,
          has_pixels: bool) -> dict:
    """A dataset item in the layout `hierloc.data.collate` batches (failed items are dropped and listed)."""
    return {"pixel_values": pixels if pixels is not None else torch.zeros((3, size, size), dtype=torch.float32),
            "index": torch.tensor(index, dtype=torch.int64), "path": name, "ok": error is None, "error": error or "",
            "exif_lat_deg": torch.tensor(gps.lat_deg if gps else math.nan, dtype=torch.float64),
            "exif_lon_deg": torch.tensor(gps.lon_deg if gps else math.nan, dtype=torch.float64),
            "has_pixels": torch.tensor(bool(has_pixels))}


class PredictDataset(torch.utils.data.Dataset):
    """Image files -> items with pixels (3, S, S), the EXIF GPS (NaN when absent) and has_pixels.

    With exif="use", files carrying GPS are not decoded (has_pixels False): their answer comes from the GPS.
    Paths are held as a fixed-width numpy string array (cheap to share with DataLoader workers).
    """

    def __init__(self, paths: Sequence[str], preprocessor, exif: str = "compare"):
        self.paths = np.asarray([os.fspath(p) for p in paths], dtype=str)
        self.preprocessor = preprocessor
        self.exif = exif

    def __len__(self) -> int:
        return int(self.paths.shape[0])

    def __getitem__(self, index: int) -> dict:
        from hierloc.data.exif import read_gps

        index = int(index)
        path = str(self.paths[index])
        gps = read_gps(path) if self.exif != "ignore" else None
        if self.exif == "use" and gps is not None:
            return _item(index, path, None, None, gps, self.preprocessor.image_size, has_pixels=False)
        pixels, error = _load_pixels(self.preprocessor, path)
        return _item(index, path, pixels, error, gps, self.preprocessor.image_size, has_pixels=True)


def _is_path_like(item: Any) -> bool:
    return isinstance(item, (str, os.PathLike))


# ---------------------------------------------------------------------------------------------- saving
def save_model_dir(out_dir: str | Path, cfg: Config, model, loss_fn, encoder, gaz) -> None:
    """Write (or refresh) the loadable part of a model directory; each file atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    state.update({f"loss.{k}": v for k, v in loss_fn.state_dict().items()})
    ckpt.save_tensors(out / ckpt.WEIGHTS_NAME, state, metadata={"format": "hierloc"})
    encoder.save_pretrained(out / "backbone")
    if not (out / "gazetteer").is_dir():
        gaz.save(out / "gazetteer", overwrite=True)
    n_concepts = int(model.concept_head.n_concepts) if getattr(model, "concept_head", None) is not None else 0
    vocabulary = getattr(model, "concept_vocabulary", None)
    if n_concepts and vocabulary is not None:
        vocabulary.save(out)  # concepts.json: the names/groups/descriptions of the head's outputs
    meta = {"format_version": ckpt.MODEL_FORMAT_VERSION, "hierloc_version": _version(), "config": cfg.to_dict(),
            "feature_dim": int(model.feature_dim), "n_concepts": n_concepts, "gazetteer_hash": gaz.content_hash,
            "backbone_dir": "backbone", "gazetteer_dir": "gazetteer"}
    ckpt.atomic_write_text(out / ckpt.CONFIG_NAME, json.dumps(meta, indent=2))


PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SAFE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _not_a_model_dir_message(path: Path) -> str:
    """For a file given where a model directory is expected (a .pt/.pkl checkpoint, a single weights file)."""
    with open(path, "rb") as handle:
        magic = handle.read(2)
    pickled = magic[:1] == b"\x80" or magic == b"PK"
    what = ("; it looks like a pickle/torch.save file, which hierloc never unpickles" if pickled else "")
    return (f"{path}: expected a model directory (config.json + model.safetensors + backbone/ + gazetteer/, "
            f"what `hierloc train` writes), got a file{what}")


def _refuse_pickled_backbone(directory: Path) -> None:
    """A saved backbone must hold safetensors weights: transformers would otherwise read pytorch_model.bin with
    torch.load (a restricted unpickler, but an unpickler); hierloc never unpickles."""
    if not directory.is_dir() or any((directory / name).is_file() for name in SAFE_WEIGHT_FILES):
        return
    for name in PICKLE_WEIGHT_FILES:
        if (directory / name).is_file():
            raise InputError(f"{directory / name}: backbone weights in pickle format, which hierloc never "
                             "unpickles; expected model.safetensors (save the backbone with "
                             "save_pretrained(..., safe_serialization=True))")


def _version() -> str:
    from hierloc import __version__

    return __version__


# --------------------------------------------------------------------------------------------- the model
class HierLoc:
    """A trained model ready for inference: encoder, image head, entity table, temperature and gazetteer."""

    def __init__(self, cfg: Config, model, loss_fn, encoder, gaz, device: torch.device | str = "cpu",
                 source: str = "<in memory>"):
        self.cfg = cfg
        self.model = model
        self.loss_fn = loss_fn
        self.encoder = encoder
        self.gazetteer = gaz
        self.device = torch.device(device)
        self.source = source
        self._entity_points: torch.Tensor | None = None
        self._search_index: tuple | None = None   # (EntityDistances, ChildIndex), built on first beam search
        self._train_summary: dict | None = None

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str = "auto") -> "HierLoc":
        """Load a model directory written by `hierloc train` or `save_pretrained`. device: auto, cpu or cuda."""
        from gazetteer import Gazetteer
        from hierloc.device import resolve_device
        from hierloc.model.encoders import load_image_encoder
        from hierloc.training.losses import GWHInfoNCE
        from hierloc.model.network import EntityTable, HierLocModel

        root = Path(model_dir)
        if root.is_file():
            raise InputError(_not_a_model_dir_message(root))
        if not root.is_dir():
            raise InputError(f"{root}: model directory not found (train one with `hierloc train`)")
        meta = ckpt.read_json(root / ckpt.CONFIG_NAME, "model config")
        version = meta.get("format_version", 0) if isinstance(meta, dict) else None
        if not isinstance(version, int) or isinstance(version, bool):
            raise InputError(f"{root / ckpt.CONFIG_NAME}: expected a JSON object with an integer format_version "
                             "(the model config `hierloc train` writes)")
        if version > ckpt.MODEL_FORMAT_VERSION:
            raise InputError(f"{root / ckpt.CONFIG_NAME}: format_version {version} is newer than this hierloc "
                             f"supports ({ckpt.MODEL_FORMAT_VERSION}); upgrade hierloc")
        if "config" not in meta or "feature_dim" not in meta:
            raise InputError(f"{root / ckpt.CONFIG_NAME}: missing field 'config' or 'feature_dim'")
        cfg = from_dict(meta["config"], source=str(root / ckpt.CONFIG_NAME))
        dev = resolve_device(device)
        gaz = Gazetteer.load(root / meta.get("gazetteer_dir", "gazetteer"))
        if gaz.content_hash != meta.get("gazetteer_hash"):
            trained_on = str(meta.get("gazetteer_hash"))[:16]
            raise InputError(f"{root}: the model was trained on the gazetteer with content hash {trained_on}, but "
                             f"{root / meta.get('gazetteer_dir', 'gazetteer')} has content hash "
                             f"{gaz.content_hash[:16]}: its entities would be the wrong places; put back the "
                             "gazetteer the model was trained on")
        state = ckpt.load_tensors(root / ckpt.WEIGHTS_NAME)
        backbone_dir = root / meta.get("backbone_dir", "backbone")
        _refuse_pickled_backbone(backbone_dir)
        encoder = load_image_encoder(backbone_dir)
        model = HierLocModel(cfg.model, EntityTable.from_gazetteer(gaz), int(meta["feature_dim"]), encoder=None,
                             n_concepts=int(meta.get("n_concepts", 0)))
        loss_fn = GWHInfoNCE(n_levels=N_LEVELS, tau=cfg.loss.tau, lam=cfg.loss.lam, sigma_km=cfg.loss.sigma_km,
                             betas=tuple(cfg.loss.betas), learn_tau=cfg.loss.learn_tau,
                             learn_weights=cfg.loss.learn_weights, kernel=cfg.loss.kernel)
        model_state = {k: v for k, v in state.items() if not k.startswith("loss.")}
        loss_state = {k[5:]: v for k, v in state.items() if k.startswith("loss.")}
        try:
            model.load_state_dict(model_state, strict=True)
            loss_fn.load_state_dict(loss_state, strict=True)
        except RuntimeError as exc:
            raise InputError(f"{root / ckpt.WEIGHTS_NAME}: weights do not match config.json "
                             f"({str(exc).splitlines()[0]})") from None
        model.encoder = encoder
        if model.concept_head is not None:
            from hierloc.model.concepts import VOCABULARY_FILE, ConceptVocabulary

            if not (root / VOCABULARY_FILE).is_file():
                raise InputError(f"{root}: the model has a concept head but {VOCABULARY_FILE} is missing")
            model.concept_vocabulary = ConceptVocabulary.load(root / VOCABULARY_FILE)
        model.to(dev).eval()
        loss_fn.to(dev).eval()
        return cls(cfg, model, loss_fn, encoder, gaz, device=dev, source=str(root))

    def save_pretrained(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write a complete model directory that `from_pretrained` reloads (atomically: all or nothing).

        An existing directory is replaced only with overwrite=True and only if it is a model directory (has
        config.json) or empty. The training summary of the source directory, if any, is copied along.
        """
        from gazetteer.atomic import atomic_directory

        out = Path(out_dir)
        if out.is_dir() and any(out.iterdir()) and not (out / ckpt.CONFIG_NAME).is_file():
            raise InputError(f"refusing to replace {out}: it is not a model directory (no {ckpt.CONFIG_NAME})")
        with atomic_directory(out, overwrite=overwrite) as tmp:
            save_model_dir(tmp, self.cfg, self.model, self.loss_fn, self.encoder, self.gazetteer)
            summary = Path(self.source) / TRAIN_SUMMARY_NAME
            if summary.is_file():
                shutil.copyfile(summary, tmp / TRAIN_SUMMARY_NAME)
        return out

    def describe(self) -> dict:
        """Where the model comes from: model dir, backbone, geometry, gazetteer and training data (JSON-able)."""
        gaz = self.gazetteer
        counts = {name: int(gaz.level_offsets[i + 1] - gaz.level_offsets[i]) for i, name in enumerate(LEVELS)}
        source = gaz.metadata.get("source") or {}
        summary = self._read_train_summary()
        training = {"csv": summary.get("train_csv") or (source.get("path") if source.get("kind") == "csv" else None),
                    "n_images": summary.get("n_train", source.get("n_points")),
                    "epochs": summary.get("epochs"), "steps": summary.get("steps")}
        return {"model_dir": self.source, "hierloc_version": _version(), "backbone": self.cfg.model.backbone,
                "feature_dim": int(self.model.feature_dim), "embed_dim": int(self.cfg.model.embed_dim),
                "geometry": self.cfg.model.geometry, "gazetteer_hash": gaz.content_hash,
                "gazetteer_entities": counts, "training": training}

    def _read_train_summary(self) -> dict:
        if self._train_summary is None:
            path = Path(self.source) / TRAIN_SUMMARY_NAME
            try:
                self._train_summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            except (OSError, ValueError):
                self._train_summary = {}
        return self._train_summary

    # -------------------------------------------------------------------------------------------- inference
    @property
    def tau(self) -> float:
        return float(self.loss_fn.temperature().detach())

    @torch.no_grad()
    def entity_points(self) -> torch.Tensor:
        """(E, D) entity points, computed once per model (the fusion MLP is not rerun per query)."""
        if self._entity_points is None:
            self.model.eval()
            self._entity_points = self.model.entity_points().detach()
        return self._entity_points

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """Paths or PIL images -> (B, 3, S, S) normalised pixels for this model's encoder."""
        from PIL import Image

        pre = self.encoder.preprocessor
        return torch.stack([pre.preprocess_one(img if isinstance(img, Image.Image) else pre.load(img))
                            for img in images]) if len(images) else torch.empty(0, 3, pre.image_size,
                                                                                 pre.image_size)

    @torch.no_grad()
    def embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, D) image points."""
        from hierloc.device import encoder_autocast

        self.model.eval()
        with encoder_autocast(self.device):
            feats = self.model.encode_images(pixel_values.to(self.device))
        return self.model.embed_features(feats.float())

    def search_index(self):
        """(hierloc.search.EntityDistances, hierloc.search.ChildIndex) of this model, built once (with the cached
        entity points) and reused by every beam search: the geometry (Poincare of curvature model.curvature, or
        Euclidean), the entities' conformal denominators and the CSR children index, on the model's device."""
        from hierloc.inference.search import EntityDistances, child_index

        points = self.entity_points()
        if self._search_index is None or self._search_index[0].entity_points is not points:
            c = float(self.cfg.model.curvature) if self.model.is_hyperbolic else None
            children = child_index(self.model.entity_parents.cpu(), self.model.level_offsets).to(points.device)
            self._search_index = (EntityDistances(points, c=c), children)
        return self._search_index

    @torch.no_grad()
    def search_points(self, points: torch.Tensor, beam: int | None = None, top_k: int = 5, flat: bool = False):
        """(B, D) image points -> hierloc.search.SearchResult (paths (B, K, 4) global ids, level_probs, scores).

        Beam: `hierloc.search.beam_search`, distances measured for the candidates only. Flat: all cities (and
        every level, for the ancestors' probabilities) in matrix form."""
        from hierloc.inference.search import beam_search, flat_search

        if flat:
            sq = self.model.level_sqdists(points, self.entity_points())
            return flat_search(sq, self.model.entity_parents, self.model.level_offsets, self.tau, top_k=top_k)
        distances, children = self.search_index()
        return beam_search(points, distances, children, self.tau, beam=beam or self.cfg.inference.beam,
                           top_k=top_k)

    def predict(self, images, top_k: int = 5, beam: int | None = None, flat: bool = False,
                min_prob: float | None = None, max_level: str = "city", exif: str = "compare",
                batch_size: int = 64, num_workers: int = 0, on_error: str = "raise",
                progress: bool = False) -> list:
        """Paths, PIL images or a (B, 3, H, W) tensor of preprocessed pixels -> one Prediction per image.

        on_error="raise": InputError naming the first unreadable image; "return": a `Failure` in its place.
        Other arguments as `iter_predict`.
        """
        if on_error not in ("raise", "return"):
            raise InputError(f"on_error {on_error!r}: expected 'raise' or 'return'")
        out = []
        for record in self.iter_predict(images, top_k=top_k, beam=beam, flat=flat, min_prob=min_prob,
                                        max_level=max_level, exif=exif, batch_size=batch_size,
                                        num_workers=num_workers, progress=progress):
            if not record.ok and on_error == "raise":
                raise InputError(f"{record.image}: {record.error}")
            out.append(record)
        return out

    def iter_predict(self, images, top_k: int = 5, beam: int | None = None, flat: bool = False,
                     min_prob: float | None = None, max_level: str = "city", exif: str = "compare",
                     batch_size: int = 64, num_workers: int = 0, progress: bool = False
                     ) -> Iterator[Prediction | Failure]:
        """Stream one `Prediction` or `Failure` per image, in input order, batch by batch (memory stays flat).

        images: a path, a sequence of paths (read by a DataLoader with `num_workers` worker processes), PIL
        images, or a (B, 3, H, W) / (3, H, W) tensor of pixels already preprocessed for this model
        (`preprocess`). top_k: number of paths kept (the answer + top_k - 1 alternatives); beam: beam width
        (default: the model's inference.beam); flat: nearest city over all cities instead of the beam;
        min_prob / max_level / exif: see the module docstring. progress: a tqdm bar on stderr.
        """
        from hierloc.data import tables as data

        max_level_index = check_options(min_prob, max_level, exif, beam, top_k)
        if batch_size < 1:
            raise InputError(f"batch_size {batch_size!r}: expected an integer >= 1")
        options = {"top_k": int(top_k), "beam": beam, "flat": flat, "min_prob": min_prob,
                   "max_level": max_level_index}
        if isinstance(images, torch.Tensor):
            pixels = images if images.ndim == 4 else images.unsqueeze(0)
            for start in range(0, len(pixels), batch_size):
                chunk = pixels[start:start + batch_size]
                batch = data.collate([_item(start + i, f"<tensor {start + i}>", chunk[i], None, None, 0, True)
                                      for i in range(len(chunk))])
                yield from self._batch_records(batch, options)
            return
        items = [images] if _is_path_like(images) else list(images)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            # disable=None: no bar when stderr is not a terminal (logs, pipes)
            bar = tqdm(total=len(items), desc="predict", unit="img", dynamic_ncols=True, disable=None)
        try:
            if all(_is_path_like(item) for item in items):
                dataset = PredictDataset(items, self.encoder.preprocessor, exif=exif)
                loader = data.make_loader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                          pin_memory=self.device.type == "cuda")
                batches: Iterable[dict] = loader
            else:
                batches = (self._memory_batch(items[start:start + batch_size], start, exif)
                           for start in range(0, len(items), batch_size))
            for batch in batches:
                for record in self._batch_records(batch, options):
                    yield record
                if bar is not None:
                    bar.update(len(batch["index"]) + batch["n_failed"])
        finally:
            if bar is not None:
                bar.close()

    def _memory_batch(self, items: list, start: int, exif: str) -> dict:
        """PIL images and/or paths, in this process -> a collated batch."""
        from PIL import Image

        from hierloc.data import tables as data
        from hierloc.data.exif import gps_from_image, read_gps
        from hierloc.data.images import to_rgb

        pre = self.encoder.preprocessor
        out = []
        for offset, item in enumerate(items):
            index = start + offset
            if isinstance(item, Image.Image):
                gps = gps_from_image(item) if exif != "ignore" else None
                if exif == "use" and gps is not None:
                    out.append(_item(index, f"<PIL image {index}>", None, None, gps, pre.image_size, False))
                    continue
                try:
                    pixels, error = pre.preprocess_one(to_rgb(item), train=False), None
                except Exception as exc:  # noqa: BLE001 - reported as a Failure like an unreadable file
                    pixels, error = None, f"cannot use this PIL image ({type(exc).__name__}: {exc})"
                out.append(_item(index, f"<PIL image {index}>", pixels, error, gps, pre.image_size, True))
            elif _is_path_like(item):
                path = os.fspath(item)
                gps = read_gps(path) if exif != "ignore" else None
                if exif == "use" and gps is not None:
                    out.append(_item(index, path, None, None, gps, pre.image_size, False))
                    continue
                pixels, error = _load_pixels(pre, path)
                out.append(_item(index, path, pixels, error, gps, pre.image_size, True))
            else:
                raise InputError(f"image {index}: expected a path, a PIL image or a tensor, got "
                                 f"{type(item).__name__}")
        return data.collate(out)

    def _batch_records(self, batch: dict, options: dict) -> list[Prediction | Failure]:
        """One collated batch -> records in index order (failures in their place)."""
        from gazetteer.geo import haversine_km

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
                points = self.embed_pixels(batch["pixel_values"][torch.from_numpy(rows)])
                result = self.search_points(points, beam=options["beam"], top_k=options["top_k"],
                                            flat=options["flat"])
                for row, answer in zip(rows.tolist(), self._answers(result, [names[r] for r in rows.tolist()],
                                                                    options["min_prob"], options["max_level"])):
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

    def _answers(self, result, names: list[str], min_prob: float | None, max_level: int) -> list[Prediction]:
        """SearchResult (B rows) -> Predictions: best path cut by the backoff rules, alternatives cut at max_level."""
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
            answers.append(Prediction(name, levels, float(gaz.lat_deg[deepest]) if deepest >= 0 else math.nan,
                                      float(gaz.lon_deg[deepest]) if deepest >= 0 else math.nan,
                                      float(scores[row, 0]), alternatives))
        return answers

    def _exif_answers(self, names: list[str], lat_deg: np.ndarray, lon_deg: np.ndarray,
                      max_level: int) -> list[Prediction]:
        """Answers from EXIF GPS (exif="use"): the gazetteer's entities containing each point, probability 1."""
        from gazetteer.geo import haversine_km

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
                 per_sample: str | Path | None = None, on_bad: str = "error") -> dict:
        """`hierloc eval CSV --model DIR`: metrics on a labelled CSV (see `hierloc.evaluate.evaluate_model`)."""
        from hierloc.data import tables as data
        from hierloc.inference import evaluate

        table = data.read_image_table(csv_path, image_root=image_root, on_bad=on_bad)
        return evaluate.evaluate_model(self, table, beam=beam, flat=flat, min_prob=min_prob, max_level=max_level,
                                       missing=missing, batch_size=batch_size, num_workers=num_workers,
                                       progress=progress, per_sample=per_sample)

    def predict_table(self, table, beam: int | None = None, flat: bool = False, batch_size: int = 128,
                      progress: bool = True) -> dict[str, np.ndarray]:
        """Best paths of every image of an ImageTable: {"paths" (N, 4) global ids, "pred_lat_deg",
        "pred_lon_deg" (N,), "probs" (N, 4), "ok" (N,) bool (False = image unreadable)}."""
        from hierloc.inference import evaluate

        return evaluate.predict_table(self, table, beam=beam, flat=flat, batch_size=batch_size, progress=progress)

    def evaluate_table(self, table, beam: int | None = None, flat: bool = False, progress: bool = True) -> dict:
        """Metrics on an ImageTable (numbers only; see `hierloc.evaluate.evaluate_model`)."""
        from hierloc.inference import evaluate

        return evaluate.evaluate_model(self, table, beam=beam, flat=flat, progress=progress)

    def evaluate_csv(self, csv_path: str, image_root: str | None = None, beam: int | None = None,
                     flat: bool = False, progress: bool = True) -> dict:
        """Metrics on a labelled CSV, skipping bad rows (what training's validation calls)."""
        return self.evaluate(csv_path, image_root=image_root, beam=beam, flat=flat, progress=progress,
                             on_bad="skip")
