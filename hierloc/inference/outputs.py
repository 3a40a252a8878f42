"""Streaming writers for `hierloc predict`: text, json, jsonl, csv, geojson.

Every writer takes records one at a time (`write(record)`, a `hierloc.inference.answers.Prediction` or `Failure`)
and writes them immediately, so memory does not grow with the number of images; `close(summary)` finishes the document.

* text: a header naming the model directory and its training data, then each image as an indented hierarchy
  with the level probabilities, the predicted point, the EXIF comparison and the alternatives.
* json: one document ``{"model": {...}, "predictions": [record, ...], "summary": {...}}``.
* jsonl: one record per line (no header or summary lines: every line has the same shape).
* csv: one flat row per image (`Prediction.flat()`: image, status, source, lat_deg, lon_deg, precision,
  score_logprob, <level>_id/_name/_prob, exif_lat_deg, exif_lon_deg, exif_dist_km, error); no alternatives.
* geojson: a FeatureCollection (RFC 7946: coordinates [lon, lat] in degrees) with the flat row as properties;
  images that failed have ``"geometry": null``. The model description is the foreign member ``"model"``.

Records carry ``status`` "ok" or "error"; failed images are written in their place so outputs line up with inputs.
JSON never contains NaN (written as null).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from typing import Any, Iterable, TextIO

import numpy as np

from hierloc.errors import InputError

FORMATS = ("text", "json", "jsonl", "csv", "geojson")
CSV_COLUMNS = (["image", "status", "source", "lat_deg", "lon_deg", "precision", "score_logprob"]
               + [f"{level}_{part}" for level in ("country", "region", "subregion", "city")
                  for part in ("id", "name", "prob")]
               + ["exif_lat_deg", "exif_lon_deg", "exif_dist_km", "radius90_km"]
               + [f"{level}_set" for level in ("country", "region", "subregion", "city")] + ["error"])


SET_SHOWN = 6  # prediction-set members printed per level in the text format


def _dumps(value: Any, indent: int | None = None) -> str:
    return json.dumps(json_ready(value), indent=indent, ensure_ascii=False, allow_nan=False)


def json_ready(value: Any) -> Any:
    """NaN/inf -> None (strict JSON), numpy scalars -> Python numbers, recursively."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


# ----------------------------------------------------------------------------------------------- text
def describe_model_text(description: dict) -> list[str]:
    """The text header: model directory, training data, gazetteer and search settings."""
    lines = [f"# model: {description.get('model_dir')} (hierloc {description.get('hierloc_version')}, backbone "
             f"{description.get('backbone')}, {description.get('geometry')} D={description.get('embed_dim')})"]
    training = description.get("training") or {}
    parts = []
    if training.get("csv"):
        parts.append(str(training["csv"]))
    if training.get("n_images") is not None:
        parts.append(f"{training['n_images']} images")
    if training.get("epochs") is not None:
        parts.append(f"{training['epochs']} epochs")
    lines.append(f"# trained on: {', '.join(parts) if parts else 'unknown (no training summary)'}")
    counts = description.get("gazetteer_entities") or {}
    lines.append("# gazetteer: " + ", ".join(f"{n} {level}" for level, n in counts.items())
                 + f" (hash {str(description.get('gazetteer_hash', ''))[:12]})")
    search = description.get("search")
    if search:
        lines.append("# search: " + ", ".join(f"{key} {value}" for key, value in search.items()))
    return lines


def _fmt_point(lat: float, lon: float) -> str:
    if not (math.isfinite(lat) and math.isfinite(lon)):
        return "(no point)"
    return f"{lat:.4f}, {lon:.4f} (lat, lon deg)"


def format_text(record) -> str:
    """One image as an indented hierarchy with probabilities (a `Prediction` or a `Failure`)."""
    if not record.ok:
        return f"{record.image}\n  ERROR: {record.error}"
    head = f"{record.image}  ->  {_fmt_point(record.lat_deg, record.lon_deg)}"
    head += f"  [{record.precision or 'no answer'} level, from {record.source}]"
    lines = [head]
    for depth, answer in enumerate(record.levels):
        label = f"{'  ' * (depth + 1)}{answer.level:<10}{answer.name}"
        prob = "p=1 (EXIF)" if record.source == "exif" else f"p={answer.probability:.3f}"
        lines.append(f"{label:<60} {prob}")
    if record.radius90_km is not None:
        lines.append(f"  within {record.radius90_km:,.0f} km of the point with 90 % probability")
    for level, members in (record.sets or {}).items():
        shown = ", ".join(f"{m.name} {m.probability:.2f}" for m in members[:SET_SHOWN])
        more = f", ... ({len(members) - SET_SHOWN} more)" if len(members) > SET_SHOWN else ""
        lines.append(f"  {level} set ({100 * record.coverage:g} %, {len(members)}): {shown}{more}")
    if record.exif is not None:
        dist = (f", {record.exif.dist_km:.1f} km from the answer" if record.exif.dist_km is not None else "")
        lines.append(f"  EXIF GPS: {_fmt_point(record.exif.lat_deg, record.exif.lon_deg)}{dist}")
    for alt in record.alternatives:
        names = " > ".join(answer.name for answer in alt.levels)
        lines.append(f"  alternative: {names}  (log p {alt.score:.2f}; {_fmt_point(alt.lat_deg, alt.lon_deg)})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- writers
class Writer:
    """Base: `write(record)` per image, `close(summary)` once at the end."""

    def __init__(self, stream: TextIO, description: dict):
        self.stream = stream
        self.description = description

    def write(self, record) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self, summary: dict) -> None:
        self.stream.flush()


class TextWriter(Writer):
    def __init__(self, stream: TextIO, description: dict):
        super().__init__(stream, description)
        self.stream.write("\n".join(describe_model_text(description)) + "\n")

    def write(self, record) -> None:
        self.stream.write("\n" + format_text(record) + "\n")

    def close(self, summary: dict) -> None:
        self.stream.write(f"\n# {summary_line(summary)}\n")
        super().close(summary)


class _JsonArrayWriter(Writer):
    """One JSON object: `opening`, "model", the array `key` (one element per record, streamed), "summary"."""

    opening = "{\n"
    key = "predictions"

    def __init__(self, stream: TextIO, description: dict):
        super().__init__(stream, description)
        self.count = 0
        self.stream.write(self.opening + '"model": ' + _dumps(description) + f',\n"{self.key}": [')

    def element(self, record) -> dict:
        return record.to_dict()

    def write(self, record) -> None:
        self.stream.write(("," if self.count else "") + "\n" + _dumps(self.element(record)))
        self.count += 1

    def close(self, summary: dict) -> None:
        self.stream.write("\n],\n\"summary\": " + _dumps(summary) + "\n}\n")
        super().close(summary)


class JsonWriter(_JsonArrayWriter):
    """{"model": ..., "predictions": [record.to_dict(), ...], "summary": ...}"""


class JsonlWriter(Writer):
    def write(self, record) -> None:
        self.stream.write(_dumps(record.to_dict()) + "\n")


class CsvWriter(Writer):
    def __init__(self, stream: TextIO, description: dict):
        super().__init__(stream, description)
        self.writer = csv.writer(stream, lineterminator="\n")
        self.writer.writerow(CSV_COLUMNS)

    def write(self, record) -> None:
        row = record.flat()
        self.writer.writerow([_csv_value(row[column]) for column in CSV_COLUMNS])


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return "" if value is None else value


class GeoJsonWriter(_JsonArrayWriter):
    """A FeatureCollection: {"type": "FeatureCollection", "model": ..., "features": [...], "summary": ...}"""

    opening = '{"type": "FeatureCollection",\n'
    key = "features"

    def element(self, record) -> dict:
        return record.to_geojson()


WRITERS = {"text": TextWriter, "json": JsonWriter, "jsonl": JsonlWriter, "csv": CsvWriter,
           "geojson": GeoJsonWriter}


def make_writer(fmt: str, stream: TextIO, description: dict) -> Writer:
    """The streaming writer for `fmt` (one of FORMATS) over an open text stream."""
    try:
        return WRITERS[fmt](stream, description)
    except KeyError:
        raise InputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}") from None


def summary_line(summary: dict) -> str:
    """'N images: P predicted (E from EXIF), F failed, in S s (R images/s)'; images/s counts every input."""
    count = summary["n_images"]
    text = (f"{count} image{'' if count == 1 else 's'}: {summary['n_predicted']} predicted"
            + (f" ({summary['n_from_exif']} from EXIF)" if summary.get("n_from_exif") else "")
            + f", {summary['n_failed']} failed")
    if summary.get("seconds") is not None:
        text += f", in {summary['seconds']:.1f} s ({summary.get('images_per_second', 0.0):.1f} images/s)"
    return text


# ------------------------------------------------------------------------------------------ one prediction run
def search_settings(flat: bool, beam: int | None, top_k: int, min_prob: float | None, max_level: str,
                    exif: str) -> dict:
    """The "search" entry of a run's model description (what `hierloc predict` and `hierloc serve` answer with)."""
    return {"mode": "flat" if flat else "beam", "beam": beam, "top_k": top_k, "min_prob": min_prob,
            "max_level": max_level, "exif": exif}


class RunSummary:
    """Counts of one prediction run, timed from construction: the summary every output format closes with."""

    def __init__(self):
        self.start = time.perf_counter()
        self.counts = {"n_images": 0, "n_predicted": 0, "n_from_exif": 0, "n_failed": 0}

    def add(self, record) -> None:
        """Count one `Prediction` or `Failure`."""
        self.counts["n_images"] += 1
        if record.ok:
            self.counts["n_predicted"] += 1
            self.counts["n_from_exif"] += record.source == "exif"
        else:
            self.counts["n_failed"] += 1

    def as_dict(self) -> dict:
        """n_images, n_predicted, n_from_exif, n_failed, seconds and images_per_second (every input counted)."""
        seconds = time.perf_counter() - self.start
        return dict(self.counts, seconds=seconds, images_per_second=self.counts["n_images"] / max(seconds, 1e-9))


def json_document(description: dict, records: Iterable, summary: RunSummary | None = None) -> str:
    """The whole `hierloc predict --format json` document of some records, as a string. summary: the run's
    counts so far (default: counted here, timed from this call)."""
    summary = summary if summary is not None else RunSummary()
    stream = io.StringIO()
    writer = JsonWriter(stream, description)
    for record in records:
        writer.write(record)
        summary.add(record)
    writer.close(summary.as_dict())
    return stream.getvalue()
