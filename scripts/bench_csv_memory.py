"""Peak memory of reading a training CSV of millions of rows: `hierloc build-gazetteer --from-csv` and the data
pipeline's table (`hierloc.data.tables.read_image_table`, what `train`, `eval` and feature extraction read).

    .venv/bin/python scripts/bench_csv_memory.py [--rows 1000000,2000000]

For each row count: writes a CSV `image,lat,lon` (paths like `images/000/000123.jpg`, uniform points on land and
sea), then runs each reader in a fresh subprocess and prints its peak RSS (ru_maxrss) next to the same process's
RSS before reading (imports included), so the table shows what the rows cost. Flat = the growth per million rows
is the size of the arrays the result must hold (coordinates, paths), not Python objects per row.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from _common import Stopwatch, run_json_child

# The child process of each reader: its imports, then its peak RSS before and after the reading (ru_maxrss, KiB),
# the seconds and the result's size, as JSON (json is imported after the measurement, so it counts in neither).
CHILD = """
import resource, sys, time
{imports}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
{read}
peak, seconds = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - start
import json
print(json.dumps([before, peak, seconds, size]))
"""
READERS = {
    "build-gazetteer --from-csv": CHILD.format(imports="from gazetteer import Gazetteer, csvio", read="""
lat, lon, _ = csvio.read_coordinates(sys.argv[1], "lat", "lon", on_bad="error")
gaz = Gazetteer.build_from_points(lat, lon, progress=False)
gaz.save(sys.argv[2])
size = gaz.n_entities"""),
    "read_image_table (train/eval/features)": CHILD.format(imports="from hierloc.data import tables", read="""
table = tables.read_image_table(sys.argv[1])
size = len(table)"""),
}


def write_csv(path: Path, n_rows: int, seed: int = 0, chunk: int = 250_000) -> None:
    """A CSV image,lat,lon of n_rows uniform points on the sphere, written in chunks."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as handle:
        handle.write("image,lat,lon\n")
        for start in range(0, n_rows, chunk):
            k = min(chunk, n_rows - start)
            lat = np.degrees(np.arcsin(rng.uniform(-1, 1, k)))
            lon = rng.uniform(-180, 180, k)
            ids = np.arange(start, start + k)
            handle.write("".join(f"images/{i // 1000:04d}/{i:08d}.jpg,{a:.6f},{b:.6f}\n"
                                 for i, a, b in zip(ids.tolist(), lat.tolist(), lon.tolist())))


def main() -> None:
    """Write each CSV, run each reader on it in a fresh process, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1000000,2000000", help="comma-separated row counts")
    args = ap.parse_args()
    counts = [int(x) for x in args.rows.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            csv_path = Path(tmp) / f"rows-{n}.csv"
            write_csv(csv_path, n)
            size_mb = csv_path.stat().st_size / 2 ** 20
            for name, code in READERS.items():
                out_dir = Path(tmp) / f"gaz-{n}-{len(results)}"
                before_kb, peak_kb, seconds, size = run_json_child(["-c", code, str(csv_path), str(out_dir)],
                                                                   env=dict(os.environ, OMP_NUM_THREADS="1"))
                results.append((n, size_mb, name, before_kb / 1024, peak_kb / 1024, seconds, size))
            csv_path.unlink()
    print(f"python {sys.version.split()[0]}; peak RSS of a fresh process per reader (ru_maxrss)")
    print("| rows | CSV MB | reader | result | RSS before reading MB | peak RSS MB | peak - before MB | bytes per row "
          "| s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, size_mb, name, before, peak, seconds, size in results:
        result = f"{size:,} entities" if name.startswith("build-gazetteer") else f"{size:,} rows"
        print(f"| {n:,} | {size_mb:.0f} | {name} | {result} | {before:.0f} | {peak:.0f} | {peak - before:.0f} | "
              f"{(peak - before) * 2 ** 20 / n:.0f} | {seconds:.1f} |")
    print("growth per extra million rows (peak RSS):")
    for name in dict.fromkeys(r[2] for r in results):
        runs = [r for r in results if r[2] == name]
        if len(runs) > 1:
            (n0, *_, peak0, _, _), (n1, *_, peak1, _, _) = runs[0], runs[-1]
            print(f"  {name}: {(peak1 - peak0) / ((n1 - n0) / 1e6):.0f} MB")


if __name__ == "__main__":
    with Stopwatch() as total:
        main()
    print(f"total {total.seconds:.0f} s")
