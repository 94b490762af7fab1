"""Bodies a lenient reader sees differently from their label, through a real gateway.

Each test sends what an attacker (or a careless upstream) would: UTF-16/32 text with or without a
byte-order mark and with any label, JSON labelled text or form or followed by trailing data, two
Content-Type headers, base64 / quoted-printable multipart parts, and bodies the config passes
unredacted echoing the injected key. What crosses the gateway is read the way common parsers read
it (`json.loads(bytes)`, `raw_decode`, MIME decoding): the secret must not be there, or the message
is refused with the gateway's JSON error.
"""

from __future__ import annotations

import base64
import codecs
import json
import quopri
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import UPSTREAM_KEY, GatewayFactory
from tests.support.gateway import Gateway
from tests.support.rule_secrets import example
from tests.support.upstream import FakeUpstream, Received, Responder, compress

GITHUB = example("github-token")
TAG = "[REDACTED:github-token]"
SCRUB_TAG = "[REDACTED:injected-credential:openai]"
ESCAPED = GITHUB.secret.replace("_", "\\u005f")  # what a JSON reader decodes back to the secret


@pytest.fixture
def client(gateway: Gateway, token: str) -> Iterator[httpx.Client]:
    with gateway.client(token) as c:
        yield c


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


def reply(body: bytes, content_type: str | None, **headers: str):
    def handle(responder: Responder, got: Received) -> None:
        responder.send(200, body, content_type or "", headers=headers)

    return handle


def post(client: httpx.Client, upstream: FakeUpstream, body: bytes, headers) -> httpx.Response:
    return client.post(upstream.url("/echo"), content=body, headers=headers)


# -- UTF-16/32 ----------------------------------------------------------------------------------

WIDE = {
    "utf-16-bom": ("utf-16", codecs.BOM_UTF16_LE, "utf-16-le"),
    "utf-16-le": ("utf-16-le", b"", "utf-16-le"),
    "utf-16-be": ("utf-16-be", b"", "utf-16-be"),
    "utf-16-be-bom": ("utf-16-be", codecs.BOM_UTF16_BE, "utf-16-be"),
    "utf-32-bom": ("utf-32", codecs.BOM_UTF32_LE, "utf-32-le"),
    "utf-32-le": ("utf-32-le", b"", "utf-32-le"),
    "utf-32-be": ("utf-32-be", b"", "utf-32-be"),
}
LABELS = ["application/json", "matching", "application/json; charset=utf-8", "text/plain", None]


def wide_body(name: str) -> tuple[bytes, str, str]:
    label, bom, codec = WIDE[name]
    document = json.dumps({"messages": [{"role": "user", "content": f"fix {GITHUB.text}"}]})
    return bom + document.encode(codec), label, codec


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("name", list(WIDE))
def test_wide_request_bodies_are_redacted_in_their_encoding(
    client: httpx.Client, upstream: FakeUpstream, name: str, label: str | None
) -> None:
    body, charset, codec = wide_body(name)
    content_type = f"application/json; charset={charset}" if label == "matching" else label
    headers = {"content-type": content_type} if content_type else {}
    response = post(client, upstream, body, headers)
    assert response.status_code == 200, response.text
    (got,) = upstream.received
    assert GITHUB.secret.encode(codec) not in got.body
    document = json.loads(got.body)  # what Python (and most JSON readers) make of the bytes
    assert TAG in document["messages"][0]["content"]
    assert GITHUB.secret not in json.dumps(document)
    assert got.body.startswith(WIDE[name][1])  # written back as it came: mark and encoding


@pytest.mark.parametrize("name", ["utf-16-bom", "utf-16-be", "utf-32-le"])
def test_wide_response_bodies_are_redacted(
    client: httpx.Client, upstream: FakeUpstream, name: str
) -> None:
    body, _, _ = wide_body(name)
    upstream.handle("GET", "/wide", reply(body, "application/json; charset=utf-8"))
    response = client.get(upstream.url("/wide"))
    assert response.status_code == 200, response.text
    document = json.loads(response.content)
    assert TAG in document["messages"][0]["content"]
    assert GITHUB.secret not in json.dumps(document)


def test_wide_text_that_only_another_reading_shows_is_refused(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    # Valid UTF-8 (no NUL in the first characters), but read as UTF-16 it is a secret.
    body = b"ab" + f" {GITHUB.text}".encode("utf-16-le")
    response = post(client, upstream, body, {"content-type": "text/plain; charset=utf-8"})
    assert (response.status_code, error_code(response)) == (415, "charset_mismatch")
    assert upstream.received == []


# -- JSON a lenient reader reads differently ----------------------------------------------------


def escaped_document(key: str = "content") -> str:
    return '{"' + key + '": "fix ' + ESCAPED + '"}'


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/json", None],
)
@pytest.mark.parametrize("trailing", ["", " trailing garbage", '\n{"next": 1}'])
def test_json_is_redacted_as_json_whatever_the_label(
    client: httpx.Client, upstream: FakeUpstream, content_type: str | None, trailing: str
) -> None:
    body = (escaped_document() + trailing).encode()
    headers = {"content-type": content_type} if content_type else {}
    response = post(client, upstream, body, headers)
    assert response.status_code == 200, response.text
    (got,) = upstream.received
    first, _ = json.JSONDecoder().raw_decode(got.body.decode())  # a reader stopping after one
    assert first == {"content": f"fix {TAG}"}
    assert GITHUB.secret not in got.body.decode("unicode_escape")


def test_escaped_credential_field_in_text_is_masked(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    body = b'{"pass\\u0077ord": "Zq8#mWv2$Lr5tY"}'
    response = post(client, upstream, body, {"content-type": "text/plain"})
    assert response.status_code == 200, response.text
    (got,) = upstream.received
    assert json.loads(got.body) == {"password": "[REDACTED:key-password]"}


def test_json_in_a_response_labelled_text_is_redacted(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    upstream.handle("GET", "/doc", reply((escaped_document() + "\n").encode(), "text/plain"))
    response = client.get(upstream.url("/doc"))
    assert response.status_code == 200, response.text
    assert response.json() == {"content": f"fix {TAG}"}


def test_escapes_hiding_a_secret_in_text_are_redacted(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    body = f"console.log('clone with {ESCAPED}');\n".encode()  # JavaScript, not JSON
    response = post(client, upstream, body, {"content-type": "application/javascript"})
    assert response.status_code == 200, response.text
    (got,) = upstream.received
    text = got.body.decode()
    assert GITHUB.secret not in text.encode().decode("unicode_escape")  # as a JS reader sees it
    assert text.startswith("console.log('clone with [REDACTED:") and text.endswith("');\n")


@pytest.mark.parametrize(
    "content_types",
    [
        ["application/octet-stream", "application/json"],
        ["text/plain", "application/json"],
        ["application/octet-stream, application/json"],
    ],
)
def test_conflicting_content_types_are_refused(
    client: httpx.Client, upstream: FakeUpstream, content_types: list[str]
) -> None:
    headers = [("content-type", value) for value in content_types]
    response = post(client, upstream, escaped_document().encode(), headers)
    assert (response.status_code, error_code(response)) == (415, "conflicting_content_type")
    assert upstream.received == []


def test_conflicting_content_types_in_a_response_are_withheld(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    def handle(responder: Responder, got: Received) -> None:
        responder._h.send_response(200)
        responder._h.send_header("content-type", "application/octet-stream")
        responder._h.send_header("content-type", "application/json")
        body = escaped_document().encode()
        responder._h.send_header("content-length", str(len(body)))
        responder._h.end_headers()
        responder._h.wfile.write(body)

    upstream.handle("GET", "/two-types", handle)
    response = client.get(upstream.url("/two-types"))
    assert (response.status_code, error_code(response)) == (502, "conflicting_content_type")
    assert ESCAPED.encode() not in response.content


# -- multipart transfer encodings ---------------------------------------------------------------

BOUNDARY = "sg-boundary-1"


def multipart(parts: list[tuple[dict[str, str], bytes]]) -> bytes:
    out = b""
    for headers, data in parts:
        out += f"--{BOUNDARY}\r\n".encode()
        out += "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode() + b"\r\n"
        out += data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def parts_of(body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """What a MIME reader makes of each part: headers and the transfer-decoded body."""
    out = []
    for chunk in body.split(f"--{BOUNDARY}".encode())[1:-1]:
        head, _, data = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = dict(
            (k.strip().lower(), v.strip())
            for k, _, v in (line.partition(":") for line in head.decode().split("\r\n"))
        )
        data = data.removesuffix(b"\r\n")
        transfer = headers.get("content-transfer-encoding", "")
        if transfer == "base64":
            data = base64.b64decode(b"".join(data.split()))
        elif transfer == "quoted-printable":
            data = quopri.decodestring(data)
        out.append((headers, data))
    return out


@pytest.mark.parametrize("transfer", ["base64", "base64-lines", "quoted-printable"])
def test_transfer_encoded_multipart_parts_are_decoded_and_redacted(
    client: httpx.Client, upstream: FakeUpstream, transfer: str
) -> None:
    secret_text = f"notes\n{GITHUB.text}\n" * 3
    if transfer == "quoted-printable":
        encoded = quopri.encodestring(secret_text.encode())
    else:
        encoded = base64.b64encode(secret_text.encode())
        if transfer == "base64-lines":
            encoded = b"\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    name = transfer.removesuffix("-lines")
    body = multipart(
        [
            ({"content-disposition": 'form-data; name="plain"'}, b"hello"),
            (
                {
                    "content-disposition": 'form-data; name="notes"',
                    "content-type": "text/plain",
                    "content-transfer-encoding": name,
                },
                encoded,
            ),
        ]
    )
    content_type = f"multipart/form-data; boundary={BOUNDARY}"
    response = post(client, upstream, body, {"content-type": content_type})
    assert response.status_code == 200, response.text
    (got,) = upstream.received
    (_, plain), (headers, notes) = parts_of(got.body)
    assert plain == b"hello" and headers["content-transfer-encoding"] == name
    assert notes == secret_text.replace(GITHUB.secret, TAG).encode()
    assert base64.b64encode(GITHUB.secret.encode()[:30]) not in got.body


def test_unknown_transfer_encoding_and_bad_base64_are_refused(
    client: httpx.Client, upstream: FakeUpstream
) -> None:
    content_type = f"multipart/mixed; boundary={BOUNDARY}"
    for transfer, data in [("x-uuencode", b"begin 644 x"), ("base64", b"Z2hz!!notbase64")]:
        body = multipart([({"content-transfer-encoding": transfer}, data)])
        response = post(client, upstream, body, {"content-type": content_type})
        assert response.status_code == 415, response.text
        assert error_code(response) in ("multipart_transfer_encoding", "multipart_malformed")
    assert upstream.received == []


# -- bodies passed unredacted still lose the injected key --------------------------------------


@pytest.fixture
def passing(start_gateway: GatewayFactory, token: str) -> Iterator[httpx.Client]:
    def edit(cfg: dict) -> None:
        cfg["redaction"]["binary_bodies"] = "pass"
        cfg["redaction"]["unknown_content_types"] = "pass"

    gateway = start_gateway(edit)
    with gateway.client(token) as c:
        yield c


def echo_key_in(content_type: str, codec: str = "utf-8", encoding: str | None = None):
    """An upstream answering a binary body that quotes the key it was sent."""

    def handle(responder: Responder, got: Received) -> None:
        key = (got.header("authorization") or "").removeprefix("Bearer ")
        body = b"\x89BIN\x00\x01" + f"bad key {key}".encode(codec) + b"\x00\xff"
        headers = {}
        if encoding is not None:
            body = compress(body, encoding)
            headers["content-encoding"] = encoding
        responder.send(200, body, content_type, headers=headers)

    return handle


@pytest.mark.parametrize(
    ("content_type", "codec", "encoding"),
    [
        ("application/octet-stream", "utf-8", None),
        ("application/x-custom", "utf-8", None),
        ("image/png", "utf-16-le", None),
        ("application/octet-stream", "utf-8", "gzip"),
        ("application/x-custom", "utf-32-be", "br"),
    ],
)
def test_passed_bodies_never_carry_the_injected_key(
    passing: httpx.Client,
    upstream: FakeUpstream,
    content_type: str,
    codec: str,
    encoding: str | None,
) -> None:
    upstream.handle("GET", "/blob", echo_key_in(content_type, codec, encoding))
    response = passing.get(upstream.url("/blob"))
    assert response.status_code == 200, response.text
    (got,) = upstream.received
    assert got.header("authorization") == f"Bearer {UPSTREAM_KEY}"
    assert UPSTREAM_KEY.encode(codec) not in response.content
    assert SCRUB_TAG.encode(codec) in response.content
    assert response.content.startswith(b"\x89BIN\x00\x01")  # the rest is passed as it came


def test_compressed_data_holding_the_key_is_withheld(
    passing: httpx.Client, upstream: FakeUpstream
) -> None:
    def handle(responder: Responder, got: Received) -> None:
        key = (got.header("authorization") or "").removeprefix("Bearer ")
        responder.send(200, compress(f"bad key {key}".encode(), "gzip"), "application/gzip")

    upstream.handle("GET", "/archive.gz", handle)
    response = passing.get(upstream.url("/archive.gz"))
    assert (response.status_code, error_code(response)) == (502, "credential_in_compressed_body")


def test_passed_bodies_stay_byte_for_byte(passing: httpx.Client, upstream: FakeUpstream) -> None:
    blob = bytes(range(256)) * 4
    upstream.handle("GET", "/clean", reply(blob, "application/octet-stream"))
    response = passing.get(upstream.url("/clean"))
    assert response.status_code == 200 and response.content == blob


def test_json_in_a_passed_body_is_redacted(passing: httpx.Client, upstream: FakeUpstream) -> None:
    upstream.handle("GET", "/j", reply(escaped_document().encode(), "application/octet-stream"))
    response = passing.get(upstream.url("/j"))
    assert response.status_code == 200, response.text
    assert json.loads(response.content) == {"content": f"fix {TAG}"}


# -- a fake tag beside a secret ----------------------------------------------------------------

GH_TOKEN = "ghp_C3J27XDCG2LmlZGEONYlgCtjfIZ4SOcMz9CP"
AWS_LINE = "aws_secret_access_key = JwJGFLxgXXNyt7xURcdhvRJW7kQjU/Nd+dOX4D1Z"
AWS_SECRET = AWS_LINE.split(" = ")[1]
FAKED = [
    (f"{GH_TOKEN}[REDACTED:a]", GH_TOKEN),
    (f"[REDACTED:github-token]{GH_TOKEN}", GH_TOKEN),
    (f'password = "{AWS_SECRET}[REDACTED:a]"', AWS_SECRET),
    (f"{AWS_LINE}[REDACTED:x:0123abcd]", AWS_SECRET),
]


@pytest.mark.parametrize(("text", "secret"), FAKED)
def test_a_fake_tag_does_not_protect_a_secret_in_a_request(
    client: httpx.Client, upstream: FakeUpstream, text: str, secret: str
) -> None:
    response = client.post(upstream.url("/echo"), json={"content": f"see {text} here"})
    assert response.status_code == 200, response.text
    (got,) = upstream.received
    assert secret.encode() not in got.body and b"[REDACTED:" in got.body


@pytest.mark.parametrize(("text", "secret"), FAKED)
def test_a_fake_tag_does_not_protect_a_secret_in_a_response(
    client: httpx.Client, upstream: FakeUpstream, text: str, secret: str
) -> None:
    upstream.handle("GET", "/faked", reply(f"see {text}\n".encode(), "text/plain"))
    response = client.get(upstream.url("/faked"))
    assert response.status_code == 200, response.text
    assert secret not in response.text


@pytest.mark.parametrize(("text", "secret"), FAKED)
def test_a_fake_tag_does_not_protect_a_secret_in_a_stream(
    client: httpx.Client, upstream: FakeUpstream, text: str, secret: str
) -> None:
    full = f"see {text} here"
    upstream.script.deltas = [full[i : i + 3] for i in range(0, len(full), 3)]
    body = {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with client.stream("POST", upstream.url("/v1/chat/completions"), json=body) as response:
        assert response.status_code == 200
        streamed = response.read().decode()
    content = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in streamed.splitlines()
        if line.startswith("data: {")
    )
    assert secret not in content and "[REDACTED:" in content


# -- availability: one adversarial body does not stall other callers -----------------------------


@pytest.mark.parametrize("unit", ["pwd", "-----BEGIN RSA PRIVATE KEY-----\n"])
def test_a_small_request_completes_while_an_adversarial_body_is_redacted(
    gateway: Gateway, upstream: FakeUpstream, token: str, unit: str
) -> None:
    """Generous bounds (this is no benchmark, see scripts/bench_loop_lag.py): before the rules
    were linear and large bodies left the event loop, such a body held every caller for
    minutes on this machine."""
    import threading
    import time

    body = (unit * (64 * 1024 // len(unit) + 1))[: 64 * 1024].encode()
    outcome: dict[str, object] = {}

    def adversarial() -> None:
        with gateway.client(token) as c:
            start = time.monotonic()
            response = c.post(
                upstream.url("/echo"), content=body, headers={"content-type": "text/plain"},
                timeout=120,
            )  # fmt: skip
            outcome["status"] = response.status_code
            outcome["seconds"] = time.monotonic() - start

    worker = threading.Thread(target=adversarial)
    worker.start()
    time.sleep(0.3)  # the adversarial body is being read and redacted
    with gateway.client(token) as c:
        start = time.monotonic()
        small = c.post(upstream.url("/echo"), json={"content": "hello"}, timeout=60)
        small_seconds = time.monotonic() - start
    worker.join(timeout=120)
    assert small.status_code == 200
    assert small_seconds < 10, small_seconds
    assert outcome.get("status") == 200 and float(outcome["seconds"]) < 60, outcome  # type: ignore[arg-type]
