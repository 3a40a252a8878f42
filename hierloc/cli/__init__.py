"""Command-line entry point: parses arguments and dispatches to the library. No work happens here.

Each subcommand lives in its own module of this package, which exposes ``register(subparsers)``; the module
adds its parser (every option documented with its default) and sets ``func`` to a function taking the parsed
``argparse.Namespace`` and returning an exit code. Heavy imports (torch, transformers) happen inside those
functions so that ``hierloc --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gazetteer.errors import InputError
from hierloc.version import __version__

# Order = order in `hierloc --help`.
COMMAND_MODULES = ("gazetteer", "demo_data", "train", "calibrate", "predict", "eval", "explain", "serve", "config")

EXIT_INPUT_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default and keeps hand-written line breaks in descriptions. Options without a value
    (flags, unset options whose help says what happens when they are omitted) show no "(default: ...)" noise."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == []:
            return action.help or ""
        return super()._get_help_string(action)


def parse_point(text: str, what: str) -> tuple[float, float]:
    """"LAT,LON" in degrees -> (lat, lon); InputError naming `what` (e.g. "--truth '1,2'") when it is not one."""
    try:
        lat, lon = (float(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"{what}: expected LAT,LON in degrees, e.g. 48.85,2.35") from None
    if not (abs(lat) <= 90 and abs(lon) <= 180):
        raise InputError(f"{what}: latitude must be in [-90, 90] and longitude in [-180, 180]")
    return lat, lon


def _add_global_options(parser: argparse.ArgumentParser, default=False) -> None:
    """-q/-v/--debug on the main parser and (with default=SUPPRESS, so as not to overwrite it) on every command."""
    parser.add_argument("--debug", action="store_true", default=default, help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="log warnings and errors only, and draw no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hierloc",
        description="Hierarchical visual geolocation: country -> region -> subregion -> city on the Poincare ball.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"hierloc {__version__}")
    _add_global_options(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"hierloc.cli.{name}")
        except ModuleNotFoundError as exc:  # a command whose module is not written yet
            if exc.name != f"hierloc.cli.{name}":
                raise
            continue
        module.register(subparsers)
    for command in subparsers.choices.values():
        _add_global_options(command, default=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse a command line as `main` does (SystemExit on a usage error); runs nothing."""
    parser = parser or build_parser()
    # `section.key=value` overrides may stand anywhere among the options (argparse alone only takes them in one run)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.quiet and hasattr(args, "no_progress"):
        args.no_progress = True
    return args


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        if args.debug:
            raise
        print(f"hierloc: error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("hierloc: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: one line, not a traceback
        if args.debug:
            raise
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        print(f"hierloc: internal error: {type(exc).__name__}: {first_line} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL_ERROR
