"""The virtualenv of the MCP SDK peers (tests/support/mcp_peer.py), created when missing.

The official MCP Python SDK needs newer HTTP libraries (h11 0.16) than mitmproxy 11 allows
(h11<=0.14), so its server and client run as subprocesses from their own virtualenv:
`$SLUICEGATE_MCP_VENV`, else `.venv-mcp` in the repository. `scripts/dev.sh test` creates it
before the suite (`python -m tests.support.mcp_env`); a test that needs it creates it too.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The SDK version the e2e tests were written against (its 2.x API: MCPServer, httpx2).
REQUIREMENTS = ("mcp==2.3.0",)


def venv_dir() -> Path:
    return Path(os.environ.get("SLUICEGATE_MCP_VENV") or REPO / ".venv-mcp")


def ensure(python: str | None = None) -> Path:
    """The virtualenv's interpreter, after creating the virtualenv or installing what changed."""
    directory = venv_dir()
    directory.mkdir(parents=True, exist_ok=True)  # (ignored by git: `.venv*/`)
    interpreter = directory / "bin" / "python"
    stamp = directory / ".sluicegate-mcp-requirements"
    wanted = "\n".join(REQUIREMENTS)
    with open(directory / ".sluicegate-mcp-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if interpreter.exists() and stamp.exists() and stamp.read_text() == wanted:
            return interpreter
        base = python or getattr(sys, "_base_executable", None) or sys.executable
        if not interpreter.exists():
            subprocess.run([base, "-m", "venv", str(directory)], check=True)
        subprocess.run(
            [str(interpreter), "-m", "pip", "install", "-q", *REQUIREMENTS],
            check=True,
        )
        stamp.write_text(wanted)
    return interpreter


if __name__ == "__main__":
    print(ensure())
