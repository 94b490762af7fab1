"""Detection v2 (issue 15): provider keys without a key name, keyword forms, long values,
wallet keys, encoded secrets; and the clean text each class must leave untouched.

All values are fake (generated for these tests or taken from the rule files' examples).
"""

from __future__ import annotations

import base64
import html
import json
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sluicegate.redaction import encodings
from sluicegate.redaction.redactor import Redactor
from sluicegate.redaction.rules import Direction, load_rule_pack, load_rule_set
from sluicegate.redaction.validators import (
    bip39_phrase,
    extended_private_key,
    hex_private_key,
    random_token,
    wif_private_key,
)

RULES = Path(__file__).resolve().parents[2] / "rules"
DEFAULT = Redactor(load_rule_pack([RULES], "default"), Direction.REQUEST)
PII = Redactor(load_rule_pack([RULES], "pii"), Direction.REQUEST)
RULE_SET = load_rule_set([RULES])


def example_of(rule_id: str, index: int = 0) -> str:
    rule = next(r for r in RULE_SET.rules if r.id == rule_id)
    return rule.positives[index].text


def masked(redactor: Redactor, text: str, secret: str) -> bool:
    """The secret is gone from whole-text redaction and from a stream fed char by char."""
    whole = redactor.redact_text(text).text
    stream = redactor.stream(max_hold=len(text) + 1)
    streamed = "".join(stream.feed(c) for c in text) + stream.flush()
    return secret not in whole and secret not in streamed


TWILIO = "SK" + "3f9a2c7e1b5d8f4a6c0e9b2d7a1f5c3e"
GH = "ghp_C3J27XDCG2LmlZGEONYlgCtjfIZ4SOcMz9CP"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"The value is {TWILIO}", TWILIO),
        ("The value is dp.st.prd_eu.Rk2vQ9mXw4LzT7bN1cY8pH3sJ6dF0gA5eU2iO9qW", "Rk2vQ9mXw4"),
        ("The value is 5d1b3f0c9a7e2d4f6b8a0c1e3f5a7b9d-us21", "5d1b3f0c9a7e"),
        ("Authorization: SSWS 00aB3cD4eF5gH6iJ7kL8mN9oP0qR1sT2uV3wX4yZ5a", "00aB3cD4eF5g"),
        ("The value is eyJrIjoiT0tTcG1pU2JyNmFhcXFvZ2JmZ2JCR3FpNGh0OFNwT2kiLCJuIjoi", "eyJrIjoi"),
        ("twilio SECRET Qw3rTy9UiOp4AsDfGh7JkLzXcVbNm1Qw", "Qw3rTy9UiOp4"),
        ("token - 'Zf3D0LXCM3EIMbgJpUNnkRtO'", "Zf3D0LXCM3EI"),
        ('#define API_KEY "Zf3D0LXCM3EIMbgJpUNnkRtOfOue"', "Zf3D0LXCM3EI"),
        ('req.Header.Set("Authorization", "Bearer Zf3D0LXCM3EIMbgJpUNnkRtOfOue")', "Zf3D0LXC"),
        ("mysql -uroot -pK7vq9Lp2x db", "K7vq9Lp2x"),
        ("sshpass -p 'K7vq9Lp2x' ssh root@h", "K7vq9Lp2x"),
        ("psexec \\\\host -u admin -p K7vq9Lp2x cmd", "K7vq9Lp2x"),
        ("GET https://api.example.net/v1/data?key=Zf3D0LXCM3EIMbgJpUNnkRtOfOue&q=1", "Zf3D0L"),
        ("postgresql://u1:Pw1-aaa9x@h1:5432,u2:Pw2-bbb8y@h2:5432/db", "Pw1-aaa9x"),
        ("postgresql://u1:Pw1-aaa9x@h1:5432,u2:Pw2-bbb8y@h2:5432/db", "Pw2-bbb8y"),
        ("cloudinary://123456789012345:Ab3dE-fGh1jKlMnOpQrStUvWxYz@democloud", "Ab3dE-fGh1"),
    ],
)
def test_formats_found_without_a_key_name_or_in_unusual_forms(text: str, secret: str) -> None:
    assert masked(DEFAULT, text, secret)


def test_a_bare_mailgun_signing_key_in_strict() -> None:
    strict = Redactor(load_rule_pack([RULES], "strict"), Direction.REQUEST)
    key = "8e4c2a0f6d1b9e7c5a3f1d0b8e6c4a2f-3b9d1f7a-c5e2a8d4"
    assert masked(strict, f"The value is {key}", key[:12])
    assert masked(DEFAULT, f"MAILGUN_SIGNING_KEY={key}", key[:12])  # named: generic rules


@pytest.mark.parametrize(
    "rule_id",
    ["bitcoin-wif-private-key", "extended-private-key", "hex-private-key", "bip39-seed-phrase"],
)
def test_wallet_keys(rule_id: str) -> None:
    rule = next(r for r in RULE_SET.rules if r.id == rule_id)
    for positive in rule.positives:
        secret = positive.secret or positive.text.split()[-1]
        assert masked(DEFAULT, positive.text, secret)


def test_wallet_validators_check_their_checksums() -> None:
    wif = example_of("bitcoin-wif-private-key").split()[-1]
    assert wif_private_key(wif)
    assert not wif_private_key(wif[:-1] + ("2" if wif[-1] != "2" else "3"))
    xprv = example_of("extended-private-key").split()[-1]
    assert extended_private_key(xprv) and not extended_private_key(xprv[:-2] + "zz")
    assert not hex_private_key("0" * 64) and not hex_private_key("0123456789abcdef" * 4)
    phrase = example_of("bip39-seed-phrase").split(": ", 1)[1]
    assert bip39_phrase(phrase)
    assert not bip39_phrase("word " * 12)
    assert not bip39_phrase(" ".join(["correct", "horse", "battery", "staple"] * 3))


@pytest.mark.parametrize(
    "text",
    [
        '{"card_number": "4111 1111 1111 1111"}',
        "card_number=4111111111111111",
        '{"iban": "DE89370400440532013000"}',
        "account: GB82WEST12345698765432",
    ],
)
def test_cards_and_ibans_under_field_names_in_the_pii_profile(text: str) -> None:
    assert PII.redact_text(text).text != text
    assert DEFAULT.redact_text(text).text == text  # PII is off by default


def test_an_iban_directly_followed_by_a_secret_is_masked_with_it() -> None:
    """The IBAN is found with the secret glued to it (its exact length per country), and
    redacting the result again changes nothing (the tag is blanked like the IBAN it hid)."""
    for secret in ["AGE-SECRET-KEY-1PS7GV2SFZ8JUR9JSNCSZPJYR3JK7DX", f" {GH}"]:
        text = f"pay to GB82WEST12345698765432{secret} now"
        once = PII.redact_text(text)
        assert "GB82WEST" not in once.text and GH not in once.text
        assert PII.redact_text(once.text).text == once.text


@pytest.mark.parametrize(
    "template",
    ['password = "{}"', "password={}", "tool --token={}", "token: {}"],
)
def test_values_longer_than_300_characters_are_masked_whole(template: str) -> None:
    value = "Xv3Lq8Zr2Wm5Np7Bs4Hd6" * 25  # 525 characters
    out = DEFAULT.redact_text(template.format(value)).text
    assert value[-40:] not in out and value[:40] not in out


@pytest.mark.parametrize(
    "text",
    [
        "The token expired yesterday, ask for a new one.",
        "secret manager_configuration_v2",
        "mysql -u root -p mydb",
        "mysql -P 3306 -h db",
        "https://h/search?key=user_profile_settings",
        "mongodb://h1:27017,h2:27017,h3:27017/app",
        '#define TOKEN_TYPE "bearer"',
        "SKU0123456789abcdef0123456789abcdef",
        "live_reload_enabled_for_this_project_in_dev_mode",
        "region en-us1 and c2866c3a98faec23434556c1e237153d",
        'id = "555ea4a3-d53a-4412-9c66-3a7cb667b0d6"',
        'x = "MyrY_jLNLx6E1-Xc79_y-WDFzlriOVCkYyYoKWoWAqlw9gQNY9BP9sbeb5T3_oJt"',
        "mnemonic: word word word word word word word word word word word word",
        "PRIVATE_KEY=0x0000000000000000000000000000000000000000000000000000000000000000",
        "AWS_SECRET_KEY=SECRET=SECRET # only read if AWS_SECRET_ACCESS_KEY is not set",
    ],
)
def test_clean_text_stays_untouched(text: str) -> None:
    assert DEFAULT.redact_text(text).text == text


# --- encodings -------------------------------------------------------------------------

PASSWORD = "DB_PASSWORD=Sup3r-Secret!"


def percent(text: str) -> str:
    return urllib.parse.quote(text, safe="")


ENCODERS = {
    "base64": lambda t: base64.b64encode(t.encode()).decode(),
    "base64url": lambda t: base64.urlsafe_b64encode(t.encode()).decode().rstrip("="),
    "hex": lambda t: t.encode().hex(),
    "hex-colons": lambda t: ":".join(f"{b:02x}" for b in t.encode()),
    "percent": percent,
    "percent-all": lambda t: "".join(f"%{b:02X}" for b in t.encode()),
    "html-decimal": lambda t: "".join(f"&#{ord(c)};" for c in t),
    "html-hex": lambda t: "".join(f"&#x{ord(c):x};" for c in t),
    "unicode-escapes": lambda t: "".join(f"\\u{ord(c):04x}" for c in t),
    "x-escapes": lambda t: "".join(f"\\x{ord(c):02x}" for c in t),
}


@pytest.mark.parametrize("name", sorted(ENCODERS))
@pytest.mark.parametrize("secret", [GH, PASSWORD])
def test_encoded_secrets_are_masked(name: str, secret: str) -> None:
    encoded = ENCODERS[name](f"config {secret} done")
    out = DEFAULT.redact_text(f"payload: {encoded} end").text
    assert encoded not in out
    assert secret not in out and "Sup3r-Secret" not in out
    assert DEFAULT.redact_text(out).text == out


@pytest.mark.parametrize(
    "chain",
    [
        ["percent", "percent"],
        ["percent", "percent", "percent"],
        ["base64", "percent"],
        ["unicode-escapes", "base64"],
        ["html-decimal", "percent"],
    ],
)
def test_nested_encodings_are_masked(chain: list[str]) -> None:
    encoded = f"x {GH} y"
    for name in chain:
        encoded = ENCODERS[name](encoded)
    out = DEFAULT.redact_text(f"v={encoded}").text
    assert encoded not in out


def test_escapes_are_masked_only_where_they_spell_the_secret() -> None:
    text = "https://h/cb?y=hello%20world&msg=" + percent(PASSWORD) + " sent"
    out = DEFAULT.redact_text(text).text
    assert "Sup3r" not in out and "%53%75%70" not in out
    assert out.startswith("https://h/cb?y=hello%20world&msg=DB_PASSWORD%3D[REDACTED:")
    assert out.endswith("] sent")


@pytest.mark.parametrize(
    "text",
    [
        "https://example.com/search?q=hello%20world&x=1&y=%E2%9C%93",
        "Tom &amp; Jerry &lt;3 &#169; 2024",
        "line one\\nline two \\u00e9t\\u00e9",
        "sha256: " + "ab12" * 16,
        "aGVsbG8gd29ybGQsIGhvdyBhcmUgeW91IHRvZGF5Pw==",  # "hello world, how are you today?"
        "UpdateCloudFrontOriginAccessIdentity2015_04_17",
        "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk",
        "de:ad:be:ef:00:11:22:33:44:55:66:77:88:99:aa:bb",
    ],
)
def test_clean_encoded_text_stays_untouched(text: str) -> None:
    assert DEFAULT.redact_text(text).text == text


def test_decoding_is_bounded() -> None:
    """Many candidates, deep nesting and big spans: the work stays within the bounds."""
    many = " ".join(
        ENCODERS["base64"](f"word {i} of many") for i in range(5 * encodings.MAX_CANDIDATES)
    )
    spans = list(encodings.decoded_spans(many, [encodings.MAX_DECODED]))
    assert len(spans) <= encodings.MAX_CANDIDATES
    deep = f"x {GH} y"
    for _ in range(encodings.MAX_DEPTH + 2):
        deep = ENCODERS["base64"](deep)
    assert DEFAULT.redact_text(deep).text == deep  # past MAX_DEPTH: not decoded
    huge = ENCODERS["base64"](f"{GH} " + "x" * encodings.MAX_SPAN)
    assert list(encodings.decoded_spans(huge, [encodings.MAX_DECODED])) == []


def test_random_token_validator() -> None:
    assert random_token(
        "I6FwzQZFL9l-44nviI1F04OTmorMaVQf9GS4Oe07qxL_vNkW6CRas4Lo42vqJMT0M6riJfma_f-pTAuoX2U="
    )
    assert not random_token("SponsoredProductsRemoteRHFSearchEXPSubsK2ClickPaginationX")
    assert not random_token("c3VwZXIgbG9uZyBzdHJpbmcgc2hvdWxkIGNhdXNlIGVub3VnaCBlbnRyb3B5")
    assert not random_token("ab12" * 16)


SECRETS = st.sampled_from([GH, PASSWORD, example_of("twilio-api-key"), example_of("jwt")])
CHAINS = st.lists(st.sampled_from(sorted(ENCODERS)), min_size=1, max_size=2)
AROUND = st.sampled_from(["", " ", "\n", "data=", '{"v": "', "<p>", "?q="])


@settings(max_examples=200, deadline=None)
@given(SECRETS, CHAINS, AROUND, AROUND)
@example(GH, ["hex", "base64"], "data=", "")
@example(PASSWORD, ["percent", "html-hex"], "?q=", "\n")
def test_any_encoding_of_a_secret_is_masked(
    secret: str, chain: list[str], before: str, after: str
) -> None:
    encoded = f"value {secret} ."
    for name in chain:
        encoded = ENCODERS[name](encoded)
    out = DEFAULT.redact_text(f"{before}{encoded}{after}")
    assert encoded not in out.text
    assert DEFAULT.redact_text(out.text).text == out.text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("%&#;\\ux0123456789abcdefABCDEF=+/ -_:\n"), max_size=200))
def test_decoding_never_breaks_on_odd_text(text: str) -> None:
    once = DEFAULT.redact_text(text)
    assert DEFAULT.redact_text(once.text).text == once.text


def test_json_and_html_wrappers_of_an_encoded_secret() -> None:
    body = json.dumps({"note": base64.b64encode(f"key {GH}".encode()).decode()})
    assert GH[:12] not in DEFAULT.redact_text(body).text
    page = "<p>" + html.escape(f"token {GH}").replace("_", "&#95;") + "</p>"
    assert GH[4:16] not in DEFAULT.redact_text(page).text
