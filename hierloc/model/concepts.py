"""Geographic concepts: the vocabulary, labels from data, the concept head, entity profiles and quality metrics.

A concept is a yes/no property a person uses to place a photo ("drives on the left", "desert", "rugged terrain").
Labels always come from data, never from a model (sources: docs/concepts.md):

* location concepts, for every dataset: `gazetteer.concepts` computes them from (lat, lon) with offline data;
* dataset concepts, when the training CSV has such columns (OSV5M: land_cover, climate, soil, drive_side,
  dist_sea, road_index): a categorical column gives one concept per value, a numeric one three bins at the
  training set's tertiles. `ConceptVocabulary.fit_csv_columns` fixes the values/bins on the training CSV; the
  fitted vocabulary is saved with the model (``concepts.json``) so validation and inference use the same K.

Label matrix: float32 (N, K) in {0, 1}, NaN where unknown (a missing CSV value, land cover at sea, ...).

The concept head is a bottleneck for part of the prediction: ``logits = MLP(features)``, ``p = sigmoid(logits)``,
``tangent_delta = W (p - 1/2)``, which the model adds to the image's tangent vector before expmap0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from gazetteer import concepts as location, csvio
from gazetteer.atomic import atomic_write_text
from gazetteer.concepts import assets_dir, RULES
from gazetteer.schema import N_LEVELS
from hierloc.errors import InputError

log = logging.getLogger(__name__)

VOCABULARY_FILE = "concepts.json"
MISSING_STRINGS = frozenset({"", "nan", "none", "null", "na", "n/a"})
NUMERIC_BINS = ("low", "mid", "high")
MAX_CATEGORIES = 64


# ------------------------------------------------------------------------------------------------- vocabulary
@dataclasses.dataclass(frozen=True)
class Concept:
    """One concept. source: 'location' (gazetteer.concepts rule of the same name) or 'csv'.

    csv concepts: categorical ones hold `column` and `value` (label = 1 where the column equals it); numeric ones
    hold `column`, `low`, `high` (label = 1 where low <= value < high; None = unbounded)."""

    name: str
    group: str
    description: str
    source: str = "location"
    origin: str = ""                  # which data (a key of the vocabulary's `sources`)
    column: str | None = None
    value: str | None = None
    low: float | None = None
    high: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and v != ""}


class ConceptVocabulary:
    """An ordered list of concepts (index k = column k of label matrices and of the concept head's logits)."""

    def __init__(self, concepts: Sequence[Concept], sources: dict | None = None, csv_columns: dict | None = None):
        self.concepts = tuple(concepts)
        self.sources = dict(sources or {})
        self.csv_columns = dict(csv_columns or {})
        names = [c.name for c in self.concepts]
        duplicates = [name for name, count in Counter(names).items() if count > 1]
        if duplicates:
            raise InputError(f"concept vocabulary: duplicate concept name {duplicates[0]!r}")
        self._index = {name: k for k, name in enumerate(names)}

    # -- accessors
    def __len__(self) -> int:
        return len(self.concepts)

    def __repr__(self) -> str:
        n_csv = sum(c.source == "csv" for c in self.concepts)
        return f"ConceptVocabulary({len(self)} concepts: {len(self) - n_csv} location, {n_csv} from CSV columns)"

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.concepts]

    @property
    def groups(self) -> list[str]:
        return [c.group for c in self.concepts]

    @property
    def descriptions(self) -> list[str]:
        return [c.description for c in self.concepts]

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"no concept {name!r} in this vocabulary") from None

    # -- persistence
    @classmethod
    def load(cls, path: str | Path | None = None) -> "ConceptVocabulary":
        """The vocabulary file: default assets/concepts.json (location concepts only, plus the specs of known CSV
        columns), or a model's fitted concepts.json. InputError for a missing or malformed file."""
        path = Path(path) if path is not None else assets_dir() / VOCABULARY_FILE
        if path.is_dir():
            path = path / VOCABULARY_FILE
        if not path.is_file():
            raise InputError(f"{path}: concept vocabulary not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: concept vocabulary is not valid JSON ({exc})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "concept vocabulary") -> "ConceptVocabulary":
        if not isinstance(data, dict) or not isinstance(data.get("concepts"), list):
            raise InputError(f"{source}: expected an object with a 'concepts' list")
        concepts = []
        fields = {f.name for f in dataclasses.fields(Concept)}
        for i, item in enumerate(data["concepts"]):
            if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item.get(k)
                                                     for k in ("name", "group", "description")):
                raise InputError(f"{source}: concepts[{i}] needs non-empty strings 'name', 'group', 'description'")
            item = dict(item)
            if item.get("source", "location") not in ("location", "csv"):
                item["origin"], item["source"] = item["source"], "location"
            concept = Concept(**{k: v for k, v in item.items() if k in fields})
            if concept.source == "location" and concept.name not in RULES:
                raise InputError(f"{source}: concepts[{i}] {concept.name!r} is a location concept without a rule in "
                                 "gazetteer.concepts (a newer vocabulary? upgrade hierloc)")
            if concept.source == "csv" and not concept.column:
                raise InputError(f"{source}: concepts[{i}] {concept.name!r} comes from a CSV but names no column")
            concepts.append(concept)
        return cls(concepts, data.get("sources"), data.get("csv_columns"))

    def to_dict(self) -> dict:
        return {"format_version": 1, "sources": self.sources, "concepts": [c.to_dict() for c in self.concepts],
                "csv_columns": self.csv_columns}

    def save(self, path: str | Path) -> Path:
        """Write the vocabulary as JSON, atomically (a model directory gets ``concepts.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / VOCABULARY_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")
        return path

    # -- dataset concepts
    def fit_csv_columns(self, columns: dict[str, np.ndarray] | None, extra_columns: Sequence[str] = (),
                        max_categories: int = MAX_CATEGORIES) -> "ConceptVocabulary":
        """A new vocabulary = this one + concepts from the CSV columns present in `columns` (N,) each.

        Used columns: the known ones (this vocabulary's ``csv_columns`` specs: OSV5M's land_cover, climate, soil,
        drive_side, dist_sea, road_index) and `extra_columns` (kind guessed: numeric when every value parses as
        a number and there are more than `max_categories` distinct values, else categorical). Categorical:
        one concept per observed value (the `max_categories` most frequent); numeric: low/mid/high at the
        tertiles of the finite values. Missing values (empty, nan, NA, ...) are ignored here.
        """
        if not columns:
            return self
        concepts = [c for c in self.concepts if c.source != "csv"]
        specs = dict(self.csv_columns)
        wanted = [name for name in specs if name in columns] + [name for name in extra_columns if name not in specs]
        for name in extra_columns:
            if name not in columns:
                raise InputError(f"concept column {name!r} is not in the CSV (available: {', '.join(columns)})")
        for name in wanted:
            values = np.asarray(columns[name])
            spec = specs.get(name) or {"kind": _guess_kind(values, max_categories), "group": f"{name} (dataset)",
                                       "description": f"the dataset's {name} column"}
            specs[name] = spec
            if spec.get("kind") == "numeric":
                concepts += _numeric_concepts(name, values, spec)
            else:
                concepts += _categorical_concepts(name, values, spec, max_categories)
        return ConceptVocabulary(concepts, self.sources, specs)

    def select(self, names: Sequence[str]) -> "ConceptVocabulary":
        """A vocabulary of these concepts, in this order (e.g. to drop concepts with too few positive labels:
        ``keep = [n for n, pos in zip(vocab.names, np.nansum(labels, 0)) if pos >= 20]``)."""
        return ConceptVocabulary([self.concepts[self.index(name)] for name in names], self.sources, self.csv_columns)

    @property
    def location_names(self) -> list[str]:
        return [c.name for c in self.concepts if c.source == "location"]


def _normalise(values: np.ndarray) -> np.ndarray:
    """Strings of a CSV column (N,) -> canonical str objects: stripped, '14.0' -> '14', missing -> ''."""
    out = []
    for value in np.asarray(values, dtype=object).tolist():
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            out.append("")
            continue
        text = str(value).strip()
        if text.lower() in MISSING_STRINGS:
            out.append("")
            continue
        try:
            number = float(text)
            if math.isfinite(number) and number == int(number) and abs(number) < 2**53:
                text = str(int(number))
        except ValueError:
            pass
        out.append(text)
    return np.array(out, dtype=object)


def _to_float(name: str, values: np.ndarray) -> np.ndarray:
    """Numeric column (N,) -> float64 with NaN for missing; InputError naming the first non-number."""
    text = _normalise(values)
    out = np.full(len(text), np.nan)
    for i, item in enumerate(text.tolist()):
        if item == "":
            continue
        try:
            out[i] = float(item)
        except ValueError:
            raise InputError(f"concept column {name!r}: value {item!r} in data row {i + 1} is not a number") from None
    return out


def _guess_kind(values: np.ndarray, max_categories: int) -> str:
    text = _normalise(values)
    present = text[text != ""]
    try:
        np.asarray(present, dtype=np.float64)
    except ValueError:
        return "categorical"
    return "numeric" if len(set(present.tolist())) > max_categories else "categorical"


def _sort_key(value: str):
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def _categorical_concepts(name: str, values: np.ndarray, spec: dict, max_categories: int) -> list[Concept]:
    counts = Counter(v for v in _normalise(values).tolist() if v != "")
    kept = [value for value, _ in counts.most_common(max_categories)]
    if len(counts) > max_categories:
        log.warning("concept column %r has %d distinct values; keeping the %d most frequent", name, len(counts),
                    max_categories)
    legend = spec.get("legend", {})
    concepts = []
    for value in sorted(kept, key=_sort_key):
        meaning = f" ({legend[value]})" if value in legend else ""
        concepts.append(Concept(f"{name}={value}", spec.get("group", f"{name} (dataset)"),
                                f"{spec.get('description', name)}: {name} = {value}{meaning}", "csv", "csv",
                                column=name, value=value))
    return concepts


def _numeric_concepts(name: str, values: np.ndarray, spec: dict) -> list[Concept]:
    numbers = _to_float(name, values)
    finite = numbers[np.isfinite(numbers)]
    if finite.size == 0:
        log.warning("concept column %r has no numeric value; no concept made from it", name)
        return []
    q1, q2 = (float(x) for x in np.quantile(finite, [1 / 3, 2 / 3]))
    edges = [None, q1, q2, None]
    if q1 == q2:  # a dominant value: two bins, below and from it
        edges = [None, q1, None]
    group = spec.get("group", f"{name} (dataset)")
    concepts = []
    for i, (low, high) in enumerate(zip(edges[:-1], edges[1:])):
        label = NUMERIC_BINS[i] if len(edges) == 4 else ("low", "high")[i]
        rule = (f"{name} < {high:.4g}" if low is None else f"{name} >= {low:.4g}" if high is None
                else f"{low:.4g} <= {name} < {high:.4g}")
        concepts.append(Concept(f"{name}:{label}", group,
                                f"{spec.get('description', name)}: {rule} (training-set tertile)", "csv", "csv",
                                column=name, low=low, high=high))
    return concepts


# ----------------------------------------------------------------------------------------------------- labels
def read_concept_columns(csv_path: str | Path, rows: np.ndarray | None = None,
                         columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The concept columns of a CSV as str arrays (N,), aligned to `rows` (1-based data row numbers, e.g.
    `ImageTable.rows`; default all rows). columns: default the known ones (vocabulary csv_columns) present in
    the header; a named column that is absent is an InputError."""
    header = csvio.read_header(csv_path)
    if columns is None:
        known = ConceptVocabulary.load().csv_columns
        columns = [name for name in known if name in header]
    else:
        for name in columns:
            csvio.find_column(header, name, (), csv_path, "concept")
    if not columns:
        return {}
    parts: dict[str, list] = {name: [] for name in columns}
    numbers = []
    for chunk, row_numbers in csvio.iter_chunks(csv_path, list(columns)):
        for name in columns:
            parts[name].append(chunk[name].astype(object))
        numbers.append(row_numbers)
    all_rows = np.concatenate(numbers) if numbers else np.zeros(0, dtype=np.int64)
    out = {name: np.concatenate(chunks) if chunks else np.zeros(0, dtype=object) for name, chunks in parts.items()}
    if rows is None:
        return out
    rows = np.asarray(rows, dtype=np.int64)
    position = np.searchsorted(all_rows, rows)
    if (position >= len(all_rows)).any() or (all_rows[np.minimum(position, len(all_rows) - 1)] != rows).any():
        raise InputError(f"{csv_path}: some requested data rows are not in the file")
    return {name: values[position] for name, values in out.items()}


def concept_labels(lat_deg, lon_deg, csv_columns: dict[str, np.ndarray] | None = None, gazetteer=None,
                   vocabulary: ConceptVocabulary | None = None, window_deg: float | None = None,
                   progress: bool = False) -> np.ndarray:
    """Labels (N, K) float32 in {0, 1}, NaN where unknown, for points (N,) and optional CSV columns (N,) each.

    vocabulary: the concepts to label, in order; default `ConceptVocabulary.load()` fitted on `csv_columns`
    (fit once on the training CSV and pass the same vocabulary for validation/test, so K agrees). A CSV concept
    whose column is absent from `csv_columns` is NaN. gazetteer: accepted for API symmetry and unused: the
    country facts use the global GeoNames index, which is what every gazetteer's `locate` reproduces, so points
    outside a restricted gazetteer still get them.
    """
    del gazetteer
    if vocabulary is None:
        vocabulary = ConceptVocabulary.load().fit_csv_columns(csv_columns)
    lat = np.atleast_1d(np.asarray(lat_deg, dtype=np.float64))
    n = len(lat)
    for name, values in (csv_columns or {}).items():
        if len(values) != n:
            raise InputError(f"concept column {name!r} has {len(values)} values for {n} points")
    labels = np.full((n, len(vocabulary)), np.nan, dtype=np.float32)
    loc_idx = [k for k, c in enumerate(vocabulary.concepts) if c.source == "location"]
    if loc_idx:
        kwargs = {} if window_deg is None else {"window_deg": window_deg}
        labels[:, loc_idx] = location.location_concepts(
            lat, lon_deg, [vocabulary.concepts[k].name for k in loc_idx], progress=progress, **kwargs)
    cache: dict[str, np.ndarray] = {}
    for k, concept in enumerate(vocabulary.concepts):
        if concept.source != "csv" or not csv_columns or concept.column not in csv_columns:
            continue
        if concept.value is not None:
            if concept.column not in cache:
                cache[concept.column] = _normalise(csv_columns[concept.column])
            text = cache[concept.column]
            labels[:, k] = np.where(text == "", np.nan, (text == concept.value).astype(np.float32))
        else:
            key = concept.column + "\0numeric"
            if key not in cache:
                cache[key] = _to_float(concept.column, csv_columns[concept.column])
            x = cache[key]
            inside = np.ones(n, dtype=bool)
            with np.errstate(invalid="ignore"):
                if concept.low is not None:
                    inside &= x >= concept.low
                if concept.high is not None:
                    inside &= x < concept.high
            labels[:, k] = np.where(np.isfinite(x), inside.astype(np.float32), np.nan)
    return labels


# ------------------------------------------------------------------------------------------------ concept head
class ConceptHead(nn.Module):
    """features (B, F) -> (concept logits (B, K), tangent_delta (B, D)).

    logits = Linear-GELU-Dropout-Linear(features);  p = sigmoid(logits);  tangent_delta = W (p - 1/2),
    W (D, K) with no bias. Centring at 1/2 makes an undecided concept contribute nothing; W starts at zero, so
    adding the head to a model leaves its predictions unchanged at initialisation and the bottleneck's share
    grows as training finds it useful (the gradient of W is (p - 1/2) times the tangent gradient: non-zero).
    """

    def __init__(self, feature_dim: int, n_concepts: int, embed_dim: int, *, hidden: int, dropout: float):
        super().__init__()
        if n_concepts < 1:
            raise ValueError("ConceptHead needs at least one concept")
        self.mlp = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_concepts))
        self.to_tangent = nn.Linear(n_concepts, embed_dim, bias=False)
        nn.init.zeros_(self.to_tangent.weight)

    @property
    def n_concepts(self) -> int:
        return self.to_tangent.in_features

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.mlp(features.to(torch.float32))
        return logits, self.to_tangent(torch.sigmoid(logits) - 0.5)


def concept_loss(logits: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy over the known labels only: logits, labels (B, K), labels NaN = unknown.

    L = sum_{known (i,k)} BCE(logit_ik, y_ik) / #known; 0 (with a graph) when nothing is known.
    pos_weight (K,): optional weight of positive examples per concept (rare concepts).
    """
    labels = labels.to(logits.device, torch.float32)
    known = torch.isfinite(labels)
    target = torch.where(known, labels, torch.zeros_like(labels))
    losses = nn.functional.binary_cross_entropy_with_logits(logits.float(), target, reduction="none",
                                                            pos_weight=pos_weight)
    losses = torch.where(known, losses, torch.zeros_like(losses))
    return losses.sum() / known.sum().clamp_min(1)


def entity_concept_profiles(labels: np.ndarray, targets: np.ndarray, n_entities: int,
                            prior_strength: float = 0.0) -> np.ndarray:
    """Mean concept label of each entity's training images, NaN-aware: (N, K), (N, 4) global ids -> (E, K).

    profile[e, k] = (sum_{i in e, y_ik known} y_ik + m * mu_k) / (#{i in e, y_ik known} + m), with mu_k the mean
    over all known labels and m = prior_strength (0: the plain mean). NaN where the entity has no known label for
    the concept (and m = 0). Every level counts: an image contributes to its country, region, subregion, city.
    """
    labels = np.asarray(labels, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if labels.ndim != 2 or targets.shape != (labels.shape[0], N_LEVELS):
        raise ValueError(f"labels (N, K) and targets (N, 4) expected, got {labels.shape} and {targets.shape}")
    known = np.isfinite(labels)
    values = np.where(known, labels, 0.0)
    sums = np.zeros((n_entities, labels.shape[1]))
    counts = np.zeros((n_entities, labels.shape[1]))
    for level in range(N_LEVELS):
        ids = targets[:, level]
        rows = (ids >= 0) & (ids < n_entities)
        np.add.at(sums, ids[rows], values[rows])
        np.add.at(counts, ids[rows], known[rows])
    if prior_strength > 0:
        with np.errstate(invalid="ignore"):
            mean = np.where(known.any(axis=0), values.sum(axis=0) / np.maximum(known.sum(axis=0), 1), np.nan)
        sums += prior_strength * np.nan_to_num(mean)
        counts += prior_strength * np.isfinite(mean)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- quality
def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve, ties counted as one half: P(score_pos > score_neg) + P(=)/2.

    Mann-Whitney form: (sum of the positives' average ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg).
    NaN when a class is absent.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels) > 0.5
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks (N,) with ties sharing their average rank (numpy only)."""
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)                   # rank of the last member of each group of equal values
    return ((last - (counts - 1) / 2.0)[inverse]).astype(np.float64)


def concept_quality(probs: np.ndarray, labels: np.ndarray, names: Sequence[str] | None = None) -> dict:
    """How well predicted concept probabilities (N, K) match labels (N, K) (NaN = unknown, ignored).

    Returns {"auroc": {name: value}, "accuracy": {name: value at threshold 0.5}, "n_known": {name: count},
    "positive_rate": {name: share of positives}, "mean_auroc": mean over concepts where AUROC is defined,
    "mean_accuracy": mean over concepts with a known label}. AUROC is NaN for a concept whose known labels are
    all of one class.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if probs.shape != labels.shape or probs.ndim != 2:
        raise ValueError(f"probs and labels must both be (N, K); got {probs.shape} and {labels.shape}")
    names = list(names) if names is not None else [str(k) for k in range(probs.shape[1])]
    out = {"auroc": {}, "accuracy": {}, "n_known": {}, "positive_rate": {}}
    for k, name in enumerate(names):
        known = np.isfinite(labels[:, k]) & np.isfinite(probs[:, k])
        y, p = labels[known, k] > 0.5, probs[known, k]
        out["n_known"][name] = int(known.sum())
        out["auroc"][name] = auroc(p, y) if known.any() else float("nan")
        out["accuracy"][name] = float(((p >= 0.5) == y).mean()) if known.any() else float("nan")
        out["positive_rate"][name] = float(y.mean()) if known.any() else float("nan")
    aurocs = [v for v in out["auroc"].values() if math.isfinite(v)]
    accs = [v for v in out["accuracy"].values() if math.isfinite(v)]
    out["mean_auroc"] = float(np.mean(aurocs)) if aurocs else float("nan")
    out["mean_accuracy"] = float(np.mean(accs)) if accs else float("nan")
    return out
