"""Kill/resume experiment: SIGKILL `hierloc train` at random steps, resume each time, compare with a clean run.

    .venv/bin/python scripts/kill_resume.py                      # 3 kills, seed 0, ~1-2 min on 2 cores
    .venv/bin/python scripts/kill_resume.py --kills 5 --seed 7 --workdir runs/kill-resume --keep

What it does:
1. Builds a small world in --workdir (a temp dir by default): --images demo patches (Blue Marble, 32 px;
   `hierloc.data.demodata`), a tiny ViT config saved as a local backbone (the one the tests use), and the gazetteer of
   the training points (built once and passed with --gazetteer so that no run rebuilds it).
2. Runs `hierloc train` uninterrupted (the reference) and, separately, the same command that is SIGKILLed --kills
   times at seeded random steps and restarted with --resume after each kill, then once more to the end.
   Every process runs with one torch thread (OMP_NUM_THREADS=1) so both runs do identical floating-point work.
   The step a process has reached is read from its progress bar (tqdm forced to redraw on every step with
   TQDM_MININTERVAL=0); the kill is sent as soon as the target step is seen, so the process may be up to one
   step further than printed.
3. Prints, per kill: the step it was killed at, the checkpoint the next run resumed from and the steps redone
   (work lost); then the final parameters against the reference per tensor group (model heads, entity anchors,
   loss parameters, the backbone, the optimiser state of the last checkpoint): max |difference| and whether
   bitwise equal.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from _common import Stopwatch, hierloc_command, make_demo_world, write_tiny_vit_backbone

PROGRESS = re.compile(r"train:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def build_world(work: Path, n_images: int) -> dict[str, Path]:
    """Demo patches, tiny backbone and gazetteer in `work` (reused when already there)."""
    from gazetteer import Gazetteer
    from hierloc.data.tables import read_image_table

    data, backbone, gazetteer = work / "data", work / "backbone", work / "gazetteer"
    if not (data / "train.csv").is_file():
        make_demo_world(data, n_train=n_images, patch_px=32, overwrite=True)
    if not (backbone / "config.json").is_file():
        write_tiny_vit_backbone(backbone, 32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
    if not (gazetteer / "metadata.json").is_file():
        table = read_image_table(str(data / "train.csv"))
        Gazetteer.build_from_points(table.lat_deg, table.lon_deg, progress=False).save(gazetteer, overwrite=True)
    return {"csv": data / "train.csv", "backbone": backbone, "gazetteer": gazetteer}


def train_command(world: dict[str, Path], out: Path, args: argparse.Namespace, resume: bool) -> list[str]:
    """The `hierloc train` command of both runs (with --resume after a kill)."""
    return hierloc_command(
        "train", "--csv", str(world["csv"]), "--gazetteer", str(world["gazetteer"]), "--out", str(out),
        f"model.backbone={world['backbone']}", "model.pretrained=false", "model.image_size=32", "model.embed_dim=16",
        "model.head_hidden=32", "model.entity_hidden=32", "model.coord_scales=4", f"train.batch_size={args.batch_size}",
        f"train.epochs={args.epochs}", f"train.num_workers={args.workers}",
        f"train.checkpoint_every={args.checkpoint_every}", f"train.seed={args.train_seed}",
        *(["--resume"] if resume else []))


def environment() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_MININTERVAL="0", TQDM_MINITERS="1")


class ProgressReader:
    """Reads a training process's stderr in a thread; `.step` = the newest step its progress bar showed."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.step, self.total, self.tail = proc, -1, -1, ""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        buffer = ""
        while True:
            chunk = os.read(self.proc.stderr.fileno(), 4096)
            if not chunk:
                return
            buffer += chunk.decode("utf-8", "replace")
            *parts, buffer = re.split(r"[\r\n]", buffer)
            for part in parts:
                match = PROGRESS.search(part)
                if match:
                    self.step, self.total = int(match.group(1)), int(match.group(2))
                elif part.strip():
                    self.tail = (self.tail + "\n" + part)[-4000:]


def latest_step(out: Path) -> int:
    pointer = out / "checkpoints" / "latest"
    return int(pointer.read_text().split("-")[1]) if pointer.is_file() else 0


def run_until(cmd: list[str], target: int | None, timeout_s: float = 900.0) -> tuple[int, int]:
    """Run `cmd`; SIGKILL it once its progress bar reaches `target` (None: let it finish).
    -> (return code, last step seen)."""
    proc = subprocess.Popen(cmd, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reader = ProgressReader(proc)
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if target is not None and reader.step >= target:
            proc.send_signal(signal.SIGKILL)
            break
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"timed out: {' '.join(cmd)}")
        time.sleep(0.002)
    proc.wait()
    reader.thread.join(timeout=5)
    if target is None and proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode}):{reader.tail}")
    return proc.returncode, reader.step


def tensor_group(name: str) -> str:
    if name.startswith("loss."):
        return "loss parameters"
    return name.split(".")[0]


def compare(run: Path, reference: Path) -> list[tuple[str, int, float, bool]]:
    """[(group, n tensors, max |difference|, bitwise equal)] over the final model, backbone and optimiser state."""
    import torch
    from safetensors.torch import load_file

    files = {"": "model.safetensors", "backbone/": "backbone/model.safetensors"}
    rows: dict[str, list] = {}
    pairs = []
    for prefix, rel in files.items():
        a, b = load_file(str(run / rel)), load_file(str(reference / rel))
        assert a.keys() == b.keys(), rel
        pairs += [((prefix and "backbone") or tensor_group(k), a[k], b[k]) for k in sorted(a)]
    ckpt_a = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    ckpt_b = reference / "checkpoints" / (reference / "checkpoints" / "latest").read_text().strip()
    a, b = load_file(str(ckpt_a / "optimizer.safetensors")), load_file(str(ckpt_b / "optimizer.safetensors"))
    assert a.keys() == b.keys()
    pairs += [(f"optimiser ({k.split('.')[0]})", a[k], b[k]) for k in sorted(a)]
    for group, x, y in pairs:
        entry = rows.setdefault(group, [0, 0.0, True])
        entry[0] += 1
        entry[1] = max(entry[1], float((x.double() - y.double()).abs().max()) if x.numel() else 0.0)
        entry[2] = entry[2] and torch.equal(x, y)
    return [(group, n, diff, equal) for group, (n, diff, equal) in rows.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workdir", default=None, help="where data and runs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep --workdir's runs afterwards")
    parser.add_argument("--images", type=int, default=320, help="training images (demo patches, 32 px)")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size")
    parser.add_argument("--checkpoint-every", type=int, default=5, help="steps between checkpoints")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--kills", type=int, default=3, help="number of SIGKILLs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill steps")
    parser.add_argument("--train-seed", type=int, default=0, help="training seed (same for both runs)")
    args = parser.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kill_resume_"))
    work.mkdir(parents=True, exist_ok=True)
    world = build_world(work, args.images)
    steps_per_epoch = args.images // args.batch_size
    total = steps_per_epoch * args.epochs
    rng = np.random.default_rng(args.seed)
    targets = sorted(rng.choice(np.arange(2, total - 1), size=args.kills, replace=False).tolist())
    print(f"kill/resume: {args.images} images, {total} steps ({steps_per_epoch}/epoch x {args.epochs}), checkpoint "
          f"every {args.checkpoint_every} steps, SIGKILL at steps {targets} (seed {args.seed}); workdir {work}")

    reference, run = work / "reference", work / "killed"
    for path in (reference, run):
        shutil.rmtree(path, ignore_errors=True)
    with Stopwatch() as watch:
        run_until(train_command(world, reference, args, resume=False), None)
    print(f"uninterrupted run: {watch.seconds:.1f} s")

    lost = []
    with Stopwatch() as watch:
        for i, target in enumerate(targets, 1):
            code, seen = run_until(train_command(world, run, args, resume=i > 1), target)
            if code != -signal.SIGKILL:
                raise SystemExit(f"kill {i}: the run ended (status {code}) before step {target}")
            resumed_from = latest_step(run)
            lost.append(seen - resumed_from)
            print(f"kill {i}: SIGKILL at step {seen} -> the next run resumes from checkpoint step {resumed_from}: "
                  f"{seen - resumed_from} step(s) redone")
        run_until(train_command(world, run, args, resume=True), None)
    print(f"killed {len(targets)} times and resumed: {watch.seconds:.1f} s in all")

    rows = compare(run, reference)
    print("\nfinal parameters vs the uninterrupted run (same seed):")
    print(f"  {'tensor group':28s} {'tensors':>7s} {'max |diff|':>11s}  bitwise equal")
    for group, n, diff, equal in rows:
        print(f"  {group:28s} {n:7d} {diff:11.3g}  {'yes' if equal else 'NO'}")
    all_equal = all(equal for *_, equal in rows)
    print(f"all {sum(n for _, n, _, _ in rows)} tensors bitwise equal: {'yes' if all_equal else 'NO'}")
    print(f"work lost per kill: {lost} steps (checkpoint interval {args.checkpoint_every}; max "
          f"{max(lost) if lost else 0})")
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all_equal and all(x <= args.checkpoint_every for x in lost) else 1


if __name__ == "__main__":
    sys.exit(main())
