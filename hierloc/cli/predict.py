"""`hierloc predict`: answer where images were taken, as hierarchies."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    from hierloc.cli import HelpFormatter

    p = subparsers.add_parser("predict", formatter_class=HelpFormatter, help="predict where images were taken",
                              description="Predict country -> region -> subregion -> city for images.")
    p.add_argument("images", nargs="+", help="image files, directories or glob patterns")
    p.add_argument("--model", required=True, help="trained model directory (what `hierloc train` writes)")
    p.add_argument("--top-k", type=int, default=3, help="number of alternative paths")
    p.add_argument("--beam", type=int, default=10, help="beam width per level")
    p.add_argument("--flat", action="store_true", help="nearest city over all cities instead of beam search")
    p.add_argument("--min-prob", type=float, default=None,
                   help="stop the answer at the deepest level whose probability reaches this value")
    p.add_argument("--max-level", default="city", choices=["country", "region", "subregion", "city"],
                   help="deepest level to answer")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--format", default="text", choices=["text", "json", "jsonl", "geojson"], help="output format")
    p.set_defaults(func=run)


def format_text(pred) -> str:
    lines = [f"{pred.source}  ->  {pred.lat_deg:.4f}, {pred.lon_deg:.4f} (lat, lon deg)"]
    for depth, lv in enumerate(pred.levels):
        lines.append(f"{'  ' * (depth + 1)}{lv.level:<9} {lv.name}  p={lv.probability:.3f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from hierloc.api import HierLoc, iter_image_paths

    model = HierLoc.from_pretrained(args.model, device=args.device)
    paths = iter_image_paths(args.images)
    preds = model.predict(paths, top_k=args.top_k, beam=args.beam, flat=args.flat, min_prob=args.min_prob,
                          max_level=args.max_level, batch_size=args.batch_size)
    if args.format == "text":
        print(f"# model: {args.model}", file=sys.stdout)
        print("\n".join(format_text(p) for p in preds))
    elif args.format == "json":
        print(json.dumps([p.to_dict() for p in preds], indent=2))
    elif args.format == "jsonl":
        for p in preds:
            print(json.dumps(p.to_dict()))
    else:
        print(json.dumps({"type": "FeatureCollection", "features": [p.to_geojson() for p in preds]}, indent=2))
    return 0
