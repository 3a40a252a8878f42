"""The Python API: ``HierLoc.from_pretrained(dir).predict(images)``, mirroring the CLI.

    from hierloc.api import HierLoc
    model = HierLoc.from_pretrained("runs/demo")
    for p in model.predict(["photo.jpg"], top_k=3):
        print(p.country.name, p.country.probability, p.lat_deg, p.lon_deg)

A model directory holds config.json, model.safetensors, backbone/ and gazetteer/ (see `hierloc.checkpoint`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from hierloc import checkpoint as ckpt
from hierloc.config import Config, from_dict
from hierloc.errors import InputError

log = logging.getLogger(__name__)

LEVELS = ("country", "region", "subregion", "city")
N_LEVELS = 4


@dataclass
class LevelAnswer:
    """One level of a predicted path."""

    level: str
    entity_id: str          # the gazetteer key (a unique path)
    name: str               # display name (country: English name)
    probability: float      # among that level's candidates (beam: children of the surviving beam)
    lat_deg: float          # the entity's coordinate (mean of its training images)
    lon_deg: float


@dataclass
class Prediction:
    """The answer for one image: the best path (possibly cut short by min_prob/max_level), and alternatives."""

    source: str
    levels: list[LevelAnswer]
    lat_deg: float           # predicted point = coordinate of the deepest answered entity
    lon_deg: float
    score: float             # sum of per-level log-probabilities of the best path
    alternatives: list[dict] = field(default_factory=list)   # other top-k paths: {"path": [...], "score": ...}

    def level(self, name: str) -> LevelAnswer | None:
        return next((lv for lv in self.levels if lv.level == name), None)

    @property
    def country(self) -> LevelAnswer | None:
        return self.level("country")

    @property
    def city(self) -> LevelAnswer | None:
        return self.level("city")

    def to_dict(self) -> dict:
        return {"source": self.source, "lat_deg": self.lat_deg, "lon_deg": self.lon_deg, "score": self.score,
                "levels": [asdict(lv) for lv in self.levels], "alternatives": self.alternatives}

    def to_geojson(self) -> dict:
        """A GeoJSON Feature (RFC 7946: coordinates are [lon, lat] in degrees)."""
        props = {"source": self.source, "score_logprob": self.score}
        for lv in self.levels:
            props[f"{lv.level}_id"] = lv.entity_id
            props[f"{lv.level}_name"] = lv.name
            props[f"{lv.level}_probability"] = lv.probability
        return {"type": "Feature", "geometry": {"type": "Point", "coordinates": [self.lon_deg, self.lat_deg]},
                "properties": props}


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
    meta = {"format_version": ckpt.MODEL_FORMAT_VERSION, "hierloc_version": _version(), "config": cfg.to_dict(),
            "feature_dim": int(model.feature_dim), "gazetteer_hash": gaz.content_hash, "backbone_dir": "backbone",
            "gazetteer_dir": "gazetteer"}
    ckpt.atomic_write_text(out / ckpt.CONFIG_NAME, json.dumps(meta, indent=2))


def _version() -> str:
    from hierloc import __version__

    return __version__


class HierLoc:
    """A trained model ready for inference: encoder, image head, entity table, temperature and gazetteer."""

    def __init__(self, cfg: Config, model, loss_fn, encoder, gaz, device: torch.device | str = "cpu",
                 source: str = "<in memory>"):
        from hierloc.search import local_parents

        self.cfg = cfg
        self.model = model
        self.loss_fn = loss_fn
        self.encoder = encoder
        self.gazetteer = gaz
        self.device = torch.device(device)
        self.source = source
        self._parents_local = local_parents(model.entity_parents.cpu(), model.level_offsets)
        self._entity_points: torch.Tensor | None = None

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, device: str = "auto") -> "HierLoc":
        from gazetteer import Gazetteer
        from hierloc.device import resolve_device
        from hierloc.encoders import load_image_encoder
        from hierloc.losses import GWHInfoNCE
        from hierloc.model import EntityTable, HierLocModel

        root = Path(model_dir)
        if not root.is_dir():
            raise InputError(f"{root}: model directory not found (train one with `hierloc train`)")
        meta = ckpt.read_json(root / ckpt.CONFIG_NAME, "model config")
        version = int(meta.get("format_version", 0))
        if version > ckpt.MODEL_FORMAT_VERSION:
            raise InputError(f"{root / ckpt.CONFIG_NAME}: format_version {version} is newer than this hierloc "
                             f"supports ({ckpt.MODEL_FORMAT_VERSION}); upgrade hierloc")
        if "config" not in meta or "feature_dim" not in meta:
            raise InputError(f"{root / ckpt.CONFIG_NAME}: missing field 'config' or 'feature_dim'")
        cfg = from_dict(meta["config"], source=str(root / ckpt.CONFIG_NAME))
        gaz = Gazetteer.load(root / meta.get("gazetteer_dir", "gazetteer"))
        if gaz.content_hash != meta.get("gazetteer_hash"):
            raise InputError(f"{root}: the model was trained on gazetteer {meta.get('gazetteer_hash')} but "
                             f"{root / 'gazetteer'} has content hash {gaz.content_hash}")
        state = ckpt.load_tensors(root / ckpt.WEIGHTS_NAME)
        encoder = load_image_encoder(root / meta.get("backbone_dir", "backbone"))
        model = HierLocModel(cfg.model, EntityTable.from_gazetteer(gaz), int(meta["feature_dim"]), encoder=None)
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
        dev = resolve_device(device)
        model.to(dev).eval()
        loss_fn.to(dev).eval()
        return cls(cfg, model, loss_fn, encoder, gaz, device=dev, source=str(root))

    def save_pretrained(self, out_dir: str | Path) -> None:
        save_model_dir(out_dir, self.cfg, self.model, self.loss_fn, self.encoder, self.gazetteer)

    # -------------------------------------------------------------------------------------------- inference
    @property
    def tau(self) -> float:
        return float(self.loss_fn.temperature())

    @torch.no_grad()
    def entity_points(self) -> torch.Tensor:
        """(E, D) entity points, computed once per model (the fusion MLP is not rerun per query)."""
        if self._entity_points is None:
            self.model.eval()
            self._entity_points = self.model.entity_points().detach()
        return self._entity_points

    @torch.no_grad()
    def embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, D) image points."""
        from hierloc.device import encoder_autocast

        self.model.eval()
        with encoder_autocast(self.device):
            feats = self.model.encode_images(pixel_values.to(self.device))
        return self.model.embed_features(feats.float())

    @torch.no_grad()
    def search_points(self, points: torch.Tensor, beam: int | None = None, top_k: int = 5, flat: bool = False):
        """(B, D) image points -> hierloc.search.SearchResult."""
        from hierloc.search import beam_search, flat_search

        sq = self.model.level_sqdists(points, self.entity_points())
        if flat:
            return flat_search(sq, self.model.entity_parents, self.model.level_offsets, self.tau, top_k=top_k)
        return beam_search(sq, self._parents_local, self.model.level_offsets, self.tau,
                           beam=beam or self.cfg.inference.beam, top_k=top_k)

    def _to_pixels(self, images: Sequence) -> tuple[torch.Tensor, list[str]]:
        from PIL import Image

        from hierloc.images import to_rgb

        pil, names = [], []
        for item in images:
            if isinstance(item, torch.Tensor):
                return (item if item.ndim == 4 else item.unsqueeze(0)), [f"<tensor {i}>" for i in range(len(item))]
            if isinstance(item, Image.Image):
                pil.append(to_rgb(item))
                names.append("<PIL image>")
            else:
                pil.append(self.encoder.preprocessor.load(item, train=False))
                names.append(str(item))
        return self.encoder.preprocessor(pil, train=False), names

    def predict(self, images: Sequence | str | Path, top_k: int = 5, beam: int | None = None, flat: bool = False,
                min_prob: float | None = None, max_level: str = "city", batch_size: int = 64) -> list[Prediction]:
        """Paths, PIL images or a (B, 3, H, W) tensor of preprocessed pixels -> one Prediction per image."""
        if isinstance(images, (str, Path)):
            images = [images]
        if max_level not in LEVELS:
            raise InputError(f"--max-level {max_level!r}: expected one of {', '.join(LEVELS)}")
        if isinstance(images, torch.Tensor):
            batches = [(images[i:i + batch_size], [f"<tensor {j}>" for j in range(i, min(i + batch_size,
                                                                                          len(images)))])
                       for i in range(0, len(images), batch_size)]
        else:
            images = list(images)
            batches = [self._to_pixels(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
        out: list[Prediction] = []
        for pixels, names in batches:
            result = self.search_points(self.embed_pixels(pixels), beam=beam, top_k=top_k, flat=flat)
            out.extend(self._answers(result, names, min_prob, LEVELS.index(max_level)))
        return out

    def _answers(self, result, names: list[str], min_prob: float | None, max_level: int) -> list[Prediction]:
        gaz = self.gazetteer
        paths, probs, scores = result.paths.cpu().numpy(), result.level_probs.cpu().numpy(), result.scores.cpu()
        answers = []
        for row, name in enumerate(names):
            def levels_of(k: int, cut: bool) -> list[LevelAnswer]:
                out = []
                for level in range(N_LEVELS):
                    idx = int(paths[row, k, level])
                    if idx < 0 or (cut and level > max_level):
                        break
                    prob = float(probs[row, k, level])
                    if cut and min_prob is not None and prob < min_prob and level > 0:
                        break
                    out.append(LevelAnswer(LEVELS[level], str(gaz.keys[idx]), str(gaz.names[idx]), prob,
                                           float(gaz.lat_deg[idx]), float(gaz.lon_deg[idx])))
                return out

            best = levels_of(0, cut=True)
            alternatives = [{"path": [asdict(lv) for lv in levels_of(k, cut=False)], "score": float(scores[row, k])}
                            for k in range(1, paths.shape[1]) if paths[row, k, 0] >= 0]
            deepest = best[-1] if best else None
            answers.append(Prediction(name, best, deepest.lat_deg if deepest else float("nan"),
                                      deepest.lon_deg if deepest else float("nan"), float(scores[row, 0]),
                                      alternatives))
        return answers

    # ------------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def predict_table(self, table, beam: int | None = None, flat: bool = False, batch_size: int = 128,
                      progress: bool = True) -> dict[str, np.ndarray]:
        """Predict every image of an ImageTable: best paths (N, 4) global ids and points (N,), failed rows masked."""
        from hierloc import data

        dataset = data.ImageDataset(table, self.encoder.preprocessor, train=False)
        loader = data.make_loader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, seed=0, epoch=0)
        n = len(table.lat_deg)
        paths = np.full((n, N_LEVELS), -1, dtype=np.int64)
        ok = np.zeros(n, dtype=bool)
        iterator = loader
        if progress:
            from tqdm import tqdm

            iterator = tqdm(loader, desc="predict", unit="batch")
        for batch in iterator:
            result = self.search_points(self.embed_pixels(batch["pixel_values"]), beam=beam, top_k=1, flat=flat)
            idx = batch["index"].numpy()
            paths[idx] = result.paths[:, 0].cpu().numpy()
            ok[idx] = True
        deepest = np.where(paths >= 0, paths, -1).max(axis=1)  # ids grow with level, so max = deepest
        lat = np.where(deepest >= 0, np.asarray(self.gazetteer.lat_deg)[deepest.clip(0)], np.nan)
        lon = np.where(deepest >= 0, np.asarray(self.gazetteer.lon_deg)[deepest.clip(0)], np.nan)
        return {"paths": paths, "pred_lat_deg": lat, "pred_lon_deg": lon, "ok": ok}

    def evaluate_table(self, table, beam: int | None = None, flat: bool = False, progress: bool = True) -> dict:
        """Distance metrics and per-level accuracy (predicted path ids vs the true path) on an ImageTable."""
        from hierloc import metrics

        pred = self.predict_table(table, beam=beam, flat=flat, progress=progress)
        ok = pred["ok"] & np.isfinite(pred["pred_lat_deg"])
        result = metrics.distance_metrics(pred["pred_lat_deg"][ok], pred["pred_lon_deg"][ok],
                                          np.asarray(table.lat_deg)[ok], np.asarray(table.lon_deg)[ok])
        truth = self.gazetteer.locate(np.asarray(table.lat_deg), np.asarray(table.lon_deg))
        for level, name in enumerate(LEVELS):
            valid = ok & (truth[:, level] >= 0)
            result[f"acc_{name}"] = float((pred["paths"][valid, level] == truth[valid, level]).mean()) \
                if valid.any() else float("nan")
        result["n_failed"] = int((~pred["ok"]).sum())
        return result

    def evaluate_csv(self, csv_path: str, image_root: str | None = None, beam: int | None = None,
                     flat: bool = False, progress: bool = True) -> dict:
        from hierloc import data

        table = data.read_image_table(csv_path, image_root=image_root, on_bad="skip")
        return self.evaluate_table(table, beam=beam, flat=flat, progress=progress)


def iter_image_paths(items: Iterable[str]) -> list[str]:
    """Expand files, directories and glob patterns into a sorted list of image paths."""
    import glob

    exts = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
    out: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in exts)
            if not found:
                raise InputError(f"{path}: directory contains no images ({', '.join(sorted(exts))})")
            out.extend(found)
        elif any(ch in item for ch in "*?["):
            found = sorted(glob.glob(item, recursive=True))
            if not found:
                raise InputError(f"{item}: pattern matches no file")
            out.extend(found)
        else:
            out.append(item)
    return out
