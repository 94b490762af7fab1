"""A fast asyncio HTTP/1.1 upstream for the gateway benchmarks (HTTPS with --cert/--key).

    python bench/upstream.py [--cert C --key K] [--port 0]

Prints `listening on PORT` once ready. One event loop, no per-request threads, canned answers
cached per size, so the upstream stays far cheaper than the proxies it is measured through (the
test suite's FakeUpstream is a threaded http.server: fine for tests, too slow for throughput).

Endpoints (keep-alive; request bodies by Content-Length or chunked):
- POST /v1/chat/completions[?size=N]  a chat.completion whose message has N characters (default
  40), starting with a counter so no two answers are the same text, whatever the request held;
- GET  /sse?n=N[&pace_us=P][&delta=D] N chat.completion.chunk events (one word each, or D
  characters of prose each; one chunked write per event, P microseconds apart), then
  `data: [DONE]`;
- GET  /stats                         connections accepted and requests served so far.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import ssl
from typing import Any
from urllib.parse import parse_qs

WORDS = "The quick brown fox jumps over the lazy dog while the build runs and the tests pass."
# Replaced by a per-response counter, so every answer is new text (as real answers are).
COUNTER = b"@@COUNTER@@"
_SIZE_CACHE: dict[int, bytes] = {}
_answers = 0


def completion(size: int) -> bytes:
    """A chat.completion body whose message content is `size` characters: a counter, then prose."""
    global _answers
    _answers += 1
    return _template(size).replace(COUNTER, b"%011d" % _answers, 1)


def _template(size: int) -> bytes:
    body = _SIZE_CACHE.get(size)
    if body is None:
        prose = (WORDS + " ") * (size // (len(WORDS) + 1) + 1)
        text = (COUNTER.decode() + " " + prose)[: max(size, len(COUNTER))]
        body = json.dumps(
            {
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
        ).encode()
        _SIZE_CACHE[size] = body
    return body


def chunk_event(content: str | None, *, role: bool = False, finish: str | None = None) -> bytes:
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
    if content is not None:
        delta["content"] = content
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "gpt-bench",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_WORD_EVENTS = [_chunk(chunk_event(" " + word)) for word in WORDS.split(" ")]
_FIRST = _chunk(chunk_event(None, role=True))
_LAST = _chunk(chunk_event(None, finish="stop")) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


async def _read_body(reader: asyncio.StreamReader, head: list[bytes]) -> bytes:
    length, chunked = 0, False
    for line in head[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if not chunked:
        return await reader.readexactly(length) if length else b""
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailers
            return b"".join(parts)
        parts.append((await reader.readexactly(size + 2))[:-2])


_DELTA_EVENTS: dict[int, list[bytes]] = {}


def _delta_events(size: int) -> list[bytes]:
    """Events whose deltas are `size` characters of prose (a few variants, so they differ)."""
    events = _DELTA_EVENTS.get(size)
    if events is None:
        prose = (WORDS + " ") * (size // (len(WORDS) + 1) + 2)
        events = [_chunk(chunk_event(prose[i : i + size])) for i in range(4)]
        _DELTA_EVENTS[size] = events
    return events


async def _sse(writer: asyncio.StreamWriter, n: int, pace: float, delta: int = 0) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
        b"transfer-encoding: chunked\r\n\r\n" + _FIRST
    )
    await writer.drain()
    events = _delta_events(delta) if delta else _WORD_EVENTS
    for i in range(n):
        if pace:
            await asyncio.sleep(pace)
        writer.write(events[i % len(events)])
        await writer.drain()
    writer.write(_LAST)
    await writer.drain()


STATS = {"connections": 0, "requests": 0}


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    STATS["connections"] += 1
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            try:
                head = (await reader.readuntil(b"\r\n\r\n"))[:-4].split(b"\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            method, target, _ = head[0].split(b" ", 2)
            await _read_body(reader, head)
            STATS["requests"] += 1
            path, _, query = target.decode("latin-1").partition("?")
            params = {k: int(v[0]) for k, v in parse_qs(query).items()}
            if path == "/sse":
                await _sse(
                    writer,
                    params.get("n", 10),
                    params.get("pace_us", 0) / 1e6,
                    params.get("delta", 0),
                )
                continue
            if path == "/v1/chat/completions" and method == b"POST":
                status, body = b"200 OK", completion(params.get("size", 40))
            elif path == "/stats":
                status, body = b"200 OK", json.dumps(STATS).encode()
            else:
                status, body = b"404 Not Found", b'{"error": "not found"}'
            writer.write(
                b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (status, len(body), body)
            )
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        return
    finally:
        writer.close()


async def serve(port: int, context: ssl.SSLContext | None) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=context, backlog=1024)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cert", help="server certificate (PEM); with --key: HTTPS")
    parser.add_argument("--key", help="server private key (PEM)")
    args = parser.parse_args(argv)
    context = None
    if args.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, context))


if __name__ == "__main__":
    main()
