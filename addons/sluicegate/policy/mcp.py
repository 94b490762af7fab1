"""Policy over MCP messages: per-message decisions, who may call which tool, pinned tools.

Pure (no mitmproxy): the Policy addon reads a request body with `shapes.mcp`, asks `decide` for
the decision over all its messages, and judges `tools/list` answers with `ToolListJudge`.

- A body of several JSON-RPC messages (a batch) is judged message by message and the most
  severe decision wins (block, then hold, then redact_only, then allow), so an allowed call
  cannot carry a forbidden one past the rules.
- A tool is listed to a caller when a `tools/call` of it by that caller would not be blocked.
- Tool definitions are pinned on first sight (trust on first use, per destination): a later
  definition with another fingerprint is a change nobody approved (a "rug pull"), so the tool is
  withheld from `tools/list` answers until an approver accepts the new version.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

from sluicegate.policy.conditions import FlowContext
from sluicegate.policy.decisions import Action, Decision
from sluicegate.policy.engine import Policy
from sluicegate.policy.rules import BodyLoader
from sluicegate.policy.views import BodyViews
from sluicegate.shapes.mcp import TOOLS_CALL, McpBody, McpTool

SEVERITY = {Action.ALLOW: 0, Action.REDACT_ONLY: 1, Action.HOLD: 2, Action.BLOCK: 3}
# The rule id of holds and blocks for a tool whose definition changed since it was pinned.
TOOL_CHANGED_RULE = "mcp-tool-changed"


def contexts(ctx: FlowContext, body: McpBody | None) -> list[FlowContext]:
    """One context per JSON-RPC request or notification of `body` (the plain context when
    there is none: a body of responses, or no JSON-RPC at all)."""
    if body is None:
        return [ctx]
    found = [
        dataclasses.replace(ctx, mcp_method=m.method, mcp_tool=m.tool)
        for m in body.messages
        if m.method is not None
    ]
    return found or [ctx]


def decide(policy: Policy, ctxs: list[FlowContext], body: BodyViews | BodyLoader) -> Decision:
    """The most severe of the request decisions over every message's context (first wins ties)."""
    decisions = [policy.decide_request(c, body) for c in ctxs]
    return max(decisions, key=lambda d: SEVERITY[d.action])


def may_call(policy: Policy, ctx: FlowContext, tool: str) -> bool:
    """Whether a `tools/call` of `tool` by this caller would pass the rules (allowed, held or
    redacted: not blocked). Body conditions see an empty body: listing is about the tool."""
    call = dataclasses.replace(ctx, method="POST", mcp_method=TOOLS_CALL, mcp_tool=tool)
    return policy.decide_request(call, BodyViews.of_text("")).action is not Action.BLOCK


@dataclasses.dataclass
class McpFlow:
    """What the Policy addon knows of one MCP flow (`FlowState.mcp`): the request's messages,
    the judge of a `tools/list` answer, and the filter StreamRedaction applies to the whole
    redacted events a streamed answer releases (refused and changed tools withheld)."""

    body: McpBody | None = None
    judge: ToolListJudge | None = None
    stream_filter: Callable[[bytes, bool], bytes] | None = None


@dataclasses.dataclass
class ToolListJudge:
    """Judges the entries of `tools/list` answers (`keep`) and remembers what it saw.

    `pins`: the destination's pinned fingerprints (tool -> fingerprint), or None when pinning is
    off. After judging: `new` holds tools seen for the first time (to pin), `changed` tools whose
    definition differs from their pin (withheld), `refused` tools the caller may not call."""

    allowed: Callable[[str], bool]
    pins: Mapping[str, str] | None = None
    listed: int = 0
    new: dict[str, str] = dataclasses.field(default_factory=dict)
    changed: dict[str, str] = dataclasses.field(default_factory=dict)
    refused: list[str] = dataclasses.field(default_factory=list)
    _seen: dict[str, str] = dataclasses.field(default_factory=dict)

    def keep(self, tool: McpTool) -> bool:
        self.listed += 1
        name = tool.name
        if not self.allowed(name):
            self.refused.append(name)
            return False
        if self.pins is None:
            return True
        fingerprint = tool.fingerprint()
        seen = self._seen.setdefault(name, fingerprint)
        if seen != fingerprint:  # one list, two definitions of one name: neither is trusted
            self.new.pop(name, None)
            self.changed[name] = fingerprint
            return False
        pinned = self.pins.get(name)
        if pinned is None:
            self.new[name] = fingerprint
            return True
        if pinned != fingerprint:
            self.changed[name] = fingerprint
            return False
        return True

    @property
    def judged(self) -> bool:
        return self.listed > 0

    def facts(self) -> dict[str, object]:
        """What to record (names only, never descriptions)."""
        out: dict[str, object] = {"tools_listed": self.listed}
        if self.refused:
            out["tools_refused"] = sorted(set(self.refused))
        if self.new:
            out["tools_pinned"] = sorted(self.new)
        if self.changed:
            out["tools_changed"] = sorted(self.changed)
        return out
