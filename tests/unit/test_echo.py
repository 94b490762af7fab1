"""Variants of an injected secret, as an upstream could echo it back."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from urllib.parse import quote, quote_plus

from hypothesis import given, settings
from hypothesis import strategies as st

from sluicegate.redaction.echo import MIN_VARIANT_LENGTH, echo_literals, secret_variants
from sluicegate.redaction.redactor import Redactor
from sluicegate.redaction.rules import Direction, load_rule_pack

RULES = Path(__file__).resolve().parents[2] / "rules"
SECRET = 'sk-upstream/9f8e+7d6c"5b4a'


def test_raw_json_and_url_forms() -> None:
    variants = secret_variants(SECRET)
    assert SECRET in variants
    assert json.dumps(SECRET)[1:-1] in variants
    assert json.dumps(SECRET)[1:-1].replace("/", "\\/") in variants
    assert quote(SECRET, safe="") in variants and quote_plus(SECRET) in variants
    lowercase = re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), quote(SECRET, safe=""))
    assert lowercase in variants  # some encoders write %2f, not %2F


def test_base64_forms_including_inside_a_larger_blob() -> None:
    variants = secret_variants(SECRET)
    assert base64.b64encode(SECRET.encode()).decode() in variants
    assert base64.urlsafe_b64encode(SECRET.encode()).decode().rstrip("=") in variants
    for prefix in ["user:", "ab", "x", "", "Bearer "]:
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            blob = encode(f"{prefix}{SECRET}tail".encode()).decode()
            assert any(v in blob for v in variants), (prefix, encode)


def test_variants_are_unique_long_enough_and_longest_first() -> None:
    variants = secret_variants(SECRET)
    assert len(variants) == len(set(variants))
    assert all(len(v) >= MIN_VARIANT_LENGTH for v in variants)
    assert [len(v) for v in variants] == sorted((len(v) for v in variants), reverse=True)
    assert secret_variants("short") == []


@settings(max_examples=60, deadline=None)
@given(
    secret=st.text(min_size=12, max_size=40),
    prefix=st.binary(max_size=5),
    suffix=st.binary(max_size=5),
)
def test_any_secret_is_found_in_basic_auth_style_blobs(
    secret: str, prefix: bytes, suffix: bytes
) -> None:
    blob = base64.b64encode(prefix + secret.encode("utf-8", "surrogatepass") + suffix).decode()
    assert any(v in blob for v in secret_variants(secret))


def test_redactor_masks_every_echoed_form() -> None:
    redactor = Redactor(load_rule_pack([RULES]), Direction.RESPONSE).with_literals(
        echo_literals("injected-credential", SECRET)
    )
    basic = base64.b64encode(f"api:{SECRET}".encode()).decode()
    echoes = [
        f"invalid key {SECRET}",
        json.dumps({"error": f"bad key {SECRET}"}),
        f"GET /v1?key={quote_plus(SECRET)} 401",
        f"Authorization: Basic {basic}",
    ]
    for text in echoes:
        out = redactor.redact_text(text)
        assert out.changed, text
        assert not any(variant in out.text for variant in secret_variants(SECRET)), text
    # Where no rule knows the format, only the literal catches it.
    assert redactor.redact_text(echoes[0]).counts == {"injected-credential": 1}
