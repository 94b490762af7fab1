"""`python -m bench readme --smoke`: the README's performance table, tiny sizes, so it cannot rot.

Runs the real thing (bare mitmdump and the gateway over HTTPS/CONNECT, SSE streams, adversarial
bodies, the redaction engine) in a subprocess; figures at these sizes mean nothing, so only the
table's shape and that every figure was measured are checked, never a speed.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict]]:
    out = tmp_path_factory.mktemp("bench") / "readme.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "readme", "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["header"].startswith("mitmproxy ")
    return done.stdout, data["rows"]


def test_every_row_of_the_readme_table_is_measured(smoke: tuple[str, list[dict]]) -> None:
    stdout, rows = smoke
    whats = [row["what"] for row in rows]
    for expected in (
        "10 clients",
        "50 clients",
        "proxy CPU per small request",
        "p50 / p99",
        "unpaced events",
        "concurrent SSE streams",
        "4 KiB deltas",
        "adversarial",
        "`default` profile",
        "`strict` profile",
    ):
        assert any(expected in what for what in whats), (expected, whats)
    for row in rows:
        figures = [float(n.replace(",", "")) for n in NUMBER.findall(row["gateway"])]
        assert figures and all(math.isfinite(f) for f in figures), row
        if row["target"]:
            assert row["met"] in (True, False), row
    assert "| what | bare mitmdump | gateway | ratio / added | target |" in stdout
    assert "gateway logged" not in stdout


def run_bench(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_recorder_bench_measures_every_part_and_checks_the_encoding() -> None:
    out = run_bench("recorder", "--smoke")
    for part in ("Recorder.response", "snapshot", "flow encoding", "session write", "audit line"):
        assert part in out, out
    match = re.search(r"(\d+) records byte-identical to mitmproxy's.*ours ([\d.]+) µs/flow", out)
    assert match and int(match.group(1)) == 200 and float(match.group(2)) > 0, out


def test_profile_bench_splits_both_proxies_cpu(tmp_path: Path) -> None:
    figures = tmp_path / "profile.json"
    out = run_bench("profile_proxy", "--smoke", "--json", str(figures))
    data = json.loads(figures.read_text())
    for name in ("bare", "gateway"):
        assert data[name]["requests"] > 0 and data[name]["cpu_us_per_request"] > 0
        assert sum(data[name]["us"].values()) == pytest.approx(data[name]["cpu_us_per_request"])
    assert not any(k.startswith("sluicegate") for k in data["bare"]["us"])
    assert any(k.startswith("sluicegate: ") for k in data["gateway"]["us"])
    assert "gateway / bare CPU per request" in out
