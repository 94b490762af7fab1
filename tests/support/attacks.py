"""Hostile caller tokens, each with the reason code the gateway must refuse it with.

Built by hand where a JWT library would refuse to (alg none, HS256 keyed with the RSA public key),
independently of sluicegate's own token code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable

from tests.support.tokens import TestIdP


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj: dict) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def claims(idp: TestIdP, **overrides: object) -> dict:
    """The claims a valid token of `idp` carries (as TestIdP.mint would)."""
    payload = json.loads(base64.urlsafe_b64decode(idp.mint().split(".")[1] + "=="))
    return {**payload, **overrides}


def alg_none(idp: TestIdP) -> str:
    header = {"alg": "none", "typ": "JWT", "kid": idp.kid}
    return f"{segment(header)}.{segment(claims(idp))}."


def hs256_with_public_key(idp: TestIdP) -> str:
    """The classic key confusion: HMAC keyed with the verifier's own RSA public key."""
    signing_input = f"{segment({'alg': 'HS256', 'typ': 'JWT', 'kid': idp.kid})}."
    signing_input += segment(claims(idp))
    mac = hmac.new(idp.public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def tampered_payload(idp: TestIdP) -> str:
    header, _, signature = idp.mint(groups=["agents"]).split(".")
    return f"{header}.{segment(claims(idp, groups=['agents', 'admins']))}.{signature}"


def malformed_base64(idp: TestIdP) -> str:
    header, payload, signature = idp.mint().split(".")
    return f"{header}.{payload[:10]}*!{payload[12:]}.{signature}"


def oversized(idp: TestIdP) -> str:
    return idp.mint(padding="x" * 20_000)


def unknown_kid(idp: TestIdP) -> str:
    return idp.mint(headers={"kid": "not-a-configured-key"})


def expired(idp: TestIdP) -> str:
    return idp.mint(ttl=-600)


def not_yet_valid(idp: TestIdP) -> str:
    return idp.mint(nbf=int(time.time()) + 3600)


def wrong_issuer(idp: TestIdP) -> str:
    return idp.mint(issuer="https://evil-idp.example")


def wrong_audience(idp: TestIdP) -> str:
    return idp.mint(audience="some-other-service")


# name -> (token factory, the reason code the gateway answers with)
ATTACKS: dict[str, tuple[Callable[[TestIdP], str], str]] = {
    "alg_none": (alg_none, "alg_not_allowed"),
    "hs256_with_rsa_public_key": (hs256_with_public_key, "alg_not_allowed"),
    "expired": (expired, "expired"),
    "not_yet_valid": (not_yet_valid, "not_yet_valid"),
    "wrong_issuer": (wrong_issuer, "wrong_issuer"),
    "wrong_audience": (wrong_audience, "wrong_audience"),
    "unknown_kid": (unknown_kid, "unknown_kid"),
    "tampered_payload": (tampered_payload, "bad_signature"),
    "malformed_base64": (malformed_base64, "malformed"),
    "oversized": (oversized, "too_large"),
}
