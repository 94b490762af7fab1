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

import asyncio
import dataclasses
import enum
import hashlib
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import jwt
from jwt import exceptions as jwt_errors

from sluicegate.auth.keys import (
    KeySource,
    VerificationKey,
    _b64url_decode,
    _is_b64url,
    _strict_json_object,
)

log = logging.getLogger(__name__)
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


def token_fingerprint(token: str) -> str:
    """Short non-reversible id of a token, to correlate log lines without storing the token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:16]


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
