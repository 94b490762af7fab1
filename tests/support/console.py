"""The web console in tests and in the screenshot script: a gateway config with the console on,
and headless Chromium (Debian's `chromium` package, never a downloaded browser) driven by
Playwright for Python."""

from __future__ import annotations

import copy
import os
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.gateway import recording_section

CHROMIUM = Path(os.environ.get("SLUICEGATE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN_ENV = "SLUICEGATE_TEST_CONSOLE_ADMIN"
ADMIN_TOKEN = "console-admin-" + secrets.token_hex(16)
APPROVERS = "approvers"
INVESTIGATORS = "investigators"
# A GitHub token the default rules redact (fake, but shaped like one).
PLANTED = "ghp_" + "Zq7kLm2Np9Rt4Vx8Bc1Df6Gh3Jk5Mn0Pq2Rs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def console_config(base: dict[str, Any], workdir: Path, port: int) -> dict[str, Any]:
    """The test config plus: hold rules (DELETE /echo, PUT /echo),
    approvals on `port`, the console (approvers / investigators groups) and recording."""
    cfg = copy.deepcopy(base)
    cfg["policy"] = {
        "rules": [
            {
                "id": "deletes-need-approval",
                "action": "hold",
                "message": "Deleting needs a human.",
                "match": {"methods": ["DELETE"], "paths": ["/echo"]},
            },
            {
                "id": "review-uploads",
                "action": "hold",
                "message": "Uploads (PUT) are reviewed.",
                "match": {"methods": ["PUT"], "paths": ["/echo"]},
            },
        ]
    }
    cfg["approvals"] = {
        "admin_token": {"env": ADMIN_ENV},
        "listen_port": port,
        "timeout_seconds": 60,
        "retry_grace_seconds": 1,
    }
    cfg["console"] = {"approvers": [APPROVERS], "investigators": [INVESTIGATORS]}
    cfg["recording"] = recording_section(workdir / "recordings")
    return cfg


@contextmanager
def chromium() -> Iterator[Any]:
    """A Playwright browser context on Debian's Chromium with a fresh profile."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} is missing: apt-get install -y chromium")
    profile = Path(tempfile.mkdtemp(prefix="sg-chromium-"))
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                str(profile),
                executable_path=str(CHROMIUM),
                args=CHROMIUM_ARGS,
                headless=True,
                viewport={"width": 1280, "height": 860},
                env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
            )
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def sign_in(page: Any, base: str, token: str, name: str = "") -> None:
    page.goto(f"{base}/console/")
    page.wait_for_url("**/console/signin")
    page.fill("input[name=token]", token)
    if name:
        page.fill("input[name=name]", name)
    page.click("#signin-form button[type=submit]")
