"""Sealed originals: only the auditor's private key reveals them, for the right flow and part."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from sluicegate.recording import sealing

PRIVATE_PEM, PUBLIC_PEM = sealing.generate_keypair()
PRIVATE = sealing.load_private_key(PRIVATE_PEM)
SEALER = sealing.Sealer(sealing.load_public_key(PUBLIC_PEM))


@settings(max_examples=40, deadline=None)
@given(plaintext=st.binary(max_size=4096), context=st.binary(max_size=64))
def test_round_trip(plaintext: bytes, context: bytes) -> None:
    blob = SEALER.seal(plaintext, context)
    assert sealing.unseal(PRIVATE, blob, context) == plaintext


def test_ciphertext_does_not_contain_the_plaintext_and_is_fresh_each_time() -> None:
    secret = b"sk-live-original-secret-value" * 3
    first, second = SEALER.seal(secret, b"f1:request"), SEALER.seal(secret, b"f1:request")
    assert secret not in first and b"original-secret" not in first
    assert first != second
    assert first.startswith(sealing.MAGIC)


def test_wrong_context_is_refused() -> None:
    blob = SEALER.seal(b"body", b"flow-1:request")
    with pytest.raises(sealing.SealError) as e:
        sealing.unseal(PRIVATE, blob, b"flow-2:request")
    assert e.value.code == "unseal_failed"


def test_wrong_key_is_refused() -> None:
    other = sealing.load_private_key(sealing.generate_keypair()[0])
    blob = SEALER.seal(b"body", b"c")
    with pytest.raises(sealing.SealError, match="wrong key"):
        sealing.unseal(other, blob, b"c")


@pytest.mark.parametrize("position", [0, 5, 40, 60, -1])
def test_tampered_blob_is_refused(position: int) -> None:
    blob = bytearray(SEALER.seal(b"some original body", b"c"))
    blob[position] ^= 0x80
    with pytest.raises(sealing.SealError):
        sealing.unseal(PRIVATE, bytes(blob), b"c")


def test_truncated_blob_is_refused() -> None:
    with pytest.raises(sealing.SealError) as e:
        sealing.unseal(PRIVATE, sealing.MAGIC + b"\0" * 10, b"c")
    assert e.value.code == "bad_blob"


def test_key_id_is_stable_and_matches_the_public_key() -> None:
    assert SEALER.key_id == sealing.key_id(PRIVATE.public_key())
    assert len(SEALER.key_id) == 16


def test_other_key_types_are_rejected() -> None:
    ed = Ed25519PrivateKey.generate()
    ed_private = ed.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ed_public = ed.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(sealing.SealError, match="X25519"):
        sealing.load_public_key(ed_public)
    with pytest.raises(sealing.SealError, match="X25519"):
        sealing.load_private_key(ed_private)
    with pytest.raises(sealing.SealError) as e:
        sealing.load_public_key(b"not pem")
    assert e.value.code == "bad_key"
