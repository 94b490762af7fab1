import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluicegate.shapes.sse import (
    BOM,
    SseEvent,
    SseEventTooLarge,
    SseInvalidUtf8,
    SseParser,
    format_event,
)


def parse(data: bytes, cuts: list[int] | None = None, **kwargs: int) -> list[SseEvent]:
    parser = SseParser(**kwargs)
    points = sorted({0, len(data), *(min(c, len(data)) for c in cuts or [])})
    events = [e for a, b in itertools.pairwise(points) for e in parser.feed(data[a:b])]
    return events + parser.finish()


def semantic(events: list[SseEvent]) -> list[tuple]:
    """What a client sees: blocks with lines, by their fields (line-less blocks carry nothing)."""
    return [(e.data, e.event, e.id, tuple(e.comments), e.terminated) for e in events if e.lines]


def test_fields_comments_and_unknown_fields() -> None:
    stream = (
        b": keep-alive\n\n"
        b'event: message_start\nid: 7\nretry: 1500\ndata: {"a":1}\n\n'
        b"data:no-space\ndata:  two spaces\nfoo: bar\ndata\n\n"
        b"data: a: colon inside\n\n"
    )
    events = parse(stream)
    assert [e.comments for e in events] == [[" keep-alive"], [], [], []]
    assert events[0].data is None
    assert (events[1].event, events[1].id, events[1].data) == ("message_start", "7", '{"a":1}')
    assert events[1].lines[2].value == "1500"
    assert events[2].data == "no-space\n two spaces\n"
    assert events[2].lines[2].field == "foo"
    assert events[3].data == "a: colon inside"
    assert b"".join(e.raw for e in events) == stream


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings(eol: bytes) -> None:
    stream = b"data: one" + eol + b"data: two" + eol + eol + b"data: three" + eol + eol
    events = parse(stream)
    assert [e.data for e in events] == ["one\ntwo", "three"]
    assert all(e.eol == eol for e in events)
    assert b"".join(e.raw for e in events) == stream


def test_cr_then_lf_across_chunks_is_one_line_ending() -> None:
    stream = b"data: a\r\n\r\ndata: b\r\n\r\n"
    for cut in range(len(stream) + 1):
        events = parse(stream, [cut])
        assert semantic(events) == [("a", None, None, (), True), ("b", None, None, (), True)]
        assert b"".join(e.raw for e in events) == stream


def test_bom_at_start_only_even_split() -> None:
    stream = BOM + b"data: x\n\ndata: \xef\xbb\xbfy\n\n"
    for cut in range(4):
        events = parse(stream, [1, cut])
        assert events[0].prefix == BOM
        assert [e.data for e in events] == ["x", "\ufeffy"]
        assert b"".join(e.raw for e in events) == stream


def test_utf8_character_split_across_chunks() -> None:
    stream = "data: héllo 🔑 wörld\n\n".encode()
    for cut in range(len(stream)):
        assert parse(stream, [cut])[0].data == "héllo 🔑 wörld"


def test_final_event_without_blank_line_is_kept() -> None:
    events = parse(b"data: a\n\ndata: tail")
    assert [e.data for e in events] == ["a", "tail"]
    assert not events[1].terminated
    assert events[1].raw == b"data: tail"
    events = parse(b"data: a\n\ndata: tail\n")
    assert events[1].raw == b"data: tail\n" and not events[1].terminated


def test_invalid_utf8_fails_closed_after_earlier_events() -> None:
    parser = SseParser()
    good = parser.feed(b"data: ok\n\ndata: \xff\xfe\n\n")
    assert [e.data for e in good] == ["ok"]
    with pytest.raises(SseInvalidUtf8) as info:
        parser.feed(b"")
    assert info.value.code == "sse_invalid_utf8"
    with pytest.raises(SseInvalidUtf8):
        SseParser().feed(b"data: \xc3\n\n")


def test_event_size_is_bounded_even_without_line_endings() -> None:
    parser = SseParser(max_event_bytes=100)
    parser.feed(b"data: " + b"x" * 90)
    with pytest.raises(SseEventTooLarge) as info:
        parser.feed(b"x" * 20)
    assert info.value.code == "sse_event_too_large"
    assert str(info.value) == "SSE event larger than 100 bytes"
    with pytest.raises(SseEventTooLarge):
        parse(b"data: " + b"y" * 60 + b"\ndata: " + b"y" * 60 + b"\n\n", max_event_bytes=100)
    # Many events below the cap never accumulate.
    assert len(parse(b"data: " + b"z" * 80 + b"\n\n" * 1, max_event_bytes=100)) == 1


def test_rebuild_replaces_data_and_keeps_everything_else() -> None:
    (event,) = parse(b"event: e\r\n: note\r\ndata:old1\r\nid: 3\r\ndata:old2\r\n\r\n")
    assert event.rebuild() == event.raw
    rebuilt = event.rebuild("new1\nnew2\nnew3")
    assert rebuilt == b"event: e\r\n: note\r\ndata:new1\r\ndata:new2\r\ndata:new3\r\nid: 3\r\n\r\n"
    assert parse(rebuilt)[0].data == "new1\nnew2\nnew3"
    assert event.rebuild(comments=["other"]).startswith(b"event: e\r\n:other\r\n")
    (tail,) = parse(b"data: t")
    assert tail.rebuild("u\nv") == b"data: u\ndata: v"
    with pytest.raises(ValueError):
        parse(b": only a comment\n\n")[0].rebuild("x")


def test_format_event() -> None:
    raw = format_event("a\nb", event="content_block_delta", id="9", eol=b"\r\n")
    assert raw == b"event: content_block_delta\r\nid: 9\r\ndata: a\r\ndata: b\r\n\r\n"
    (event,) = parse(raw)
    assert (event.event, event.id, event.data) == ("content_block_delta", "9", "a\nb")


def reference(stream: bytes) -> list[tuple]:
    """Whole-input parse straight from the spec, for comparison."""
    *lines, last = re.split(r"\r\n|\r|\n", stream.decode().removeprefix("\ufeff"))
    blocks, block = [], []
    for line in lines:
        if line:
            block.append(line)
        elif block:
            blocks.append(block)
            block = []
    block += [last] if last else []
    return [_fields(b) for b in [*blocks, block] if b]


def _fields(block: list[str]) -> tuple:
    data, event, comments = [], None, []
    for line in block:
        if line.startswith(":"):
            comments.append(line[1:])
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
    return ("\n".join(data) if data else None, event, tuple(comments))


LINE = st.one_of(
    st.builds(lambda v: f"data: {v}", st.text('ab: é🔑{}"', max_size=6)),
    st.builds(lambda v: f"data:{v}", st.text("xy ", max_size=3)),
    st.builds(lambda v: f"event: {v}", st.sampled_from(["delta", "done"])),
    st.builds(lambda v: f":{v}", st.text("ping ", max_size=4)),
    st.just("id: 1"),
    st.just("retry: 10"),
    st.just("x-unknown: z"),
    st.just(""),
)


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.tuples(LINE, st.sampled_from(["\n", "\r\n", "\r"])), max_size=20),
    tail=st.sampled_from(["", "data: end", "data: end\n"]),
    bom=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)
def test_any_chunking_gives_the_same_events_and_bytes(
    lines: list[tuple[str, str]], tail: str, bom: bool, cuts: list[int]
) -> None:
    stream = (BOM if bom else b"") + ("".join(a + b for a, b in lines) + tail).encode()
    whole = parse(stream)
    chunked = parse(stream, cuts)
    assert b"".join(e.raw for e in chunked) == stream
    assert semantic(chunked) == semantic(whole)
    assert [(e.data, e.event, tuple(e.comments)) for e in whole if e.lines] == reference(stream)
    for event in chunked:
        if event.data is not None:
            assert parse(event.rebuild(event.data))[0].data == event.data
