"""Benchmarks: `python -m bench NAME [args]` runs `bench/NAME.py`'s `main(argv)`.

`python -m bench readme` prints the table README "Performance" quotes (`--smoke`: a seconds-long
run CI does, so the benchmarks cannot rot). The repository root and addons/ are put on sys.path
here, so every benchmark imports `sluicegate`, `tests.support` and `bench.*` from any directory.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (str(ROOT), str(ROOT / "addons")):
    if _path not in sys.path:
        sys.path.insert(0, _path)
