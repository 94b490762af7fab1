"""Large bodies through a real gateway's worker processes: redacted exactly as in-process; a
runaway over the budget and a worker that dies are refused with our JSON error, and the
upstream (or the agent) gets nothing of the body."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx

from sluicegate.redaction.bodies import BodyPolicy, redact_body
from sluicegate.redaction.redactor import Redactor
from sluicegate.redaction.rules import Direction, load_rule_pack
from tests.conftest import GatewayFactory
from tests.support.gateway import REPO, Gateway
from tests.support.rule_secrets import example
from tests.support.upstream import FakeUpstream, Received, Responder

OPENAI = example("openai-api-key")
GITHUB = example("github-token")
AWS = example("aws-secret-access-key")
CHAT = "/v1/chat/completions"
PACK = load_rule_pack([REPO / "rules"])
# Adversarial text: ~11 µs per character with the default pack; 600 KB is ~7 s of work.
# Adversarial text: ~3.7 µs per byte with the default pack (about 7 s at 2 MB).
SLOW = b"api_key=" * 250_000


def workers(gateway: Gateway, count: int, timeout: float = 60.0) -> list[int]:
    """Pids of the gateway's redaction workers, once `count` of them wait for jobs (started:
    asleep, and no CPU time spent for a while)."""
    assert gateway.proc is not None
    deadline = time.monotonic() + timeout
    found: list[int] = []
    while time.monotonic() < deadline:
        found = []
        for task in Path(f"/proc/{gateway.proc.pid}/task").iterdir():
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue  # a thread that just ended
            for pid in children:
                if _idle_worker(int(pid)):
                    found.append(int(pid))
        if len(found) >= count:
            return sorted(found)
        time.sleep(0.1)
    raise AssertionError(f"{len(found)} redaction workers running, expected {count}")


def _idle_worker(pid: int) -> bool:
    try:
        if b"sluicegate.redaction.offload" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
        samples = []
        for _ in range(3):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
            samples.append((fields[0], int(fields[11]) + int(fields[12])))  # state, CPU ticks
            time.sleep(0.15)
    except OSError:
        return False
    return all(state == "S" for state, _ in samples) and len({t for _, t in samples}) == 1


def large_chat(size: int) -> bytes:
    """A chat request of about `size` bytes with secrets spread through it."""
    turns = []
    secrets = [OPENAI.text, GITHUB.text, AWS.text]
    index = 0
    while sum(len(t) for t in turns) < size:
        turns.append(f"step {index}: built, tested, deployed; the log says " + "ok " * 200)
        if index % 50 == 0:
            turns.append(f"use {secrets[(index // 50) % 3]} for the next call")
        index += 1
    messages = [{"role": "user", "content": turn} for turn in turns]
    return json.dumps({"model": "gpt-test", "messages": messages}).encode()


def post_json(client: httpx.Client, url: str, body: bytes) -> httpx.Response:
    return client.post(url, content=body, headers={"content-type": "application/json"})


def test_a_large_request_is_redacted_by_workers_exactly_as_in_process(
    gateway: Gateway, token: str, upstream: FakeUpstream
) -> None:
    pids = workers(gateway, 2)
    assert gateway.proc is not None and gateway.proc.pid not in pids
    body = large_chat(2 * 1024 * 1024)
    expected = redact_body(
        body, "application/json", Redactor(PACK, Direction.REQUEST), BodyPolicy()
    )
    assert expected.changed
    with gateway.client(token, timeout=60) as client:
        response = post_json(client, upstream.url(CHAT), body)
    assert response.status_code == 200, response.text
    (got,) = upstream.received
    assert got.body == expected.body
    for secret in (OPENAI.secret, GITHUB.secret, AWS.secret):
        assert secret.encode() not in got.raw()
    assert workers(gateway, 2) == pids  # the same warm workers did it


def test_a_large_response_is_redacted_by_workers_exactly_as_in_process(
    gateway: Gateway, token: str, upstream: FakeUpstream
) -> None:
    workers(gateway, 2)
    body = large_chat(1024 * 1024)
    expected = redact_body(
        body, "application/json", Redactor(PACK, Direction.RESPONSE), BodyPolicy()
    )

    def answer(responder: Responder, got: Received) -> None:
        responder.send(200, body, "application/json")

    upstream.handle("GET", "/v1/files/large", answer)
    with gateway.client(token, timeout=60) as client:
        response = client.get(upstream.url("/v1/files/large"))
    assert response.status_code == 200, response.text
    assert response.content == expected.body
    for secret in (OPENAI.secret, GITHUB.secret, AWS.secret):
        assert secret.encode() not in response.content


def test_a_runaway_over_the_budget_gets_503_and_the_upstream_sees_nothing(
    start_gateway: GatewayFactory, token: str, upstream: FakeUpstream
) -> None:
    gateway = start_gateway(lambda cfg: cfg["redaction"].update(budget_seconds=0.5))
    before = workers(gateway, 2)
    body = SLOW + b" " + GITHUB.text.encode()
    started = time.monotonic()
    with gateway.client(token, timeout=60) as client:
        response = client.post(
            upstream.url("/echo"), content=body, headers={"content-type": "text/plain"}
        )
    assert time.monotonic() - started < 5  # the budget, not the ~7 s the job would take
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "redaction_timeout" and error["type"] == "sluicegate_error"
    assert error["request_id"] and "nothing was forwarded" in error["message"]
    assert GITHUB.secret not in response.text
    assert upstream.received == []
    after = workers(gateway, 2)  # the runaway's worker was killed and replaced
    assert set(before) != set(after)
    assert GITHUB.secret not in gateway.settled_logs()


def test_a_worker_that_dies_mid_job_gets_503_and_the_upstream_sees_nothing(
    start_gateway: GatewayFactory, token: str, upstream: FakeUpstream
) -> None:
    gateway = start_gateway()
    pids = workers(gateway, 2)
    body = SLOW + b" " + OPENAI.text.encode()
    result: dict[str, httpx.Response] = {}

    def send() -> None:
        with gateway.client(token, timeout=60) as client:
            result["response"] = client.post(
                upstream.url("/echo"), content=body, headers={"content-type": "text/plain"}
            )

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 30
    while all(_idle_worker(pid) for pid in pids):  # until one is working on the body
        assert time.monotonic() < deadline, "no worker took the job"
    assert "response" not in result
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    sender.join(30)
    response = result["response"]
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "redaction_unavailable" and error["type"] == "sluicegate_error"
    assert OPENAI.secret not in response.text
    assert upstream.received == []
    # Replaced: the next large body is redacted again.
    replaced = workers(gateway, 2)
    assert not set(replaced) & set(pids)
    with gateway.client(token, timeout=60) as client:
        ok = post_json(client, upstream.url(CHAT), large_chat(64 * 1024))
    assert ok.status_code == 200, ok.text
    (got,) = upstream.received
    assert OPENAI.secret.encode() not in got.raw()


def test_a_runaway_response_is_withheld(
    start_gateway: GatewayFactory, token: str, upstream: FakeUpstream
) -> None:
    gateway = start_gateway(lambda cfg: cfg["redaction"].update(budget_seconds=0.5))
    workers(gateway, 2)
    body = SLOW + b" " + AWS.text.encode()

    def answer(responder: Responder, got: Received) -> None:
        responder.send(200, body, "text/plain")

    upstream.handle("GET", "/v1/files/slow", answer)
    with gateway.client(token, timeout=60) as client:
        response = client.get(upstream.url("/v1/files/slow"))
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "redaction_timeout"
    assert AWS.secret not in response.text and b"api_key=api_key=" not in response.content
