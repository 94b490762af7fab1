"""Form and event bodies through the one content model.

* Form fields (URL-encoded, multipart, the query string) are key-addressed values: the rule pack's
  key rules see a field name exactly as they see a JSON key (same tags, same value checks), a
  clean form and a binary upload leave byte-identical, and the policy's views and `redact_only`
  read forms through the same model (shapes/form.py).
* Buffered text/event-stream bodies go through the SSE engine: a secret split over deltas and a
  credential-named field in an event are redacted as a stream of the same bytes would be; bad
  input is refused with a stable code (`sse_invalid_utf8`, `sse_event_too_large`,
  `charset_mismatch`); a body whose size predicts more than the budget is refused up front.
* `redaction.disable` reaches every path (buffered JSON, text, form, multipart, SSE buffered and
  streamed, WebSocket messages).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote_plus, unquote_plus

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from sluicegate.mitm import flowstate
from sluicegate.mitm import redaction as redaction_mod
from sluicegate.mitm.redaction import Redaction
from sluicegate.mitm.streaming import StreamRedaction
from sluicegate.policy.patterns import Pattern
from sluicegate.policy.redact_only import redact_body as redact_only
from sluicegate.policy.views import BodyViews
from sluicegate.redaction.bodies import BodyPolicy, BodyRefused, redact_body
from sluicegate.redaction.json_redact import JsonStrings
from sluicegate.redaction.redactor import Redactor
from sluicegate.redaction.rules import Direction, RulePack, load_rule_pack
from sluicegate.redaction.sse import SseRedactor
from sluicegate.shapes import form
from tests.support.addon_harness import configured, write_config
from tests.support.gateway import REPO
from tests.support.rule_secrets import example

if TYPE_CHECKING:
    from tests.support.tokens import TestIdP

GITHUB = example("github-token")
PASSWORD = "Tr0ub4dor&3"
API_KEY = "9f8e7d6c5b4a39281706f5e4"
FORM = "application/x-www-form-urlencoded"
RULES = sorted((REPO / "rules").glob("*.yaml"))
PASS_BINARY = BodyPolicy(binary="pass")
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) + b"password=" + b"\xff" * 16


@pytest.fixture(scope="module")
def pack() -> RulePack:
    return load_rule_pack(RULES)


@pytest.fixture(scope="module")
def redactor(pack: RulePack) -> Redactor:
    return Redactor(pack, Direction.REQUEST)


def form_fields(body: bytes) -> dict[str, str]:
    return dict(parse_qsl(body.decode(), keep_blank_values=True))


def json_value(redactor: Redactor, name: str, value: str) -> Any:
    """What buffered JSON makes of `{name: value}`: the reference for a form field."""
    result = redact_body(
        json.dumps({name: value}).encode(), "application/json", redactor, BodyPolicy()
    )
    return json.loads(result.body)[name], result.counts


# -- form fields are JSON keys ------------------------------------------------------------------

FIELDS = [
    ("password", PASSWORD),
    ("db_password", PASSWORD),
    ("api_key", API_KEY),
    ("client_secret", "s3cr3t!x"),
    ("access_token", "abc123def456ghi789"),
    ("password", "~0.7.1"),  # not a credential: the key rule's value check leaves it
    ("token", "NextToken"),
    ("note", f"deploy with {GITHUB.secret}"),
    ("max_tokens", "1024"),
]


@pytest.mark.parametrize(("name", "value"), FIELDS)
def test_a_form_field_gets_what_the_same_json_key_gets(
    redactor: Redactor, name: str, value: str
) -> None:
    expected, json_counts = json_value(redactor, name, value)
    body = f"a=1&{quote_plus(name)}={quote_plus(value)}&b=2".encode()
    result = redact_body(body, FORM, redactor, BodyPolicy())
    assert form_fields(result.body)[name] == expected
    assert result.counts == json_counts
    query = redact_body(body, FORM, redactor, BodyPolicy())  # the query's path (same engine)
    assert query.body == result.body


@pytest.mark.parametrize(
    ("name", "nested"),
    [
        ("user[password]", {"user": {"password": PASSWORD}}),
        ("auth[0][api_key]", {"auth": [{"api_key": API_KEY}]}),
        ("config[db][client_secret]", {"config": {"db": {"client_secret": "s3cr3t!x"}}}),
    ],
)
def test_a_bracketed_field_is_the_nested_key_it_spells(
    redactor: Redactor, name: str, nested: dict[str, Any]
) -> None:
    document = redact_body(json.dumps(nested).encode(), "application/json", redactor, BodyPolicy())
    value = next(v for v in (PASSWORD, API_KEY, "s3cr3t!x") if v in json.dumps(nested))
    result = redact_body(
        f"{quote_plus(name)}={quote_plus(value)}".encode(), FORM, redactor, BodyPolicy()
    )
    assert result.counts == document.counts and result.counts
    assert value not in result.body.decode()
    assert form.field_keys(name)[-1] in json.dumps(nested)


def test_json_in_a_form_value_is_read_as_json(redactor: Redactor) -> None:
    inner = json.dumps({"db_password": PASSWORD, "host": "db"})
    result = redact_body(f"payload={quote_plus(inner)}".encode(), FORM, redactor, BodyPolicy())
    value = json.loads(form_fields(result.body)["payload"])
    assert value == {"db_password": "[REDACTED:key-password]", "host": "db"}


@pytest.mark.parametrize(
    "body",
    [
        b"a=1&b=%7e&c=+x+&d&=&e=%C3%A9&f=%e9&&g=%2B",
        b"q=how+to+sort+a+list&page=2",
        b"password=&token=",
        b"",
    ],
)
def test_a_clean_form_leaves_byte_identical(redactor: Redactor, body: bytes) -> None:
    result = redact_body(body, FORM, redactor, BodyPolicy())
    assert result.body == body and not result.changed


def test_only_changed_pairs_are_re_encoded(redactor: Redactor) -> None:
    body = f"x=%7e&password={quote_plus(PASSWORD)}&y=a+b".encode()
    result = redact_body(body, FORM, redactor, BodyPolicy())
    assert result.body == b"x=%7e&password=%5BREDACTED%3Akey-password%5D&y=a+b"


def test_the_query_string_goes_through_the_form_model(tmp_path: Path, idp: TestIdP) -> None:
    path = f"/v1/search?q=a+b&api_key={API_KEY}&user%5Bpassword%5D={quote_plus(PASSWORD)}"
    request = tutils.treq(path=path.encode())
    with redaction_addon(tmp_path, idp) as addon:
        assert addon.runtime is not None and addon.runtime.request is not None
        counts = asyncio.run(addon._redact_query(request, addon.runtime.request, None))
    assert counts == {"key-api-key": 1, "key-password": 1}
    assert request.path.startswith("/v1/search?q=a+b&api_key=%5BREDACTED%3Akey-api-key%5D&")
    assert API_KEY not in request.path and quote_plus(PASSWORD) not in request.path


# -- multipart ----------------------------------------------------------------------------------

BOUNDARY = "----sgBoundary7MA4YWxk"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def multipart(*parts: tuple[dict[str, str], bytes]) -> bytes:
    out = b""
    for headers, body in parts:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        out += f"--{BOUNDARY}\r\n{head}\r\n".encode() + body + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def field(name: str, value: bytes, **extra: str) -> tuple[dict[str, str], bytes]:
    return {"Content-Disposition": f'form-data; name="{name}"', **extra}, value


def upload(name: str, filename: str, data: bytes, ctype: str) -> tuple[dict[str, str], bytes]:
    disposition = f'form-data; name="{name}"; filename="{filename}"'
    return {"Content-Disposition": disposition, "Content-Type": ctype}, data


@pytest.mark.parametrize(("name", "value"), FIELDS)
def test_a_multipart_field_gets_what_the_same_json_key_gets(
    redactor: Redactor, name: str, value: str
) -> None:
    expected, json_counts = json_value(redactor, name, value)
    body = multipart(field("model", b"gpt-4o"), field(name, value.encode()))
    result = redact_body(body, MULTIPART, redactor, BodyPolicy())
    assert result.counts == json_counts
    parsed = form.MultipartForm.parse(result.body, BOUNDARY)
    assert parsed.part_body(parsed.parts[1]).decode() == expected


def test_binary_uploads_leave_byte_identical_beside_redacted_fields(redactor: Redactor) -> None:
    png = upload("file", "shot.png", PNG, "image/png")
    body = multipart(
        field("password", PASSWORD.encode()),
        png,
        upload("f", "x.bin", PNG, "application/octet-stream"),
    )
    result = redact_body(body, MULTIPART, redactor, PASS_BINARY)
    assert result.counts == {"key-password": 1}
    parsed = form.MultipartForm.parse(result.body, BOUNDARY)
    assert [parsed.part_body(p) for p in parsed.parts[1:]] == [PNG, PNG]
    assert result.body.count(PNG) == 2
    # A clean form with an upload: every byte as sent.
    clean = multipart(field("purpose", b"assistants"), png)
    assert redact_body(clean, MULTIPART, redactor, PASS_BINARY).body == clean
    # `binary_bodies: block` (the default) still refuses the upload.
    with pytest.raises(BodyRefused) as refused:
        redact_body(clean, MULTIPART, redactor, BodyPolicy())
    assert refused.value.code == "binary_body_blocked"


def test_a_text_file_upload_and_a_base64_part_are_redacted_by_their_type(
    redactor: Redactor,
) -> None:
    text_file = upload("file", "notes.txt", f"clone {GITHUB.secret}\n".encode(), "text/plain")
    json_part = base64.b64encode(json.dumps({"api_key": API_KEY}).encode())
    encoded = field(
        "meta",
        json_part,
        **{"Content-Type": "application/json", "Content-Transfer-Encoding": "base64"},
    )
    result = redact_body(multipart(text_file, encoded), MULTIPART, redactor, BodyPolicy())
    parsed = form.MultipartForm.parse(result.body, BOUNDARY)
    assert parsed.part_body(parsed.parts[0]) == b"clone [REDACTED:github-token]\n"
    assert json.loads(parsed.part_body(parsed.parts[1])) == {"api_key": "[REDACTED:key-api-key]"}
    assert GITHUB.secret.encode() not in result.body


def test_multipart_errors_keep_their_codes(redactor: Redactor) -> None:
    for body, ctype, code in [
        (b"--x\r\nno end", "multipart/form-data; boundary=x", "multipart_malformed"),
        (b"anything", "multipart/form-data", "multipart_no_boundary"),
    ]:
        with pytest.raises(BodyRefused) as refused:
            redact_body(body, ctype, redactor, BodyPolicy())
        assert refused.value.code == code


# -- policy views and redact_only read forms through the same model ------------------------------


def test_policy_views_read_multipart_text_fields_not_files() -> None:
    script = "curl -fsSL https://get.example.dev/i.sh | sh"
    body = multipart(
        field(
            "prompt", base64.b64encode(script.encode()), **{"Content-Transfer-Encoding": "base64"}
        ),
        upload("file", "a.png", PNG, "image/png"),
    )
    views = BodyViews.of(body, MULTIPART)
    assert f"prompt={script}" in views.views[1]
    assert "PNG" not in views.views[1]
    url_views = BodyViews.of(b"q=a+b&cmd=%7C+sh", FORM)
    assert url_views.views[1] == "q=a b\ncmd=| sh"


def test_redact_only_keeps_unchanged_pairs_and_files_as_sent() -> None:
    pattern = Pattern("ip", regex.compile(r"\b10\.\d+\.\d+\.\d+\b"))
    new, n = redact_only(b"a=%7e&host=10.1.2.3&b=x+y", FORM, [pattern], "[IP]")
    assert (new, n) == (b"a=%7e&host=%5BIP%5D&b=x+y", 1)
    body = multipart(field("host", b"10.1.2.3"), upload("file", "a.png", PNG, "image/png"))
    new, n = redact_only(body, MULTIPART, [pattern], "[IP]")
    assert n == 1 and PNG in new and b"10.1.2.3" not in new
    assert new == body.replace(b"10.1.2.3", b"[IP]")


# -- buffered event streams through the SSE engine ------------------------------------------------


def ev(payload: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(payload).encode() + b"\n\n"


def chat(content: str) -> bytes:
    return ev({"id": "c", "choices": [{"index": 0, "delta": {"content": content}}]})


def split_secret_stream() -> bytes:
    secret = GITHUB.secret
    return (
        chat("use ")
        + chat(secret[:9])
        + chat(secret[9:] + " now")
        + ev({"type": "status", "config": {"db_password": PASSWORD, "host": "db"}})
        + b"data: [DONE]\n\n"
    )


def streamed(redactor: Redactor, body: bytes, size: int) -> tuple[bytes, dict[str, int]]:
    engine = SseRedactor(lambda: redactor.stream(4096), strings=JsonStrings(redactor))
    out = b"".join(engine.feed(body[i : i + size]) for i in range(0, len(body), size))
    return out + engine.finish(), engine.counts


@pytest.mark.parametrize("direction", list(Direction))
def test_a_buffered_event_stream_is_redacted_as_the_same_stream(
    pack: RulePack, direction: Direction
) -> None:
    redactor = Redactor(pack, direction)
    body = split_secret_stream()
    result = redact_body(body, "text/event-stream", redactor, BodyPolicy())
    assert result.kind == "sse"
    assert result.counts == {"github-token": 1, "key-password": 1}
    assert GITHUB.secret.encode() not in result.body and PASSWORD.encode() not in result.body
    assert b"[REDACTED:github-token]" in result.body
    assert b'"db_password":"[REDACTED:key-password]"' in result.body
    for size in (1, 7, len(body)):
        assert streamed(redactor, body, size) == (result.body, result.counts)


def test_a_clean_event_stream_leaves_byte_identical(redactor: Redactor) -> None:
    body = b": ping\r\n\r\n" + chat("hello") + b"event: done\ndata: [DONE]\n\n"
    result = redact_body(body, "text/event-stream; charset=utf-8", redactor, BodyPolicy())
    assert result.body == body and not result.changed


def refused(body: bytes, ctype: str, redactor: Redactor, policy: BodyPolicy | None = None) -> str:
    with pytest.raises(BodyRefused) as refusal:
        redact_body(body, ctype, redactor, policy or BodyPolicy())
    return refusal.value.code


def test_event_stream_errors_are_refused_with_stable_codes(redactor: Redactor) -> None:
    sse = "text/event-stream"
    assert refused(b"data: \xff\xfe\n\n", sse, redactor) == "sse_invalid_utf8"
    small = BodyPolicy(sse_max_event_bytes=64)
    assert refused(chat("x" * 100), sse, redactor, small) == "sse_event_too_large"
    body = split_secret_stream()
    for label in ("utf-16", "utf-32-le", "utf-7", "cp500", "no-such-charset"):
        assert refused(body, f"{sse}; charset={label}", redactor) == "charset_mismatch"
    for wide in (
        b"\xff\xfe" + body.decode().encode("utf-16-le"),
        body.decode().encode("utf-16-be"),
    ):
        assert refused(wide, sse, redactor) == "charset_mismatch"


def test_a_declared_latin1_event_stream_is_honoured(redactor: Redactor) -> None:
    body = chat("caf\xe9 ").replace(b"\\u00e9", b"\xe9") + chat(GITHUB.secret)
    assert b"\xe9" in body
    result = redact_body(body, "text/event-stream; charset=iso-8859-1", redactor, BodyPolicy())
    assert result.counts == {"github-token": 1}
    assert result.body.startswith(body[: body.index(b"\n\n") + 2])  # the é event as sent
    assert GITHUB.secret.encode() not in result.body
    # Pure ASCII under any ASCII-compatible label reads the same as UTF-8.
    ascii_body = split_secret_stream()
    as_utf8 = redact_body(ascii_body, "text/event-stream", redactor, BodyPolicy())
    labelled = redact_body(
        ascii_body, "text/event-stream; charset=windows-1252", redactor, BodyPolicy()
    )
    assert labelled.body == as_utf8.body


# -- redaction.disable reaches every path ----------------------------------------------------------

# generic-password too: the text pass reads `"password": "..."` as a keyword form.
DISABLED = ("key-password", "generic-password", "github-token")


def every_path(redactor: Redactor) -> dict[str, bytes]:
    """What each path makes of a password field and a GitHub token."""
    document = json.dumps({"password": PASSWORD, "note": f"use {GITHUB.secret}"})
    secret = GITHUB.secret

    def body(content: bytes, ctype: str | None) -> bytes:
        return redact_body(content, ctype, redactor, BodyPolicy()).body

    parts = multipart(field("password", PASSWORD.encode()), field("note", secret.encode()))
    return {
        "json": body(document.encode(), "application/json"),
        # Text that starts with a JSON document: the document is read as JSON, the rest as text.
        "text": body(f"{document}\nthen use {secret}".encode(), "text/plain"),
        "form": body(f"password={quote_plus(PASSWORD)}&note={secret}".encode(), FORM),
        "multipart": body(parts, MULTIPART),
        "sse buffered": body(split_secret_stream(), "text/event-stream"),
        "sse streamed": streamed(redactor, split_secret_stream(), 5)[0],
        # The WebSockets addon redacts a text message as `redact_body(content, None, ...)`.
        "websocket": body(document.encode(), None),
    }


def test_disabled_rules_are_off_on_every_path() -> None:
    enabled = every_path(Redactor(load_rule_pack(RULES), Direction.REQUEST))
    disabled = every_path(Redactor(load_rule_pack(RULES, disable=DISABLED), Direction.REQUEST))
    assert enabled.keys() == disabled.keys()
    for path, body in enabled.items():
        text = unquote_plus(body.decode("latin-1"))  # forms: as their receiver decodes them
        assert "REDACTED:key-password" in text and "REDACTED:github-token" in text, path
        assert PASSWORD not in text and GITHUB.secret not in text, path
    for path, body in disabled.items():
        text = unquote_plus(body.decode("latin-1"))
        assert "REDACTED:key-password" not in text, path
        assert "REDACTED:github-token" not in text, path
        assert PASSWORD in text, path
        # Streams split the token over two deltas (both halves pass through untouched).
        assert GITHUB.secret[:9] in text and GITHUB.secret[9:] in text, path


# -- the gateway's addons --------------------------------------------------------------------------


@contextlib.contextmanager
def redaction_addon(tmp_path: Path, idp: TestIdP) -> Iterator[Redaction]:
    addon = Redaction()
    config = write_config(tmp_path, idp, redaction={"rules": [str(REPO / "rules")]})
    with configured(addon, config=config):
        yield addon


def refusal(flow: http.HTTPFlow) -> tuple[int, str]:
    assert flow.response is not None
    return flow.response.status_code, json.loads(flow.response.content)["error"]["code"]


def sse_request(body: bytes, ctype: str = "text/event-stream") -> http.HTTPFlow:
    headers = http.Headers(content_type=ctype, content_length=str(len(body)))
    return tflow.tflow(req=tutils.treq(method=b"POST", headers=headers, content=body))


def test_a_buffered_event_stream_request_is_redacted_by_the_addon(
    tmp_path: Path, idp: TestIdP
) -> None:
    with redaction_addon(tmp_path, idp) as addon:
        flow = sse_request(split_secret_stream())
        addon.requestheaders(flow)
        asyncio.run(addon.request(flow))
        assert flow.response is None
        assert GITHUB.secret.encode() not in flow.request.content
        assert b'"db_password":"[REDACTED:key-password]"' in flow.request.content
        assert flow.metadata["sluicegate"]["redaction"]["request"] == {
            "github-token": 1,
            "key-password": 1,
        }
        bad = sse_request(b"data: ok\n\n", "text/event-stream; charset=utf-16")
        asyncio.run(addon.request(bad))
        assert refusal(bad) == (415, "charset_mismatch")


def test_an_event_stream_over_the_predicted_budget_is_refused_before_any_work(
    tmp_path: Path, idp: TestIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert redaction_mod.sse_max_bytes(10.0) == int(
        10.0 * 1e6 / (redaction_mod.SSE_US_PER_BYTE * redaction_mod.SSE_SAFETY)
    )
    body = split_secret_stream()
    budgets: list[float] = []

    def just_below(budget_seconds: float) -> int:
        budgets.append(budget_seconds)
        return len(body) - 1

    monkeypatch.setattr(redaction_mod, "sse_max_bytes", just_below)

    def must_not_run(*args: object) -> None:
        raise AssertionError("redacted although the size predicts the budget is exceeded")

    monkeypatch.setattr(redaction_mod, "redact_body", must_not_run)
    with redaction_addon(tmp_path, idp) as addon:
        flow = sse_request(body)
        asyncio.run(addon.request(flow))
        assert refusal(flow) == (503, "redaction_timeout")
        assert GITHUB.secret.encode() not in flow.response.content
        assert budgets == [10.0]  # the configured budget (the default)


@pytest.mark.parametrize("charset", ["utf-16", "UTF-32", "utf-7", "x-unknown"])
def test_a_stream_declaring_a_charset_it_cannot_be_read_in_is_refused(
    tmp_path: Path, idp: TestIdP, charset: str
) -> None:
    streaming = StreamRedaction()
    with configured(streaming, config=write_config(tmp_path, idp)):
        response = tutils.tresp(
            headers=http.Headers(content_type=f"text/event-stream; charset={charset}"),
            content=b"",
        )
        flow = tflow.tflow(resp=response)
        streaming.responseheaders(flow)
        assert flow.response.status_code == 502
        answered = flowstate.state(flow).refusal
        assert answered is not None and answered.code == "charset_mismatch"
        latin = tflow.tflow(
            resp=tutils.tresp(
                headers=http.Headers(content_type="text/event-stream; charset=latin-1"),
                content=b"",
            )
        )
        streaming.responseheaders(latin)  # ASCII-compatible: read (non-UTF-8 bytes cut it)
        assert callable(latin.response.stream)


def test_a_binary_upload_under_a_credential_name_is_not_replaced_but_a_key_file_is(
    redactor: Redactor,
) -> None:
    image = upload("api_key", "key.png", PNG, "image/png")
    pem = f"-----BEGIN PRIVATE KEY-----\n{API_KEY}\n-----END PRIVATE KEY-----\n".encode()
    key_file = upload("private_key", "id.key", pem, "application/octet-stream")
    result = redact_body(multipart(image, key_file), MULTIPART, redactor, PASS_BINARY)
    parsed = form.MultipartForm.parse(result.body, BOUNDARY)
    assert parsed.part_body(parsed.parts[0]) == PNG
    assert API_KEY.encode() not in result.body and b"PRIVATE KEY" not in result.body


def test_the_readme_states_the_pre_check_size_the_gateway_uses() -> None:
    readme = (REPO / "README.md").read_text()
    default = redaction_mod.sse_max_bytes(10.0)  # redaction.budget_seconds' default
    assert f"a body over {default:,} bytes: 503 `redaction_timeout`" in readme
    assert f"{redaction_mod.sse_max_bytes(1.0):,} bytes per second of budget" in readme


def test_the_sse_engine_stops_at_its_budget(redactor: Redactor) -> None:
    body = chat("ghp_" * 8) * 2000  # adversarial deltas: ~100 µs/byte
    policy = BodyPolicy(sse_budget_seconds=0.05)
    assert refused(body, "text/event-stream", redactor, policy) == "redaction_timeout"


# -- properties ----------------------------------------------------------------------------------


@functools.cache
def cached_redactor(direction: Direction) -> Redactor:
    return Redactor(load_rule_pack(RULES), direction)


FORM_TEXT = st.text(alphabet=st.sampled_from("ab=&+%7eE9xC3A9 ~[]"), max_size=40)


@given(text=FORM_TEXT)
@settings(max_examples=200, deadline=None)
def test_a_form_rewritten_without_changes_is_the_same_text(text: str) -> None:
    parsed = form.UrlEncodedForm.parse(text)
    assert parsed.rewrite(lambda name, value: None) == text
    assert parsed.rewrite(lambda name, value: (name, value)) == text


@given(text=FORM_TEXT)
@settings(max_examples=100, deadline=None)
def test_a_form_without_secrets_leaves_byte_identical(text: str) -> None:
    redactor = cached_redactor(Direction.REQUEST)
    result = redact_body(text.encode(), FORM, redactor, BodyPolicy())
    assert result.body == text.encode() or result.counts


@given(cuts=st.lists(st.integers(min_value=1, max_value=400), max_size=8))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_buffered_event_stream_equals_the_stream_chunked_anyhow(cuts: list[int]) -> None:
    redactor = cached_redactor(Direction.RESPONSE)
    body = split_secret_stream()
    buffered = redact_body(body, "text/event-stream", redactor, BodyPolicy())
    engine = SseRedactor(lambda: redactor.stream(4096), strings=JsonStrings(redactor))
    out, last = [], 0
    for cut in sorted({c % len(body) for c in cuts}):
        out.append(engine.feed(body[last:cut]))
        last = cut
    out.append(engine.feed(body[last:]) + engine.finish())
    assert (b"".join(out), engine.counts) == (buffered.body, buffered.counts)
