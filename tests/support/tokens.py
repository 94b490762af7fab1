"""Test identity provider: an RSA signing key, its JWKS file, and a token minter.

Independent of sluicegate's own token code on purpose: tests must not trust the code under test
to produce the tokens that code verifies.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "https://idp.test.local"
AUDIENCE = "sluicegate"


class TestIdP:
    __test__ = False  # a helper, not a test class

    def __init__(self, directory: Path, kid: str = "test-key-1") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.kid = kid
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = self.private_key.public_key()
        self.public_pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
        jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
        self.jwks_file = directory / "jwks.json"
        self.jwks_file.write_text(json.dumps({"keys": [jwk]}))
        self.public_key_file = directory / "idp-public.pem"
        self.public_key_file.write_bytes(self.public_pem)

    def mint(
        self,
        subject: str = "agent-alice",
        groups: tuple[str, ...] | list[str] = ("agents",),
        *,
        ttl: int = 600,
        issuer: str = ISSUER,
        audience: str = AUDIENCE,
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload = {
            "iss": issuer,
            "aud": audience,
            "sub": subject,
            "groups": list(groups),
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": uuid.uuid4().hex,
            **claims,
        }
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(
            payload,
            self.private_key,
            algorithm="RS256",
            headers={"kid": self.kid, **(headers or {})},
        )

    def auth_config(self) -> dict[str, Any]:
        """The `auth:` section of a gateway config trusting this IdP."""
        return {
            "keys": [{"id": "test-idp", "jwks_file": str(self.jwks_file), "algorithms": ["RS256"]}],
            "issuers": [ISSUER],
            "audiences": [AUDIENCE],
        }
