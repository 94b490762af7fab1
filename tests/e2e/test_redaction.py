"""Buffered-body redaction through a real gateway: what the upstream receives, what the agent sees.

Secrets are the default pack's own positive examples (tests/support/rule_secrets.py); every test
asserts the secret VALUE is gone from what crossed the gateway, not only that a tag appeared.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.support.gateway import Gateway
from tests.support.pki import TestCA as CA
from tests.support.rule_secrets import example
from tests.support.upstream import FakeUpstream, Received, Responder, compress

OPENAI = example("openai-api-key")
GITHUB = example("github-token")
SLACK = example("slack-bot-token")
AWS = example("aws-secret-access-key")
ENCODINGS = ["gzip", "deflate", "br", "zstd"]
SCRUB_TAG = "[REDACTED:injected-credential:openai]"
LIMIT = 64 * 1024
CHAT = "/v1/chat/completions"


def chat_request(text: str) -> dict:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": text}]}


def chat_answer(text: str) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-test",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
    }


def reply_raw(body: bytes, content_type: str = "application/json", **headers: str):
    """An upstream handler answering `body` exactly as given (no re-serialization)."""

    def handle(responder: Responder, got: Received) -> None:
        responder.send(200, body, content_type, headers=headers)

    return handle


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


def openai_client(gateway: Gateway, upstream: FakeUpstream, api_key: str) -> openai.OpenAI:
    """The openai SDK as an agent runs it: the caller's JWT is its API key."""
    http_client = httpx.Client(proxy=gateway.proxy_url(), verify=gateway.ssl_context(), timeout=20)
    return openai.OpenAI(
        api_key=api_key, base_url=f"{upstream.base_url}/v1", http_client=http_client, max_retries=0
    )


@pytest.fixture
def client(gateway: Gateway, token: str) -> Iterator[httpx.Client]:
    with gateway.client(token) as c:
        yield c


# -- requests ---------------------------------------------------------------------------------


def test_json_request_reaches_upstream_with_tags_only(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    response = client.post(upstream.url(CHAT), json=chat_request(f"fix {OPENAI.text}\n{AWS.text}"))
    assert response.status_code == 200, response.text
    (got,) = upstream.received
    assert OPENAI.secret.encode() not in got.raw() and AWS.secret.encode() not in got.raw()
    content = got.json()["messages"][0]["content"]
    assert "[REDACTED:openai-api-key]" in content and "[REDACTED:aws-secret-access-key]" in content
    assert got.header("content-length") == str(len(got.body))


def test_text_request_is_redacted(client: httpx.Client, upstream: FakeUpstream) -> None:
    body = f"notes\n{SLACK.text}\nend\n".encode()
    response = client.post(
        upstream.url("/echo"), content=body, headers={"content-type": "text/plain"}
    )
    assert response.status_code == 200
    (got,) = upstream.received
    assert got.body == body.replace(SLACK.secret.encode(), b"[REDACTED:slack-bot-token]")


@pytest.mark.parametrize("encoding", [*ENCODINGS, "gzip, br"])
def test_compressed_request_leaves_decoded_and_redacted(
    client: httpx.Client, upstream: FakeUpstream, encoding: str
) -> None:
    body = json.dumps(chat_request(f"key {GITHUB.text}")).encode()
    for coding in encoding.split(", "):
        body = compress(body, coding)
    response = client.post(
        upstream.url(CHAT),
        content=body,
        headers={"content-type": "application/json", "content-encoding": encoding},
    )
    assert response.status_code == 200, response.text
    (got,) = upstream.received
    assert got.header("content-encoding") is None
    assert GITHUB.secret.encode() not in got.body
    assert "[REDACTED:github-token]" in got.json()["messages"][0]["content"]


def test_escaped_json_and_duplicate_keys_in_a_request(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    escaped = OPENAI.text.replace("-", "\\u002d")
    slashed = AWS.text.replace("/", "\\/")
    body = f'{{"model": "m", "prompt": "{escaped}", "prompt": "{slashed}"}}'.encode()
    response = client.post(
        upstream.url("/echo"), content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200
    (got,) = upstream.received
    for form in (OPENAI.secret, escaped, AWS.secret, AWS.secret.replace("/", "\\/")):
        assert form.encode() not in got.body
    assert got.body.count(b'"prompt"') == 2  # both duplicates kept, both redacted


def test_tool_call_arguments_in_a_request(client: httpx.Client, upstream: FakeUpstream) -> None:
    arguments = json.dumps({"cmd": f"export {GITHUB.text}"})
    history = {
        "role": "assistant",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "run", "arguments": arguments}}
        ],
    }
    response = client.post(upstream.url(CHAT), json={"model": "m", "messages": [history]})
    assert response.status_code == 200
    (got,) = upstream.received
    assert GITHUB.secret.encode() not in got.body
    sent = got.json()["messages"][0]["tool_calls"][0]["function"]["arguments"]
    assert "[REDACTED:github-token]" in json.loads(sent)["cmd"]


def test_form_request_is_redacted(client: httpx.Client, upstream: FakeUpstream) -> None:
    response = client.post(
        upstream.url("/echo"), data={"prompt": SLACK.text, "password": "hunter2-hunter2"}
    )
    assert response.status_code == 200
    (got,) = upstream.received
    assert SLACK.secret.encode() not in got.body and b"hunter2-hunter2" not in got.body
    assert got.body.startswith(b"prompt=")


def test_query_string_secret_is_redacted(client: httpx.Client, upstream: FakeUpstream) -> None:
    response = client.get(upstream.url("/echo"), params={"q": GITHUB.text, "n": "2"})
    assert response.status_code == 200
    (got,) = upstream.received
    assert GITHUB.secret not in got.path
    assert got.path.startswith("/echo?q=") and got.path.endswith("&n=2")
    assert "%5BREDACTED%3Agithub-token%5D" in got.path


@pytest.mark.parametrize(
    ("body", "encoding", "status", "code"),
    [
        (b"anything", "xz", 415, "unsupported_content_encoding"),
        (compress(b'{"a": 1}', "gzip")[:-5], "gzip", 400, "content_decode_failed"),
    ],
    ids=["xz", "corrupt-gzip"],
)
def test_undecodable_request_is_refused(
    client: httpx.Client, upstream: FakeUpstream, body: bytes, encoding: str, status: int, code: str
) -> None:
    response = client.post(
        upstream.url(CHAT),
        content=body,
        headers={"content-type": "application/json", "content-encoding": encoding},
    )
    assert (response.status_code, error_code(response)) == (status, code)
    assert upstream.received == []


def test_binary_request_is_refused(client: httpx.Client, upstream: FakeUpstream) -> None:
    response = client.post(
        upstream.url("/echo"), content=b"\x00\x01" + OPENAI.text.encode(),
        headers={"content-type": "application/octet-stream"},
    )  # fmt: skip
    assert (response.status_code, error_code(response)) == (415, "binary_body_blocked")
    assert upstream.received == []


# -- responses --------------------------------------------------------------------------------


def test_json_response_reaches_the_agent_with_tags_only(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    upstream.script.text = f"Use {SLACK.text} for the bot."
    response = client.post(upstream.url(CHAT), json=chat_request("hi"))
    assert response.status_code == 200
    assert SLACK.secret.encode() not in response.content
    content = response.json()["choices"][0]["message"]["content"]
    assert content == "Use SLACK_BOT_TOKEN=[REDACTED:slack-bot-token] for the bot."


def test_text_response_is_redacted(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.handle("GET", "/notes", reply_raw(f"a\n{GITHUB.text}\n".encode(), "text/plain"))
    response = client.get(upstream.url("/notes"))
    assert response.status_code == 200
    assert response.text == f"a\n{GITHUB.text}\n".replace(GITHUB.secret, "[REDACTED:github-token]")


def test_chunked_compressed_response_is_redacted(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    def chunked(responder: Responder, got: Received) -> None:
        responder.start_stream("text/plain")
        for line in ("first\n", f"{GITHUB.text}\n", "last\n"):
            responder.write(line.encode())
        responder.end_stream()

    upstream.script.content_encoding = "br"
    upstream.handle("GET", "/log", chunked)
    response = client.get(upstream.url("/log"))
    assert response.status_code == 200
    expected = f"first\n{GITHUB.text}\nlast\n".replace(GITHUB.secret, "[REDACTED:github-token]")
    assert response.text == expected


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_compressed_response_reaches_the_agent_decoded_and_redacted(
    client: httpx.Client, upstream: FakeUpstream, encoding: str
) -> None:
    upstream.script.content_encoding = encoding
    upstream.script.text = f"here: {OPENAI.text}"
    response = client.post(upstream.url(CHAT), json=chat_request("hi"))
    assert response.status_code == 200
    assert "content-encoding" not in response.headers
    assert OPENAI.secret.encode() not in response.content
    assert "[REDACTED:openai-api-key]" in response.json()["choices"][0]["message"]["content"]


def test_escaped_json_and_duplicate_keys_in_a_response(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    escaped = OPENAI.text.replace("-", "\\u002d")
    slashed = AWS.text.replace("/", "\\/")
    body = f'{{"text": "{escaped}", "text": "{slashed}"}}'.encode()
    upstream.handle("GET", "/doc", reply_raw(body))
    response = client.get(upstream.url("/doc"))
    assert response.status_code == 200
    for form in (OPENAI.secret, escaped, AWS.secret, AWS.secret.replace("/", "\\/")):
        assert form.encode() not in response.content
    assert response.content.count(b'"text"') == 2


def test_tool_call_arguments_in_a_response(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.script.tool_arguments = json.dumps({"cmd": f"curl -H 'x: {GITHUB.text}'"})
    response = client.post(upstream.url(CHAT), json=chat_request("run it"))
    assert response.status_code == 200
    assert GITHUB.secret.encode() not in response.content
    call = response.json()["choices"][0]["message"]["tool_calls"][0]
    assert "[REDACTED:github-token]" in json.loads(call["function"]["arguments"])["cmd"]


@pytest.mark.parametrize(
    ("body", "encoding", "code"),
    [
        (b"UPSTREAM-BODY", "xz", "unsupported_content_encoding"),
        (compress(b"UPSTREAM-BODY " * 50, "gzip")[:-7], "gzip", "content_decode_failed"),
    ],
    ids=["xz", "corrupt-gzip"],
)
def test_undecodable_response_is_withheld(
    client: httpx.Client, upstream: FakeUpstream, body: bytes, encoding: str, code: str
) -> None:
    upstream.handle("GET", "/blob", reply_raw(body, **{"content-encoding": encoding}))
    response = client.get(upstream.url("/blob"))
    assert (response.status_code, error_code(response)) == (502, code)
    assert b"UPSTREAM-BODY" not in response.content


# -- echoes of the injected credential -------------------------------------------------------


def echo_key(encode: str):
    """An upstream quoting the key it received: JSON-escaped (`-` as \\u002d) or in base64."""

    def handle(responder: Responder, got: Received) -> None:
        key = (got.header("authorization") or "").removeprefix("Bearer ")
        if encode == "escaped":
            quoted = key.replace("-", "\\u002d")
        else:
            quoted = "basic " + base64.b64encode(f"api:{key}".encode()).decode()
        text = json.dumps(chat_answer("placeholder")).replace("placeholder", f"bad key {quoted}")
        responder.send(200, text.encode())

    return handle


@pytest.mark.parametrize("form", ["plain", "gzip", "escaped", "base64"])
def test_echoed_injected_key_never_reaches_the_sdk(
    gateway: Gateway, upstream: FakeUpstream, token: str, form: str
) -> None:
    if form in ("plain", "gzip"):
        upstream.script.echo_credential = True
        upstream.script.content_encoding = "gzip" if form == "gzip" else None
    else:
        upstream.handle("POST", CHAT, echo_key(form))
    sdk = openai_client(gateway, upstream, token)
    raw = sdk.chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hello"}]
    )
    (got,) = upstream.received
    assert got.header("authorization") == f"Bearer {UPSTREAM_KEY}"  # the upstream had the key
    content = raw.parse().choices[0].message.content or ""
    assert SCRUB_TAG in content
    body = raw.http_response.content
    assert UPSTREAM_KEY.encode() not in body
    assert base64.b64encode(f"api:{UPSTREAM_KEY}".encode()) not in body
    assert UPSTREAM_KEY[:12] + "\\u002d" not in body.decode()


# -- a gateway with a small body limit and response redaction switched off ------------------


@pytest.fixture(scope="module")
def limited(
    tmp_path_factory: pytest.TempPathFactory, pki: CA, base_config: dict
) -> Iterator[Gateway]:
    """max_body_bytes 64 KiB; `redaction.responses: false` (scrubbing the key must still work)."""
    config = copy.deepcopy(base_config)
    config["gateway"]["max_body_bytes"] = LIMIT
    config["redaction"]["responses"] = False
    gw = Gateway(
        config,
        tmp_path_factory.mktemp("limited-gateway"),
        upstream_ca=pki.cert_file,
        env={UPSTREAM_KEY_ENV: UPSTREAM_KEY},
    )
    gw.start()
    yield gw
    gw.stop()


def too_big_requests() -> dict[str, tuple[bytes | Iterator[bytes], dict[str, str]]]:
    return {
        "declared": (b"a" * (LIMIT + 1), {}),
        "chunked": (iter([b"b" * 4096] * (LIMIT // 4096 + 1)), {}),
        "gzip-bomb": (compress(b" " * (LIMIT * 4), "gzip"), {"content-encoding": "gzip"}),
    }


@pytest.mark.parametrize("kind", ["declared", "chunked", "gzip-bomb"])
def test_oversize_request_is_refused(
    limited: Gateway, upstream: FakeUpstream, token: str, kind: str
) -> None:
    content, headers = too_big_requests()[kind]
    with limited.client(token) as c:
        response = c.post(
            upstream.url("/echo"),
            content=content,
            headers={"content-type": "text/plain", **headers},
        )
    assert (response.status_code, error_code(response)) == (413, "body_too_large")
    assert upstream.received == []


def oversize_reply(kind: str):
    def handle(responder: Responder, got: Received) -> None:
        if kind == "declared":
            responder.send(200, b"c" * (LIMIT + 1), "text/plain")
        elif kind == "chunked":
            responder.start_stream("text/plain")
            for _ in range(LIMIT // 4096 + 1):
                responder.write(b"d" * 4096)
            responder.end_stream()
        else:
            bomb = compress(b"e" * (LIMIT * 4), "gzip")
            responder.send(200, bomb, "text/plain", headers={"content-encoding": "gzip"})

    return handle


@pytest.mark.parametrize("kind", ["declared", "chunked", "gzip-bomb"])
def test_oversize_response_is_withheld(
    limited: Gateway, upstream: FakeUpstream, token: str, kind: str
) -> None:
    upstream.handle("GET", "/big", oversize_reply(kind))
    with limited.client(token) as c:
        response = c.get(upstream.url("/big"))
    assert (response.status_code, error_code(response)) == (502, "response_too_large")
    assert len(response.content) < 1024


def test_echo_is_scrubbed_with_response_redaction_off(
    limited: Gateway, upstream: FakeUpstream, token: str
) -> None:
    upstream.script.echo_credential = True
    upstream.script.text = f"also {GITHUB.text}"
    sdk = openai_client(limited, upstream, token)
    content = (
        sdk.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hello"}]
        )
        .choices[0]
        .message.content
        or ""
    )
    assert UPSTREAM_KEY not in content and SCRUB_TAG in content
    assert GITHUB.secret in content  # rules are off for responses; only the key is scrubbed


def test_huge_declared_body_is_refused_without_reading_it(gateway, upstream, token) -> None:
    """body_size_limit (set by the gateway) answers before a 1 GB body is read."""
    import socket
    import ssl

    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw:
        raw.sendall(
            f"CONNECT 127.0.0.1:{upstream.port} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{upstream.port}\r\n\r\n".encode()
        )
        assert b" 200 " in raw.recv(4096)
        with gateway.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.settimeout(10)
            tls.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                + f"authorization: Bearer {token}\r\n".encode()
                + b"content-type: application/json\r\ncontent-length: 1000000000\r\n\r\n{"
            )
            try:
                answer = tls.recv(4096)
            except (ssl.SSLError, OSError):
                answer = b""
    assert answer.startswith(b"HTTP/1.1 413"), answer[:80]
    assert upstream.received == []
