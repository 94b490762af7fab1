"""JWT verification for agent callers: key sources, policy, verifier and token extraction.

pyjwt checks signatures; everything it is lax about is decided here first, so a hostile token is
refused before it costs anything: the size cap comes before any decoding, the header `alg` must be
allowed for the one key the `kid` selects (no `none`, no HS/RS confusion), HMAC keys exist only as
an explicitly configured shared secret (never from a JWKS), and claims are checked by our own code
so every refusal maps to one stable reason code.

Key selection:
- a token with a `kid` is verified only by the key carrying that `kid`; distinct keys sharing
  one `kid` are `ambiguous_kid` (we never try keys in turn);
- a token without a `kid` is accepted only when exactly one key is configured in total, otherwise
  `missing_kid`; a token with a `kid` also matches a lone key configured without a `kid` (an
  operator who pins one PEM key need not know the IdP's key ids).

`TokenRejected` messages carry the reason code and at most a claim NAME from the policy, never the
token or a claim value, so they are safe to log.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import binascii
import dataclasses
import enum
import hashlib
import ipaddress
import json
import logging
import math
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
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
_GROUP_SEPARATORS: Final = re.compile(r"[\s,]+")
# Claims every accepted token carries: an Identity needs a subject, an issuer, an expiry, and a
# token without an audience could have been minted for any other service of the same IdP.
ALWAYS_REQUIRED_CLAIMS: Final = ("iss", "aud", "sub", "exp")


class Reason(enum.StrEnum):
    """Stable reason codes: logged, counted and returned to callers, so never renamed."""

    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    ALG_NOT_ALLOWED = "alg_not_allowed"
    MISSING_KID = "missing_kid"
    UNKNOWN_KID = "unknown_kid"
    AMBIGUOUS_KID = "ambiguous_kid"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    ISSUED_IN_FUTURE = "issued_in_future"
    TOO_OLD = "too_old"
    WRONG_ISSUER = "wrong_issuer"
    WRONG_AUDIENCE = "wrong_audience"
    MISSING_CLAIM = "missing_claim"
    INVALID_CLAIM = "invalid_claim"
    JWKS_UNAVAILABLE = "jwks_unavailable"
    AMBIGUOUS_TOKEN = "ambiguous_token"


class TokenRejected(Exception):
    """A token or credential header was refused; `reason` is a stable code.

    `claim` is a claim name taken from the policy (never from the token), so the message is safe
    to log and to return to the caller.
    """

    def __init__(self, reason: Reason, claim: str | None = None) -> None:
        self.reason: str = str(reason)
        self.claim = claim
        super().__init__(self.reason if claim is None else f"{self.reason}: {claim}")


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


def token_fingerprint(token: str) -> str:
    """Short non-reversible id of a token, to correlate log lines without storing the token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:16]


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


@dataclasses.dataclass(frozen=True)
class TokenPolicy:
    """What a verified token must also satisfy.

    `iss`, `aud`, `sub` and `exp` are always required (see ALWAYS_REQUIRED_CLAIMS);
    `required_claims` adds more (dotted paths allowed). `groups_claim` is a claim name or dotted
    path (`realm_access.roles`); a claim whose literal name contains dots (Auth0's
    `https://example.com/groups`) is found first.
    """

    issuers: tuple[str, ...]
    audiences: tuple[str, ...]
    leeway_seconds: int = 30
    required_claims: tuple[str, ...] = ("exp", "iat", "sub")
    max_token_bytes: int = 16384
    groups_claim: str = "groups"
    max_token_age_seconds: int | None = None
    reject_future_iat: bool = True

    def __post_init__(self) -> None:
        for name in ("issuers", "audiences", "required_claims"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{name} must be a sequence of non-empty strings")
            object.__setattr__(self, name, tuple(value))
        if not self.issuers or not self.audiences:
            raise ValueError("at least one issuer and one audience are required")
        if self.leeway_seconds < 0 or self.max_token_bytes <= 0 or not self.groups_claim:
            raise ValueError("leeway must be >= 0, max_token_bytes > 0, groups_claim set")
        if self.max_token_age_seconds is not None and self.max_token_age_seconds <= 0:
            raise ValueError("max_token_age_seconds must be > 0")


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who a verified token speaks for; plain types only, and never the token itself."""

    subject: str
    groups: tuple[str, ...]
    token_id: str | None
    issuer: str
    expires_at: int
    fingerprint: str

    def as_metadata(self) -> dict[str, str | int | list[str] | None]:
        """The recordable projection (flow metadata, logs)."""
        return {
            "subject": self.subject,
            "groups": list(self.groups),
            "token_id": self.token_id,
            "issuer": self.issuer,
            "expires_at": self.expires_at,
            "fingerprint": self.fingerprint,
        }


@dataclasses.dataclass(frozen=True)
class _Header:
    alg: str
    kid: str | None


@dataclasses.dataclass(frozen=True, eq=False)
class _Verified:
    """A token whose signature `key` verified: its header and claims (read, never changed)."""

    key: VerificationKey
    header: _Header
    claims: dict[str, Any]


_MISSING: Final = object()
# Tokens whose signature was verified, by SHA-256 of the token (the token itself is not kept).
VERIFIED_TOKENS: Final = 1024


class TokenVerifier:
    """Verifies tokens against key sources and a policy; see the module docstring for key rules."""

    def __init__(
        self,
        keys: Sequence[KeySource],
        policy: TokenPolicy,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not keys:
            raise ValueError("at least one key source is required")
        self._sources = tuple(keys)
        self._policy = policy
        self._clock = clock
        self._algorithms = frozenset().union(*(source.algorithms for source in self._sources))
        # pyjwt itself only knows the allowed algorithms: `none` does not exist for it.
        self._jws = jwt.PyJWS(algorithms=sorted(self._algorithms))
        self._verified: OrderedDict[bytes, _Verified] = OrderedDict()

    def verify(self, token: str) -> Identity:
        """Verify with the keys cached now (no I/O); an unknown `kid` is `unknown_kid`."""
        digest, known = self._known(token)
        header = known.header if known is not None else self._parse_header(token)
        return self._verify_with(token, header, self._select_key(header), digest, known)

    async def averify(self, token: str) -> Identity:
        """Verify, refreshing remote key sets when stale or on an unknown `kid` (off the loop)."""
        digest, known = self._known(token)
        header = known.header if known is not None else self._parse_header(token)
        # Garbage never triggers a fetch (the header parsed); most calls have nothing due.
        due = [source for source in self._sources if source.refresh_due()]
        if due:
            await asyncio.gather(*(source.arefresh() for source in due))
        try:
            key = self._select_key(header)
        except TokenRejected as exc:
            if exc.reason not in (Reason.UNKNOWN_KID, Reason.JWKS_UNAVAILABLE):
                raise
            await asyncio.gather(*(source.arefresh(force=True) for source in self._sources))
            key = self._select_key(header)
        return self._verify_with(token, header, key, digest, known)

    async def arefresh(self) -> None:
        """Load remote key sets now (e.g. at startup) so the first `verify` has keys."""
        await asyncio.gather(*(source.arefresh() for source in self._sources))

    def _parse_header(self, token: str) -> _Header:
        """Cheap structural checks, in an order that makes the cheapest refusal win."""
        if not isinstance(token, str):
            raise TokenRejected(Reason.MALFORMED)
        if len(token) > self._policy.max_token_bytes:
            raise TokenRejected(Reason.TOO_LARGE)
        if not token.isascii():
            raise TokenRejected(Reason.MALFORMED)
        segments = token.split(".")
        if len(segments) != 3:
            raise TokenRejected(Reason.MALFORMED)
        try:
            header = _strict_json_object(_b64url_decode(segments[0]))
        except ValueError:
            raise TokenRejected(Reason.MALFORMED) from None
        alg, kid = header.get("alg"), header.get("kid", None)
        if not isinstance(alg, str) or (kid is not None and not (isinstance(kid, str) and kid)):
            raise TokenRejected(Reason.MALFORMED)
        # We implement no JWS extensions; `b64: false` would change what is signed.
        if "crit" in header or "b64" in header:
            raise TokenRejected(Reason.MALFORMED)
        if alg not in self._algorithms:
            raise TokenRejected(Reason.ALG_NOT_ALLOWED)
        if not all(_is_b64url(segment) for segment in segments[1:]):
            raise TokenRejected(Reason.MALFORMED)
        return _Header(alg, kid)

    def _select_key(self, header: _Header) -> VerificationKey:
        keys = [key for source in self._sources for key in source.usable_keys()]
        unavailable = not all(source.available() for source in self._sources)
        if header.kid is None:
            if unavailable:
                raise TokenRejected(Reason.JWKS_UNAVAILABLE)
            if len(keys) != 1:
                raise TokenRejected(Reason.MISSING_KID)
            candidates = keys
        else:
            candidates = [key for key in keys if key.kid == header.kid]
            if not candidates and not unavailable and len(keys) == 1 and keys[0].kid is None:
                candidates = keys
        if not candidates:
            raise TokenRejected(Reason.JWKS_UNAVAILABLE if unavailable else Reason.UNKNOWN_KID)
        if any(not candidates[0].same_key(other) for other in candidates[1:]):
            raise TokenRejected(Reason.AMBIGUOUS_KID)
        key = candidates[0]
        if header.alg not in key.algorithms:
            raise TokenRejected(Reason.ALG_NOT_ALLOWED)
        return key

    def _known(self, token: str) -> tuple[bytes | None, _Verified | None]:
        """The token's digest and, if its signature was verified before, what was verified.

        Only the signature check is remembered: the key is selected again for every call (a key
        that left the key set, or a key set gone stale, refuses at once) and must be the very key
        object that verified it (a reloaded key set verifies again); the claims are checked again
        for every call (expiry, not-before and age against the clock).
        """
        if not isinstance(token, str) or len(token) > self._policy.max_token_bytes:
            return None, None  # refused by _parse_header, before any hashing
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        known = self._verified.get(digest)
        if known is not None:
            self._verified.move_to_end(digest)
        return digest, known

    def _verify_with(
        self,
        token: str,
        header: _Header,
        key: VerificationKey,
        digest: bytes | None = None,
        known: _Verified | None = None,
    ) -> Identity:
        if known is not None and known.key is key:
            return self._check_claims(known.claims, token)
        claims = self._verified_claims(token, header, key)
        if digest is not None:
            self._verified[digest] = _Verified(key, header, claims)
            if len(self._verified) > VERIFIED_TOKENS:
                self._verified.popitem(last=False)
        return self._check_claims(claims, token)

    def _verified_claims(self, token: str, header: _Header, key: VerificationKey) -> dict[str, Any]:
        """The claims of a token whose signature `key` verifies (claims not checked yet)."""
        try:
            decoded = self._jws.decode_complete(token, key=key.material, algorithms=[header.alg])
        except jwt_errors.InvalidSignatureError:
            raise TokenRejected(Reason.BAD_SIGNATURE) from None
        except jwt_errors.InvalidAlgorithmError:
            raise TokenRejected(Reason.ALG_NOT_ALLOWED) from None
        except jwt_errors.InvalidKeyError:
            raise TokenRejected(Reason.BAD_SIGNATURE) from None
        except jwt_errors.PyJWTError:
            raise TokenRejected(Reason.MALFORMED) from None
        try:
            return _strict_json_object(decoded["payload"])
        except ValueError:
            raise TokenRejected(Reason.MALFORMED) from None

    def _check_claims(self, claims: dict[str, Any], token: str) -> Identity:
        policy = self._policy
        for name in (*policy.required_claims, *ALWAYS_REQUIRED_CLAIMS):
            if _claim(claims, name) is _MISSING:
                raise TokenRejected(Reason.MISSING_CLAIM, name)
        issuer = _string_claim(claims, "iss")
        subject = _string_claim(claims, "sub")
        token_id = _string_claim(claims, "jti") if "jti" in claims else None
        audiences = _audience_claim(claims)
        exp = _numeric_claim(claims, "exp")
        nbf = _numeric_claim(claims, "nbf")
        iat = _numeric_claim(claims, "iat")
        groups = _groups_claim(claims, policy.groups_claim)

        if issuer not in policy.issuers:
            raise TokenRejected(Reason.WRONG_ISSUER)
        if not set(audiences) & set(policy.audiences):
            raise TokenRejected(Reason.WRONG_AUDIENCE)
        now, leeway = self._clock(), policy.leeway_seconds
        if exp is None:  # unreachable: required above; keeps the type honest under -O
            raise TokenRejected(Reason.MISSING_CLAIM, "exp")
        if now >= exp + leeway:
            raise TokenRejected(Reason.EXPIRED)
        if nbf is not None and now + leeway < nbf:
            raise TokenRejected(Reason.NOT_YET_VALID)
        if iat is not None and policy.reject_future_iat and iat > now + leeway:
            raise TokenRejected(Reason.ISSUED_IN_FUTURE)
        if policy.max_token_age_seconds is not None:
            if iat is None:
                raise TokenRejected(Reason.MISSING_CLAIM, "iat")
            if now - iat > policy.max_token_age_seconds + leeway:
                raise TokenRejected(Reason.TOO_OLD)
        return Identity(
            subject=subject,
            groups=groups,
            token_id=token_id,
            issuer=issuer,
            expires_at=math.floor(exp),
            fingerprint=token_fingerprint(token),
        )


def _b64url_decode(segment: str) -> bytes:
    if not _is_b64url(segment):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _is_b64url(segment: str) -> bool:
    return len(segment) % 4 != 1 and _B64URL.fullmatch(segment) is not None


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


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    """A claim by literal name first, then by dotted path through nested objects."""
    if name in claims:
        return claims[name]
    node: Any = claims
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _string_claim(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value:
        raise TokenRejected(Reason.INVALID_CLAIM, name)
    return value


def _numeric_claim(claims: Mapping[str, Any], name: str) -> float | int | None:
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TokenRejected(Reason.INVALID_CLAIM, name)
    return value


def _audience_claim(claims: Mapping[str, Any]) -> tuple[str, ...]:
    value = claims["aud"]
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TokenRejected(Reason.INVALID_CLAIM, "aud")


def _groups_claim(claims: Mapping[str, Any], name: str) -> tuple[str, ...]:
    """Groups as a tuple: absent -> (), a list of strings, or one space/comma separated string."""
    value = _claim(claims, name)
    if value is _MISSING or value is None:
        return ()
    if isinstance(value, str):
        items: list[str] = _GROUP_SEPARATORS.split(value)
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise TokenRejected(Reason.INVALID_CLAIM, name)
    return tuple(dict.fromkeys(item for item in items if item))


# --- extraction: where an agent's token sits in a request --------------------------------------

INNER_TOKEN_HEADERS: Final = ("authorization", "x-api-key", "api-key")
# Longer header values are refused before base64 decoding (a token is capped far below this).
MAX_CREDENTIAL_HEADER_CHARS: Final = 65536


def token_from_proxy_authorization(value: str) -> str | None:
    """The token in a Proxy-Authorization value, or None when it carries none.

    `Basic base64(user:<jwt>)` (what HTTPS_PROXY=http://agent:<jwt>@host gives) yields the
    password, which may itself contain colons (the user name is ignored); `Bearer <jwt>` yields
    the token. Schemes are case-insensitive.
    Raises TokenRejected(too_large) for absurdly long values.
    """
    scheme, credentials = _split_auth_value(value)
    if scheme == "bearer":
        return credentials
    if scheme != "basic" or credentials is None:
        return None
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    _user, colon, password = decoded.partition(":")
    return password if colon and password else None


def token_from_inner_headers(
    headers: Mapping[str, str], sources: Sequence[str] = INNER_TOKEN_HEADERS
) -> tuple[str, str] | None:
    """(header name, token) from the headers an agent sends as its "API key", or None.

    `authorization` counts only with the Bearer scheme. If several sources carry DIFFERENT tokens
    the request is refused (`ambiguous_token`): picking one would let a second, unchecked
    credential travel upstream or be verified in its place. Header names are matched
    case-insensitively; `sources` is the allowed subset of INNER_TOKEN_HEADERS, in priority order.
    """
    unknown = set(sources) - set(INNER_TOKEN_HEADERS)
    if unknown:
        raise ValueError(f"unknown token header(s): {sorted(unknown)}")
    found: dict[str, str] = {}  # source -> token, in `sources` order below
    for raw_name, raw_value in headers.items():
        name = raw_name.lower()
        if name not in sources:
            continue
        if name == "authorization":
            scheme, token = _split_auth_value(raw_value)
            if scheme != "bearer":
                continue
        else:
            token = _bounded(raw_value).strip() or None
        if token is None:
            continue
        if found.get(name, token) != token:
            raise TokenRejected(Reason.AMBIGUOUS_TOKEN)
        found[name] = token
    if len(set(found.values())) > 1:
        raise TokenRejected(Reason.AMBIGUOUS_TOKEN)
    for name in sources:
        if name in found:
            return name, found[name]
    return None


def _bounded(value: str) -> str:
    if len(value) > MAX_CREDENTIAL_HEADER_CHARS:
        raise TokenRejected(Reason.TOO_LARGE)
    return value


def _split_auth_value(value: str) -> tuple[str, str | None]:
    """(lower-case scheme, single credentials token or None) of an Authorization-style value."""
    parts = _bounded(value).split()
    if not parts:
        return "", None
    credentials = parts[1] if len(parts) == 2 else None
    return parts[0].lower(), credentials
