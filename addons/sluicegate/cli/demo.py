"""`python -m sluicegate demo`: watch the gateway do its job, on the dev gateway's demo upstream.

Run it in the agent's environment while `scripts/dev.sh run` is up:

    . certs/agent/agent.env
    python -m sluicegate demo [--config config/dev.yaml]

It sends SDK-style requests (OpenAI Chat Completions and Anthropic Messages, buffered and
streamed) with freshly made fake secrets through the gateway (HTTPS_PROXY, the agent's token as
the proxy password, the agent's CA trust) to the demo upstream behind the config's `demo-*`
routes, and prints side by side what the agent sent, what the upstream received (as it echoes
it: the key the gateway injected, known only by its fingerprint, and the secrets redacted) and
what the agent got back (the upstream's own planted secret redacted, the injected key masked in
the echo), then where each flow was recorded. Exit code 0 when every request went through and
every check held, 1 otherwise (each failure says why), 2 when it cannot start.

The demo never reads or prints a credential: the agent side holds none, and the upstream reports
only a fingerprint of the key it was given. It reads the gateway config (same machine, dev only)
to find the demo routes and the recording directory.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import http.client
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import string
import sys
import textwrap
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "config" / "dev.yaml"
REQUEST_ID_HEADER = "x-sluicegate-request-id"
TAG = re.compile(r"\[REDACTED:[^\]]+\]|\[credential:[^\]]+\]")
PLANTED = re.compile(r"sk_live_[A-Za-z0-9]{24}")
TIMEOUT = 30.0


class DemoError(Exception):
    """Cannot run the demo at all (exit 2)."""


@dataclasses.dataclass
class Secrets:
    """Fake secrets, made fresh each run (published example values are never redacted)."""

    github: str
    aws_id: str
    aws_secret: str

    @classmethod
    def make(cls) -> Secrets:
        alnum = string.ascii_letters + string.digits
        return cls(
            github="ghp_" + "".join(secrets.choice(alnum) for _ in range(36)),
            aws_id="AKIA"
            + "".join(secrets.choice(string.ascii_uppercase + "234567") for _ in range(16)),
            aws_secret="".join(secrets.choice(alnum) for _ in range(40)),
        )

    def values(self) -> list[str]:
        return [self.github, self.aws_id, self.aws_secret]

    def prompt(self) -> str:
        return (
            f"Deploy with my GitHub token {self.github} and the AWS key "
            f"aws_access_key_id={self.aws_id} aws_secret_access_key={self.aws_secret}"
        )


@dataclasses.dataclass
class Endpoint:
    api: str  # "openai" | "anthropic"
    route: str
    host: str
    port: int
    path: str


@dataclasses.dataclass
class Outcome:
    title: str
    route: str
    status: int
    request_id: str
    sent_headers: dict[str, str]
    sent_text: str
    received: dict[str, Any] | None  # the upstream's echo, as it reached the agent
    reply: str
    error: str = ""
    problems: list[str] = dataclasses.field(default_factory=list)


# -- finding the pieces -------------------------------------------------------------------------


def endpoints(config: Any) -> list[Endpoint]:
    found = []
    for route in config.routes:
        if not route.name.startswith("demo"):
            continue
        prefix = route.path_prefix.rstrip("/")
        if prefix.startswith("/v1/chat"):
            found.append(
                Endpoint("openai", route.name, route.host, route.port, "/v1/chat/completions")
            )
        elif prefix.startswith("/v1/messages"):
            found.append(Endpoint("anthropic", route.name, route.host, route.port, "/v1/messages"))
    return found


def proxy_from_env() -> tuple[str, int, str | None]:
    """(host, port, token) of the gateway from the agent's environment (lower case wins)."""
    url = os.environ.get("https_proxy") or os.environ.get("HTTPS_PROXY")
    if not url:
        raise DemoError(
            "HTTPS_PROXY is not set: run the demo in the agent's environment "
            "(`. certs/agent/agent.env`, written by scripts/dev.sh run)"
        )
    parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    if not parts.hostname or not parts.port:
        raise DemoError(f"HTTPS_PROXY is not a proxy URL with a host and port: {parts.hostname}")
    token = urllib.parse.unquote(parts.password) if parts.password else None
    return parts.hostname, parts.port, token


# -- one request --------------------------------------------------------------------------------


def agent_request(ep: Endpoint, fake: Secrets, stream: bool) -> tuple[dict[str, str], bytes]:
    """Headers and body the way the official SDK sends them (a placeholder as its API key)."""
    text = fake.prompt()
    if ep.api == "openai":
        headers = {
            "authorization": "Bearer sk-placeholder-the-gateway-injects-the-real-key",
            "user-agent": "OpenAI/Python (sluicegate demo)",
        }
        body: dict[str, Any] = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": text}],
        }
    else:
        headers = {
            "x-api-key": "sk-ant-placeholder-the-gateway-injects-the-real-key",
            "anthropic-version": "2023-06-01",
            "user-agent": "Anthropic/Python (sluicegate demo)",
        }
        body = {
            "model": "claude-sonnet-4-5",
            "max_tokens": 256,
            "messages": [{"role": "user", "content": text}],
        }
    if stream:
        body["stream"] = True
    headers.update({"content-type": "application/json", "accept": "application/json"})
    return headers, json.dumps(body).encode()


def send(proxy: tuple[str, int, str | None], ep: Endpoint, fake: Secrets, stream: bool) -> Outcome:
    host, port, token = proxy
    headers, body = agent_request(ep, fake, stream)
    title = f"{'Anthropic Messages' if ep.api == 'anthropic' else 'OpenAI Chat Completions'}"
    title += ", streamed (SSE)" if stream else ", buffered"
    tunnel = {}
    if token:
        basic = base64.b64encode(f"agent:{token}".encode()).decode()
        tunnel["Proxy-Authorization"] = f"Basic {basic}"
    conn = http.client.HTTPSConnection(
        host, port, timeout=TIMEOUT, context=ssl.create_default_context()
    )
    conn.set_tunnel(ep.host, ep.port, headers=tunnel)
    shown = {
        k: ("Bearer <placeholder>" if k == "authorization" else "<placeholder>")
        if k in ("authorization", "x-api-key")
        else v
        for k, v in headers.items()
    }
    outcome = Outcome(title, ep.route, 0, "", shown, fake.prompt(), None, "")
    try:
        conn.request("POST", ep.path, body=body, headers=headers)
        response = conn.getresponse()
        outcome.status = response.status
        outcome.request_id = response.getheader(REQUEST_ID_HEADER, "")
        ctype = response.getheader("content-type", "")
        if response.status == 200 and ctype.startswith("text/event-stream"):
            read_stream(response, ep.api, outcome)
        else:
            read_whole(response.read(), ep.api, outcome)
    except OSError as e:
        outcome.error = explain_oserror(e, host, port)
    except http.client.HTTPException as e:
        outcome.error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return outcome


def explain_oserror(e: OSError, host: str, port: int) -> str:
    text = str(e)
    if isinstance(e, ConnectionRefusedError):
        return f"nothing listens at {host}:{port}: is `scripts/dev.sh run` up?"
    if "407" in text:
        return "the gateway refused the token (407): regenerate certs/agent/agent.env"
    if isinstance(e, ssl.SSLCertVerificationError):
        return (
            "this environment does not trust the gateway's CA: source certs/agent/agent.env "
            f"({e.verify_message})"
        )
    if isinstance(e, socket.timeout | TimeoutError):
        return "timed out waiting for the gateway"
    return f"{type(e).__name__}: {text}"


def read_whole(raw: bytes, api: str, outcome: Outcome) -> None:
    try:
        payload = json.loads(raw)
    except ValueError:
        outcome.error = f"HTTP {outcome.status}, not JSON: {raw[:200]!r}"
        return
    if outcome.status != 200 or "error" in payload:
        err = payload.get("error", {}) if isinstance(payload, dict) else {}
        outcome.error = (
            f"HTTP {outcome.status} {err.get('code', '')}: {err.get('message', raw[:200])}"
        )
        return
    outcome.received = payload.get("sluicegate_demo")
    if api == "openai":
        outcome.reply = payload["choices"][0]["message"]["content"]
    else:
        outcome.reply = "".join(b.get("text", "") for b in payload.get("content", []))


def read_stream(response: http.client.HTTPResponse, api: str, outcome: Outcome) -> None:
    event, texts = "", []
    for raw in response:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line.startswith("event:"):
            event = line[6:].strip()
            continue
        if not line.startswith("data:"):
            if not line:
                event = ""
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            continue
        payload = json.loads(data)
        if event == "error" or payload.get("type") == "error":
            err = payload.get("error", {})
            outcome.error = f"stream cut by the gateway: {err.get('code')}: {err.get('message')}"
            return
        if api == "openai":
            if "sluicegate_demo" in payload:
                outcome.received = payload["sluicegate_demo"]
            for choice in payload.get("choices", []):
                texts.append(choice.get("delta", {}).get("content") or "")
        elif payload.get("type") == "message_start":
            outcome.received = payload["message"].get("sluicegate_demo")
        elif payload.get("type") == "content_block_delta":
            texts.append(payload["delta"].get("text", ""))
    outcome.reply = "".join(texts)


# -- what it shows ------------------------------------------------------------------------------


def check(outcome: Outcome, fake: Secrets) -> None:
    """What the demo claims, verified on what came back."""
    p = outcome.problems
    if outcome.error:
        p.append(outcome.error)
        return
    received = outcome.received or {}
    echoed = json.dumps(received)
    if any(v in echoed for v in fake.values()):
        p.append("a planted secret reached the upstream unredacted")
    if "[REDACTED:" not in json.dumps(received.get("received", {}).get("body")):
        p.append("the upstream did not receive a redacted body")
    credential = received.get("credential")
    if not credential:
        p.append("the upstream received no credential: the gateway injected none")
    else:
        header = received.get("received", {}).get("headers", {}).get(credential["header"], "")
        if "placeholder" in header or not TAG.search(header):
            p.append("the injected credential's echo was not masked on its way back")
    if PLANTED.search(outcome.reply) or "[REDACTED:" not in outcome.reply:
        p.append("the upstream's planted secret was not redacted in the reply")
    if not outcome.request_id:
        p.append(f"the answer carries no {REQUEST_ID_HEADER}")


def columns(cells: Sequence[tuple[str, str, str]], width: int) -> str:
    col = max(24, (width - 6) // 3)
    out = []
    for a, b, c in cells:
        wrapped = [textwrap.wrap(x, col, break_long_words=True) or [""] for x in (a, b, c)]
        for i in range(max(len(w) for w in wrapped)):
            parts = [(w[i] if i < len(w) else "").ljust(col) for w in wrapped]
            out.append(" | ".join(parts).rstrip())
        out.append("-" * min(width, col * 3 + 6))
    return "\n".join(out)


def show(outcome: Outcome, width: int) -> str:
    head = f"{outcome.title} via route {outcome.route}: HTTP {outcome.status}"
    if outcome.request_id:
        head += f", request id {outcome.request_id}"
    lines = [head, "=" * min(width, len(head))]
    if outcome.error:
        lines.append(f"  FAILED: {outcome.error}")
        return "\n".join(lines)
    received = outcome.received or {}
    got = received.get("received", {})
    credential = received.get("credential") or {}
    name = credential.get("header", "authorization")
    sent_key = outcome.sent_headers.get(name, "(none)")
    upstream_key = (
        f"{name}: a {credential.get('length')}-character key, sha256 {credential.get('sha256')}..."
        " (injected by the gateway from its own secret store)"
        if credential
        else "(no credential)"
    )
    echoed_key = f"{name}: {got.get('headers', {}).get(name, '(none)')} (the echo, masked)"
    body = got.get("body") or {}
    upstream_text = ""
    if isinstance(body, dict):
        messages = body.get("messages") or [{}]
        upstream_text = str(messages[-1].get("content", ""))
    cells = [
        ("AGENT SENT", "UPSTREAM RECEIVED", "AGENT GOT BACK"),
        (f"{name}: {sent_key}", upstream_key, echoed_key),
        (outcome.sent_text, upstream_text, outcome.reply),
    ]
    lines.append(columns(cells, width))
    for problem in outcome.problems:
        lines.append(f"  FAILED: {problem}")
    return "\n".join(lines)


def recorded(config: Any, request_ids: Sequence[str], wait: float = 3.0) -> dict[str, str]:
    """request id -> the session file holding its flow, from the audit log."""
    section = config.recording
    if section is None or not request_ids:
        return {}
    log = section.audit_log_path
    found: dict[str, str] = {}
    deadline = time.monotonic() + wait
    while True:
        try:
            text = log.read_text(encoding="utf-8")
        except OSError:
            text = ""
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            rid = entry.get("request_id") or entry.get("flow_id")
            if rid in request_ids and entry.get("session"):
                found[rid] = str(section.directory / entry["session"])
        if len(found) == len(set(request_ids)) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sluicegate demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("SLUICEGATE_CONFIG") or DEFAULT_CONFIG),
        help="the dev gateway's config (default: config/dev.yaml of this checkout)",
    )
    parser.add_argument("--width", type=int, help="output width (default: the terminal's, >= 100)")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    from sluicegate import config as config_mod

    try:
        config = config_mod.load_config(args.config)
        eps = endpoints(config)
        if not eps:
            raise DemoError(f"{args.config} has no demo-* route (see config/dev.yaml)")
        proxy = proxy_from_env()
    except config_mod.ConfigError as e:
        print(f"error: {args.config}: {e}", file=sys.stderr)
        return 2
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = args.width or max(100, shutil.get_terminal_size((120, 40)).columns)
    fake = Secrets.make()
    print(
        f"Sending requests with fake secrets through the gateway at {proxy[0]}:{proxy[1]} "
        f"to the demo upstream at {eps[0].host}:{eps[0].port}.\n"
    )
    outcomes = []
    for ep in eps:
        for stream in (False, True):
            outcome = send(proxy, ep, fake, stream)
            check(outcome, fake)
            outcomes.append(outcome)
            print(show(outcome, width) + "\n")
    ids = [o.request_id for o in outcomes if o.request_id]
    sessions = recorded(config, ids)
    if sessions:
        print("Recorded (as the agent saw it, secrets masked, signed):")
        for rid in ids:
            if rid in sessions:
                print(f"  {rid}  {sessions[rid]}")
        first = next(iter(sessions.values()))
        print(
            f"\nOpen it:    mitmweb -n -r {first}\n"
            f"Forensics:  python -m sluicegate sessions show {ids[0]} --config {args.config}\n"
            f"Verify:     python -m sluicegate sessions verify --config {args.config}"
        )
    elif config.recording is None:
        print("Not recorded: the config has no `recording:` section.")
    failed = [o for o in outcomes if o.problems]
    if ids and not sessions and config.recording is not None:
        print(f"FAILED: no audit line for these flows in {config.recording.audit_log_path}")
        return 1
    if failed:
        print(f"\nFAILED: {len(failed)} of {len(outcomes)} requests did not show what they should.")
        return 1
    print(
        "\nEvery request: the key injected by the gateway (the agent never held it), the agent's "
        "secrets redacted before they left, the upstream's secret redacted before the agent saw "
        "it, and the flow recorded."
    )
    return 0
