"""`python -m bench NAME [args...]`: run the benchmark module `bench.NAME` (its `main(argv)`).

`python -m bench` alone lists the modules that have a `main`.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.iter_modules([str(PACKAGE)])
        if not info.name.startswith("_") and not info.ispkg
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    names = available()
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m bench NAME [args...]\n\nbenchmarks: " + ", ".join(names))
        return 0 if args else 2
    name = args[0].replace("-", "_")
    if name not in names:
        print(f"unknown benchmark {args[0]!r} (known: {', '.join(names)})", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{name}")
    entry = getattr(module, "main", None)
    if entry is None:
        print(f"bench.{name} has no main()", file=sys.stderr)
        return 2
    return int(entry(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
