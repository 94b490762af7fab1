"""Benchmark the policy engine: decisions per second without bodies, and body scan throughput
with every built-in pattern on realistic request bodies. Run: python -m bench policy"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "addons"))

from sluicegate.policy.conditions import Conditions, FlowContext, HostPattern
from sluicegate.policy.decisions import Action, Phase
from sluicegate.policy.engine import Policy
from sluicegate.policy.patterns import BUILTIN_PATTERNS
from sluicegate.policy.rules import Rule
from sluicegate.policy.views import BodyViews

CTX = FlowContext("alice", "idp", frozenset({"agents"}), "openai", "api.openai.com", 443, "POST",
                  "/v1/chat/completions")  # fmt: skip


def policy() -> Policy:
    hosts = tuple(HostPattern.parse(h) for h in ("pastebin.com", "*.pastebin.com", "webhook.site"))
    rules = [Rule("paste", Action.BLOCK, Conditions(hosts=hosts))]
    rules += [
        Rule(f"b-{name}", Action.BLOCK, Conditions(body_patterns=(p,)))
        for name, p in BUILTIN_PATTERNS.items()
    ]
    rules += [
        Rule(f"r-{name}", Action.BLOCK, Conditions(body_patterns=(p,)), Phase.RESPONSE)
        for name, p in BUILTIN_PATTERNS.items()
    ]
    return Policy(rules)


def chat_body(size: int) -> bytes:
    words = "the quick brown fox jumps over the lazy dog while reading config files " * 8
    messages, total = [], 0
    while total < size:
        messages.append({"role": "user", "content": words})
        total += len(words) + 30
    return json.dumps({"model": "gpt", "messages": messages}).encode()


def main(argv: list[str] | None = None) -> None:
    p = policy()
    header_only = Policy(
        [Rule("paste", Action.BLOCK, Conditions(hosts=(HostPattern.parse("x.y"),)))]
    )
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        header_only.decide_request(CTX, BodyViews.of(b""))
    print(f"header-only decision: {(time.perf_counter() - start) / n * 1e6:.1f} us")
    for size in (10_000, 100_000, 1_000_000):
        body = chat_body(size)
        rounds = max(3, 2_000_000 // size)
        start = time.perf_counter()
        for _ in range(rounds):
            decision = p.decide_request(CTX, BodyViews.of(body, "application/json"))
        elapsed = (time.perf_counter() - start) / rounds
        assert decision.action is Action.ALLOW
        print(
            f"request body {len(body) / 1e3:.0f} kB, {len(BUILTIN_PATTERNS)} patterns: "
            f"{elapsed * 1e3:.2f} ms ({len(body) / elapsed / 1e6:.0f} MB/s)"
        )
    rp = p.response_policy(CTX)
    assert rp is not None
    text = "token " * 20000
    scanner = rp.stream()
    start = time.perf_counter()
    for i in range(0, len(text), 20):
        scanner.feed(text[i : i + 20])
    elapsed = time.perf_counter() - start
    print(f"stream scan, 20-char pieces: {len(text) / elapsed / 1e3:.0f} kchars/s")


if __name__ == "__main__":
    main()
