"""Dev signing key and token minting: what they write, and that the verifier accepts it."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from sluicegate.auth.devtokens import generate_signing_key, mint_token, public_jwks
from sluicegate.auth.keys import JwksFileSource
from sluicegate.auth.verifier import TokenPolicy, TokenRejected, TokenVerifier

ISSUER = "https://sluicegate.dev.invalid"
AUDIENCE = "sluicegate"
NOW = 1_700_000_000


@pytest.fixture(scope="module")
def dev_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Path]:
    files = generate_signing_key(tmp_path_factory.mktemp("keys") / "certs", "dev-1")
    return files.private_key.read_bytes(), files.jwks


def dev_verifier(jwks: Path, **policy: object) -> TokenVerifier:
    options = {"issuers": (ISSUER,), "audiences": (AUDIENCE,), **policy}
    return TokenVerifier([JwksFileSource(jwks)], TokenPolicy(**options), clock=lambda: NOW)


def test_generated_files_are_private_key_0600_and_public_jwks(tmp_path: Path) -> None:
    files = generate_signing_key(tmp_path / "new" / "dir", "dev-1")
    assert files.private_key == tmp_path / "new" / "dir" / "dev-1.private.pem"
    assert stat.S_IMODE(files.private_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.private_key.parent.stat().st_mode) == 0o700
    private_key = serialization.load_pem_private_key(files.private_key.read_bytes(), None)
    assert private_key.key_size == 2048  # type: ignore[union-attr]
    (entry,) = json.loads(files.jwks.read_text())["keys"]
    assert {entry["kid"], entry["alg"], entry["use"], entry["kty"]} == {
        "dev-1",
        "RS256",
        "sig",
        "RSA",
    }
    assert "d" not in entry and "PRIVATE" not in files.jwks.read_text()
    assert [p.name for p in files.private_key.parent.iterdir() if p.name.startswith(".")] == []


def test_existing_key_is_not_replaced_unless_asked(tmp_path: Path) -> None:
    first = generate_signing_key(tmp_path, "dev-1")
    original = first.private_key.read_bytes()
    with pytest.raises(FileExistsError):
        generate_signing_key(tmp_path, "dev-1")
    assert first.private_key.read_bytes() == original
    second = generate_signing_key(tmp_path, "dev-1", overwrite=True)
    assert second.private_key.read_bytes() != original
    assert stat.S_IMODE(second.private_key.stat().st_mode) == 0o600


@pytest.mark.parametrize("kid", ["", "../escape", "a/b", ".hidden", "x" * 65, "sp ace"])
def test_kid_must_be_a_safe_file_name(tmp_path: Path, kid: str) -> None:
    with pytest.raises(ValueError):
        generate_signing_key(tmp_path, kid)
    assert list(tmp_path.iterdir()) == []


def test_minted_token_verifies_with_the_generated_jwks(dev_key: tuple[bytes, Path]) -> None:
    pem, jwks = dev_key
    token = mint_token(
        pem,
        "dev-1",
        subject="alice@example.com",
        groups=["platform", "ai-users"],
        issuer=ISSUER,
        audience=AUDIENCE,
        ttl_seconds=3600,
        extra_claims={"email": "alice@example.com"},
        now=NOW,
    )
    identity = dev_verifier(jwks).verify(token)
    assert (identity.subject, identity.groups, identity.issuer) == (
        "alice@example.com",
        ("platform", "ai-users"),
        ISSUER,
    )
    assert identity.expires_at == NOW + 3600
    assert identity.token_id is not None and len(identity.token_id) == 32
    header = jwt.get_unverified_header(token)
    assert (header["alg"], header["kid"], header["typ"]) == ("RS256", "dev-1", "JWT")
    payload = jwt.decode(token, options={"verify_signature": False})
    assert (payload["iat"], payload["nbf"], payload["email"]) == (NOW, NOW, "alice@example.com")


def test_minted_token_expires_after_ttl(dev_key: tuple[bytes, Path]) -> None:
    pem, jwks = dev_key
    token = mint_token(
        pem,
        "dev-1",
        subject="a",
        groups=[],
        issuer=ISSUER,
        audience=AUDIENCE,
        ttl_seconds=60,
        now=NOW - 61 - 30,
    )
    with pytest.raises(TokenRejected) as info:
        dev_verifier(jwks).verify(token)
    assert info.value.reason == "expired"


def test_custom_groups_claim_and_audience_list(dev_key: tuple[bytes, Path]) -> None:
    pem, jwks = dev_key
    token = mint_token(
        pem,
        "dev-1",
        subject="bob",
        groups=["admin"],
        issuer=ISSUER,
        audience=["other", AUDIENCE],
        ttl_seconds=60,
        groups_claim="roles",
        now=NOW,
    )
    assert dev_verifier(jwks, groups_claim="roles").verify(token).groups == ("admin",)


def test_default_now_is_the_current_time(dev_key: tuple[bytes, Path]) -> None:
    pem, _ = dev_key
    before = int(time.time())
    token = mint_token(
        pem, "dev-1", subject="a", groups=[], issuer=ISSUER, audience=AUDIENCE, ttl_seconds=60
    )
    iat = jwt.decode(token, options={"verify_signature": False})["iat"]
    assert before <= iat <= int(time.time())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ttl_seconds": 0}, "ttl_seconds"),
        ({"extra_claims": {"sub": "root"}}, "extra_claims"),
        ({"extra_claims": {"groups": ["admin"]}}, "extra_claims"),
        ({"alg": "HS256"}, "does not match"),
        ({"alg": "ES256"}, "does not match"),
        ({"groups": "admin"}, "groups"),
    ],
)
def test_mint_refuses_misleading_arguments(
    dev_key: tuple[bytes, Path], changes: dict[str, object], message: str
) -> None:
    pem, _ = dev_key
    arguments: dict[str, object] = {
        "subject": "a",
        "groups": [],
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "ttl_seconds": 60,
        **changes,
    }
    with pytest.raises(ValueError, match=message):
        mint_token(pem, "dev-1", **arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("private_key", "alg"),
    [
        (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
        (ec.generate_private_key(ec.SECP256R1()), "ES256"),
    ],
)
def test_non_rsa_keys_mint_and_verify(tmp_path: Path, private_key: object, alg: str) -> None:
    pem = private_key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(public_jwks(pem, "k1")))
    token = mint_token(
        pem,
        "k1",
        subject="a",
        groups=["g"],
        issuer=ISSUER,
        audience=AUDIENCE,
        ttl_seconds=60,
        alg=alg,
        now=NOW,
    )
    assert dev_verifier(jwks).verify(token).groups == ("g",)
    assert json.loads(jwks.read_text())["keys"][0]["alg"] == alg
    with pytest.raises(ValueError, match="does not match"):
        public_jwks(pem, "k1", alg="RS256")
