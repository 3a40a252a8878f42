"""Load test of `hierloc predict`: N generated images, memory over time and sustained vs short-run rate.

    .venv/bin/python scripts/bench_predict_load.py                     # 20,000 images of 64 px, a tiny model
    .venv/bin/python scripts/bench_predict_load.py --model runs/demo --n 20000 --workers 2

What it does:
1. Writes --n small JPEGs (--px pixels, seeded smooth colour fields + noise, ~2 KB each) into a temp directory
   (1,000 per sub-directory).
2. Takes --model, or trains a tiny model first (`hierloc train` for --train-steps steps on a 240-image demo set,
   default 64 px tiny-vit) so the script runs anywhere.
3. Runs `hierloc predict <dir> --model M --format jsonl --no-progress` as a subprocess and reads its stdout
   line by line (one record per image, timestamped as it arrives), while a thread samples the resident memory
   (VmRSS from /proc/<pid>/status; PSS from /proc/<pid>/smaps_rollup, which shares the pages forked workers
   have in common with the parent instead of counting them in every process) of the predict process and of
   its DataLoader workers every --sample-s seconds.
4. Reports: peak RSS (main process: the kernel's VmHWM; main + workers: the largest sampled sum), RSS when
   10 %, 50 % and 100 % of the records had arrived, the rate over the first --short images (from the first
   record: model loading and start-up excluded) against the rate over the whole run and over the last
   --short images, and the ratio (sustained / short-run); the rate per 10 % window and the load average; the CPU
   time per image (predict process + workers, /proc/<pid>/stat) over the same windows, which depends much less
   than wall time on what else the (shared) machine is doing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import hierloc_command, proc_kb, train_demo_model, write_jpegs


def _status_kb(pid: int, field: str) -> int:
    """A kB field of /proc/<pid>/status, 0 once the process is gone."""
    return proc_kb(field, pid, default=0)


def _pss_kb(pid: int) -> int:
    """Proportional set size (shared pages divided among the processes sharing them), 0 if unavailable."""
    return proc_kb("Pss", pid, file="smaps_rollup", default=0)


def _stat_fields(pid: int | str) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name ([1] parent pid, [11] user and [12] system CPU time in
    clock ticks); OSError once the process is gone."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
        return handle.read().rsplit(")", 1)[1].split()


def _children(pid: int) -> list[int]:
    """Direct children of pid (DataLoader workers), from /proc/*/stat."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(entry)
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of pid and its live children (the DataLoader workers live for the whole run)."""
    total = 0.0
    for process in [pid, *_children(pid)]:
        try:
            fields = _stat_fields(process)
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            continue
    return total


class MemorySampler:
    """Samples VmRSS of a process and its children every `interval_s` in a thread."""

    def __init__(self, pid: int, interval_s: float):
        self.pid, self.interval_s = pid, interval_s
        self.main_kb = self.total_kb = self.peak_main_kb = self.peak_total_kb = self.hwm_kb = 0
        self.pss_kb = self.peak_pss_kb = 0
        self.samples: list[tuple[float, int, int, int]] = []   # (time, main RSS, main + children RSS, PSS) kB
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            main = _status_kb(self.pid, "VmRSS")
            if main:
                children = _children(self.pid)
                total = main + sum(_status_kb(child, "VmRSS") for child in children)
                pss = _pss_kb(self.pid) + sum(_pss_kb(child) for child in children)
                self.main_kb, self.total_kb, self.pss_kb = main, total, pss
                self.peak_main_kb, self.peak_total_kb = max(self.peak_main_kb, main), max(self.peak_total_kb, total)
                self.peak_pss_kb = max(self.peak_pss_kb, pss)
                self.hwm_kb = max(self.hwm_kb, _status_kb(self.pid, "VmHWM"))
                self.samples.append((time.perf_counter(), main, total, pss))
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()


def rate(times: list[float], first: int, last: int) -> float:
    """Records per second between record indices first and last (0-based, inclusive)."""
    return (last - first) / max(times[last] - times[first], 1e-9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="images to generate and predict")
    parser.add_argument("--px", type=int, default=64, help="image side in pixels")
    parser.add_argument("--model", default=None, help="model directory (default: train a tiny one first)")
    parser.add_argument("--train-steps", type=int, default=20, help="steps of the tiny model when no --model")
    parser.add_argument("--batch-size", type=int, default=64, help="hierloc predict --batch-size")
    parser.add_argument("--workers", type=int, default=2, help="hierloc predict --workers")
    parser.add_argument("--short", type=int, default=2000, help="images in the short-run rate window")
    parser.add_argument("--sample-s", type=float, default=0.25, help="memory sampling interval")
    parser.add_argument("--workdir", default=None, help="where images (and the tiny model) go; default temp")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (a given --workdir is always kept)")
    args = parser.parse_args()

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_predict_load_"))
    images = work / "images"
    try:
        if not images.is_dir() or sum(1 for _ in images.rglob("*.jpg")) != args.n:
            shutil.rmtree(images, ignore_errors=True)
            seconds = write_jpegs(images, args.n, args.px)
            print(f"wrote {args.n} JPEGs of {args.px} px in {seconds:.1f} s "
                  f"({sum(p.stat().st_size for p in images.rglob('*.jpg')) / 1e6:.1f} MB) to {images}")
        model = Path(args.model) if args.model else train_demo_model(work, args.train_steps, image_size=args.px,
                                                                     patch_px=args.px)
        cmd = hierloc_command("predict", str(images), "--model", str(model), "--format", "jsonl", "--no-progress",
                              "--batch-size", str(args.batch_size), "--workers", str(args.workers))
        print("$ " + " ".join(cmd[1:]).replace(str(work), "$WORK"))
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1 << 16)
        sampler = MemorySampler(proc.pid, args.sample_s)
        times: list[float] = []
        marks = {max(0, int(round(args.n * f)) - 1): f for f in (0.1, 0.5, 1.0)}
        at_mark: dict[float, tuple[int, int]] = {}
        short = min(args.short, args.n) - 1
        cpu_marks = {0, short, args.n - 1 - short, args.n - 1}
        cpu_at: dict[int, float] = {}
        load_before = os.getloadavg()[0]
        n_ok = 0
        for line in proc.stdout:
            times.append(time.perf_counter())
            n_ok += json.loads(line).get("status", "ok") == "ok"
            index = len(times) - 1
            if index in marks:
                at_mark[marks[index]] = (_status_kb(proc.pid, "VmRSS"), sampler.total_kb, sampler.pss_kb)
            if index in cpu_marks:
                cpu_at[index] = _cpu_s(proc.pid)
        stderr = proc.stderr.read()
        sampler.stop()
        code = proc.wait()
        if code != 0 or len(times) != args.n:
            print(f"hierloc predict failed (status {code}, {len(times)} records):\n{stderr}")
            return 1
        n = len(times)
        short_rate, whole_rate, last_rate = rate(times, 0, short), rate(times, 0, n - 1), rate(times, n - 1 - short,
                                                                                                  n - 1)
        print(f"{n} records ({n_ok} ok) in {times[-1] - start:.1f} s from launch; first record after "
              f"{times[0] - start:.1f} s (model load + start-up)")
        print(f"rate: first {short + 1} images {short_rate:.1f} images/s; whole run {whole_rate:.1f} images/s; "
              f"last {short + 1} images {last_rate:.1f} images/s; sustained / short-run = {whole_rate / short_rate:.3f} "
              f"(last / first = {last_rate / short_rate:.3f})")
        windows = [rate(times, k * n // 10, (k + 1) * n // 10 - 1) for k in range(10)]
        print("rate per 10 % window (images/s): " + ", ".join(f"{r:.0f}" for r in windows)
              + f"; load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (2 cores, shared)")
        if len(cpu_at) == len(cpu_marks):
            def cpu_ms(first: int, last: int) -> float:
                return 1000 * (cpu_at[last] - cpu_at[first]) / max(last - first, 1)

            first_ms, whole_ms, last_ms = cpu_ms(0, short), cpu_ms(0, n - 1), cpu_ms(n - 1 - short, n - 1)
            print(f"CPU time per image (predict + workers, less sensitive to other users' load than wall time): first {short + 1} "
                  f"{first_ms:.2f} ms, whole run {whole_ms:.2f} ms, last {short + 1} {last_ms:.2f} ms; "
                  f"whole / first = {whole_ms / first_ms:.3f}, last / first = {last_ms / first_ms:.3f}")
        print(f"peak RSS: predict process {sampler.hwm_kb / 1024:.0f} MB (VmHWM); predict + {args.workers} workers "
              f"{sampler.peak_total_kb / 1024:.0f} MB summed RSS (shared pages counted in each), "
              f"{sampler.peak_pss_kb / 1024:.0f} MB PSS (largest of {len(sampler.samples)} samples)")
        for fraction in (0.1, 0.5, 1.0):
            main_kb, total_kb, pss_kb = at_mark.get(fraction, (0, 0, 0))
            print(f"memory at {fraction:4.0%} of the images: predict process RSS {main_kb / 1024:.0f} MB; "
                  f"with workers: RSS sum {total_kb / 1024:.0f} MB, PSS {pss_kb / 1024:.0f} MB")
        print("stderr: " + stderr.strip().splitlines()[-1] if stderr.strip() else "stderr: (empty)")
        return 0
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
