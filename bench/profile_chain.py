"""Per-flow cost of each addon hook of the gateway chain, in process, without sockets.

    python -m bench profile_chain [--flows 2000] [--size 0] [--cprofile 30]

Loads the whole chain (addons/gateway.py's addons, in order) into a mitmproxy test master with a
full config (token auth, a route with an injected credential, the default rule pack both ways,
recording on), opens one proxy-authenticated tunnel and drives `--flows` small JSON chat flows
through every hook in mitmproxy's order (requestheaders, request, responseheaders, response),
timing each addon's hook. This is the part of the request path that is ours: the figures are
not diluted by TLS, sockets and mitmproxy's own work, and vary little between runs.

`--size N` makes the request and response message N characters long. `--cprofile K` prints the
K functions with the most own time, under cProfile (slower, but shows where inside a hook).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import cProfile
import inspect
import io
import json
import pstats
import runpy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "addons"), str(ROOT)]

from mitmproxy import http  # noqa: E402
from mitmproxy.test import taddons, tutils  # noqa: E402

from sluicegate.recording.chain import Signer  # noqa: E402
from tests.support.addon_harness import connect_flow, flow_to  # noqa: E402
from tests.support.tokens import TestIdP  # noqa: E402

HOOKS = ("requestheaders", "request", "responseheaders", "response")
PORT = 443
KEY_ENV = "PROFILE_UPSTREAM_KEY"
COUNTER = b"@@COUNTER@@"
PROSE = "The build runs the unit tests first, then the integration suite; retries back off. "


def chain() -> list[Any]:
    """A fresh instance of each addon of addons/gateway.py, in its order (the one definition)."""
    return list(runpy.run_path(str(ROOT / "addons" / "gateway.py"))["addons"])


def write_config(work: Path, idp: TestIdP) -> Path:
    import yaml

    key = work / "signing.pem"
    key.write_bytes(Signer.generate().private_pem())
    config = {
        "version": 1,
        "gateway": {"name": "profile", "environment": "development"},
        "auth": idp.auth_config(),
        "routes": [
            {
                "name": "openai",
                "host": "127.0.0.1",
                "port": PORT,
                "groups": ["agents"],
                "credential": {"env": KEY_ENV},
                "inject": {"header": "authorization", "template": "Bearer {secret}"},
            }
        ],
        "redaction": {"rules": [str(ROOT / "rules")]},
        "recording": {"directory": str(work / "recordings"), "signing_key": {"file": str(key)}},
    }
    path = work / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def bodies(size: int) -> tuple[bytes, bytes]:
    """Request and response templates; COUNTER makes each flow's question and answer new."""
    text = (PROSE * (size // len(PROSE) + 1))[:size] if size else "Summarise a proxy, briefly."
    text = COUNTER.decode() + " " + text
    request = {
        "model": "gpt-bench",
        "messages": [
            {"role": "system", "content": "You are a careful coding assistant."},
            {"role": "user", "content": text},
        ],
        "temperature": 0.2,
    }
    response = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
    }
    return json.dumps(request).encode(), json.dumps(response).encode()


class Driver:
    """Calls each hook on each addon in chain order, as mitmproxy does, timing each call."""

    def __init__(self, addons: list[Any]) -> None:
        self.addons = addons
        self.times: collections.Counter[str] = collections.Counter()
        self.flows = 0
        self.server: Any = None

    async def hook(self, name: str, flow: http.HTTPFlow, timed: bool = True) -> None:
        for addon in self.addons:
            fn = getattr(addon, name, None)
            if fn is None:
                continue
            start = time.perf_counter()
            result = fn(flow)
            if inspect.isawaitable(result):
                await result
            if timed:
                self.times[f"{type(addon).__name__}.{name}"] += time.perf_counter() - start

    async def flow(
        self, client: Any, request_body: bytes, response_body: bytes, timed: bool = True
    ) -> http.HTTPFlow:
        flow = flow_to(
            "127.0.0.1",
            PORT,
            client_conn=client,
            headers={
                "content-type": "application/json",
                "authorization": "Bearer sk-agent-placeholder",
            },
        )
        if self.server is None:
            self.server = flow.server_conn
        flow.server_conn = self.server  # one upstream connection, as in a keep-alive tunnel
        self.flows += 1
        number = b"%011d" % self.flows
        flow.request.content = request_body.replace(COUNTER, number)
        await self.hook("requestheaders", flow, timed)
        await self.hook("request", flow, timed)
        if flow.response is not None:
            raise SystemExit(f"flow refused: {flow.response.content!r}")
        flow.response = tutils.tresp(
            headers=http.Headers([(b"content-type", b"application/json")]), content=b""
        )
        flow.response.content = response_body.replace(COUNTER, number)
        await self.hook("responseheaders", flow, timed)
        await self.hook("response", flow, timed)
        return flow


async def drive(args: argparse.Namespace, driver: Driver, token: str) -> float:
    basic = base64.b64encode(f"agent:{token}".encode()).decode()
    connect = connect_flow("127.0.0.1", PORT, headers={"proxy-authorization": f"Basic {basic}"})
    await driver.hook("http_connect", connect, timed=False)
    if connect.response is not None:
        raise SystemExit(f"CONNECT refused: {connect.response.content!r}")
    request_body, response_body = bodies(args.size)
    for _ in range(20):
        await driver.flow(connect.client_conn, request_body, response_body, timed=False)
    profiler = cProfile.Profile() if args.cprofile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    for _ in range(args.flows):
        await driver.flow(connect.client_conn, request_body, response_body)
    if profiler:
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.cprofile)
        print(out.getvalue().split("\n", 6)[-1].strip())
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=2000)
    parser.add_argument("--size", type=int, default=0, help="message characters (0: short)")
    parser.add_argument("--cprofile", type=int, default=0, metavar="K")
    args = parser.parse_args(argv)
    os.environ[KEY_ENV] = "sk-profile-upstream-0123456789abcdefghijklmnop"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        idp = TestIdP(work / "idp")
        config = write_config(work, idp)
        addons = chain()
        with taddons.context(*addons) as tctx:
            for addon in addons:
                tctx.configure(addon, sluicegate_config=str(config))
            driver = Driver(addons)
            total = asyncio.run(drive(args, driver, idp.mint("profile-agent", ["agents"])))
            for addon in addons:
                addon.done()
    per_flow = total / args.flows * 1e6
    size = args.size or "short"
    print(f"{args.flows} flows, message {size}: {per_flow:.0f} µs per flow in hooks")
    for name, seconds in sorted(driver.times.items(), key=lambda kv: -kv[1]):
        micros = seconds / args.flows * 1e6
        if micros >= 1:
            print(f"  {micros:7.1f} µs  {name}")


if __name__ == "__main__":
    main()
