"""Body classification and redaction of content-decoded HTTP bodies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sluicegate.redaction.bodies import BodyPolicy, BodyRefused, classify, media_type, redact_body
from sluicegate.redaction.redactor import Redactor
from sluicegate.redaction.rules import Direction, load_rule_pack

RULES = Path(__file__).resolve().parents[2] / "rules"
REDACTOR = Redactor(load_rule_pack([RULES]), Direction.REQUEST)
POLICY = BodyPolicy()
GH = "ghp_C3J27XDCG2LmlZGEONYlgCtjfIZ4SOcMz9CP"
TAG = "[REDACTED:github-token]"


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        ("application/json", "json"),
        ("application/vnd.api+json; charset=utf-8", "json"),
        ("application/x-ndjson", "jsonl"),
        ("text/plain; charset=iso-8859-1", "text"),
        ("application/xml", "text"),
        ("image/svg+xml", "text"),
        ("application/x-www-form-urlencoded", "form"),
        ('multipart/form-data; boundary="x"', "multipart"),
        ("image/png", "binary"),
        ("application/octet-stream", "binary"),
        ("application/x-custom", "unknown"),
        (None, "unknown"),
    ],
)
def test_classify(content_type: str | None, kind: str) -> None:
    assert classify(content_type) == kind


def test_media_type_parameters() -> None:
    assert media_type('Text/HTML; Charset="UTF-8"; x=1') == (
        "text/html",
        {"charset": "UTF-8", "x": "1"},
    )


def test_empty_and_clean_bodies_are_untouched() -> None:
    assert redact_body(b"", "application/json", REDACTOR, POLICY).kind == "empty"
    body = b'{"model": "x", "messages": []}'
    result = redact_body(body, "application/json", REDACTOR, POLICY)
    assert result.body is body and not result.changed and result.kind == "json"


def test_json_body() -> None:
    body = json.dumps({"messages": [{"content": f"my token {GH}"}], "api_key": "k"}).encode()
    result = redact_body(body, "application/json; charset=utf-8", REDACTOR, POLICY)
    assert json.loads(result.body) == {
        "messages": [{"content": f"my token {TAG}"}],
        "api_key": "[REDACTED:key-api-key]",
    }
    assert result.changed and result.counts == {"github-token": 1, "key-api-key": 1}


def test_json_with_bom_and_invalid_json() -> None:
    bom = "\ufeff" + json.dumps({"t": GH})
    result = redact_body(bom.encode("utf-8"), "application/json", REDACTOR, POLICY)
    assert result.body.decode("utf-8") == "\ufeff" + json.dumps({"t": TAG}, separators=(",", ":"))
    broken = redact_body(f'{{"t": "{GH}'.encode(), "application/json", REDACTOR, POLICY)
    assert broken.kind == "text" and broken.body == f'{{"t": "{TAG}'.encode()


def test_json_lines_are_redacted_one_by_one() -> None:
    body = f'{{"a": "{GH}"}}\r\nnot json {GH}\n\n{{"password": "1"}}'.encode()
    result = redact_body(body, "application/x-ndjson", REDACTOR, POLICY)
    assert result.body == (
        f'{{"a":"{TAG}"}}\r\nnot json {TAG}\n\n{{"password":"[REDACTED:key-password]"}}'.encode()
    )


def test_undecodable_text_keeps_every_byte_and_still_finds_ascii_secrets() -> None:
    body = b"\xff\xfe\x80 garbage " + GH.encode() + b" \xc3("
    result = redact_body(body, "text/plain", REDACTOR, POLICY)
    assert result.body == b"\xff\xfe\x80 garbage " + TAG.encode() + b" \xc3("


def test_declared_charset_is_used_both_ways() -> None:
    body = f"café {GH} naïve".encode("iso-8859-1")
    result = redact_body(body, "text/plain; charset=ISO-8859-1", REDACTOR, POLICY)
    assert result.body == f"café {TAG} naïve".encode("iso-8859-1")
    unknown = redact_body(GH.encode(), "text/plain; charset=klingon", REDACTOR, POLICY)
    assert unknown.body == TAG.encode()


def test_form_body_redacts_values_and_masks_credential_fields() -> None:
    body = b"user=bob&password=hunter2&note=" + GH.encode() + b"&raw=%E9t%E9&empty=&flag"
    result = redact_body(body, "application/x-www-form-urlencoded", REDACTOR, POLICY)
    assert result.body == (
        b"user=bob&password=%5BREDACTED%3Akey-password%5D&note=%5BREDACTED%3Agithub-token%5D"
        b"&raw=%E9t%E9&empty=&flag"
    )
    assert result.kind == "form"


def multipart(parts: list[bytes], boundary: bytes = b"XyZ") -> bytes:
    return b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + b"--XyZ--\r\n"


def test_multipart_text_parts_redacted_boundaries_kept() -> None:
    body = multipart(
        [
            b'Content-Disposition: form-data; name="q"\r\n\r\nhello ' + GH.encode(),
            b'Content-Disposition: form-data; name="api_key"\r\n\r\ns3cret-value-9',
            b'Content-Disposition: form-data; name="doc"; filename="a.json"\r\n'
            b"Content-Type: application/json\r\n\r\n" + json.dumps({"t": GH}).encode(),
        ]
    )
    result = redact_body(body, "multipart/form-data; boundary=XyZ", REDACTOR, POLICY)
    assert result.body == multipart(
        [
            b'Content-Disposition: form-data; name="q"\r\n\r\nhello ' + TAG.encode(),
            b'Content-Disposition: form-data; name="api_key"\r\n\r\n[REDACTED:key-api-key]',
            b'Content-Disposition: form-data; name="doc"; filename="a.json"\r\n'
            b"Content-Type: application/json\r\n\r\n" + b'{"t":"' + TAG.encode() + b'"}',
        ]
    )
    assert result.kind == "multipart"


def test_multipart_binary_parts_follow_the_binary_policy() -> None:
    body = multipart(
        [b'Content-Disposition: form-data; name="f"; filename="x.png"\r\n\r\n\x89PNG' + GH.encode()]
    )
    with pytest.raises(BodyRefused) as info:
        redact_body(body, "multipart/form-data; boundary=XyZ", REDACTOR, POLICY)
    assert info.value.code == "binary_body_blocked"
    passed = redact_body(body, "multipart/form-data; boundary=XyZ", REDACTOR, BodyPolicy("pass"))
    assert passed.body == body and not passed.changed


@pytest.mark.parametrize(
    ("body", "content_type", "code"),
    [
        (b"--XyZ\r\nno end", "multipart/form-data; boundary=XyZ", "multipart_malformed"),
        (b"x", "multipart/form-data", "multipart_no_boundary"),
        (b"\x89PNG", "image/png", "binary_body_blocked"),
        (b"data", "application/x-custom", "unknown_body_blocked"),
        (b"[" * 300 + b"]" * 300, "application/json", "json_too_deep"),
    ],
)
def test_refusals_have_stable_codes(body: bytes, content_type: str, code: str) -> None:
    policy = BodyPolicy(binary="block", unknown="block")
    with pytest.raises(BodyRefused) as info:
        redact_body(body, content_type, REDACTOR, policy)
    assert info.value.code == code
    assert body.decode("latin-1")[:20] not in info.value.message


def test_binary_pass_and_unknown_policies() -> None:
    png = b"\x89PNG" + GH.encode()
    assert redact_body(png, "image/png", REDACTOR, BodyPolicy(binary="pass")).body == png
    unknown = GH.encode()
    passed = redact_body(unknown, "application/x-custom", REDACTOR, BodyPolicy(unknown="pass"))
    assert passed.body == unknown and passed.kind == "unknown"
    as_text = redact_body(unknown, None, REDACTOR, BodyPolicy(unknown="text"))
    assert as_text.body == TAG.encode() and as_text.kind == "unknown"
    as_json = redact_body(json.dumps({"t": GH}).encode(), None, REDACTOR, POLICY)
    assert as_json.kind == "json" and json.loads(as_json.body) == {"t": TAG}


@pytest.mark.parametrize("charset", ["utf-16", "utf-16-le", "utf-32-be", "cp500", "utf-7"])
def test_a_misdeclared_charset_cannot_hide_a_secret(charset: str) -> None:
    # Most receivers read JSON as UTF-8 whatever the label: redaction must not see less.
    body = f'{{"a": "x+{GH}"}}'.encode()
    body += b" " * (-len(body) % 4)  # decodes as UTF-16/32 without error
    try:
        result = redact_body(body, f"application/json; charset={charset}", REDACTOR, POLICY)
    except BodyRefused as e:
        assert e.code == "charset_mismatch"
    else:
        assert GH.encode() not in result.body


@pytest.mark.parametrize("charset", ["utf-16", "utf-32", "cp500"])
def test_a_secret_in_a_real_non_ascii_charset_is_redacted(charset: str) -> None:
    body = f'{{"a": "{GH}"}}'.encode(charset)
    result = redact_body(body, f"application/json; charset={charset}", REDACTOR, POLICY)
    assert json.loads(result.body.decode(charset)) == {"a": TAG}


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=ascii"])
def test_json_escapes_for_characters_the_charset_lacks_stay_escapes(content_type: str) -> None:
    # \xff makes the body invalid UTF-8 (read as latin-1); \u4e2d is not latin-1 or ASCII.
    body = b'{"a": "\xff \\u4e2d \\ud83d\\ude00 ' + GH.encode() + b'"}'
    result = redact_body(body, content_type, REDACTOR, POLICY)
    assert GH.encode() not in result.body
    assert result.body.startswith(b'{"a":"\xff ')
    assert b"\\u4e2d \\ud83d\\ude00 " + TAG.encode() in result.body
