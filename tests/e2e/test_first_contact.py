"""First contact, as the README tells a new user: on a fresh checkout, `scripts/dev.sh run`, then
`python -m sluicegate demo` in the agent's environment shows the gateway at work in under a
minute: a redacted secret, the injected key hidden from the agent, and where the flow was
recorded.

The checkout is the repository's tracked files (what a clone holds: no certs/, no recordings/,
no venv); `--no-install` with VENV pointing at the test's own environment skips creating a venv
(the README's command without it creates `.venv` and installs; everything else is the same).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.support.gateway import REPO

BUDGET_SECONDS = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_checkout(target: Path) -> Path:
    """The tracked (and new, not ignored) files of this repository, as a clone would have them."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def agent_env(path: Path) -> dict[str, str]:
    """What `. certs/agent/agent.env` exports."""
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export ") :].partition("=")
            env[name] = shlex.split(value)[0] if value else ""
    return env


def test_the_readme_demo_on_a_fresh_checkout(tmp_path: Path) -> None:
    started = time.monotonic()
    repo = fresh_checkout(tmp_path / "sluicegate")
    # Other gateways may run on this machine: the dev config's fixed ports, made free.
    config = (repo / "config" / "dev.yaml").read_text()
    config = config.replace("listen_port: 8790", f"listen_port: {free_port()}")
    config = config.replace("port: 8791", f"port: {free_port()}")
    (repo / "config" / "dev-e2e.yaml").write_text(config)
    port = free_port()
    base_env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    base_env.pop("PYTHONPATH", None)
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        gateway = subprocess.Popen(
            [
                "scripts/dev.sh",
                "run",
                "--no-install",
                "--port",
                str(port),
                "--config",
                "config/dev-e2e.yaml",
            ],
            cwd=repo,
            env={**base_env, "VENV": str(Path(sys.executable).parent.parent)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = started + BUDGET_SECONDS
        while "demo upstream listening" not in log.read_text():
            assert gateway.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        text = log.read_text()
        assert f"proxy listening at 127.0.0.1:{port}" in text
        assert f"sluicegate demo --config {repo}/config/dev-e2e.yaml" in text  # what to run next

        env = {**base_env, **agent_env(repo / "certs" / "agent" / "agent.env")}
        env["PYTHONPATH"] = str(repo / "addons")
        demo = subprocess.run(
            [sys.executable, "-m", "sluicegate", "demo", "--config", "config/dev-e2e.yaml"],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUDGET_SECONDS,
        )
        elapsed = time.monotonic() - started
    finally:
        os.killpg(gateway.pid, signal.SIGTERM)
        gateway.wait(timeout=20)
    shown = demo.stdout + demo.stderr
    assert demo.returncode == 0, shown + log.read_text()
    # A redacted secret, both ways, and the flows recorded where the demo says.
    assert "[REDACTED:github-token]" in shown
    assert "[REDACTED:stripe-secret-key]" in shown
    sessions = set(re.findall(r"\S+/recordings/\S+\.mitm", shown))
    assert sessions and all(Path(s).is_file() for s in sessions)
    assert f"mitmweb -n -r {sorted(sessions)[0]}" in shown or "mitmweb -n -r " in shown
    # The injected keys never reach the agent; neither does the agent's own token get printed.
    for name in ("demo-openai-api-key", "demo-anthropic-api-key"):
        key = (repo / "certs" / "secrets" / name).read_text().strip()
        assert key.startswith("sk-demo-") and key not in shown
    assert "a 48-character key, sha256" in shown  # ... but the upstream did get one
    token = (repo / "certs" / "agent" / "token").read_text().strip()
    assert token not in shown
    assert elapsed < BUDGET_SECONDS, f"took {elapsed:.1f} s"
    print(f"fresh checkout to demo done: {elapsed:.1f} s")
