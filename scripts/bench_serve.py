"""Throughput and latency of `hierloc serve` under N concurrent clients, side by side with in-process predict.

    .venv/bin/python scripts/bench_serve.py --model runs/demo
    .venv/bin/python scripts/bench_serve.py                  # trains a tiny model first (64 px tiny-vit)
    .venv/bin/python scripts/bench_serve.py --backbone vit-s16   # ... or one with a ViT-S/16-sized backbone at
                                                                  # 224 px (random weights: a realistic cost)

What it does:
1. Writes --images JPEGs of --px x --px pixels (seeded smooth colour fields + noise) and reads them into memory.
2. In-process baseline: `HierLoc.predict` on those bytes (`EncodedImage`, the server's decoding path) in batches
   of 1, 8 and --max-batch, each for --baseline-seconds, with torch's default threads and with one thread.
3. Starts `hierloc serve --model M --threads T` as a subprocess on 127.0.0.1 (a free port; T: the thread setting
   that was faster in process at batch 8) and waits for GET /health.
4. For each N in --clients: N threads, each with one keep-alive HTTP connection, POST /predict one image at a
   time (cycling through the images) for --seconds after one warm-up request each; images/s (successful answers),
   p50/p99 latency, errors (any status but 200), and the server's resident memory (VmRSS) before and after.
5. The in-process baseline again, and the table: each N's rate over in-process at the batch size N clients can
   form at most (min(N, --max-batch): what the HTTP layer costs) and over the best in-process rate (what a
   client gives up by not batching itself); in-process rates are the means of before and after, with the faster
   thread setting.

The clients run in this process, on the same cores as the server: on a 2-core machine they take CPU from it, so
the ratio is a lower bound of what a client on another machine would see. Timings on a shared machine are noisy:
compare the rows of one run, not runs with each other.

Soak (``--soak SECONDS``, no in-process baseline): the server (``--max-upload-mb`` ``SOAK_UPLOAD_MB``) gets, for
each N in --clients, N keep-alive clients for SECONDS that mix good uploads (6 in 10 requests) with bad ones in
turn: a truncated JPEG, a text file, an empty file, a decompression-bomb PNG (422 each), a body over the upload
limit (413) and a body that is not multipart (415). It prints per N the request rate, the good images/s, p50/p99
latency of the good requests, the answers by status, the unexpected ones (any status but the kind's), and the
server's RSS sampled every 0.5 s: after the round's warm-up (--soak-warmup seconds) and at its end. It checks that
no answer was an unexpected 5xx, that every bad upload was answered with its 4xx, and that the RSS grew less than
--rss-bound MiB after each warm-up; the exit status is 1 when a check fails.

    .venv/bin/python scripts/bench_serve.py --soak 60              # N = 1, 8, 32, 60 s each
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from pathlib import Path

import numpy as np

from _common import hierloc_command, rss_mib, train_demo_model, write_jpegs, write_tiny_vit_backbone

TOP_K = 3   # paths kept per image, in process and through the server alike
SOAK_UPLOAD_MB = 1.0     # the soak server's --max-upload-mb: an oversized body costs little to send
GOOD_PER_10 = 6          # soak: good uploads per 10 requests


def vit_s16_model(work: Path, steps: int) -> Path:
    """A model with a ViT-S/16-sized backbone (224 px, 12 layers of width 384; random weights), trained for a
    few steps on the demo world: what a real backbone costs per image, without downloading one."""
    backbone = write_tiny_vit_backbone(work / "vit-s16", 224, patch_size=16, hidden_size=384, num_layers=12,
                                       num_heads=6, mlp_dim=1536)
    return train_demo_model(work, steps, backbone=str(backbone), image_size=None, batch_size=8)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def multipart(name: str, data: bytes, content_type: str = "image/jpeg") -> tuple[bytes, str]:
    """One file in the field 'file' -> (body, content type)."""
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def in_process_rates(model, images: list[tuple[str, bytes]], seconds: float, batches: list[int]
                     ) -> dict[tuple[int, int], float]:
    """{(batch size, torch threads): images/s} of HierLoc.predict on in-memory images, about `seconds` each, with
    torch's default intra-op threads and with one thread (on a loaded machine the default team of threads can be
    many times slower: its threads wait for cores the other processes hold)."""
    import torch

    from hierloc.data.encoded import EncodedImage

    items = [EncodedImage(name, data) for name, data in images]
    default_threads = torch.get_num_threads()
    rates = {}
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        for batch in batches:
            chunks = [[items[(start + i) % len(items)] for i in range(batch)] for start in range(0, len(items), batch)]
            model.predict(chunks[0], top_k=TOP_K, batch_size=batch)      # warm-up
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                for chunk in chunks:
                    done += len(model.predict(chunk, top_k=TOP_K, batch_size=batch))
            rates[batch, threads] = done / (time.perf_counter() - start)
    torch.set_num_threads(default_threads)
    return rates


def client(port: int, bodies: list[tuple[bytes, str]], offset: int, stop_at: list[float], out: dict) -> None:
    """POST /predict one image at a time until stop_at[0]; latencies (s) of 200s and the count of errors."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    latencies, errors, i = [], 0, offset

    def post(body, content_type) -> int:
        conn.request("POST", f"/predict?top_k={TOP_K}", body=body, headers={"Content-Type": content_type})
        response = conn.getresponse()
        response.read()
        return response.status

    try:
        post(*bodies[i % len(bodies)])                          # warm-up, not counted
    except (OSError, http.client.HTTPException):
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    out["ready"].wait()                                         # every client warmed up: the clock starts
    while time.perf_counter() < stop_at[0]:
        body, content_type = bodies[i % len(bodies)]
        t0 = time.perf_counter()
        try:
            status = post(body, content_type)
        except (OSError, http.client.HTTPException):
            status = -1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        if status == 200:
            latencies.append(time.perf_counter() - t0)
        else:
            errors += 1
        i += 1
    conn.close()
    with out["lock"]:
        out["latencies"] += latencies
        out["errors"] += errors


def load_round(port: int, n_clients: int, bodies, seconds: float) -> dict:
    """N clients for `seconds` after a warm-up request each; the rate counts the answers that arrived between the
    start and the return of the last request begun before the end (so a slow model's tail is counted in full)."""
    ready = threading.Barrier(n_clients + 1)
    out = {"latencies": [], "errors": 0, "lock": threading.Lock(), "ready": ready}
    stop_at = [float("inf")]
    threads = [threading.Thread(target=client, args=(port, bodies, k, stop_at, out)) for k in range(n_clients)]
    for thread in threads:
        thread.start()
    ready.wait()                         # every warm-up request answered
    start = time.perf_counter()
    stop_at[0] = start + seconds
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    lat = np.asarray(out["latencies"]) * 1000
    return {"n": n_clients, "images_per_s": len(lat) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "errors": out["errors"], "requests": len(lat) + out["errors"]}


def wait_for_health(port: int, process: subprocess.Popen, timeout_s: float = 180) -> dict:
    """GET /health until the server answers (-> its JSON); SystemExit if it exits or does not answer in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"hierloc serve exited with {process.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            body = json.loads(conn.getresponse().read())
            conn.close()
            return body
        except (OSError, ValueError):
            time.sleep(0.2)
    raise SystemExit("hierloc serve did not answer /health in time")


# ---------------------------------------------------------------------------------------------------------- soak
def bomb_png(side: int = 100_000) -> bytes:
    """A PNG declaring side x side RGB pixels (30 GB decoded for 100,000) in about 70 bytes."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (len(payload).to_bytes(4, "big") + kind + payload
                + zlib.crc32(kind + payload).to_bytes(4, "big"))

    header = side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def soak_requests(images: list[tuple[str, bytes]], upload_limit: int) -> dict[str, tuple[list, int]]:
    """{kind: ([(body, content type), ...], expected status)}: the good uploads and one body of each bad kind."""
    jpeg = images[0][1]
    return {"good": ([multipart(name, data) for name, data in images], 200),
            "truncated jpeg": ([multipart("cut.jpg", jpeg[:len(jpeg) // 2])], 422),
            "text file": ([multipart("notes.txt", b"not a picture\n" * 40, "text/plain")], 422),
            "empty file": ([multipart("empty.jpg", b"")], 422),
            "bomb png": ([multipart("bomb.png", bomb_png(), "image/png")], 422),
            "oversized": ([multipart("big.jpg", jpeg * (upload_limit // len(jpeg) + 1))], 413),
            "not multipart": ([(jpeg, "image/jpeg")], 415)}


def soak_client(port: int, kinds: dict, offset: int, stop_at: float, out: list) -> None:
    """Requests until `stop_at`: GOOD_PER_10 good uploads in 10, the others the bad kinds in turn; out: (kind,
    status or -1 when the connection failed, seconds)."""
    bad = [kind for kind in kinds if kind != "good"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    i = 0
    while time.perf_counter() < stop_at:
        slot = (i + offset) % 10
        kind = "good" if slot < GOOD_PER_10 else bad[((i + offset) // 10 * (10 - GOOD_PER_10) + slot) % len(bad)]
        bodies = kinds[kind][0]
        body, content_type = bodies[(i + offset) % len(bodies)]
        t0 = time.perf_counter()
        try:
            conn.request("POST", f"/predict?top_k={TOP_K}", body=body, headers={"Content-Type": content_type})
            response = conn.getresponse()
            response.read()
            status = response.status
            if response.will_close:
                conn.close()
        except (OSError, http.client.HTTPException):
            status = -1
            conn.close()
        out.append((kind, status, time.perf_counter() - t0))
        i += 1
    conn.close()


def soak_round(port: int, pid: int, n_clients: int, kinds: dict, seconds: float, warmup_s: float) -> dict:
    """N clients for `seconds`; the answers, and the server's RSS every 0.5 s (MiB) after `warmup_s` and at the
    end."""
    logs: list[list] = [[] for _ in range(n_clients)]
    start = time.perf_counter()
    threads = [threading.Thread(target=soak_client, args=(port, kinds, 7 * k, start + seconds, logs[k]))
               for k in range(n_clients)]
    for thread in threads:
        thread.start()
    samples = []
    while any(thread.is_alive() for thread in threads):
        samples.append((time.perf_counter() - start, rss_mib(pid)))
        time.sleep(0.5)
    elapsed = time.perf_counter() - start
    records = [record for log in logs for record in log]
    after_warmup = [rss for t, rss in samples if t >= warmup_s] or [samples[-1][1]]
    good = np.asarray([s for kind, status, s in records if kind == "good" and status == 200]) * 1000
    unexpected = collections.Counter(str(status) for kind, status, _ in records if status != kinds[kind][1])
    return {"n": n_clients, "seconds": elapsed, "requests": len(records), "good_200": len(good),
            "p50_ms": float(np.percentile(good, 50)) if len(good) else float("nan"),
            "p99_ms": float(np.percentile(good, 99)) if len(good) else float("nan"),
            "by_status": collections.Counter(status for _, status, _ in records),
            "by_kind": {kind: collections.Counter(status for k, status, _ in records if k == kind) for kind in kinds},
            "unexpected": unexpected, "rss_warm": after_warmup[0], "rss_end": samples[-1][1],
            "rss_max": max(rss for _, rss in samples)}


def soak_report(rows: list[dict], kinds: dict, rss_bound: float) -> bool:
    """Print the soak's table and checks; -> whether every check held."""
    print("| clients | s | requests | requests/s | good images/s | p50 ms | p99 ms | answers by status | unexpected "
          "| server RSS MiB after warm-up -> end (max) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|---|---|")
    for r in rows:
        statuses = ", ".join(f"{status}: {n}" for status, n in sorted(r["by_status"].items()))
        unexpected = ", ".join(f"{status}: {n}" for status, n in sorted(r["unexpected"].items())) or "0"
        print(f"| {r['n']} | {r['seconds']:.0f} | {r['requests']} | {r['requests'] / r['seconds']:.1f} | "
              f"{r['good_200'] / r['seconds']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {statuses} | "
              f"{unexpected} | {r['rss_warm']:.0f} -> {r['rss_end']:.0f} ({r['rss_max']:.0f}) |")
    print()
    total = {kind: sum((r["by_kind"][kind] for r in rows), collections.Counter()) for kind in kinds}
    for kind, (_, expected) in kinds.items():
        answers = ", ".join(f"{status}: {n}" for status, n in sorted(total[kind].items()))
        print(f"  {kind}: expected {expected}; answered {answers}")
    bad_total = sum(sum(total[kind].values()) for kind in kinds if kind != "good")
    bad_right = sum(total[kind][expected] for kind, (_, expected) in kinds.items() if kind != "good")
    fives = sum(n for r in rows for status, n in r["unexpected"].items() if status.startswith("5"))
    growth = max(r["rss_end"] - r["rss_warm"] for r in rows)
    checks = [(fives == 0, f"unexpected 5xx answers: {fives}"),
              (bad_right == bad_total, f"bad uploads answered with their 4xx: {bad_right} of {bad_total}"),
              (growth < rss_bound, f"largest RSS growth after a round's warm-up: {growth:+.0f} MiB "
                                   f"(bound {rss_bound:g} MiB)")]
    for ok, text in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {text}")
    return all(ok for ok, _ in checks)


def soak(args, model_dir: str, images: list[tuple[str, bytes]], clients: list[int]) -> int:
    """The soak rounds against a fresh `hierloc serve` (see the module docstring) -> exit status."""
    kinds = soak_requests(images, int(SOAK_UPLOAD_MB * 1024 * 1024))
    port = free_port()
    command = hierloc_command("-q", "serve", "--model", model_dir, "--port", str(port), "--max-batch",
                              str(args.max_batch), "--max-queue", str(args.max_queue), "--device", "cpu",
                              "--threads", str(args.threads), "--max-upload-mb", str(SOAK_UPLOAD_MB))
    log_path = Path(tempfile.mkdtemp(prefix="hierloc-soak-")) / "server.log"
    with open(log_path, "w", encoding="utf-8") as log_file:  # a warning per bad upload: kept out of the table
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        wait_for_health(port, server)
        print(f"# server: --threads {args.threads} --max-batch {args.max_batch} --max-queue {args.max_queue} "
              f"--max-upload-mb {SOAK_UPLOAD_MB:g}; RSS {rss_mib(server.pid):.0f} MiB after start-up; warm-up "
              f"{min(args.soak_warmup, args.soak / 4):g} s per round", flush=True)
        rows = []
        for n in clients:
            rows.append(soak_round(port, server.pid, n, kinds, args.soak, min(args.soak_warmup, args.soak / 4)))
            print(f"# {n} clients: {rows[-1]['requests']} requests in {rows[-1]['seconds']:.0f} s", flush=True)
        health = wait_for_health(port, server)
    finally:
        server.terminate()
        server.wait(60)
    log_lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    log_path.unlink()
    log_path.parent.rmdir()
    print(f"# after the rounds: /health {health['status']}, queue {health['queue']['pending']} pending; "
          f"server exit status after SIGTERM {server.returncode}; server log {len(log_lines)} lines "
          f"({sum('WARNING' in line for line in log_lines)} warnings, "
          f"{sum(line.startswith(('ERROR', 'Traceback')) for line in log_lines)} errors or tracebacks)")
    print()
    return 0 if soak_report(rows, kinds, args.rss_bound) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: train a tiny one first)")
    parser.add_argument("--backbone", default="tiny-vit", choices=["tiny-vit", "vit-s16"],
                        help="backbone of the model trained when no --model: the 64 px tiny-vit, or a ViT-S/16-sized "
                             "one at 224 px (random weights)")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="steps of the model trained when no --model (default: 20 tiny-vit, 2 vit-s16)")
    parser.add_argument("--clients", default="1,8,32", help="numbers of concurrent clients, one round each")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each round and of each baseline")
    parser.add_argument("--baseline-seconds", type=float, default=2.5,
                        help="length of each in-process measurement (3 batch sizes x 2 thread settings, twice)")
    parser.add_argument("--images", type=int, default=64, help="distinct images the clients cycle through")
    parser.add_argument("--px", type=int, default=512, help="image side in pixels")
    parser.add_argument("--max-batch", type=int, default=32, help="hierloc serve --max-batch = in-process batch")
    parser.add_argument("--max-queue", type=int, default=64, help="hierloc serve --max-queue")
    parser.add_argument("--soak", type=float, default=None, metavar="SECONDS",
                        help="soak instead: each N of --clients for SECONDS with mixed good and bad uploads")
    parser.add_argument("--soak-warmup", type=float, default=10.0,
                        help="soak: seconds of each round before its RSS reference (at most a quarter of it)")
    parser.add_argument("--rss-bound", type=float, default=32.0,
                        help="soak: the server's RSS may grow less than this many MiB after a round's warm-up")
    parser.add_argument("--threads", type=int, default=1, help="soak: hierloc serve --threads")
    args = parser.parse_args()
    clients = [int(n) for n in args.clients.split(",")]

    with tempfile.TemporaryDirectory(prefix="hierloc-bench-serve-") as work:
        work = Path(work)
        write_jpegs(work / "images", args.images, args.px)
        images = [(p.name, p.read_bytes()) for p in sorted((work / "images").rglob("*.jpg"))]
        if args.model:
            model_dir = args.model
        elif args.backbone == "vit-s16":
            model_dir = str(vit_s16_model(work, args.train_steps or 2))
        else:
            model_dir = str(train_demo_model(work, args.train_steps or 20))
        bodies = [multipart(name, data) for name, data in images]
        print(f"# {len(images)} JPEGs of {args.px} px (mean {np.mean([len(d) for _, d in images]) / 1024:.0f} KiB), "
              f"model {model_dir}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)

        if args.soak is not None:
            return soak(args, model_dir, images, clients)

        from hierloc.inference.predictor import HierLoc

        model = HierLoc.from_pretrained(model_dir, device="cpu")
        sizes = sorted({1, min(8, args.max_batch), args.max_batch})
        before = in_process_rates(model, images, args.baseline_seconds, sizes)
        port = free_port()
        # the server gets the thread setting that was faster in process (at batch 8) just before
        server_threads = max({threads for _, threads in before}, key=lambda t: before[min(8, args.max_batch), t])
        command = hierloc_command("-q", "serve", "--model", model_dir, "--port", str(port), "--max-batch",
                                  str(args.max_batch), "--max-queue", str(args.max_queue), "--device", "cpu",
                                  "--threads", str(server_threads))
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        try:
            wait_for_health(port, server)
            rss_start = rss_mib(server.pid)
            rows = []
            for n in clients:
                rss_before = rss_mib(server.pid)
                row = load_round(port, n, bodies, args.seconds)
                row.update(rss_before=rss_before, rss_after=rss_mib(server.pid))
                rows.append(row)
            rss_end = rss_mib(server.pid)
        finally:
            server.terminate()
            server.wait(30)
        after = in_process_rates(model, images, args.baseline_seconds, sizes)

    means = {key: (before[key] + after[key]) / 2 for key in before}
    thread_counts = sorted({threads for _, threads in means}, reverse=True)
    print("in-process HierLoc.predict on the same bytes, images/s before / after the server rounds:")
    for batch in sizes:
        print(f"  batch {batch}: " + "; ".join(f"{threads} torch thread{'s' if threads > 1 else ''} "
                                              f"{before[batch, threads]:.1f} / {after[batch, threads]:.1f}"
                                              for threads in thread_counts))
    best_of = {batch: max(means[batch, threads] for threads in thread_counts) for batch in sizes}
    best = max(best_of.values())
    print(f"best in-process: {best:.1f} images/s (mean of before and after, faster thread setting)")
    print(f"server: --threads {server_threads}; RSS {rss_start:.0f} MiB after start-up, {rss_end:.0f} MiB at the end")
    print()
    print("| clients | images/s | / in-process at batch min(N, max) | / best in-process | p50 ms | p99 ms | requests "
          "| errors | server RSS MiB (before -> after) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        same_batch = max(b for b in sizes if b <= max(1, min(row["n"], args.max_batch)))
        print(f"| {row['n']} | {row['images_per_s']:.1f} | {row['images_per_s'] / best_of[same_batch]:.2f} "
              f"(batch {same_batch}) | {row['images_per_s'] / best:.2f} | {row['p50_ms']:.1f} | "
              f"{row['p99_ms']:.1f} | {row['requests']} | {row['errors']} | "
              f"{row['rss_before']:.0f} -> {row['rss_after']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
