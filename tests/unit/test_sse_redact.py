import itertools
import json
from collections.abc import Callable

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluicegate.redaction.sse import SseRedactor, WholeTextMemo, error_event
from sluicegate.shapes.sse import SseEventTooLarge, SseParser
from tests.support.sse_testing import (
    SECRETS,
    FakeRedactor,
    anthropic_stream,
    chat_stream,
    chat_text,
    chat_tool_args,
    delta_text,
    events,
    make_stream,
    payloads,
    responses_stream,
    sse,
    tag,
)

FAKE = FakeRedactor()


def run(stream: bytes, cuts: list[int] = (), **kwargs: int) -> bytes:
    redactor = SseRedactor(make_stream, **kwargs)
    points = sorted({0, len(stream), *(min(c, len(stream)) for c in cuts)})
    out = b"".join(redactor.feed(stream[a:b]) for a, b in itertools.pairwise(points))
    return out + redactor.finish()


def plain_stream(pieces: list[str]) -> bytes:
    return b"".join(f"event: token\ndata: {p}\n\n".encode() for p in pieces) + b"data: [DONE]\n\n"


def plain_text(out: bytes) -> str:
    return "".join(e.data for e in events(out) if e.data and e.data != "[DONE]")


# shape -> (build stream from deltas, extract the channel's text from output, JSON channel?)
Shape = tuple[Callable[[list[str]], bytes], Callable[[bytes], str], bool]
SHAPES: dict[str, Shape] = {
    "chat-content": (chat_stream, chat_text, False),
    "chat-tool-args": (lambda p: chat_stream([], tool_args=p), chat_tool_args, True),
    "responses-text": (
        responses_stream,
        lambda out: delta_text(out, "response.output_text.delta", ("delta",)),
        False,
    ),
    "responses-args": (
        lambda p: responses_stream(p, kind="function_call_arguments"),
        lambda out: delta_text(out, "response.function_call_arguments.delta", ("delta",)),
        True,
    ),
    "anthropic-text": (
        anthropic_stream,
        lambda out: delta_text(out, "content_block_delta", ("delta", "text")),
        False,
    ),
    "anthropic-json": (
        lambda p: anthropic_stream(p, kind="tool_use"),
        lambda out: delta_text(out, "content_block_delta", ("delta", "partial_json")),
        True,
    ),
    "plain-text": (plain_stream, plain_text, False),
}
JSON_SHAPES = [name for name, shape in SHAPES.items() if shape[2]]


def escaped_forms(secret: str) -> list[str]:
    """How a secret could appear in the output bytes: raw, JSON-escaped, doubly escaped."""
    dash = secret.replace("-", "\\u002d")
    return [secret, dash, dash.replace("\\", "\\\\"), secret[4:16]]


def assert_no_secret(out: bytes) -> None:
    text = out.decode()
    for secret in SECRETS:
        for form in escaped_forms(secret):
            assert form not in text


def split(text: str, sizes: list[int]) -> list[str]:
    pieces, pos = [], 0
    for size in itertools.cycle(sizes):
        if pos >= len(text):
            return pieces
        pieces.append(text[pos : pos + size])
        pos += size
    raise AssertionError  # pragma: no cover


def args_document(text: str, escape: bool) -> str:
    document = json.dumps({"command": text, "n": 1})
    return document.replace("-", "\\u002d") if escape else document


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_secret_split_into_small_deltas_at_every_offset(shape: str) -> None:
    build, extract, is_json = SHAPES[shape]
    for secret in SECRETS:
        for offset in range(4):
            text = "x" * offset + f"key {secret} done"
            for sizes in ([1], [2], [3], [1, 3, 2]):
                for escape in (False, True) if is_json else (False,):
                    body = args_document(text, escape) if is_json else text
                    out = run(build(split(body, sizes)))
                    assert_no_secret(out)
                    channel = extract(out)
                    expected = FAKE.redact(text)
                    if is_json:
                        assert json.loads(channel) == {"command": expected, "n": 1}
                    else:
                        assert channel == expected


WORDS = st.sampled_from(["the", " ", "sk-", "ghp_", "AKIA", "-", "é", "🔑", '"', "\\", "\n", "x"])
TEXT = st.lists(WORDS | st.sampled_from(SECRETS), max_size=25).map("".join)


@settings(max_examples=150, deadline=None)
@given(
    shape=st.sampled_from(sorted(SHAPES)),
    text=TEXT,
    sizes=st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=20_000), max_size=15),
    eol=st.sampled_from(["\n", "\r\n", "\r"]),
    escape=st.booleans(),
)
def test_random_streams_and_chunkings(
    shape: str, text: str, sizes: list[int], cuts: list[int], eol: str, escape: bool
) -> None:
    build, extract, is_json = SHAPES[shape]
    if shape == "plain-text":
        text = text.replace("\n", " ")  # one data line per event
    body = args_document(text, escape) if is_json else text
    stream = build(split(body, sizes)).replace(b"\n", eol.encode())
    whole = run(stream)
    assert run(stream, cuts) == whole  # chunk independence
    assert_no_secret(whole)
    channel = extract(whole)
    if is_json:
        assert json.loads(channel) == {"command": FAKE.redact(text), "n": 1}
    else:
        assert channel == FAKE.redact(text)


def test_unterminated_final_event_is_terminated_before_held_text() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": "id " + SECRETS[0]}}]}
    stream = sse(chunk).rstrip(b"\n")
    out = run(stream)
    contents = [p["choices"][0]["delta"]["content"] for p in payloads(out)]
    assert contents == ["id ", tag("openai-key")]
    assert out.endswith(b"\n\n")
    # nothing held: the unterminated event passes exactly as it came
    plain = sse({"choices": [{"index": 0, "delta": {"content": "hi"}}]}).rstrip(b"\n")
    assert run(plain) == plain


def test_bom_and_crlf_preserved_byte_for_byte() -> None:
    stream = b"\xef\xbb\xbf" + chat_stream(["Hello", " world"]).replace(b"\n", b"\r\n")
    for cut in range(8):
        assert run(stream, [cut, 40, 41]) == stream


def test_oversized_event_fails_after_earlier_events() -> None:
    redactor = SseRedactor(make_stream, max_event_bytes=200)
    small = sse({"choices": [{"index": 0, "delta": {"content": "ok"}}]})
    out = redactor.feed(small + b"data: " + b"x" * 300)
    assert out == small
    with pytest.raises(SseEventTooLarge) as info:
        redactor.feed(b"\n\n")
    assert info.value.code == "sse_event_too_large"
    with pytest.raises(SseEventTooLarge):
        redactor.finish()


def test_counts_are_aggregated_over_channels_and_events() -> None:
    redactor = SseRedactor(make_stream)
    redactor.feed(chat_stream([SECRETS[0], " and ", SECRETS[1]], tool_args=[f'"{SECRETS[2]}"']))
    redactor.feed(sse({"note": SECRETS[2]}))
    redactor.finish()
    assert redactor.counts == {"openai-key": 1, "github-pat": 1, "aws-key-id": 2}


def test_error_event_frame() -> None:
    raw = error_event("upstream_timeout", "stream cut", request_id="r-1")
    (event,) = events(raw)
    assert event.event == "error" and event.terminated
    assert json.loads(event.data) == {
        "type": "error",
        "error": {
            "type": "sluicegate_error",
            "code": "upstream_timeout",
            "message": "stream cut",
            "request_id": "r-1",
        },
    }


def openai_client(body: bytes) -> openai.OpenAI:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    transport = httpx.MockTransport(handler)
    return openai.OpenAI(
        api_key="test",
        base_url="http://upstream.test/v1",
        http_client=httpx.Client(transport=transport),
    )


def test_openai_sdk_reads_the_redacted_stream_and_raises_on_error_event() -> None:
    text = f"The key is {SECRETS[0]}."
    body = run(chat_stream(split(text, [2]), tool_args=split('{"a": "sk\\u002d1"}', [3])))
    stream = openai_client(body).chat.completions.create(
        model="gpt-x", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    content, args = [], []
    for chunk in stream:
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            args += [c.function.arguments or "" for c in choice.delta.tool_calls or []]
    assert "".join(content) == f"The key is {tag('openai-key')}."
    assert json.loads("".join(args)) == {"a": "sk-1"}

    cut = body[: body.index(b"data:", 200)] + error_event("sse_event_too_large", "cut")
    stream = openai_client(cut).chat.completions.create(
        model="gpt-x", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    with pytest.raises(openai.APIError, match="cut"):
        list(stream)


def test_parser_events_survive_a_redaction_round_trip() -> None:
    stream = anthropic_stream(["a", "b"]) + responses_stream(["c"]) + chat_stream(["d"])
    out = run(stream)
    assert [e.event for e in events(out)] == [e.event for e in events(stream)]
    assert len(SseParser().feed(out)) == len(SseParser().feed(stream))


@settings(max_examples=200, deadline=None)
@given(text=TEXT, sizes=st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=5))
def test_the_test_double_keeps_the_stream_redactor_contract(text: str, sizes: list[int]) -> None:
    stream = make_stream()
    assert "".join(stream.feed(p) for p in split(text, sizes)) + stream.flush() == FAKE.redact(text)


FIELDS = st.sampled_from(
    [
        "choices",
        "delta",
        "index",
        "content",
        "tool_calls",
        "function",
        "arguments",
        "text",
        "finish_reason",
        "type",
        "item_id",
        "content_index",
        "summary_index",
        "item",
        "id",
        "content_block",
        "partial_json",
        "thinking",
        "logprobs",
        "refusal",
        "error",
        "response",
    ]
)
TYPES = st.sampled_from(
    [
        "content_block_delta",
        "content_block_start",
        "content_block_stop",
        "message_delta",
        "message_stop",
        "text_delta",
        "input_json_delta",
        "thinking_delta",
        "text",
        "thinking",
        "response.output_text.delta",
        "response.output_text.done",
        "response.completed",
        "response.function_call_arguments.delta",
        "response.output_item.done",
        "error",
        "stop",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-1, 2)
    | st.text(max_size=4)
    | TYPES
    | st.sampled_from([*SECRETS, "sk-", SECRETS[0][3:], '{"a": "', "\\u002d"])
)
PAYLOADS = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(FIELDS | SCALARS.filter(lambda v: isinstance(v, str)), inner, max_size=5)
    ),
    max_leaves=20,
)
DATA = (
    PAYLOADS.map(json.dumps)
    | st.text(max_size=12).map(lambda t: t.replace("\r", ""))
    | st.just("[DONE]")
)


@settings(max_examples=300, deadline=None)
@given(
    datas=st.lists(DATA, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=10),
    unterminated=st.booleans(),
)
def test_arbitrary_event_shapes_never_crash_or_leak(
    datas: list[str], cuts: list[int], unterminated: bool
) -> None:
    stream = b"".join(b"data: " + d.replace("\n", "\ndata: ").encode() + b"\n\n" for d in datas)
    if unterminated:
        stream = stream.rstrip(b"\n")
    whole = run(stream)
    assert run(stream, cuts) == whole
    assert len(events(whole)) >= len(events(stream))
    # Where a secret went in, only the tag comes out (a fragment alone is no secret).
    for secret in SECRETS:
        assert secret not in whole.decode()
        assert secret.replace("-", "\\u002d") not in whole.decode()


@pytest.mark.parametrize(
    "payload",
    [
        {"type": ["content_block_delta"], "index": 0},
        {"type": "content_block_delta", "index": 0, "delta": {"type": ["text_delta"], "text": "x"}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": {"t": 1}}},
        {"type": "content_block_delta", "index": [1], "delta": {"type": "text_delta", "text": "x"}},
        {"type": {"response.output_text.delta": 1}, "delta": "x"},
    ],
)
def test_non_string_type_fields_do_not_crash(payload: object) -> None:
    """Upstream-controlled JSON: a list or object where a type name belongs is just data."""
    redactor = SseRedactor(make_stream)
    out = redactor.feed(sse(payload)) + redactor.finish()
    assert out.startswith(b"data: ")


@settings(max_examples=60, deadline=None)
@given(
    documents=st.lists(
        st.dictionaries(
            st.sampled_from(["id", "model", SECRETS[1], "note", "object"]),
            st.sampled_from(["chatcmpl-1", "gpt-x", SECRETS[0], SECRETS[2], "plain words"]),
            max_size=4,
        ),
        min_size=1,
        max_size=6,
    ),
    streams=st.integers(min_value=2, max_value=4),
)
def test_streams_sharing_a_memo_redact_and_count_as_alone(
    documents: list[dict[str, str]], streams: int
) -> None:
    """A memo shared by the streams of one redactor changes neither output nor counts."""
    body = b"".join(sse(d) for d in documents) + chat_stream([SECRETS[0], " ok"])
    memo = WholeTextMemo()
    for _ in range(streams):
        alone, shared = SseRedactor(make_stream), SseRedactor(make_stream, memo=memo)
        expected = alone.feed(body) + alone.finish()
        assert shared.feed(body) + shared.finish() == expected
        assert shared.counts == alone.counts
        assert_no_secret(expected)
    assert memo.results  # it was used
