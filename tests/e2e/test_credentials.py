"""Credential swap through a real gateway: the upstream gets the real key, the agent never does.

What a recorder would store is checked with tests/support/flow_probe.py, loaded after the chain.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.support import wire
from tests.support.gateway import REPO, Gateway
from tests.support.pki import TestCA as CA
from tests.support.tokens import TestIdP as IdP
from tests.support.upstream import FakeUpstream, Received, Responder

PROBE_SCRIPT = REPO / "tests" / "support" / "flow_probe.py"
REDACTED = "[REDACTED:injected-credential:openai]"
FILE_KEY = "sk-ant-FILESECRET-0123456789abcdef"


def openai_client(gateway: Gateway, api_key: str, upstream: FakeUpstream) -> openai.OpenAI:
    http_client = httpx.Client(proxy=gateway.proxy_url(), verify=gateway.ssl_context(), timeout=20)
    return openai.OpenAI(
        api_key=api_key, base_url=f"{upstream.base_url}/v1", http_client=http_client, max_retries=0
    )


def echo_credential_in_header(responder: Responder, got: Received) -> None:
    """An upstream that reflects the credential it received in a response header."""
    responder.send_json(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": "gpt-test",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hi"},
                    "finish_reason": "stop",
                }
            ],
        },
        headers={"x-echo-authorization": got.header("authorization") or ""},
    )


def agent_visible(headers: httpx.Headers) -> str:
    return "\n".join(f"{k}: {v}" for k, v in headers.multi_items())


# -- the openai SDK with its token as "API key" ---------------------------------------------------


def test_openai_sdk_key_is_swapped_and_echoes_are_scrubbed(
    gateway: Gateway, upstream: FakeUpstream, token: str
) -> None:
    upstream.handle("POST", "/v1/chat/completions", echo_credential_in_header)
    client = openai_client(gateway, token, upstream)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hello"}]
    )
    assert raw.parse().choices[0].message.content == "hi"
    (got,) = upstream.received
    assert got.header("authorization") == f"Bearer {UPSTREAM_KEY}"
    assert token.encode() not in got.raw()
    assert "proxy-authorization" not in got.header_names()
    visible = agent_visible(raw.headers)
    assert UPSTREAM_KEY not in visible
    assert raw.headers["x-echo-authorization"] == f"Bearer {REDACTED}"
    logs = gateway.settled_logs()
    assert token not in logs and UPSTREAM_KEY not in logs


def test_echo_in_headers_of_a_streamed_response_is_scrubbed(
    gateway: Gateway, upstream: FakeUpstream, token: str
) -> None:
    upstream.script.headers = {"x-upstream-debug": f"key={UPSTREAM_KEY}; org=test"}
    client = openai_client(gateway, token, upstream)
    with client.chat.completions.with_streaming_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hello"}], stream=True
    ) as response:
        text = "".join(
            chunk.choices[0].delta.content or "" for chunk in response.parse() if chunk.choices
        )
        headers = response.headers
    assert text == upstream.script.text
    assert headers["x-upstream-debug"] == f"key={REDACTED}; org=test"
    assert UPSTREAM_KEY not in agent_visible(headers)


# -- a gateway with a file secret, a second route and the recording probe -------------------------


@pytest.fixture(scope="module")
def file_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    pki: CA,
    base_config: dict,
    other_upstream: FakeUpstream,
) -> Iterator[Gateway]:
    """Route `openai` (Bearer from env) and `anthropic` (x-api-key from a file)."""
    workdir = tmp_path_factory.mktemp("file-gateway")
    key_file = workdir / "anthropic-key"
    key_file.write_text(FILE_KEY + "\n")
    config = copy.deepcopy(base_config)
    config["routes"].append(
        {
            "name": "anthropic",
            "host": "127.0.0.1",
            "port": other_upstream.port,
            "groups": ["agents"],
            "credential": {"file": str(key_file)},
            "inject": {"header": "x-api-key", "template": "{secret}"},
        }
    )
    probe = workdir / "probe.jsonl"
    gw = Gateway(
        config,
        workdir,
        upstream_ca=pki.cert_file,
        extra_args=("-s", str(PROBE_SCRIPT)),
        env={UPSTREAM_KEY_ENV: UPSTREAM_KEY, "SLUICEGATE_TEST_PROBE": str(probe)},
    )
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture
def key_file(file_gateway: Gateway) -> Iterator[Path]:
    path = file_gateway.workdir / "anthropic-key"
    yield path
    path.write_text(FILE_KEY + "\n")


@pytest.fixture
def probe(file_gateway: Gateway) -> Path:
    path = file_gateway.workdir / "probe.jsonl"
    path.write_text("")
    return path


def recorded(probe: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in probe.read_text().splitlines()]


def rotate(path: Path, secret: str) -> None:
    fresh = path.with_suffix(".new")
    fresh.write_text(secret + "\n")
    os.replace(fresh, path)


def test_file_secret_rotates_between_two_requests(
    file_gateway: Gateway, other_upstream: FakeUpstream, key_file: Path, token: str
) -> None:
    with file_gateway.client(token) as client:
        first = client.get(other_upstream.url("/echo"), headers={"x-api-key": "placeholder"})
        rotate(key_file, "sk-ant-ROTATED-fedcba9876543210")
        second = client.get(other_upstream.url("/echo"), headers={"x-api-key": "placeholder"})
    assert first.status_code == second.status_code == 200
    keys = [got.header("x-api-key") for got in other_upstream.received]
    assert keys == [FILE_KEY, "sk-ant-ROTATED-fedcba9876543210"]
    for got in other_upstream.received:
        assert "authorization" not in got.header_names()
        assert token.encode() not in got.raw()


def test_missing_secret_refuses_and_forwards_nothing(
    file_gateway: Gateway, other_upstream: FakeUpstream, key_file: Path, token: str
) -> None:
    key_file.unlink()
    with file_gateway.client(token) as client:
        response = client.get(other_upstream.url("/echo"))
    assert (response.status_code, response.json()["error"]["code"]) == (
        503,
        "credential_unavailable",
    )
    assert other_upstream.received == []


def test_recording_holds_the_marker_and_the_caller_never_the_secrets(
    file_gateway: Gateway,
    upstream: FakeUpstream,
    other_upstream: FakeUpstream,
    probe: Path,
    idp: IdP,
) -> None:
    token = idp.mint("agent-rec", ["agents"])
    with file_gateway.client(token) as client:
        assert client.get(upstream.url("/echo")).status_code == 200
        assert client.get(other_upstream.url("/echo")).status_code == 200
    (openai_flow, anthropic_flow) = recorded(probe)
    text = probe.read_text()
    assert UPSTREAM_KEY not in text and FILE_KEY not in text and token not in text
    assert ["authorization", "Bearer [credential:openai]"] in openai_flow["request_headers"]
    assert ["x-api-key", "[credential:anthropic]"] in anthropic_flow["request_headers"]
    meta = openai_flow["metadata"]
    assert meta["route"] == "openai"
    assert meta["caller"]["subject"] == "agent-rec"
    assert meta["caller"]["groups"] == ["agents"]
    assert meta["caller"]["token_fingerprint"]
    assert anthropic_flow["metadata"]["route"] == "anthropic"


def test_recorded_refusals_carry_the_reason_not_the_token(
    file_gateway: Gateway, upstream: FakeUpstream, probe: Path, idp: IdP
) -> None:
    expired = idp.mint(ttl=-600)
    answer = wire.connect(file_gateway.port, f"127.0.0.1:{upstream.port}", wire.basic(expired))
    assert answer.status == 407
    with file_gateway.client() as client:
        response = client.get(upstream.url("/echo"), headers={"x-api-key": expired})
    assert response.status_code == 401
    flows = recorded(probe)
    assert expired not in probe.read_text()
    assert [f["metadata"]["refusal"]["code"] for f in flows] == ["expired", "expired"]
    assert flows[0]["event"] == "http_connect_error"
    assert upstream.received == []
    assert expired not in file_gateway.settled_logs()
