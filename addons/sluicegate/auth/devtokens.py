"""Dev-only token tooling: a local signing key and tokens for the embedded default config.

The gateway itself only verifies; this module exists so a developer can run the gateway without an
IdP. RS256 is the default because every IdP and JWT library supports it. Nothing here is on the
verification path, and the CLI that wraps it must refuse to mint against a production config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from sluicegate.auth.keys import algorithms_for_key

DEV_RSA_BITS: Final = 2048
# The kid becomes part of file names, so keep it to a portable, path-free alphabet.
_KID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_STANDARD_CLAIMS: Final = frozenset({"iss", "sub", "aud", "exp", "nbf", "iat", "jti"})

PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


@dataclasses.dataclass(frozen=True)
class SigningKeyFiles:
    """Where `generate_signing_key` wrote the key pair."""

    kid: str
    private_key: Path  # PKCS#8 PEM, mode 0600
    jwks: Path  # public JWKS, what the gateway's JwksFileSource reads


def generate_signing_key(
    directory: Path | str, kid: str, *, overwrite: bool = False
) -> SigningKeyFiles:
    """Write `<kid>.private.pem` (RSA 2048, 0600) and `<kid>.jwks.json` into `directory`.

    Refuses to replace an existing key unless `overwrite`: tokens minted with it would silently
    stop verifying.
    """
    if not _KID.fullmatch(kid):
        raise ValueError("kid must be 1-64 chars of [A-Za-z0-9._-], starting alphanumeric")
    folder = Path(directory)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = SigningKeyFiles(kid, folder / f"{kid}.private.pem", folder / f"{kid}.jwks.json")
    if not overwrite and (files.private_key.exists() or files.jwks.exists()):
        raise FileExistsError(f"signing key {kid!r} already exists in {folder}")
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=DEV_RSA_BITS)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomically(files.private_key, pem, 0o600)
    jwks = json.dumps(public_jwks(pem, kid), indent=2).encode() + b"\n"
    _write_atomically(files.jwks, jwks, 0o644)
    return files


def public_jwks(private_key_pem: bytes, kid: str, alg: str | None = None) -> dict[str, Any]:
    """The public JWKS for a private key: what an IdP would publish for it."""
    private_key = _load_private_key(private_key_pem)
    public_key = private_key.public_key()
    alg = alg or _default_alg(public_key)
    if alg not in algorithms_for_key(public_key):
        raise ValueError(f"alg {alg} does not match the key type")
    jwk = json.loads(_to_jwk(public_key))
    jwk.pop("key_ops", None)  # RFC 7517 4.3: not together with "use"
    jwk.update({"kid": kid, "use": "sig", "alg": alg})
    return {"keys": [jwk]}


def mint_token(
    private_key_pem: bytes,
    kid: str,
    *,
    subject: str,
    groups: Sequence[str],
    issuer: str,
    audience: str | Sequence[str],
    ttl_seconds: int,
    extra_claims: Mapping[str, Any] | None = None,
    alg: str = "RS256",
    groups_claim: str = "groups",
    now: int | None = None,
) -> str:
    """A signed token with iss/sub/aud/iat/nbf/exp/jti and the groups claim.

    `extra_claims` may add claims but not replace the standard ones (a typo there would mint a
    token that verifies differently than its arguments say).
    """
    if ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be > 0")
    if isinstance(groups, str):
        raise ValueError("groups must be a sequence of strings, not one string")
    extra = dict(extra_claims or {})
    clashes = sorted((_STANDARD_CLAIMS | {groups_claim}) & extra.keys())
    if clashes:
        raise ValueError(f"extra_claims must not set {clashes}")
    private_key = _load_private_key(private_key_pem)
    if alg not in algorithms_for_key(private_key.public_key()):
        raise ValueError(f"alg {alg} does not match the key type")
    issued_at = int(time.time()) if now is None else now
    claims = {
        "iss": issuer,
        "sub": subject,
        "aud": audience if isinstance(audience, str) else list(audience),
        "iat": issued_at,
        "nbf": issued_at,
        "exp": issued_at + ttl_seconds,
        "jti": uuid.uuid4().hex,
        groups_claim: list(groups),
        **extra,
    }
    return jwt.encode(claims, private_key, algorithm=alg, headers={"kid": kid, "typ": "JWT"})


def _load_private_key(pem: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, PrivateKey):
        raise ValueError("unsupported private key type")
    return key


def _default_alg(public_key: Any) -> str:
    algorithms = algorithms_for_key(public_key)
    return "RS256" if "RS256" in algorithms else min(algorithms)


def _to_jwk(public_key: Any) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return jwt.algorithms.RSAAlgorithm.to_jwk(public_key)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return jwt.algorithms.ECAlgorithm.to_jwk(public_key)
    return jwt.algorithms.OKPAlgorithm.to_jwk(public_key)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write via a private temp file and rename, so a key file is never briefly world-readable."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not widen or narrow what we ask for
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
