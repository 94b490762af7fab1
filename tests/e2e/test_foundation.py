"""The foundation: a real mitmdump with the chain, strict config, failing closed, hot reload."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.support.gateway import REPO, Gateway
from tests.support.upstream import FakeUpstream

FAULT_SCRIPT = REPO / "tests" / "support" / "fault_injection.py"


def openai_client(gateway: Gateway, token: str, upstream: FakeUpstream) -> openai.OpenAI:
    http_client = httpx.Client(proxy=gateway.proxy_url(), verify=gateway.ssl_context(), timeout=20)
    return openai.OpenAI(
        api_key=token, base_url=f"{upstream.base_url}/v1", http_client=http_client, max_retries=0
    )


def test_openai_sdk_request_reaches_upstream_and_answer_comes_back(
    gateway: Gateway, upstream: FakeUpstream, token: str
) -> None:
    upstream.script.text = "The answer is 42."
    client = openai_client(gateway, token, upstream)
    completion = client.chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "What is the answer?"}]
    )
    assert completion.choices[0].message.content == "The answer is 42."
    assert len(upstream.received) == 1
    got = upstream.received[0]
    assert got.path == "/v1/chat/completions"
    assert got.json()["messages"][0]["content"] == "What is the answer?"


def test_curl_through_https_proxy(gateway: Gateway, upstream: FakeUpstream, token: str) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed on this machine")
    out = subprocess.run(
        ["curl", "-sS", "-H", f"authorization: Bearer {token}", upstream.url("/echo")],
        env=gateway.agent_env(),
        capture_output=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    # The echo quotes the injected key, so redaction re-serializes it: compare parsed JSON.
    assert json.loads(out.stdout)["path"] == "/echo"
    assert upstream.received[0].path == "/echo"


# -- strict configuration -------------------------------------------------------------------


def run_bad(tmp_path: Path, config: dict, *extra: str) -> tuple[int, str]:
    gw = Gateway(config, tmp_path, extra_args=extra, env={UPSTREAM_KEY_ENV: UPSTREAM_KEY})
    code = gw.run_to_exit()
    return code, gw.logs


def check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-m", "sluicegate", "check-config", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "addons"), **(env or {})},
        timeout=60,
    )


def test_typo_in_config_key_stops_gateway_and_names_the_key(
    tmp_path: Path, base_config: dict
) -> None:
    config = {**base_config, "routes": [dict(base_config["routes"][0])]}
    config["routes"][0]["credentail"] = config["routes"][0].pop("credential")
    code, logs = run_bad(tmp_path, config)
    assert code != 0
    assert "routes[0].credentail: unknown key (did you mean 'credential'?)" in logs
    assert "sluicegate.yaml" in logs
    result = check_config(tmp_path / "sluicegate.yaml")
    assert result.returncode == 1
    assert "routes[0].credentail: unknown key" in result.stderr


def test_rule_with_bad_regex_stops_gateway_and_names_rule_file_and_key(
    tmp_path: Path, base_config: dict
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "corp.yaml").write_text(
        "rules:\n"
        "  - id: corp-id\n"
        "    description: internal ids\n"
        "    pattern: 'CORP-([0-9]{6}'\n"
        "    keywords: [CORP-]\n"
        "    profiles: [default]\n"
    )
    config = {**base_config, "redaction": {"rules": [str(REPO / "rules"), str(rules)]}}
    code, logs = run_bad(tmp_path, config)
    assert code != 0
    assert f"{rules / 'corp.yaml'}: rules[0].pattern:" in logs
    result = check_config(tmp_path / "sluicegate.yaml", env={UPSTREAM_KEY_ENV: UPSTREAM_KEY})
    assert result.returncode == 1
    assert f"{rules / 'corp.yaml'}: rules[0].pattern:" in result.stderr


def test_missing_secret_env_var_stops_gateway(tmp_path: Path, base_config: dict) -> None:
    config = {**base_config, "routes": [dict(base_config["routes"][0])]}
    config["routes"][0]["credential"] = {"env": "SLUICEGATE_TEST_NOT_SET"}
    code, logs = run_bad(tmp_path, config)
    assert code != 0
    assert "routes[0].credential: secret unavailable: environment variable" in logs
    assert "SLUICEGATE_TEST_NOT_SET" in logs


def test_inline_secret_is_refused(tmp_path: Path, base_config: dict) -> None:
    config = {**base_config, "routes": [dict(base_config["routes"][0])]}
    config["routes"][0]["credential"] = "sk-inline-secret-value"
    code, logs = run_bad(tmp_path, config)
    assert code != 0
    assert "secrets must not be inlined" in logs
    assert "sk-inline-secret-value" not in logs


def test_valid_config_passes_check_config(tmp_path: Path, base_config: dict) -> None:
    import yaml

    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(base_config))
    result = check_config(path, env={UPSTREAM_KEY_ENV: UPSTREAM_KEY})
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_unknown_sluicegate_option_stops_gateway(tmp_path: Path, base_config: dict) -> None:
    code, logs = run_bad(tmp_path, base_config, "--set", "sluicegate_confg=/x.yaml")
    assert code != 0
    assert "unknown option 'sluicegate_confg'" in logs


def test_missing_config_option_stops_gateway(tmp_path: Path) -> None:
    gw = Gateway(None, tmp_path)
    code = gw.run_to_exit()
    assert code != 0
    assert "no config: pass --set sluicegate_config=PATH" in gw.logs


@pytest.mark.parametrize(
    "option",
    [
        "stream_large_bodies=1k",
        "ssl_insecure=true",
        "flow_detail=3",
        "ignore_hosts=.*",
    ],
)
def test_unsafe_mitmproxy_options_stop_gateway(
    tmp_path: Path, base_config: dict, option: str
) -> None:
    code, logs = run_bad(tmp_path, base_config, "--set", option)
    assert code != 0
    assert f"unsafe mitmproxy option: {option.split('=')[0]}" in logs


# -- failing closed ---------------------------------------------------------------------------

REQUEST_PHASE_HOOKS = [
    "ProxyHardening.requestheaders",
    "CallerAuth.requestheaders",
    "Routing.requestheaders",
    "Policy.request",
    "Redaction.requestheaders",
    "Redaction.request",
    "StreamRedaction.requestheaders",
    "WebSockets.requestheaders",
    "MessageParts.requestheaders",
    "MessageParts.request",
    "CredentialInjection.request",
    "Recorder.requestheaders",
]
RESPONSE_PHASE_HOOKS = [
    "Policy.response",
    "Redaction.responseheaders",
    "Redaction.response",
    "StreamRedaction.responseheaders",
    "StreamRedaction.response",
    "WebSockets.response",
    "MessageParts.responseheaders",
    "MessageParts.response",
    "CredentialInjection.responseheaders",
    "CredentialInjection.response",
    "Recorder.response",
]
CONNECT_HOOKS = [
    "ProxyHardening.http_connect",
    "CallerAuth.http_connect",
    "Routing.http_connect",
]
# The stable code each hook's guard answers with (default: gateway_error).
HOOK_CODES = {
    "Policy.request": "policy_error",
    "Policy.response": "policy_error",
    **{
        f"Redaction.{hook}": "redaction_error"
        for hook in ("requestheaders", "request", "responseheaders", "response")
    },
    **{
        f"MessageParts.{hook}": "redaction_error"
        for hook in ("requestheaders", "request", "responseheaders", "response")
    },
    "StreamRedaction.requestheaders": "stream_redaction_error",
    "StreamRedaction.responseheaders": "stream_redaction_error",
    "StreamRedaction.response": "stream_redaction_error",
    "WebSockets.requestheaders": "websocket_error",
    "WebSockets.response": "websocket_error",
}
# `WebSockets.websocket_message` runs after the upgrade, where no HTTP answer is possible: its
# fault case (the message is dropped, the connection closed with 1011) is
# tests/e2e/test_websockets.py::test_a_fault_in_the_message_hook_drops_the_message_and_closes.


@pytest.fixture
def faulty_gateway(start_gateway) -> Gateway:
    return start_gateway(extra_args=("-s", str(FAULT_SCRIPT)))


@pytest.mark.parametrize("hook", REQUEST_PHASE_HOOKS)
def test_request_hook_raising_answers_with_error_and_forwards_nothing(
    faulty_gateway: Gateway, upstream: FakeUpstream, token: str, hook: str
) -> None:
    with faulty_gateway.client() as client:
        response = client.post(
            upstream.url("/v1/chat/completions"),
            json={"model": "m", "messages": []},
            headers={"x-test-fault": hook, "authorization": f"Bearer {token}"},
        )
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == HOOK_CODES.get(hook, "gateway_error")
    assert error["request_id"]
    assert "SHOULD-NOT-APPEAR" not in response.text
    assert upstream.received == []
    # mitmdump's output is read by a thread: the log line may land just after the answer.
    wait_for(lambda: error["request_id"] in faulty_gateway.logs)
    logs = faulty_gateway.logs
    assert "InjectedFault" in logs
    assert "SHOULD-NOT-APPEAR" not in logs


@pytest.mark.parametrize("hook", RESPONSE_PHASE_HOOKS)
def test_response_hook_raising_replaces_the_upstream_answer(
    faulty_gateway: Gateway, upstream: FakeUpstream, token: str, hook: str
) -> None:
    upstream.script.text = "UPSTREAM-BODY-MUST-NOT-ARRIVE"
    with faulty_gateway.client() as client:
        response = client.post(
            upstream.url("/v1/chat/completions"),
            json={"model": "m", "messages": []},
            headers={"x-test-fault": hook, "authorization": f"Bearer {token}"},
        )
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == HOOK_CODES.get(hook, "gateway_error")
    assert "UPSTREAM-BODY-MUST-NOT-ARRIVE" not in response.text
    assert "SHOULD-NOT-APPEAR" not in response.text
    assert len(upstream.received) == 1  # the request went out; its answer was replaced
    # mitmdump's output is read by a thread: the log line may land just after the answer.
    wait_for(lambda: error["request_id"] in faulty_gateway.logs)
    logs = faulty_gateway.logs
    assert "InjectedFault" in logs
    assert "SHOULD-NOT-APPEAR" not in logs


@pytest.mark.parametrize("hook", CONNECT_HOOKS)
def test_connect_hook_raising_refuses_the_tunnel(
    faulty_gateway: Gateway, upstream: FakeUpstream, token: str, hook: str
) -> None:
    # httpx sends proxy headers with the CONNECT request: they name the hook to break.
    proxy = httpx.Proxy(faulty_gateway.proxy_url(token), headers={"x-test-fault": hook})
    with pytest.raises(httpx.ProxyError, match="500"), httpx.Client(proxy=proxy) as client:
        client.get(upstream.url("/echo"))
    assert upstream.received == []
    assert token not in faulty_gateway.logs


# -- hot reload ---------------------------------------------------------------------------------


def test_hot_reload_keeps_working_and_a_broken_reload_fails_closed(
    start_gateway, tmp_path: Path, upstream: FakeUpstream, plain_upstream: FakeUpstream, token: str
) -> None:
    script = tmp_path / "gateway.py"
    shutil.copy(REPO / "addons" / "gateway.py", script)
    gw = start_gateway(script=script)

    def get() -> httpx.Response:
        with gw.client() as client:
            return client.get(upstream.url("/echo"), headers={"authorization": f"Bearer {token}"})

    assert get().status_code == 200

    original = script.read_text()
    script.write_text(original + "\n# touched\n")
    wait_for(lambda: gw.logs.count("Loading script") >= 2)
    assert get().status_code == 200

    script.write_text("this is not python (\n")
    wait_for(lambda: gw.logs.count("Loading script") >= 3)
    time.sleep(0.3)
    upstream.reset()
    with pytest.raises(httpx.ProxyError, match="503"):
        get()  # the CONNECT itself is refused
    with gw.client() as client:
        broken = client.get(plain_upstream.url("/echo"))
    assert broken.status_code == 503
    assert broken.json()["error"]["code"] == "gateway_not_loaded"
    assert upstream.received == [] and plain_upstream.received == []

    script.write_text(original)
    wait_for(lambda: gw.logs.count("Loading script") >= 4)
    time.sleep(0.3)
    assert get().status_code == 200


def wait_for(condition, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")
