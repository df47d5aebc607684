"""Run benchmarks: ``python -m bench [NAME...]`` (default: all). NAME is e.g. ``ingest``."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def main() -> None:
    here = Path(__file__).parent
    available = sorted(
        m.name.removeprefix("bench_")
        for m in pkgutil.iter_modules([str(here)])
        if m.name.startswith("bench_")
    )
    names = sys.argv[1:] or available
    unknown = [n for n in names if n not in available]
    if unknown:
        sys.exit(f"bench: unknown benchmark(s) {unknown}; available: {', '.join(available)}")
    for name in names:
        print(f"# bench {name}", flush=True)
        importlib.import_module(f"bench.bench_{name}").main()


if __name__ == "__main__":
    main()
