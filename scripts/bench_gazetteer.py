"""Benchmark the world gazetteer: build time, peak memory, size, load time, lookup throughput, cache agreement.

    .venv/bin/python scripts/bench_gazetteer.py                 # default base resolution
    .venv/bin/python scripts/bench_gazetteer.py --h3-res 3,4,5  # compare resolutions (one process each)

Each resolution runs in a fresh process so that peak memory (ru_maxrss) belongs to that build alone.
Points: uniform on the sphere (mostly sea), and "near places" (a random GeoNames place + 10 km Gaussian jitter,
a stand-in for photos, which are taken where people are). Cache agreement = how often the label at the centre
of the H3 leaf containing a point equals the exact (reverse_geocoder) label, per level.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from _common import Stopwatch, peak_rss_mib, run_json_child
from gazetteer import LEVELS


def sphere_points(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n points uniform on the sphere -> (lat, lon) degrees."""
    return np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n))), rng.uniform(-180.0, 180.0, n)


def near_place_points(n: int, rng: np.random.Generator, places_lat: np.ndarray, places_lon: np.ndarray):
    """n points each ~10 km (Gaussian) from a random place -> (lat, lon) degrees."""
    pick = rng.integers(0, len(places_lat), n)
    sigma_deg = 10.0 / 111.2  # ~10 km
    lat = np.clip(places_lat[pick] + rng.normal(0.0, sigma_deg, n), -90.0, 90.0)
    lon = (places_lon[pick] + rng.normal(0.0, sigma_deg, n) + 180.0) % 360.0 - 180.0
    return lat, lon


def dir_size_mb(path: str) -> float:
    """Total size of the files of a directory, MB (1e6 bytes)."""
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 1e6


def bench_one(h3_res: int, n_points: int, n_check: int, seed: int) -> dict:
    """The child process (--single): build, save, load and query the world gazetteer at one base resolution ->
    one column of the table (its peak memory is this process's)."""
    from gazetteer import Gazetteer
    from gazetteer.schema import FIELDS, KEY_SEPARATOR
    from gazetteer.geocoder import reverse_geocoder_reference

    result: dict = {"h3_res": h3_res}
    with Stopwatch() as watch:
        gaz = Gazetteer.build_global(h3_res=h3_res, progress=False)
    result["build_s"] = watch.seconds
    result["peak_rss_mb"] = peak_rss_mib()
    result["counts"] = gaz.metadata["counts_per_level"]
    result["n_cells"] = int(len(gaz.cells))
    result["cities_with_cells"] = float((gaz.area_km2[gaz.level_slice(3)] > 0).mean())
    with tempfile.TemporaryDirectory() as tmp:
        directory = os.path.join(tmp, "gazetteer")
        with Stopwatch() as watch:
            gaz.save(directory)
        result["save_s"] = watch.seconds
        result["size_mb"] = dir_size_mb(directory)
        with Stopwatch() as watch:
            loaded = Gazetteer.load(directory)
        result["load_s"] = watch.seconds
        with Stopwatch() as watch:
            loaded.locate([0.0], [0.0])
        result["first_locate_s"] = watch.seconds  # builds the KD tree
    rng = np.random.default_rng(seed)
    lat, lon = sphere_points(n_points, rng)
    with Stopwatch() as watch:
        exact = loaded.locate(lat, lon)
    result["locate_s"] = watch.seconds
    with Stopwatch() as watch:
        cached = loaded.locate_cached(lat, lon)
    result["locate_cached_s"] = watch.seconds
    result["agree_sphere"] = [float((exact[:, l] == cached[:, l]).mean()) for l in range(4)]
    near_lat, near_lon = near_place_points(n_points, rng, loaded.place_lat_deg, loaded.place_lon_deg)
    exact_near = loaded.locate(near_lat, near_lon)
    cached_near = loaded.locate_cached(near_lat, near_lon)
    result["agree_near"] = [float((exact_near[:, l] == cached_near[:, l]).mean()) for l in range(4)]
    # sanity: exact lookup == reverse_geocoder itself on a sample of both point sets
    check_lat = np.concatenate([lat[:n_check], near_lat[:n_check]])
    check_lon = np.concatenate([lon[:n_check], near_lon[:n_check]])
    expected = [KEY_SEPARATOR.join(r[f] for f in FIELDS) for r in reverse_geocoder_reference(check_lat, check_lon)]
    ours = loaded.keys[loaded.locate(check_lat, check_lon)[:, 3]].tolist()
    result["rg_checked"] = len(expected)
    result["rg_mismatches"] = sum(a != b for a, b in zip(ours, expected))
    return result


def print_table(results: list[dict], n_points: int) -> None:
    """One Markdown table: a row per metric, a column per base resolution."""
    rows = [
        ("entities (country/region/subregion/city)",
         lambda r: "/".join(f"{r['counts'][name]:,}" for name in LEVELS)),
        ("H3 leaf cells", lambda r: f"{r['n_cells']:,}"),
        ("cities owning >= 1 cell", lambda r: f"{100 * r['cities_with_cells']:.2f} %"),
        ("build time", lambda r: f"{r['build_s']:.1f} s"),
        ("peak memory (ru_maxrss)", lambda r: f"{r['peak_rss_mb']:.0f} MB"),
        ("save time / size on disk", lambda r: f"{r['save_s']:.1f} s / {r['size_mb']:.1f} MB"),
        ("load time", lambda r: f"{r['load_s']:.2f} s"),
        ("first locate after load (KD tree)", lambda r: f"{r['first_locate_s']:.2f} s"),
        (f"locate (exact), {n_points:,} points", lambda r: f"{r['locate_s']:.2f} s = {n_points / r['locate_s'] / 1e6:.2f} M/s"),
        (f"locate_cached (H3), {n_points:,} points",
         lambda r: f"{r['locate_cached_s']:.2f} s = {n_points / r['locate_cached_s'] / 1e6:.2f} M/s"),
        ("cache == exact, uniform sphere (c/r/s/city)", lambda r: " / ".join(f"{100 * a:.1f}" for a in r["agree_sphere"])),
        ("cache == exact, near places (c/r/s/city)", lambda r: " / ".join(f"{100 * a:.1f}" for a in r["agree_near"])),
        ("exact == reverse_geocoder (mismatches)", lambda r: f"{r['rg_mismatches']} of {r['rg_checked']:,}"),
    ]
    headers = ["metric"] + [f"base res {r['h3_res']}" for r in results]
    table = [[label] + [fmt(r) for r in results] for label, fmt in rows]
    widths = [max(len(row[i]) for row in table + [headers]) for i in range(len(headers))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(headers))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in table:
        print(line(row))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--h3-res", default="4", help="comma-separated base resolutions to compare")
    parser.add_argument("--points", type=int, default=1_000_000, help="random points for lookup timing and agreement")
    parser.add_argument("--check", type=int, default=20_000, help="points per set compared with reverse_geocoder itself")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)  # child mode: print JSON
    args = parser.parse_args()
    resolutions = [int(r) for r in args.h3_res.split(",")]
    if args.single:
        print(json.dumps(bench_one(resolutions[0], args.points, args.check, args.seed)))
        return 0
    results = []
    for res in resolutions:
        print(f"benchmarking base resolution {res} ...", file=sys.stderr, flush=True)
        results.append(run_json_child([__file__, "--single", "--h3-res", str(res), "--points", str(args.points),
                                       "--check", str(args.check), "--seed", str(args.seed)]))
    print(f"machine: {os.cpu_count()} CPU cores; python {sys.version.split()[0]}")
    print_table(results, args.points)
    return 0


if __name__ == "__main__":
    sys.exit(main())
