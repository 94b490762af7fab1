"""Content-encoding decoders, buffered and incremental, with a hard output cap.

Redaction must see the decoded bytes, and a compressed body is attacker-sized: a few hundred
bytes of brotli expand to gigabytes. Every decoder here therefore counts what it produces and
raises `BodyTooLarge` as soon as the cumulative output passes `max_output`, without first
materialising the whole expansion.

`Content-Encoding: gzip, br` means gzip was applied first, so stages decode in reverse order.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Protocol

import brotli
import zstandard


class DecodingError(Exception):
    """Base of every decoding failure; `code` is stable and safe to log or return."""

    code = "decoding_error"


class UnsupportedEncoding(DecodingError):
    code = "unsupported_content_encoding"


class DecodeFailed(DecodingError):
    """Corrupt, truncated or trailing-garbage input."""

    code = "content_decode_failed"


class BodyTooLarge(DecodingError):
    code = "body_too_large"


# Input slice sizes for codecs whose decompress call cannot bound its output. One zstd block is
# at most 128 KiB from >= 4 input bytes, so a 128-byte slice yields at most ~4 MiB. brotli < 1.2
# has no output limit and one input byte can finish a 16 MiB meta-block, so slices stay tiny.
_ZSTD_SLICE = 128
_BROTLI_SLICE = 64
# Output granularity for codecs that can bound it (zlib, brotli >= 1.2).
_OUTPUT_STEP = 1 << 20


class _Stage(Protocol):
    def decode(self, chunk: bytes) -> bytes: ...
    def finish(self) -> bytes: ...


class _Budget:
    """Output counter shared by the stages of one decoder: cumulative, and optionally per call."""

    def __init__(self, max_output: int, max_call: int | None = None) -> None:
        if max_output < 0 or (max_call is not None and max_call < 0):
            raise ValueError("output caps must be >= 0")
        self.remaining = max_output
        self._max_call = max_call
        self._call_left = max_output if max_call is None else max_call

    def new_call(self) -> None:
        if self._max_call is not None:
            self._call_left = self._max_call

    def take(self, data: bytes) -> bytes:
        self.remaining -= len(data)
        if self.remaining < 0:
            raise BodyTooLarge("decoded body exceeds max_output")
        if self._max_call is not None:
            self._call_left -= len(data)
            if self._call_left < 0:
                raise BodyTooLarge("one chunk decodes to more than max_chunk_output")
        return data

    def step(self) -> int:
        """How much one bounded decompress call may produce (one byte more than allowed trips)."""
        return min(self.remaining + 1, self._call_left + 1, _OUTPUT_STEP)


class _Identity:
    def __init__(self, budget: _Budget) -> None:
        self._budget = budget

    def decode(self, chunk: bytes) -> bytes:
        return self._budget.take(chunk)

    def finish(self) -> bytes:
        return b""


class _Zlib:
    """gzip (multi-member) and deflate (zlib-wrapped, or raw as browsers also accept)."""

    def __init__(self, budget: _Budget, kind: str) -> None:
        self._budget = budget
        self._kind = kind
        self._obj: zlib._Decompress | None = None
        self._head = b""  # deflate: bytes seen before the wrapper is known
        self._started = False

    def _new(self, first: bytes) -> zlib._Decompress:
        if self._kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        cmf, flg = first[0], first[1]
        wrapped = cmf & 0x0F == 8 and cmf >> 4 <= 7 and (cmf << 8 | flg) % 31 == 0
        return zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)

    def decode(self, chunk: bytes) -> bytes:
        data = self._head + chunk
        self._head = b""
        out: list[bytes] = []
        while data:
            if self._obj is None:
                if self._started and self._kind == "deflate":
                    raise DecodeFailed("trailing data after the deflate stream")
                if self._kind == "deflate" and len(data) < 2:
                    self._head = data
                    break
                self._obj = self._new(data)
                self._started = True
            data = self._drain(self._obj, data, out)
        return b"".join(out)

    def _drain(self, obj: zlib._Decompress, data: bytes, out: list[bytes]) -> bytes:
        """Decompress in bounded steps; returns input left over after the end of a member."""
        while True:
            step = self._budget.step()
            try:
                piece = obj.decompress(data, step)
            except zlib.error as exc:
                raise DecodeFailed(f"invalid {self._kind} data") from exc
            out.append(self._budget.take(piece))
            data = obj.unconsumed_tail
            if obj.eof:
                # gzip allows several members back to back; anything else is garbage.
                rest = obj.unused_data + data
                self._obj = None
                return rest
            # A full output step may leave output pending inside zlib even with no input left.
            if not data and len(piece) < step:
                return b""

    def finish(self) -> bytes:
        if self._head or (self._obj is not None and not self._obj.eof):
            raise DecodeFailed(f"truncated {self._kind} data")
        return b""


class _Brotli:
    def __init__(self, budget: _Budget) -> None:
        self._budget = budget
        self._obj = brotli.Decompressor()
        self._bounded = hasattr(self._obj, "can_accept_more_data")
        self._seen = False

    def decode(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if self._obj.is_finished():
            raise DecodeFailed("trailing data after the br stream")
        self._seen = True
        try:
            if self._bounded:
                return self._decode_bounded(chunk)
            return b"".join(
                self._budget.take(self._obj.process(chunk[i : i + _BROTLI_SLICE]))
                for i in range(0, len(chunk), _BROTLI_SLICE)
            )
        except brotli.error as exc:
            raise DecodeFailed("invalid br data") from exc

    def _decode_bounded(self, chunk: bytes) -> bytes:
        out = [self._budget.take(self._obj.process(chunk, output_buffer_limit=self._budget.step()))]
        while not self._obj.can_accept_more_data():
            out.append(
                self._budget.take(self._obj.process(b"", output_buffer_limit=self._budget.step()))
            )
        return b"".join(out)

    def finish(self) -> bytes:
        if self._seen and not self._obj.is_finished():
            raise DecodeFailed("truncated br data")
        return b""


class _Zstd:
    """Streaming zstd: frames without a content size, several frames, skippable frames."""

    def __init__(self, budget: _Budget) -> None:
        self._budget = budget
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._in_frame = False

    def decode(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        for i in range(0, len(chunk), _ZSTD_SLICE):
            data = chunk[i : i + _ZSTD_SLICE]
            while data:
                self._in_frame = True
                try:
                    out.append(self._budget.take(self._obj.decompress(data)))
                except zstandard.ZstdError as exc:
                    raise DecodeFailed("invalid zstd data") from exc
                data = b""
                if self._obj.eof:
                    data = self._obj.unused_data
                    self._obj = self._dctx.decompressobj()
                    self._in_frame = False
        return b"".join(out)

    def finish(self) -> bytes:
        if self._in_frame:
            raise DecodeFailed("truncated zstd data")
        return b""


def _stage(name: str, budget: _Budget) -> _Stage:
    factories: dict[str, Callable[[], _Stage]] = {
        "gzip": lambda: _Zlib(budget, "gzip"),
        "x-gzip": lambda: _Zlib(budget, "gzip"),
        "deflate": lambda: _Zlib(budget, "deflate"),
        "br": lambda: _Brotli(budget),
        "zstd": lambda: _Zstd(budget),
    }
    try:
        return factories[name]()
    except KeyError:
        # The header is not secret, but keep the message short and printable.
        shown = name[:32].encode("ascii", "backslashreplace").decode()
        raise UnsupportedEncoding(f"unsupported content-encoding {shown!r}") from None


def parse_content_encoding(content_encoding: str | None) -> list[str]:
    """Codings in the order they were applied, `identity` and empty items dropped."""
    if not content_encoding:
        return []
    names = (part.strip().lower() for part in content_encoding.split(","))
    return [name for name in names if name and name != "identity"]


class IncrementalDecoder:
    """Decode a body chunk by chunk; `finish()` raises if the stream is truncated.

    `max_output` caps the cumulative decoded size over the whole stream. Each stage of a chain
    is capped too, so a bomb nested inside another coding cannot expand unnoticed.
    `max_chunk_output` also caps what each single `decode()`/`finish()` call may produce: a
    stream of unbounded length (SSE) then decodes in bounded memory with `max_output=sys.maxsize`.
    """

    def __init__(
        self, content_encoding: str | None, max_output: int, *, max_chunk_output: int | None = None
    ) -> None:
        self._final = _Budget(max_output, max_chunk_output)
        self._budgets = [self._final]
        names = parse_content_encoding(content_encoding)
        stages: list[_Stage] = []
        for i, name in enumerate(names):
            budget = self._final if i == 0 else _Budget(max_output, max_chunk_output)
            if i:
                self._budgets.append(budget)
            stages.append(_stage(name, budget))
        # Decode in reverse order of application; the last stage produces the body.
        self._stages: list[_Stage] = stages[::-1] or [_Identity(self._final)]

    def decode(self, chunk: bytes) -> bytes:
        self._new_call()
        for stage in self._stages:
            chunk = stage.decode(chunk)
        return chunk

    def finish(self) -> bytes:
        self._new_call()
        out = b""
        for stage in self._stages:
            out = stage.decode(out) + stage.finish()
        return out

    def _new_call(self) -> None:
        for budget in self._budgets:
            budget.new_call()


def decode_body(data: bytes, content_encoding: str | None, max_output: int) -> bytes:
    """Decode a complete body; see `IncrementalDecoder` for the errors raised."""
    decoder = IncrementalDecoder(content_encoding, max_output)
    return decoder.decode(data) + decoder.finish()
