#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris) of the engines that parse hostile input.

The bounded, derandomized versions of these properties are tests/unit/test_fuzz_engines.py; this
runs them unbounded to find new inputs. Any exception other than the module's typed error, and any
standalone secret in redacted output, is a crash (atheris stops and writes the input to
`crash-*`). Turn a crash into a regression test before fixing it.

    pip install atheris        # wheels for CPython 3.11/3.12 on Linux x86_64
    python scripts/fuzz_engines.py sse -max_total_time=60
    python scripts/fuzz_engines.py all -max_total_time=30      # each target in turn

Targets: sse, json, bodies, decoding, tokens.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "addons"))

import atheris  # noqa: E402

with atheris.instrument_imports():
    from sluicegate.auth.extract import token_from_inner_headers, token_from_proxy_authorization
    from sluicegate.auth.keys import SharedSecretSource
    from sluicegate.auth.verifier import TokenPolicy, TokenRejected, TokenVerifier
    from sluicegate.redaction.bodies import BodyPolicy, BodyRefused, redact_body
    from sluicegate.redaction.json_redact import JsonRedactionError, redact_json_text
    from sluicegate.redaction.redactor import Redactor
    from sluicegate.redaction.rules import Direction, load_rule_pack
    from sluicegate.redaction.sse import SseRedactor
    from sluicegate.shapes import decoding
    from sluicegate.shapes.sse import SseError

REDACTOR = Redactor(load_rule_pack([ROOT / "rules"]), Direction.RESPONSE)
SECRET = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
STANDALONE = re.compile(rf"(?<![\w-]){re.escape(SECRET)}(?![\w-])".encode())
VERIFIER = TokenVerifier(
    [SharedSecretSource(b"k" * 32, kid="hs-1")],
    TokenPolicy(issuers=("iss",), audiences=("aud",)),
)
CONTENT_TYPES = [None, "application/json", "text/plain", "application/x-www-form-urlencoded"]
CONTENT_TYPES += [
    "multipart/form-data; boundary=b",
    "application/x-ndjson",
    "text/x; charset=utf-16",
]
ENCODINGS = ["gzip", "deflate", "br", "zstd", "gzip, br", "zstd, deflate", "identity", "x"]


def with_secret(fdp: atheris.FuzzedDataProvider) -> bytes:
    """Fuzzer bytes with the secret inserted (standing on its own) where the fuzzer says."""
    at = fdp.ConsumeIntInRange(0, 4096)
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    at %= len(data) + 1
    return data[:at] + b" " + SECRET.encode() + b" " + data[at:]


def assert_redacted(out: bytes) -> None:
    if STANDALONE.search(out):
        raise AssertionError("a secret passed unredacted")


def fuzz_sse(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    cut = fdp.ConsumeIntInRange(1, 64)
    stream = with_secret(fdp)
    sse = SseRedactor(lambda: REDACTOR.stream(4096), max_event_bytes=8192)
    out = b""
    try:
        for i in range(0, len(stream), cut):
            out += sse.feed(stream[i : i + cut])
        out += sse.finish()
    except SseError:
        pass
    assert_redacted(out)


def fuzz_json(data: bytes) -> None:
    text = with_secret(atheris.FuzzedDataProvider(data)).decode("utf-8", "replace")
    try:
        result = redact_json_text(text, REDACTOR)
    except JsonRedactionError:
        return
    assert_redacted(result.text.encode())


def fuzz_bodies(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    content_type = fdp.PickValueInList(CONTENT_TYPES)
    body = with_secret(fdp)
    try:
        result = redact_body(body, content_type, REDACTOR, BodyPolicy())
    except BodyRefused:
        return
    assert_redacted(result.body)


def fuzz_decoding(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    encoding = fdp.PickValueInList(ENCODINGS)
    cut = fdp.ConsumeIntInRange(1, 256)
    body = fdp.ConsumeBytes(fdp.remaining_bytes())
    with contextlib.suppress(decoding.DecodingError):
        decoding.decode_body(body, encoding, max_output=1 << 20)
    try:
        decoder = decoding.IncrementalDecoder(encoding, 1 << 20, max_chunk_output=1 << 16)
        for i in range(0, len(body), cut):
            decoder.decode(body[i : i + cut])
        decoder.finish()
    except decoding.DecodingError:
        pass


def fuzz_tokens(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    text = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
    with contextlib.suppress(TokenRejected):
        VERIFIER.verify(text)
    for scheme in ("Basic ", "Bearer "):
        with contextlib.suppress(TokenRejected):
            token_from_proxy_authorization(scheme + text)
    with contextlib.suppress(TokenRejected):
        token_from_inner_headers({"authorization": text, "x-api-key": text[::-1]})


TARGETS: dict[str, Callable[[bytes], None]] = {
    "sse": fuzz_sse,
    "json": fuzz_json,
    "bodies": fuzz_bodies,
    "decoding": fuzz_decoding,
    "tokens": fuzz_tokens,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in (*TARGETS, "all"):
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)},all}} [libFuzzer options]")
    name, options = sys.argv[1], sys.argv[2:]
    if name == "all":  # one process per target: atheris.Fuzz() never returns
        failed = [
            t for t in TARGETS if subprocess.run([sys.executable, __file__, t, *options]).returncode
        ]
        sys.exit(f"crashes in: {', '.join(failed)}" if failed else 0)
    atheris.Setup([sys.argv[0], *options], TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
