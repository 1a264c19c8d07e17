"""``tensorpar <command>``: parse arguments, report errors as one line, exit non-zero on failure."""

from __future__ import annotations

import argparse
import os
import sys

from tensorpar import __version__


def build_parser() -> argparse.ArgumentParser:
    from tensorpar.cli import bench, check, export, generate, plan, serve, train

    parser = argparse.ArgumentParser(
        prog="tensorpar", description="Tensor parallelism for PyTorch transformer models."
    )
    parser.add_argument("--version", action="version", version=f"tensorpar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    generate.add_parser(sub)
    serve.add_parser(sub)
    bench.add_parser(sub)
    check.add_parser(sub)
    plan.add_parser(sub)
    train.add_parser(sub)
    export.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from tensorpar.errors import TensorparError

    try:
        code = args.run(args)
    except (TensorparError, ValueError) as e:
        print(f"tensorpar: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("tensorpar: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
