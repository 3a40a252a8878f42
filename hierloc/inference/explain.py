r"""Explanations: the predicted hierarchy, its runner-ups, and the concepts that support each level.

For each level l of the predicted path, with chosen entity c and the runner-up r (the most probable other
candidate at that level), the contribution of concept k is

    contribution_k = p_k(image) * (profile[c, k] - profile[r, k])

p_k(image) = sigmoid of the concept head's logit (is the concept visible in the image?), profile[e, k] = share of
entity e's training images with concept k (`hierloc.model.concepts.entity_concept_profiles`). A concept *supports*
the choice when it is active in the image (p_k >= 0.5) and characteristic of c rather than r (contribution > 0);
the top ones by contribution are reported, and the most negative ones (active, but characteristic of r) as
"against". NaN profiles count as no evidence (contribution 0). Without a runner-up (a single candidate), c is
compared with its parent's profile (at the country level, the mean over all countries): what sets it apart.

Candidates of a level ("runner-ups") are, by default, the children of the chosen parent (all countries at level 0)
with p(e | parent) = softmax_{siblings}(-d^2(z, e) / tau): the question "given the country, which region?" (at the
model's per-level temperatures T_l, softmax(-d^2 / (tau T_l)), when it is calibrated: docs/calibration.md).
`candidates_from_paths` builds them instead from the search's top-k paths (the entities those paths reach).

The functions on plain arrays (`level_contributions`, `explain_path`) are what the tests drive with synthetic
numbers; `explain_images` runs a model on image files and feeds them.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from gazetteer.geo import haversine_km
from gazetteer.schema import LEVELS, N_LEVELS
from hierloc.data.encoded import EncodedImage, source_name
from hierloc.data.exif import read_gps
from hierloc.device import encoder_autocast, to_device
from hierloc.errors import InputError
from hierloc.inference import familiarity
from hierloc.inference.names import path_name
from hierloc.model.concepts import VOCABULARY_FILE, ConceptVocabulary

log = logging.getLogger(__name__)

ACTIVE_PROB = 0.5


@dataclass
class ConceptReason:
    name: str
    description: str
    group: str
    image_prob: float          # p_k(image)
    profile_chosen: float      # share of the chosen entity's training images with the concept
    profile_other: float       # same for the entity compared with (runner-up or parent)
    contribution: float        # image_prob * (profile_chosen - profile_other)


@dataclass
class Candidate:
    entity: int                # global gazetteer index
    key: str
    name: str
    probability: float
    lat_deg: float
    lon_deg: float


@dataclass
class LevelExplanation:
    level: str
    chosen: Candidate
    runners_up: list[Candidate]
    compared_with: str         # the runner-up's name, or "<parent name> (parent)" / "all countries"
    supporting: list[ConceptReason] = field(default_factory=list)
    against: list[ConceptReason] = field(default_factory=list)

    @property
    def runner_up_more_probable(self) -> bool:
        """True when a runner-up is more probable at this level alone than the chosen entity: the search ranks
        whole paths by their joint score, so the best path may pass through a less probable entity."""
        return any(r.probability > self.chosen.probability for r in self.runners_up)

    def to_dict(self) -> dict:
        return dict(asdict(self), runner_up_more_probable=self.runner_up_more_probable)


@dataclass
class Explanation:
    source: str                                  # the image
    lat_deg: float                               # predicted point (the deepest chosen entity's coordinate)
    lon_deg: float
    levels: list[LevelExplanation]
    image_concepts: list[dict]                   # the most probable concepts in the image: {name, probability}
    alternatives: list[dict]                     # other top-k paths: {"names": [...], "score": ..., lat/lon}
    model: dict                                  # provenance: which model and training data produced this
    concepts_available: bool = True
    gps_lat_deg: float | None = None             # GPS position stored in the file's EXIF, when there is one
    gps_lon_deg: float | None = None
    radius90_km: float | None = None             # the truth lies within this distance with 90 % probability

    def to_dict(self) -> dict:
        return dict(asdict(self), levels=[level.to_dict() for level in self.levels])


# ----------------------------------------------------------------------------------------- pure computations
def level_contributions(concept_probs: np.ndarray, profile_chosen: np.ndarray, profile_other: np.ndarray
                        ) -> np.ndarray:
    """contribution_k = p_k * (profile_chosen_k - profile_other_k), NaN profiles -> 0. All (K,) -> (K,) float64."""
    p = np.asarray(concept_probs, dtype=np.float64)
    diff = np.asarray(profile_chosen, dtype=np.float64) - np.asarray(profile_other, dtype=np.float64)
    return np.where(np.isfinite(diff) & np.isfinite(p), p * np.nan_to_num(diff), 0.0)


def candidates_from_paths(paths: np.ndarray, level_probs: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per level, the distinct entities reached by the top-k paths (K, 4) and their level probabilities (K, 4),
    most probable first: [(ids (n_l,), probs (n_l,))] * 4 (an entity on several paths keeps its largest)."""
    paths = np.asarray(paths, dtype=np.int64)
    level_probs = np.asarray(level_probs, dtype=np.float64)
    out = []
    for level in range(N_LEVELS):
        best: dict[int, float] = {}
        for entity, prob in zip(paths[:, level].tolist(), level_probs[:, level].tolist()):
            if entity >= 0:
                best[entity] = max(prob, best.get(entity, -1.0))
        ordered = sorted(best.items(), key=lambda item: (-item[1], item[0]))
        out.append((np.array([e for e, _ in ordered], dtype=np.int64), np.array([p for _, p in ordered])))
    return out


def sibling_candidates(level_sqdists: Sequence[np.ndarray], path: np.ndarray, level_offsets: Sequence[int],
                       parents: np.ndarray, tau: float, temperatures: Sequence[float] | None = None
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per level, the children of the chosen parent (all countries at level 0) with p(e | parent), most probable
    first. level_sqdists: per level (N_l,) squared distances of one image to the level's entities; path (4,)
    global ids (-1 = absent: that level and the ones below get no candidates); temperatures: (4,) per-level
    temperatures of the probabilities (None: 1)."""
    temperatures = [1.0] * N_LEVELS if temperatures is None else [float(t) for t in temperatures]
    parents = np.asarray(parents, dtype=np.int64)
    out = []
    for level in range(N_LEVELS):
        lo, hi = int(level_offsets[level]), int(level_offsets[level + 1])
        if level > 0 and path[level - 1] < 0:
            out.append((np.zeros(0, dtype=np.int64), np.zeros(0)))
            continue
        ids = np.arange(lo, hi) if level == 0 else lo + np.flatnonzero(parents[lo:hi] == path[level - 1])
        logits = -np.asarray(level_sqdists[level], dtype=np.float64)[ids - lo] / (tau * temperatures[level])
        probs = np.exp(logits - logits.max()) if len(ids) else np.zeros(0)
        probs = probs / probs.sum() if len(ids) else probs
        order = np.lexsort((ids, -probs))
        out.append((ids[order], probs[order]))
    return out


def explain_path(path: np.ndarray, candidates: list[tuple[np.ndarray, np.ndarray]], gazetteer_table: dict,
                 concept_probs: np.ndarray | None = None, profiles: np.ndarray | None = None,
                 vocabulary=None, n_reasons: int = 3, n_runners_up: int = 2,
                 min_contribution: float = 0.02) -> list[LevelExplanation]:
    """Explain one predicted path (4,) global ids (-1 = absent).

    candidates: per level (ids, probs) from `sibling_candidates` or `candidates_from_paths`; the chosen entity's
    probability is its entry there. gazetteer_table: {"keys", "names", "lat_deg", "lon_deg", "parents",
    "level_offsets"} arrays (see `table_of`). concept_probs (K,), profiles (E, K), vocabulary (len K): when any
    is None, no concept reasons are given.
    """
    keys, names = gazetteer_table["keys"], gazetteer_table["names"]
    parents, offsets = gazetteer_table["parents"], gazetteer_table["level_offsets"]

    def candidate(entity: int, prob: float) -> Candidate:
        return Candidate(int(entity), str(keys[entity]), str(names[entity]), float(prob),
                         float(gazetteer_table["lat_deg"][entity]), float(gazetteer_table["lon_deg"][entity]))

    with_concepts = concept_probs is not None and profiles is not None and vocabulary is not None
    if with_concepts and not (len(concept_probs) == profiles.shape[1] == len(vocabulary)):
        raise ValueError(f"concept sizes disagree: image {len(concept_probs)}, profiles {profiles.shape[1]}, "
                         f"vocabulary {len(vocabulary)}")
    out = []
    for level in range(N_LEVELS):
        entity = int(path[level])
        if entity < 0:
            break
        ids, probs = candidates[level]
        where = np.flatnonzero(ids == entity)
        chosen = candidate(entity, probs[where[0]] if len(where) else float("nan"))
        others = [(int(e), float(p)) for e, p in zip(ids.tolist(), probs.tolist()) if e != entity]
        runners = [candidate(e, p) for e, p in others[:n_runners_up]]
        explanation = LevelExplanation(LEVELS[level], chosen, runners, compared_with="")
        if runners:
            explanation.compared_with = runners[0].name
        elif level > 0:
            explanation.compared_with = f"{names[parents[entity]]} (parent)"
        else:
            explanation.compared_with = "all countries"
        if with_concepts:
            other_profile = _compared_profile(profiles, runners, level, int(parents[entity]), offsets)
            explanation.supporting, explanation.against = _concept_reasons(
                concept_probs, profiles[entity], other_profile, vocabulary, n_reasons, min_contribution)
        out.append(explanation)
    return out


def _compared_profile(profiles: np.ndarray, runners: list[Candidate], level: int, parent: int,
                      offsets) -> np.ndarray:
    """The concept profile (K,) a chosen entity is compared with: the first runner-up's, else its parent's, else
    (a country without runner-up) the mean over all countries."""
    if runners:
        return profiles[runners[0].entity]
    if level > 0:
        return profiles[parent]
    countries = profiles[int(offsets[0]):int(offsets[1])]
    with np.errstate(invalid="ignore"), _quiet():
        return np.nanmean(countries, axis=0)


def _concept_reasons(concept_probs: np.ndarray, chosen_profile: np.ndarray, other_profile: np.ndarray, vocabulary,
                     n_reasons: int, min_contribution: float) -> tuple[list[ConceptReason], list[ConceptReason]]:
    """(supporting, against): the active concepts (p >= ACTIVE_PROB) whose contribution is >= min_contribution
    (largest first), and <= -min_contribution (most negative first), at most n_reasons each; ties by index."""
    contrib = level_contributions(concept_probs, chosen_profile, other_profile)
    active = np.asarray(concept_probs) >= ACTIVE_PROB

    def reasons(indices) -> list[ConceptReason]:
        return [ConceptReason(vocabulary.concepts[k].name, vocabulary.concepts[k].description,
                              vocabulary.concepts[k].group, round(float(concept_probs[k]), 4),
                              _round(chosen_profile[k]), _round(other_profile[k]), round(float(contrib[k]), 4))
                for k in indices]

    order = np.lexsort((np.arange(len(contrib)), -contrib))
    support = [k for k in order.tolist() if active[k] and contrib[k] >= min_contribution][:n_reasons]
    order = np.lexsort((np.arange(len(contrib)), contrib))
    against = [k for k in order.tolist() if active[k] and contrib[k] <= -min_contribution][:n_reasons]
    return reasons(support), reasons(against)


class _quiet:
    """Silence numpy's 'mean of empty slice' RuntimeWarning (all-NaN columns are expected)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _round(value) -> float:
    value = float(value)
    return round(value, 4) if math.isfinite(value) else float("nan")


def table_of(gaz) -> dict:
    """The gazetteer arrays `explain_path` reads."""
    return {"keys": gaz.keys, "names": gaz.names, "lat_deg": gaz.lat_deg, "lon_deg": gaz.lon_deg,
            "parents": gaz.parents, "level_offsets": gaz.level_offsets}


# ------------------------------------------------------------------------------------------------- provenance
def model_provenance(model_dir: str | Path) -> dict:
    """What produced a model directory: backbone, training size and steps, gazetteer, training data (when
    recorded), read from config.json/run_config.json, train_summary.json and gazetteer/metadata.json. Files and
    directories are named by their base names (`names.path_name`): the provenance is shown to the server's
    clients and drawn in the map's header."""
    root = Path(model_dir)

    def read(name: str) -> dict:
        try:
            return json.loads((root / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    config = read("config.json").get("config") or read("run_config.json")
    summary = read("train_summary.json")
    gaz_meta = read("gazetteer/metadata.json")
    model_cfg = config.get("model", {}) if isinstance(config, dict) else {}
    out = {"model_dir": path_name(root), "backbone": path_name(model_cfg.get("backbone")), "pretrained": model_cfg.get("pretrained"),
           "geometry": model_cfg.get("geometry"), "n_train_images": summary.get("n_train"),
           "steps": summary.get("steps"), "epochs": summary.get("epochs"),
           "gazetteer_entities_per_level": gaz_meta.get("counts_per_level"),
           "gazetteer_source": (gaz_meta.get("source") or {}).get("kind")}
    train_csv = summary.get("train_csv") or (config.get("data", {}) if isinstance(config, dict) else {}).get("train_csv")
    if train_csv:
        out["train_csv"] = path_name(train_csv)
        meta_path = Path(str(train_csv)).parent / "metadata.json"
        try:
            kind = json.loads(meta_path.read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
        if kind == "hierloc-demo-data":
            out["training_data"] = "hierloc demo world: NASA Blue Marble satellite patches (not street-level photos)"
    return out


def provenance_line(prov: dict) -> str:
    """One human sentence: which model and training data produced the answers."""
    parts = [f"model {prov.get('model_dir')}"]
    if prov.get("backbone"):
        parts.append(f"backbone {prov['backbone']}{' (pretrained)' if prov.get('pretrained') else ''}")
    if prov.get("n_train_images") is not None:
        parts.append(f"trained on {prov['n_train_images']} images for {prov.get('steps')} steps")
    counts = prov.get("gazetteer_entities_per_level") or {}
    if counts:
        parts.append("gazetteer " + ", ".join(f"{counts[k]} {k}" for k in LEVELS if k in counts))
    if prov.get("training_data"):
        parts.append(f"data: {prov['training_data']}")
    elif prov.get("train_csv"):
        parts.append(f"data: {prov['train_csv']}")
    return "; ".join(parts)


# -------------------------------------------------------------------------------------------- running a model
def load_concept_parts(hl, model_dir: str | Path | None):
    """(vocabulary, profiles (E, K) numpy) of a model that carries a concept head, else (None, None).

    Profiles: the model's ``concept_profiles`` buffer, else ``concept_profiles.npy`` in the model directory.
    """
    head = getattr(hl.model, "concept_head", None)
    if head is None or model_dir is None:
        return None, None
    vocab_path = Path(model_dir) / VOCABULARY_FILE
    if not vocab_path.is_file():
        log.warning("%s: model has a concept head but no %s; concepts are not explained", model_dir, VOCABULARY_FILE)
        return None, None
    vocabulary = ConceptVocabulary.load(vocab_path)
    buffer = getattr(hl.model, "concept_profiles", None)
    if buffer is not None:
        profiles = buffer.detach().cpu().numpy()
    elif (Path(model_dir) / "concept_profiles.npy").is_file():
        profiles = np.load(Path(model_dir) / "concept_profiles.npy", allow_pickle=False)
    else:
        log.warning("%s: model has a concept head but no concept profiles; concepts are not explained", model_dir)
        return None, None
    if profiles.shape != (hl.model.n_entities, len(vocabulary)) or head.n_concepts != len(vocabulary):
        raise InputError(f"{model_dir}: concept profiles {tuple(profiles.shape)}, head ({head.n_concepts}) and "
                         f"{VOCABULARY_FILE} ({len(vocabulary)} concepts) disagree")
    return vocabulary, profiles


def explain_images(hl, images: Sequence, model_dir: str | Path | None = None, top_k: int | None = None,
                   beam: int | None = None, n_reasons: int = 3, n_runners_up: int = 2, batch_size: int = 16,
                   candidates: str = "siblings", vocabulary=None, profiles: np.ndarray | None = None,
                   exif: str = "compare", min_prob: float | None = None) -> list[Explanation]:
    """Explain where each image (path, `EncodedImage`, PIL image) was taken with a loaded `hierloc.HierLoc`.

    candidates: "siblings" (children of the chosen parent, see the module docstring) or "paths" (the entities
    of the search's top-k paths). vocabulary, profiles (E, K): override what `load_concept_parts` finds in the
    model (both or neither; the model must have a ``concept_head``). Deterministic: the model runs in eval
    mode, ties break by entity index. exif: "compare" reads the file's GPS and reports it next to the answer,
    "ignore" does not read it. min_prob: keep the levels up to the first one below the country whose chosen
    entity's probability is < min_prob (the country is always kept), as `predict --min-prob` does.
    """
    if exif not in ("compare", "ignore"):
        raise InputError(f"exif={exif!r}: expected 'compare' or 'ignore' (an explanation explains the model's "
                         "answer, so it cannot answer from the GPS)")
    if candidates not in ("siblings", "paths"):
        raise InputError(f"candidates={candidates!r}: expected 'siblings' or 'paths'")
    if (vocabulary is None) != (profiles is None):
        raise ValueError("pass both vocabulary and profiles, or neither")
    if vocabulary is None:
        vocabulary, profiles = load_concept_parts(hl, model_dir)
    elif getattr(hl.model, "concept_head", None) is None:
        raise ValueError("concept vocabulary/profiles given but the model has no concept_head")
    prov = model_provenance(model_dir) if model_dir is not None else {"model_dir": path_name(hl.source)}
    gaz = hl.gazetteer
    table = table_of(gaz)
    hl.model.eval()
    out: list[Explanation] = []
    images = list(images)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        names = [source_name(item) if isinstance(item, (str, Path, EncodedImage)) else f"<image {start + i}>"
                 for i, item in enumerate(chunk)]
        sqdists, result, concept_probs = _search_batch(hl, hl.preprocess(chunk), beam, top_k, vocabulary)
        paths = result.paths.cpu().numpy()
        level_probs = result.level_probs.cpu().numpy()
        scores = result.scores.cpu().numpy()
        for row, name in enumerate(names):
            path = paths[row, 0]
            if candidates == "siblings":
                cands = sibling_candidates([d[row] for d in sqdists], path, gaz.level_offsets, gaz.parents, hl.tau,
                                           hl.report_temperatures())
                if hl.search_calibration() is not None:  # the chosen entity at its calibrated probability
                    cands = [familiarity.calibrated_members(ids, probs, int(path[lv]), float(level_probs[row, 0, lv]))
                             if path[lv] >= 0 else (ids, probs) for lv, (ids, probs) in enumerate(cands)]
            else:
                cands = candidates_from_paths(paths[row], level_probs[row])
            probs_row = None if concept_probs is None else concept_probs[row]
            levels = explain_path(path, cands, table, probs_row, profiles, vocabulary, n_reasons=n_reasons,
                                  n_runners_up=n_runners_up)
            levels = cut_levels(levels, min_prob)
            deepest = levels[-1].chosen if levels else None
            gps = _exif_gps(chunk[row]) if exif == "compare" else None
            radius = None
            if result.radius90_km is not None and deepest is not None:   # from the full path's point, widened
                tip = int(path.max())                                     # by how far a cut moved the answer
                radius = float(result.radius90_km[row]) + float(haversine_km(
                    gaz.lat_deg[tip], gaz.lon_deg[tip], deepest.lat_deg, deepest.lon_deg))
            out.append(Explanation(name, deepest.lat_deg if deepest else float("nan"),
                                   deepest.lon_deg if deepest else float("nan"), levels,
                                   _image_concepts(probs_row, vocabulary), _alternatives(gaz, paths[row], scores[row]),
                                   prov, concepts_available=vocabulary is not None,
                                   gps_lat_deg=gps[0] if gps else None, gps_lon_deg=gps[1] if gps else None,
                                   radius90_km=radius))
    return out


def cut_levels(levels: list[LevelExplanation], min_prob: float | None) -> list[LevelExplanation]:
    """The levels up to (excluding) the first one below the country whose chosen probability is < min_prob."""
    if min_prob is None:
        return levels
    for depth, level in enumerate(levels[1:], start=1):
        if level.chosen.probability < min_prob:
            return levels[:depth]
    return levels


@torch.no_grad()
def _search_batch(hl, pixels: torch.Tensor, beam: int | None, top_k: int | None, vocabulary):
    """(B, 3, S, S) pixels -> (per level (B, N_l) squared distances as numpy, the search's SearchResult, concept
    probabilities (B, K) as numpy or None without a vocabulary)."""
    model = hl.model
    with encoder_autocast(hl.device):
        features = model.encode_images(to_device(pixels, hl.device))
    features = features.float()
    points = model.embed_features(features)
    sqdists = [d.cpu().numpy() for d in model.level_sqdists(points, hl.entity_points())]
    result = hl.search_points(points, beam=beam, top_k=top_k, novelty=hl.feature_novelty(features))
    concept_probs = None
    if vocabulary is not None:
        logits, _ = model.concept_head(features)
        concept_probs = torch.sigmoid(logits).cpu().numpy()
    return sqdists, result, concept_probs


def _image_concepts(probs_row: np.ndarray | None, vocabulary) -> list[dict]:
    """The image's 8 most probable concepts (ties by index): [{name, probability}], [] without concepts."""
    if probs_row is None:
        return []
    order = np.lexsort((np.arange(len(probs_row)), -probs_row))[:8]
    return [{"name": vocabulary.concepts[k].name, "probability": round(float(probs_row[k]), 4)}
            for k in order.tolist()]


def _alternatives(gaz, paths_row: np.ndarray, scores_row: np.ndarray) -> list[dict]:
    """The search's other paths (K - 1, 4) -> [{names, keys, score, lat_deg, lon_deg of the deepest entity}]."""
    alternatives = []
    for k in range(1, paths_row.shape[0]):
        alt = [int(e) for e in paths_row[k] if e >= 0]
        if not alt:
            continue
        alternatives.append({"names": [str(gaz.names[e]) for e in alt], "keys": [str(gaz.keys[e]) for e in alt],
                             "score": round(float(scores_row[k]), 4),
                             "lat_deg": float(gaz.lat_deg[alt[-1]]), "lon_deg": float(gaz.lon_deg[alt[-1]])})
    return alternatives


def _exif_gps(item) -> tuple[float, float] | None:
    """(lat, lon) from the file's EXIF GPS tags, or None (no file, no tags, unreadable)."""
    if not isinstance(item, (str, Path, EncodedImage)):
        return None
    try:
        gps = read_gps(item)
    except Exception:  # noqa: BLE001 - EXIF is a bonus for the picture; a bad tag must not stop the explanation
        return None
    return (float(gps.lat_deg), float(gps.lon_deg)) if gps is not None else None


# ----------------------------------------------------------------------------------------------- formatting
def format_text(explanation: Explanation, show_against: bool = True) -> str:
    """The indented tree a person reads (see docs/concepts.md for an example)."""
    e = explanation
    lines = [f"{e.source}  ->  {e.lat_deg:.4f}, {e.lon_deg:.4f} (lat, lon deg)"]
    if e.gps_lat_deg is not None:
        km = float(haversine_km(e.lat_deg, e.lon_deg, e.gps_lat_deg, e.gps_lon_deg))
        lines[0] += f"   [EXIF GPS {e.gps_lat_deg:.4f}, {e.gps_lon_deg:.4f}: {km:.0f} km away]"
    if e.radius90_km is not None:
        lines.append(f"  within {e.radius90_km:,.0f} km of the point with 90 % probability")
    for depth, lv in enumerate(e.levels):
        pad = "  " * (depth + 1)
        runners = ", ".join(f"{r.name} {r.probability:.3f}" + (" (higher at this level alone)"
                                                               if r.probability > lv.chosen.probability else "")
                            for r in lv.runners_up) or "none"
        lines.append(f"{pad}{lv.level}: {lv.chosen.name}  p={lv.chosen.probability:.3f} on the best path   "
                     f"(other candidates: {runners})")
        for reason in lv.supporting:
            lines.append(f"{pad}  + {reason.name}: in image {reason.image_prob:.2f}, "
                         f"{_pct(reason.profile_chosen)} of {lv.chosen.name} vs {_pct(reason.profile_other)} of "
                         f"{lv.compared_with}  [{reason.contribution:+.2f}]")
        if show_against:
            for reason in lv.against:
                lines.append(f"{pad}  - {reason.name}: in image {reason.image_prob:.2f}, "
                             f"{_pct(reason.profile_chosen)} of {lv.chosen.name} vs {_pct(reason.profile_other)} of "
                             f"{lv.compared_with}  [{reason.contribution:+.2f}]")
    if not e.concepts_available:
        lines.append("  (no concept reasons: this model has no concept head or no concept profiles)")
    elif e.image_concepts:
        lines.append("  concepts seen in the image: " + ", ".join(
            f"{c['name']} {c['probability']:.2f}" for c in e.image_concepts[:5]))
    return "\n".join(lines)


def _pct(value: float) -> str:
    return "?" if not math.isfinite(value) else f"{100 * value:.0f}%"


def to_json(explanations: Sequence[Explanation]) -> str:
    """Deterministic JSON (sorted keys; NaN written as null)."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return json.dumps([clean(e.to_dict()) for e in explanations], indent=2, sort_keys=True, ensure_ascii=False)
