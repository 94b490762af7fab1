"""The redaction objects a config asks for, shared by the buffered and the streaming addons.

Built once per config version from `config.redaction` (whose rule pack was compiled while the config
was validated). Per flow, the response redactor gains the flow's scrub literals (the injected
credential in all its encodings, the caller's token) so upstream echoes of them never reach the
agent. Redactors with literals cost a regex compilation each; the same caller on the same route
has the same literals on every request, so they are kept (a few, least recently used out).
Buffered bodies over `process_bytes` are redacted by `offload`'s worker processes, which
rebuild the same redactors. Other buffered bodies, WebSocket messages and the strings of SSE
events are redacted through `memo.MemoRedactor`, which skips texts the rules already found
clean for the same caller (see there why that is exact).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Iterable

from sluicegate.auth.caller import Caller
from sluicegate.redaction.bodies import BodyPolicy
from sluicegate.redaction.memo import CleanTexts, MemoRedactor
from sluicegate.redaction.offload import OffloadPool
from sluicegate.redaction.redactor import LiteralSecret, Redactor
from sluicegate.redaction.redactor import LiteralSecret as ScrubLiteral
from sluicegate.redaction.rules import Direction

LITERAL_REDACTORS = 64


@dataclasses.dataclass(frozen=True)
class RedactionRuntime:
    request: Redactor | None  # None: request redaction switched off
    response: Redactor | None  # None: response redaction switched off (scrub literals still apply)
    response_scrub_only: Redactor  # no rules, only a flow's scrub literals
    body_policy: BodyPolicy
    max_hold: int
    max_body_bytes: int
    # Bodies over `process_bytes` go to `offload` (None: a thread of this process); either way
    # a body's redaction may take `budget_seconds`.
    offload: OffloadPool | None = dataclasses.field(default=None, compare=False)
    process_bytes: int = 16384
    budget_seconds: float = 10.0
    # Texts the rules left unchanged, per caller (request and response rules differ).
    clean: dict[Direction, CleanTexts] = dataclasses.field(
        default_factory=lambda: {d: CleanTexts() for d in Direction}, compare=False
    )
    _with_literals: OrderedDict[tuple[ScrubLiteral, ...], Redactor] = dataclasses.field(
        default_factory=OrderedDict, compare=False, repr=False
    )
    _lock: threading.Lock = dataclasses.field(
        default_factory=threading.Lock, compare=False, repr=False
    )

    def for_response(self, scrub: Iterable[ScrubLiteral]) -> Redactor:
        """The response redactor for one flow: rules plus that flow's scrub literals."""
        key = tuple(scrub)
        base = self.response if self.response is not None else self.response_scrub_only
        if not key:
            return base
        with self._lock:
            redactor = self._with_literals.get(key)
            if redactor is not None:
                self._with_literals.move_to_end(key)
                return redactor
        redactor = base.with_literals([LiteralSecret(s.rule_id, s.value) for s in key])
        with self._lock:
            self._with_literals[key] = redactor
            while len(self._with_literals) > LITERAL_REDACTORS:
                self._with_literals.popitem(last=False)
        return redactor

    def request_text_redactor(self, caller: Caller | None) -> MemoRedactor | None:
        """Request bodies and queries of `caller`'s flow (None: request redaction is off)."""
        if self.request is None:
            return None
        return MemoRedactor(
            self.request,
            self.request.pack,
            Direction.REQUEST,
            self.clean[Direction.REQUEST],
            scope_of(caller),
        )

    def response_text_redactor(
        self, caller: Caller | None, scrub: Iterable[ScrubLiteral]
    ) -> MemoRedactor:
        """Buffered response bodies of one flow: rules (if on) plus the flow's scrub literals."""
        literals = tuple(scrub)
        base = self.response if self.response is not None else self.response_scrub_only
        return MemoRedactor(
            lambda: self.for_response(literals),
            base.pack,
            Direction.RESPONSE,
            # Without response rules only literals are looked for, on every text: no memo.
            self.clean[Direction.RESPONSE] if self.response is not None else None,
            scope_of(caller),
            literals=[s.value for s in literals],
        )


def scope_of(caller: Caller | None) -> str:
    """Whose remembered texts: one caller never benefits from another's (no timing oracle)."""
    return "" if caller is None else f"{caller.issuer}\0{caller.subject}"
