"""Policy evaluation: may a request (or a response) pass, must it be blocked, or wait for a human?

Pure (no mitmproxy): the Policy addon describes a flow as a `FlowContext` plus `BodyViews` and acts
on the `Decision` it gets back. Streaming code calls `ResponsePolicy.stream()` on released text.

Precedence, the same for both phases (see docs/POLICY.md):

1. Rules of the phase, in config order. The FIRST rule whose conditions all hold decides
   (`allow`, `block`, `hold`, `redact_only`). Put exceptions (narrow allows) before the general
   rule they carve out of, as in a firewall.
2. No rule matched: `policy.default_action` for requests, `allow` for responses.
3. A `hold` covered by an approver's active grant (same identity, destination and rule) passes.
4. Requests only: anything not blocked is counted against every matching rate limit.

Matched text never leaves the engine: decisions name rules and patterns, never what matched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import ipaddress
import itertools
import json
import re
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import regex

from sluicegate.engine.ratelimit import Limit

if TYPE_CHECKING:  # the config imports this module; the engine only reads config values
    from sluicegate.config import MatchConfig, PolicySection

__all__ = [
    "BUILTIN_PATTERNS",
    "DEFAULT_RULE_ID",
    "RESPONSE_POLICY_KEY",
    "Action",
    "BodyViews",
    "Conditions",
    "Decision",
    "FlowContext",
    "HostPattern",
    "Pattern",
    "Phase",
    "Policy",
    "PolicyError",
    "RateLimitRule",
    "ResponsePolicy",
    "ResponseScanner",
    "Rule",
    "ScanTimeout",
    "build_policy",
    "normalize_path",
    "redact_body",
    "sse_error_event",
]

# Decisions taken by `default_action` (no rule matched) carry this id; it is not a valid rule id.
DEFAULT_RULE_ID = "(default)"

# Key in `flowstate.state(flow).private` under which the Policy addon leaves the flow's
# `ResponsePolicy` for streaming code (absent when no response rule can apply to the flow).
RESPONSE_POLICY_KEY = "policy.response"


class Action(enum.StrEnum):
    ALLOW = "allow"
    BLOCK = "block"
    HOLD = "hold"
    REDACT_ONLY = "redact_only"


class Phase(enum.StrEnum):
    REQUEST = "request"
    RESPONSE = "response"


class PolicyError(Exception):
    """A body the policy cannot evaluate or rewrite safely. `code` is stable, the text is safe."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ScanTimeout(PolicyError):
    """A pattern took longer than the scan budget: the body is treated as uninspectable."""


# -- patterns -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A named body pattern; it is found when it matches at least `min_count` times.

    Built-ins also carry a cheap necessary condition (`anchors`: every match contains one of these
    lower-case literals; `prefilter`: every match contains a match of this `re` pattern), which
    skips hopeless regex scans without ever changing a result, and `max_len`, the longest match,
    so a stream rescans only that much already released text.
    """

    name: str
    regex: regex.Pattern[str]
    min_count: int = 1
    description: str = ""
    anchors: tuple[str, ...] = ()
    prefilter: re.Pattern[str] | None = None
    max_len: int | None = None

    def might_occur(self, text: str, needed: int = 1, lowered: str | None = None) -> bool:
        """False only if `text` cannot hold `needed` matches."""
        if self.anchors:
            low = text.lower() if lowered is None else lowered
            if needed == 1:
                if not any(a in low for a in self.anchors):
                    return False
            else:  # matches do not overlap, so each holds its own anchor occurrence
                hits = itertools.islice(self._anchor_re.finditer(low), needed)
                if sum(1 for _ in hits) < needed:
                    return False
        return self.prefilter is None or self.prefilter.search(text) is not None

    @functools.cached_property
    def _anchor_re(self) -> re.Pattern[str]:
        return re.compile("|".join(re.escape(a) for a in self.anchors))

    def count(
        self,
        text: str,
        timeout: float | None,
        stop_at: int | None = None,
        lowered: str | None = None,
    ) -> int:
        """Matches in `text`. With `stop_at`, only whether the result reaches it is meaningful
        (it stops there, and is 0 when the prefilter shows it cannot be reached).
        Raises ScanTimeout past `timeout`."""
        if not self.might_occur(text, stop_at or 1, lowered):
            return 0
        n = 0
        try:
            for _ in self.regex.finditer(text, concurrent=True, timeout=timeout):
                n += 1
                if stop_at is not None and n >= stop_at:
                    break
        except TimeoutError:
            raise ScanTimeout(
                "policy_scan_timeout", f"pattern {self.name!r} exceeded the scan time budget"
            ) from None
        return n

    def found_in(self, body: BodyViews, timeout: float | None) -> bool:
        return any(
            self.count(view, timeout, self.min_count, body.lowered(i)) >= self.min_count
            for i, view in enumerate(body.views)
        )


def _compile(source: str) -> regex.Pattern[str]:
    return regex.compile(source)


def _builtin(
    name: str,
    source: str,
    description: str,
    *,
    anchors: tuple[str, ...] = (),
    prefilter: str | None = None,
    max_len: int,
    min_count: int = 1,
) -> Pattern:
    # ASCII semantics: case-insensitive parts fold ASCII letters only, so lower-case anchors
    # are a sound necessary condition.
    return Pattern(
        name,
        regex.compile(source, regex.ASCII),
        min_count,
        description,
        anchors=anchors,
        prefilter=re.compile(prefilter) if prefilter else None,
        max_len=max_len,
    )


# Written for this project from the formats themselves; tests/unit/test_policy.py has positive
# and negative examples for each. Every repetition is bounded and runs are anchored, so scans
# stay linear and matches have a known longest length.
_B64 = r"A-Za-z0-9+/"
_NAME = r"[\w.@-]{1,64}"
_PRIVILEGED_FILES = (
    rf"(?:/etc/(?:passwd|shadow|group|gshadow|sudoers|sudoers\.d/{_NAME}|crontab"
    rf"|cron\.d/{_NAME}|ld\.so\.preload|ssh/sshd_config|pam\.d/{_NAME}|profile\.d/{_NAME}"
    rf"|systemd/system/{_NAME})|(?:~|/root|/home/{_NAME})/\.ssh/authorized_keys)"
)
BUILTIN_PATTERNS: Mapping[str, Pattern] = {
    p.name: p
    for p in (
        _builtin(
            "private-key",
            r"-----BEGIN (?:[A-Z0-9]{1,16} ){0,3}PRIVATE KEY(?: BLOCK)?-----"
            r"|PuTTY-User-Key-File-[0-9]{1,3}:",
            "PEM/OpenSSH/PGP private key blocks and PuTTY key files.",
            anchors=("private key", "putty-user-key-file-"),
            max_len=128,
        ),
        _builtin(
            "bulk-credentials",
            r"(?i:(?:passw(?:or)?d|secret|api[_-]?key|access[_-]?key|auth[_-]?token"
            r"|private[_-]?key)[A-Za-z0-9_]{0,32}[\"']?"
            r"[ \t]{0,8}[:=][ \t]{0,8}[\"']?[^\s\"',;]{8,256})"
            r"|\bAKIA[0-9A-Z]{16}\b|\bsk-[A-Za-z0-9_-]{20,256}|\bgh[opsur]_[A-Za-z0-9]{30,256}"
            r"|\bxox[abprs]-[A-Za-z0-9-]{10,256}|\bglpat-[A-Za-z0-9_-]{20}",
            "Five or more credential assignments or well-known tokens "
            "(a dumped .env file, a credentials export).",
            anchors=(
                "passw",
                "secret",
                "api_key",
                "api-key",
                "apikey",
                "access_key",
                "access-key",
                "accesskey",
                "auth_token",
                "auth-token",
                "authtoken",
                "private_key",
                "private-key",
                "privatekey",
                "akia",
                "sk-",
                "ghp_",
                "gho_",
                "ghs_",
                "ghu_",
                "ghr_",
                "xoxa-",
                "xoxb-",
                "xoxp-",
                "xoxr-",
                "xoxs-",
                "glpat-",
            ),
            min_count=5,
            max_len=400,
        ),
        _builtin(
            "large-base64",
            rf"(?<![{_B64}])(?<!data:image/[a-z0-9.+-]{{1,32}};base64,)[{_B64}]{{4096}}",
            "A base64 run of 4096+ characters (about 3 KiB of binary), except "
            "inline images (data:image/...;base64,).",
            prefilter=rf"(?<![{_B64}])[{_B64}]{{4096}}",
            max_len=4096,
        ),
        _builtin(
            "pipe-to-shell",
            r"\b(?:curl|wget|fetch)\b[^\n|;&]{0,300}\|[ \t]{0,8}"
            r"(?:sudo[ \t]{1,8}(?:-[^\s|;&]{1,20}[ \t]{1,8}){0,5})?(?:ba|z|k|da|fi)?sh\b",
            "Downloading a script and piping it into a shell.",
            anchors=("curl", "wget", "fetch"),
            max_len=512,
        ),
        _builtin(
            "tls-verification-disabled",
            r"\bverify[ \t]{0,8}=[ \t]{0,8}False\b|\bcheck_hostname[ \t]{0,8}=[ \t]{0,8}False\b"
            r"|\bCERT_NONE\b|\b_create_unverified_context\b"
            r"|\bNODE_TLS_REJECT_UNAUTHORIZED[\"']?[ \t]{0,8}[=:][ \t]{0,8}[\"']?0"
            r"|\brejectUnauthorized[\"']?[ \t]{0,8}:[ \t]{0,8}false\b"
            r"|\bInsecureSkipVerify[ \t]{0,8}:[ \t]{0,8}true\b"
            r"|\bCURLOPT_SSL_VERIFY(?:PEER|HOST)[ \t]{0,8},[ \t]{0,8}(?:0|false)\b"
            r"|\bPYTHONHTTPSVERIFY[ \t]{0,8}=[ \t]{0,8}[\"']?0"
            r"|\bhttp\.sslVerify[ \t]{1,8}false\b|--no-check-certificate\b"
            r"|\bcurl\b[^\n|;&]{0,200}[ \t](?:--insecure\b|-[A-Za-z]{0,10}k[A-Za-z]{0,10}\b)",
            "Code or commands that turn off TLS certificate verification.",
            anchors=(
                "verify",
                "check_hostname",
                "cert_none",
                "_create_unverified_context",
                "node_tls_reject_unauthorized",
                "rejectunauthorized",
                "insecureskipverify",
                "curlopt_ssl_verify",
                "--no-check-certificate",
                "curl",
            ),
            max_len=256,
        ),
        _builtin(
            "privileged-file-write",
            rf"(?:>{{1,2}}[ \t]{{0,8}}|\btee[ \t]{{1,8}}(?:-a[ \t]{{1,8}})?){_PRIVILEGED_FILES}"
            rf"|\bopen\([ \t]{{0,8}}[\"']{_PRIVILEGED_FILES}[\"'][ \t]{{0,8}},[ \t]{{0,8}}"
            r"[\"'][wax+]|\bchmod[ \t]{1,8}(?:[ugoa]{0,4}\+s|[246][0-7]{3})\b",
            "Writing to system account, sudo, cron, PAM or SSH files, or setting "
            "setuid/setgid bits.",
            anchors=("/etc/", "authorized_keys", "chmod"),
            max_len=256,
        ),
    )
}


# -- what the policy sees of a flow ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FlowContext:
    """Everything except bodies that rules can match on. Plain values, no secrets."""

    subject: str | None
    issuer: str | None
    groups: frozenset[str]
    route: str | None
    host: str
    port: int
    method: str
    path: str  # see normalize_path

    @property
    def identity(self) -> str:
        """Rate limits and grants key on this: who, as verified (issuer + subject)."""
        if self.subject is None:
            return "anonymous"
        return f"{self.issuer or ''}|{self.subject}"

    @property
    def destination(self) -> str:
        """The route name, or host:port for unrouted destinations."""
        return f"route:{self.route}" if self.route else f"host:{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class BodyViews:
    """The texts of a body that patterns run over.

    The raw text, plus the decoded string values of a JSON body (so `\\n` escapes are newlines
    again), the decoded values of a form body, or the generated text of a buffered SSE body (the
    deltas of OpenAI / Anthropic events, joined, so a command split over many events is whole
    again). A pattern is found when it matches often enough in any one view, so re-encoding a
    secret inside JSON does not hide it.
    """

    size: int
    views: tuple[str, ...]

    @classmethod
    def of(cls, content: bytes, content_type: str | None = None) -> BodyViews:
        raw = content.decode("utf-8", "replace")
        views = [raw]
        ctype = (content_type or "").lower()
        if "json" in ctype or _looks_like_json(raw):
            with contextlib.suppress(ValueError, RecursionError):
                views.append("\n".join(_json_strings(json.loads(raw))))
        elif "application/x-www-form-urlencoded" in ctype:
            pairs = urllib.parse.parse_qsl(raw, keep_blank_values=True)
            views.append("\n".join(f"{k}={v}" for k, v in pairs))
        elif "text/event-stream" in ctype:
            views.append(_sse_text(raw))
        return cls(size=len(content), views=tuple(views))

    @classmethod
    def of_text(cls, text: str) -> BodyViews:
        return cls(size=len(text.encode("utf-8", "replace")), views=(text,))

    def lowered(self, index: int) -> str:
        """Lower-cased view `index`, computed once for all patterns' anchor checks."""
        return self._lowered[index]

    @functools.cached_property
    def _lowered(self) -> tuple[str, ...]:
        return tuple(v.lower() for v in self.views)


# Keys under which OpenAI (chat, Responses) and Anthropic stream events carry generated text.
_SSE_TEXT_KEYS = frozenset({"content", "text", "delta", "arguments", "partial_json", "thinking"})


def _sse_text(raw: str) -> str:
    """The generated text of an SSE body: text-bearing strings of each `data:` event, in order."""
    pieces: list[str] = []
    for line in raw.splitlines():
        if not line.startswith("data:"):
            continue
        try:
            event = json.loads(line[5:])
        except (ValueError, RecursionError):
            continue
        stack: list[Any] = [event]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                for key, value in item.items():
                    if isinstance(value, str) and key in _SSE_TEXT_KEYS:
                        pieces.append(value)
                    elif isinstance(value, (dict, list)):
                        stack.append(value)
            elif isinstance(item, list):
                stack.extend(reversed(item))
    return "".join(pieces)


def _looks_like_json(text: str) -> bool:
    m = _FIRST_CHAR.match(text)
    return m is not None and m.group(1) in "{["


_FIRST_CHAR = regex.compile(r"\s*(\S)")


def _json_strings(value: Any) -> Iterator[str]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            for k, v in item.items():
                yield k
                stack.append(v)
        elif isinstance(item, list):
            stack.extend(reversed(item))


def normalize_path(path: str) -> str:
    """The path rules match against: query dropped, percent-decoded, dot segments resolved,
    repeated slashes collapsed. `/v1/%66iles/../files//x` is `/v1/files/x`, as upstreams see it,
    so encoding tricks cannot step around a path rule.
    """
    path = urllib.parse.unquote(path.split("?", 1)[0].split("#", 1)[0], errors="replace")
    segments: list[str] = []
    parts = path.split("/")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "..":
            if segments:
                segments.pop()
            if last:
                segments.append("")
        elif part == ".":
            if last:
                segments.append("")
        elif part or last:
            segments.append(part)
    return "/" + "/".join(segments)


# -- conditions and rules --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HostPattern:
    """`api.example.com`, `*.example.com` (subdomains only), optionally with `:port`."""

    host: str
    port: int | None = None
    wildcard: bool = False

    @classmethod
    def parse(cls, text: str) -> HostPattern:
        """Raises ValueError with a message fit for a config error."""
        host, port = text.strip().lower(), None
        if not host or any(c in host for c in "/@ ?#"):
            raise ValueError(_HOST_FORMAT)
        if host.startswith("["):
            inner, _, rest = host[1:].partition("]")
            host = inner
            if rest:
                if not rest.startswith(":"):
                    raise ValueError("expected `[ipv6]:port`")
                port = _port(rest[1:])
        elif host.count(":") == 1:
            host, port_text = host.split(":")
            port = _port(port_text)
        wildcard = host.startswith("*.")
        name = host[2:] if wildcard else host
        if not name or "*" in name:
            raise ValueError(_HOST_FORMAT)
        if ":" in name or text.strip().startswith("["):
            ipaddress.IPv6Address(name)  # raises ValueError
        return cls(host=name, port=port, wildcard=wildcard)

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and port != self.port:
            return False
        host = host.lower().rstrip(".")
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host


_HOST_FORMAT = "must be a host name, `*.domain` or an IP address, optionally :port"


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError("port must be a number between 1 and 65535")
    return int(text)


@dataclasses.dataclass(frozen=True)
class Conditions:
    """What a rule matches. Empty conditions are ignored; all non-empty ones must hold.

    Within one condition any listed value may match (a caller in ANY of `groups`, a body with
    ANY of `body_patterns`). `paths` are regular expressions matched against the WHOLE path
    (without the query string).
    """

    hosts: tuple[HostPattern, ...] = ()
    routes: frozenset[str] = frozenset()
    methods: frozenset[str] = frozenset()
    paths: tuple[regex.Pattern[str], ...] = ()
    groups: frozenset[str] = frozenset()
    subjects: frozenset[str] = frozenset()
    body_patterns: tuple[Pattern, ...] = ()
    body_larger_than: int | None = None

    @property
    def needs_body(self) -> bool:
        return bool(self.body_patterns) or self.body_larger_than is not None

    def context_matches(self, ctx: FlowContext) -> bool:
        if self.hosts and not any(h.matches(ctx.host, ctx.port) for h in self.hosts):
            return False
        if self.routes and ctx.route not in self.routes:
            return False
        if self.methods and ctx.method.upper() not in self.methods:
            return False
        if self.paths and not any(p.fullmatch(ctx.path) for p in self.paths):
            return False
        if self.groups and self.groups.isdisjoint(ctx.groups):
            return False
        return not (self.subjects and ctx.subject not in self.subjects)

    def body_matches(self, body: BodyViews, timeout: float | None) -> tuple[str, ...] | None:
        """Names of the patterns found (empty if the rule has none), or None: no match."""
        if self.body_larger_than is not None and body.size <= self.body_larger_than:
            return None
        if not self.body_patterns:
            return ()
        found = tuple(p.name for p in self.body_patterns if p.found_in(body, timeout))
        return found or None


@dataclasses.dataclass(frozen=True)
class Decision:
    """What to do with a flow, and which rule said so. Safe to show and to record."""

    action: Action
    rule_id: str
    message: str
    phase: Phase
    patterns: tuple[str, ...] = ()

    @property
    def is_default(self) -> bool:
        return self.rule_id == DEFAULT_RULE_ID

    def describe(self) -> str:
        """One sentence for the agent: the rule and its message."""
        rule = "the default policy" if self.is_default else f"policy rule {self.rule_id!r}"
        return f"{rule}: {self.message}" if self.message else rule

    def as_metadata(self) -> dict[str, Any]:
        return {
            "action": str(self.action),
            "rule": self.rule_id,
            "message": self.message,
            "phase": str(self.phase),
            "patterns": list(self.patterns),
        }


DEFAULT_MESSAGES = {
    Action.ALLOW: "",
    Action.BLOCK: "This request is not allowed by the gateway's policy.",
    Action.HOLD: "This request needs a human approver's decision.",
    Action.REDACT_ONLY: "Matching content was redacted.",
}


@dataclasses.dataclass(frozen=True)
class Rule:
    id: str
    action: Action
    when: Conditions = Conditions()
    phase: Phase = Phase.REQUEST
    message: str = ""

    def __post_init__(self) -> None:
        if self.action is Action.REDACT_ONLY and not self.when.body_patterns:
            raise ValueError(f"rule {self.id!r}: redact_only needs body_patterns")

    def decision(self, patterns: tuple[str, ...] = ()) -> Decision:
        message = self.message or DEFAULT_MESSAGES[self.action]
        return Decision(self.action, self.id, message, self.phase, patterns)


@dataclasses.dataclass(frozen=True)
class RateLimitRule:
    """A rate limit and whom it applies to. `per`: what is counted separately."""

    limit: Limit
    when: Conditions = Conditions()
    per: str = "caller_and_route"  # "caller" | "caller_and_route" | "route"
    message: str = ""

    def __post_init__(self) -> None:
        if self.when.needs_body:
            raise ValueError(f"rate limit {self.limit.id!r}: body conditions are not supported")
        if self.per not in ("caller", "caller_and_route", "route"):
            raise ValueError(f"rate limit {self.limit.id!r}: unknown per {self.per!r}")

    def key(self, ctx: FlowContext) -> str:
        if self.per == "caller":
            return ctx.identity
        if self.per == "route":
            return ctx.destination
        return f"{ctx.identity}@{ctx.destination}"


# -- the policy ---------------------------------------------------------------------------------

BodyLoader = Callable[[], BodyViews]


class Policy:
    """The compiled `policy:` section: rules of both phases, default action, rate limits."""

    def __init__(
        self,
        rules: Sequence[Rule] = (),
        *,
        default_action: Action = Action.ALLOW,
        default_message: str = "",
        rate_limits: Sequence[RateLimitRule] = (),
        scan_timeout: float | None = 2.0,
        stream_window: int = 8192,
    ) -> None:
        if default_action is Action.REDACT_ONLY:
            raise ValueError("default_action cannot be redact_only (it needs patterns)")
        self.request_rules = tuple(r for r in rules if r.phase is Phase.REQUEST)
        self.response_rules = tuple(r for r in rules if r.phase is Phase.RESPONSE)
        self.default = Rule(DEFAULT_RULE_ID, default_action, message=default_message)
        self.rate_limits = tuple(rate_limits)
        self.scan_timeout = scan_timeout
        self.stream_window = stream_window

    @property
    def uses_hold(self) -> bool:
        rules = (*self.request_rules, *self.response_rules, self.default)
        return any(r.action is Action.HOLD for r in rules)

    def request_needs_body(self, ctx: FlowContext) -> bool:
        """Whether deciding this request may look at its body (to skip decoding it if not)."""
        for rule in self.request_rules:
            if rule.when.context_matches(ctx):
                # A rule without body conditions decides before any later body rule is reached.
                return rule.when.needs_body
        return False

    def decide_request(self, ctx: FlowContext, body: BodyViews | BodyLoader) -> Decision:
        """First matching request rule, else the default action.

        `body` may be a loader, called only once a rule with body conditions is reached.
        """
        decision = _first_match(self.request_rules, ctx, body, self.scan_timeout)
        return decision or self.default.decision()

    def rule(self, rule_id: str) -> Rule:
        """The rule behind a decision (the default rule for DEFAULT_RULE_ID)."""
        if rule_id == DEFAULT_RULE_ID:
            return self.default
        return next(r for r in (*self.request_rules, *self.response_rules) if r.id == rule_id)

    def rate_limit_hits(self, ctx: FlowContext) -> list[tuple[Limit, str]]:
        return [(r.limit, r.key(ctx)) for r in self.rate_limits if r.when.context_matches(ctx)]

    def rate_limit(self, limit_id: str) -> RateLimitRule:
        return next(r for r in self.rate_limits if r.limit.id == limit_id)

    def response_policy(
        self, ctx: FlowContext, exempt: Iterable[str] = ()
    ) -> ResponsePolicy | None:
        """The response rules that can apply to this flow, or None when no response rule can.

        `exempt`: rule ids the caller holds a grant for (their `hold` no longer applies).
        """
        skip = frozenset(exempt)
        applicable: list[Rule] = []
        for rule in self.response_rules:
            if not rule.when.context_matches(ctx):
                continue
            if rule.action is Action.HOLD and rule.id in skip:
                continue
            applicable.append(rule)
            if not rule.when.needs_body:
                break  # decides every response; later rules are unreachable
        while applicable and applicable[-1].action is Action.ALLOW:
            applicable.pop()  # a trailing allow changes nothing: no match is allow too
        if not applicable:
            return None
        return ResponsePolicy(tuple(applicable), self.scan_timeout, self.stream_window)


def build_policy(section: PolicySection) -> Policy:
    """Compile a validated `policy:` config section."""
    patterns = dict(BUILTIN_PATTERNS)
    for name, spec in section.patterns.items():
        patterns[name] = Pattern(name, _compile(spec.regex), spec.min_count, spec.description)

    def conditions(match: MatchConfig) -> Conditions:
        return Conditions(
            hosts=tuple(HostPattern.parse(h) for h in match.hosts),
            routes=frozenset(match.routes),
            methods=frozenset(match.methods),
            paths=tuple(_compile(p) for p in match.paths),
            groups=frozenset(match.groups),
            subjects=frozenset(match.subjects),
            body_patterns=tuple(patterns[n] for n in match.body_patterns),
            body_larger_than=match.body_larger_than,
        )

    rules = [
        Rule(r.id, Action(r.action), conditions(r.match), Phase(r.phase), r.message)
        for r in section.rules
    ]
    limits = [
        RateLimitRule(
            Limit(r.id, r.requests, r.window_seconds), conditions(r.match), r.per, r.message
        )
        for r in section.rate_limits
    ]
    return Policy(
        rules,
        default_action=Action(section.default_action),
        default_message=section.default_message,
        rate_limits=limits,
        scan_timeout=section.scan_timeout_seconds,
        stream_window=section.stream_window_chars,
    )


def _first_match(
    rules: Iterable[Rule],
    ctx: FlowContext | None,
    body: BodyViews | BodyLoader,
    timeout: float | None,
) -> Decision | None:
    loaded: BodyViews | None = body if isinstance(body, BodyViews) else None
    for rule in rules:
        if ctx is not None and not rule.when.context_matches(ctx):
            continue
        if not rule.when.needs_body:
            return rule.decision()
        if loaded is None:
            assert callable(body)
            loaded = body()
        found = rule.when.body_matches(loaded, timeout)
        if found is not None:
            return rule.decision(found)
    return None


class ResponsePolicy:
    """The response rules that apply to one flow (context already matched).

    Buffered responses: `decide(BodyViews)` / `scan(text)` on the whole body.
    Streamed responses (text/event-stream): `stream()` gives a `ResponseScanner` for the text the
    stream redactor releases. A stream cannot be held or rewritten once bytes are out, so EVERY
    decision a scanner returns means: cut the stream now and end it with
    `sse_error_event(decision, request_id)`. `hold` and `redact_only` rules therefore act as
    `block` on streams (fail closed); buffered responses get the real hold and redaction.
    """

    def __init__(self, rules: tuple[Rule, ...], scan_timeout: float | None, window: int) -> None:
        self.rules = rules
        self.scan_timeout = scan_timeout
        self.window = window
        # Decisions taken by this flow's stream scanners, for the addon to record at the end.
        self.stream_decisions: list[Decision] = []
        self.streams_started = 0

    def decide(self, body: BodyViews) -> Decision | None:
        """First matching rule for a whole buffered body; None means no rule matched (allow)."""
        return _first_match(self.rules, None, body, self.scan_timeout)

    def scan(self, text: str) -> Decision | None:
        """Like `decide` for one whole text; None when nothing matched or the match is allow."""
        decision = self.decide(BodyViews.of_text(text))
        if decision is None or decision.action is Action.ALLOW:
            return None
        return decision

    def stream(self) -> ResponseScanner:
        self.streams_started += 1
        return ResponseScanner(self)


class ResponseScanner:
    """Incremental response policy over the text a stream releases, piece by piece.

    A pattern is found across piece boundaries as long as the match is shorter than
    `policy.stream_window_chars`; `min_count` counts matches over the whole stream. Rules are still
    taken in order, but on a stream a rule acts as soon as it matches: an earlier `allow` rule with
    body conditions only exempts the stream if it has matched by then. The scanner decides on the
    text about to be released, so the end of a piece counts as the end of the text (`| sudo bash`
    blocks even if the next piece would have made it `bashful`): it may block where a scan of the
    whole text would not, never the reverse.
    """

    def __init__(self, policy: ResponsePolicy) -> None:
        self._policy = policy
        self._tail = ""
        self._size = 0
        self._counts: dict[tuple[str, str], int] = {}
        self._exempt = False
        self.decision: Decision | None = None

    def feed(self, text: str) -> Decision | None:
        """Text about to be released to the agent. A decision means: cut the stream, send none.

        Call `feed("")` once before the first byte goes out, so that a rule without body
        conditions cuts the stream before anything is released.
        """
        if self.decision is not None:
            return self.decision
        if self._exempt:
            return None
        self._size += len(text.encode("utf-8", "replace"))
        window = self._tail + text
        fresh_from = len(self._tail)
        for rule in self._policy.rules:
            found = self._rule_found(rule, window, fresh_from)
            if found is None:
                continue
            if rule.action is Action.ALLOW:
                self._exempt = True
                return None
            self.decision = rule.decision(found)
            self._policy.stream_decisions.append(self.decision)
            return self.decision
        self._tail = window[-self._policy.window :] if self._policy.window else ""
        return None

    def _rule_found(self, rule: Rule, window: str, fresh_from: int) -> tuple[str, ...] | None:
        when = rule.when
        if when.body_larger_than is not None and self._size <= when.body_larger_than:
            return None
        if not when.body_patterns:
            return ()
        found = []
        for pattern in when.body_patterns:
            key = (rule.id, pattern.name)
            seen = self._counts.get(key, 0)
            if seen < pattern.min_count:
                seen += _count_ending_after(pattern, window, fresh_from, self._policy.scan_timeout)
                self._counts[key] = seen
            if seen >= pattern.min_count:
                found.append(pattern.name)
        return tuple(found) or None


def _count_ending_after(pattern: Pattern, text: str, start: int, timeout: float | None) -> int:
    """Matches ending in text[start:] (earlier ones were counted when that text was fresh).

    Only the old text a match could reach back into is searched: `max_len` (plus room for
    lookbehinds) for built-ins, the whole retained window otherwise.
    """
    pos = 0 if pattern.max_len is None else max(0, start - pattern.max_len - 64)
    if not pattern.might_occur(text[pos:]):
        return 0
    n = 0
    try:
        for m in pattern.regex.finditer(text, pos, concurrent=True, timeout=timeout):
            if m.end() > start:
                n += 1
    except TimeoutError:
        raise ScanTimeout(
            "policy_scan_timeout", f"pattern {pattern.name!r} exceeded the scan time budget"
        ) from None
    return n


# -- redact_only ------------------------------------------------------------------------------


def redact_body(
    content: bytes,
    content_type: str | None,
    patterns: Sequence[Pattern],
    tag: str,
    timeout: float | None = None,
) -> tuple[bytes, int]:
    """Replace every match of `patterns` by `tag`; returns the new body and the replacements.

    JSON bodies are rewritten value by value (the JSON stays valid, escapes are decoded first),
    form bodies value by value, other bodies as UTF-8 text. Raises PolicyError for bodies that
    cannot be rewritten safely (not UTF-8). The caller re-checks the result: what a rewrite cannot
    reach (a secret inside a JSON key) is still found and must then be blocked.
    """
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(
            "policy_cannot_redact", "the body is not UTF-8 text and cannot be redacted"
        ) from None
    total = 0

    def sub(value: str) -> str:
        nonlocal total
        for pattern in patterns:
            try:
                value, n = pattern.regex.subn(tag, value, concurrent=True, timeout=timeout)
            except TimeoutError:
                raise ScanTimeout(
                    "policy_scan_timeout", f"pattern {pattern.name!r} exceeded the scan budget"
                ) from None
            total += n
        return value

    ctype = (content_type or "").lower()
    if "json" in ctype or _looks_like_json(text):
        try:
            document = json.loads(text)
        except (ValueError, RecursionError):
            document = _NOT_JSON
        if document is not _NOT_JSON:
            out = json.dumps(_map_strings(document, sub), ensure_ascii=False)
            return out.encode("utf-8"), total
    if "application/x-www-form-urlencoded" in ctype:
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True)
        out = urllib.parse.urlencode([(k, sub(v)) for k, v in pairs])
        return out.encode("utf-8"), total
    return sub(text).encode("utf-8"), total


_NOT_JSON = object()


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return value


def sse_error_event(decision: Decision, request_id: str) -> bytes:
    """The last event of a stream cut by policy. OpenAI and Anthropic SDKs raise on it."""
    error = {
        "code": "policy_blocked",
        "message": f"The response was stopped by {decision.describe()}",
        "type": "sluicegate_error",
        "request_id": request_id,
        "rule": decision.rule_id,
    }
    payload = json.dumps({"type": "error", "error": error})
    return f"event: error\ndata: {payload}\n\n".encode()
