"""Local upstreams on 127.0.0.1: a fake OpenAI / Anthropic compatible API that records what it got.

Tests assert on `upstream.received` to prove what left the gateway (the real key was injected, the
caller's token was not forwarded, a prompt was redacted, a blocked request never arrived), and steer
the answers through `upstream.script`.

Endpoints (any other path: 404, or a handler registered with `upstream.handle`):
- POST /v1/chat/completions   chat.completion, or chat.completion.chunk SSE with `stream: true`
- POST /v1/responses          Responses API object, or its SSE event sequence with `stream: true`
- POST /v1/messages           Anthropic Messages object, or its SSE events with `stream: true`
- ANY  /echo                  JSON of the request as received (method, path, headers, body)
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import re
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import brotli
import zstandard

from tests.support.pki import ServerCert


@dataclasses.dataclass
class Received:
    """One request as the upstream received it."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}

    def json(self) -> Any:
        return json.loads(self.body)

    def raw(self) -> bytes:
        """Everything received, for grepping: request line, headers and body."""
        head = f"{self.method} {self.path}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in self.headers)
        return head.encode("latin-1", "replace") + b"\r\n" + self.body


@dataclasses.dataclass
class Script:
    """How the fake model answers the next requests."""

    text: str = "Hello from the fake model."
    # Explicit stream pieces; default: the text split into word-sized tokens.
    deltas: list[str] | None = None
    # Tool call / function call arguments (JSON text), streamed as argument fragments.
    tool_arguments: str | None = None
    tool_deltas: list[str] | None = None
    # Put the credential the upstream received into the answer (as upstreams do in error messages).
    echo_credential: bool = False
    status: int = 200
    content_encoding: str | None = None  # gzip, deflate, br or zstd (streams flush per event)
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    event_delay: float = 0.0
    # Pause the stream after this many events until `release` is set (time-to-first-token tests).
    pause_after: int | None = None
    release: threading.Event = dataclasses.field(default_factory=threading.Event)
    model: str = "gpt-test"


def tokens_of(text: str) -> list[str]:
    """Split text into LLM-like tokens: words with their leading whitespace."""
    return re.findall(r"\s*\S+|\s+$", text) or [text]


Handler = Callable[["Responder", Received], None]


class Responder:
    """Writes a response on the handler's socket: whole bodies or a chunked stream."""

    def __init__(self, handler: http.server.BaseHTTPRequestHandler, script: Script) -> None:
        self._h = handler
        self.script = script
        self._compressor: Any = None

    def send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        all_headers = {"content-type": content_type, **self.script.headers, **(headers or {})}
        encoding = self.script.content_encoding
        if encoding is not None:
            body = compress(body, encoding)
            all_headers["content-encoding"] = encoding
        self._h.send_response(status)
        for k, v in all_headers.items():
            self._h.send_header(k, v)
        self._h.send_header("content-length", str(len(body)))
        self._h.end_headers()
        self._h.wfile.write(body)
        self._h.wfile.flush()

    def send_json(self, obj: Any, status: int | None = None, **kw: Any) -> None:
        self.send(status or self.script.status, json.dumps(obj).encode(), **kw)

    def start_stream(self, content_type: str = "text/event-stream") -> None:
        self._h.send_response(self.script.status)
        self._h.send_header("content-type", content_type)
        self._h.send_header("cache-control", "no-cache")
        for k, v in self.script.headers.items():
            self._h.send_header(k, v)
        encoding = self.script.content_encoding
        if encoding is not None:
            self._compressor = StreamCompressor(encoding)
            self._h.send_header("content-encoding", encoding)
        self._h.send_header("transfer-encoding", "chunked")
        self._h.end_headers()

    def write(self, data: bytes) -> None:
        if self._compressor is not None:
            data = self._compressor.compress(data)
        if data:
            self._h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self._h.wfile.flush()

    def end_stream(self) -> None:
        if self._compressor is not None:
            tail = self._compressor.finish()
            if tail:
                self._h.wfile.write(b"%x\r\n%s\r\n" % (len(tail), tail))
        self._h.wfile.write(b"0\r\n\r\n")
        self._h.wfile.flush()

    def stream_events(self, events: Iterable[bytes]) -> None:
        """Send SSE events one network chunk each, honouring the script's pacing."""
        self.start_stream()
        for i, event in enumerate(events):
            if self.script.pause_after is not None and i == self.script.pause_after:
                self.script.release.wait(timeout=30)
            self.write(event)
            if self.script.event_delay:
                time.sleep(self.script.event_delay)
        self.end_stream()


def compress(body: bytes, encoding: str) -> bytes:
    """Encode a whole body: gzip, deflate, br or zstd."""
    c = StreamCompressor(encoding)
    return c.compress(body) + c.finish()


class StreamCompressor:
    """Incremental encoder that flushes after every piece, so each SSE event is decodable at once
    (what real servers do for streams)."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        if encoding == "gzip":
            self._z = zlib.compressobj(wbits=31)
        elif encoding == "deflate":
            self._z = zlib.compressobj()
        elif encoding == "br":
            self._z = brotli.Compressor()
        elif encoding == "zstd":
            self._z = zstandard.ZstdCompressor().compressobj()
        else:
            raise ValueError(f"unsupported test encoding {encoding!r}")

    def compress(self, data: bytes) -> bytes:
        if self.encoding in ("gzip", "deflate"):
            return self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH)
        if self.encoding == "br":
            return self._z.process(data) + self._z.flush()
        return self._z.compress(data) + self._z.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def finish(self) -> bytes:
        if self.encoding == "br":
            return self._z.finish()
        return self._z.flush()


def sse(data: Any, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {payload}\n\n".encode()


class FakeUpstream:
    """A threaded HTTP/1.1 server (TLS when given a certificate) on 127.0.0.1, ephemeral port."""

    def __init__(self, cert: ServerCert | None = None) -> None:
        self.received: list[Received] = []
        self.script = Script()
        self._handlers: dict[tuple[str, str], Handler] = {}
        self._lock = threading.Lock()
        upstream = self

        class RequestHandler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def handle_one(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    body = self._read_chunked()
                else:
                    body = self.rfile.read(length) if length else b""
                got = Received(self.command, self.path, list(self.headers.items()), body)
                with upstream._lock:
                    upstream.received.append(got)
                    script = upstream.script
                responder = Responder(self, script)
                upstream._dispatch(responder, got)

            def _read_chunked(self) -> bytes:
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = handle_one

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
        self.server.daemon_threads = True
        self.tls = cert is not None
        if cert is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert.cert_file, cert.key_file)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{path}"

    def reset(self) -> None:
        with self._lock:
            self.received = []
            self.script.release.set()  # never leave a paused stream behind
            self.script = Script()
            self._handlers = {}

    def handle(self, method: str, path: str, handler: Handler) -> None:
        """Answer `method path` with a custom handler (cleared by reset)."""
        self._handlers[(method.upper(), path)] = handler

    def close(self) -> None:
        self.script.release.set()
        self.server.shutdown()
        self.server.server_close()

    # -- dispatch -------------------------------------------------------------------------

    def _dispatch(self, r: Responder, got: Received) -> None:
        path = got.path.split("?", 1)[0]
        handler = self._handlers.get((got.method, path))
        if handler is None:
            handler = {
                ("POST", "/v1/chat/completions"): chat_completions,
                ("POST", "/v1/responses"): responses,
                ("POST", "/v1/messages"): messages,
            }.get((got.method, path))
        if handler is None and path == "/echo":
            handler = echo
        if handler is None:
            r.send_json({"error": {"message": f"no such path {path}"}}, status=404)
            return
        handler(r, got)


def received_credential(got: Received) -> str:
    """The credential the upstream saw, as an upstream would echo it in an error message."""
    auth = got.header("authorization") or ""
    if auth.lower().startswith("bearer "):
        return auth[7:]
    return auth or got.header("x-api-key") or got.header("api-key") or ""


def answer_text(r: Responder, got: Received) -> str:
    text = r.script.text
    if r.script.echo_credential:
        text += f" Incorrect API key provided: {received_credential(got)}."
    return text


def pieces(r: Responder, got: Received) -> list[str]:
    if r.script.deltas is not None and not r.script.echo_credential:
        return list(r.script.deltas)
    return tokens_of(answer_text(r, got))


def tool_pieces(r: Responder) -> list[str]:
    if r.script.tool_deltas is not None:
        return list(r.script.tool_deltas)
    args = r.script.tool_arguments or ""
    return [args[i : i + 4] for i in range(0, len(args), 4)]


def echo(r: Responder, got: Received) -> None:
    r.send_json(
        {
            "method": got.method,
            "path": got.path,
            "headers": dict(got.headers),
            "body": got.body.decode("utf-8", "replace"),
        }
    )


def _wants_stream(got: Received) -> bool:
    try:
        return bool(got.json().get("stream"))
    except (ValueError, AttributeError):
        return False


def chat_completions(r: Responder, got: Received) -> None:
    created = int(time.time())
    base = {"id": "chatcmpl-test", "created": created, "model": r.script.model}
    if not _wants_stream(got):
        message: dict[str, Any] = {"role": "assistant", "content": answer_text(r, got)}
        finish = "stop"
        if r.script.tool_arguments is not None:
            message["tool_calls"] = [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "run", "arguments": r.script.tool_arguments},
                }
            ]
            finish = "tool_calls"
        r.send_json(
            {
                **base,
                "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
            }
        )
        return

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return sse({**base, "object": "chat.completion.chunk", "choices": [choice]})

    def events() -> Iterator[bytes]:
        yield chunk({"role": "assistant", "content": ""})
        for piece in pieces(r, got):
            yield chunk({"content": piece})
        finish = "stop"
        if r.script.tool_arguments is not None or r.script.tool_deltas is not None:
            finish = "tool_calls"
            start = {"index": 0, "id": "call_1", "type": "function"}
            yield chunk({"tool_calls": [{**start, "function": {"name": "run", "arguments": ""}}]})
            for piece in tool_pieces(r):
                yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        yield chunk({}, finish)
        yield b"data: [DONE]\n\n"

    r.stream_events(events())


def responses(r: Responder, got: Received) -> None:
    text = answer_text(r, got)
    message_item = {
        "id": "msg_1",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
    output: list[dict[str, Any]] = [message_item]
    has_tool = r.script.tool_arguments is not None or r.script.tool_deltas is not None
    arguments = r.script.tool_arguments or "".join(r.script.tool_deltas or [])
    call_item = {
        "id": "fc_1",
        "type": "function_call",
        "status": "completed",
        "call_id": "call_1",
        "name": "run",
        "arguments": arguments,
    }
    if has_tool:
        output.append(call_item)
    response = {
        "id": "resp_1",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": r.script.model,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12},
    }
    if not _wants_stream(got):
        r.send_json(response)
        return

    seq = iter(range(1_000_000))

    def ev(kind: str, **fields: Any) -> bytes:
        return sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

    def events() -> Iterator[bytes]:
        yield ev("response.created", response={**response, "status": "in_progress", "output": []})
        yield ev(
            "response.output_item.added",
            output_index=0,
            item={**message_item, "status": "in_progress", "content": []},
        )
        part = {"type": "output_text", "text": "", "annotations": []}
        ids = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
        yield ev("response.content_part.added", **ids, part=part)
        for piece in pieces(r, got):
            yield ev("response.output_text.delta", **ids, delta=piece)
        yield ev("response.output_text.done", **ids, text=text)
        yield ev("response.content_part.done", **ids, part={**part, "text": text})
        yield ev("response.output_item.done", output_index=0, item=message_item)
        if has_tool:
            yield ev(
                "response.output_item.added",
                output_index=1,
                item={**call_item, "status": "in_progress", "arguments": ""},
            )
            for piece in tool_pieces(r):
                yield ev(
                    "response.function_call_arguments.delta",
                    item_id="fc_1",
                    output_index=1,
                    delta=piece,
                )
            yield ev(
                "response.function_call_arguments.done",
                item_id="fc_1",
                output_index=1,
                arguments=arguments,
            )
            yield ev("response.output_item.done", output_index=1, item=call_item)
        yield ev("response.completed", response=response)

    r.stream_events(events())


def messages(r: Responder, got: Received) -> None:
    text = answer_text(r, got)
    has_tool = r.script.tool_arguments is not None or r.script.tool_deltas is not None
    arguments = r.script.tool_arguments or "".join(r.script.tool_deltas or [])
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if has_tool:
        content.append(
            {"type": "tool_use", "id": "toolu_1", "name": "run", "input": json.loads(arguments)}
        )
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": content,
        "stop_reason": "tool_use" if has_tool else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 5, "output_tokens": 7},
    }
    if not _wants_stream(got):
        r.send_json(message)
        return

    def ev(kind: str, **fields: Any) -> bytes:
        return sse({"type": kind, **fields}, event=kind)

    def events() -> Iterator[bytes]:
        yield ev(
            "message_start",
            message={**message, "content": [], "stop_reason": None, "usage": {"input_tokens": 5}},
        )
        yield ev("content_block_start", index=0, content_block={"type": "text", "text": ""})
        yield ev("ping")
        for piece in pieces(r, got):
            yield ev("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})
        yield ev("content_block_stop", index=0)
        if has_tool:
            block = {"type": "tool_use", "id": "toolu_1", "name": "run", "input": {}}
            yield ev("content_block_start", index=1, content_block=block)
            for piece in tool_pieces(r):
                delta = {"type": "input_json_delta", "partial_json": piece}
                yield ev("content_block_delta", index=1, delta=delta)
            yield ev("content_block_stop", index=1)
        yield ev(
            "message_delta",
            delta={"stop_reason": message["stop_reason"], "stop_sequence": None},
            usage={"output_tokens": 7},
        )
        yield ev("message_stop")

    r.stream_events(events())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
