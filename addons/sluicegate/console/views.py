"""Server-rendered HTML of the console. Every value from a flow, a caller or an approver is
escaped (`e`), pages load only the package's own CSS and JS (the CSP forbids anything else), and
state changes are plain forms carrying the CSRF token.

Live regions carry `data-live` (the partial to fetch) and `data-topic` (the event that makes it
stale); their children carry `data-key`, so `console.js` merges a fresh partial into the page
without touching rows that are still there (an approver typing a reason keeps their text).
"""

from __future__ import annotations

import datetime
import html
import json
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sluicegate.console.recordings import FlowRecord, Overview, SessionInfo, text
from sluicegate.state import Approval, Grant, HistoryEntry

MAX_BODY_CHARS = 64 * 1024
_TAG = re.compile(
    r"\[(?:REDACTED:[A-Za-z0-9_.:-]{1,100}|credential:[A-Za-z0-9_.-]{1,100}|masked|"
    r"caller-token:[A-Za-z0-9_.-]{1,64}|sluicegate:dropped:[a-z_]{1,40})\]"
)

NOTICES = {
    "approved": ("ok", "Approved. The agent's request goes on."),
    "denied": ("ok", "Denied. The agent got a 403 with your reason."),
    "revoked": ("ok", "Grant revoked."),
    "reason_required": ("error", "A reason is required."),
    "bad_grant": ("error", "Grant minutes must be a number above 0 and within the maximum."),
    "unknown": ("error", "No such pending approval (decided, expired or cancelled already)."),
    "unknown_grant": ("error", "No such active grant."),
    "already": ("error", "Someone decided this approval already."),
    "state_unavailable": ("error", "The shared state is unavailable; nothing was changed."),
    "forbidden": ("error", "Your sign-in may view, not decide."),
    "signed_out": ("ok", "Signed out."),
}


def e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def q(value: str) -> str:
    return urllib.parse.quote(value, safe="/@")


def iso(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return ""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def tagged(text_value: str) -> str:
    """Escaped text with redaction tags and masks highlighted."""
    escaped = e(text_value)
    return _TAG.sub(lambda m: f'<mark class="tag">{m.group(0)}</mark>', escaped)


def _csrf(token: str) -> str:
    return f'<input type="hidden" name="csrf" value="{e(token)}">'


# -- the frame ----------------------------------------------------------------------------------


def page(
    title: str,
    body: str,
    *,
    user: Any = None,
    csrf: str = "",
    active: str = "",
    gateway: str = "",
    notice: str | None = None,
) -> str:
    nav = ""
    if user is not None:
        links = "".join(
            f'<a href="/console/{key}"{" class=active" if key == active else ""}>{label}</a>'
            for key, label in (
                ("approvals", "Approvals"),
                ("activity", "Activity"),
                ("sessions", "Sessions"),
            )
        )
        nav = (
            f'<nav>{links}</nav><div class="who"><span id="who">{e(user.by)}</span>'
            f'<form method="post" action="/console/signout">{_csrf(csrf)}'
            '<button class="link" id="signout">Sign out</button></form></div>'
        )
    flash = ""
    if notice in NOTICES:
        kind, message = NOTICES[notice]
        flash = f'<p class="notice {kind}" id="notice" data-notice="{e(notice)}">{e(message)}</p>'
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)} · sluicegate</title>"
        '<link rel="icon" href="/console/static/favicon.svg">'
        '<link rel="stylesheet" href="/console/static/console.css">'
        '<script src="/console/static/console.js" defer></script>'
        "</head><body>"
        f'<header><span class="brand">sluicegate</span><span class="gw">{e(gateway)}</span>'
        f"{nav}</header><main>{flash}{body}</main></body></html>"
    )


def signin(*, pre_token: str, error: str = "", oidc: bool = False, gateway: str = "") -> str:
    hint = (
        "the admin token, or a token from your identity provider if you are in an approvers group"
        if oidc
        else "the gateway's admin token"
    )
    body = (
        '<section class="signin"><h1>Sign in</h1>'
        + (f'<p class="notice error" id="signin-error">{e(error)}</p>' if error else "")
        + '<form method="post" action="/console/signin" id="signin-form">'
        f'<input type="hidden" name="pre" value="{e(pre_token)}">'
        f'<label>Token <input type="password" name="token" autocomplete="off" required '
        f'placeholder="{e(hint)}"></label>'
        '<label>Your name <input type="text" name="name" maxlength="80" '
        'placeholder="recorded with your decisions (admin token only)"></label>'
        '<button type="submit">Sign in</button></form>'
        '<p class="hint">The token is checked and forgotten; a session cookie keeps you signed '
        "in.</p></section>"
    )
    return page("Sign in", body, gateway=gateway)


def message_page(title: str, message: str, *, gateway: str = "") -> str:
    body = f'<section><h1>{e(title)}</h1><p id="message">{e(message)}</p>'
    body += '<p><a href="/console/signin">Sign in</a></p></section>'
    return page(title, body, gateway=gateway)


# -- approvals ----------------------------------------------------------------------------------


def approvals_page(
    pending: Sequence[Approval],
    grants: Sequence[Grant],
    history: Sequence[HistoryEntry],
    *,
    csrf: str,
    can_decide: bool,
    require_reason: bool,
    max_grant_minutes: float,
    now: float,
) -> str:
    return (
        "<section><h1>Pending approvals</h1>"
        '<ul class="cards" id="pending" data-live="/console/partials/pending" '
        'data-topic="approvals">'
        + pending_items(
            pending,
            csrf=csrf,
            can_decide=can_decide,
            require_reason=require_reason,
            max_grant_minutes=max_grant_minutes,
            now=now,
        )
        + "</ul></section>"
        "<section><h2>Active grants</h2>"
        '<table class="grid"><thead><tr><th>Identity</th><th>Destination</th><th>Rule</th>'
        "<th>Granted by</th><th>Expires</th><th></th></tr></thead>"
        '<tbody id="grants" data-live="/console/partials/grants" data-topic="approvals">'
        + grant_rows(grants, csrf=csrf, can_decide=can_decide)
        + "</tbody></table></section>"
        "<section><h2>Recent decisions</h2>"
        '<table class="grid"><thead><tr><th>When</th><th>Outcome</th><th>By</th>'
        "<th>Reason</th><th>Request</th></tr></thead>"
        '<tbody id="history" data-live="/console/partials/history" data-topic="approvals">'
        + history_rows(history)
        + "</tbody></table></section>"
    )


def pending_items(
    pending: Sequence[Approval],
    *,
    csrf: str,
    can_decide: bool,
    require_reason: bool,
    max_grant_minutes: float,
    now: float,
) -> str:
    if not pending:
        return '<li class="empty" data-key="empty">Nothing is waiting for a decision.</li>'
    return "".join(
        _pending_item(a, csrf, can_decide, require_reason, max_grant_minutes, now) for a in pending
    )


def _pending_item(
    a: Approval,
    csrf: str,
    can_decide: bool,
    require_reason: bool,
    max_grant_minutes: float,
    now: float,
) -> str:
    r = a.request
    groups = ", ".join(r.groups) or "-"
    preview = ""
    if r.preview:
        more = f" of {r.body_bytes} bytes" if r.body_bytes > len(r.preview.encode()) else ""
        preview = (
            f'<details class="preview" open><summary>Body (redacted{e(more)})</summary>'
            f'<pre class="body">{tagged(r.preview)}</pre></details>'
        )
    elif r.body_bytes:
        preview = f'<p class="muted">Body of {r.body_bytes} bytes (no preview kept).</p>'
    form = ""
    if can_decide:
        required = " required" if require_reason else ""
        form = (
            f'<form method="post" action="/console/approvals/{e(a.id)}/decide" class="decide">'
            f"{_csrf(csrf)}"
            f'<input type="text" name="reason" maxlength="500" placeholder="Reason"{required}>'
            f'<input type="number" name="grant_minutes" min="1" max="{max_grant_minutes:g}" '
            'step="any" placeholder="Grant minutes (optional)">'
            '<button name="outcome" value="approve" class="approve">Approve</button>'
            '<button name="outcome" value="deny" class="deny">Deny</button></form>'
        )
    waited = max(0, int(now - a.created_at))
    return (
        f'<li class="card approval" data-key="{e(a.id)}" data-approval="{e(a.id)}">'
        f'<div class="head"><span class="rule">{e(r.rule_id)}</span>'
        f'<span class="req"><b>{e(r.method)}</b> {e(r.host)}:{e(r.port)}{e(r.path)}</span>'
        f'<span class="waited">waiting <time data-since="{a.created_at:.0f}">{waited} s</time>'
        "</span></div>"
        f'<p class="message">{e(r.message) or "<i>no message</i>"}</p>'
        '<dl class="facts">'
        f"<dt>Caller</dt><dd class=caller>{e(r.subject or 'anonymous')}</dd>"
        f"<dt>Groups</dt><dd>{e(groups)}</dd>"
        f"<dt>Route</dt><dd>{e(r.route or 'unrouted')}</dd>"
        f"<dt>Phase</dt><dd>{e(r.phase)}</dd>"
        f"<dt>Patterns</dt><dd>{e(', '.join(r.patterns) or '-')}</dd>"
        f"<dt>Attempts</dt><dd>{a.attempts} ({a.waiting} waiting)</dd>"
        f"<dt>Expires</dt><dd>{e(iso(a.expires_at))} UTC</dd>"
        f"<dt>Request id</dt><dd><code>{e(r.request_id)}</code></dd>"
        f"</dl>{preview}{form}</li>"
    )


def grant_rows(grants: Sequence[Grant], *, csrf: str, can_decide: bool) -> str:
    if not grants:
        return '<tr data-key="empty"><td colspan="6" class="empty">No active grants.</td></tr>'
    rows = []
    for g in grants:
        revoke = ""
        if can_decide:
            revoke = (
                f'<form method="post" action="/console/grants/{e(g.id)}/revoke" class="revoke">'
                f'{_csrf(csrf)}<input type="text" name="reason" maxlength="500" '
                'placeholder="Reason" required><button class="deny">Revoke</button></form>'
            )
        rows.append(
            f'<tr data-key="{e(g.id)}" data-grant="{e(g.id)}"><td>{e(g.key[0])}</td>'
            f"<td>{e(g.key[1])}</td><td>{e(g.key[2])}</td><td>{e(g.by)}</td>"
            f"<td>{e(iso(g.expires_at))}</td><td>{revoke}</td></tr>"
        )
    return "".join(rows)


def history_rows(history: Sequence[HistoryEntry]) -> str:
    if not history:
        return '<tr data-key="empty"><td colspan="5" class="empty">No decisions yet.</td></tr>'
    rows = []
    for h in history:
        r = h.request
        what = f"{r.method} {r.host}{r.path} ({r.rule_id})" if r is not None else ""
        if h.grant is not None:
            what = f"grant {h.grant.key[2]} for {h.grant.key[0]} on {h.grant.key[1]}"
        key = f"{h.kind}-{h.approval_id}-{h.grant_id}-{h.at}"
        rows.append(
            f'<tr data-key="{e(key)}"><td>{e(iso(h.at))}</td>'
            f'<td><span class="badge {e(h.outcome)}">{e(h.outcome)}</span></td>'
            f"<td>{e(h.by or '-')}</td><td>{e(h.reason)}</td><td>{e(what)}</td></tr>"
        )
    return "".join(rows)


# -- activity -----------------------------------------------------------------------------------

FILTERS = ("caller", "route", "decision", "rule")


def activity_page(entries: Sequence[Mapping[str, Any]], filters: Mapping[str, str]) -> str:
    query = urllib.parse.urlencode({k: v for k, v in filters.items() if v})
    fields = "".join(
        f'<label>{name.title()} <input type="text" name="{name}" value="{e(filters.get(name, ""))}"'
        f' placeholder="{"glob" if name != "decision" else "allowed, blocked, held..."}"></label>'
        for name in FILTERS
    )
    return (
        "<section><h1>Activity</h1>"
        f'<form method="get" action="/console/activity" class="filters" id="filters">{fields}'
        '<button type="submit">Filter</button> <a href="/console/activity">clear</a></form>'
        '<table class="grid activity"><thead><tr><th>Time (UTC)</th><th>Caller</th>'
        "<th>Route</th><th>Request</th><th>Status</th><th>Decision</th><th>Redactions</th>"
        "<th>Stream</th><th></th></tr></thead>"
        f'<tbody id="activity" data-live="/console/partials/activity?{e(query)}" '
        'data-topic="activity">' + activity_rows(entries) + "</tbody></table></section>"
    )


def activity_rows(entries: Sequence[Mapping[str, Any]]) -> str:
    if not entries:
        return '<tr data-key="empty"><td colspan="9" class="empty">No flows yet.</td></tr>'
    rows = []
    for entry in entries:
        redaction = entry.get("redaction") or {}
        counts = []
        for side in ("request", "response"):
            for rule, n in sorted((redaction.get(side) or {}).items()):
                counts.append(
                    f'<span class="count" title="{e(side)}">{"↑" if side == "request" else "↓"}'
                    f"{e(rule)} &times;{e(n)}</span>"
                )
        for rule in entry.get("policy_rules") or ():
            counts.append(f'<span class="count policy">policy {e(rule)}</span>')
        cut = entry.get("stream_cut")
        link = ""
        if entry.get("session") and isinstance(entry.get("index"), int):
            link = f'<a href="/console/flows/{q(str(entry["session"]))}/{entry["index"]}">open</a>'
        when = str(entry.get("time") or "")[:19].replace("T", " ")
        rows.append(
            f'<tr data-key="{e(entry.get("flow_id"))}" data-flow="{e(entry.get("flow_id"))}">'
            f"<td>{e(when)}</td><td>{e(entry.get('identity'))}</td>"
            f"<td>{e(entry.get('route') or '-')}</td>"
            f"<td><b>{e(entry.get('method'))}</b> {e(entry.get('host'))}{e(entry.get('path'))}"
            "</td>"
            f"<td>{e(entry.get('status') if entry.get('status') is not None else '-')}</td>"
            f'<td><span class="badge {e(entry.get("decision"))}">{e(entry.get("decision"))}'
            "</span></td>"
            f"<td>{''.join(counts) or '-'}</td>"
            f"<td>{f'<span class=cut>cut: {e(cut)}</span>' if cut else ''}</td>"
            f"<td>{link}</td></tr>"
        )
    return "".join(rows)


# -- sessions -----------------------------------------------------------------------------------


def sessions_page(overview: Overview | None) -> str:
    if overview is None:
        return (
            "<section><h1>Sessions</h1><p>Recording is not configured on this gateway "
            "(no <code>recording:</code> section).</p></section>"
        )
    rows = []
    for s in overview.sessions:
        findings = "; ".join(s.findings[:3]) + (" ..." if len(s.findings) > 3 else "")
        trust = "" if s.key_trusted else ' <span class="muted">(embedded key)</span>'
        rows.append(
            f'<tr data-key="{e(s.name)}"><td>{e(iso(s.created))}</td><td>{e(s.identity)}</td>'
            f"<td>{s.flows}</td><td>{s.size:,}</td><td>{e(s.sealed or 'open')}</td>"
            f'<td><span class="badge verify-{e(s.status)}">{e(s.status)}</span>{trust}'
            f'<div class="findings">{e(findings)}</div></td>'
            f'<td><a href="/console/sessions/{q(s.name)}">flows</a></td></tr>'
        )
    body = "".join(rows) or '<tr><td colspan="7" class="empty">No sessions recorded.</td></tr>'
    verdict = "tampered with" if overview.failed else "consistent"
    findings = "".join(f"<li>{e(f)}</li>" for f in overview.findings)
    runs = "".join(
        f"<li><code>{e(name)}</code> gateway {e(gateway)}: {e(state)}</li>"
        for name, state, gateway in overview.runs[-5:]
    )
    return (
        "<section><h1>Recorded sessions</h1>"
        '<p class="hint">Verified as <code>sessions verify</code> does, against the gateway\'s '
        "own key: each session's signed hash chain and where it sits, and the signed session "
        "index of every gateway run (deleted, cut, crashed and unindexed sessions). The audit "
        "log's own check: <code>python -m sluicegate sessions verify</code>.</p>"
        f'<p id="directory-verdict" data-failed="{str(overview.failed).lower()}">Directory: '
        f'<span class="badge verify-{"failed" if overview.failed else "ok"}">{verdict}</span>'
        "</p>"
        + (f'<ul class="findings" id="directory-findings">{findings}</ul>' if findings else "")
        + (f"<details><summary>Gateway runs</summary><ul>{runs}</ul></details>" if runs else "")
        + '<table class="grid" id="sessions"><thead><tr><th>Created (UTC)</th><th>Identity</th>'
        "<th>Flows</th><th>Bytes</th><th>Sealed</th><th>Verification</th><th></th></tr>"
        f"</thead><tbody>{body}</tbody></table></section>"
    )


def session_page(info: SessionInfo, flows: Sequence[FlowRecord], command: str) -> str:
    rows = []
    for f in flows:
        s = f.summary()
        rules = ", ".join(f"{k} x{v}" for k, v in sorted(s["rules"].items()))
        rows.append(
            f'<tr data-key="{e(s["flow_id"])}"><td>{s["index"]}</td>'
            f"<td>{e(iso(s['timestamp']))}</td>"
            f"<td><b>{e(s['method'])}</b> {e(s['host'])}{e(s['path'][:200])}</td>"
            f"<td>{e(s['status'] if s['status'] is not None else '-')}</td>"
            f'<td><span class="badge {e(s["decision"])}">{e(s["decision"])}</span></td>'
            f"<td>{e(rules) or '-'}</td>"
            f'<td><a href="/console/flows/{q(info.name)}/{f.index}">open</a></td></tr>'
        )
    return (
        f"<section><h1>Session {e(info.name)}</h1>"
        f"<p>Identity <b>{e(info.identity)}</b> · verification "
        f'<span class="badge verify-{e(info.status)}">{e(info.status)}</span> · '
        f'<a href="/console/download/{q(info.name)}">download .mitm</a></p>'
        f'<p>Open in mitmweb: <code class="cmd">{e(command)}</code></p>'
        '<table class="grid" id="flows"><thead><tr><th>#</th><th>Time (UTC)</th>'
        "<th>Request</th><th>Status</th><th>Decision</th><th>Rules</th><th></th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _headers(fields: Any) -> str:
    if not isinstance(fields, list) or not fields:
        return '<p class="muted">no headers</p>'
    rows = "".join(
        f"<tr><th>{e(text(name))}</th><td>{tagged(text(value))}</td></tr>"
        for name, value in (f[:2] for f in fields if isinstance(f, (list, tuple)) and len(f) >= 2)
    )
    return f'<table class="headers">{rows}</table>'


def _body(content: Any, fields: Any) -> str:
    if not isinstance(content, bytes) or not content:
        return '<p class="muted">no body</p>'
    body = content.decode("utf-8", "replace")
    printable = sum(c.isprintable() or c in "\r\n\t" for c in body[:4096])
    if printable < 0.9 * min(len(body), 4096):
        return f'<p class="muted">{len(content):,} bytes of binary body (not shown)</p>'
    more = ""
    if len(body) > MAX_BODY_CHARS:
        more = f'<p class="muted">... {len(body) - MAX_BODY_CHARS:,} more characters</p>'
        body = body[:MAX_BODY_CHARS]
    return f'<pre class="body">{tagged(body)}</pre>{more}'


def _policy(meta: Mapping[str, Any]) -> str:
    policy = meta.get("policy")
    if not isinstance(policy, dict) or not policy:
        return '<p class="muted">No policy rule acted on this flow.</p>'
    parts = []
    for phase in ("request", "response"):
        facts = policy.get(phase)
        if not isinstance(facts, dict):
            continue
        items = [
            f"<dt>Action</dt><dd class=action>{e(facts.get('action'))}</dd>",
            f"<dt>Rule</dt><dd class=rule>{e(facts.get('rule'))}</dd>",
        ]
        if facts.get("message"):
            items.append(f"<dt>Message</dt><dd>{e(facts.get('message'))}</dd>")
        if facts.get("patterns"):
            items.append(f"<dt>Patterns</dt><dd>{e(', '.join(map(str, facts['patterns'])))}</dd>")
        grant = facts.get("grant")
        if isinstance(grant, dict):
            items.append(
                f"<dt>Grant</dt><dd>{e(grant.get('id'))} by {e(grant.get('by'))}, expires "
                f"{e(grant.get('expires_at'))}</dd>"
            )
        approval = facts.get("approval")
        if isinstance(approval, dict):
            grant_minutes = approval.get("grant_minutes")
            items.append(
                '<dt>Approval</dt><dd class="trail">'
                f"<b class=outcome>{e(approval.get('outcome'))}</b> by "
                f"<span class=by>{e(approval.get('by') or '-')}</span> at {e(approval.get('at'))}"
                f" ({e(approval.get('reason') or 'no reason')})"
                + (f", grant {e(grant_minutes)} min" if grant_minutes else "")
                + f" · approval <code>{e(approval.get('id'))}</code></dd>"
            )
        if "redacted" in facts:
            items.append(f"<dt>Redacted</dt><dd>{e(facts['redacted'])}</dd>")
        parts.append(f"<h3>{phase.title()}</h3><dl class=facts>{''.join(items)}</dl>")
    for key in ("rate_limit", "decision", "rules"):
        if key in policy:
            parts.append(f"<p>{e(key)}: <code>{e(json.dumps(policy[key]))}</code></p>")
    return "".join(parts)


def flow_page(record: FlowRecord, info: SessionInfo, command: str) -> str:
    state, meta = record.state, record.meta
    s = record.summary()
    req = state.get("request") or {}
    resp = state.get("response") if isinstance(state.get("response"), dict) else None
    redaction: dict[str, Any] = meta["redaction"] if isinstance(meta.get("redaction"), dict) else {}
    counts = "".join(
        f'<li><span class="count">{"↑" if side == "request" else "↓"}{e(rule)} &times;{e(n)}</span>'
        f" {e(side)}</li>"
        for side in ("request", "response")
        for rule, n in sorted((redaction.get(side) or {}).items())
    )
    caller: dict[str, Any] = meta["caller"] if isinstance(meta.get("caller"), dict) else {}
    stream = meta.get("stream") if isinstance(meta.get("stream"), dict) else None
    sealed = meta.get("sealed")
    error = state.get("error")
    facts = [
        ("Caller", caller.get("subject") or "anonymous"),
        ("Groups", ", ".join(map(str, caller.get("groups") or [])) or "-"),
        ("Route", meta.get("route") or "unrouted"),
        ("Request id", meta.get("request_id")),
        ("Status", s["status"] if s["status"] is not None else "-"),
        ("Started", f"{iso(req.get('timestamp_start'))} UTC"),
    ]
    timings = meta.get("timings")
    if isinstance(timings, dict) and timings.get("total_ms") is not None:
        facts.append(("Duration", f"{timings['total_ms']} ms"))
    if stream is not None:
        cut = f"cut: {stream['cut']}" if stream.get("cut") else "complete"
        facts.append(("Stream", f"{stream.get('bytes_sent')} bytes sent, {cut}"))
    if isinstance(meta.get("refusal"), dict):
        refusal = meta["refusal"]
        facts.append(("Refused", f"{refusal.get('status')} {refusal.get('code')}"))
    if isinstance(error, dict):
        facts.append(("Error", error.get("msg")))
    if isinstance(sealed, dict):
        facts.append(
            (
                "Sealed originals",
                f"present, sealed to auditor key {sealed.get('key_id')} (never shown here: "
                "python -m sluicegate sessions unseal)",
            )
        )
    fact_html = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in facts)
    target = f"{text(req.get('scheme'))}://{text(req.get('host'))}:{req.get('port')}"
    target += text(req.get("path"))
    response_html = '<p class="muted">no response</p>'
    if resp is not None:
        response_html = (
            f'<p class="line">{e(text(resp.get("http_version")))} {e(resp.get("status_code"))} '
            f"{e(text(resp.get('reason')))}</p>"
            + _headers(resp.get("headers"))
            + _body(resp.get("content"), resp.get("headers"))
        )
    websocket = ""
    ws = state.get("websocket")
    if isinstance(ws, dict) and isinstance(ws.get("messages"), list):
        items = []
        for message in ws["messages"][:500]:
            if isinstance(message, (list, tuple)) and len(message) >= 3:
                direction = "→" if message[2] else "←"
                items.append(f"<li>{direction} {tagged(text(message[1])[:4000])}</li>")
        websocket = f"<h2>WebSocket messages</h2><ol class=ws>{''.join(items)}</ol>"
    return (
        f"<section><h1>Flow <code>{e(record.id)}</code></h1>"
        f'<p><a href="/console/sessions/{q(info.name)}">{e(info.name)}</a> #{record.index} · '
        f'decision <span class="badge {e(s["decision"])}" id="decision">{e(s["decision"])}</span>'
        f' · session verification <span class="badge verify-{e(info.status)}">'
        f"{e(info.status)}</span></p>"
        f'<p>Open in mitmweb: <code class="cmd">{e(command)}</code> · '
        f'<a href="/console/download/{q(info.name)}">download .mitm</a></p>'
        f'<dl class="facts">{fact_html}</dl>'
        f'<h2>Policy</h2><div id="policy">{_policy(meta)}</div>'
        f'<h2>Redactions</h2><ul class="counts" id="redactions">'
        f"{counts or '<li class=muted>none</li>'}</ul>"
        f'<h2>Request</h2><p class="line"><b>{e(text(req.get("method")))}</b> {e(target)} '
        f"{e(text(req.get('http_version')))}</p>"
        + _headers(req.get("headers"))
        + f'<div id="request-body">{_body(req.get("content"), req.get("headers"))}</div>'
        + f'<h2>Response</h2><div id="response">{response_html}</div>{websocket}</section>'
    )


def filter_entries(
    entries: Iterable[Mapping[str, Any]], filters: Mapping[str, str]
) -> list[Mapping[str, Any]]:
    import fnmatch

    def ok(entry: Mapping[str, Any]) -> bool:
        caller = filters.get("caller")
        if caller and not fnmatch.fnmatch(str(entry.get("identity")), caller):
            return False
        route = filters.get("route")
        if route and not fnmatch.fnmatch(str(entry.get("route") or "unrouted"), route):
            return False
        decision = filters.get("decision")
        if decision and entry.get("decision") != decision:
            return False
        rule = filters.get("rule")
        rules = list((entry.get("rules") or {}).keys()) + list(entry.get("policy_rules") or [])
        return not rule or any(fnmatch.fnmatch(str(r), rule) for r in rules)

    return [entry for entry in entries if ok(entry)]
