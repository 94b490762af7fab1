import gzip
import itertools
import sys
import tracemalloc
import zlib

import brotli
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from sluicegate.shapes.decoding import (
    BodyTooLarge,
    DecodeFailed,
    DecodingError,
    IncrementalDecoder,
    UnsupportedEncoding,
    decode_body,
    parse_content_encoding,
)
from tests.support.upstream import StreamCompressor

BODY = b'data: {"choices":[{"delta":{"content":"hello"}}]}\n\n' * 50
MB = 1 << 20


def raw_deflate(data: bytes) -> bytes:
    obj = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return obj.compress(data) + obj.flush()


def zstd_without_size(data: bytes) -> bytes:
    obj = zstandard.ZstdCompressor().compressobj()
    return obj.compress(data) + obj.flush()


ENCODERS = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": zstandard.ZstdCompressor().compress,
    "identity": lambda data: data,
}


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def decode_in_chunks(data: bytes, encoding: str, size: int, max_output: int = MB) -> bytes:
    decoder = IncrementalDecoder(encoding, max_output)
    return b"".join(decoder.decode(c) for c in chunks(data, size)) + decoder.finish()


@pytest.mark.parametrize("encoding", sorted(ENCODERS))
def test_round_trip_buffered_and_byte_by_byte(encoding: str) -> None:
    encoded = ENCODERS[encoding](BODY)
    assert decode_body(encoded, encoding, MB) == BODY
    assert decode_in_chunks(encoded, encoding, 1) == BODY


@pytest.mark.parametrize(
    ("encoded", "encoding"),
    [
        (raw_deflate(BODY), "deflate"),
        (zstd_without_size(BODY), "zstd"),
        (gzip.compress(BODY[:100]) + gzip.compress(BODY[100:]), "gzip"),
        (zstandard.ZstdCompressor().compress(BODY[:7]) + zstd_without_size(BODY[7:]), "zstd"),
        (BODY, None),
        (BODY, ""),
        (gzip.compress(BODY), " GZIP "),
    ],
    ids=["raw-deflate", "zstd-no-size", "gzip-members", "zstd-frames", "none", "empty", "case"],
)
def test_variants_browsers_accept(encoded: bytes, encoding: str | None) -> None:
    assert decode_body(encoded, encoding, MB) == BODY
    assert decode_in_chunks(encoded, encoding or "", 3) == BODY


def test_zstd_skippable_frame_is_ignored() -> None:
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    encoded = skippable + zstandard.ZstdCompressor().compress(BODY)
    assert decode_in_chunks(encoded, "zstd", 5) == BODY


def test_chain_decodes_in_reverse_order_of_application() -> None:
    encoded = brotli.compress(gzip.compress(BODY))  # gzip applied first, then br
    assert decode_body(encoded, "gzip, br", MB) == BODY
    assert decode_in_chunks(encoded, "gzip,identity, br", 2) == BODY
    with pytest.raises(DecodeFailed):
        decode_body(encoded, "br, gzip", MB)


def test_parse_content_encoding() -> None:
    assert parse_content_encoding(" gzip , ,Identity, BR") == ["gzip", "br"]
    assert parse_content_encoding(None) == []


@pytest.mark.parametrize("encoding", ["compress", "x-compress", "gzip, snappy", "pack200-gzip"])
def test_unknown_encoding_is_refused(encoding: str) -> None:
    with pytest.raises(UnsupportedEncoding) as info:
        IncrementalDecoder(encoding, MB)
    assert info.value.code == "unsupported_content_encoding"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_truncated_stream_fails_at_finish(encoding: str) -> None:
    encoded = ENCODERS[encoding](BODY)
    decoder = IncrementalDecoder(encoding, MB)
    partial = decoder.decode(encoded[: len(encoded) // 2])
    assert BODY.startswith(partial)
    with pytest.raises(DecodeFailed) as info:
        decoder.finish()
    assert info.value.code == "content_decode_failed"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_corrupt_and_trailing_garbage_fail(encoding: str) -> None:
    encoded = ENCODERS[encoding](BODY)
    corrupt = encoded[:4] + bytes(b ^ 0x5A for b in encoded[4:])
    with pytest.raises(DecodeFailed):
        decode_body(corrupt, encoding, MB)
    with pytest.raises(DecodeFailed):
        decode_body(encoded + b"garbage!", encoding, MB)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_empty_body_decodes_to_empty(encoding: str) -> None:
    assert decode_body(b"", encoding, MB) == b""


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "identity"])
def test_output_cap_is_exact(encoding: str) -> None:
    encoded = ENCODERS[encoding](BODY)
    assert decode_body(encoded, encoding, len(BODY)) == BODY
    with pytest.raises(BodyTooLarge) as info:
        decode_body(encoded, encoding, len(BODY) - 1)
    assert info.value.code == "body_too_large"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_bomb_is_stopped_without_expanding_it(encoding: str) -> None:
    # 32 MiB of zeros; the decoder must stop at the 1 MiB cap, not inflate everything first.
    zeros = bytes(32 * MB)
    bomb = brotli.compress(zeros, quality=4) if encoding == "br" else ENCODERS[encoding](zeros)
    decoder = IncrementalDecoder(encoding, MB)
    produced = 0
    with pytest.raises(BodyTooLarge):
        for chunk in chunks(bomb, 4096):
            produced += len(decoder.decode(chunk))
    assert produced <= MB


def test_bomb_nested_in_a_chain_is_stopped() -> None:
    bomb = gzip.compress(gzip.compress(bytes(32 * MB)))
    with pytest.raises(BodyTooLarge):
        decode_body(bomb, "gzip, gzip", MB)


def test_errors_share_one_base_with_stable_codes() -> None:
    codes = {cls.code for cls in (UnsupportedEncoding, DecodeFailed, BodyTooLarge)}
    assert len(codes) == 3
    assert all(issubclass(cls, DecodingError) for cls in (UnsupportedEncoding, DecodeFailed))


@settings(max_examples=60, deadline=None)
@given(
    body=st.binary(max_size=3000),
    encoding=st.sampled_from(["gzip", "deflate", "br", "zstd", "gzip, br", "zstd, deflate"]),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=8),
)
def test_any_chunking_gives_the_same_body(body: bytes, encoding: str, cuts: list[int]) -> None:
    encoded = body
    for name in parse_content_encoding(encoding):
        encoded = ENCODERS[name](encoded)
    points = sorted({min(c, len(encoded)) for c in cuts} | {0, len(encoded)})
    decoder = IncrementalDecoder(encoding, MB)
    out = b"".join(decoder.decode(encoded[a:b]) for a, b in itertools.pairwise(points))
    assert out + decoder.finish() == body


# -- streams: a cap per decoded chunk instead of per body -------------------------------------


def stream_encoded(encoding: str, pieces: list[bytes]) -> list[bytes]:
    """Each piece encoded and flushed on its own, as servers send SSE events."""
    if encoding == "identity":
        return list(pieces)
    compressor = StreamCompressor(encoding)
    out = [compressor.compress(piece) for piece in pieces]
    out[-1] += compressor.finish()
    return out


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "identity"])
def test_chunk_cap_bounds_each_chunk_not_the_whole_stream(encoding: str) -> None:
    event = BODY[:1000]
    decoder = IncrementalDecoder(encoding, sys.maxsize, max_chunk_output=len(event))
    encoded = stream_encoded(encoding, [event] * 300)
    out = b"".join(decoder.decode(chunk) for chunk in encoded) + decoder.finish()
    assert out == event * 300  # 300 times the per-chunk cap
    decoder = IncrementalDecoder(encoding, sys.maxsize, max_chunk_output=len(event) - 1)
    with pytest.raises(BodyTooLarge):
        decoder.decode(b"".join(encoded))


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_chunk_cap_stops_a_bomb_in_one_chunk_without_expanding_it(encoding: str) -> None:
    if encoding == "br" and not hasattr(brotli.Decompressor(), "can_accept_more_data"):
        pytest.skip("brotli < 1.2 cannot bound what one input slice expands to")
    zeros = bytes(32 * MB)
    bomb = brotli.compress(zeros, quality=4) if encoding == "br" else ENCODERS[encoding](zeros)
    decoder = IncrementalDecoder(encoding, sys.maxsize, max_chunk_output=MB)
    tracemalloc.start()
    try:
        with pytest.raises(BodyTooLarge):
            decoder.decode(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MB
