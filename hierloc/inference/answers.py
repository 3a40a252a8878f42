"""What a prediction answers: the result records (`Prediction`, `Failure`, ...) and the backoff rules that cut a
best path (`cut_paths`), shared by the predictor, evaluation and the output writers. See docs/inference.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gazetteer.schema import LEVELS
from hierloc.errors import InputError

EXIF_MODES = ("compare", "use", "ignore")
SET_SEPARATOR = ";"  # between the entity ids of a prediction set in one CSV / GeoJSON cell


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
class SetMember:
    """One candidate of a prediction set (`Prediction.sets`)."""

    entity_id: str
    name: str
    probability: float


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
    radius90_km: float | None = None         # the truth lies within this distance of the point with 90 %
    #                                          probability (models calibrated with `hierloc calibrate`)
    sets: dict[str, list[SetMember]] | None = None  # per level, the prediction set (with a coverage)
    coverage: float | None = None            # the coverage the sets were built for

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
                "exif": asdict(self.exif) if self.exif is not None else None,
                "radius90_km": self.radius90_km,
                **({} if self.sets is None else {
                    "coverage": self.coverage,
                    "sets": {level: [asdict(m) for m in members] for level, members in self.sets.items()}})}

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
        row["radius90_km"] = self.radius90_km if self.radius90_km is not None else ""
        for name in LEVELS:
            members = (self.sets or {}).get(name)
            row[f"{name}_set"] = SET_SEPARATOR.join(m.entity_id for m in members) if members else ""
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
        row.update({"exif_lat_deg": "", "exif_lon_deg": "", "exif_dist_km": "", "radius90_km": "",
                    **{f"{name}_set": "" for name in LEVELS}, "error": self.error})
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


def check_options(min_prob: float | None, max_level: str, exif: str, beam: int | None, top_k: int | None) -> int:
    """InputError for an invalid prediction option (beam, top_k None: the model's); returns the index of
    `max_level`."""
    if max_level not in LEVELS:
        raise InputError(f"max_level {max_level!r}: expected one of {', '.join(LEVELS)}")
    if min_prob is not None and not 0.0 <= float(min_prob) <= 1.0:
        raise InputError(f"min_prob {min_prob!r}: expected a probability in [0, 1]")
    if exif not in EXIF_MODES:
        raise InputError(f"exif {exif!r}: expected one of {', '.join(EXIF_MODES)}")
    if beam is not None and int(beam) < 1:
        raise InputError(f"beam {beam!r}: expected an integer >= 1")
    if top_k is not None and int(top_k) < 1:
        raise InputError(f"top_k {top_k!r}: expected an integer >= 1")
    return LEVELS.index(max_level)
