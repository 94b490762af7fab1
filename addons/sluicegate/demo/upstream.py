"""A local demo upstream: OpenAI Chat Completions and Anthropic Messages, buffered and SSE.

It answers like the real APIs (so SDKs parse the answers) and echoes what it received: every
request header (the gateway masks the injected key in the echo on its way back, which is the
point), the request body as it arrived (secrets already redacted by the gateway), a fingerprint of
the credential it was given (so the demo can show a key was injected without anyone seeing it),
and a reply that plants a fresh fake secret of its own (redacted before the agent sees it).

    POST /v1/chat/completions   OpenAI shape (`"stream": true` for SSE)
    POST /v1/messages           Anthropic shape (`"stream": true` for SSE)

HTTP/1.1 over TLS on a loopback port, keep-alive, asyncio, no dependencies; the dev gateway runs
it in its own process (`mitm/demo.py`). Not a server to expose: it exists for the demo.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import ssl
import string
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

logger = logging.getLogger("sluicegate.demo")

MAX_HEAD = 32 * 1024
MAX_BODY = 1024 * 1024
DELTA_CHARS = 12  # SSE text deltas are this short, so a planted secret spans several events
PACE_SECONDS = 0.01


def planted_secret() -> str:
    """A fresh Stripe-shaped live key, random each time (a fixed example would be allowlisted)."""
    alphabet = string.ascii_letters + string.digits
    return "sk_live_" + "".join(secrets.choice(alphabet) for _ in range(24))


def credential_of(headers: dict[str, str]) -> dict[str, Any] | None:
    """Which credential the upstream was given, as a fingerprint: never the value itself."""
    for name in ("authorization", "x-api-key"):
        value = headers.get(name)
        if value:
            secret = value.split(" ", 1)[1] if value.lower().startswith("bearer ") else value
            digest = hashlib.sha256(secret.encode()).hexdigest()[:12]
            return {"header": name, "length": len(secret), "sha256": digest}
    return None


def _last_user_text(body: Any) -> str:
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(
                    str(part.get("text", "")) for part in content if isinstance(part, dict)
                )
    return ""


def reply_text(body: Any) -> str:
    return (
        f"You wrote: «{_last_user_text(body)}» Here is a key of my own, "
        f"keep it safe: {planted_secret()} (end of demo reply)"
    )


class Exchange:
    """One request as the upstream received it, and what it answers."""

    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        self.method, self.path, self.headers, self.raw = method, path, headers, body
        try:
            self.body: Any = json.loads(body) if body else None
        except ValueError:
            self.body = body.decode("utf-8", "replace")
        self.model = self.body.get("model", "demo") if isinstance(self.body, dict) else "demo"
        self.stream = isinstance(self.body, dict) and self.body.get("stream") is True

    def echo(self) -> dict[str, Any]:
        return {
            "received": {
                "method": self.method,
                "path": self.path,
                "headers": self.headers,
                "body": self.body,
            },
            "credential": credential_of(self.headers),
        }


def openai_buffered(ex: Exchange) -> dict[str, Any]:
    text = reply_text(ex.body)
    return {
        "id": "chatcmpl-demo-" + secrets.token_hex(6),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": ex.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": len(ex.raw) // 4, "completion_tokens": len(text) // 4},
        "sluicegate_demo": ex.echo(),
    }


def anthropic_buffered(ex: Exchange) -> dict[str, Any]:
    text = reply_text(ex.body)
    return {
        "id": "msg_demo_" + secrets.token_hex(6),
        "type": "message",
        "role": "assistant",
        "model": ex.model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": len(ex.raw) // 4, "output_tokens": len(text) // 4},
        "sluicegate_demo": ex.echo(),
    }


def _pieces(text: str) -> list[str]:
    return [text[i : i + DELTA_CHARS] for i in range(0, len(text), DELTA_CHARS)]


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"{head}data: {payload}\n\n".encode()


def openai_events(ex: Exchange) -> list[bytes]:
    base = {
        "id": "chatcmpl-demo-" + secrets.token_hex(6),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": ex.model,
    }

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return _sse({**base, "choices": [choice], **extra})

    events = [chunk({"role": "assistant", "content": ""}, sluicegate_demo=ex.echo())]
    events += [chunk({"content": piece}) for piece in _pieces(reply_text(ex.body))]
    events += [chunk({}, "stop"), _sse("[DONE]")]
    return events


def anthropic_events(ex: Exchange) -> list[bytes]:
    text = reply_text(ex.body)
    message: dict[str, Any] = {
        "id": "msg_demo_" + secrets.token_hex(6),
        "type": "message",
        "role": "assistant",
        "model": ex.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": len(ex.raw) // 4, "output_tokens": 0},
        "sluicegate_demo": ex.echo(),
    }
    events = [
        _sse({"type": "message_start", "message": message}, "message_start"),
        _sse(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            "content_block_start",
        ),
    ]
    events += [
        _sse(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}},
            "content_block_delta",
        )
        for p in _pieces(text)
    ]
    events += [
        _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": len(text) // 4},
            },
            "message_delta",
        ),
        _sse({"type": "message_stop"}, "message_stop"),
    ]
    return events


ENDPOINTS = {
    "/v1/chat/completions": (openai_buffered, openai_events),
    "/v1/messages": (anthropic_buffered, anthropic_events),
}


class DemoUpstream:
    """The demo server on `host:port` with the given certificate (a SAN for `host`)."""

    def __init__(self, host: str, port: int, certfile: Path, keyfile: Path) -> None:
        self.host, self.requested_port = host, port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(certfile, keyfile)
        self.context.set_alpn_protocols(["http/1.1"])
        self.port: int | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(
            self._connection, self.host, self.requested_port, ssl=self.context, limit=MAX_HEAD
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except ssl.SSLError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = ([*lines[0].split(" "), "", "", ""])[:3]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or "0")
        if length > MAX_BODY:
            await self._whole(writer, 413, {"error": {"message": "demo: body too large"}})
            return False
        body = await reader.readexactly(length) if length else b""
        ex = Exchange(method, target, headers, body)
        handlers = ENDPOINTS.get(target.split("?", 1)[0])
        if handlers is None or method != "POST":
            await self._whole(
                writer,
                404,
                {"error": {"message": f"demo upstream: no {method} {target}", "type": "demo"}},
            )
        elif ex.stream:
            await self._streamed(writer, _paced(handlers[1](ex)))
        else:
            await self._whole(writer, 200, handlers[0](ex))
        return headers.get("connection", "").lower() != "close"

    async def _whole(self, writer: asyncio.StreamWriter, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        head = (
            f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()

    async def _streamed(self, writer: asyncio.StreamWriter, events: AsyncIterator[bytes]) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        async for event in events:
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def _paced(events: list[bytes]) -> AsyncIterator[bytes]:
    for event in events:
        yield event
        await asyncio.sleep(PACE_SECONDS)
