"""Buffered text/event-stream bodies through the SSE engine: microseconds per byte.

A buffered SSE body (a request with `Content-Type: text/event-stream`, or a response the gateway
holds whole) is redacted by `redaction.bodies.redact_body`, which runs the SSE engine over it.
The gateway refuses such a body up front (503 `redaction_timeout`) when its size predicts more
than the redaction budget: `mitm.redaction.SSE_US_PER_BYTE` is the figure this script measures
(the worst shape, rounded up), and `SSE_MAX_BYTES` the size it allows within `BUDGET_SECONDS`
with the safety factor `SSE_SAFETY`.

Shapes: OpenAI chat deltas of a few characters (the most events per byte), Anthropic text and
tool-call deltas, large JSON events (`response.completed`-like), plain text data lines, and an
adversarial stream of deltas full of keyword and token prefixes. Each is timed at several sizes
(median of interleaved rounds) with the default profile's rules.

    .venv/bin/python scripts/bench_sse_body.py [--sizes 64,256,1024] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "addons"), str(ROOT)]

from sluicegate.mitm import redaction as redaction_addon  # noqa: E402
from sluicegate.redaction.bodies import BodyPolicy, redact_body  # noqa: E402
from sluicegate.redaction.redactor import Redactor  # noqa: E402
from sluicegate.redaction.rules import Direction, load_rule_pack  # noqa: E402

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "the",
    "build",
    "runs",
    "tests",
]


def _event(payload: object, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return head + "data: " + json.dumps(payload, separators=(",", ":")) + "\n\n"


def openai_deltas(i: int) -> str:
    word = WORDS[i % len(WORDS)]
    return _event(
        {
            "id": "chatcmpl-9x",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "gpt-4o",
            "choices": [{"index": 0, "delta": {"content": " " + word}, "finish_reason": None}],
        }
    )


def anthropic_deltas(i: int) -> str:
    if i % 3 == 0:
        delta = {"type": "input_json_delta", "partial_json": f'{{"path": "src/f{i}.py", '}
        return _event(
            {"type": "content_block_delta", "index": 1, "delta": delta}, "content_block_delta"
        )
    delta = {"type": "text_delta", "text": " " + WORDS[i % len(WORDS)]}
    return _event(
        {"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta"
    )


def large_events(i: int) -> str:
    text = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(400))
    return _event({"type": "response.completed", "response": {"id": f"r{i}", "output_text": text}})


def text_lines(i: int) -> str:
    return "data: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(12)) + "\n\n"


def adversarial(i: int) -> str:
    units = ("ghp_", "pwd ", "secret: ", "[REDACTED:", "sk-", "AKIA", "token=", "-----BEGIN ")
    delta = {"content": units[i % len(units)] * 3}
    return _event({"choices": [{"index": 0, "delta": delta}]})


ADVERSARIAL = {"adversarial deltas"}
SHAPES: dict[str, Callable[[int], str]] = {
    "openai chat deltas": openai_deltas,
    "anthropic text+tool deltas": anthropic_deltas,
    "large JSON events": large_events,
    "text data lines": text_lines,
    "adversarial deltas": adversarial,
}


def body_of(shape: Callable[[int], str], size: int) -> bytes:
    pieces, total, i = [], 0, 0
    while total < size:
        piece = shape(i)
        pieces.append(piece)
        total += len(piece)
        i += 1
    return "".join(pieces).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,256,1024", help="KiB, comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", default="default")
    args = parser.parse_args()
    sizes = [int(s) * 1024 for s in args.sizes.split(",")]
    pack = load_rule_pack(sorted((ROOT / "rules").glob("*.yaml")), args.profile)
    redactor = Redactor(pack, Direction.RESPONSE)
    policy = BodyPolicy()
    bodies = {
        (name, size): body_of(shape, size) for name, shape in SHAPES.items() for size in sizes
    }
    times: dict[tuple[str, int], list[float]] = {key: [] for key in bodies}
    for _ in range(args.rounds):  # interleaved: every body once per round
        for key, body in bodies.items():
            start = time.perf_counter()
            redact_body(body, "text/event-stream", redactor, policy)
            times[key].append(time.perf_counter() - start)
    print(f"profile {args.profile}, median of {args.rounds} interleaved rounds")
    print(f"{'shape':28} {'KiB':>6} {'ms':>9} {'us/byte':>8}")
    worst = {"ordinary": 0.0, "adversarial": 0.0}
    for (name, size), runs in times.items():
        median = statistics.median(runs)
        per_byte = median * 1e6 / len(bodies[name, size])
        kind = "adversarial" if name in ADVERSARIAL else "ordinary"
        worst[kind] = max(worst[kind], per_byte)
        print(f"{name:28} {size // 1024:>6} {median * 1000:>9.1f} {per_byte:>8.3f}")
    budget = redaction_addon.BUDGET_SECONDS
    limit = redaction_addon.SSE_MAX_BYTES
    print(
        f"\nworst ordinary shape: {worst['ordinary']:.3f} us/byte; "
        f"adversarial: {worst['adversarial']:.3f}"
    )
    print(
        f"gateway: SSE_US_PER_BYTE = {redaction_addon.SSE_US_PER_BYTE} (ordinary shapes, rounded "
        f"up), safety {redaction_addon.SSE_SAFETY}: refused up front over {limit} bytes; at that "
        f"size this machine needs {limit * worst['ordinary'] / 1e6:.2f} s for the worst ordinary "
        f"shape (budget {budget:.0f} s); adversarial bodies meet the engine's own budget stop"
    )


if __name__ == "__main__":
    main()
