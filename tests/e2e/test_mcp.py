"""MCP through a running gateway, with the official MCP Python SDK on both sides.

A server built with the SDK (`MCPServer`, streamable HTTP over HTTPS, answers as SSE streams
unless said otherwise) and the SDK's streamable-HTTP client, both from their own virtualenv
(tests/support/mcp_env.py), talk through a real `mitmdump` with the sluicegate chain: per-tool
rules per group, a blocked call answered as a JSON-RPC error, a held call approved, `tools/list`
filtered, a changed tool definition (a "rug pull") withheld and held until accepted, secrets in
arguments and in streamed results redacted, and the recording naming method, tool and decision.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from mitmproxy import io

from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.support import mcp_env
from tests.support.gateway import REPO, Gateway, recording_section

if TYPE_CHECKING:  # (imported by name, pytest would try to collect the Test* classes)
    from tests.support.pki import TestCA
    from tests.support.tokens import TestIdP

PEER = REPO / "tests" / "support" / "mcp_peer.py"
ADMIN_ENV = "SLUICEGATE_TEST_ADMIN_TOKEN"
ADMIN_TOKEN = "adm-" + secrets.token_hex(16)
# A secret the server's read_file returns (an AWS secret access key's shape) and a GitHub token
# an agent might put into arguments: neither may pass the gateway.
RESULT_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + secrets.token_hex(5)
ARGUMENT_TOKEN = "ghp_" + secrets.token_hex(18)

POLICY = {
    "rules": [
        {
            "id": "interns-never-delete",
            "action": "block",
            "message": "Interns do not delete branches.",
            "match": {"groups": ["interns"], "mcp_tools": ["delete_branch"]},
        },
        {
            "id": "mcp-read-tools",
            "action": "allow",
            "match": {"routes": ["tools"], "mcp_tools": ["search", "read_*"]},
        },
        {
            "id": "mcp-delete-needs-approval",
            "action": "hold",
            "message": "Deleting a branch needs a human's OK.",
            "match": {"routes": ["tools"], "mcp_tools": ["delete_*"]},
        },
        {
            "id": "mcp-no-other-tools",
            "action": "block",
            "message": "Only the listed tools may be called.",
            "match": {"routes": ["tools"], "mcp_methods": ["tools/call"]},
        },
    ]
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mcp_python() -> Path:
    return mcp_env.ensure()


class McpServer:
    """The SDK-built MCP server over HTTPS (certificate from the tests' upstream CA)."""

    def __init__(self, python: Path, pki: TestCA, workdir: Path, **options: Any) -> None:
        self.python = python
        self.cert = pki.issue("mcp-upstream")
        self.port = free_port()
        self.log = workdir / "mcp-calls.jsonl"
        self.log.touch()
        self.proc: subprocess.Popen[bytes] | None = None
        self.options = options
        self.starts = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/mcp"

    def start(self, variant: str = "") -> McpServer:
        args = [str(self.python), str(PEER), "server", "--port", str(self.port)]
        args += ["--cert", str(self.cert.cert_file), "--key", str(self.cert.key_file)]
        if variant:
            args += ["--variant", variant]
        if self.options.get("json_response"):
            args.append("--json-response")
        env = {**os.environ, "MCP_PEER_SECRET": RESULT_SECRET, "MCP_PEER_LOG": str(self.log)}
        output = self.log.with_suffix(".out").open("ab")
        self.proc = subprocess.Popen(args, stdout=output, stderr=subprocess.STDOUT, env=env)
        output.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            printed = self.log.with_suffix(".out").read_text()
            if printed.count("ready\n") > self.starts:
                self.starts += 1
                return self
            assert self.proc.poll() is None, printed
            time.sleep(0.05)
        raise AssertionError("the MCP server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def calls(self) -> list[dict[str, str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]


def gateway_config(base: dict, server: McpServer, approvals_port: int, **mcp: Any) -> dict:
    cfg = copy.deepcopy(base)
    cfg["routes"].append(
        {
            "name": "tools",
            "host": "127.0.0.1",
            "port": server.port,
            "mcp": True,
            "groups": ["agents", "interns"],
        }
    )
    cfg["policy"] = copy.deepcopy(POLICY)
    cfg["approvals"] = {
        "admin_token": {"env": ADMIN_ENV},
        "listen_port": approvals_port,
        "timeout_seconds": 60,
    }
    if mcp:
        cfg["mcp"] = mcp
    return cfg


class Setup:
    """One MCP server behind one gateway (recording on), and the MCP client's way through."""

    def __init__(self, gw: Gateway, server: McpServer, idp: TestIdP, port: int, rec: Path):
        self.gw, self.server, self.idp, self.approvals_port = gw, server, idp, port
        self.recordings = rec

    def client(
        self, steps: list[dict[str, Any]], groups: tuple[str, ...] = ("agents",), sub: str = "ann"
    ) -> subprocess.Popen[str]:
        token = self.idp.mint(sub, groups)
        args = [str(self.server.python), str(PEER), "client", "--url", self.server.url]
        args += ["--proxy", self.gw.proxy_url(token), "--ca", str(self.gw.ca_file)]
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        return subprocess.Popen(
            [*args, json.dumps(steps)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def run(self, steps: list[dict[str, Any]], **kw: Any) -> list[dict[str, Any]]:
        proc = self.client(steps, **kw)
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, f"MCP client failed:\n{err}\n{self.gw.logs[-3000:]}"
        return [json.loads(line) for line in out.splitlines()]

    def api(self, path: str, method: str = "GET", **kw: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        with httpx.Client(trust_env=False, timeout=10) as client:
            url = f"http://127.0.0.1:{self.approvals_port}{path}"
            return client.request(method, url, headers=headers, **kw)

    def wait_for_pending(self, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = self.api("/v1/approvals").json()["approvals"]
            if pending:
                return pending[0]
            time.sleep(0.05)
        raise AssertionError("no pending approval")

    def flows(self) -> list[Any]:
        found = []
        for session in sorted(self.recordings.glob("*/*.mitm")):
            with session.open("rb") as f:
                found += list(io.FlowReader(f).stream())
        return found


@pytest.fixture
def make_setup(
    mcp_python: Path, pki: TestCA, idp: TestIdP, base_config: dict, tmp_path: Path
) -> Iterator[Callable[..., Setup]]:
    started: list[tuple[Gateway, McpServer]] = []

    def make(server_options: dict[str, Any] | None = None, **mcp: Any) -> Setup:
        n = len(started)
        server = McpServer(mcp_python, pki, tmp_path, **(server_options or {})).start()
        port = free_port()
        config = gateway_config(base_config, server, port, **mcp)
        recordings = tmp_path / f"recordings{n}"
        config["recording"] = recording_section(recordings)
        gw = Gateway(
            config,
            tmp_path / f"gw{n}",
            upstream_ca=pki.cert_file,
            env={UPSTREAM_KEY_ENV: UPSTREAM_KEY, ADMIN_ENV: ADMIN_TOKEN},
        )
        started.append((gw, server))
        gw.start()
        return Setup(gw, server, idp, port, recordings)

    yield make
    for gw, server in started:
        gw.stop()
        server.stop()


def test_tools_list_is_filtered_per_group_and_allowed_calls_pass(
    make_setup: Callable[..., Setup],
) -> None:
    setup = make_setup()
    ann = setup.run([{"op": "list"}, {"op": "call", "tool": "search", "args": {"query": "x"}}])
    assert sorted(ann[0]["tools"]) == ["delete_branch", "read_file", "search"]  # no run_shell
    assert ann[1] == {"op": "call", "is_error": False, "text": "3 results for x"}
    interns = setup.run([{"op": "list"}], groups=("interns",), sub="ian")
    assert sorted(interns[0]["tools"]) == ["read_file", "search"]
    assert setup.server.calls() == [{"tool": "search", "argument": "x"}]


def test_a_blocked_call_is_a_json_rpc_error_and_never_reaches_the_server(
    make_setup: Callable[..., Setup],
) -> None:
    setup = make_setup()
    steps = [
        {"op": "call", "tool": "run_shell", "args": {"command": "rm -rf /"}},
        {"op": "call", "tool": "search", "args": {"query": "after"}},
    ]
    blocked, after = setup.run(steps)
    error = blocked["error"]
    assert error["code"] == -32001
    assert "mcp-no-other-tools" in error["message"]
    assert "Only the listed tools may be called." in error["message"]
    assert error["data"]["code"] == "policy_blocked" and error["data"]["rule"] == (
        "mcp-no-other-tools"
    )
    # The session goes on: the client's next call works.
    assert after["text"] == "3 results for after"
    assert [c["tool"] for c in setup.server.calls()] == ["search"]
    intern = setup.run(
        [{"op": "call", "tool": "delete_branch", "args": {"name": "main"}}],
        groups=("interns",),
        sub="ian",
    )
    assert intern[0]["error"]["data"]["rule"] == "interns-never-delete"
    assert [c["tool"] for c in setup.server.calls()] == ["search"]


def test_a_held_call_waits_for_an_approver_then_runs(make_setup: Callable[..., Setup]) -> None:
    setup = make_setup()
    proc = setup.client([{"op": "call", "tool": "delete_branch", "args": {"name": "old"}}])
    approval = setup.wait_for_pending()
    assert approval["rule"] == "mcp-delete-needs-approval"
    assert approval["route"] == "tools" and approval["subject"] == "ann"
    assert setup.server.calls() == []  # nothing reached the server while held
    decided = setup.api(
        f"/v1/approvals/{approval['id']}/approve",
        "POST",
        json={"approver": "sam", "reason": "cleanup ticket"},
    )
    assert decided.status_code == 200, decided.text
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out) == {"op": "call", "is_error": False, "text": "deleted branch old"}
    assert setup.server.calls() == [{"tool": "delete_branch", "argument": "old"}]

    denied = setup.client([{"op": "call", "tool": "delete_branch", "args": {"name": "main"}}])
    approval = setup.wait_for_pending()
    setup.api(
        f"/v1/approvals/{approval['id']}/deny",
        "POST",
        json={"approver": "sam", "reason": "not main"},
    )
    out, err = denied.communicate(timeout=60)
    error = json.loads(out)["error"]
    assert error["data"]["code"] == "approval_denied" and "not main" in error["message"]
    assert len(setup.server.calls()) == 1


def test_secrets_in_arguments_and_streamed_results_are_redacted(
    make_setup: Callable[..., Setup],
) -> None:
    setup = make_setup()
    nested = json.dumps({"filter": {"token": ARGUMENT_TOKEN}})  # JSON inside an argument
    results = setup.run(
        [
            {"op": "call", "tool": "read_file", "args": {"path": ".env"}},
            {"op": "call", "tool": "search", "args": {"query": nested}},
            {"op": "call", "tool": "search", "args": {"query": f"token {ARGUMENT_TOKEN}"}},
        ]
    )
    text = results[0]["text"]
    assert RESULT_SECRET not in text and "[REDACTED:" in text
    assert text.startswith("contents of .env:") and text.endswith("end of file")
    arguments = [c["argument"] for c in setup.server.calls()]
    assert not any(ARGUMENT_TOKEN in a for a in arguments), arguments
    assert "[REDACTED:" in arguments[1] and "[REDACTED:" in arguments[2]
    assert json.loads(arguments[1])["filter"]["token"].startswith("[REDACTED:")
    setup.gw.stop()
    read = next(f for f in setup.flows() if (_mcp(f).get("tool") == "read_file"))
    # The answer was an SSE stream, redacted as it streamed; the recording holds what the agent saw.
    assert read.response.headers["content-type"].startswith("text/event-stream")
    assert read.metadata["sluicegate"]["stream"]["bytes_sent"] > 0
    assert RESULT_SECRET.encode() not in read.response.content
    for flow in setup.flows():
        assert ARGUMENT_TOKEN.encode() not in (flow.request.content or b"")
        assert RESULT_SECRET.encode() not in (flow.response.content or b"")


def test_a_changed_tool_definition_is_withheld_and_held_until_accepted(
    make_setup: Callable[..., Setup],
) -> None:
    setup = make_setup()
    first = setup.run([{"op": "list"}])
    assert first[0]["tools"]["search"] == "Search the repository for a text."
    # The server is redeployed with a poisoned description of `search` (a rug pull).
    setup.server.stop()
    setup.server.start(variant="rugpull")
    proc = setup.client(
        [{"op": "list"}, {"op": "call", "tool": "search", "args": {"query": "q"}}, {"op": "list"}]
    )
    approval = setup.wait_for_pending()
    assert approval["rule"] == "mcp-tool-changed" and "'search'" in approval["message"]
    assert setup.server.calls() == []
    setup.api(
        f"/v1/approvals/{approval['id']}/approve",
        "POST",
        json={"approver": "sam", "reason": "reviewed the new description"},
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    listed, called, relisted = (json.loads(line) for line in out.splitlines())
    # Before the approval the changed tool was withheld (its new text never reached the agent).
    assert sorted(listed["tools"]) == ["delete_branch", "read_file"]
    assert called["text"] == "3 results for q"
    assert "id_rsa" in relisted["tools"]["search"]  # accepted: listed with its new definition
    setup.gw.stop()
    facts = [_mcp(f) for f in setup.flows()]
    assert any(f.get("tools_changed") == ["search"] for f in facts)
    assert any(f.get("tool_accepted") == "search" for f in facts)


def test_block_mode_refuses_a_changed_tool_until_mcp_accept(
    make_setup: Callable[..., Setup],
) -> None:
    setup = make_setup({"json_response": True}, on_tool_change="block")
    assert sorted(setup.run([{"op": "list"}])[0]["tools"]) == [
        "delete_branch",
        "read_file",
        "search",
    ]
    setup.server.stop()
    setup.server.start(variant="rugpull")
    listed, called = setup.run(
        [{"op": "list"}, {"op": "call", "tool": "search", "args": {"query": "q"}}]
    )
    assert "search" not in listed["tools"]
    assert called["error"]["data"]["rule"] == "mcp-tool-changed"
    pins = setup.api("/v1/mcp/pins?route=tools").json()
    assert set(pins["changed"]) == {"search"}
    accept = cli_accept(setup, "search")
    assert accept.returncode == 0, accept.stderr
    listed, called = setup.run(
        [{"op": "list"}, {"op": "call", "tool": "search", "args": {"query": "q"}}]
    )
    assert "id_rsa" in listed["tools"]["search"] and called["text"] == "3 results for q"


def cli_accept(setup: Setup, tool: str) -> subprocess.CompletedProcess[str]:
    url = f"http://127.0.0.1:{setup.approvals_port}"
    command = ["approvals", "mcp-accept", tool, "--route", "tools", "--url", url]
    return subprocess.run(
        [sys.executable, "-m", "sluicegate", *command, "--reason", "ok", "--approver", "sam"],
        env={
            **os.environ,
            "PYTHONPATH": str(REPO / "addons"),
            "SLUICEGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_recordings_name_method_tool_and_decision(
    make_setup: Callable[..., Setup], tmp_path: Path
) -> None:
    setup = make_setup()
    setup.run(
        [
            {"op": "list"},
            {"op": "call", "tool": "search", "args": {"query": "x"}},
            {"op": "call", "tool": "run_shell", "args": {"command": "id"}},
        ]
    )
    setup.gw.stop()
    facts = [_mcp(f) for f in setup.flows()]
    by_tool = {f["tool"]: f for f in facts if "tool" in f}
    assert by_tool["search"]["method"] == "tools/call"
    assert by_tool["search"]["decision"] == "allow"
    assert by_tool["run_shell"]["decision"] == "block"
    listed = next(f for f in facts if f.get("method") == "tools/list")
    assert listed["tools_refused"] == ["run_shell"] and listed["tools_listed"] == 4
    assert listed["tools_pinned"] == ["delete_branch", "read_file", "search"]
    # The metadata names the session by a hash of its id.
    in_session = [f for f in facts if f.get("method") not in (None, "initialize")]
    assert in_session and all(f["session"].startswith("sha256:") for f in in_session)
    policy = {
        _mcp(f).get("tool"): f.metadata["sluicegate"].get("policy", {}) for f in setup.flows()
    }
    assert policy["run_shell"]["request"]["rule"] == "mcp-no-other-tools"
    query = ["--dir", str(setup.recordings), "--tool", "run_*", "--json"]
    out = subprocess.run(
        [sys.executable, "-m", "sluicegate", "sessions", "flows", *query],
        env={**os.environ, "PYTHONPATH": str(REPO / "addons")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    (row,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert row["mcp_tools"] == ["run_shell"] and row["decision"] == "blocked"


def _mcp(flow: Any) -> dict[str, Any]:
    return flow.metadata.get("sluicegate", {}).get("mcp") or {}
