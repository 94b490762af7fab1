"""Redaction that skips texts the rules already found clean for the same caller.

Agents resend most of a request on every turn: the system prompt, tool definitions, the whole
conversation so far, the model name and the JSON field names; responses repeat ids, roles and
model names. Each of those strings is a separate text for the rules (JSON values are redacted one
by one), so remembering which texts the rules left unchanged makes the cost of a request follow
what is new in it rather than its size.

Exactness: a text is remembered only when redacting it with the rules changed nothing, and
redaction is a pure function of the text and the rule pack, so a remembered text would come out
unchanged again. Literal secrets (a flow's injected credential, the caller's token) differ per
flow and are not part of what is remembered: a remembered text that contains one of the flow's
literals is redacted in full.

Scope: remembered texts are kept per caller, so how long a request takes cannot tell one caller
whether another caller sent a text. Memory is bounded: texts longer than `max_text_chars` are
never remembered, and the least recently used ones go once all remembered texts together exceed
`max_chars` or there are more than `max_texts` of them. Only clean texts are kept, never a text
in which a rule found a secret.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

from sluicegate.redaction.redactor import RedactionResult, Redactor
from sluicegate.redaction.rules import Direction, KeyRule, RulePack

MAX_CHARS = 4_000_000
MAX_TEXTS = 20_000  # short texts cost more in bookkeeping than in characters
MAX_TEXT_CHARS = 256 * 1024
# Names looked up in key rules: bounded, cleared when full (names come from request bodies).
MAX_KEY_NAMES = 4096
MAX_KEY_NAME_CHARS = 256
_KEY_RULE_CACHE = "memo.key_rule"


class CleanTexts:
    """(scope, text) pairs the rules left unchanged; least recently used first out.

    Thread-safe: large bodies are redacted on worker threads.
    """

    def __init__(
        self,
        max_chars: int = MAX_CHARS,
        max_text_chars: int = MAX_TEXT_CHARS,
        max_texts: int = MAX_TEXTS,
    ) -> None:
        self.max_chars = max_chars
        self.max_text_chars = min(max_text_chars, max_chars)
        self.max_texts = max_texts
        self._texts: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._texts)

    @property
    def chars(self) -> int:
        return self._chars

    def seen(self, scope: str, text: str) -> bool:
        key = (scope, text)
        with self._lock:
            if key not in self._texts:
                return False
            self._texts.move_to_end(key)
            return True

    def add(self, scope: str, text: str) -> None:
        size = len(text)
        if size > self.max_text_chars:
            return
        key = (scope, text)
        with self._lock:
            if key in self._texts:
                return
            self._texts[key] = None
            self._chars += size
            while self._chars > self.max_chars or len(self._texts) > self.max_texts:
                (_, old), _ = self._texts.popitem(last=False)
                self._chars -= len(old)


class MemoRedactor:
    """What body and JSON redaction need of a `Redactor`, remembering clean texts per caller.

    `redactor` (or the function that builds it, on first need) carries the flow's literal
    secrets, if any, and does every real redaction; `literals` are their values, checked on
    every remembered text. Without a `memo` nothing is remembered.
    """

    def __init__(
        self,
        redactor: Redactor | Callable[[], Redactor],
        pack: RulePack,
        direction: Direction,
        memo: CleanTexts | None,
        scope: str,
        literals: Sequence[str] = (),
    ) -> None:
        self._redactor = redactor if isinstance(redactor, Redactor) else None
        self._make = None if isinstance(redactor, Redactor) else redactor
        self.pack = pack
        self.direction = direction
        self._memo = memo
        self._scope = scope
        self._literals = tuple(sorted({v for v in literals if v}, key=len))
        # Most texts (JSON keys, ids, roles) are shorter than every literal: no search at all.
        self._shortest = len(self._literals[0]) if self._literals else 0

    @property
    def redactor(self) -> Redactor:
        """The full redactor (rules and literals), built on first need."""
        if self._redactor is None:
            assert self._make is not None
            self._redactor = self._make()
        return self._redactor

    @property
    def key_rules(self) -> tuple[KeyRule, ...]:
        return self.pack.key_rules_for(self.direction)

    def tag(self, rule_id: str, secret: str) -> str:
        return self.redactor.tag(rule_id, secret)

    def redact_text(self, text: str) -> RedactionResult:
        if not text:
            return RedactionResult(text, {})
        memo = self._memo
        if memo is None:
            return self.redactor.redact_text(text)
        if memo.seen(self._scope, text) and not self.holds_literal(text):
            return RedactionResult(text, {})
        result = self.redactor.redact_text(text)
        if not result.changed:
            memo.add(self._scope, text)
        return result

    def holds_literal(self, text: str) -> bool:
        if self._redactor is None and not self._literals:
            return False
        if self._redactor is not None and not self._literals:
            return self._redactor.holds_literal(text)
        if len(text) < self._shortest:
            return False
        return any(value in text for value in self._literals)


# What body and JSON redaction accept: a plain redactor, or one that remembers clean texts.
TextRedactor = Redactor | MemoRedactor


def key_rule_for(redactor: TextRedactor, name: str) -> KeyRule | None:
    """The first key rule matching a field name, remembered per pack and direction."""
    cache: dict[str, KeyRule | None] = redactor.pack.cache.setdefault(
        (_KEY_RULE_CACHE, redactor.direction), {}
    )
    try:
        return cache[name]
    except KeyError:
        pass
    rule = next((r for r in redactor.key_rules if r.matches(name)), None)
    if len(name) <= MAX_KEY_NAME_CHARS:
        if len(cache) >= MAX_KEY_NAMES:
            cache.clear()
        cache[name] = rule
    return rule
