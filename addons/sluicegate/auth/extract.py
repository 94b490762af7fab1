"""Where an agent's token sits in a request: Proxy-Authorization or inner credential headers."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from typing import Final

from sluicegate.auth.verifier import Reason, TokenRejected

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
