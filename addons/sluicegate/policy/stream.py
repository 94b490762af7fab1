"""Response rules on streamed responses: `ResponsePolicy` and its incremental `ResponseScanner`."""

from __future__ import annotations

import json

from sluicegate.policy.decisions import Action, Decision, ScanTimeout
from sluicegate.policy.patterns import Pattern
from sluicegate.policy.rules import Rule, first_match
from sluicegate.policy.views import BodyViews


class ResponsePolicy:
    """The response rules that apply to one flow (context already matched).

    Buffered responses: `decide(BodyViews)` / `scan(text)` on the whole body.
    Streamed responses (text/event-stream): `stream()` gives a `ResponseScanner` for the text the
    stream redactor releases. A stream cannot be held or rewritten once bytes are out, so EVERY
    decision a scanner returns means: cut the stream now and end it with
    `sse_error_event(decision, request_id)`. `hold` and `redact_only` rules therefore act as
    `block` on streams (fail closed); buffered responses get the real hold and redaction.
    """

    def __init__(self, rules: tuple[Rule, ...], scan_timeout: float | None, window: int) -> None:
        self.rules = rules
        self.scan_timeout = scan_timeout
        self.window = window
        # Decisions taken by this flow's stream scanners, for the addon to record at the end.
        self.stream_decisions: list[Decision] = []
        self.streams_started = 0

    def decide(self, body: BodyViews) -> Decision | None:
        """First matching rule for a whole buffered body; None means no rule matched (allow)."""
        return first_match(self.rules, None, body, self.scan_timeout)

    def scan(self, text: str) -> Decision | None:
        """Like `decide` for one whole text; None when nothing matched or the match is allow."""
        decision = self.decide(BodyViews.of_text(text))
        if decision is None or decision.action is Action.ALLOW:
            return None
        return decision

    def scan_views(self, body: BodyViews) -> Decision | None:
        """One whole message of a stream (a WebSocket message): a decision cuts the stream, like
        a stream scanner's (recorded in `stream_decisions`); None when nothing or allow matched."""
        decision = self.decide(body)
        if decision is None or decision.action is Action.ALLOW:
            return None
        self.stream_decisions.append(decision)
        return decision

    def stream(self) -> ResponseScanner:
        self.streams_started += 1
        return ResponseScanner(self)


class ResponseScanner:
    """Incremental response policy over the text a stream releases, piece by piece.

    A pattern is found across piece boundaries as long as the match is shorter than
    `policy.stream_window_chars`; `min_count` counts matches over the whole stream. Rules are still
    taken in order, but on a stream a rule acts as soon as it matches: an earlier `allow` rule with
    body conditions only exempts the stream if it has matched by then. The scanner decides on the
    text about to be released, so the end of a piece counts as the end of the text (`| sudo bash`
    blocks even if the next piece would have made it `bashful`): it may block where a scan of the
    whole text would not, never the reverse.
    """

    def __init__(self, policy: ResponsePolicy) -> None:
        self._policy = policy
        self._tail = ""
        self._size = 0
        self._counts: dict[tuple[str, str], int] = {}
        self._exempt = False
        self.decision: Decision | None = None

    def feed(self, text: str) -> Decision | None:
        """Text about to be released to the agent. A decision means: cut the stream, send none.

        Call `feed("")` once before the first byte goes out, so that a rule without body
        conditions cuts the stream before anything is released.
        """
        if self.decision is not None:
            return self.decision
        if self._exempt:
            return None
        self._size += len(text.encode("utf-8", "replace"))
        window = self._tail + text
        fresh_from = len(self._tail)
        for rule in self._policy.rules:
            found = self._rule_found(rule, window, fresh_from)
            if found is None:
                continue
            if rule.action is Action.ALLOW:
                self._exempt = True
                return None
            self.decision = rule.decision(found)
            self._policy.stream_decisions.append(self.decision)
            return self.decision
        self._tail = window[-self._policy.window :] if self._policy.window else ""
        return None

    def _rule_found(self, rule: Rule, window: str, fresh_from: int) -> tuple[str, ...] | None:
        when = rule.when
        if when.body_larger_than is not None and self._size <= when.body_larger_than:
            return None
        if not when.body_patterns:
            return ()
        found = []
        for pattern in when.body_patterns:
            key = (rule.id, pattern.name)
            seen = self._counts.get(key, 0)
            if seen < pattern.min_count:
                seen += _count_ending_after(pattern, window, fresh_from, self._policy.scan_timeout)
                self._counts[key] = seen
            if seen >= pattern.min_count:
                found.append(pattern.name)
        return tuple(found) or None


def _count_ending_after(pattern: Pattern, text: str, start: int, timeout: float | None) -> int:
    """Matches ending in text[start:] (earlier ones were counted when that text was fresh).

    Only the old text a match could reach back into is searched: `max_len` (plus room for
    lookbehinds) for built-ins, the whole retained window otherwise.
    """
    pos = 0 if pattern.max_len is None else max(0, start - pattern.max_len - 64)
    if not pattern.might_occur(text[pos:]):
        return 0
    n = 0
    try:
        for m in pattern.regex.finditer(text, pos, concurrent=True, timeout=timeout):
            if m.end() > start:
                n += 1
    except TimeoutError:
        raise ScanTimeout(
            "policy_scan_timeout", f"pattern {pattern.name!r} exceeded the scan time budget"
        ) from None
    return n


def sse_error_event(decision: Decision, request_id: str) -> bytes:
    """The last event of a stream cut by policy. OpenAI and Anthropic SDKs raise on it."""
    error = {
        "code": "policy_blocked",
        "message": f"The response was stopped by {decision.describe()}",
        "type": "sluicegate_error",
        "request_id": request_id,
        "rule": decision.rule_id,
    }
    payload = json.dumps({"type": "error", "error": error})
    return f"event: error\ndata: {payload}\n\n".encode()
