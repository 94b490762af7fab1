"""`python -m bench offload --smoke`: the offload benchmark runs end to end (three real proxies,
large bodies through the gateways' workers and threads; the loop-lag section), so it cannot
rot. Figures at these sizes mean nothing: only that each row was measured and nothing failed is
checked."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def test_the_offload_benchmark_measures_every_proxy() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "offload", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {
        line.split("|")[1].strip(): line
        for line in done.stdout.splitlines()
        if line.startswith("| ") and not line.startswith(("| proxy", "| path"))
    }
    proxies, paths = {"bare", "in-process", "processes"}, {"worker process", "thread", "idle"}
    assert set(rows) == proxies | paths, done.stdout
    for name, line in rows.items():
        figures = [float(n) for n in NUMBER.findall(line.split("|", 2)[2])]
        assert len(figures) == (7 if name in proxies else 4), (name, line)
        assert all(math.isfinite(f) for f in figures), (name, line)
        if name in proxies:
            assert figures[4] >= 1, (name, line)  # large bodies done
    assert "failed" not in done.stdout and "error line" not in done.stdout, done.stdout
