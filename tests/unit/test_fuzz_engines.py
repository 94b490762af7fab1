"""Hostile input for the engines that parse what agents and upstreams send: random bytes in.

Each property says the same three things: only the module's typed error ever escapes (no
IndexError, UnicodeError, RecursionError...), no secret passes unredacted, and an error never
carries the input. Examples are bounded; CI runs them derandomized (HYPOTHESIS_PROFILE=ci).
The same targets run unbounded under atheris in scripts/fuzz_engines.py.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import re
import zlib
from typing import Any

import brotli
import pytest
import zstandard
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sluicegate.auth.extract import token_from_inner_headers, token_from_proxy_authorization
from sluicegate.auth.keys import SharedSecretSource
from sluicegate.auth.verifier import TokenPolicy, TokenRejected, TokenVerifier
from sluicegate.redaction.bodies import BodyPolicy, BodyRefused, redact_body
from sluicegate.redaction.json_redact import JsonRedactionError, redact_json_text
from sluicegate.redaction.redactor import Redactor
from sluicegate.redaction.rules import Direction, load_rule_pack
from sluicegate.redaction.sse import SseRedactor
from sluicegate.shapes import decoding
from sluicegate.shapes.sse import SseError, SseParser
from tests.support.gateway import REPO

PACK = load_rule_pack([REPO / "rules"])
REDACTOR = Redactor(PACK, Direction.RESPONSE)
SECRET = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
MAX_HOLD = 4096
# The github-token rule matches a token standing on its own (not glued to a word character or
# `-`), so a glued occurrence is not a secret by the rule's own definition; only these count.
STANDALONE = re.compile(rf"(?<![\w-]){re.escape(SECRET)}(?![\w-])")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def unescaped_views(text: str) -> list[str]:
    """`text`, and every string inside it if it is JSON (nested JSON strings included)."""
    views = [text]
    try:
        value = json.loads(text)
    except ValueError:
        return views
    todo = [value]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            todo += list(node.keys()) + list(node.values())
        elif isinstance(node, list):
            todo += node
        elif isinstance(node, str):
            views.append(node)
            with contextlib.suppress(ValueError):
                todo.append(json.loads(node))
    return views


# -- SSE -------------------------------------------------------------------------------------------

SSE_BITS = st.sampled_from(
    [
        *(b"data: ", b"event: x\n", b": c\n", b"\n", b"\r\n", b"\r", b"\n\n", b"id: 1\n"),
        *(b'data: {"choices":[{"delta":{"content":"', b'"}}]}\n\n', b"data: [DONE]\n\n"),
        *(b"retry: x\n", b"\xef\xbb\xbf", b"\xff", b"\xc3", SECRET.encode(), SECRET[:10].encode()),
    ]
)
SSE_BYTES = st.lists(st.one_of(SSE_BITS, st.binary(max_size=12)), max_size=40).map(b"".join)
CUTS = st.lists(st.integers(min_value=0, max_value=2000), max_size=10)


@FUZZ
@given(data=SSE_BYTES, cuts=CUTS)
def test_the_sse_parser_only_raises_sse_errors_and_loses_nothing(data: bytes, cuts: list[int]):
    parser = SseParser(max_event_bytes=256)
    out = b""
    try:
        for piece in pieces(data, cuts):
            out += b"".join(event.raw for event in parser.feed(piece))
        out += b"".join(event.raw for event in parser.finish())
    except SseError as exc:
        assert SECRET not in str(exc)
        return
    assert out == data


@FUZZ
@given(data=SSE_BYTES, cuts=CUTS)
def test_the_sse_redactor_never_releases_a_secret(data: bytes, cuts: list[int]) -> None:
    sse = SseRedactor(lambda: REDACTOR.stream(MAX_HOLD), max_event_bytes=4096)
    out = b""
    try:
        for piece in pieces(data, cuts):
            out += sse.feed(piece)
        out += sse.finish()
    except SseError as exc:
        assert SECRET not in str(exc)
    text = out.decode("utf-8", "replace")
    for line in text.splitlines():
        value = line.partition(":")[2].strip()
        for view in unescaped_views(value):
            assert not STANDALONE.search(view), view


@pytest.mark.parametrize(
    "stream",
    [
        f"event: {SECRET}\ndata: x\n\n",
        f"id: {SECRET}\ndata: x\n\n",
        f"retry: {SECRET}\n\n",
        f"unknown: {SECRET}\n\n",
        f"{SECRET}\n\n",  # a field name alone
        f"{SECRET}: value\n\n",
        f"event: a {SECRET}\ndata: not json\n\n",  # held text is synthesized with the event name
    ],
)
def test_a_secret_in_any_sse_field_is_redacted(stream: str) -> None:
    """Regression (found by the property above): only data and comment lines were redacted."""
    sse = SseRedactor(lambda: REDACTOR.stream(MAX_HOLD))
    out = sse.feed(stream.encode()) + sse.finish()
    assert SECRET.encode() not in out
    assert b"[REDACTED:github-token]" in out
    assert sse.counts == {"github-token": 1}


# -- JSON and bodies -------------------------------------------------------------------------------

JSON_BITS = st.sampled_from(
    [
        *("{", "}", "[", "]", ",", ":", '"', '\\"', "\\u0067", "\\ud800", "\\/", "1e999", "-0"),
        *("null", '"k"', '"arguments"', '"api_key"', " ", "\n", f" {SECRET} ", SECRET[:12]),
        SECRET[12:],
    ]
)  # rules match a token standing on its own, so the whole secret comes with spaces around it
JSONISH = st.lists(st.one_of(JSON_BITS, st.text(max_size=6)), max_size=40).map("".join)


@FUZZ
@given(text=JSONISH)
def test_json_redaction_only_raises_its_error_and_leaves_no_secret(text: str) -> None:
    try:
        result = redact_json_text(text, REDACTOR)
    except JsonRedactionError as exc:
        assert SECRET not in str(exc)
        return
    for view in unescaped_views(result.text):
        assert not STANDALONE.search(view), view


CONTENT_TYPES = st.sampled_from(
    [
        *(None, "application/json", "text/plain; charset=utf-16", "text/plain; charset=nope"),
        *("application/x-www-form-urlencoded", "multipart/form-data; boundary=b", "image/png"),
        *("application/x-ndjson", "text/html; charset=latin-1", "application/weird"),
    ]
)


@FUZZ
@given(body=st.one_of(st.binary(max_size=300), JSONISH.map(str.encode)), content_type=CONTENT_TYPES)
def test_bodies_are_redacted_or_refused_with_a_code(body: bytes, content_type: str | None) -> None:
    for policy in (BodyPolicy(), BodyPolicy(binary="pass", unknown="pass")):
        try:
            result = redact_body(body, content_type, REDACTOR, policy)
        except BodyRefused as exc:
            assert exc.code and SECRET not in exc.message
            continue
        if result.kind in ("binary", "unknown"):
            continue  # passed on purpose by BodyPolicy(pass)
        for view in unescaped_views(result.body.decode("utf-8", "replace")):
            assert not STANDALONE.search(view), view


def test_a_form_field_name_with_a_secret_is_redacted_when_its_value_is_masked() -> None:
    """Regression (found by scripts/fuzz_engines.py bodies): a field name matching a credential
    key rule (`...pass`) had its value masked but kept the secret in its own name."""
    body = f"note {SECRET} .pass=hunter2&other=1".encode()
    result = redact_body(body, "application/x-www-form-urlencoded", REDACTOR, BodyPolicy())
    assert SECRET.encode() not in result.body
    assert result.counts == {"github-token": 1, "key-password": 1}


@pytest.mark.parametrize(
    "where",
    ["preamble", "epilogue", "filename", "part-header", "field-name", "masked-field-name"],
)
def test_secrets_outside_multipart_part_bodies_are_redacted(where: str) -> None:
    """Regression: only part bodies were redacted; headers, preamble and epilogue passed."""
    name = {"field-name": f"x {SECRET} ", "masked-field-name": f"{SECRET} password"}.get(where, "a")
    filename = f'; filename="{SECRET} .txt"' if where == "filename" else ""
    extra = f"X-Token: {SECRET}\r\n" if where == "part-header" else ""
    body = (
        (f"preamble {SECRET}\r\n" if where == "preamble" else "")
        + f'--b\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n'
        + f"Content-Type: text/plain\r\n{extra}\r\nhello\r\n--b--\r\n"
        + (f"epilogue {SECRET}\r\n" if where == "epilogue" else "")
    ).encode()
    result = redact_body(body, "multipart/form-data; boundary=b", REDACTOR, BodyPolicy())
    assert SECRET.encode() not in result.body
    assert result.body.count(b"--b") == 2  # the structure is intact
    assert result.counts.get("github-token") == 1


def test_a_boundary_a_tag_would_break_is_refused() -> None:
    boundary = f"b {SECRET} b"  # RFC 2046 allows spaces inside a boundary
    body = f"--{boundary}\r\n\r\nhello\r\n--{boundary}--\r\n".encode()
    content_type = f'multipart/form-data; boundary="{boundary}"'
    with pytest.raises(BodyRefused):
        redact_body(body, content_type, REDACTOR, BodyPolicy())


# -- content decoding ------------------------------------------------------------------------------

ENCODINGS = st.sampled_from(
    [
        *("gzip", "deflate", "br", "zstd", "identity", "gzip, br", "zstd,gzip", " GZIP ", "x-gzip"),
        *("compress", "gzip,,br", "", ",", "br, br, br, br", "deflate, zstd, gzip"),
    ]
)


def encode(body: bytes, encoding: str) -> bytes:
    """`body` with `encoding` applied; UnsupportedEncoding where the gateway knows none."""
    decoding.IncrementalDecoder(encoding, 1)
    for name in decoding.parse_content_encoding(encoding):
        if name in ("gzip", "x-gzip"):
            c = zlib.compressobj(wbits=31)
            body = c.compress(body) + c.flush()
        elif name == "deflate":
            body = zlib.compress(body)
        elif name == "br":
            body = brotli.compress(body)
        elif name == "zstd":
            body = zstandard.ZstdCompressor().compress(body)
    return body


@FUZZ
@given(
    body=st.binary(max_size=2000),
    encoding=ENCODINGS,
    mutation=st.one_of(
        st.none(), st.tuples(st.integers(0, 4000), st.binary(min_size=1, max_size=4))
    ),
    truncate=st.one_of(st.none(), st.integers(0, 4000)),
    cuts=CUTS,
)
def test_decoding_yields_the_body_or_a_decoding_error(
    body: bytes,
    encoding: str,
    mutation: tuple[int, bytes] | None,
    truncate: int | None,
    cuts: list[int],
) -> None:
    try:
        data = encode(body, encoding)
    except decoding.UnsupportedEncoding:
        with pytest.raises(decoding.UnsupportedEncoding):
            decoding.decode_body(body, encoding, max_output=1 << 20)
        return
    intact = mutation is None and truncate is None
    if mutation is not None:
        at = mutation[0] % (len(data) + 1)
        data = data[:at] + mutation[1] + data[at + len(mutation[1]) :]
    if truncate is not None:
        data = data[: truncate % (len(data) + 1)]
    try:
        whole = decoding.decode_body(data, encoding, max_output=1 << 20)
    except decoding.DecodingError:
        whole = None
    try:
        decoder = decoding.IncrementalDecoder(encoding, 1 << 20, max_chunk_output=4096)
        parts = b"".join(decoder.decode(p) for p in pieces(data, cuts)) + decoder.finish()
    except decoding.DecodingError:
        parts = None
    if intact:
        assert whole == parts == body
    elif whole is not None and parts is not None:
        assert whole == parts  # chunking never changes what a body decodes to


@FUZZ
@given(data=st.binary(max_size=400), encoding=st.text(max_size=30))
def test_any_content_encoding_header_is_decoded_or_refused(data: bytes, encoding: str) -> None:
    try:
        decoding.decode_body(data, encoding, max_output=1 << 16)
    except decoding.DecodingError as exc:
        assert exc.code in {
            "unsupported_content_encoding",
            "content_decode_failed",
            "body_too_large",
        }


# -- tokens ----------------------------------------------------------------------------------------

HMAC_KEY = b"k" * 32
REASON_ONLY = re.compile(r"[a-z_]+(: [a-z_.]+)?")
NOW = 1_700_000_000
VERIFIER = TokenVerifier(
    [SharedSecretSource(HMAC_KEY, kid="hs-1")],
    TokenPolicy(issuers=("iss",), audiences=("aud",), max_token_bytes=4096),
    clock=lambda: NOW,
)
JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
CLAIM_NAMES = st.sampled_from(["iss", "aud", "sub", "exp", "iat", "nbf", "jti", "groups", "x"])
CLAIMS = st.dictionaries(
    CLAIM_NAMES,
    st.one_of(JSON_VALUES, st.sampled_from(["iss", "aud", NOW + 60, NOW - 60, ["aud"], "a b"])),
    max_size=9,
)
HEADERS = st.fixed_dictionaries(
    {"alg": st.sampled_from(["HS256", "HS512", "RS256", "none", "", 1])},
    optional={
        "kid": st.one_of(st.just("hs-1"), JSON_VALUES),
        "crit": JSON_VALUES,
        "typ": JSON_VALUES,
    },
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(header: dict[str, Any], claims: Any) -> str:
    """A token with a VALID HS256 signature over arbitrary header and claims."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    mac = hmac.new(HMAC_KEY, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(mac)


@FUZZ
@given(header=HEADERS, claims=st.one_of(CLAIMS, JSON_VALUES))
def test_validly_signed_garbage_claims_are_rejected_with_a_reason(header: Any, claims: Any) -> None:
    token = signed(header, claims)
    try:
        identity = VERIFIER.verify(token)
    except TokenRejected as exc:
        assert REASON_ONLY.fullmatch(str(exc))
        return
    assert isinstance(identity.subject, str) and identity.subject
    assert all(isinstance(group, str) for group in identity.groups)
    assert token not in repr(identity)


@FUZZ
@given(
    segments=st.lists(st.one_of(st.text(max_size=20), st.binary(max_size=20).map(b64)), max_size=5)
)
def test_token_shaped_garbage_is_rejected(segments: list[str]) -> None:
    token = ".".join(segments)
    with pytest.raises(TokenRejected) as info:
        VERIFIER.verify(token)
    assert REASON_ONLY.fullmatch(str(info.value))  # a code, never a piece of the token


@FUZZ
@given(
    scheme=st.sampled_from(["Basic", "basic", "Bearer", "Digest", "", "Basic  "]),
    payload=st.one_of(
        st.text(max_size=60), st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode())
    ),
)
def test_proxy_authorization_parsing_never_crashes(scheme: str, payload: str) -> None:
    try:
        token = token_from_proxy_authorization(f"{scheme} {payload}")
    except TokenRejected as exc:
        assert exc.reason == "too_large"
        return
    assert token is None or (isinstance(token, str) and token)


@FUZZ
@given(
    headers=st.dictionaries(
        st.sampled_from(["authorization", "Authorization", "x-api-key", "API-KEY", "other"]),
        st.one_of(st.text(max_size=40), st.sampled_from(["Bearer a.b.c", "Bearer", "bearer x y"])),
        max_size=5,
    )
)
def test_inner_token_headers_never_crash(headers: dict[str, str]) -> None:
    try:
        found = token_from_inner_headers(headers)
    except TokenRejected as exc:
        assert exc.reason in ("ambiguous_token", "too_large")
        return
    assume(found is not None)
    assert found is not None and found[1] and found[0] in ("authorization", "x-api-key", "api-key")
