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
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

import numpy as np

from _common import hierloc_command, rss_mib, train_demo_model, write_jpegs, write_tiny_vit_backbone

TOP_K = 3   # paths kept per image, in process and through the server alike


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


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    """One image in the field 'file' -> (body, content type)."""
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
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
