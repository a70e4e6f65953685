"""`python -m bench [NAME ...] [--quick]`: run the benchmarks, print the table, write bench/results/."""

from __future__ import annotations

import argparse
import sys

from bench.suite import BENCHMARKS, main


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shorter loads, for a smoke run")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    sys.exit(main(args.names, quick=args.quick))
