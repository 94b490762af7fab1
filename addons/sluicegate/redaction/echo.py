"""Forms an injected secret can take when an upstream echoes it back.

The gateway injects a credential the agent never saw; if the upstream reflects it (an error
message quoting the request, a debug endpoint, a JSON field) the agent must not see it
either. Rules do not know that value, so the redactor masks it as literal strings, in every
encoding the response could plausibly use: raw, JSON-escaped, URL-encoded and base64
(including inside a larger base64 blob such as the Basic credentials "user:secret").
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable
from urllib.parse import quote, quote_plus

from sluicegate.redaction.redactor import LiteralSecret

# Shorter variants would match ordinary text (and mask it) too often to be useful.
MIN_VARIANT_LENGTH = 8

_PERCENT = re.compile(r"%[0-9A-F]{2}")


def secret_variants(secret: str, *, min_length: int = MIN_VARIANT_LENGTH) -> list[str]:
    """Distinct encodings of `secret`, longest first; too-short ones are left out.

    A secret shorter than `min_length` gets no variants at all: masking it (or its encodings)
    everywhere would mangle ordinary text.
    """
    if len(secret) < min_length:
        return []
    variants = [secret]
    for ascii_only in (True, False):
        escaped = json.dumps(secret, ensure_ascii=ascii_only)[1:-1]
        variants += [escaped, escaped.replace("/", "\\/")]
    for encoded in (quote(secret, safe=""), quote(secret), quote_plus(secret, safe="")):
        variants += [encoded, _PERCENT.sub(lambda m: m.group().lower(), encoded)]
    data = secret.encode("utf-8")
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        whole = encode(data).decode("ascii")
        variants += [whole, whole.rstrip("=")]
        variants += [_aligned_core(data, offset, encode) for offset in range(3)]
    unique = {v: None for v in variants if len(v) >= min_length}
    return sorted(unique, key=len, reverse=True)


def echo_literals(rule_id: str, secret: str) -> list[LiteralSecret]:
    """The variants of `secret` as literals for `Redactor.with_literals`."""
    return [LiteralSecret(rule_id, variant) for variant in secret_variants(secret)]


def _aligned_core(data: bytes, offset: int, encode: Callable[[bytes], bytes]) -> str:
    """The base64 characters that depend only on `data`, when `data` starts `offset` bytes
    into a larger blob: they appear verbatim in the blob's encoding whatever surrounds it."""
    encoded = encode(b"\0" * offset + data).decode("ascii")
    first = math.ceil(offset * 8 / 6)
    last = (offset + len(data)) * 8 // 6
    return encoded[first:last]
