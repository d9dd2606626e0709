"""`python -m turbo_core COMMAND ...` — the command-line face of the engine."""
from __future__ import annotations

import argparse
import logging
import sys

from .io.checkpoint import CheckpointError


def cmd_convert(args) -> int:
    from .models.dit_loader import convert_to_safetensors

    if not str(args.output).endswith(".safetensors"):
        raise SystemExit("convert: the output file must end in .safetensors")
    report = convert_to_safetensors(args.input, args.output)
    print(f"{args.output}: {report.variant}, {report.loaded} tensors")
    for c in report.converted:
        print(f"  converted: {c}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m turbo_core", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (load reports, backends)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="rewrite a DiT checkpoint (.pth, any layout) as .safetensors")
    p.add_argument("input")
    p.add_argument("output")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.func(args)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
