"""The Redaction addon on mitmproxy test flows: what leaves, what is refused, what is recorded."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import tflow, tutils

from sluicegate.mitm import flowstate
from sluicegate.mitm import redaction as redaction_mod
from sluicegate.mitm.redaction import Redaction
from sluicegate.mitm.streaming import StreamRedaction
from sluicegate.mitm.websockets import WebSockets
from sluicegate.redaction import prefilter
from sluicegate.redaction.bodies import redact_body
from sluicegate.redaction.echo import secret_variants
from tests.support.addon_harness import configured, write_config
from tests.support.gateway import REPO
from tests.support.rule_secrets import example
from tests.support.upstream import compress

if TYPE_CHECKING:
    from tests.support.tokens import TestIdP

LIMIT = 64 * 1024
OPENAI = example("openai-api-key")
GITHUB = example("github-token")
AWS = example("aws-secret-access-key")
KEY = "sk-injected-" + "k" * 24
SCRUB_ID = "injected-credential:openai"
ENCODINGS = ("gzip", "deflate", "br", "zstd")


CONFIGS = {
    "default": {},
    "binary-pass": {"binary_bodies": "pass"},
    "requests-off": {"requests": False},
    "responses-off": {"responses": False},
    "tight-budget": {"budget_seconds": 0.05},
    "no-workers": {"worker_processes": 0},
}


@pytest.fixture(scope="module")
def config_files(tmp_path_factory: pytest.TempPathFactory, idp: TestIdP) -> dict[str, Path]:
    """One file per variant, written once: the config cache compiles each rule pack once."""
    directory = tmp_path_factory.mktemp("redaction-configs")
    return {
        name: write_config(
            directory,
            idp,
            gateway={"max_body_bytes": LIMIT},
            redaction={"rules": [str(REPO / "rules")], **settings},
        )
        for name, settings in CONFIGS.items()
    }


MakeAddon = Callable[[str], Redaction]


@pytest.fixture
def make_addon(config_files: dict[str, Path]) -> Iterator[MakeAddon]:
    with contextlib.ExitStack() as stack:

        def make(variant: str) -> Redaction:
            addon = Redaction()
            stack.enter_context(configured(addon, config=config_files[variant]))
            assert addon.config is not None
            return addon

        yield make


@pytest.fixture
def addon(make_addon: MakeAddon) -> Redaction:
    return make_addon("default")


def request_flow(
    body: bytes = b"",
    content_type: str | None = "application/json",
    encoding: str | None = None,
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
) -> http.HTTPFlow:
    fields = dict(headers or {})
    if content_type:
        fields["content-type"] = content_type
    if encoding:
        fields["content-encoding"] = encoding
    fields.setdefault("content-length", str(len(body)))
    request = tutils.treq(
        method=b"POST",
        path=path.encode(),
        headers=http.Headers([(k.encode(), v.encode()) for k, v in fields.items()]),
        content=body,
    )
    return tflow.tflow(req=request)


def with_response(
    flow: http.HTTPFlow,
    body: bytes,
    content_type: str = "application/json",
    encoding: str | None = None,
    headers: dict[str, str] | None = None,
) -> http.HTTPFlow:
    fields = {"content-type": content_type, **(headers or {})}
    if encoding:
        fields["content-encoding"] = encoding
    fields.setdefault("content-length", str(len(body)))
    flow.response = tutils.tresp(
        headers=http.Headers([(k.encode(), v.encode()) for k, v in fields.items()]),
        content=body,
    )
    return flow


def send(addon: Redaction, flow: http.HTTPFlow) -> http.HTTPFlow:
    addon.requestheaders(flow)
    asyncio.run(addon.request(flow))
    return flow


def receive(addon: Redaction, flow: http.HTTPFlow) -> http.HTTPFlow:
    addon.responseheaders(flow)
    asyncio.run(addon.response(flow))
    return flow


def refusal(flow: http.HTTPFlow) -> tuple[int, str]:
    assert flow.response is not None
    return flow.response.status_code, json.loads(flow.response.content)["error"]["code"]


def chat(text: str) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()


def redaction_facts(flow: http.HTTPFlow) -> dict[str, Any]:
    return flow.metadata["sluicegate"]["redaction"]


# -- requests ---------------------------------------------------------------------------------


def test_json_request_leaves_with_tags_and_counts_without_values(addon: Redaction) -> None:
    flow = send(addon, request_flow(chat(f"deploy with {OPENAI.text} and {GITHUB.text}")))
    assert flow.response is None
    body = flow.request.content
    assert OPENAI.secret.encode() not in body and GITHUB.secret.encode() not in body
    content = json.loads(body)["messages"][0]["content"]
    assert "[REDACTED:openai-api-key]" in content and "[REDACTED:github-token]" in content
    assert flow.request.headers["content-length"] == str(len(body))
    facts = redaction_facts(flow)
    assert facts == {"request": {"openai-api-key": 1, "github-token": 1}}
    assert OPENAI.secret not in json.dumps(flow.metadata)


def test_clean_body_is_forwarded_byte_for_byte(addon: Redaction) -> None:
    body = b'{"model":  "m", "messages": [ {"role":"user","content":"hi"} ] }'
    flow = send(addon, request_flow(body))
    assert flow.request.raw_content == body
    assert redaction_facts(flow) == {"request": {}}


@pytest.mark.parametrize("encoding", [*ENCODINGS, "gzip, br", "deflate, zstd, gzip"])
def test_compressed_request_is_decoded_redacted_and_sent_identity(
    addon: Redaction, encoding: str
) -> None:
    plain = chat(f"my key: {OPENAI.text}")
    encoded = plain
    for coding in (c.strip() for c in encoding.split(",")):
        encoded = compress(encoded, coding)
    flow = send(addon, request_flow(encoded, encoding=encoding))
    assert flow.response is None
    assert "content-encoding" not in flow.request.headers
    raw = flow.request.raw_content
    assert raw is not None and OPENAI.secret.encode() not in raw
    assert b"[REDACTED:openai-api-key]" in raw
    assert flow.request.headers["content-length"] == str(len(raw))


def test_compressed_clean_request_is_still_sent_identity(addon: Redaction) -> None:
    plain = chat("nothing secret")
    flow = send(addon, request_flow(compress(plain, "br"), encoding="br"))
    assert flow.request.raw_content == plain
    assert "content-encoding" not in flow.request.headers


@pytest.mark.parametrize(
    ("body", "encoding", "status", "code"),
    [
        (b"payload", "xz", 415, "unsupported_content_encoding"),
        (compress(b'{"a": 1}', "gzip")[:-6], "gzip", 400, "content_decode_failed"),
        (b"not gzip at all", "gzip", 400, "content_decode_failed"),
        (compress(b" " * (LIMIT + 1), "gzip"), "gzip", 413, "body_too_large"),
        (compress(b"x" * (LIMIT + 1), "zstd"), "zstd", 413, "body_too_large"),
    ],
    ids=["unknown", "truncated", "corrupt", "gzip-bomb", "zstd-bomb"],
)
def test_request_that_cannot_be_decoded_is_refused(
    addon: Redaction, body: bytes, encoding: str, status: int, code: str
) -> None:
    flow = send(addon, request_flow(body, encoding=encoding))
    assert refusal(flow) == (status, code)
    # Nothing the caller sent is echoed back.
    assert flow.response is not None and body not in flow.response.content


def test_declared_oversize_request_is_refused_at_the_headers(addon: Redaction) -> None:
    flow = request_flow(b"", headers={"content-length": str(LIMIT + 1)})
    addon.requestheaders(flow)
    assert refusal(flow) == (413, "body_too_large")


def test_oversize_request_without_length_is_refused(addon: Redaction) -> None:
    flow = request_flow(b"a" * (LIMIT + 1), content_type="text/plain")
    del flow.request.headers["content-length"]
    flow.request.headers["transfer-encoding"] = "chunked"
    assert refusal(send(addon, flow)) == (413, "body_too_large")


def test_body_of_exactly_the_limit_passes(addon: Redaction) -> None:
    body = b"a" * LIMIT
    flow = send(addon, request_flow(body, content_type="text/plain"))
    assert flow.response is None and flow.request.raw_content == body


def test_request_streaming_is_turned_off(addon: Redaction) -> None:
    flow = request_flow(chat("hi"))
    flow.request.stream = True
    addon.requestheaders(flow)
    assert flow.request.stream is False


def test_binary_request_is_refused_by_default(addon: Redaction) -> None:
    flow = send(addon, request_flow(b"\x89PNG\r\n", content_type="image/png"))
    assert refusal(flow) == (415, "binary_body_blocked")


def test_binary_request_passes_untouched_when_configured(make_addon: MakeAddon) -> None:
    addon = make_addon("binary-pass")
    body = b"\x89PNG\r\n" + OPENAI.text.encode()
    flow = send(addon, request_flow(body, content_type="image/png"))
    assert flow.response is None and flow.request.raw_content == body


def test_a_misdeclared_charset_is_refused(addon: Redaction) -> None:
    body = chat(OPENAI.text)
    body += b" " * (-len(body) % 2)  # decodes as UTF-16, to nonsense
    flow = send(addon, request_flow(body, content_type="application/json; charset=utf-16"))
    assert refusal(flow) == (415, "charset_mismatch")


def test_escaped_json_and_duplicate_keys_are_redacted(addon: Redaction) -> None:
    escaped = OPENAI.text.replace("-", "\\u002d")
    aws = AWS.text.replace("/", "\\/")
    body = f'{{"content": "{escaped}", "content": "{aws}"}}'.encode()
    flow = send(addon, request_flow(body))
    raw = flow.request.raw_content
    assert raw is not None
    for secret in (OPENAI.secret, AWS.secret, escaped, AWS.secret.replace("/", "\\/")):
        assert secret.encode() not in raw
    assert raw.count(b'"content"') == 2
    assert redaction_facts(flow)["request"] == {"openai-api-key": 1, "aws-secret-access-key": 1}


def test_tool_call_arguments_json_in_json_are_redacted(addon: Redaction) -> None:
    arguments = json.dumps({"command": f"export {GITHUB.text}"})
    message = {
        "role": "assistant",
        "tool_calls": [{"id": "c", "type": "function", "function": {"arguments": arguments}}],
    }
    flow = send(addon, request_flow(json.dumps({"messages": [message]}).encode()))
    sent = json.loads(flow.request.content)
    inner = sent["messages"][0]["tool_calls"][0]["function"]["arguments"]
    assert GITHUB.secret not in inner
    assert "[REDACTED:github-token]" in json.loads(inner)["command"]


def test_form_request_is_redacted_pair_by_pair(addon: Redaction) -> None:
    body = b"a=1&prompt=" + OPENAI.text.encode().replace(b"=", b"%3D") + b"&password=hunter22"
    flow = send(addon, request_flow(body, content_type="application/x-www-form-urlencoded"))
    raw = flow.request.raw_content
    assert raw is not None and raw.startswith(b"a=1&prompt=")
    assert OPENAI.secret.encode() not in raw and b"hunter22" not in raw


def test_query_string_secret_is_redacted_and_the_path_kept(addon: Redaction) -> None:
    query = "q=" + GITHUB.text.replace(":", "%3A").replace("/", "%2F") + "&n=2"
    flow = send(addon, request_flow(chat("hi"), path=f"/v1/a%2Fb/search?{query}"))
    assert flow.response is None
    path = flow.request.path
    assert path.startswith("/v1/a%2Fb/search?q=") and path.endswith("&n=2")
    assert GITHUB.secret not in flow.request.url
    assert "[REDACTED:github-token]" in flow.request.query["q"]
    assert redaction_facts(flow)["request"] == {"github-token": 1}


def test_clean_query_is_kept_byte_for_byte(addon: Redaction) -> None:
    path = "/search?q=a+b%20c&empty=&flag"
    flow = send(addon, request_flow(path=path, content_type=None))
    assert flow.request.path == path


def test_request_redaction_switched_off_forwards_as_is(make_addon: MakeAddon) -> None:
    addon = make_addon("requests-off")
    body = compress(chat(OPENAI.text), "gzip")
    flow = send(addon, request_flow(body, encoding="gzip", path=f"/x?k={GITHUB.secret}"))
    assert flow.response is None
    assert flow.request.raw_content == body and GITHUB.secret in flow.request.path


def test_original_is_handed_over_decoded_before_redaction(
    addon: Redaction, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flowstate, "keep_originals", True)
    plain = chat(OPENAI.text)
    flow = send(addon, request_flow(compress(plain, "gzip"), encoding="gzip"))
    assert flowstate.state(flow).originals["request"] == plain
    assert OPENAI.secret.encode() not in (flow.request.raw_content or b"")


def test_large_body_is_redacted_off_the_event_loop(
    addon: Redaction, monkeypatch: pytest.MonkeyPatch
) -> None:
    threaded: list[str] = []
    to_thread = asyncio.to_thread

    async def spy(fn: Any, *args: Any) -> Any:
        threaded.append(fn.__name__)
        return await to_thread(fn, *args)

    monkeypatch.setattr(redaction_mod, "THREAD_BYTES", 1024)
    monkeypatch.setattr(redaction_mod.asyncio, "to_thread", spy)
    filler = "lorem ipsum " * 200
    body = compress(chat(filler + OPENAI.text), "gzip")
    assert len(body) < 1024  # decoded on the loop, redacted on a thread
    flow = send(addon, request_flow(body, encoding="gzip"))
    assert threaded == ["redact_body"]
    assert OPENAI.secret.encode() not in (flow.request.raw_content or b"")
    assert redaction_facts(flow)["request"] == {"openai-api-key": 1}


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    prefix=st.text(max_size=60),
    suffix=st.text(max_size=60),
    codings=st.lists(st.sampled_from(ENCODINGS), max_size=3),
    content_type=st.sampled_from(["application/json", "text/plain", None]),
)
def test_the_addon_sends_what_the_engine_makes_of_the_decoded_body(
    addon: Redaction, prefix: str, suffix: str, codings: list[str], content_type: str | None
) -> None:
    plain = json.dumps({"content": f"{prefix}{OPENAI.text} {suffix}"}).encode()
    encoded = plain
    for coding in codings:
        encoded = compress(encoded, coding)
    encoding = ", ".join(codings) or None
    flow = send(addon, request_flow(encoded, content_type=content_type, encoding=encoding))
    runtime = addon.runtime
    assert runtime is not None and runtime.request is not None
    expected = redact_body(plain, content_type, runtime.request, runtime.body_policy)
    assert flow.request.raw_content == expected.body
    assert OPENAI.secret.encode() not in expected.body
    assert redaction_facts(flow)["request"] == expected.counts


# -- responses --------------------------------------------------------------------------------


def answer(text: str) -> bytes:
    return json.dumps({"choices": [{"message": {"content": text}}]}).encode()


def test_json_response_is_redacted_and_recorded_beside_the_request(addon: Redaction) -> None:
    flow = send(addon, request_flow(chat("hi")))
    receive(addon, with_response(flow, answer(f"use {GITHUB.text}")))
    assert flow.response is not None and flow.response.status_code == 200
    assert GITHUB.secret.encode() not in flow.response.content
    assert redaction_facts(flow) == {"request": {}, "response": {"github-token": 1}}


@pytest.mark.parametrize("encoding", [*ENCODINGS, "zstd, gzip"])
def test_compressed_response_is_sent_identity(addon: Redaction, encoding: str) -> None:
    encoded = answer(f"use {GITHUB.text}")
    for coding in (c.strip() for c in encoding.split(",")):
        encoded = compress(encoded, coding)
    flow = receive(addon, with_response(request_flow(), encoded, encoding=encoding))
    assert flow.response is not None and flow.response.status_code == 200
    assert "content-encoding" not in flow.response.headers
    raw = flow.response.raw_content
    assert raw is not None and GITHUB.secret.encode() not in raw and b"[REDACTED:" in raw
    assert flow.response.headers["content-length"] == str(len(raw))


@pytest.mark.parametrize(
    ("body", "encoding", "code"),
    [
        (b"payload", "xz", "unsupported_content_encoding"),
        (compress(answer("x"), "br")[:-3], "br", "content_decode_failed"),
        (compress(b"y" * (LIMIT + 1), "deflate"), "deflate", "response_too_large"),
        (b"z" * (LIMIT + 1), None, "response_too_large"),
    ],
    ids=["unknown", "truncated", "bomb", "plain-oversize"],
)
def test_response_that_cannot_be_redacted_becomes_502(
    addon: Redaction, body: bytes, encoding: str | None, code: str
) -> None:
    flow = with_response(request_flow(), body, encoding=encoding)
    del flow.response.headers["content-length"]  # type: ignore[union-attr]
    asyncio.run(addon.response(flow))
    assert refusal(flow) == (502, code)


def test_declared_oversize_response_is_refused_and_its_body_discarded(addon: Redaction) -> None:
    flow = with_response(request_flow(), b"", headers={"content-length": str(LIMIT + 1)})
    addon.responseheaders(flow)
    assert flow.response is not None and flow.response.status_code == 502
    stream = flow.response.stream
    assert callable(stream)
    assert stream(b"upstream bytes") == []  # the upstream body never reaches the agent
    assert json.loads(stream(b""))["error"]["code"] == "response_too_large"


def test_event_stream_is_left_to_stream_redaction(addon: Redaction) -> None:
    flow = with_response(
        request_flow(),
        b"",
        content_type="text/event-stream; charset=utf-8",
        headers={"content-length": str(LIMIT + 1)},
    )
    flow.response.stream = True  # type: ignore[union-attr]
    addon.responseheaders(flow)
    assert flow.response is not None and flow.response.stream is True
    assert flow.response.status_code == 200


def test_response_streaming_is_turned_off_for_other_types(addon: Redaction) -> None:
    flow = with_response(request_flow(), answer("hi"))
    flow.response.stream = True  # type: ignore[union-attr]
    addon.responseheaders(flow)
    assert flow.response is not None and flow.response.stream is False


def test_streamed_responses_are_skipped(addon: Redaction) -> None:
    body = f"data: {GITHUB.text}\n\n".encode()
    flow = with_response(request_flow(), body, content_type="text/event-stream")
    flowstate.state(flow).streamed_body = bytearray(b"data: [REDACTED:github-token]\n\n")
    asyncio.run(addon.response(flow))
    assert flow.response is not None and flow.response.raw_content == body
    assert "redaction" not in flow.metadata.get("sluicegate", {})


def test_buffered_event_stream_without_stream_redaction_is_redacted_as_text(
    addon: Redaction,
) -> None:
    flow = with_response(
        request_flow(), f"data: {GITHUB.text}\n\n".encode(), content_type="text/event-stream"
    )
    receive(addon, flow)
    assert flow.response is not None and GITHUB.secret.encode() not in flow.response.content


def test_empty_response_keeps_its_headers(addon: Redaction) -> None:
    flow = with_response(request_flow(), b"", encoding="gzip", headers={"content-length": "999"})
    receive(addon, flow)
    assert flow.response is not None
    assert flow.response.headers["content-encoding"] == "gzip"
    assert flow.response.headers["content-length"] == "999"


def test_redaction_counts_merge_with_what_the_streaming_addon_recorded(addon: Redaction) -> None:
    flow = request_flow(chat(OPENAI.text))
    flowstate.record(flow, "redaction", {"response": {"github-token": 2}})
    send(addon, flow)
    assert redaction_facts(flow) == {
        "response": {"github-token": 2},
        "request": {"openai-api-key": 1},
    }


def scrubbed_flow(body: bytes, **kw: Any) -> http.HTTPFlow:
    flow = with_response(request_flow(), body, **kw)
    scrub = flowstate.state(flow).scrub
    scrub.extend(flowstate.ScrubLiteral(SCRUB_ID, v) for v in secret_variants(KEY))
    return flow


@pytest.mark.parametrize("responses", [True, False])
def test_echoed_injected_key_is_masked_even_with_response_redaction_off(
    make_addon: MakeAddon, responses: bool
) -> None:
    addon = make_addon("default" if responses else "responses-off")
    encoded = base64.b64encode(f"user:{KEY}".encode()).decode()
    body = answer(f"Incorrect API key: {KEY}; basic {encoded}").replace(b"-", b"\\u002d")
    flow = receive(addon, scrubbed_flow(compress(body, "gzip"), encoding="gzip"))
    assert flow.response is not None and flow.response.status_code == 200
    content = flow.response.content
    assert content is not None
    assert KEY.encode() not in content and encoded.encode() not in content
    text = json.loads(content)["choices"][0]["message"]["content"]
    assert KEY not in text and text.count(f"[REDACTED:{SCRUB_ID}]") == 2
    assert redaction_facts(flow)["response"] == {SCRUB_ID: 2}


def test_response_redaction_off_without_injected_key_passes_untouched(
    make_addon: MakeAddon,
) -> None:
    addon = make_addon("responses-off")
    body = compress(answer(GITHUB.text), "gzip")
    flow = receive(addon, with_response(request_flow(), body, encoding="gzip"))
    assert flow.response is not None and flow.response.raw_content == body


def test_unconfigured_addon_refuses() -> None:
    addon = Redaction()  # never configured
    flow = request_flow(chat("hi"))
    addon.requestheaders(flow)
    assert refusal(flow) == (503, "gateway_not_configured")


def test_the_chain_shares_one_redaction_runtime(config_files: dict[str, Path]) -> None:
    """One runtime per config (one memo of clean texts, one cache of literal redactors), built
    once and shared by every redacting addon; a new config gets a new one."""
    addons = (Redaction(), StreamRedaction(), WebSockets())
    with configured(*addons, config=config_files["default"]):
        runtimes = {id(addon.runtime) for addon in addons}
        assert len(runtimes) == 1 and addons[0].runtime is not None
        first = addons[0].runtime
    other = Redaction()
    with configured(other, config=config_files["binary-pass"]):
        assert other.runtime is not None and other.runtime is not first
        # The old config's worker pool is closed for good (its workers end after their jobs).
        assert first.offload is not None and first.offload.closed
        assert other.runtime.offload is not None and not other.runtime.offload.closed


def test_applying_a_config_builds_the_redactors_indexes(config_files: dict[str, Path]) -> None:
    """The Hyperscan databases and stream indexes are built when the config is applied, not by
    the first request (0.2-0.4 s on its thread, or against a stream's budget)."""
    addon = Redaction()
    with configured(addon, config=config_files["default"]):
        runtime = addon.runtime
        assert runtime is not None and runtime.request is not None and runtime.response is not None
        for redactor in (runtime.request, runtime.response, runtime.response_scrub_only):
            keywords = redactor._compiled.keywords
            assert not keywords._fast_pending and redactor._stream_index is not None
        assert runtime.request._compiled.keywords._fast is not None
        assert runtime.response._compiled.keywords._fast is not None


def test_a_database_that_cannot_be_built_fails_the_config_not_a_request(
    tmp_path: Path, idp: TestIdP, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(cls: type, words: Any) -> Any:
        raise MemoryError("no memory for the database")

    monkeypatch.setattr(prefilter.HyperscanKeywords, "build", classmethod(broken))
    config = write_config(
        tmp_path, idp, redaction={"rules": [str(REPO / "rules")], "worker_processes": 0}
    )
    addon = Redaction()
    with caplog.at_level("ERROR", logger="sluicegate"), configured(addon, config=config):
        assert addon.config is None  # unconfigured: every flow is refused (503)
    assert "Redaction cannot start: MemoryError: no memory for the database" in caplog.text


# -- large bodies: worker processes ---------------------------------------------------------------

FILLER = "the build passed; nothing else to report. " * 500  # ~21 KB, over process_bytes
# Adversarial text: ~3.7 µs per byte with the default pack (~0.23 s at 63 KB, under LIMIT:
# well over the tight budget of 0.05 s).
SLOW = b"api_key=" * 7_900


def test_a_large_request_is_redacted_by_a_worker_process_as_in_process(
    make_addon: MakeAddon,
) -> None:
    addon = make_addon("default")
    runtime = addon.runtime
    assert runtime is not None and runtime.offload is not None and runtime.request is not None
    body = chat(f"{FILLER} {OPENAI.text} {GITHUB.text}")
    assert len(body) > runtime.process_bytes
    query = f"/v1/chat/completions?q={FILLER}&token={GITHUB.text}".replace(" ", "+")
    flow = send(addon, request_flow(compress(body, "gzip"), encoding="gzip", path=query))
    assert flow.response is None
    assert runtime.offload.pids(), "no worker process ran"
    expected = redact_body(body, "application/json", runtime.request, runtime.body_policy)
    assert flow.request.raw_content == expected.body
    assert OPENAI.secret.encode() not in expected.body
    assert GITHUB.secret not in flow.request.path
    assert redaction_facts(flow)["request"] == {
        "openai-api-key": 1,
        "github-token": 1,
        "key-token": 1,  # the query's token field
    }


def test_a_large_response_loses_the_injected_key_in_a_worker_too(make_addon: MakeAddon) -> None:
    addon = make_addon("default")
    body = answer(f"{FILLER} Incorrect API key: {KEY} and {GITHUB.text}")
    flow = receive(addon, scrubbed_flow(body))
    assert addon.runtime is not None and addon.runtime.offload is not None
    assert addon.runtime.offload.pids()
    assert flow.response is not None and flow.response.status_code == 200
    content = flow.response.content
    assert content is not None and KEY.encode() not in content
    assert GITHUB.secret.encode() not in content
    assert redaction_facts(flow)["response"] == {SCRUB_ID: 1, "github-token": 1}


@pytest.mark.parametrize("part", ["request", "response"])
def test_a_runaway_over_budget_is_refused_and_nothing_passes(
    make_addon: MakeAddon, part: str
) -> None:
    addon = make_addon("tight-budget")
    runtime = addon.runtime
    assert runtime is not None and runtime.offload is not None
    body = SLOW + GITHUB.text.encode()
    if part == "request":
        flow = send(addon, request_flow(body, content_type="text/plain"))
    else:
        flow = receive(addon, with_response(request_flow(), body, content_type="text/plain"))
    assert refusal(flow) == (503, "redaction_timeout")
    assert flow.response is not None and GITHUB.secret.encode() not in flow.response.content
    error = json.loads(flow.response.content)["error"]
    assert "nothing was forwarded" in error["message"] and error["type"] == "sluicegate_error"


def test_without_worker_processes_large_bodies_stay_on_a_thread(make_addon: MakeAddon) -> None:
    addon = make_addon("no-workers")
    assert addon.runtime is not None and addon.runtime.offload is None
    flow = send(addon, request_flow(chat(f"{FILLER} {OPENAI.text}")))
    assert flow.response is None
    assert OPENAI.secret.encode() not in (flow.request.raw_content or b"")
