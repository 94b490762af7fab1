#!/usr/bin/env python3
"""Regenerate the console screenshots in docs/ (docs/console-*.png).

Starts a real gateway (the test config with hold rules, approvals, console and recording) in a
temporary directory, sends agent traffic through it (requests with planted fake secrets, a
streamed completion, held requests: one approved with a grant, one denied, one left pending),
then signs in with headless Chromium (Debian's `chromium`) and screenshots each view. Run it in
the test environment:

    .venv/bin/python scripts/console_screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "addons"), str(ROOT)]

import httpx  # noqa: E402

from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV, make_config  # noqa: E402
from tests.support.console import (  # noqa: E402
    ADMIN_ENV,
    ADMIN_TOKEN,
    PLANTED,
    chromium,
    console_config,
    free_port,
    sign_in,
)
from tests.support.gateway import Gateway  # noqa: E402
from tests.support.pki import TestCA  # noqa: E402
from tests.support.tokens import TestIdP  # noqa: E402
from tests.support.upstream import FakeUpstream  # noqa: E402

SLACK = "xoxb-" + "2417483920-5928374610293-AbCdEfGhIjKlMnOpQrStUvWx"  # fake


def wait_pending(base: str, count: int) -> list[dict]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with httpx.Client(trust_env=False) as client:
            found = client.get(
                f"{base}/v1/approvals", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
            ).json()["approvals"]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise SystemExit("held requests did not show up")


def decide(base: str, approval: str, verb: str, reason: str, grant: float | None = None) -> None:
    body: dict = {"approver": "admin:Ada", "reason": reason}
    if grant:
        body["grant_minutes"] = grant
    with httpx.Client(trust_env=False) as client:
        client.post(
            f"{base}/v1/approvals/{approval}/{verb}",
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
            json=body,
        ).raise_for_status()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs"), help="where the PNGs go")
    args = parser.parse_args()
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="sg-screens-"))
    pki, idp = TestCA(work / "pki"), TestIdP(work / "idp")
    upstream, plain = FakeUpstream(pki.issue("api-upstream")), FakeUpstream()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = console_config(make_config(idp, upstream, plain), work, port)
    config["gateway"]["name"] = "gateway-eu-1"
    gw = Gateway(
        config,
        work / "gateway",
        upstream_ca=pki.cert_file,
        env={UPSTREAM_KEY_ENV: UPSTREAM_KEY, ADMIN_ENV: ADMIN_TOKEN},
    ).start()
    pool = concurrent.futures.ThreadPoolExecutor(4)
    try:

        def agent(subject: str, method: str, path: str, **kw: Any) -> httpx.Response:
            with gw.client(idp.mint(subject, ("agents",)), timeout=60) as client:
                return client.request(method, upstream.url(path), **kw)

        chat = {
            "model": "gpt-test",
            "messages": [{"role": "user", "content": f"post to {SLACK} and push with {PLANTED}"}],
        }
        agent("agent-alice", "POST", "/v1/chat/completions", json=chat)
        agent("agent-alice", "POST", "/v1/chat/completions", json={**chat, "stream": True})
        agent("agent-bob", "POST", "/v1/chat/completions", json={"model": "m", "messages": []})
        # Held: approved with a grant, denied, and one left pending for the screenshot.
        upload = pool.submit(agent, "agent-carol", "PUT", "/echo", json={"file": "release.tgz"})
        decide(base, wait_pending(base, 1)[0]["id"], "approve", "release week", 60)
        upload.result()
        wipe = pool.submit(agent, "agent-bob", "DELETE", "/echo?all=1")
        decide(base, wait_pending(base, 1)[0]["id"], "deny", "not on a Friday")
        wipe.result()
        note = f"rotate the deploy key {PLANTED} after the cleanup"
        held = pool.submit(
            agent,
            "agent-alice",
            "DELETE",
            "/echo",
            json={"path": "/srv/cache", "recursive": True, "note": note},
        )
        wait_pending(base, 1)

        out.mkdir(parents=True, exist_ok=True)
        with chromium() as context:
            page = context.new_page()
            page.set_viewport_size({"width": 1280, "height": 900})
            page.goto(f"{base}/console/signin")
            page.screenshot(path=str(out / "console-signin.png"))
            sign_in(page, base, ADMIN_TOKEN, "Ada")
            page.wait_for_url("**/console/approvals")
            page.wait_for_selector("li.approval")
            page.fill("li.approval input[name=reason]", "cache cleanup, ticket OPS-1234")
            page.screenshot(path=str(out / "console-approvals.png"), full_page=True)
            page.goto(f"{base}/console/activity")
            page.wait_for_selector("#activity tr[data-flow]")
            page.screenshot(path=str(out / "console-activity.png"), full_page=True)
            page.goto(f"{base}/console/sessions")
            page.screenshot(path=str(out / "console-sessions.png"), full_page=True)
            page.goto(f"{base}/console/activity?caller=agent-alice")
            page.click("#activity tr[data-flow]:has-text('chat/completions') a")
            page.wait_for_selector("#decision")
            page.screenshot(path=str(out / "console-flow.png"), full_page=True)
        decide(base, wait_pending(base, 1)[0]["id"], "deny", "screenshots done")
        held.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        gw.stop()
        upstream.close()
        plain.close()
    for name in sorted(out.glob("console-*.png")):
        print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
