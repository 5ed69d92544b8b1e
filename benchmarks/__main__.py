"""Run every benchmark (or those named on the command line) and print their figures as JSON."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("bench_"))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(available())})")
    args = parser.parse_args()
    results = {}
    for name in args.names or available():
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"== {name}: {module.__doc__.strip().splitlines()[0]}", file=sys.stderr, flush=True)
        results[name] = module.run()
        print(json.dumps({name: results[name]}, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
