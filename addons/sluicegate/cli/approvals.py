"""`python -m sluicegate approvals list|show|approve|deny|grants|revoke|history`: decide on flows
held by policy, and manage the grants approvals made; `mcp-pins|mcp-accept`: pinned MCP tools.

Talks to the gateway's approvals control API (with `state.backend: redis`, any replica's API
sees and decides every replica's approvals). Where it is and the admin token come from, first
match wins:
  URL:   --url, $SLUICEGATE_APPROVALS_URL, the config's `approvals.listen_host/listen_port`
  token: --token-file, $SLUICEGATE_ADMIN_TOKEN, the config's `approvals.admin_token`
  config: --config, $SLUICEGATE_CONFIG
Only the `approvals:` section of the config is read, so the approver's shell does not need the
upstream credentials the rest of the config refers to. The token is never taken on the command
line (it would show in `ps`).

Exit codes: 0 done, 1 the gateway refused (unknown id, bad input), 2 usage or config problem,
3 not authorized, 4 gateway unreachable.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import getpass
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, TypeVar, cast

from sluicegate.config import ApprovalsSection
from sluicegate.config.schema import ConfigError, Parser, SecretRef, SecretUnavailable, read_yaml

T = TypeVar("T")


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        url, token = _endpoint(args)
        if args.action == "list":
            return _list(url, token, as_json=args.json)
        if args.action == "show":
            approval = urllib.parse.quote(args.id, safe="")
            shown = _call(url, token, "GET", f"/v1/approvals/{approval}")["approval"]
            print(json.dumps(shown, indent=2))
            return 0
        if args.action == "grants":
            return _grants(url, token, as_json=args.json)
        if args.action == "history":
            return _history(url, token, args.limit, as_json=args.json)
        if args.action == "mcp-pins":
            route = urllib.parse.quote(args.route, safe="")
            pins = _call(url, token, "GET", f"/v1/mcp/pins?route={route}")
            if args.json:
                print(json.dumps(pins, indent=2))
                return 0
            for tool, fingerprint in sorted(pins["pinned"].items()):
                changed = pins["changed"].get(tool)
                note = f"  CHANGED to {changed} (not accepted)" if changed else ""
                print(f"{tool}  {fingerprint}{note}")
            for tool in sorted(set(pins["changed"]) - set(pins["pinned"])):
                print(f"{tool}  (not pinned)  CHANGED to {pins['changed'][tool]}")
            return 0
        body: dict[str, Any] = {"approver": args.approver, "reason": args.reason or ""}
        if args.action == "mcp-accept":
            body.update(route=args.route, tool=args.tool)
            result = _call(url, token, "POST", "/v1/mcp/pins/accept", body)
            if args.json:
                print(json.dumps(result, indent=2))
            else:
                print(f"{result['tool']} on {result['route']}: {result['fingerprint']} accepted")
            return 0
        if args.action == "revoke":
            grant = urllib.parse.quote(args.id, safe="")
            result = _call(url, token, "POST", f"/v1/grants/{grant}/revoke", body)
            if args.json:
                print(json.dumps(result, indent=2))
            else:
                print(f"grant {result['revoked']['id']}: revoked by {result['by']}")
            return 0
        if args.action == "approve" and args.grant_minutes is not None:
            body["grant_minutes"] = args.grant_minutes
        approval = urllib.parse.quote(args.id, safe="")
        result = _call(url, token, "POST", f"/v1/approvals/{approval}/{args.action}", body)
    except SecretUnavailable as e:
        print(f"error: admin token: {e}", file=sys.stderr)
        return 2
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        minutes = result.get("grant_minutes")
        extra = f", grant {minutes:g} min" if minutes else ""
        print(f"{result['id']}: {result['outcome']} by {result['by']}{extra}")
    return 0


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="gateway config file (default: $SLUICEGATE_CONFIG)")
    common.add_argument("--url", help="control API URL, e.g. http://127.0.0.1:8790")
    common.add_argument("--token-file", help="file holding the admin token")
    common.add_argument("--json", action="store_true", help="print JSON")

    parser = argparse.ArgumentParser(
        prog="python -m sluicegate approvals",
        description="List, approve or deny flows held by the gateway's policy.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", parents=[common], help="pending approvals, oldest first")
    show = sub.add_parser("show", parents=[common], help="one approval, pending or decided")
    show.add_argument("id", help="approval id")
    sub.add_parser("grants", parents=[common], help="active grants")
    pins = sub.add_parser("mcp-pins", parents=[common], help="pinned MCP tools of a route")
    pins.add_argument("--route", required=True, help="the MCP server's route")
    history = sub.add_parser("history", parents=[common], help="decisions, newest first")
    history.add_argument("--limit", type=int, default=20, help="how many (1-1000)")
    for action, text in (
        ("approve", "let a held flow pass"),
        ("deny", "refuse a held flow"),
        ("revoke", "end a grant now (on every replica)"),
        ("mcp-accept", "accept the changed definition of an MCP tool as its new pin"),
    ):
        p = sub.add_parser(action, parents=[common], help=text)
        if action == "mcp-accept":
            p.add_argument("tool", help="tool name (see `mcp-pins`)")
        else:
            p.add_argument(
                "id",
                help="grant id (see `grants`)"
                if action == "revoke"
                else "approval id (see `list`)",
            )
        p.add_argument(
            "--reason",
            help="why (recorded; required unless the gateway's approvals.require_reason is off)",
        )
        p.add_argument(
            "--approver",
            default=_default_approver(),
            help="who decides (default: your user name)",
        )
        if action == "mcp-accept":
            p.add_argument("--route", required=True, help="the MCP server's route")
        if action == "approve":
            p.add_argument(
                "--grant-minutes",
                type=float,
                help="also let the same caller pass this rule on this route for N minutes",
            )
    return parser


def _default_approver() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _endpoint(args: argparse.Namespace) -> tuple[str, str]:
    url = args.url or os.environ.get("SLUICEGATE_APPROVALS_URL")
    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            raise CliError(f"cannot read token file {args.token_file}", 2) from None
    token = token or os.environ.get("SLUICEGATE_ADMIN_TOKEN", "").strip() or None
    if url is None or token is None:
        section = _section(args.config or os.environ.get("SLUICEGATE_CONFIG"))
        if url is None:
            host = section.get("listen_host", str)
            port = section.get("listen_port", int)
            url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        if token is None:
            token = section.get("admin_token", SecretRef).read()
    return url.rstrip("/"), token


class _Section:
    """Single keys of the config's `approvals:` section, validated like the gateway does.

    Only what the CLI needs is parsed, so a secret it does not use (the webhook URL, the
    upstream credentials elsewhere in the file) need not be available in the approver's shell.
    """

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self.defaults = {f.name: f.default for f in dataclasses.fields(ApprovalsSection)}

    def get(self, key: str, tp: type[T]) -> T:
        default = self.defaults.get(key, dataclasses.MISSING)
        if key not in self.data and default is not dataclasses.MISSING:
            # The dataclass default of field `key`, whose type the caller passes as `tp`.
            return cast(T, default)
        parser = Parser(self.path)
        value = parser.parse(tp, self.data.get(key), f"approvals.{key}")
        if parser.problems or value is None:
            raise CliError("\n".join(str(p) for p in parser.problems), 2)
        return value


def _section(config: str | None) -> _Section:
    if not config:
        raise CliError("no gateway: pass --url (or --config, or set SLUICEGATE_CONFIG)", 2)
    path = Path(config).expanduser().resolve()
    try:
        data = read_yaml(path)
    except ConfigError as e:
        raise CliError(str(e), 2) from None
    section = data.get("approvals") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise CliError(f"{path}: no `approvals:` section", 2)
    return _Section(path, section)


def _call(url: str, token: str, method: str, path: str, body: Any = None) -> dict[str, Any]:
    request = urllib.request.Request(
        url + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
    )
    # Never through a proxy: HTTPS_PROXY may well point at the gateway itself.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("message", "")
        except ValueError:
            message = ""
        code = 3 if e.code == 401 else 1
        raise CliError(f"the gateway answered {e.code}: {message}", code) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise CliError(f"cannot reach the approvals API at {url}: {reason}", 4) from None


def _grants(url: str, token: str, *, as_json: bool) -> int:
    grants = _call(url, token, "GET", "/v1/grants")["grants"]
    if as_json:
        print(json.dumps(grants, indent=2))
        return 0
    if not grants:
        print("no active grants")
        return 0
    for g in grants:
        who = g["identity"].split("|", 1)[-1]
        print(
            f"{g['id']}  {who}  rule={g['rule']}  {g['destination']}  until {g['expires_at']}  "
            f"(approval {g['approval_id']} by {g['by']})"
        )
    return 0


def _history(url: str, token: str, limit: int, *, as_json: bool) -> int:
    entries = _call(url, token, "GET", f"/v1/history?limit={limit}")["history"]
    if as_json:
        print(json.dumps(entries, indent=2))
        return 0
    if not entries:
        print("no decisions yet")
        return 0
    for e in entries:
        what = e["approval_id"] if e["kind"] == "decision" else f"grant {e['grant_id']}"
        request = e.get("request") or {}
        where = f"  {request.get('method', '')} {request.get('path', '')}" if request else ""
        by = f" by {e['by']}" if e["by"] else ""
        reason = f" ({e['reason']})" if e["reason"] else ""
        print(f"{e['at']}  {what}  {e['outcome']}{by}{reason}{where}")
    return 0


def _list(url: str, token: str, *, as_json: bool) -> int:
    approvals = _call(url, token, "GET", "/v1/approvals")["approvals"]
    if as_json:
        print(json.dumps(approvals, indent=2))
        return 0
    if not approvals:
        print("no pending approvals")
        return 0
    now = datetime.datetime.now(datetime.UTC)
    for a in approvals:
        expires = datetime.datetime.fromisoformat(a["expires_at"])
        left = max(0, int((expires - now).total_seconds()))
        who = a["subject"] or "anonymous"
        where = a["route"] or f"{a['host']}:{a['port']}"
        attempts = f", {a['attempts']} attempts" if a.get("attempts", 1) > 1 else ""
        print(
            f"{a['id']}  {a['phase']:<8}  rule={a['rule']}  {who}  "
            f"{a['method']} {where}{a['path']}  ({left}s left{attempts})"
        )
        if a["message"]:
            print(f"          {a['message']}")
    return 0


__all__ = ["main"]
