"""Benchmark the MCP engine: reading a `tools/call`, deciding it per message, and judging,
pinning and filtering `tools/list` answers (JSON and SSE). Run: python scripts/bench_mcp.py"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "addons"))

from sluicegate.policy import mcp as mcp_policy
from sluicegate.policy.conditions import Conditions, FlowContext
from sluicegate.policy.decisions import Action
from sluicegate.policy.engine import Policy
from sluicegate.policy.rules import Rule
from sluicegate.policy.views import BodyViews
from sluicegate.shapes import mcp

CTX = FlowContext("alice", "idp", frozenset({"agents"}), "tools", "mcp.example.com", 443, "POST",
                  "/mcp")  # fmt: skip
POLICY = Policy(
    [
        Rule(
            "interns", Action.BLOCK, Conditions(groups=frozenset({"interns"}), mcp_tools=("rm*",))
        ),
        Rule("read", Action.ALLOW, Conditions(mcp_tools=("search", "read_*", "tool_1*"))),
        Rule("hold", Action.HOLD, Conditions(mcp_tools=("delete_*",))),
        Rule("rest", Action.BLOCK, Conditions(mcp_methods=("tools/call",))),
    ]
)


def allowed(tool: str) -> bool:
    return mcp_policy.may_call(POLICY, CTX, tool)


def per_call(fn: Callable[[], object], rounds: int) -> float:
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - start) / rounds


def main() -> None:
    call = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 7,
            "method": "tools/call",
            "params": {"name": "read_file", "arguments": {"path": "src/app/main.py"}},
        }
    ).encode()
    body = mcp.parse_json(call)
    assert body is not None
    read = per_call(lambda: mcp.parse_json(call), 20000)
    print(f"read a tools/call ({len(call)} B): {read * 1e6:.1f} us")
    empty = BodyViews.of_text("")
    decide = per_call(
        lambda: mcp_policy.decide(POLICY, mcp_policy.contexts(CTX, body), empty), 20000
    )
    print(f"decide it (4 rules): {decide * 1e6:.1f} us")
    for count in (10, 100):
        tools = [
            {
                "name": f"tool_{i}",
                "description": "Searches the repository for a text and returns matching lines. "
                * 4,
                "inputSchema": {"type": "object", "properties": {"query": {"type": "string"}}},
            }
            for i in range(count)
        ]
        answer = json.dumps({"jsonrpc": "2.0", "id": 2, "result": {"tools": tools}}).encode()
        pins = {t["name"]: mcp.McpTool(t).fingerprint() for t in tools}
        for ctype, content in (
            ("application/json", answer),
            ("text/event-stream", b"event: message\ndata: " + answer + b"\n\n"),
        ):

            def judge(content: bytes = content, ctype: str = ctype, pins: dict = pins) -> object:
                j = mcp_policy.ToolListJudge(allowed, pins)
                return mcp.filter_tools(content, ctype, j.keep)

            elapsed = per_call(judge, 200)
            print(
                f"tools/list, {count} tools ({len(content) / 1e3:.0f} kB, {ctype}): "
                f"judged, fingerprinted, filtered in {elapsed * 1e3:.2f} ms"
            )


if __name__ == "__main__":
    main()
