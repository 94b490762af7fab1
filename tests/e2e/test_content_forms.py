"""Forms and event bodies through a real gateway (mitmdump), with httpx and curl.

Form fields are key-addressed values of the one content model: a field named like a credential
is masked as the same JSON key would be, in URL-encoded bodies, multipart forms, query strings
and form-encoded answers (OAuth token endpoints answer that way). Clean forms and binary
uploads arrive byte-identical. A buffered text/event-stream body goes through the SSE engine,
and `redaction.disable` reaches every path. Every test greps what the upstream received and
what the agent got for the secrets.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, quote_plus, unquote_plus

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.support.gateway import Gateway
from tests.support.pki import TestCA as CA
from tests.support.rule_secrets import example
from tests.support.upstream import FakeUpstream, Received, Responder, sse
from tests.support.websocket import WsClient, WsUpstream, say, ws_connect

GITHUB = example("github-token").secret
PASSWORD = "Tr0ub4dor&3"
API_KEY = "9f8e7d6c5b4a39281706f5e4"
CLIENT_SECRET = "s3cr3t!x9"
SECRETS = (GITHUB, PASSWORD, API_KEY, CLIENT_SECRET)
ENCODED = tuple(quote_plus(s) for s in SECRETS)
FORM = "application/x-www-form-urlencoded"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4 + b"api_key=" + b"\xfe" * 9


def no_secret(data: bytes) -> None:
    """Neither a secret nor its URL-encoding is in `data` (a request as received, an answer)."""
    text = data.decode("latin-1")
    for secret, encoded in zip(SECRETS, ENCODED, strict=True):
        assert secret not in text and encoded not in text, secret
        assert secret not in unquote_plus(text), secret


def gateway_with(
    tmp: Path, pki: CA, base_config: dict, redaction: dict, ws: WsUpstream | None = None
) -> Gateway:
    config = copy.deepcopy(base_config)
    config["redaction"].update(redaction)
    if ws is not None:
        config["routes"].append(
            {
                "name": "realtime",
                "host": "127.0.0.1",
                "port": ws.port,
                "credential": {"env": UPSTREAM_KEY_ENV},
            }
        )
        config["websockets"] = {"routes": ["realtime"]}
    return Gateway(config, tmp, upstream_ca=pki.cert_file, env={UPSTREAM_KEY_ENV: UPSTREAM_KEY})


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, pki: CA, base_config: dict
) -> Iterator[Gateway]:
    gw = gateway_with(tmp_path_factory.mktemp("forms"), pki, base_config, {"binary_bodies": "pass"})
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture
def client(gateway: Gateway, token: str) -> Iterator[httpx.Client]:
    with gateway.client(token) as c:
        yield c


def received(upstream: FakeUpstream) -> Received:
    (got,) = upstream.received
    no_secret(got.raw())
    return got


def ok(handler_body: bytes = b"{}") -> object:
    return lambda r, got: r.send(200, handler_body)


# -- URL-encoded forms and query strings -------------------------------------------------------


def test_credential_fields_of_a_form_are_masked_and_the_rest_left_as_sent(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    upstream.handle("POST", "/v1/form", ok())
    body = (
        f"grant_type=client_credentials&client_secret={quote_plus(CLIENT_SECRET)}"
        f"&user%5Bpassword%5D={quote_plus(PASSWORD)}&note=use+{GITHUB}&scope=a%20b&x=%7e"
    ).encode()
    response = client.post(upstream.url("/v1/form"), content=body, headers={"content-type": FORM})
    assert response.status_code == 200, response.text
    got = received(upstream)
    fields = dict(parse_qsl(got.body.decode(), keep_blank_values=True))
    assert fields == {
        "grant_type": "client_credentials",
        "client_secret": "[REDACTED:key-secret]",
        "user[password]": "[REDACTED:key-password]",
        "note": "use [REDACTED:github-token]",
        "scope": "a b",
        "x": "~",
    }
    # Untouched pairs keep their spelling byte for byte.
    assert got.body.startswith(b"grant_type=client_credentials&")
    assert got.body.endswith(b"&scope=a%20b&x=%7e")


def test_a_clean_form_arrives_byte_identical(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.handle("POST", "/v1/form", ok())
    body = b"q=how+to+sort&page=2&empty=&flag&e=%C3%A9&raw=%e9&password=&max_tokens=1024"
    response = client.post(upstream.url("/v1/form"), content=body, headers={"content-type": FORM})
    assert response.status_code == 200, response.text
    assert received(upstream).body == body


def test_the_query_string_is_read_as_a_form(client: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.handle("GET", "/v1/search", ok())
    query = f"q=a+b&api_key={API_KEY}&auth%5Btoken%5D=abc123def456ghi789&page=2"
    response = client.get(upstream.url(f"/v1/search?{query}"))
    assert response.status_code == 200, response.text
    got = received(upstream)
    assert "abc123def456ghi789" not in got.path
    assert got.path == (
        "/v1/search?q=a+b&api_key=%5BREDACTED%3Akey-api-key%5D"
        "&auth%5Btoken%5D=%5BREDACTED%3Akey-token%5D&page=2"
    )


def test_a_form_encoded_answer_reaches_the_agent_masked(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    # OAuth token endpoints (GitHub's among them) answer form-encoded.
    answer = f"access_token={GITHUB}&scope=repo&token_type=bearer&refresh_token=r1a2b3c4d5e6f7"
    upstream.handle("POST", "/login/oauth/access_token", ok_form(answer.encode()))
    response = client.post(upstream.url("/login/oauth/access_token"), content=b"code=x")
    assert response.status_code == 200, response.text
    no_secret(response.content)
    assert b"r1a2b3c4d5e6f7" not in response.content
    fields = dict(parse_qsl(response.text))
    assert fields["scope"] == "repo" and fields["token_type"] == "bearer"
    assert fields["access_token"].startswith("[REDACTED:")
    assert fields["refresh_token"] == "[REDACTED:key-token]"


def ok_form(body: bytes) -> object:
    return lambda r, got: r.send(200, body, FORM)


# -- multipart --------------------------------------------------------------------------------


def test_curl_multipart_form_fields_are_masked_and_the_upload_is_byte_identical(
    gateway: Gateway, upstream: FakeUpstream, token: str, tmp_path: Path
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed on this machine")
    upstream.handle("POST", "/v1/files", ok())
    image = tmp_path / "shot.png"
    image.write_bytes(PNG)
    notes = tmp_path / "notes.txt"
    notes.write_text(f"deploy key {GITHUB}\n")
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-H",
            f"authorization: Bearer {token}",
            "-F",
            "purpose=assistants",
            "-F",
            f"api_key={API_KEY}",
            "-F",
            f"file=@{image};type=image/png",
            "-F",
            f"notes=@{notes};type=text/plain",
            upstream.url("/v1/files"),
        ],
        env=gateway.agent_env(),
        capture_output=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {}
    got = received(upstream)
    assert got.body.count(PNG) == 1  # the upload, every byte as curl sent it
    assert b'name="purpose"\r\n\r\nassistants\r\n' in got.body
    assert b'name="api_key"\r\n\r\n[REDACTED:key-api-key]\r\n' in got.body
    assert b"deploy key [REDACTED:github-token]\n" in got.body


def multipart(boundary: str, *parts: tuple[str, bytes]) -> bytes:
    out = b""
    for head, body in parts:
        out += f"--{boundary}\r\n{head}\r\n\r\n".encode() + body + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def test_a_clean_multipart_form_with_an_upload_arrives_byte_identical(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    upstream.handle("POST", "/v1/files", ok())
    boundary = "sgBoundary0x7e"
    disposition = "Content-Disposition: form-data; name="
    body = multipart(
        boundary,
        (disposition + '"purpose"', b"fine-tune"),
        (disposition + '"password"', b""),
        (disposition + '"file"; filename="a.png"\r\nContent-Type: image/png', PNG),
        (disposition + '"blob"; filename="b.bin"', PNG[::-1]),
    )
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    response = client.post(upstream.url("/v1/files"), content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert received(upstream).body == body


# -- event-stream bodies ------------------------------------------------------------------------


def chat(content: str) -> bytes:
    return sse({"id": "c", "choices": [{"index": 0, "delta": {"content": content}}]})


EVENTS = (
    chat("use ")
    + chat(GITHUB[:10])
    + chat(GITHUB[10:] + " now")
    + sse({"type": "status", "config": {"db_password": PASSWORD, "host": "db"}})
    + sse("[DONE]")
)


def test_a_buffered_event_stream_request_goes_through_the_sse_engine(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    upstream.handle("POST", "/v1/events", ok())
    headers = {"content-type": "text/event-stream"}
    response = client.post(upstream.url("/v1/events"), content=EVENTS, headers=headers)
    assert response.status_code == 200, response.text
    got = received(upstream)
    deltas = [
        json.loads(line[5:])["choices"][0]["delta"]["content"]
        for line in got.body.decode().splitlines()
        if line.startswith("data:") and '"choices"' in line
    ]
    assert "".join(deltas) == "use [REDACTED:github-token] now"
    assert b'"db_password":"[REDACTED:key-password]"' in got.body
    assert got.body.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize(
    ("body", "ctype", "code"),
    [
        (b"data: \xff\xfe\n\n", "text/event-stream", "sse_invalid_utf8"),
        (EVENTS, "text/event-stream; charset=utf-16", "charset_mismatch"),
        (EVENTS.decode().encode("utf-16"), "text/event-stream", "charset_mismatch"),
    ],
)
def test_event_stream_bodies_that_cannot_be_read_are_refused(
    client: httpx.Client, upstream: FakeUpstream, body: bytes, ctype: str, code: str
) -> None:
    response = client.post(
        upstream.url("/v1/events"), content=body, headers={"content-type": ctype}
    )
    assert response.status_code == 415
    assert response.json()["error"]["code"] == code
    assert upstream.received == []


def test_a_stream_declaring_utf16_is_refused_before_a_byte(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    def handler(r: Responder, got: Received) -> None:
        r.start_stream("text/event-stream; charset=utf-16")
        r.write(f"data: {GITHUB}\n\n".encode("utf-16-le"))
        r.end_stream()

    upstream.handle("POST", "/v1/wide", handler)
    response = client.post(upstream.url("/v1/wide"), json={})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "charset_mismatch"
    no_secret(response.content)
    assert GITHUB.encode("utf-16-le") not in response.content


# -- redaction.disable reaches every path ----------------------------------------------------------


@pytest.fixture(scope="module")
def realtime(pki: CA) -> Iterator[WsUpstream]:
    server = WsUpstream(pki.issue("ws-forms"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def disabled(
    tmp_path_factory: pytest.TempPathFactory, pki: CA, base_config: dict, realtime: WsUpstream
) -> Iterator[Gateway]:
    # generic-password too: text rules read `"password": "..."` as a keyword form.
    off = {"disable": ["key-password", "generic-password"]}
    gw = gateway_with(tmp_path_factory.mktemp("disabled"), pki, base_config, off, realtime)
    gw.start()
    yield gw
    gw.stop()


def test_disabled_rules_are_off_on_every_path(
    disabled: Gateway, upstream: FakeUpstream, realtime: WsUpstream, token: str
) -> None:
    """With key-password disabled, a password passes on every path; the GitHub token (still
    enabled) is masked on every path, so the test would see a path that ignores the config."""
    document = {"password": PASSWORD, "note": f"use {GITHUB}"}
    stream = [sse({"type": "status", "config": document}), chat(GITHUB[:8]), chat(GITHUB[8:])]
    upstream.handle("POST", "/v1/up", ok())
    upstream.handle("POST", "/v1/down", lambda r, got: r.stream_events(stream))
    upstream.handle("GET", "/v1/json", lambda r, got: r.send_json(document))
    password_part = multipart("b", ('Content-Disposition: form-data; name="password"', b"x"))
    uploads = [
        (json.dumps(document).encode(), "application/json"),
        (f"password={quote_plus(PASSWORD)}&note=use+{GITHUB}".encode(), FORM),
        (
            password_part.replace(b"\r\nx\r\n", b"\r\n" + PASSWORD.encode() + b"\r\n"),
            "multipart/form-data; boundary=b",
        ),
        (EVENTS, "text/event-stream"),
    ]
    with disabled.client(token) as c:
        for content, ctype in uploads:
            response = c.post(
                upstream.url("/v1/up"), content=content, headers={"content-type": ctype}
            )
            assert response.status_code == 200, response.text
        sent = [got.body for got in upstream.received]
        answers = [
            c.get(upstream.url("/v1/json")).content,
            c.post(upstream.url("/v1/down"), json={}).content,
        ]
    ws = ws_connect(disabled.port or 0, realtime, token, ca_file=str(disabled.ca_file))
    assert isinstance(ws, WsClient)
    with ws:
        ws.send(say(json.dumps(document)))
        down = ws.text()
        ws.send(json.dumps(document))
        ws.text()  # the upstream's echo: it has received the message
    up = realtime.received[-1]
    bodies = [*sent, *answers, up.encode(), down.encode()]
    for body in bodies:
        assert PASSWORD in unquote_plus(body.decode()), body
    # The GitHub token's rule is still on: every path that carried it masked it.
    carried = [body for body in bodies if body is not sent[2]]  # the multipart held no token
    for body in carried:
        assert "[REDACTED:github-token]" in unquote_plus(body.decode()), body
        assert GITHUB not in unquote_plus(body.decode()), body
