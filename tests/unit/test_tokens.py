"""Token verification engine: happy paths, attack suite with exact reason codes, JWKS over HTTP."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import http.server
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluicegate.auth.extract import token_from_inner_headers, token_from_proxy_authorization
from sluicegate.auth.keys import (
    JwksFileSource,
    JwksUrlSource,
    KeySourceError,
    PemKeySource,
    SharedSecretSource,
)
from sluicegate.auth.verifier import Identity, TokenPolicy, TokenRejected, TokenVerifier

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
SECRET = bytes(range(32, 64))
ISSUER = "https://idp.example"
AUDIENCE = "sluicegate"
NOW = 1_700_000_000
POLICY = TokenPolicy(issuers=(ISSUER,), audiences=(AUDIENCE,))
REASON_MESSAGE = re.compile(r"[a-z_]+(: [a-z_.]+)?")


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims at NOW; an override of None removes the claim."""
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": NOW - 10,
        "exp": NOW + 300,
        "jti": "token-1",
        "groups": ["dev", "ops"],
    }
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not None}


def sign(
    payload: dict[str, Any] | bytes | None = None,
    key: Any = RSA_KEY,
    alg: str = "RS256",
    kid: str | None = "rsa-1",
    headers: dict[str, Any] | None = None,
) -> str:
    all_headers = {**({"kid": kid} if kid is not None else {}), **(headers or {})}
    body = claims() if payload is None else payload
    if isinstance(body, bytes):  # raw payload bytes: for duplicate keys / non-JSON payloads
        return jwt.PyJWS().encode(body, key, algorithm=alg, headers=all_headers)
    return jwt.encode(body, key, algorithm=alg, headers=all_headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any] | bytes, payload: dict[str, Any], signature: bytes) -> str:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return f"{b64(head)}.{b64(json.dumps(payload).encode())}.{b64(signature)}"


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwk(private_key: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    public_key = private_key.public_key()
    if isinstance(public_key, rsa.RSAPublicKey):
        data = jwt.algorithms.RSAAlgorithm.to_jwk(public_key, as_dict=True)
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        data = jwt.algorithms.ECAlgorithm.to_jwk(public_key, as_dict=True)
    else:
        data = jwt.algorithms.OKPAlgorithm.to_jwk(public_key, as_dict=True)
    data.pop("key_ops", None)
    if kid is not None:
        data["kid"] = kid
    return {**data, **extra}


def write_json(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document))
    return path


def verifier(*sources: Any, clock: Any = lambda: NOW, **policy: Any) -> TokenVerifier:
    options = {"issuers": (ISSUER,), "audiences": (AUDIENCE,), **policy}
    return TokenVerifier(list(sources), TokenPolicy(**options), clock=clock)


def rejection(verify: Any, token: str) -> TokenRejected:
    with pytest.raises(TokenRejected) as info:
        verify(token)
    message = str(info.value)
    assert REASON_MESSAGE.fullmatch(message), message
    assert not token or token not in message
    return info.value


@pytest.fixture
def jwks_path(tmp_path: Path) -> Path:
    return write_json(
        tmp_path / "jwks.json",
        {"keys": [jwk(RSA_KEY, "rsa-1"), jwk(EC_KEY, "ec-1"), jwk(ED_KEY, "ed-1")]},
    )


@pytest.fixture
def mixed(jwks_path: Path) -> TokenVerifier:
    """The attack-suite gateway: asymmetric keys from a JWKS plus an explicit HS256 secret."""
    return verifier(JwksFileSource(jwks_path), SharedSecretSource(SECRET, kid="hs-1"))


# --- happy paths ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "alg", "kid"),
    [
        (RSA_KEY, "RS256", "rsa-1"),
        (RSA_KEY, "PS256", "rsa-1"),
        (EC_KEY, "ES256", "ec-1"),
        (ED_KEY, "EdDSA", "ed-1"),
        (SECRET, "HS256", "hs-1"),
    ],
)
def test_valid_tokens_verify_to_identity(
    mixed: TokenVerifier, key: Any, alg: str, kid: str
) -> None:
    token = sign(key=key, alg=alg, kid=kid)
    identity = mixed.verify(token)
    assert identity == Identity(
        subject="alice",
        groups=("dev", "ops"),
        token_id="token-1",
        issuer=ISSUER,
        expires_at=NOW + 300,
        fingerprint=hashlib.sha256(token.encode()).hexdigest()[:16],
    )
    assert asyncio.run(mixed.averify(token)) == identity


def test_identity_metadata_is_plain_and_never_holds_the_token(mixed: TokenVerifier) -> None:
    token = sign(claims(jti=None, exp=NOW + 60.9))
    identity = mixed.verify(token)
    metadata = identity.as_metadata()
    assert metadata == {
        "subject": "alice",
        "groups": ["dev", "ops"],
        "token_id": None,
        "issuer": ISSUER,
        "expires_at": NOW + 60,
        "fingerprint": identity.fingerprint,
    }
    assert re.fullmatch(r"[0-9a-f]{16}", identity.fingerprint)
    assert token not in repr(identity) and token not in json.dumps(metadata)


@pytest.mark.parametrize(
    ("groups_claim", "payload_groups", "expected"),
    [
        ("groups", {"groups": "a b,c , a"}, ("a", "b", "c")),
        ("groups", {"groups": []}, ()),
        ("groups", {}, ()),
        ("realm_access.roles", {"realm_access": {"roles": ["admin", "dev"]}}, ("admin", "dev")),
        ("https://example.com/groups", {"https://example.com/groups": ["x"]}, ("x",)),
        ("scp", {"scp": "read write"}, ("read", "write")),
    ],
)
def test_groups_claim_shapes(
    jwks_path: Path, groups_claim: str, payload_groups: dict[str, Any], expected: tuple[str, ...]
) -> None:
    v = verifier(JwksFileSource(jwks_path), groups_claim=groups_claim)
    assert v.verify(sign({**claims(groups=None), **payload_groups})).groups == expected


def test_leeway_accepts_small_clock_skew(jwks_path: Path) -> None:
    v = verifier(JwksFileSource(jwks_path), leeway_seconds=30)
    assert v.verify(sign(claims(exp=NOW - 29, nbf=NOW + 29, iat=NOW + 29))).subject == "alice"
    assert rejection(v.verify, sign(claims(exp=NOW - 30))).reason == "expired"


def test_token_without_kid_needs_exactly_one_key(tmp_path: Path, jwks_path: Path) -> None:
    pem = tmp_path / "key.pem"
    pem.write_bytes(public_pem(RSA_KEY))
    single = verifier(PemKeySource(pem))
    assert single.verify(sign(kid=None)).subject == "alice"
    # A lone key configured without a kid also accepts the IdP's kid label.
    assert single.verify(sign(kid="whatever-the-idp-says")).subject == "alice"
    several = verifier(JwksFileSource(jwks_path))
    assert rejection(several.verify, sign(kid=None)).reason == "missing_kid"


def test_pem_certificate_and_key_kinds(tmp_path: Path) -> None:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(RSA_KEY.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .sign(RSA_KEY, hashes.SHA256())
    )
    cert_path = tmp_path / "idp.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    assert verifier(PemKeySource(cert_path, kid="rsa-1")).verify(sign()).subject == "alice"
    ed_path = tmp_path / "ed.pem"
    ed_path.write_bytes(public_pem(ED_KEY))
    ed_verifier = verifier(PemKeySource(ed_path, kid="ed"))
    assert ed_verifier.verify(sign(key=ED_KEY, alg="EdDSA", kid="ed")).subject == "alice"


# --- attack suite: each case asserts the exact reason code ---------------------------------


def _hs256_with_rsa_public_pem() -> str:
    """The classic confusion: HMAC keyed with the RSA public key the verifier knows."""
    header = {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}"
    mac = hmac.new(public_pem(RSA_KEY), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def _tampered_payload() -> str:
    genuine = sign(claims(sub="alice")).split(".")
    forged = sign(claims(sub="root", groups=["admin"])).split(".")
    return f"{genuine[0]}.{forged[1]}.{genuine[2]}"


def _resigned(change: Any) -> str:
    """A valid token whose signature bytes were changed, re-encoded canonically."""
    head, body, signature = sign().split(".")
    raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    return f"{head}.{body}.{b64(change(raw))}"


ATTACKS: dict[str, tuple[Any, str]] = {
    "alg_none_unsigned": (
        lambda: raw_token({"alg": "none", "kid": "rsa-1"}, claims(), b""),
        "alg_not_allowed",
    ),
    "alg_None_with_signature": (
        lambda: raw_token({"alg": "None", "kid": "rsa-1"}, claims(), b"x"),
        "alg_not_allowed",
    ),
    "hs256_keyed_with_rsa_public_pem": (_hs256_with_rsa_public_pem, "alg_not_allowed"),
    "rsa_kid_used_with_hs_alg": (
        lambda: sign(key=SECRET, alg="HS256", kid="rsa-1"),
        "alg_not_allowed",
    ),
    "hs_kid_used_with_rs_alg": (lambda: sign(kid="hs-1"), "alg_not_allowed"),
    "ec_kid_used_with_rs_alg": (lambda: sign(kid="ec-1"), "alg_not_allowed"),
    "hs384_outside_allowlist": (
        lambda: sign(key=SECRET * 2, alg="HS384", kid="hs-1"),
        "alg_not_allowed",
    ),
    "expired": (lambda: sign(claims(exp=NOW - 3600)), "expired"),
    "not_yet_valid": (lambda: sign(claims(nbf=NOW + 3600)), "not_yet_valid"),
    "issued_in_future": (lambda: sign(claims(iat=NOW + 3600)), "issued_in_future"),
    "wrong_issuer": (lambda: sign(claims(iss="https://evil.example")), "wrong_issuer"),
    "wrong_audience": (lambda: sign(claims(aud=["other-api"])), "wrong_audience"),
    "unknown_kid": (lambda: sign(kid="rotated-away"), "unknown_kid"),
    "tampered_payload": (_tampered_payload, "bad_signature"),
    "signed_by_other_key_same_kid": (lambda: sign(key=OTHER_RSA_KEY), "bad_signature"),
    "truncated_signature": (lambda: _resigned(lambda sig: sig[:-3]), "bad_signature"),
    "empty_signature": (lambda: _resigned(lambda sig: b""), "malformed"),
    "two_segments": (lambda: ".".join(sign().split(".")[:2]), "malformed"),
    "four_segments": (lambda: sign() + ".e30", "malformed"),
    "jwe_five_segments": (lambda: "eyJhbGciOiJSU0EifQ.a.b.c.d", "malformed"),
    "empty": (lambda: "", "malformed"),
    "bad_base64_header": (lambda: "!!!." + sign().split(".", 1)[1], "malformed"),
    "bad_base64_signature": (lambda: sign()[:-4] + "!!!!", "malformed"),
    "padded_segment": (lambda: sign() + "==", "malformed"),
    "non_json_header": (lambda: b64(b"not json") + "." + sign().split(".", 1)[1], "malformed"),
    "header_is_array": (lambda: raw_token(b'["RS256"]', claims(), b"sig"), "malformed"),
    "header_duplicate_alg": (
        lambda: raw_token(b'{"alg":"HS256","alg":"RS256","kid":"rsa-1"}', claims(), b"s"),
        "malformed",
    ),
    "header_without_alg": (lambda: raw_token({"kid": "rsa-1"}, claims(), b"s"), "malformed"),
    "header_kid_not_string": (
        lambda: raw_token({"alg": "RS256", "kid": 7}, claims(), b"s"),
        "malformed",
    ),
    "header_crit_extension": (
        lambda: sign(headers={"crit": ["b64"], "b64": False}),
        "malformed",
    ),
    "non_ascii": (lambda: sign() + "é", "malformed"),
    "oversized": (lambda: sign(claims(padding="x" * 20000)), "too_large"),
    "oversized_garbage": (lambda: "%" * 16385, "too_large"),
    "payload_duplicate_sub": (
        lambda: sign(json.dumps(claims()).encode()[:-1] + b',"sub":"root"}'),
        "malformed",
    ),
    "payload_not_json": (lambda: sign(b"hello"), "malformed"),
    "payload_nan": (lambda: sign(b'{"sub": NaN}'), "malformed"),
    "missing_sub": (lambda: sign(claims(sub=None)), "missing_claim"),
    "missing_exp": (lambda: sign(claims(exp=None)), "missing_claim"),
    "missing_iat": (lambda: sign(claims(iat=None)), "missing_claim"),
    "missing_iss": (lambda: sign(claims(iss=None)), "missing_claim"),
    "missing_aud": (lambda: sign(claims(aud=None)), "missing_claim"),
    "exp_as_string": (lambda: sign(claims(exp="tomorrow")), "invalid_claim"),
    "exp_as_bool": (lambda: sign(claims(exp=True)), "invalid_claim"),
    "aud_as_number": (lambda: sign(claims(aud=5)), "invalid_claim"),
    "sub_empty": (lambda: sign(claims(sub="")), "invalid_claim"),
    "jti_not_string": (lambda: sign(claims(jti=7)), "invalid_claim"),
    "groups_as_object": (lambda: sign(claims(groups={"admin": True})), "invalid_claim"),
    "groups_with_non_string": (lambda: sign(claims(groups=["dev", 1])), "invalid_claim"),
}


@pytest.mark.parametrize("case", sorted(ATTACKS))
def test_attack_is_rejected_with_exact_reason(mixed: TokenVerifier, case: str) -> None:
    make_token, reason = ATTACKS[case]
    token = make_token()
    assert rejection(mixed.verify, token).reason == reason
    assert rejection(lambda t: asyncio.run(mixed.averify(t)), token).reason == reason


def test_missing_claim_names_the_claim_only(mixed: TokenVerifier) -> None:
    error = rejection(mixed.verify, sign(claims(sub=None)))
    assert (error.reason, error.claim, str(error)) == ("missing_claim", "sub", "missing_claim: sub")


def test_hmac_alone_is_refused_without_a_shared_secret(jwks_path: Path) -> None:
    asymmetric_only = verifier(JwksFileSource(jwks_path))
    assert rejection(asymmetric_only.verify, _hs256_with_rsa_public_pem()).reason == (
        "alg_not_allowed"
    )


def test_too_old_with_max_token_age(jwks_path: Path) -> None:
    v = verifier(JwksFileSource(jwks_path), max_token_age_seconds=600)
    assert v.verify(sign(claims(iat=NOW - 600))).subject == "alice"
    assert rejection(v.verify, sign(claims(iat=NOW - 700))).reason == "too_old"


def test_duplicate_kid_with_distinct_keys_is_ambiguous(tmp_path: Path) -> None:
    path = write_json(
        tmp_path / "dup.json", {"keys": [jwk(RSA_KEY, "dup"), jwk(OTHER_RSA_KEY, "dup")]}
    )
    v = verifier(JwksFileSource(path))
    for key in (RSA_KEY, OTHER_RSA_KEY):
        assert rejection(v.verify, sign(key=key, kid="dup")).reason == "ambiguous_kid"


def test_duplicate_kid_with_the_same_key_collapses(tmp_path: Path) -> None:
    entry = jwk(RSA_KEY, "same", alg="RS256")
    path = write_json(tmp_path / "dup.json", {"keys": [entry, dict(entry)]})
    assert verifier(JwksFileSource(path)).verify(sign(kid="same")).subject == "alice"


def test_same_kid_in_two_sources_is_ambiguous(tmp_path: Path, jwks_path: Path) -> None:
    pem = tmp_path / "other.pem"
    pem.write_bytes(public_pem(OTHER_RSA_KEY))
    v = verifier(JwksFileSource(jwks_path), PemKeySource(pem, kid="rsa-1"))
    assert rejection(v.verify, sign()).reason == "ambiguous_kid"


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # signing with it
def test_jwks_entries_that_must_not_verify_are_skipped(tmp_path: Path) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private_rsa = jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY, as_dict=True)
    entries = [
        {"kty": "oct", "kid": "oct", "k": b64(SECRET)},
        jwk(RSA_KEY, "enc", use="enc"),
        {**private_rsa, "kid": "private"},
        jwk(weak, "weak"),
        jwk(RSA_KEY, "hs-labelled", alg="HS256"),
        jwk(RSA_KEY, "verify-not-allowed", key_ops=["encrypt"]),
        {"kty": "RSA", "kid": "garbage", "n": "!!", "e": "AQAB"},
        "not-an-object",
        jwk(EC_KEY, "good"),
    ]
    v = verifier(JwksFileSource(write_json(tmp_path / "mixed.json", {"keys": entries})))
    assert v.verify(sign(key=EC_KEY, alg="ES256", kid="good")).subject == "alice"
    assert rejection(v.verify, sign(key=SECRET, alg="HS256", kid="oct")).reason == (
        "alg_not_allowed"
    )
    for kid in ("enc", "private", "hs-labelled", "verify-not-allowed"):
        assert rejection(v.verify, sign(kid=kid)).reason == "unknown_kid"
    assert rejection(v.verify, sign(key=weak, kid="weak")).reason == "unknown_kid"


def test_jwk_alg_narrows_the_key(tmp_path: Path) -> None:
    path = write_json(tmp_path / "j.json", {"keys": [jwk(RSA_KEY, "rsa-1", alg="PS256")]})
    v = verifier(JwksFileSource(path))
    assert v.verify(sign(alg="PS256")).subject == "alice"
    assert rejection(v.verify, sign(alg="RS256")).reason == "alg_not_allowed"


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.text(max_size=300))
def test_arbitrary_text_only_ever_raises_token_rejected(mixed: TokenVerifier, garbage: str) -> None:
    with pytest.raises(TokenRejected):
        mixed.verify(garbage)


VALID_TOKEN = sign()


@pytest.fixture(scope="module")
def rsa_only(tmp_path_factory: pytest.TempPathFactory) -> TokenVerifier:
    path = tmp_path_factory.mktemp("rsa-only") / "jwks.json"
    return verifier(JwksFileSource(write_json(path, {"keys": [jwk(RSA_KEY, "rsa-1")]})))


@settings(max_examples=200)
@given(
    position=st.integers(min_value=0, max_value=len(VALID_TOKEN) - 1),
    replacement=st.sampled_from(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    ),
)
def test_any_single_character_change_is_rejected(
    rsa_only: TokenVerifier, position: int, replacement: str
) -> None:
    assert rsa_only.verify(VALID_TOKEN).subject == "alice"
    if VALID_TOKEN[position] == replacement:
        return
    mutated = VALID_TOKEN[:position] + replacement + VALID_TOKEN[position + 1 :]
    with pytest.raises(TokenRejected):
        rsa_only.verify(mutated)


def test_a_non_canonical_base64url_spelling_of_a_segment_is_rejected(
    rsa_only: TokenVerifier,
) -> None:
    """Another spelling of the same signature bytes (the last character's unused bits set) would
    be a second token string for one token: a different fingerprint for revocation and replay."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    head, _, signature = VALID_TOKEN.rpartition(".")
    unused = 0b1111 if len(signature) % 4 == 2 else 0b11
    assert len(signature) % 4 in (2, 3)
    alias = alphabet[alphabet.index(signature[-1]) | 1]
    mutated = f"{head}.{signature[:-1]}{alias}"
    assert mutated != VALID_TOKEN and unused & 1
    padded = signature + "=" * (-len(signature) % 4)
    assert base64.urlsafe_b64decode(padded) == base64.urlsafe_b64decode(
        mutated.rpartition(".")[2] + "=" * (-len(signature) % 4)
    )
    with pytest.raises(TokenRejected):
        rsa_only.verify(mutated)


# --- key source configuration errors --------------------------------------------------------


def test_key_source_configuration_is_strict(tmp_path: Path, jwks_path: Path) -> None:
    private = tmp_path / "private.pem"
    private.write_bytes(
        RSA_KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    weak = tmp_path / "weak.pem"
    weak.write_bytes(public_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    ec_pem = tmp_path / "ec.pem"
    ec_pem.write_bytes(public_pem(EC_KEY))
    empty_jwks = write_json(tmp_path / "empty.json", {"keys": [{"kty": "oct", "k": "AAAA"}]})
    failing = {
        "private key as pem source": lambda: PemKeySource(private),
        "weak rsa": lambda: PemKeySource(weak),
        "ec key with rs alg": lambda: PemKeySource(ec_pem, algorithms=["RS256"]),
        "pem with hs alg": lambda: PemKeySource(ec_pem, algorithms=["HS256"]),
        "jwks with none": lambda: JwksFileSource(jwks_path, algorithms=["none"]),
        "jwks with hs": lambda: JwksFileSource(jwks_path, algorithms=["HS256"]),
        "jwks without usable keys": lambda: JwksFileSource(empty_jwks),
        "jwks not json": lambda: JwksFileSource(write_json(tmp_path / "x.json", [1])),
        "missing file": lambda: JwksFileSource(tmp_path / "nope.json"),
        "short secret": lambda: SharedSecretSource(b"x" * 31),
        "hs512 needs 64 bytes": lambda: SharedSecretSource(SECRET, algorithms=["HS512"]),
        "pem as secret": lambda: SharedSecretSource(public_pem(RSA_KEY)),
        "secret with rs alg": lambda: SharedSecretSource(SECRET, algorithms=["RS256"]),
        "secret with empty allowlist": lambda: SharedSecretSource(SECRET, algorithms=[]),
        "plain http jwks url": lambda: JwksUrlSource("http://idp.example/jwks"),
        "ftp jwks url": lambda: JwksUrlSource("ftp://idp.example/jwks"),
        "max_age above max_stale": lambda: JwksUrlSource(
            "https://idp.example/jwks", max_age=10, max_stale=5
        ),
    }
    for name, build in failing.items():
        with pytest.raises(KeySourceError):
            build()
            pytest.fail(name)
    assert "SECRET" not in repr(SharedSecretSource(SECRET).usable_keys())
    assert str(SECRET) not in repr(SharedSecretSource(SECRET).usable_keys())


@pytest.mark.parametrize(
    "options",
    [
        {"issuers": ()},
        {"audiences": ()},
        {"issuers": "https://idp.example"},
        {"leeway_seconds": -1},
        {"max_token_bytes": 0},
        {"max_token_age_seconds": 0},
        {"required_claims": ("",)},
    ],
)
def test_policy_validation(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TokenPolicy(**{"issuers": (ISSUER,), "audiences": (AUDIENCE,), **options})


def test_policy_normalises_lists_to_tuples() -> None:
    policy = TokenPolicy(issuers=[ISSUER], audiences=[AUDIENCE])  # type: ignore[arg-type]
    assert policy.issuers == (ISSUER,) and policy.audiences == (AUDIENCE,)


# --- token extraction -----------------------------------------------------------------------


def basic(user_and_password: str) -> str:
    return "Basic " + base64.b64encode(user_and_password.encode()).decode()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (basic(f"agent:{VALID_TOKEN}"), VALID_TOKEN),
        (basic("agent:pa:ss:word"), "pa:ss:word"),
        (basic(":only-password"), "only-password"),
        ("basic " + basic("agent:tok")[6:], "tok"),
        (f"Bearer {VALID_TOKEN}", VALID_TOKEN),
        (f"bearer   {VALID_TOKEN}  ", VALID_TOKEN),
        ("BEARER tok", "tok"),
        (basic("agent-without-password"), None),
        (basic("agent:"), None),
        ("Basic !!!not-base64!!!", None),
        ("Basic " + base64.b64encode(b"agent:\xff\xfe").decode(), None),
        ("Bearer", None),
        ("Bearer a b", None),
        ("Digest username=agent", None),
        ("", None),
        ("garbage", None),
    ],
)
def test_token_from_proxy_authorization(value: str, expected: str | None) -> None:
    assert token_from_proxy_authorization(value) == expected


def test_proxy_authorization_size_cap_before_decoding() -> None:
    with pytest.raises(TokenRejected) as info:
        token_from_proxy_authorization("Basic " + "A" * 70000)
    assert info.value.reason == "too_large"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Authorization": "Bearer t1"}, ("authorization", "t1")),
        ({"x-api-key": "t1"}, ("x-api-key", "t1")),
        ({"API-Key": " t1 "}, ("api-key", "t1")),
        ({"authorization": "Bearer t1", "x-api-key": "t1"}, ("authorization", "t1")),
        ({"authorization": "Basic dXNlcjpwdw==", "x-api-key": "t1"}, ("x-api-key", "t1")),
        ({"x-api-key": ""}, None),
        ({"content-type": "application/json"}, None),
        ({}, None),
    ],
)
def test_token_from_inner_headers(headers: dict[str, str], expected: Any) -> None:
    assert token_from_inner_headers(headers) == expected


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": "Bearer t1", "x-api-key": "t2"},
        {"x-api-key": "t1", "api-key": "t2"},
        {"X-Api-Key": "t1", "x-api-key": "t2"},
    ],
)
def test_disagreeing_inner_tokens_are_ambiguous(headers: dict[str, str]) -> None:
    with pytest.raises(TokenRejected) as info:
        token_from_inner_headers(headers)
    assert info.value.reason == "ambiguous_token"
    assert "t1" not in str(info.value) and "t2" not in str(info.value)


def test_inner_header_sources_restrict_and_order() -> None:
    headers = {"authorization": "Bearer t1", "x-api-key": "t2"}
    assert token_from_inner_headers(headers, sources=("x-api-key",)) == ("x-api-key", "t2")
    with pytest.raises(ValueError):
        token_from_inner_headers(headers, sources=("cookie",))


# --- JWKS over HTTP ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class JwksServer:
    """A tiny JWKS endpoint on 127.0.0.1 that counts hits and can fail or stall on demand."""

    def __init__(self) -> None:
        self.document: Any = {"keys": [jwk(RSA_KEY, "rsa-1")]}
        self.status = 200
        self.delay = 0.0
        self.hits = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits += 1
                time.sleep(server.delay)
                body = json.dumps(server.document).encode()
                self.send_response(server.status)
                if server.status in (301, 302):
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[JwksServer]:
    s = JwksServer()
    yield s
    s.close()


def url_verifier(url: str, clock: FakeClock, **options: Any) -> TokenVerifier:
    source = JwksUrlSource(url, timeout=2, clock=clock, **options)
    return verifier(source)


def test_url_source_loads_lazily_then_serves_from_cache(server: JwksServer) -> None:
    v = url_verifier(server.url, FakeClock())
    assert rejection(v.verify, sign()).reason == "jwks_unavailable"  # sync never fetches
    assert server.hits == 0
    assert asyncio.run(v.averify(sign())).subject == "alice"
    assert asyncio.run(v.averify(sign())).subject == "alice"
    assert v.verify(sign()).subject == "alice"
    assert server.hits == 1


def test_arefresh_warms_the_cache_for_sync_verify(server: JwksServer) -> None:
    v = url_verifier(server.url, FakeClock())
    asyncio.run(v.arefresh())
    assert v.verify(sign()).subject == "alice"
    assert server.hits == 1


def test_rotation_is_picked_up_on_unknown_kid_within_rate_limit(server: JwksServer) -> None:
    clock = FakeClock()
    v = url_verifier(server.url, clock, min_refetch_interval=30)
    asyncio.run(v.arefresh())
    server.document = {"keys": [jwk(RSA_KEY, "rsa-1"), jwk(OTHER_RSA_KEY, "rsa-2")]}
    rotated = sign(key=OTHER_RSA_KEY, kid="rsa-2")
    assert rejection(v.verify, rotated).reason == "unknown_kid"
    clock.now += 10  # inside the interval: no refetch yet
    averify = lambda t: asyncio.run(v.averify(t))  # noqa: E731
    assert rejection(averify, rotated).reason == "unknown_kid"
    assert server.hits == 1
    clock.now += 21
    assert averify(rotated).subject == "alice"
    assert server.hits == 2


def test_unknown_kid_flood_causes_one_fetch_per_interval(server: JwksServer) -> None:
    clock = FakeClock()
    v = url_verifier(server.url, clock, min_refetch_interval=30)
    server.delay = 0.05  # keep the fetch in flight while the flood arrives

    async def flood() -> list[Any]:
        tokens = [sign(kid=f"invented-{i}") for i in range(40)]
        return await asyncio.gather(*(v.averify(t) for t in tokens), return_exceptions=True)

    results = asyncio.run(flood())
    assert {r.reason for r in results if isinstance(r, TokenRejected)} == {"unknown_kid"}
    assert len(results) == 40 and server.hits == 1  # initial load doubles as the refetch
    clock.now += 5
    asyncio.run(flood())
    assert server.hits == 1
    clock.now += 30
    asyncio.run(flood())
    assert server.hits == 2


def test_unreachable_jwks_url_is_unavailable_not_a_crash() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    v = url_verifier(f"http://127.0.0.1:{port}/jwks", FakeClock())
    averify = lambda t: asyncio.run(v.averify(t))  # noqa: E731
    assert rejection(averify, sign()).reason == "jwks_unavailable"
    assert rejection(averify, sign(kid=None)).reason == "jwks_unavailable"
    assert rejection(v.verify, sign()).reason == "jwks_unavailable"


@pytest.mark.parametrize("status", [500, 404, 302])
def test_failing_jwks_endpoint_is_retried_only_after_the_interval(
    server: JwksServer, status: int
) -> None:
    clock = FakeClock()
    server.status = status
    v = url_verifier(server.url, clock, min_refetch_interval=30)
    averify = lambda t: asyncio.run(v.averify(t))  # noqa: E731
    for _ in range(5):
        assert rejection(averify, sign()).reason == "jwks_unavailable"
    assert server.hits == 1  # a redirect is not followed either
    server.status = 200
    clock.now += 31
    assert averify(sign()).subject == "alice"
    assert server.hits == 2


def test_oversized_or_invalid_jwks_response_is_unavailable(server: JwksServer) -> None:
    v = url_verifier(server.url, FakeClock(), max_bytes=100)
    assert rejection(lambda t: asyncio.run(v.averify(t)), sign()).reason == "jwks_unavailable"
    server.document = {"keys": [{"kty": "oct", "k": "AAAA"}]}
    v = url_verifier(server.url, FakeClock())
    assert rejection(lambda t: asyncio.run(v.averify(t)), sign()).reason == "jwks_unavailable"


def test_max_age_refetches_and_max_stale_fails_closed(server: JwksServer) -> None:
    clock = FakeClock()
    v = url_verifier(server.url, clock, min_refetch_interval=1, max_age=60, max_stale=600)
    averify = lambda t: asyncio.run(v.averify(t))  # noqa: E731
    assert averify(sign()).subject == "alice"
    clock.now += 61
    assert averify(sign()).subject == "alice"
    assert server.hits == 2  # stale cache refreshed although the kid was known
    server.status = 500
    clock.now += 300
    assert averify(sign()).subject == "alice"  # refresh failed: old keys still within max_stale
    assert server.hits == 3
    clock.now += 301
    assert rejection(averify, sign()).reason == "jwks_unavailable"
    assert rejection(v.verify, sign()).reason == "jwks_unavailable"


def test_jwks_fetch_does_not_block_the_event_loop(server: JwksServer) -> None:
    server.delay = 0.3
    v = url_verifier(server.url, FakeClock())

    async def scenario() -> tuple[Identity, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        identity = await v.averify(sign())
        task.cancel()
        return identity, ticks

    identity, ticks = asyncio.run(scenario())
    assert identity.subject == "alice"
    assert ticks >= 10


def test_plain_http_is_allowed_only_to_loopback_or_explicitly() -> None:
    JwksUrlSource("http://127.0.0.1:1/jwks")
    JwksUrlSource("http://localhost:1/jwks")
    JwksUrlSource("http://[::1]:1/jwks")
    JwksUrlSource("http://idp.internal/jwks", allow_insecure_http=True)
    with pytest.raises(KeySourceError):
        JwksUrlSource("http://10.0.0.1/jwks")


# --- remembered signatures -----------------------------------------------------------------------


def counting_signature_checks(v: TokenVerifier) -> list[str]:
    """Every signature check `v` makes from now on appends the token checked."""
    checked: list[str] = []
    decode = v._jws.decode_complete

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        checked.append(token)
        return decode(token, *args, **kwargs)

    v._jws.decode_complete = counting  # type: ignore[method-assign]
    return checked


def test_a_verified_signature_is_remembered_but_claims_are_checked_every_time(
    jwks_path: Path,
) -> None:
    clock = FakeClock()
    clock.now = NOW
    v = verifier(JwksFileSource(jwks_path), clock=clock, leeway_seconds=30)
    checked = counting_signature_checks(v)
    token = sign(claims(exp=NOW + 300, nbf=NOW + 100), kid="rsa-1")
    assert rejection(v.verify, token).reason == "not_yet_valid"
    clock.now = NOW + 100
    for _ in range(3):
        assert v.verify(token).subject == "alice"
        assert asyncio.run(v.averify(token)).subject == "alice"
    assert checked == [token]  # one signature check, the not-yet-valid call included
    clock.now = NOW + 300 + 30  # expiry (with leeway) reached while the signature is remembered
    assert rejection(v.verify, token).reason == "expired"
    assert rejection(lambda t: asyncio.run(v.averify(t)), token).reason == "expired"


def test_a_remembered_token_with_another_signature_or_payload_is_verified_again(
    jwks_path: Path,
) -> None:
    v = verifier(JwksFileSource(jwks_path))
    checked = counting_signature_checks(v)
    token = sign()
    assert v.verify(token).subject == "alice"
    head, payload, signature = token.split(".")
    other_payload = b64(json.dumps(claims(sub="mallory")).encode())
    forged_signature = b64(base64.urlsafe_b64decode(signature + "==")[::-1])
    for forged in (f"{head}.{other_payload}.{signature}", f"{head}.{payload}.{forged_signature}"):
        assert rejection(v.verify, forged).reason == "bad_signature"
    assert len(checked) == 3


def test_a_key_removed_from_the_jwks_refuses_remembered_tokens(server: JwksServer) -> None:
    clock = FakeClock()
    v = url_verifier(server.url, clock, min_refetch_interval=1, max_age=60)
    averify = lambda t: asyncio.run(v.averify(t))  # noqa: E731
    token = sign(kid="rsa-1")
    assert averify(token).subject == "alice"
    server.document = {"keys": [jwk(OTHER_RSA_KEY, "rsa-2")]}  # rsa-1 revoked
    clock.now += 61
    assert rejection(averify, token).reason == "unknown_kid"
    assert rejection(v.verify, token).reason == "unknown_kid"


def test_a_key_replaced_under_the_same_kid_verifies_remembered_tokens_again(
    server: JwksServer,
) -> None:
    clock = FakeClock()
    v = url_verifier(server.url, clock, min_refetch_interval=1, max_age=60)
    checked = counting_signature_checks(v)
    averify = lambda t: asyncio.run(v.averify(t))  # noqa: E731
    token = sign(kid="rsa-1")
    assert averify(token).subject == "alice"
    clock.now += 61
    assert averify(token).subject == "alice"  # same keys refetched: checked once more
    assert len(checked) == 2
    server.document = {"keys": [jwk(OTHER_RSA_KEY, "rsa-1")]}
    clock.now += 61
    assert rejection(averify, token).reason == "bad_signature"
    assert rejection(v.verify, token).reason == "bad_signature"


def test_a_stale_key_set_refuses_remembered_tokens(server: JwksServer) -> None:
    clock = FakeClock()
    v = url_verifier(server.url, clock, min_refetch_interval=1, max_age=60, max_stale=600)
    token = sign(claims(exp=NOW + 10**6))
    assert asyncio.run(v.averify(token)).subject == "alice"
    server.status = 500
    clock.now += 601
    assert rejection(lambda t: asyncio.run(v.averify(t)), token).reason == "jwks_unavailable"
    assert rejection(v.verify, token).reason == "jwks_unavailable"


def test_remembered_signatures_are_bounded(
    jwks_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sluicegate.auth.verifier as tokens_module

    monkeypatch.setattr(tokens_module, "VERIFIED_TOKENS", 3)
    v = verifier(JwksFileSource(jwks_path))
    checked = counting_signature_checks(v)
    minted = [sign(claims(jti=f"token-{i}")) for i in range(5)]
    for token in minted:
        v.verify(token)
    assert len(v._verified) == 3
    v.verify(minted[0])  # evicted: checked again
    v.verify(minted[4])  # kept
    assert checked == [*minted, minted[0]]
    assert all(token.encode() not in repr(v._verified).encode() for token in minted)
