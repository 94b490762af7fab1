"""How often WebSocket messages wait in the cross-message hold-back (redaction/messages.py), and
what reading them as a stream costs beside redacting each message whole.

Three workloads built from this repository's own text (README, docs, Python sources; no secrets):
  * realtime: OpenAI realtime `response.text.delta` events, ~token-sized deltas (1-6 characters
    of a word, with its leading space);
  * lines: plain text messages, one line each;
  * jsonrpc: JSON-RPC results carrying a line of text (other JSON: never part of a stream).

For each: the share of messages held when they arrived, how many later messages a held one
waited for (median, max), how many were still waiting at the end (the timer would release
them), and the time per message of the stream step alone and of whole-message redaction (the
existing step), medians of interleaved rounds. Run: python scripts/bench_ws_hold.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "addons"))

from sluicegate.redaction.messages import MessageStream  # noqa: E402
from sluicegate.redaction.redactor import Redactor  # noqa: E402
from sluicegate.redaction.rules import Direction, load_rule_pack  # noqa: E402

TOKEN = re.compile(r"\s*\S{1,6}|\s+")


def corpus(limit: int) -> str:
    paths = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    paths += sorted((REPO / "addons" / "sluicegate" / "redaction").glob("*.py"))
    return "".join(p.read_text(encoding="utf-8") for p in paths)[:limit]


def workloads(text: str) -> dict[str, list[str]]:
    lines = [line for line in text.splitlines(keepends=True) if line.strip()]
    realtime = [
        json.dumps({"type": "response.text.delta", "item_id": "item_1", "delta": piece})
        for piece in TOKEN.findall(text)
    ]
    jsonrpc = [
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": n,
                "result": {"content": [{"type": "text", "text": line}]},
            }
        )
        for n, line in enumerate(lines)
    ]
    return {"realtime": realtime, "lines": lines, "jsonrpc": jsonrpc}


def wait_stats(redactor: Redactor, messages: list[str]) -> dict[str, float]:
    """Messages through the gateway's default stream (64 messages, then release); a split secret
    (the corpus quotes example keys) would close the connection: counted, and a new stream goes
    on from the next message."""
    stream = MessageStream(redactor, overflow="release")
    waits: list[int] = []
    held = splits = forced = 0
    offset = 0  # sequence numbers restart with each stream
    for n, message in enumerate(messages):
        outcome = stream.push(message)
        if outcome.failure is not None:
            splits += 1
            forced += stream.forced
            stream = MessageStream(redactor, overflow="release")
            offset = n + 1
            continue
        held += outcome.held
        for released in outcome.released:
            if released.waited:
                waits.append(n - offset - released.seq)
    return {
        "messages": len(messages),
        "held_pct": 100 * held / len(messages),
        "wait_median": statistics.median(waits) if waits else 0,
        "wait_p99": sorted(waits)[int(len(waits) * 0.99)] if waits else 0,
        "wait_max": max(waits, default=0),
        "forced": forced + stream.forced,
        "splits": splits,
    }


def timing(redactor: Redactor, messages: list[str], rounds: int) -> tuple[float, float]:
    """Microseconds per message: the stream step alone, and whole-message redaction."""
    redacted = [redactor.redact_text(m).text for m in messages]
    stream_times, whole_times = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        stream = MessageStream(redactor, overflow="release")
        for m, r in zip(messages, redacted, strict=True):
            stream.push(m, r)
        stream_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        for m in messages:
            redactor.redact_text(m)
        whole_times.append(time.perf_counter() - start)
    n = len(messages)
    return 1e6 * statistics.median(stream_times) / n, 1e6 * statistics.median(whole_times) / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chars", type=int, default=200_000)
    args = parser.parse_args()
    redactor = Redactor(load_rule_pack([REPO / "rules"], "default"), Direction.RESPONSE)
    print("| workload | messages | held on arrival | wait in messages (median / p99 / max) "
          "| released by the 64-message bound | split secrets | stream step µs/msg "
          "| whole-message redaction µs/msg |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, messages in workloads(corpus(args.chars)).items():
        stats = wait_stats(redactor, messages)
        stream_us, whole_us = timing(redactor, messages, args.rounds)
        print(
            f"| {name} | {stats['messages']} | {stats['held_pct']:.2f}% | "
            f"{stats['wait_median']:g} / {stats['wait_p99']:g} / {stats['wait_max']:g} | "
            f"{stats['forced']} | {stats['splits']} | {stream_us:.1f} | {whole_us:.1f} |"
        )


if __name__ == "__main__":
    main()
