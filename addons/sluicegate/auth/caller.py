"""The authenticated caller of a flow: plain, non-secret, recordable."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Caller:
    """The authenticated caller of a flow, as the auth addon verified it. Plain, non-secret."""

    subject: str
    groups: tuple[str, ...]
    issuer: str
    token_id: str | None
    fingerprint: str  # short non-reversible hash of the token: correlates without storing it

    def as_metadata(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "groups": list(self.groups),
            "issuer": self.issuer,
            "token_id": self.token_id,
            "token_fingerprint": self.fingerprint,
        }


def scope_of(caller: Caller | None) -> str:
    """Whose remembered texts: one caller never benefits from another's (no timing oracle)."""
    return "" if caller is None else f"{caller.issuer}\0{caller.subject}"
