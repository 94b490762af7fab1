"""Verification keys: where they come from (JWKS file or URL, PEM, shared secret) and which
algorithms each may verify (no `none`, no HS/RS confusion, HMAC only from an explicit secret)."""

from __future__ import annotations

import abc
import asyncio
import base64
import dataclasses
import ipaddress
import json
import logging
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from http.client import HTTPException
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt import exceptions as jwt_errors

log = logging.getLogger(__name__)

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)

RSA_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
_EC_ALGORITHM_BY_CURVE: Final = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
ASYMMETRIC_ALGORITHMS: Final = RSA_ALGORITHMS | frozenset({"ES256", "ES384", "ES512", "EdDSA"})
DEFAULT_ASYMMETRIC_ALGORITHMS: Final = ASYMMETRIC_ALGORITHMS

MIN_RSA_BITS: Final = 2048
# RFC 7518 3.2: an HMAC key at least as long as the hash output.
MIN_HMAC_SECRET_BYTES: Final = {"HS256": 32, "HS384": 48, "HS512": 64}
# Private-key members of a JWK: their presence in a published key set is an IdP leak, not a key.
_PRIVATE_JWK_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_B64URL: Final = re.compile(r"[A-Za-z0-9_-]+")


class KeySourceError(ValueError):
    """A key source is misconfigured (bad file, weak key, forbidden algorithm): a config error."""


def algorithms_for_key(key: PublicKey) -> frozenset[str]:
    """The JWS algorithms a public key can verify: the basis of the no-confusion rule."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGORITHM_BY_CURVE.get(key.curve.name)
        return frozenset({alg}) if alg else frozenset()
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return frozenset({"EdDSA"})
    return frozenset()


@dataclasses.dataclass(frozen=True)
class VerificationKey:
    """One key and the algorithms it may verify; `material` stays out of repr (may be a secret)."""

    kid: str | None
    material: PublicKey | bytes = dataclasses.field(repr=False)
    algorithms: frozenset[str]
    origin: str

    def same_key(self, other: VerificationKey) -> bool:
        """Whether two entries are the same key (a JWKS may list one key twice)."""
        return self.algorithms == other.algorithms and _material_bytes(self) == _material_bytes(
            other
        )


def _material_bytes(key: VerificationKey) -> bytes:
    if isinstance(key.material, bytes):
        return key.material
    return key.material.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _checked_algorithms(
    allowed: Iterable[str], permitted: frozenset[str], origin: str
) -> frozenset[str]:
    algorithms = frozenset(allowed)
    if not algorithms:
        raise KeySourceError(f"{origin}: empty algorithm allowlist")
    forbidden = sorted(algorithms - permitted)
    if forbidden:
        raise KeySourceError(f"{origin}: algorithms not allowed for this key source: {forbidden}")
    return algorithms


def _asymmetric_key(
    kid: str | None, key: object, allowed: frozenset[str], origin: str
) -> VerificationKey:
    """Bind a public key to the algorithms both its type and the allowlist permit."""
    if not isinstance(
        key,
        rsa.RSAPublicKey
        | ec.EllipticCurvePublicKey
        | ed25519.Ed25519PublicKey
        | ed448.Ed448PublicKey,
    ):
        raise KeySourceError(f"{origin}: not a supported public key type")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise KeySourceError(f"{origin}: RSA key below {MIN_RSA_BITS} bits")
    algorithms = algorithms_for_key(key) & allowed
    if not algorithms:
        raise KeySourceError(f"{origin}: no allowed algorithm matches the key type")
    return VerificationKey(kid, key, algorithms, origin)


class KeySource(abc.ABC):
    """Where verification keys come from. `usable_keys()` never does I/O, so `verify` stays sync."""

    #: the algorithm allowlist configured for this source (checked before any key lookup)
    algorithms: frozenset[str]

    @abc.abstractmethod
    def usable_keys(self) -> tuple[VerificationKey, ...]:
        """The keys usable right now."""

    def available(self) -> bool:
        """False when keys that should exist are missing (a remote set never loaded or too old)."""
        return True

    async def arefresh(self, *, force: bool = False) -> None:  # noqa: B027 - static sources
        """Reload if due; `force` means a token named an unknown `kid`. Static sources: no-op."""

    def refresh_due(self) -> bool:
        """Whether `arefresh()` would fetch now (static sources: never)."""
        return False


class StaticKeySource(KeySource):
    """Keys loaded once at construction, so configuration errors surface at startup."""

    def __init__(self, keys: Sequence[VerificationKey], algorithms: frozenset[str]) -> None:
        self._keys = tuple(keys)
        self.algorithms = algorithms

    def usable_keys(self) -> tuple[VerificationKey, ...]:
        return self._keys


def parse_jwks(
    document: bytes | str, algorithms: frozenset[str], origin: str
) -> tuple[VerificationKey, ...]:
    """Parse a JWKS into verification keys, skipping entries that must not verify tokens.

    Skipped (logged at info, IdPs routinely publish encryption keys too): symmetric (`oct`)
    keys, keys for encryption, keys carrying private members, weak RSA keys, key types or `alg`
    values outside the allowlist. Exact duplicates collapse to one entry; distinct keys sharing
    a `kid` are kept and refused at lookup time.
    Raises KeySourceError when the document itself is not a JWKS.
    """
    try:
        data = _strict_json_object(document)
    except ValueError as exc:
        raise KeySourceError(f"{origin}: not a JSON object") from exc
    entries = data.get("keys")
    if not isinstance(entries, list):
        raise KeySourceError(f"{origin}: no 'keys' list")
    keys: list[VerificationKey] = []
    for index, entry in enumerate(entries):
        try:
            key = _jwk_to_key(entry, algorithms, f"{origin}#{index}")
        except KeySourceError as exc:
            log.info("skipping JWKS entry: %s", exc)
            continue
        if not any(key.kid == seen.kid and key.same_key(seen) for seen in keys):
            keys.append(key)
    return tuple(keys)


def _jwk_to_key(entry: object, allowed: frozenset[str], origin: str) -> VerificationKey:
    if not isinstance(entry, dict):
        raise KeySourceError(f"{origin}: not an object")
    kid = entry.get("kid")
    if kid is not None and not (isinstance(kid, str) and kid):
        raise KeySourceError(f"{origin}: invalid kid")
    if entry.get("kty") == "oct":
        raise KeySourceError(f"{origin}: symmetric keys are only accepted as a shared secret")
    if _PRIVATE_JWK_MEMBERS & entry.keys():
        raise KeySourceError(f"{origin}: contains private key material")
    if entry.get("use", "sig") != "sig":
        raise KeySourceError(f"{origin}: not a signing key")
    key_ops = entry.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise KeySourceError(f"{origin}: key_ops does not include verify")
    alg = entry.get("alg")
    if alg is not None:
        if not isinstance(alg, str) or alg not in allowed:
            raise KeySourceError(f"{origin}: alg not in the allowlist")
        allowed = frozenset({alg})
    try:
        # pyjwt's messages quote the JWK; ours do not need to.
        public_key = jwt.PyJWK(entry).key
    except (jwt_errors.PyJWTError, ValueError, TypeError, KeyError):
        raise KeySourceError(f"{origin}: unusable JWK") from None
    return _asymmetric_key(kid, public_key, allowed, origin)


class JwksFileSource(StaticKeySource):
    """A JWKS read from a local file once (rotate by reloading the config)."""

    def __init__(
        self, path: Path | str, *, algorithms: Iterable[str] = DEFAULT_ASYMMETRIC_ALGORITHMS
    ) -> None:
        origin = f"jwks file {path}"
        allowed = _checked_algorithms(algorithms, ASYMMETRIC_ALGORITHMS, origin)
        try:
            document = Path(path).read_bytes()
        except OSError as exc:
            raise KeySourceError(f"{origin}: cannot read ({exc.strerror})") from None
        keys = parse_jwks(document, allowed, origin)
        if not keys:
            raise KeySourceError(f"{origin}: no usable keys")
        super().__init__(keys, allowed)


class PemKeySource(StaticKeySource):
    """One public key (RSA/EC/Ed25519/Ed448) or X.509 certificate from a PEM file.

    Private keys are refused: the gateway only verifies, and a private key in its config is a
    mistake worth stopping on.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        kid: str | None = None,
        algorithms: Iterable[str] = DEFAULT_ASYMMETRIC_ALGORITHMS,
    ) -> None:
        origin = f"pem file {path}"
        allowed = _checked_algorithms(algorithms, ASYMMETRIC_ALGORITHMS, origin)
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise KeySourceError(f"{origin}: cannot read ({exc.strerror})") from None
        if b"PRIVATE KEY-----" in pem:
            raise KeySourceError(f"{origin}: holds a private key; configure the public key")
        try:
            if b"-----BEGIN CERTIFICATE-----" in pem:
                public_key: object = x509.load_pem_x509_certificate(pem).public_key()
            else:
                public_key = serialization.load_pem_public_key(pem)
        except ValueError:
            raise KeySourceError(f"{origin}: not a PEM public key or certificate") from None
        key = _asymmetric_key(kid, public_key, allowed, origin)
        super().__init__((key,), key.algorithms)


class SharedSecretSource(StaticKeySource):
    """An HMAC secret, the only way HS256/384/512 are ever accepted.

    The caller reads the bytes from an env var or file. Secrets shorter than the hash output and
    secrets that look like PEM keys (the classic HS/RS confusion material) are refused.
    """

    def __init__(
        self,
        secret: bytes,
        *,
        kid: str | None = None,
        algorithms: Iterable[str] = ("HS256",),
        origin: str = "shared secret",
    ) -> None:
        allowed = _checked_algorithms(algorithms, HMAC_ALGORITHMS, origin)
        min_bytes = max(MIN_HMAC_SECRET_BYTES[alg] for alg in allowed)
        if len(secret) < min_bytes:
            raise KeySourceError(f"{origin}: shorter than {min_bytes} bytes for {sorted(allowed)}")
        if b"-----BEGIN" in secret or secret.lstrip().startswith((b"ssh-", b"ecdsa-")):
            raise KeySourceError(f"{origin}: looks like a public/private key, not a secret")
        super().__init__((VerificationKey(kid, bytes(secret), allowed, origin),), allowed)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A JWKS is fetched from exactly the configured URL; a redirect is a failed fetch."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclasses.dataclass(frozen=True)
class _Cached:
    keys: tuple[VerificationKey, ...]
    loaded_at: float


class JwksUrlSource(KeySource):
    """A JWKS fetched over HTTPS, cached, refetched when due.

    - `max_age`: after this, the next `arefresh` refetches (keys rotate);
    - `max_stale`: keys older than this are dropped when refetches keep failing (fail closed:
      `jwks_unavailable` rather than trusting a key set the IdP may have revoked long ago);
    - `min_refetch_interval`: at most one fetch attempt (success or not) per interval, so a flood
      of tokens with invented `kid`s cannot turn the gateway into a JWKS hammer.
    Fetches go direct (no proxy: the gateway's own HTTPS_PROXY may point at itself), follow no
    redirects, and read at most `max_bytes`. Plain http is allowed only to loopback unless
    `allow_insecure_http` is set.
    """

    def __init__(
        self,
        url: str,
        *,
        algorithms: Iterable[str] = DEFAULT_ASYMMETRIC_ALGORITHMS,
        min_refetch_interval: float = 30.0,
        max_age: float = 600.0,
        max_stale: float = 86400.0,
        timeout: float = 5.0,
        max_bytes: int = 1 << 20,
        ssl_context: ssl.SSLContext | None = None,
        allow_insecure_http: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._origin = f"jwks url {url}"
        self.algorithms = _checked_algorithms(algorithms, ASYMMETRIC_ALGORITHMS, self._origin)
        _check_jwks_url(url, allow_insecure_http)
        if not (min_refetch_interval >= 0 and 0 < max_age <= max_stale and timeout > 0):
            raise KeySourceError(f"{self._origin}: need 0 <= interval, 0 < max_age <= max_stale")
        self._min_interval = min_refetch_interval
        self._max_age = max_age
        self._max_stale = max_stale
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._clock = clock
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPSHandler(context=ssl_context or ssl.create_default_context()),
            _NoRedirect(),
        )
        self._cached: _Cached | None = None
        self._last_attempt: float | None = None
        self._fetch_lock = threading.Lock()
        self._inflight: asyncio.Task[bool] | None = None

    def usable_keys(self) -> tuple[VerificationKey, ...]:
        cached = self._cached
        if cached is None or self._clock() - cached.loaded_at > self._max_stale:
            return ()
        return cached.keys

    def available(self) -> bool:
        return bool(self.usable_keys())

    def refresh_due(self) -> bool:
        return self._due(False)

    def _due(self, force: bool) -> bool:
        now = self._clock()
        if self._last_attempt is not None and now - self._last_attempt < self._min_interval:
            return False
        cached = self._cached
        return force or cached is None or now - cached.loaded_at >= self._max_age

    def refresh(self, *, force: bool = False) -> bool:
        """Fetch now if due (blocking; any thread). Returns whether a fetch was attempted.

        A failed fetch keeps the previous keys (until `max_stale`) and is logged, never raised:
        callers see `jwks_unavailable` from the verifier instead.
        """
        with self._fetch_lock:
            if not self._due(force):
                return False
            self._last_attempt = self._clock()
            try:
                keys = parse_jwks(self._fetch(), self.algorithms, self._origin)
                if not keys:
                    raise KeySourceError(f"{self._origin}: no usable keys")
            except (OSError, HTTPException, KeySourceError) as exc:
                log.warning("JWKS fetch failed: %s: %s", self._origin, type(exc).__name__)
                return True
            self._cached = _Cached(keys, self._clock())
            return True

    async def arefresh(self, *, force: bool = False) -> None:
        """Refresh off the event loop; concurrent callers on one loop share a single fetch."""
        if not self._due(force):  # cheap, on the loop: a flood spawns no threads
            return
        loop = asyncio.get_running_loop()
        task = self._inflight
        if task is None or task.done() or task.get_loop() is not loop:
            task = loop.create_task(asyncio.to_thread(self.refresh, force=force))
            self._inflight = task
        await asyncio.shield(task)

    def _fetch(self) -> bytes:
        request = urllib.request.Request(
            self.url, headers={"Accept": "application/json", "User-Agent": "sluicegate-jwks"}
        )
        with self._opener.open(request, timeout=self._timeout) as response:
            body: bytes = response.read(self._max_bytes + 1)
        if len(body) > self._max_bytes:
            raise KeySourceError(f"{self._origin}: response larger than {self._max_bytes} bytes")
        return body


def _check_jwks_url(url: str, allow_insecure_http: bool) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname:
        if allow_insecure_http or parts.hostname == "localhost":
            return
        try:
            if ipaddress.ip_address(parts.hostname).is_loopback:
                return
        except ValueError:
            pass
    raise KeySourceError(f"jwks url {url}: must be https (http only to loopback)")


def _b64url_decode(segment: str) -> bytes:
    if not _is_b64url(segment):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


_B64URL_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _is_b64url(segment: str) -> bool:
    """Canonical unpadded base64url only: the unused low bits of the last character must be zero,
    or several spellings decode to the same bytes (a second token string for one signature)."""
    rest = len(segment) % 4
    if rest == 1 or _B64URL.fullmatch(segment) is None:
        return False
    if rest == 0:
        return True
    unused = 0b1111 if rest == 2 else 0b11
    return _B64URL_ALPHABET.index(segment[-1]) & unused == 0


def _strict_json_object(data: bytes | str) -> dict[str, Any]:
    """JSON object with no duplicate keys and no NaN/Infinity: parsers must not disagree."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for name, value in pairs:
            if name in obj:
                raise ValueError("duplicate member")
            obj[name] = value
        return obj

    def no_constants(name: str) -> Any:
        raise ValueError("non-standard constant")

    try:
        value = json.loads(data, object_pairs_hook=unique, parse_constant=no_constants)
    except RecursionError:
        raise ValueError("too deeply nested") from None
    if not isinstance(value, dict):
        raise ValueError("not an object")
    return value
