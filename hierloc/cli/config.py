"""`hierloc config`: print the full resolved configuration (every default, a file and overrides applied) as TOML."""

from __future__ import annotations

import argparse
import sys

from gazetteer.atomic import atomic_write_text
from hierloc.cli import HelpFormatter
from hierloc.config import load_config


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "config", formatter_class=HelpFormatter, help="print the full configuration with every default",
        description="Print every setting `hierloc train` uses, as TOML: the defaults, then --config FILE, then\n"
                    "section.key=value overrides. The output is a valid --config file.\n"
                    "  hierloc config > my.toml\n"
                    "  hierloc config train.epochs=3 --format json")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")
    p.add_argument("--config", default=None, help="config file (.toml, .yaml or .json) to start from")
    p.add_argument("--format", default="toml", choices=["toml", "json"], help="output format")
    p.add_argument("--out", default="-", help="write to this file (atomically); - is standard output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    text = cfg.to_toml() if args.format == "toml" else cfg.to_json() + "\n"
    if args.out == "-":
        sys.stdout.write(text)
    else:
        atomic_write_text(args.out, text)
    return 0
