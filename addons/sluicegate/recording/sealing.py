"""Sealed originals: pre-redaction bodies encrypted to an auditor's public key.

Recordings hold what the agent saw (redacted). When an investigation needs the original, only the
holder of the auditor's private key can reveal it; the gateway itself can seal but never unseal.

Hybrid encryption, one fresh key per sealed body: an ephemeral X25519 key agreement with the
auditor's public key, HKDF-SHA256 to an AES-256-GCM key, and the flow id and body part as
associated data, so a sealed body cannot be moved to another flow or part unnoticed.

Blob layout: `MAGIC (4) | ephemeral public key (32) | nonce (12) | ciphertext + tag`.
"""

from __future__ import annotations

import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"SGS1"
ALGORITHM = "X25519-HKDF-SHA256-AES256GCM"
_INFO = b"sluicegate-sealed-original-v1"
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class SealError(Exception):
    """Sealing or unsealing failed; `code` is stable and the message never holds key material."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def key_id(public_key: X25519PublicKey) -> str:
    """Short id of an auditor key, stored with each sealed body to find the right private key."""
    return hashlib.sha256(public_key.public_bytes(*_RAW)).hexdigest()[:16]


def load_public_key(pem: bytes) -> X25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise SealError("bad_key", "not a PEM public key") from None
    if not isinstance(key, X25519PublicKey):
        raise SealError("bad_key", "the auditor key must be an X25519 public key")
    return key


def load_private_key(pem: bytes) -> X25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise SealError("bad_key", "not an unencrypted PEM private key") from None
    if not isinstance(key, X25519PrivateKey):
        raise SealError("bad_key", "the auditor key must be an X25519 private key")
    return key


def generate_keypair() -> tuple[bytes, bytes]:
    """A new auditor key pair as (private PEM, public PEM)."""
    private = X25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem


def _derive(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=_INFO
    ).derive(shared)


class Sealer:
    """Encrypts to one auditor public key."""

    def __init__(self, recipient: X25519PublicKey) -> None:
        self._recipient = recipient
        self._recipient_raw = recipient.public_bytes(*_RAW)
        self.key_id = key_id(recipient)

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        """Encrypt `plaintext`; `context` (e.g. flow id and part) must be given again to unseal."""
        ephemeral = X25519PrivateKey.generate()
        ephemeral_raw = ephemeral.public_key().public_bytes(*_RAW)
        key = _derive(ephemeral.exchange(self._recipient), ephemeral_raw, self._recipient_raw)
        nonce = os.urandom(12)
        return MAGIC + ephemeral_raw + nonce + AESGCM(key).encrypt(nonce, plaintext, context)


def unseal(private_key: X25519PrivateKey, blob: bytes, context: bytes) -> bytes:
    """Decrypt a sealed body. Raises SealError for a wrong key, a wrong context or tampering."""
    if len(blob) < 4 + 32 + 12 + 16 or not blob.startswith(MAGIC):
        raise SealError("bad_blob", "not a sealed body")
    ephemeral_raw, nonce, ciphertext = blob[4:36], blob[36:48], blob[48:]
    recipient_raw = private_key.public_key().public_bytes(*_RAW)
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(ephemeral_raw))
    except ValueError:
        raise SealError("bad_blob", "invalid ephemeral key") from None
    key = _derive(shared, ephemeral_raw, recipient_raw)
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, context)
    except InvalidTag:
        raise SealError(
            "unseal_failed", "wrong key, wrong flow/part, or the sealed body was modified"
        ) from None
