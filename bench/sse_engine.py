"""Engine-only benchmark of streaming SSE redaction (no proxy, no network).

    python -m bench sse_engine [--events 2000] [--long 100000]
                                       [--redactor double|identity|rules]

Reports, per event shape, the cost per event (µs) and throughput of `SseRedactor` over a stream
of `--events` small deltas fed in network-sized chunks, next to the parser alone and to a
pass-through TextStream (the engine's own overhead). Then it feeds a `--long` stream through one
redactor and samples traced memory, which must stay flat: bounded by one event plus what the
text streams hold, not by the stream length.

`--redactor rules` uses the real StreamRedactor (engine/redactor.py with the default rule pack)
when that branch has landed; `double` is the regex test double from tests/support/sse_testing.py.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "addons"), str(ROOT)]

from sluicegate.redaction.sse import SseRedactor  # noqa: E402
from sluicegate.shapes.channels import TextStreamFactory  # noqa: E402
from sluicegate.shapes.sse import SseParser  # noqa: E402

WORDS = (
    "The quick brown fox jumps over the lazy dog while the build runs; "
    "export OPENAI_API_KEY=sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8t and retry. "
    "Then call the API at https://api.example.com/v1/items?id=42 with care. "
)
CHUNK = 1400  # a typical TLS record / network read


class PassThrough:
    def feed(self, text: str) -> str:
        return text

    def flush(self) -> str:
        return ""


def factory(kind: str) -> TextStreamFactory:
    if kind == "identity":
        return PassThrough
    if kind == "double":
        from tests.support.sse_testing import FakeRedactor

        redactor = FakeRedactor()
        return lambda: redactor.stream(max_hold=4096)
    from sluicegate.redaction.redactor import Direction, Redactor  # not on every branch yet
    from sluicegate.redaction.rules import load_rule_pack

    pack = load_rule_pack(sorted((ROOT / "rules").glob("*.yaml")))
    redactor = Redactor(pack, Direction.RESPONSE)
    return lambda: redactor.stream(max_hold=4096)


def deltas(count: int) -> Iterator[str]:
    text = itertools.cycle(WORDS)
    for i in range(count):
        yield "".join(itertools.islice(text, 3 + i % 4))


def chat_events(count: int) -> Iterator[bytes]:
    head = '{"id":"chatcmpl-9","object":"chat.completion.chunk","created":1,"model":"gpt-x",'
    for piece in deltas(count):
        delta = piece.replace("\\", "\\\\").replace('"', '\\"')
        yield (
            f'data: {head}"choices":[{{"index":0,"delta":{{"content":"{delta}"}},'
            f'"finish_reason":null}}]}}\n\n'
        ).encode()
    yield b"data: [DONE]\n\n"


def tool_events(count: int) -> Iterator[bytes]:
    import json

    args = json.dumps({"command": "".join(deltas(count))})
    pieces = [args[i : i + 5] for i in range(0, len(args), 5)][:count]
    for piece in pieces:
        call = {"index": 0, "function": {"arguments": piece}}
        chunk = {"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}
        yield b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def anthropic_events(count: int) -> Iterator[bytes]:
    import json

    for piece in deltas(count):
        payload = {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": piece},
        }
        yield b"event: content_block_delta\ndata: " + json.dumps(payload).encode() + b"\n\n"
    yield b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'


def responses_events(count: int) -> Iterator[bytes]:
    import json

    for seq, piece in enumerate(deltas(count)):
        payload = {
            "type": "response.output_text.delta",
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "delta": piece,
            "logprobs": [],
            "sequence_number": seq,
        }
        yield b"event: response.output_text.delta\ndata: " + json.dumps(payload).encode() + b"\n\n"


SHAPES: dict[str, Callable[[int], Iterator[bytes]]] = {
    "chat": chat_events,
    "chat-tool-args": tool_events,
    "anthropic": anthropic_events,
    "responses": responses_events,
}


def chunks(data: bytes, size: int = CHUNK) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def timed(run: Callable[[], object], repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def redact_all(make: TextStreamFactory, pieces: list[bytes]) -> bytes:
    redactor = SseRedactor(make)
    return b"".join(redactor.feed(p) for p in pieces) + redactor.finish()


def parse_all(pieces: list[bytes]) -> int:
    parser = SseParser()
    return sum(len(parser.feed(p)) for p in pieces) + len(parser.finish())


def bench(kind: str, count: int) -> None:
    make = factory(kind)
    print(f"{count} events per stream, fed in {CHUNK}-byte chunks; best of 5; redactor={kind}")
    print("parse: SseParser alone; engine: SseRedactor with pass-through text streams;")
    print(f"total: SseRedactor with the {kind} redactor (MB/s of SSE input)")
    print(f"{'shape':<16}{'parse µs/ev':>12}{'engine µs/ev':>14}{'total µs/ev':>13}{'MB/s':>8}")
    for name, build in SHAPES.items():
        data = b"".join(build(count))
        pieces = chunks(data)
        events = parse_all(pieces)
        parse = timed(lambda p=pieces: parse_all(p))
        engine = timed(lambda p=pieces: redact_all(PassThrough, p))
        total = timed(lambda p=pieces: redact_all(make, p))
        print(
            f"{name:<16}{parse / events * 1e6:>12.1f}{engine / events * 1e6:>14.1f}"
            f"{total / events * 1e6:>13.1f}{len(data) / total / 1e6:>8.1f}"
        )


def adversarial_events(count: int) -> Iterator[bytes]:
    """A key prefix followed by an endless run of key characters: the worst case for holding."""
    yield b'data: {"choices":[{"index":0,"delta":{"content":"sk-"}}]}\n\n'
    for i in range(count):
        piece = "Ab3dEf6hIj9kLm2nOp5q"[i % 20] * 4
        yield f'data: {{"choices":[{{"index":0,"delta":{{"content":"{piece}"}}}}]}}\n\n'.encode()


def memory(kind: str, count: int) -> None:
    print(f"\nlong streams of {count} chat events; traced memory in KiB at each tenth:")
    for name, build in (("normal", chat_events), ("held", adversarial_events)):
        redactor = SseRedactor(factory(kind))
        samples, sent, buffer = [], 0, bytearray()
        gc.collect()
        tracemalloc.start()
        for i, event in enumerate(build(count)):
            buffer += event
            if len(buffer) >= CHUNK:
                sent += len(redactor.feed(bytes(buffer)))
                buffer.clear()
            if i % (count // 10 or 1) == 0:
                samples.append(tracemalloc.get_traced_memory()[0])
        sent += len(redactor.feed(bytes(buffer))) + len(redactor.finish())
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        curve = " ".join(f"{size / 1024:.0f}" for size in samples)
        print(f"  {name:<7} {sent / 1e6:5.1f} MB out  [{curve}]  peak {peak / 1024:.0f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--long", type=int, default=100_000)
    parser.add_argument("--redactor", choices=["double", "identity", "rules"], default="double")
    args = parser.parse_args(argv)
    bench(args.redactor, args.events)
    memory(args.redactor, args.long)


if __name__ == "__main__":
    main()
