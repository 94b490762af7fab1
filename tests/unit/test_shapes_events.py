import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluicegate.redaction.json_redact import JsonStrings, redact_json_text
from sluicegate.redaction.redactor import Redactor
from sluicegate.redaction.rules import Direction, load_rule_pack
from sluicegate.redaction.sse import SseRedactor
from sluicegate.shapes.channels import TooManyChannels as SseTooManyChannels
from sluicegate.shapes.channels import UnsupportedEvent as SseUnsupportedEvent
from sluicegate.shapes.channels import encode_json_chars
from sluicegate.shapes.events import EventRewriter
from sluicegate.shapes.json_stream import JsonTextStream
from sluicegate.shapes.sse import SseParser
from tests.support.sse_testing import (
    SECRETS,
    FakeRedactor,
    anthropic_stream,
    chat_stream,
    delta_text,
    events,
    make_stream,
    payloads,
    responses_stream,
    sse,
    tag,
)

FAKE = FakeRedactor()
KEY = SECRETS[0]
KEY_TAG = tag("openai-key")


def rewrite(stream: bytes, **kwargs: Any) -> bytes:
    rewriter = EventRewriter(make_stream, **kwargs)
    parser = SseParser()
    out = b"".join(rewriter.rewrite(e) for e in parser.feed(stream) + parser.finish())
    return out + rewriter.finish()


RULES = Path(__file__).resolve().parents[2] / "rules"
PACK_REDACTOR = Redactor(load_rule_pack([RULES]), Direction.RESPONSE)
PACK = JsonStrings(PACK_REDACTOR)


def json_stream(pieces: list[str], strings: JsonStrings | None = None) -> str:
    stream = JsonTextStream(make_stream, strings)
    return "".join(stream.feed(p) for p in pieces) + stream.flush()


def pack_stream(pieces: list[str]) -> str:
    stream = JsonTextStream(lambda: PACK_REDACTOR.stream(4096), PACK)
    return "".join(stream.feed(p) for p in pieces) + stream.flush()


def split_every(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def redact_strings(value: Any) -> Any:
    """Expected result: every string (keys too) redacted as whole text."""
    if isinstance(value, str):
        return FAKE.redact(value)
    if isinstance(value, list):
        return [redact_strings(v) for v in value]
    if isinstance(value, dict):
        return {FAKE.redact(k): redact_strings(v) for k, v in value.items()}
    return value


# --- JSON text in fragments ----------------------------------------------------------------------


def escape_all(text: str) -> str:
    """JSON string content with EVERY character written as a \\u escape."""
    return "".join(f"\\u{unit:04x}" for unit in _utf16_units(text))


def _utf16_units(text: str) -> list[int]:
    data = text.encode("utf-16-be")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


@pytest.mark.parametrize(
    "literal",
    [
        KEY,
        KEY.replace("-", "\\u002d"),
        escape_all(KEY),
        "".join(escape_all(c) if i % 2 else c for i, c in enumerate(KEY)),
        escape_all(KEY).upper().replace("\\U", "\\u"),
    ],
    ids=["raw", "dash-escaped", "all-escaped", "alternate", "upper-hex"],
)
def test_escaped_secret_never_survives_any_split(literal: str) -> None:
    args = '{"cmd": "export OPENAI_API_KEY=' + literal + '", "n": 1}'
    for size in (1, 2, 3, 7):
        out = json_stream(split_every(args, size))
        assert json.loads(out) == {"cmd": f"export OPENAI_API_KEY={KEY_TAG}", "n": 1}
        assert "proj" not in out


def test_surrogate_pairs_and_escapes_split_anywhere() -> None:
    args = '{"a": "x\\ud83d\\ude00y\\n\\"q\\"\\\\", "b": "\\ud800 lone", "c": "é🔑\\/"}'
    expected = {"a": 'x😀y\n"q"\\', "b": "\ud800 lone", "c": "é🔑/"}
    for cut in range(len(args)):
        out = json_stream([args[:cut], args[cut:]])
        assert json.loads(out) == expected
        out.encode()  # lone surrogates are re-escaped, so the text stays encodable


def test_bare_tokens_outside_strings_are_redacted() -> None:
    out = json_stream(split_every(f'{{"a": 1, "b": true}} {KEY} [null]', 2))
    assert out == f'{{"a": 1, "b": true}} {KEY_TAG} [null]'


def test_unterminated_string_is_released_redacted_and_left_open() -> None:
    assert json_stream(['{"a": "abc ', KEY[:10], KEY[10:]]) == '{"a": "abc ' + KEY_TAG
    assert json_stream(['{"a": "x\\u00']) == '{"a": "xu00'


def test_malformed_escapes_decode_leniently() -> None:
    # `\-` is not JSON, but must not hide the key from the rules.
    out = json_stream(['{"a": "', KEY.replace("-", "\\-"), '", "b": "\\u12zz"}'])
    assert out == '{"a": "' + KEY_TAG + '", "b": "u12zz"}'


def test_key_rules_of_the_pack_mask_values_even_split() -> None:
    """Which keys are sensitive is the rule pack's key rules, as in buffered JSON: same tags."""
    args = (
        '{"user": "bob", "db_password": "Tr0ub4dor&3", "Password": "hunter2x!", '
        '"list": ["password"], "api_key": "9f8e7d6c5b4a39281706f5e4", "token": 42, '
        '"client_secret": ["s3cr3t!", ["whsec_9f8e7d6c5b4a3928"]], '
        '"examples": {"password": "Tr0ub4dor&3"}, "password_policy": "strict"}'
    )
    buffered = json.loads(redact_json_text(args, PACK_REDACTOR).text)
    assert buffered["db_password"] == "[REDACTED:key-password]"
    assert buffered["api_key"] == "[REDACTED:key-api-key]"
    assert buffered["client_secret"] == ["[REDACTED:key-secret]", ["[REDACTED:key-secret]"]]
    assert buffered["examples"] == {"password": "Tr0ub4dor&3"}  # example data: key rules off
    for size in (1, 3, 7, 100):
        assert json.loads(pack_stream(split_every(args, size))) == buffered
    assert json.loads(json_stream([args])) == json.loads(args)  # no key rules: no masking


def test_json_stream_counts() -> None:
    stream = JsonTextStream(lambda: PACK_REDACTOR.stream(4096), PACK)
    github = "ghp_C3J27XDCG2LmlZGEONYlgCtjfIZ4SOcMz9CP"
    out = stream.feed(f'{{"a": "{github}", "password": "Tr0ub4dor&3", "b": "x')
    assert github not in out and "Tr0ub4dor" not in out
    assert stream.counts == {"github-token": 1, "key-password": 1}
    stream.feed('"}')
    stream.flush()
    assert stream.counts == {"github-token": 1, "key-password": 1}


def test_encode_json_chars_is_minimal_and_valid() -> None:
    text = 'a"b\\c\nd\x01é😀\udc00/'
    encoded = encode_json_chars(text)
    assert encoded == 'a\\"b\\\\c\\nd\\u0001é😀\\udc00/'
    assert json.loads(f'"{encoded}"') == text


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=8)
    | st.sampled_from(SECRETS)
    | st.builds(
        lambda a, s, b: a + s + b,
        st.text(max_size=3),
        st.sampled_from(SECRETS),
        st.text(max_size=3),
    ),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=4) | st.sampled_from(SECRETS), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    value=JSON_VALUES,
    ensure_ascii=st.booleans(),
    indent=st.sampled_from([None, 1]),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
def test_json_fragments_property(
    value: Any, ensure_ascii: bool, indent: int | None, cuts: list[int]
) -> None:
    text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)
    points = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    out = json_stream([text[a:b] for a, b in itertools.pairwise(points)])
    assert json.loads(out) == redact_strings(value)
    assert out == json_stream([text])  # independent of fragmentation
    for secret in SECRETS:
        assert secret not in out


# --- Chat Completions ----------------------------------------------------------------------------


def test_unmodified_events_are_byte_identical() -> None:
    stream = (
        b'data: {"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hello"}}]}\r\n\r\n'
        b": keep-alive\r\n\r\n"
        b'data: {"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}'
        b"\r\n\r\n"
        b"data: [DONE]\r\n\r\n"
    )
    assert rewrite(stream) == stream


def test_chat_finish_reason_flushes_into_the_finish_chunk() -> None:
    stream = chat_stream(["Key: ", KEY[:8]])
    out = rewrite(stream)
    assert len(events(out)) == len(events(stream))  # nothing synthesized
    final = [p for p in payloads(out) if isinstance(p, dict)][-1]["choices"][0]
    assert final["finish_reason"] == "stop"
    assert final["delta"] == {"content": "sk-proj-"}  # too short for the rule: released as is


def test_chat_held_text_is_flushed_before_done_when_no_finish_reason() -> None:
    base = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "model": "m", "usage": None}
    chunk = {**base, "choices": [{"index": 0, "delta": {"content": KEY}, "finish_reason": None}]}
    out = payloads(rewrite(sse(chunk) + sse("[DONE]")))
    assert out[0]["choices"][0]["delta"]["content"] == ""
    assert out[1] == {
        **base,
        "choices": [{"index": 0, "delta": {"content": KEY_TAG}, "finish_reason": None}],
    }
    assert out[2] == "[DONE]"


def test_chat_choices_and_fields_are_separate_channels() -> None:
    def chunk(index: int, **delta: Any) -> bytes:
        return sse({"choices": [{"index": index, "delta": delta, "finish_reason": None}]})

    a, b = KEY[:12], KEY[12:]
    stream = (
        chunk(0, content=a)
        + chunk(1, content="sk-")
        + chunk(0, reasoning_content=a)
        + chunk(0, content=b)
        + chunk(1, refusal=b)
        + chunk(0, reasoning_content=b)
        + sse("[DONE]")
    )
    out = payloads(rewrite(stream))
    text: dict[tuple[int, str], str] = {}
    for payload in out[:-1]:
        for choice in payload["choices"]:
            for name, value in choice["delta"].items():
                text[(choice["index"], name)] = text.get((choice["index"], name), "") + value
    assert text == {
        (0, "content"): KEY_TAG,
        (0, "reasoning_content"): KEY_TAG,
        (1, "content"): "sk-",
        (1, "refusal"): b,
    }


def test_chat_tool_calls_per_index_and_logprobs_dropped() -> None:
    def call(index: int, args: str) -> dict[str, Any]:
        return {"index": index, "function": {"arguments": args}}

    first = {
        "index": 0,
        "delta": {"tool_calls": [call(0, '{"k": "' + KEY[:5]), call(1, '{"x": 1}')]},
        "logprobs": {"content": [{"token": KEY[:5], "logprob": -0.1}]},
        "finish_reason": None,
    }
    last = {
        "index": 0,
        "delta": {"tool_calls": [call(0, KEY[5:] + '"}')]},
        "finish_reason": "tool_calls",
    }
    out = payloads(rewrite(sse({"choices": [first]}) + sse({"choices": [last]})))
    calls = [c for p in out for c in p["choices"][0]["delta"]["tool_calls"]]
    args = {0: "", 1: ""}
    for c in calls:
        args[c["index"]] += c["function"]["arguments"]
    assert {i: json.loads(a) for i, a in args.items()} == {0: {"k": KEY_TAG}, 1: {"x": 1}}
    assert out[0]["choices"][0]["logprobs"] is None


def test_legacy_completions_text_is_a_channel() -> None:
    chunks = [
        {
            "object": "text_completion",
            "choices": [{"index": 0, "text": part, "finish_reason": None}],
        }
        for part in (KEY[:10], KEY[10:])
    ]
    chunks[-1]["choices"][0]["finish_reason"] = "length"
    out = payloads(rewrite(b"".join(sse(c) for c in chunks)))
    assert "".join(p["choices"][0]["text"] for p in out) == KEY_TAG


# --- Responses API -------------------------------------------------------------------------------


def test_responses_done_events_agree_with_the_stream() -> None:
    text = f"use {KEY} now"
    out = rewrite(responses_stream(split_every(text, 3)))
    streamed = delta_text(out, "response.output_text.delta", ("delta",))
    assert streamed == f"use {KEY_TAG} now"
    by_type = {p["type"]: p for p in payloads(out)}
    assert by_type["response.output_text.done"]["text"] == streamed
    assert by_type["response.content_part.done"]["part"]["text"] == streamed
    assert by_type["response.completed"]["response"]["output"][0]["content"][0]["text"] == streamed
    assert KEY not in out.decode()


def test_responses_synthesized_delta_precedes_done_and_copies_scope() -> None:
    out = events(rewrite(responses_stream(["abc ", KEY])))
    kinds = [e.event for e in out]
    done = kinds.index("response.output_text.done")
    assert kinds[done - 1] == "response.output_text.delta"
    synthesized = json.loads(out[done - 1].data)
    last_real = json.loads(out[done - 2].data)
    assert synthesized["delta"] == KEY_TAG and last_real["delta"] == ""
    assert {k: v for k, v in synthesized.items() if k != "delta"} == {
        k: v for k, v in last_real.items() if k != "delta"
    }


def test_responses_function_call_arguments() -> None:
    args = json.dumps({"token_hint": KEY.replace("-", "\u002d")}).replace("-", "\\u002d")
    out = rewrite(responses_stream(split_every(args, 2), kind="function_call_arguments"))
    streamed = delta_text(out, "response.function_call_arguments.delta", ("delta",))
    assert json.loads(streamed) == {"token_hint": KEY_TAG}
    by_type = {p["type"]: p for p in payloads(out)}
    assert by_type["response.function_call_arguments.done"]["arguments"] == streamed
    assert by_type["response.completed"]["response"]["output"][0]["arguments"] == streamed
    assert "Ab3dEf" not in out.decode()


def test_responses_reasoning_summary_channels_and_logprobs() -> None:
    def delta(summary_index: int, text: str) -> bytes:
        payload = {
            "type": "response.reasoning_summary_text.delta",
            "item_id": "rs_1",
            "output_index": 0,
            "summary_index": summary_index,
            "delta": text,
            "logprobs": [{"token": text}],
        }
        return sse(payload, payload["type"])

    done = {
        "type": "response.reasoning_summary_text.done",
        "item_id": "rs_1",
        "output_index": 0,
        "summary_index": 0,
        "text": KEY,
    }
    stream = delta(0, KEY[:9]) + delta(1, "sk-") + delta(0, KEY[9:]) + sse(done, done["type"])
    out = payloads(rewrite(stream))
    assert [p["delta"] for p in out[:3]] == ["", "", ""]
    assert out[3]["delta"] == KEY_TAG and out[3]["summary_index"] == 0 and out[3]["logprobs"] == []
    assert out[4]["text"] == KEY_TAG
    # summary 1 is still open: flushed at end of stream
    assert out[5]["summary_index"] == 1 and out[5]["delta"] == "sk-"


# --- Anthropic Messages --------------------------------------------------------------------------


def test_anthropic_flush_before_block_stop_with_event_name() -> None:
    out = events(rewrite(anthropic_stream(["Key ", KEY], initial="x")))
    kinds = [e.event for e in out]
    stop = kinds.index("content_block_stop")
    assert kinds[stop - 1] == "content_block_delta"
    assert json.loads(out[stop - 1].data) == {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": KEY_TAG},
    }


def test_anthropic_initial_text_in_block_start_is_part_of_the_channel() -> None:
    out = rewrite(anthropic_stream([KEY[5:]], initial="Key: " + KEY[:5]))
    start = next(p for p in payloads(out) if p["type"] == "content_block_start")
    assert start["content_block"]["text"] == "Key: "
    assert delta_text(out, "content_block_delta", ("delta", "text")) == KEY_TAG


def test_anthropic_thinking_and_opaque_fields() -> None:
    signature = "EqQBCgIYAhIM" + KEY  # looks like a key, but is an opaque signature
    stream = (
        sse(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "thinking", "thinking": "", "signature": ""},
            }
        )
        + sse(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "hmm " + KEY},
            }
        )
        + sse(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "signature_delta", "signature": signature},
            }
        )
        + sse({"type": "content_block_stop", "index": 0})
        + sse(
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {"type": "redacted_thinking", "data": signature},
            }
        )
    )
    out = payloads(rewrite(stream))
    assert out[1]["delta"]["thinking"] == "hmm "
    assert out[2]["delta"]["signature"] == signature
    assert out[3]["delta"] == {"type": "thinking_delta", "thinking": KEY_TAG}
    assert out[5]["content_block"]["data"] == signature


def test_anthropic_input_json_delta() -> None:
    args = '{"env": {"KEY": "' + KEY.replace("-", "\\u002d") + '"}}'
    out = rewrite(anthropic_stream(split_every(args, 1), kind="tool_use"))
    streamed = delta_text(out, "content_block_delta", ("delta", "partial_json"))
    assert json.loads(streamed) == {"env": {"KEY": KEY_TAG}}


# --- other events --------------------------------------------------------------------------------


def test_unknown_json_events_have_every_string_redacted() -> None:
    payload = {
        "type": "custom",
        "items": [{"note": f"k={KEY}"}, 3, KEY],
        "args": {"arguments": "{}"},
    }
    (out,) = payloads(rewrite(sse(payload)))
    assert out == {
        "type": "custom",
        "items": [{"note": f"k={KEY_TAG}"}, 3, KEY_TAG],
        "args": {"arguments": "{}"},
    }
    assert payloads(rewrite(sse(json.dumps(KEY)))) == [KEY_TAG]


def test_plain_text_data_is_one_channel_across_events() -> None:
    stream = (
        b"event: token\ndata: my key " + KEY[:6].encode() + b"\n\n"
        b"event: token\ndata: " + KEY[6:].encode() + b" end\n\n"
        b"event: token\ndata: " + KEY[:4].encode() + b"\n\n" + sse({"type": "other"})
    )
    out = events(rewrite(stream))
    assert [e.data for e in out] == ["my key ", f"{KEY_TAG} end", "", "sk-p", '{"type":"other"}']
    assert out[3].event == "token"  # synthesized before the JSON event, named like the channel


def test_comments_are_redacted_as_whole_text() -> None:
    stream = b": ping\n\n: leaked " + KEY.encode() + b"\ndata: x\n\n"
    out = rewrite(stream)
    assert out.startswith(b": ping\n\n")
    assert out.endswith(b": leaked " + KEY_TAG.encode() + b"\ndata: x\n\n")


def test_error_event_flushes_everything_first() -> None:
    chunk = {"choices": [{"index": 0, "delta": {"content": KEY}, "finish_reason": None}]}
    out = payloads(rewrite(sse(chunk) + sse({"error": {"message": "overloaded"}})))
    assert out[1]["choices"][0]["delta"]["content"] == KEY_TAG
    assert out[2] == {"error": {"message": "overloaded"}}


def test_channel_count_is_bounded() -> None:
    stream = b"".join(
        sse({"choices": [{"index": i, "delta": {"content": "x"}, "finish_reason": None}]})
        for i in range(5)
    )
    with pytest.raises(SseTooManyChannels) as info:
        rewrite(stream, max_channels=4)
    assert info.value.code == "sse_too_many_channels"


def test_deeply_nested_json_fails_closed() -> None:
    with pytest.raises(SseUnsupportedEvent):
        rewrite(b"data: " + b"[" * 50_000 + b"]" * 50_000 + b"\n\n")


def test_rewriter_counts_streamed_and_whole_but_not_repeats() -> None:
    rewriter = EventRewriter(make_stream)
    parser = SseParser()
    for event in parser.feed(responses_stream([KEY, " and ", SECRETS[1]])):
        rewriter.rewrite(event)
    assert rewriter.counts == {"openai-key": 1, "github-pat": 1}


def test_object_keys_in_events_are_redacted_in_place() -> None:
    payload = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "tool_use", "input": {KEY: 1, "b": 2}},
    }
    (out,) = payloads(rewrite(sse(payload)))
    assert list(out["content_block"]["input"].items()) == [(KEY_TAG, 1), ("b", 2)]


def test_an_event_repeating_a_key_has_every_occurrence_read() -> None:
    """json.loads keeps the last occurrence; a client's parser may keep the first. An event that
    repeats a key is read whole, like buffered JSON, so neither occurrence passes unread."""
    github = "ghp_C3J27XDCG2LmlZGEONYlgCtjfIZ4SOcMz9CP"
    event = '{"type": "x", "note": "' + github + '", "note": "clean"}'
    out = SseRedactor(lambda: PACK_REDACTOR.stream(4096), strings=PACK).feed(
        f"data: {event}\n\n".encode()
    )
    assert github.encode() not in out and b"[REDACTED:github-token]" in out
    # An escaped quote before a colon in a value is no repeat: the event passes byte-identical.
    quoted = b'data: {"a": "say \\": hi", "b": 1}\n\n'
    assert SseRedactor(lambda: PACK_REDACTOR.stream(4096), strings=PACK).feed(quoted) == quoted
