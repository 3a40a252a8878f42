"""Inference benchmark: HierLoc's entity index vs image retrieval, end-to-end throughput, beam width vs accuracy.

    .venv/bin/python scripts/bench_inference.py --model runs/demo --csv runs/demo-data/test_nearby.csv

Parts (each prints a Markdown table; docs/inference.md holds the numbers measured on the reference machine):

1. Index search, image encoder excluded. The GLOBAL gazetteer (`Gazetteer.build_global()`, ~165k entities) with a
   randomly initialised `HierLocModel` (D = --dim) over it; entity points computed once and cached (as
   `HierLoc.entity_points` does). Queries = image points from random features through the model's image head.
   Timed: beam search (`HierLoc.search_points`, beam 10, top-5 paths), the flat scan over all cities
   (`flat=True`), and brute-force nearest-neighbour retrieval over a gallery of --gallery random image embeddings
   of the same dimension (squared Euclidean distance in matrix-product form |g|^2 - 2 q.g, in chunks of
   --chunk rows, keeping the running best), the paradigm HierLoc replaces. Timings are the best and the median
   of --repeats runs over --queries queries in batches of --batch (the machine may be shared: the best run is
   the uncontended estimate). Index memory: the tensors each method needs at query time.
2. End-to-end images/s (--model): `HierLoc.iter_predict` over --e2e-images images of --csv (decode + preprocess in
   DataLoader workers, encoder, search, answer objects), with the model's own encoder.
3. Accuracy (--model --csv): images embedded once, then searched with beam widths --beams and with the flat scan;
   OSV5M-protocol metrics (`hierloc.evaluate.score_points`) and predicted-path accuracy for each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def timed(fn, repeats: int) -> tuple[float, float]:
    """(best, median) wall seconds of `fn()` over `repeats` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- part 1: index
def build_global_hierloc(dim: int, seed: int):
    from gazetteer import Gazetteer
    from hierloc.api import HierLoc
    from hierloc.config import Config, ModelConfig
    from hierloc.losses import GWHInfoNCE
    from hierloc.model import EntityTable, HierLocModel

    start = time.perf_counter()
    gaz = Gazetteer.build_global(progress=False)
    build_s = time.perf_counter() - start
    cfg = Config(model=ModelConfig(embed_dim=dim))
    torch.manual_seed(seed)
    model = HierLocModel(cfg.model, EntityTable.from_gazetteer(gaz), feature_dim=dim, seed=seed).eval()
    loss = GWHInfoNCE(n_levels=4, tau=cfg.loss.tau, lam=cfg.loss.lam, sigma_km=cfg.loss.sigma_km).eval()
    hierloc = HierLoc(cfg, model, loss, encoder=None, gaz=gaz, device="cpu", source="<random, global gazetteer>")
    start = time.perf_counter()
    hierloc.entity_points()
    return hierloc, build_s, time.perf_counter() - start


def retrieval_top1(queries: torch.Tensor, gallery: torch.Tensor, gallery_sqnorm: torch.Tensor,
                   chunk: int) -> torch.Tensor:
    """Nearest gallery row per query: (B, D), (G, D), (G,) -> (B,) int64. argmin |g|^2 - 2 q.g (|q|^2 is constant
    per query), one matrix product per chunk of rows, keeping the running best."""
    best_value = torch.full((queries.shape[0],), float("inf"))
    best_index = torch.zeros(queries.shape[0], dtype=torch.int64)
    for start in range(0, gallery.shape[0], chunk):
        block = torch.addmm(gallery_sqnorm[start:start + chunk].unsqueeze(0), queries,
                            gallery[start:start + chunk].T, alpha=-2.0)
        value, index = block.min(dim=1)
        better = value < best_value
        best_value = torch.where(better, value, best_value)
        best_index = torch.where(better, index + start, best_index)
    return best_index


def child_ranges(gaz) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per parent level l = 0..2: (first child's global id, number of children), each (N_l,) int64 (children of
    an entity are contiguous in the gazetteer)."""
    offsets, parents = np.asarray(gaz.level_offsets), np.asarray(gaz.parents)
    out = []
    for level in range(3):
        lo, hi = offsets[level + 1], offsets[level + 2]
        counts = np.bincount(parents[lo:hi] - offsets[level], minlength=offsets[level + 1] - offsets[level])
        starts = lo + np.concatenate([[0], np.cumsum(counts)[:-1]])
        out.append((torch.as_tensor(starts, dtype=torch.int64), torch.as_tensor(counts, dtype=torch.int64)))
    return out


@torch.no_grad()
def sparse_beam_search(points: torch.Tensor, entity_points: torch.Tensor, ranges, level_offsets, tau: float,
                       c: float = 1.0, beam: int = 10, top_k: int = 5, chunk: int = 256):
    """PROTOTYPE (benchmark only, not used by `hierloc predict`): the same beam search as
    `hierloc.search.beam_search` (same candidates, per-level softmax over the children of the surviving beam,
    carried childless entries, path score = sum of log-probabilities), but distances are computed only for the
    candidates: all countries, then the children of the beam. Returns (paths (B, k, 4) global ids, scores (B, k)).

    Candidate distances: d^2 = (2/sqrt(c) arsinh(sqrt(m/2)))^2, m = 2c|x-y|^2 / ((1-c|x|^2)(1-c|y|^2)), from
    direct differences (no cancellation)."""
    from hierloc import hyperbolic

    entity_sqnorm = entity_points.square().sum(1)
    all_paths, all_scores = [], []
    for x in points.split(chunk):
        b = x.shape[0]
        x_sqnorm = x.square().sum(1, keepdim=True)

        def sqdist(candidates, valid):  # (b, T) global ids, mask -> (b, T) squared distances (inf where invalid)
            row, col = valid.nonzero(as_tuple=True)  # only the real candidates: P pairs, no padding
            ids = candidates[row, col]
            diff = (x[row] - entity_points[ids]).square().sum(-1)
            m = 2 * c * diff / ((1 - c * x_sqnorm[row, 0]) * (1 - c * entity_sqnorm[ids])).clamp_min(1e-15)
            out = torch.full(candidates.shape, float("inf"))
            out[row, col] = (2 / c ** 0.5 * torch.asinh((m / 2).sqrt())).square()
            return out

        n0 = level_offsets[1]
        logp0 = torch.log_softmax(-hyperbolic.pairwise_sqdist(x, entity_points[:n0], c=c) / tau, dim=1)
        cum, idx = logp0.topk(min(beam, n0), dim=1)
        paths = torch.full((b, idx.shape[1], 4), -1, dtype=torch.int64)
        paths[:, :, 0] = idx
        rows = torch.arange(b).unsqueeze(1)
        for level in range(1, 4):
            starts, counts = ranges[level - 1]
            prev = paths[:, :, level - 1]
            width_prev = prev.shape[1]
            alive = (prev >= 0) & torch.isfinite(cum)
            local = (prev - level_offsets[level - 1]).clamp_min(0)
            count = torch.where(alive, counts[local], 0)
            cum_count = count.cumsum(1)
            total = cum_count[:, -1]
            n_cand = max(1, int(total.max()))
            t = torch.arange(n_cand).expand(b, n_cand)
            slot = torch.searchsorted(cum_count, t.contiguous(), right=True).clamp_max(width_prev - 1)
            valid = t < total.unsqueeze(1)
            first = (cum_count - count).gather(1, slot)
            candidates = torch.where(valid, starts[local].gather(1, slot) + t - first, 0)
            logits = torch.where(valid, -sqdist(candidates, valid) / tau, float("-inf"))
            logp = torch.where(valid, torch.log_softmax(logits, dim=1), float("-inf"))
            cand_score = cum.gather(1, slot) + logp
            carry_score = torch.where(count > 0, float("-inf"), cum)
            scores = torch.cat([cand_score, carry_score], dim=1)
            cum, sel = scores.topk(min(beam, scores.shape[1]), dim=1)
            is_new = sel < n_cand
            picked = sel.clamp_max(n_cand - 1)
            src = torch.where(is_new, slot.gather(1, picked), sel - n_cand).clamp(0, width_prev - 1)
            paths = paths[rows, src].clone()
            paths[:, :, level] = torch.where(is_new, candidates.gather(1, picked), -1)
        k = min(top_k, paths.shape[1])
        all_paths.append(torch.where(torch.isfinite(cum[:, :k]).unsqueeze(-1), paths[:, :k], -1))
        all_scores.append(cum[:, :k])
    return torch.cat(all_paths), torch.cat(all_scores)


def bench_index(args) -> None:
    print(f"\n## 1. Index search (encoder excluded): global gazetteer, D={args.dim}, {args.queries} queries in "
          f"batches of {args.batch}, torch threads {torch.get_num_threads()}\n")
    hierloc, build_s, points_s = build_global_hierloc(args.dim, args.seed)
    gaz = hierloc.gazetteer
    counts = [int(gaz.level_offsets[i + 1] - gaz.level_offsets[i]) for i in range(4)]
    print(f"global gazetteer: {gaz.n_entities:,} entities ({', '.join(f'{n:,}' for n in counts)}); built in "
          f"{build_s:.1f} s; entity points computed once in {points_s:.2f} s")
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        features = torch.randn(args.queries, args.dim, generator=generator)
        queries = hierloc.model.embed_features(features)
    batches = list(queries.split(args.batch))

    def run_search(**kwargs):
        for batch in batches:
            hierloc.search_points(batch, top_k=5, **kwargs)

    rows = []
    beam_best, beam_median = timed(lambda: run_search(beam=10), args.repeats)
    flat_best, flat_median = timed(lambda: run_search(flat=True), args.repeats)

    gallery = torch.randn(args.gallery, args.dim, generator=generator)
    gallery_sqnorm = gallery.square().sum(1)
    gallery_coords = torch.zeros(args.gallery, 2, dtype=torch.float32)  # lat, lon of each gallery image
    retrieval_queries = torch.randn(args.queries, args.dim, generator=generator)
    retrieval_batches = list(retrieval_queries.split(args.batch))

    def run_retrieval():
        for batch in retrieval_batches:
            retrieval_top1(batch, gallery, gallery_sqnorm, args.chunk)

    retrieval_best, retrieval_median = timed(run_retrieval, max(1, args.repeats // 2))

    ranges = child_ranges(gaz)
    offsets = [int(o) for o in gaz.level_offsets]
    entity_points = hierloc.entity_points()

    def run_sparse():
        return [sparse_beam_search(batch, entity_points, ranges, offsets, hierloc.tau, hierloc.cfg.model.curvature)
                for batch in batches]

    sparse_best, sparse_median = timed(run_sparse, args.repeats)
    dense = [hierloc.search_points(batch, beam=10, top_k=5) for batch in batches]
    sparse = run_sparse()
    same_best = float(np.mean(np.concatenate([(d.paths[:, 0] == s_paths[:, 0]).all(1).numpy()
                                              for d, (s_paths, _) in zip(dense, sparse)])))
    score_gap = max(float((d.scores - s_scores).abs().max()) for d, (_, s_scores) in zip(dense, sparse))
    entity_bytes = hierloc.entity_points().numel() * hierloc.entity_points().element_size()
    tree_bytes = (hierloc.model.entity_parents.numel() * 8 + sum(t.numel() * 8 for t in hierloc._parents_local)
                  + gaz.lat_deg.nbytes + gaz.lon_deg.nbytes)
    gallery_bytes = gallery.numel() * 4 + gallery_sqnorm.numel() * 4 + gallery_coords.numel() * 4
    n = args.queries
    for name, best, median, size, detail in [
        ("HierLoc beam search (beam 10, top-5)", beam_best, beam_median, entity_bytes + tree_bytes,
         f"{gaz.n_entities:,} entity points + tree"),
        ("HierLoc flat scan (all cities)", flat_best, flat_median, entity_bytes + tree_bytes, "same index"),
        ("prototype: beam search computing candidate distances only", sparse_best, sparse_median,
         entity_bytes + tree_bytes, "same index"),
        (f"image retrieval, brute force ({args.gallery:,} images)", retrieval_best, retrieval_median,
         gallery_bytes, f"{args.gallery:,} embeddings + norms + coordinates"),
    ]:
        rows.append([name, f"{n / best:,.0f}", f"{n / median:,.0f}", f"{1000 * best / n:.3f}", mib(size), detail])
    print(table(["method", "queries/s (best)", "queries/s (median)", "ms/query (best)", "index memory", "index"],
                rows))
    index_bytes = entity_bytes + tree_bytes
    print(f"\nbeam vs retrieval: {retrieval_best / beam_best:.1f}x the queries/s (best runs), "
          f"{retrieval_median / beam_median:.1f}x (medians); retrieval needs {gallery_bytes / index_bytes:.1f}x "
          f"the index memory ({gallery_bytes / entity_bytes:.1f}x the entity points alone).")
    print(f"flat vs beam: {beam_best / flat_best:.2f}x the queries/s of beam search.")
    print(f"prototype candidate-only beam: {beam_best / sparse_best:.1f}x the queries/s of the product's beam search, "
          f"{retrieval_best / sparse_best:.1f}x retrieval's; same best path on {100 * same_best:.1f}% of the queries, "
          f"largest path-score difference {score_gap:.2e}.")


# ---------------------------------------------------------------------------------------- part 2: end to end
def bench_end_to_end(args, hierloc, paths: list[str]) -> None:
    paths = paths[:args.e2e_images]
    print(f"\n## 2. End to end (decode + preprocess + encoder + beam search + answers): {len(paths)} images, "
          f"batch {args.batch_size}\n")
    backbone = hierloc.encoder.info.architecture if hasattr(hierloc.encoder, "info") else "?"
    rows = []
    for workers in args.workers:
        def run():
            for _ in hierloc.iter_predict(paths, top_k=3, batch_size=args.batch_size, num_workers=workers):
                pass

        best, median = timed(run, max(1, args.repeats // 2))
        rows.append([f"{workers}", f"{len(paths) / best:,.1f}", f"{len(paths) / median:,.1f}"])
    print(f"model {hierloc.source}: backbone {backbone} ({hierloc.encoder.preprocessor.image_size} px), "
          f"gazetteer {hierloc.gazetteer.n_entities:,} entities")
    print(table(["DataLoader workers", "images/s (best)", "images/s (median)"], rows))


# ------------------------------------------------------------------------------------------ part 3: accuracy
def bench_accuracy(args, hierloc, table_) -> None:
    from hierloc import evaluate, metrics

    print(f"\n## 3. Accuracy vs beam width: {len(table_)} images of {table_.source}\n")
    points, ok, errors = evaluate.embed_table(hierloc, table_, batch_size=args.batch_size,
                                              num_workers=max(args.workers))
    true_lat, true_lon = table_.lat_deg[ok], table_.lon_deg[ok]
    true_fields = metrics.reverse_geocode(true_lat, true_lon)
    true_paths = hierloc.gazetteer.locate(true_lat, true_lon)
    rows = []
    for mode in [("beam", width) for width in args.beams] + [("flat", None)]:
        start = time.perf_counter()
        answer = evaluate.paths_from_points(hierloc, points[torch.from_numpy(ok)], beam=mode[1],
                                            flat=mode[0] == "flat")
        seconds = time.perf_counter() - start
        summary, _ = evaluate.score_points(answer["pred_lat_deg"], answer["pred_lon_deg"], true_lat, true_lon,
                                           true_fields=true_fields)
        summary.update(evaluate.path_accuracy(answer["paths"], true_paths, true_fields))
        name = "flat" if mode[0] == "flat" else f"beam {mode[1]}"
        rows.append([name, f"{summary['mean_km']:.0f}", f"{summary['median_km']:.0f}", f"{summary['geoscore']:.0f}",
                     *(f"{100 * summary[f'acc_{r}km']:.1f}" for r in (25, 200, 750, 2500)),
                     *(f"{100 * summary[f'acc_{lv}']:.1f} / {100 * summary[f'path_acc_{lv}']:.1f}"
                       for lv in metrics.LEVELS),
                     f"{int(ok.sum()) / seconds:,.0f}"])
    print(table(["search", "mean km", "median km", "GeoScore", "<25 km %", "<200 km %", "<750 km %", "<2500 km %",
                 "country % (OSV5M / path)", "region %", "subregion %", "city %", "search q/s"], rows))
    if errors:
        print(f"\n{len(errors)} images unreadable (left out)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="trained model directory (parts 2 and 3)")
    parser.add_argument("--csv", default=None, help="labelled test CSV (parts 2 and 3)")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimension D of the index benchmark")
    parser.add_argument("--queries", type=int, default=1024, help="queries per timed run (part 1)")
    parser.add_argument("--batch", type=int, default=256, help="queries per search batch (part 1)")
    parser.add_argument("--gallery", type=int, default=1_000_000, help="retrieval gallery size (part 1)")
    parser.add_argument("--chunk", type=int, default=65_536, help="gallery rows per matrix product (part 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--e2e-images", type=int, default=1024, help="images for the end-to-end run (part 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (parts 2 and 3)")
    parser.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[0, 2],
                        help="DataLoader worker counts to try in part 2, e.g. 0,2")
    parser.add_argument("--beams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 3, 10, 30],
                        help="beam widths of part 3")
    parser.add_argument("--skip-index", action="store_true", help="skip part 1 (the global gazetteer build)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    if not args.skip_index:
        bench_index(args)
    if args.model:
        from hierloc import data
        from hierloc.api import HierLoc

        hierloc = HierLoc.from_pretrained(args.model, device="cpu")
        if not args.csv:
            raise SystemExit("--model needs --csv (labelled test images) for parts 2 and 3")
        table_ = data.read_image_table(args.csv)
        bench_end_to_end(args, hierloc, [str(p) for p in table_.paths])
        bench_accuracy(args, hierloc, table_)


if __name__ == "__main__":
    main()
