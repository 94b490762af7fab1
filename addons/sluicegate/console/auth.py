"""Who is signed in to the console, and whether a request may change anything.

- **Sessions** are signed cookies (`sg_console`): the approver's identity, how they signed in,
  their groups, an id and an expiry, MACed with a key derived from the admin token. Every replica
  sharing the admin token accepts them (a console behind a load balancer works without sticky
  sessions), and rotating the admin token signs everybody out. The cookie is `HttpOnly`,
  `SameSite=Strict`, `Path=/console`, and `Secure` when the console is reached over TLS (the
  reverse proxy's `X-Forwarded-Proto: https`, or `console.secure_cookie: always`). Signing out
  forgets the session id in this process (the cookie is also cleared in the browser).
- **Sign-in** takes the admin token (with a name the approver gives, recorded as
  `admin:<name>`), or a JWT from the identity provider, verified like callers' tokens
  (`auth.verifier.TokenVerifier`) and accepted only for members of a `console.approvers`
  group (recorded as `oidc:<subject>`).
- **CSRF**: every state change is a POST that must carry the session's CSRF token (an HMAC of
  the session id, so it is bound to the session) and, when the browser sends one, an `Origin`
  matching the request's host; `Sec-Fetch-Site: cross-site` is refused outright. The sign-in
  form is bound the same way to a pre-session nonce cookie.
- **Host check**: the console answers only requests whose `Host` is a loopback name or one of
  `console.allowed_hosts` (DNS rebinding gets nothing).

Secrets (the admin token, a pasted JWT) are never logged, stored or echoed.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import secrets
import time
import urllib.parse
from collections.abc import Callable, Iterable

from sluicegate.control.listener import Request

COOKIE = "sg_console"
PRE_COOKIE = "sg_console_pre"
COOKIE_PATH = "/console"
_KEY_LABEL = b"sluicegate console session v1"
_LOOPBACK = ("localhost", "127.0.0.1", "[::1]", "::1")
MAX_COOKIE = 4096
REVOKED_KEEP = 10_000


@dataclasses.dataclass(frozen=True)
class ConsoleUser:
    """A signed-in approver (or investigator)."""

    by: str  # what decisions and audit lines record: admin:<name> | oidc:<subject>
    kind: str  # "admin" | "oidc"
    subject: str
    groups: tuple[str, ...]
    sid: str
    expires: float


class SessionKeys:
    """The MAC key of sessions and CSRF tokens, derived from the admin token when needed (so a
    rotated token takes effect at once)."""

    def __init__(self, admin_token: Callable[[], str]) -> None:
        self._admin_token = admin_token

    def key(self) -> bytes:
        return hmac.new(self._admin_token().encode(), _KEY_LABEL, hashlib.sha256).digest()

    def mac(self, purpose: str, data: bytes) -> str:
        digest = hmac.new(self.key(), purpose.encode() + b"\0" + data, hashlib.sha256).digest()
        return _b64(digest)


class Sessions:
    def __init__(
        self,
        keys: SessionKeys,
        *,
        lifetime: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.lifetime = lifetime
        self._clock = clock
        self._revoked: dict[str, float] = {}

    # -- cookies ------------------------------------------------------------------------------

    def issue(
        self, *, by: str, kind: str, subject: str, groups: Iterable[str], not_after: float | None
    ) -> tuple[str, ConsoleUser]:
        """A new session: (cookie value, user)."""
        now = self._clock()
        expires = now + self.lifetime
        if not_after is not None:
            expires = min(expires, not_after)
        user = ConsoleUser(by, kind, subject, tuple(groups), secrets.token_hex(16), expires)
        payload = json.dumps(
            {
                "v": 1,
                "by": user.by,
                "kind": user.kind,
                "sub": user.subject,
                "groups": list(user.groups),
                "sid": user.sid,
                "iat": int(now),
                "exp": int(expires),
            },
            separators=(",", ":"),
            sort_keys=True,
        ).encode()
        body = _b64(payload)
        return f"{body}.{self.keys.mac('session', body.encode())}", user

    def user(self, request: Request) -> ConsoleUser | None:
        """The signed-in user of a request, or None (no cookie, forged, expired, signed out)."""
        value = request.cookies().get(COOKIE, "")
        if not value or len(value) > MAX_COOKIE or value.count(".") != 1:
            return None
        body, mac = value.split(".")
        try:
            expected = self.keys.mac("session", body.encode())
        except Exception:  # the admin token is unavailable: nobody is signed in
            return None
        if not hmac.compare_digest(mac.encode(), expected.encode()):
            return None
        try:
            data = json.loads(_unb64(body))
            user = ConsoleUser(
                by=str(data["by"]),
                kind=str(data["kind"]),
                subject=str(data["sub"]),
                groups=tuple(str(g) for g in data["groups"]),
                sid=str(data["sid"]),
                expires=float(data["exp"]),
            )
        except (ValueError, KeyError, TypeError):
            return None
        if user.expires <= self._clock() or user.sid in self._revoked:
            return None
        return user

    def inherit(self, other: Sessions) -> None:
        """Keep the sign-outs of a console this one replaces (a config reload)."""
        self._revoked.update(other._revoked)

    def revoke(self, user: ConsoleUser) -> None:
        now = self._clock()
        self._revoked[user.sid] = user.expires
        if len(self._revoked) > REVOKED_KEEP:
            self._revoked = {k: v for k, v in self._revoked.items() if v > now}

    # -- CSRF ---------------------------------------------------------------------------------

    def csrf_token(self, user: ConsoleUser) -> str:
        return self.keys.mac("csrf", user.sid.encode())

    def csrf_ok(self, user: ConsoleUser, given: str) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.csrf_token(user).encode())

    def pre_token(self, nonce: str) -> str:
        """The sign-in form's token, bound to the pre-session nonce cookie."""
        return self.keys.mac("signin", nonce.encode())

    def pre_ok(self, nonce: str, given: str) -> bool:
        if not nonce or not given or len(nonce) > 64:
            return False
        return hmac.compare_digest(given.encode(), self.pre_token(nonce).encode())


def cookie_header(
    name: str, value: str, *, secure: bool, max_age: int | None = None, path: str = COOKIE_PATH
) -> str:
    parts = [f"{name}={value}", f"Path={path}", "HttpOnly", "SameSite=Strict"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def over_tls(request: Request, setting: str) -> bool:
    """Whether cookies get `Secure`: always / never, or (auto) when the browser reached the
    console over TLS through the operator's reverse proxy."""
    if setting in ("always", "never"):
        return setting == "always"
    return request.header("x-forwarded-proto").split(",")[0].strip().lower() == "https"


def host_allowed(request: Request, allowed: Iterable[str]) -> bool:
    """The `Host` is a loopback name (any port) or listed in `console.allowed_hosts`."""
    host = request.header("host").strip().lower()
    if not host:
        return False
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if name in _LOOPBACK:
        return True
    return any(host == a.lower() or name == a.lower() for a in allowed)


def cross_site(request: Request) -> bool:
    """A state change a browser sent from another origin (or one hiding its origin)."""
    if request.header("sec-fetch-site").lower() == "cross-site":
        return True
    origin = request.headers.get("origin")
    if origin is None:
        return False  # not a browser's cross-origin form (browsers send Origin on POST)
    parsed = urllib.parse.urlsplit(origin)
    if origin == "null" or not parsed.netloc:
        return True
    return parsed.netloc.lower() != request.header("host").strip().lower()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
