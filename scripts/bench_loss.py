"""GWH-InfoNCE at scale: the reference (full (B, N) matrices) against the blocked loss, side by side.

    python scripts/bench_loss.py [--batch 256] [--dim 64] [--sizes 246,3789,18943,142007] [--repeats 5]
        [--format text|json] [--threads N] [--learn-weights] [--no-memory] [--no-accuracy]
    python scripts/bench_loss.py --scaling [--scaling-entities 20000,165000,1000000] [--scaling-batches 256,4096]

Both methods get the same inputs in one process: B image points and every level's entity points on the Poincare
ball (float32, with autograd), targets at every level, the images' GPS and the entities' coordinates as unit
vectors. Without --sizes the levels are the world gazetteer's (`Gazetteer.build_global()`, ~16 s: 246 / 3,789 /
18,943 / 142,007 entities, their real coordinates; each image sits near its target city); with --sizes,
synthetic uniform coordinates. Entity points: tangent vectors of random direction and norm uniform in [0.5, 3]
(|x| from 0.46 to 0.995), 2% of them pushed to the float32 margin |x| = 1 - 4e-3; each image point sits near its
target city (a tangent offset of norm ~0.1), its GPS ~30 km from the city.

- reference: what the training step did before (`loss.blocked=false`): `pairwise_sqdist` per level, the (B, N)
  great-circle km (`hierloc.geometry.geodesy.great_circle_km`), `GWHInfoNCE.forward` (fused weighted cross-entropy).
- blocked: `GWHInfoNCE.forward_points` (`hierloc.training.blocked_loss`), no (B, N) tensor.

Printed (text table, or one JSON object with --format json):
- *_ms: forward + backward wall time, median (and min) over --repeats interleaved runs after a warm-up each;
  speedup = reference / blocked medians. The machine may be shared: compare within one run.
- *_peak_mb: extra memory over the inputs. Each method runs once in a fresh subprocess (same inputs, same seed):
  after the inputs are built and a tiny warm-up call has loaded every kernel, the process's peak-RSS mark is reset
  (``/proc/self/clear_refs``, value 5) and its RSS read; peak_mb = VmHWM after one forward + backward minus that
  RSS. glibc keeps freed memory as `hierloc train` does (train.reuse_cpu_memory). Gradients of the inputs are
  part of the extra memory of both.
- max_rel_err: against a float64 evaluation of the same formula on the same inputs (composed ops, level by
  level), the largest of |loss - ref| / |ref| and, per gradient tensor (points, entity points, log tau, and
  log lambda / log sigma with --learn-weights), max |g - g_ref| / max |g_ref|. reference_max_rel_err: the same
  for the reference path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

from _common import Stopwatch, peak_rss_mib, proc_kb, reset_peak_rss, rss_mib, run_json_child
from hierloc.config import LossConfig
from hierloc.device import reuse_freed_cpu_memory
from hierloc.geometry import hyperbolic
from hierloc.geometry.geodesy import great_circle_km, latlon_to_unit
from hierloc.training.losses import GWHInfoNCE

N_LEVELS = 4


def level_sizes_and_coords(sizes: list[int] | None, seed: int):
    """Per level (N_l,) entity latitudes/longitudes (float64 degrees): the global gazetteer's, or synthetic."""
    if sizes is None:
        from gazetteer.core import Gazetteer

        gaz = Gazetteer.build_global(progress=False)
        offsets = [int(o) for o in gaz.level_offsets]
        return [(torch.as_tensor(gaz.lat_deg[offsets[i]:offsets[i + 1]]),
                 torch.as_tensor(gaz.lon_deg[offsets[i]:offsets[i + 1]])) for i in range(N_LEVELS)]
    gen = torch.Generator().manual_seed(seed + 1)
    return [(torch.rad2deg(torch.asin(torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1)),
             torch.rand(n, generator=gen, dtype=torch.float64) * 360 - 180) for n in sizes]


def ball_points(n: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """(n, dim) float32 points: random directions, tangent norms uniform in [0.5, 3], 2% at the float32 margin."""
    v = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    norm = 0.5 + torch.rand(n, 1, generator=gen, dtype=torch.float64) * 2.5
    norm[torch.rand(n, generator=gen) < 0.02] = 10.0
    v = v / v.norm(dim=1, keepdim=True) * norm
    return hyperbolic.project(hyperbolic.expmap0(v).float())


def make_inputs(batch: int, dim: int, coords, seed: int) -> dict:
    """Entities as ``ball_points``; each image near its target city (tangent offset of norm ~0.1 from it) and its
    GPS ~30 km from the city; targets at the other levels drawn at random."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [len(lat) for lat, _ in coords]
    entities = [ball_points(n, dim, gen) for n in sizes]
    targets = torch.stack([torch.randint(0, max(n, 1), (batch,), generator=gen) for n in sizes], dim=1)
    city = hyperbolic.logmap0(entities[-1][targets[:, -1]].double())
    points = hyperbolic.project(hyperbolic.expmap0(city + 0.1 / math.sqrt(dim) * torch.randn(
        batch, dim, generator=gen, dtype=torch.float64)).float())
    city_lat, city_lon = coords[-1]
    lat = city_lat[targets[:, -1]] + torch.randn(batch, generator=gen, dtype=torch.float64) * 0.3
    lon = city_lon[targets[:, -1]] + torch.randn(batch, generator=gen, dtype=torch.float64) * 0.3
    return {"points": points, "entities": entities, "targets": targets,
            "image_units": latlon_to_unit(lat, lon).float(),
            "entity_units": [latlon_to_unit(la, lo).float() for la, lo in coords]}


def make_loss(args, n_levels: int = N_LEVELS) -> GWHInfoNCE:
    return GWHInfoNCE(LossConfig(betas=[1.0] * n_levels, learn_weights=args.learn_weights))


def leaves(inputs: dict, dtype=torch.float32) -> tuple[torch.Tensor, list[torch.Tensor]]:
    points = inputs["points"].to(dtype, copy=True).requires_grad_()
    return points, [e.to(dtype, copy=True).requires_grad_() for e in inputs["entities"]]


def run_reference(loss, inputs, points, entities):
    sqdists = [hyperbolic.pairwise_sqdist(points, e) for e in entities]
    with torch.no_grad():
        geo = [great_circle_km(inputs["image_units"], u) for u in inputs["entity_units"]]
    out = loss(sqdists, inputs["targets"], geo)["loss"]
    out.backward()
    return out


def run_blocked(loss, inputs, points, entities):
    out = loss.forward_points(points, entities, inputs["targets"], inputs["image_units"], inputs["entity_units"])
    out = out["loss"]
    out.backward()
    return out


METHODS = {"reference": run_reference, "blocked": run_blocked}


def gradients(loss, points, entities) -> list[torch.Tensor]:
    return [points.grad, *[e.grad for e in entities], *[p.grad for p in loss.parameters()]]


def float64_reference(args, inputs) -> tuple[float, list[torch.Tensor]]:
    """The loss and its gradients in float64 from composed ops (level by level, to bound memory)."""
    loss = make_loss(args, len(inputs["entities"])).double()
    points, entities = leaves(inputs, torch.float64)
    tau, lam, sigma = loss.temperature(), loss.lam(), loss.sigma_km()
    total = 0.0
    for level, y in enumerate(entities):
        target = inputs["targets"][:, level]
        d = hyperbolic.pairwise_sqdist(points, y)
        with torch.no_grad():
            g = great_circle_km(inputs["image_units"].double(), inputs["entity_units"][level].double())
        log_w = torch.log1p(lam * torch.exp(-g / sigma)).scatter(1, target.unsqueeze(1), 0.0)
        level_loss = torch.nn.functional.cross_entropy(log_w - d / tau, target)
        level_loss.backward(retain_graph=level < len(entities) - 1)
        total += level_loss.item()
        del d, g, log_w
    return total, gradients(loss, points, entities)


def max_rel_err(value: float, grads: list[torch.Tensor], ref_value: float, ref_grads: list[torch.Tensor]) -> float:
    errors = [abs(value - ref_value) / abs(ref_value)]
    for got, want in zip(grads, ref_grads):
        errors.append(float((got.double() - want).abs().max() / want.abs().max()))
    return max(errors)


def timings(args, inputs) -> dict:
    losses = {name: make_loss(args, len(inputs["entities"])) for name in METHODS}
    times = {name: [] for name in METHODS}
    for _ in range(args.repeats + 1):  # the first round is the warm-up
        for name, fn in METHODS.items():
            points, entities = leaves(inputs)
            with Stopwatch() as watch:
                fn(losses[name], inputs, points, entities)
            times[name].append(watch.seconds)
            for p in losses[name].parameters():
                p.grad = None
    return {name: values[1:] for name, values in times.items()}


def memory_probe(args) -> None:
    """Subprocess body: one method's extra peak memory (MB) over its inputs and the wall / process CPU seconds of
    that forward + backward, printed as JSON."""
    reuse_freed_cpu_memory()
    coords = level_sizes_and_coords(args.sizes, args.seed)
    inputs = make_inputs(args.batch, args.dim, coords, args.seed)
    loss, fn = make_loss(args, len(coords)), METHODS[args.memory_probe]
    small = make_inputs(8, args.dim, [(lat[:50], lon[:50]) for lat, lon in coords], args.seed)
    fn(loss, small, *leaves(small))  # loads every kernel before the baseline
    points, entities = leaves(inputs)
    reset = reset_peak_rss()
    baseline = rss_mib()
    with Stopwatch() as wall, Stopwatch(time.process_time) as cpu:
        fn(loss, inputs, points, entities)
    peak = proc_kb("VmHWM") / 1024 if reset else peak_rss_mib()
    print(json.dumps({"extra_mb": peak - baseline, "peak_reset": reset, "wall_s": wall.seconds,
                      "cpu_s": cpu.seconds}))


def probe(args, method: str, batch: int | None = None, sizes: list[int] | None = None) -> dict:
    """Run one method once in a fresh subprocess (``memory_probe``) -> its JSON result."""
    sizes = args.sizes if sizes is None else sizes
    command = [os.path.abspath(__file__), "--memory-probe", method, "--batch", str(batch or args.batch), "--dim",
               str(args.dim), "--seed", str(args.seed), "--threads", str(args.threads)]
    if sizes is not None:
        command += ["--sizes", ",".join(map(str, sizes))]
    if args.learn_weights:
        command.append("--learn-weights")
    return run_json_child(command)


def peak_memory(args, method: str) -> float:
    return probe(args, method)["extra_mb"]


def scaling(args) -> None:
    """--scaling: one level of N synthetic entities for each N and B, each method once in its own subprocess:
    wall and process-CPU seconds of one forward + backward, extra peak MB. The reference is skipped where its
    estimated memory (its measured bytes per pair at the smallest N of the same B, times B N) exceeds
    --max-reference-gb."""
    print(f"one level of N synthetic entities, D={args.dim}, float32, threads {args.threads or torch.get_num_threads()}"
          f", load average {os.getloadavg()[0]:.1f}")
    print("| B | N | method | fwd+bwd s (wall) | CPU s | extra peak MB | blocked speed-up | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in args.scaling_batches:
        per_pair = None
        for n in args.scaling_entities:
            rows = {}
            for method in ("reference", "blocked"):
                if method == "reference" and per_pair is not None and per_pair * batch * n > args.max_reference_gb * 2**30:
                    rows[method] = {"skipped_gb": per_pair * batch * n / 2**30}
                    continue
                rows[method] = probe(args, method, batch, [n])
            if "extra_mb" in rows["reference"]:
                per_pair = per_pair or rows["reference"]["extra_mb"] * 2**20 / (batch * n)
            for method, r in rows.items():
                if "skipped_gb" in r:
                    print(f"| {batch} | {n:,} | {method} | not run: needs ~{r['skipped_gb']:.0f} GB "
                          f"(estimated) | | | | |")
                    continue
                ref = rows["reference"]
                speed = mem = ""
                if method == "blocked" and "extra_mb" in ref:
                    speed = f"{ref['wall_s'] / r['wall_s']:.2f}x (CPU {ref['cpu_s'] / r['cpu_s']:.2f}x)"
                    mem = f"{ref['extra_mb'] / max(r['extra_mb'], 1e-9):.0f}x"
                print(f"| {batch} | {n:,} | {method} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['extra_mb']:,.0f} | "
                      f"{speed} | {mem} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=None,
                        help="entities per level, comma-separated (default: the global gazetteer's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--learn-weights", action="store_true", help="learnable lambda and sigma")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the float64 comparison")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--scaling", action="store_true", help="print the scaling table instead (see scaling())")
    parser.add_argument("--scaling-entities", type=lambda s: [int(v) for v in s.split(",")],
                        default=[20_000, 165_000, 1_000_000])
    parser.add_argument("--scaling-batches", type=lambda s: [int(v) for v in s.split(",")], default=[256, 4096])
    parser.add_argument("--max-reference-gb", type=float, default=12.0,
                        help="--scaling: skip the reference where it would need more memory than this")
    parser.add_argument("--memory-probe", choices=tuple(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args)
        return
    if args.scaling:
        scaling(args)
        return
    reuse_freed_cpu_memory()
    coords = level_sizes_and_coords(args.sizes, args.seed)
    inputs = make_inputs(args.batch, args.dim, coords, args.seed)
    sizes = [len(lat) for lat, _ in coords]
    result = {"shape": {"batch": args.batch, "dim": args.dim, "levels": sizes, "entities": sum(sizes)},
              "threads": torch.get_num_threads(), "repeats": args.repeats, "learn_weights": args.learn_weights,
              "load_average": os.getloadavg()[0]}
    times = timings(args, inputs)
    for name, values in times.items():
        result[f"{name}_ms"] = 1000 * statistics.median(values)
        result[f"{name}_min_ms"] = 1000 * min(values)
    result["speedup"] = result["reference_ms"] / result["blocked_ms"]
    if not args.no_accuracy:
        ref_value, ref_grads = float64_reference(args, inputs)
        for name, fn in METHODS.items():
            loss = make_loss(args, len(inputs["entities"]))
            points, entities = leaves(inputs)
            value = fn(loss, inputs, points, entities).item()
            key = "max_rel_err" if name == "blocked" else "reference_max_rel_err"
            result[key] = max_rel_err(value, gradients(loss, points, entities), ref_value, ref_grads)
    if not args.no_memory:
        for name in METHODS:
            result[f"{name}_peak_mb"] = peak_memory(args, name)
        result["memory_ratio"] = result["reference_peak_mb"] / max(result["blocked_peak_mb"], 1e-9)
    if args.format == "json":
        print(json.dumps(result, indent=2))
        return
    print(f"B={args.batch}, D={args.dim}, levels {sizes} ({sum(sizes):,} entities), float32, "
          f"{result['threads']} threads, {args.repeats} interleaved repeats, load average {result['load_average']:.1f}")
    print(f"{'method':10s} {'fwd+bwd ms (median)':>20s} {'(min)':>8s} {'extra peak MB':>14s} {'max rel err':>12s}")
    for name in ("reference", "blocked"):
        err_key = "max_rel_err" if name == "blocked" else "reference_max_rel_err"
        print(f"{name:10s} {result[name + '_ms']:20.0f} {result[name + '_min_ms']:8.0f} "
              f"{result.get(name + '_peak_mb', math.nan):14.0f} {result.get(err_key, math.nan):12.1e}")
    ratio = f", memory {result['memory_ratio']:.1f}x less" if "memory_ratio" in result else ""
    print(f"blocked: {result['speedup']:.2f}x the reference's speed{ratio}")


if __name__ == "__main__":
    main()
