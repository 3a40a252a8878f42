"""Memory of reading zip shards in place: `zipfile.ZipFile` central directories held open (the old way) against the
cached member indexes of `hierloc.data.zipindex` (and the OSV5M id index `hierloc.data.shards.ShardIndex` over them).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_shard_index.py [--members 200000] [--shards 4]

Writes `--shards` stored zip shards of `--members` small members in all (names like OSV5M's `train/<id>.jpg`,
32 bytes each: the index does not depend on the members' size), times building each member index (parsing the
central directory and writing `NN.zip.hlidx`), then measures in a fresh process per reader the resident memory
(VmRSS) before and after opening every shard, and prints the difference per million members.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import zipfile
from pathlib import Path

from _common import Stopwatch, run_json_child

# Each child: imports, RSS before, open every shard given on the command line (and read one member of each, as a
# loader would), RSS after, as JSON [before KiB, after KiB, seconds].
CHILD = """
import sys, time
{imports}
def rss():
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))
paths = sys.argv[1:]
before = rss()
start = time.perf_counter()
{open}
seconds = time.perf_counter() - start
after = rss()
import json
print(json.dumps([before, after, seconds]))
"""
READERS = {
    "zipfile.ZipFile per shard, held open (old)": CHILD.format(imports="import zipfile", open="""
held = [zipfile.ZipFile(p) for p in paths]
data = [z.read(z.namelist()[0]) for z in held]"""),
    "member index per shard (zipindex)": CHILD.format(imports="from hierloc.data import zipindex", open="""
held = [zipindex.index_of(p) for p in paths]
data = [zipindex.read(p, held[k].name(0)) for k, p in enumerate(paths)]"""),
    "member indexes + ShardIndex (OSV5M ids)": CHILD.format(
        imports="from pathlib import Path\nfrom hierloc.data import shards, zipindex", open="""
held = shards.ShardIndex([Path(p) for p in paths], ".jpg")
data = [zipindex.read(p, zipindex.index_of(p).name(0)) for p in paths]"""),
}


def write_shards(directory: Path, members: int, n_shards: int) -> list[Path]:
    """n_shards stored zips holding `members` members in all, `train/<id>.jpg` of 32 bytes each."""
    paths, payload = [], b"\xff\xd8" + bytes(30)
    per_shard = -(-members // n_shards)
    for k in range(n_shards):
        path = directory / f"{k:02d}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            for i in range(k * per_shard, min(members, (k + 1) * per_shard)):
                archive.writestr(f"train/{1_000_000_000_000 + 7919 * i}.jpg", payload)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=200_000, help="members over all shards")
    parser.add_argument("--shards", type=int, default=4, help="number of zip shards")
    args = parser.parse_args()
    from hierloc.data import zipindex

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(Path(tmp), args.members, args.shards)
        with Stopwatch() as build:
            for path in paths:
                zipindex.load_or_build(str(path))
        index_bytes = sum(os.path.getsize(str(p) + zipindex.INDEX_SUFFIX) for p in paths)
        zip_bytes = sum(p.stat().st_size for p in paths)
        print(f"{args.members:,} members in {args.shards} stored shards ({zip_bytes / 2**20:.1f} MiB of zip)")
        print(f"index build (parse the central directories, write the .hlidx files): {build.seconds:.2f} s, "
              f"{build.seconds / args.members * 1e6:.1f} us per member")
        print(f"index files: {index_bytes / 2**20:.1f} MiB, {index_bytes / args.members:.1f} bytes per member\n")
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        print("| reader | RSS before MiB | RSS after MiB | open s | RSS per million members MiB |")
        print("|---|---|---|---|---|")
        for name, code in READERS.items():
            before, after, seconds = run_json_child(["-c", code, *map(str, paths)], env=env)
            per_million = (after - before) / 1024 / args.members * 1e6
            print(f"| {name} | {before / 1024:.1f} | {after / 1024:.1f} | {seconds:.2f} | {per_million:.0f} |")


if __name__ == "__main__":
    main()
