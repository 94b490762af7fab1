"""`python -m sluicegate sessions ...`: forensics on recorded sessions.

  keygen signing|seal PATH     new key pair: PATH (private, 0600) and PATH.pub (public)
  list                         sessions: identity, start, flows, size, sealed
  flows [filters]              flows across sessions, by identity/host/rule/decision/tool/time
  show FLOW_ID                 one flow: request, response, metadata (bodies with --bodies)
  verify [SESSION...]          check the session index, each session's hash chain and signatures,
                               and the audit log; says which session or flow was tampered with
  unseal FLOW_ID --private-key sealed pre-redaction bodies, with the auditor's private key

The recording directory comes from `--dir` or from a gateway config (`--config`), which also gives
`verify` the trusted public key. Session files are plain mitmproxy dumps: `mitmproxy -r FILE`,
`mitmweb -r FILE` and `mitmdump -nr FILE` open them too.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sluicegate.recording import audit as audit_mod
from sluicegate.recording import chain, sealing
from sluicegate.recording import index as index_mod
from sluicegate.recording import lock as recording_lock

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNSEALED = 0, 1, 2, 3


class UsageError(Exception):
    pass


# -- shared helpers -------------------------------------------------------------------------------


def _directory(args: argparse.Namespace) -> Path:
    if args.dir:
        return Path(args.dir)
    section = _recording_section(args)
    return section.directory


def _recording_section(args: argparse.Namespace) -> Any:
    if not args.config:
        raise UsageError("pass --dir DIRECTORY or --config GATEWAY_CONFIG")
    from sluicegate.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as e:
        raise UsageError(f"cannot load {args.config}:\n{e}") from None
    if config.recording is None:
        raise UsageError(f"{args.config} has no `recording:` section")
    return config.recording


def _sessions(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise UsageError(f"no such recording directory: {directory}")
    return sorted(directory.glob("*/*.mitm"), key=lambda p: (p.name, p.parent.name))


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + chain.CHAIN_SUFFIX)


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_time(text: str) -> float:
    """An ISO 8601 time (UTC when no zone is given) or an age like `30m`, `2h`, `7d`."""
    m = _RELATIVE.match(text)
    if m:
        seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return datetime.datetime.now(datetime.UTC).timestamp() - seconds
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"not a time: {text!r} (use ISO 8601 or e.g. 30m, 2h, 7d)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def _iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_flows(path: Path) -> Iterator[Any]:
    """Flows of one session; a record cut short by a crash ends the file with a warning."""
    from mitmproxy import exceptions, io

    with path.open("rb") as f:
        try:
            yield from io.FlowReader(f).stream()
        except exceptions.FlowReadException:
            print(f"warning: {path}: unreadable data after the last flow", file=sys.stderr)


def _sg(flow: Any) -> dict[str, Any]:
    sg = flow.metadata.get("sluicegate")
    return sg if isinstance(sg, dict) else {}


def _identity(sg: dict[str, Any]) -> str:
    caller = sg.get("caller")
    if isinstance(caller, dict) and caller.get("subject"):
        return str(caller["subject"])
    return "anonymous"


def _summary(flow: Any, session: str, index: int) -> dict[str, Any]:
    from sluicegate.mitm.snapshot import decision, rules_fired

    sg = _sg(flow)
    req, resp = flow.request, flow.response
    return {
        "time": _iso(req.timestamp_start),
        "timestamp": req.timestamp_start,
        "session": session,
        "index": index,
        "flow_id": flow.id,
        "identity": _identity(sg),
        "route": sg.get("route"),
        "method": req.method,
        "host": req.host,
        "path": req.path,
        "status": resp.status_code if resp is not None else None,
        "decision": decision(sg, flow.error is not None),
        "rules": rules_fired(sg),
        "error": flow.error.msg if flow.error is not None else None,
        "reason": _reason(sg, flow),
        **_mcp_summary(sg),
    }


def _mcp_summary(sg: dict[str, Any]) -> dict[str, Any]:
    """MCP method and tool(s) of a flow (`metadata["sluicegate"]["mcp"]`), when it has them."""
    facts = sg.get("mcp")
    if not isinstance(facts, dict):
        return {}
    tools = facts.get("tools") or ([facts["tool"]] if isinstance(facts.get("tool"), str) else [])
    out: dict[str, Any] = {"mcp_method": facts.get("method"), "mcp_tools": list(tools)}
    if facts.get("tools_changed"):
        out["mcp_tools_changed"] = list(facts["tools_changed"])
    return out


def _reason(sg: dict[str, Any], flow: Any) -> str | None:
    """Why the flow was not simply allowed: the refusal, the policy rule that acted (and who
    approved or denied it), or the error."""
    reasons = []
    refusal = sg.get("refusal")
    if isinstance(refusal, dict) and refusal.get("code"):
        reasons.append(f"{refusal['code']}: {refusal.get('message', '')}".rstrip(": "))
    policy = sg.get("policy")
    if isinstance(policy, dict):
        for phase in ("request", "response"):
            facts = policy.get(phase)
            if isinstance(facts, dict) and facts.get("action") not in (None, "allow"):
                text = f"{phase} rule {facts.get('rule')} ({facts.get('action')})"
                approval = facts.get("approval")
                if isinstance(approval, dict) and approval.get("outcome"):
                    text += f" {approval['outcome']} by {approval.get('by')}"
                    if approval.get("reason"):
                        text += f": {approval['reason']}"
                reasons.append(text)
    if flow.error is not None and not reasons:
        reasons.append(f"error: {flow.error.msg}")
    return "; ".join(reasons) or None


def _all_flows(directory: Path) -> Iterator[tuple[str, int, Any]]:
    for path in _sessions(directory):
        relative = str(path.relative_to(directory))
        for index, flow in enumerate(_read_flows(path)):
            yield relative, index, flow


def _find_flow(directory: Path, flow_id: str) -> tuple[str, int, Any]:
    matches = [(s, i, f) for s, i, f in _all_flows(directory) if f.id.startswith(flow_id)]
    if not matches:
        raise UsageError(f"no flow {flow_id!r} in {directory}")
    if len({f.id for _, _, f in matches}) > 1:
        raise UsageError(f"{flow_id!r} is ambiguous: give more of the flow id")
    return matches[0]


# -- commands -----------------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.exists() and not args.force:
        raise UsageError(f"{path} exists (use --force to replace it)")
    if args.kind == "signing":
        signer = chain.Signer.generate()
        private, public = signer.private_pem(), signer.public_pem()
        label = f"Ed25519 signing key {signer.key_id}"
    else:
        private, public = sealing.generate_keypair()
        label = f"X25519 auditor key {sealing.key_id(sealing.load_public_key(public))}"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    public_path = path.with_name(path.name + ".pub")
    public_path.write_bytes(public)
    print(f"{label}: private {path}, public {public_path}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    directory = _directory(args)
    since = parse_time(args.since) if args.since else None
    rows = []
    for path in _sessions(directory):
        sidecar = _sidecar(path)
        info = chain.summarize(sidecar.read_text()) if sidecar.exists() else {}
        opening = info.get("opening") or {}
        created = opening.get("created")
        if args.identity and not fnmatch.fnmatch(str(opening.get("identity")), args.identity):
            continue
        if since is not None and (created is None or created < since):
            continue
        seal = info.get("seal")
        rows.append(
            {
                "session": str(path.relative_to(directory)),
                "identity": opening.get("identity", "?"),
                "created": _iso(created),
                "flows": info.get("flows", 0),
                "bytes": path.stat().st_size,
                "sealed": seal.get("reason") if seal else None,
            }
        )
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return EXIT_OK
    print(f"{'CREATED':20} {'FLOWS':>5} {'BYTES':>10} {'SEALED':9} {'IDENTITY':24} SESSION")
    for r in rows:
        sealed = r["sealed"] or "open"
        print(
            f"{r['created']:20} {r['flows']:>5} {r['bytes']:>10} {sealed:9} "
            f"{r['identity']:24} {r['session']}"
        )
    return EXIT_OK


def cmd_flows(args: argparse.Namespace) -> int:
    directory = _directory(args)
    since = parse_time(args.since) if args.since else None
    until = parse_time(args.until) if args.until else None
    count = 0
    if not args.json:
        print(f"{'TIME':20} {'FLOW':8} {'STATUS':>6} {'DECISION':10} {'IDENTITY':20} REQUEST")
    for session, index, flow in _all_flows(directory):
        row = _summary(flow, session, index)
        if not _matches(row, args, since, until):
            continue
        count += 1
        if args.json:
            print(json.dumps(row))
            continue
        status = row["status"] if row["status"] is not None else "-"
        rules = ",".join(f"{k}x{v}" for k, v in sorted(row["rules"].items()))
        if row.get("mcp_method"):
            rules += (" " if rules else "") + " ".join(
                [row["mcp_method"], *row.get("mcp_tools", [])]
            )
        print(
            f"{row['time']:20} {row['flow_id'][:8]:8} {status!s:>6} {row['decision']:10} "
            f"{row['identity']:20} {row['method']} {row['host']}{row['path']}"
            + (f"  [{rules}]" if rules else "")
            + (f"\n{'':20} reason: {row['reason']}" if row["reason"] else "")
        )
    if not args.json:
        print(f"{count} flow(s)", file=sys.stderr)
    return EXIT_OK


def _matches(row: dict[str, Any], args: argparse.Namespace, since: Any, until: Any) -> bool:
    if args.identity and not fnmatch.fnmatch(row["identity"], args.identity):
        return False
    if args.host and not fnmatch.fnmatch(row["host"], args.host):
        return False
    if args.rule and not any(fnmatch.fnmatch(rule, args.rule) for rule in row["rules"]):
        return False
    tool = getattr(args, "tool", None)
    if tool and not any(fnmatch.fnmatchcase(t, tool) for t in row.get("mcp_tools", ())):
        return False
    if args.decision and row["decision"] != args.decision:
        return False
    if args.status is not None and row["status"] != args.status:
        return False
    if since is not None and row["timestamp"] < since:
        return False
    return until is None or row["timestamp"] <= until


def cmd_show(args: argparse.Namespace) -> int:
    session, index, flow = _find_flow(_directory(args), args.flow_id)
    row = _summary(flow, session, index)
    print(f"flow {flow.id}  ({session} #{index})")
    print(f"identity {row['identity']}  route {row['route']}  decision {row['decision']}")
    for label, message in (("request", flow.request), ("response", flow.response)):
        if message is None:
            continue
        if label == "request":
            target = f"{message.scheme}://{message.host}:{message.port}{message.path}"
            print(f"\n> {message.method} {target} {message.http_version}")
        else:
            print(f"\n< {message.http_version} {message.status_code} {message.reason}")
        for name, value in message.headers.items(multi=True):
            print(f"  {name}: {value}")
        body = message.raw_content or b""
        if args.bodies and body:
            shown = body[: args.max_body].decode("utf-8", "replace")
            print("\n" + shown + ("\n[... truncated]" if len(body) > args.max_body else ""))
        elif body:
            print(f"  ({len(body)} bytes of body; --bodies shows it)")
    if flow.error is not None:
        print(f"\nerror: {flow.error.msg}")
    print("\nmetadata:")
    print(json.dumps(_printable(flow.metadata), indent=2, sort_keys=True))
    return EXIT_OK


def _printable(value: Any) -> Any:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {k: _printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable(v) for v in value]
    return value


def cmd_verify(args: argparse.Namespace) -> int:
    trusted = None
    if args.public_key:
        trusted = chain.load_public_key(Path(args.public_key).read_bytes())
    elif args.config:
        trusted = chain.Signer.from_pem(_recording_section(args).signing_key.read()).public_key
    explicit = [Path(p) for p in args.sessions]
    if args.dir or args.config:
        directory = _directory(args)
    elif explicit:
        directory = explicit[0].resolve().parent.parent
    else:
        raise UsageError("pass --dir DIRECTORY or --config GATEWAY_CONFIG")
    paths = explicit or _sessions(directory)
    report = Report()
    indexed = None if args.no_index else index_mod.verify_index(directory, trusted)
    if indexed is None and not args.no_index:
        # Files handed over one by one (copied out for a look) need not sit in a recording
        # directory; a recording directory without its index is a finding.
        report.add(
            chain.Finding(
                "no_index",
                f"{directory} has no session index ({index_mod.INDEX_DIR}/): sessions could have "
                "been deleted unnoticed (recordings made before the index existed: --no-index "
                "checks each session alone)",
                fatal=not explicit,
            )
        )
    live = recording_lock.holder(directory)
    verdicts: dict[str, chain.Verdict] = {}
    for path in paths:
        relative = _relative(path, directory)
        verdict = verify_session(path, trusted)
        located = indexed is not None or not explicit
        if located and verdict.session is not None and verdict.session != relative:
            verdict.findings.append(
                chain.Finding(
                    "misplaced",
                    f"recorded as {verdict.session}: this file was moved or copied here",
                )
            )
        verdicts[relative] = verdict
    per_session: dict[str, list[chain.Finding]] = {}
    if indexed is not None:
        per_session = index_mod.check_sessions(indexed, verdicts)
        _print_runs(indexed)
        for finding in indexed.findings:
            report.add(finding)
        for finding in per_session.pop("", []):
            if explicit and finding.kind == "session_missing":
                continue  # only the sessions asked about
            report.add(finding)
    for relative, verdict in verdicts.items():
        findings = verdict.findings + per_session.get(relative, [])
        status = "failed" if any(f.fatal for f in findings) else verdict.status
        if status == "unsealed" and any(f.kind == "session_crashed" for f in findings):
            status = "crashed"
        if status == "unsealed" and live is not None:
            status = "live"
        print(f"{status.upper():9} {relative}  ({verdict.flows_in_chain} flow(s))")
        for finding in findings:
            print(f"          {'' if finding.fatal else 'warning: '}{finding}")
        if status == "live" and live is not None:
            print(
                f"          live: the gateway recording it is running (pid {live.get('pid')} on "
                f"{live.get('host')}); it seals the session when it closes it"
            )
        elif status == "unsealed":
            print(
                "          not sealed, and no gateway is recording to this directory: the gateway "
                "was killed (a later start attests the crash), or the session was cut"
            )
        report.status(status)
    if indexed is not None and not explicit:
        _verify_audit(args, directory, indexed, verdicts, report)
    for finding in report.findings:
        print(f"{'FAILED' if finding.fatal else 'WARNING':9} {finding}")
    if trusted is None:
        print(
            "warning: checked against the key embedded in each file; pass --public-key or "
            "--config to prove who signed it",
            file=sys.stderr,
        )
    return report.exit_code


class Report:
    """Directory-level findings and the worst status seen."""

    def __init__(self) -> None:
        self.findings: list[chain.Finding] = []
        self.failed = False
        self.unsealed = False

    def add(self, finding: chain.Finding) -> None:
        self.findings.append(finding)
        self.failed = self.failed or finding.fatal

    def fatal(self, kind: str, message: str) -> None:
        self.add(chain.Finding(kind, message))

    def status(self, status: str) -> None:
        self.failed = self.failed or status == "failed"
        self.unsealed = self.unsealed or status in ("unsealed", "crashed", "live")

    @property
    def exit_code(self) -> int:
        if self.failed:
            return EXIT_FAILED
        return EXIT_UNSEALED if self.unsealed else EXIT_OK


def _relative(path: Path, directory: Path) -> str:
    try:
        return str(path.resolve().relative_to(directory.resolve()))
    except ValueError:
        return str(path)


def _print_runs(indexed: index_mod.IndexVerdict) -> None:
    for run in indexed.runs:
        state = {
            "sealed": "ended cleanly",
            "crashed": "stopped without closing (a later start found it open)",
            "open": "open: still running, or killed and not started since",
        }[run.state]
        gateway = run.opening.get("gateway", "?")
        print(f"{'RUN':9} {run.name}  (gateway {gateway}, {run.lines} index line(s); {state})")


def _audit_files(
    args: argparse.Namespace, directory: Path, indexed: index_mod.IndexVerdict
) -> list[Path]:
    """--audit-log, else the config's, else where the runs said they wrote it (else
    DIR/audit.jsonl); with rotated copies NAME.1, NAME.2... beside it, oldest first."""
    if args.audit_log:
        return [Path(p) for p in args.audit_log]
    if args.config:
        logs = [_recording_section(args).audit_log_path]
    else:
        named = [run.opening.get("audit_log") for run in indexed.runs]
        logs = [directory / p for p in dict.fromkeys(named) if isinstance(p, str)]
        logs = logs or [directory / "audit.jsonl"]
    files: list[Path] = []
    for path in logs:
        rotated = sorted(
            (p for p in path.parent.glob(f"{path.name}.*") if p.suffix.lstrip(".").isdigit()),
            key=lambda p: -int(p.suffix.lstrip(".")),
        )
        files += [*rotated, path] if path.exists() else rotated
    return files


def _verify_audit(
    args: argparse.Namespace,
    directory: Path,
    indexed: index_mod.IndexVerdict,
    verdicts: dict[str, chain.Verdict],
    report: Report,
) -> None:
    files = _audit_files(args, directory, indexed)
    lines: list[bytes] = []
    for path in files:
        lines += path.read_bytes().splitlines()
    runs = audit_mod.signed_runs(indexed.runs)
    anchors = {
        (str(v.session), index): digest
        for v in verdicts.values()
        for index, digest in v.audit.items()
    }
    session_runs = {name: s.run for name, s in indexed.sessions.items()}
    findings, checked = audit_mod.verify_audit(lines, runs, anchors, session_runs)
    verdict = "tampered with" if any(f.fatal for f in findings) else "consistent"
    names = ", ".join(str(p) for p in files) or "no audit log found"
    print(f"{'AUDIT':9} {names}  ({checked} line(s), {verdict})")
    for finding in findings:
        report.add(finding)
        if finding.kind == "audit_unsigned_tail":
            report.unsealed = True  # a run killed (or running): consistent, not sealed


def verify_session(path: Path, trusted: Any) -> chain.Verdict:
    sidecar = _sidecar(path)
    if not sidecar.exists():
        finding = chain.Finding("no_chain", f"{sidecar.name} is missing")
        return chain.Verdict(None, 0, 0, False, None, False, [finding])
    return chain.verify(
        path.read_bytes(), sidecar.read_text(), trusted_key=trusted, record_id=_record_id
    )


def _record_id(record: bytes) -> str | None:
    from mitmproxy.io import tnetstring

    state = tnetstring.loads(record)
    if isinstance(state, dict):
        flow_id = state.get("id", state.get(b"id"))
        return flow_id.decode() if isinstance(flow_id, bytes) else flow_id
    return None


def cmd_unseal(args: argparse.Namespace) -> int:
    from sluicegate.mitm.snapshot import seal_context

    _, _, flow = _find_flow(_directory(args), args.flow_id)
    sealed = _sg(flow).get("sealed")
    if not isinstance(sealed, dict):
        raise UsageError(f"flow {flow.id} has no sealed originals")
    private = sealing.load_private_key(Path(args.private_key).read_bytes())
    if sealed.get("key_id") != sealing.key_id(private.public_key()):
        raise UsageError(f"flow {flow.id} was sealed to key {sealed.get('key_id')}, not this one")
    parts = [args.part] if args.part else [p for p in ("request", "response") if p in sealed]
    chunks = []
    for part in parts:
        if part not in sealed:
            raise UsageError(f"flow {flow.id} has no sealed {part}")
        original = sealing.unseal(private, sealed[part], seal_context(flow.id, part))
        if len(parts) > 1:
            chunks.append(f"--- original {part} ({len(original)} bytes) ---\n".encode())
            original += b"\n"
        chunks.append(original)
    if args.out is None:
        sys.stdout.buffer.write(b"".join(chunks))
    else:  # originals are sensitive: readable by the auditor only
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(chunks))
    return EXIT_OK


# -- argument parsing -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sluicegate sessions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def with_source(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--dir", help="recording directory")
        p.add_argument("--config", help="gateway config (its recording section)")
        return p

    keygen = sub.add_parser("keygen", help="generate a signing or auditor key pair")
    keygen.add_argument("kind", choices=["signing", "seal"])
    keygen.add_argument("path", help="private key file to write (public: PATH.pub)")
    keygen.add_argument("--force", action="store_true")
    keygen.set_defaults(run=cmd_keygen)

    listing = with_source(sub.add_parser("list", help="list sessions"))
    listing.add_argument("--identity", help="caller subject (glob)")
    listing.add_argument("--since", help="ISO time or age (30m, 2h, 7d)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=cmd_list)

    flows = with_source(sub.add_parser("flows", help="filter flows across sessions"))
    flows.add_argument("--identity", help="caller subject (glob; `anonymous` for none)")
    flows.add_argument("--host", help="upstream host (glob)")
    flows.add_argument("--rule", help="a rule that fired (glob)")
    flows.add_argument("--decision", help="allowed, blocked, held, approved, denied, refused...")
    flows.add_argument("--tool", help="an MCP tool called (glob)")
    flows.add_argument("--status", type=int, help="response status code")
    flows.add_argument("--since", help="ISO time or age (30m, 2h, 7d)")
    flows.add_argument("--until", help="ISO time or age")
    flows.add_argument("--json", action="store_true", help="one JSON object per line")
    flows.set_defaults(run=cmd_flows)

    show = with_source(sub.add_parser("show", help="show one flow"))
    show.add_argument("flow_id", help="flow id (or a unique prefix)")
    show.add_argument("--bodies", action="store_true", help="print bodies")
    show.add_argument("--max-body", type=int, default=4096)
    show.set_defaults(run=cmd_show)

    verify = with_source(sub.add_parser("verify", help="verify hash chains and signatures"))
    verify.add_argument("sessions", nargs="*", help="session files (default: all)")
    verify.add_argument("--public-key", help="the gateway's Ed25519 public key (PEM)")
    verify.add_argument(
        "--audit-log",
        action="append",
        help="audit log file(s), oldest first (default: the config's, or DIR/audit.jsonl, with "
        "rotated copies NAME.N beside it)",
    )
    verify.add_argument(
        "--no-index",
        action="store_true",
        help="check each session alone (recordings made before the session index existed)",
    )
    verify.set_defaults(run=cmd_verify)

    unseal = with_source(sub.add_parser("unseal", help="reveal sealed pre-redaction bodies"))
    unseal.add_argument("flow_id")
    unseal.add_argument("--private-key", required=True, help="auditor's X25519 private key")
    unseal.add_argument("--part", choices=["request", "response"])
    unseal.add_argument("--out", help="write here instead of stdout")
    unseal.set_defaults(run=cmd_unseal)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (UsageError, chain.ChainKeyError, sealing.SealError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, UsageError) else EXIT_FAILED
