"""The gateway's one YAML config file: its schema and its loader.

Loaded once at start-up (and again only when `sluicegate_config` changes or the file's mtime does),
validated strictly: an unknown key, a wrong type, a regex that does not compile or a secret whose
source is missing stops the gateway with a message naming the file and the key path.
Secrets are never inlined: they are `{env: NAME}` or `{file: PATH}` references (see `SecretRef`).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import regex

from sluicegate.auth import keys as auth_keys
from sluicegate.auth import verifier
from sluicegate.config.schema import (
    ConfigError,
    Parser,
    Problem,
    Regex,
    SecretRef,
    SecretUnavailable,
    read_yaml,
    setting,
)
from sluicegate.egress.addresses import InternalAllowance
from sluicegate.egress.base_url import prefix_problem
from sluicegate.egress.paths import AmbiguousPath, canonical_path
from sluicegate.policy.conditions import HostPattern
from sluicegate.policy.patterns import BUILTIN_PATTERNS
from sluicegate.recording import chain, sealing
from sluicegate.redaction.rules import RuleFileError, RulePack, RuleSelectionError, load_rule_pack

__all__ = [
    "Config",
    "ConfigError",
    "Problem",
    "SecretRef",
    "build_key_source",
    "build_verifier",
    "load_cached",
    "load_config",
]

REPO_DIR = Path(__file__).resolve().parents[3]
DEFAULT_RULES_DIR = REPO_DIR / "rules"

TokenSource = Literal["proxy_authorization", "authorization", "x_api_key", "api_key"]

ASYMMETRIC_ALGORITHMS = auth_keys.ASYMMETRIC_ALGORITHMS
HMAC_ALGORITHMS = auth_keys.HMAC_ALGORITHMS
# A JWKS is never trusted for longer than this when refetches keep failing (fail closed).
JWKS_MAX_STALE_SECONDS = 24 * 3600
# RFC 9110 token characters: what a header name may consist of.
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Headers the gateway or the HTTP framing owns; a credential must not be injected into them.
_RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
    }
)


@dataclasses.dataclass(frozen=True)
class GatewaySection:
    name: str = setting("sluicegate", doc="Name of this deployment, recorded with every flow.")
    environment: Literal["development", "production"] = setting(
        "production",
        doc="`development` allows dev conveniences such as minting tokens with the local dev key; "
        "anything facing real agents is `production`.",
    )
    max_body_bytes: int = setting(
        10 * 1024 * 1024,
        doc="Largest request or response body (after content decoding) the gateway will inspect. "
        "Larger request bodies get 413, larger responses 502; nothing passes unredacted.",
    )

    max_header_bytes: int = setting(
        64 * 1024,
        doc="Largest request head (request line and headers) accepted, and largest response head "
        "read from an upstream. A client past it gets 431 `headers_too_large`, even while still "
        "sending the head; an upstream's answer becomes 502.",
    )
    max_headers: int = setting(
        256, doc="Most header fields a request may have (431 `headers_too_large` above)."
    )
    header_timeout_seconds: float = setting(
        30.0,
        doc="Longest a client may take to send an HTTP/1 request head (from the connection's "
        "start, or the first byte of a later head); past it the connection is closed with 408 "
        "`header_timeout`, before any authentication.",
    )

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        if self.max_body_bytes <= 0:
            yield "max_body_bytes", "must be positive"
        if self.max_header_bytes < 8192:
            yield "max_header_bytes", "must be at least 8192 (tokens travel in headers)"
        if self.max_headers < 16:
            yield "max_headers", "must be at least 16"
        if not 1 <= self.header_timeout_seconds <= 3600:
            yield "header_timeout_seconds", "must be between 1 and 3600"


@dataclasses.dataclass(frozen=True)
class KeyConfig:
    id: str = setting(doc="A label for this key source, used in logs.")
    algorithms: tuple[str, ...] = setting(
        doc="Algorithms accepted with this key. Never `none`; HS* only with `hmac_secret`."
    )
    jwks_file: Path | None = setting(None, doc="A JWKS file of public keys.")
    jwks_url: str | None = setting(
        None,
        doc="An https URL serving a JWKS (plain http only to loopback); cached, refetched "
        "when `auth.jwks_cache_seconds` have passed or a token names an unknown `kid`.",
    )
    public_key_file: Path | None = setting(
        None, doc="A PEM public key (RSA, EC or Ed25519) or certificate. Never a private key."
    )
    hmac_secret: SecretRef | None = setting(
        None,
        doc="A shared secret for HS256/384/512 (at least as long as the hash). "
        "Only when explicitly configured.",
    )
    kid: str | None = setting(
        None,
        doc="The `kid` tokens signed with `public_key_file` or `hmac_secret` carry. Needed "
        "when several keys are configured; a JWKS names its own keys.",
    )

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        sources = [
            name
            for name in ("jwks_file", "jwks_url", "public_key_file", "hmac_secret")
            if getattr(self, name) is not None
        ]
        if len(sources) != 1:
            yield "", "needs exactly one of jwks_file, jwks_url, public_key_file, hmac_secret"
        if not self.algorithms:
            yield "algorithms", "must list at least one algorithm"
        allowed = HMAC_ALGORITHMS if self.hmac_secret is not None else ASYMMETRIC_ALGORITHMS
        for i, alg in enumerate(self.algorithms):
            if alg not in allowed:
                kind = "an hmac_secret" if self.hmac_secret is not None else "a public key"
                yield f"algorithms[{i}]", f"{alg!r} cannot be used with {kind}"
        if self.kid is not None and (self.jwks_file is not None or self.jwks_url is not None):
            yield "kid", "a JWKS names its own keys; kid is for public_key_file or hmac_secret"
        if self.kid == "":
            yield "kid", "must not be empty"


@dataclasses.dataclass(frozen=True)
class AuthSection:
    keys: tuple[KeyConfig, ...] = setting(doc="Where token-signing keys come from.")
    issuers: tuple[str, ...] = setting(doc="Accepted `iss` values.")
    audiences: tuple[str, ...] = setting(doc="Accepted `aud` values.")
    token_sources: tuple[TokenSource, ...] = setting(
        ("proxy_authorization", "authorization", "x_api_key", "api_key"),
        doc="Where a caller's token may come from: the proxy password (`Proxy-Authorization`, "
        "Basic or Bearer, covering the whole CONNECT tunnel) and/or the inner request's "
        "`Authorization: Bearer`, `x-api-key` or `api-key` header. Sources not listed are "
        "ignored; every one of these headers is stripped before a request goes upstream.",
    )
    leeway_seconds: int = setting(
        verifier.TokenPolicy.leeway_seconds, doc="Clock skew allowed for `exp`, `nbf` and `iat`."
    )
    required_claims: tuple[str, ...] = setting(
        verifier.TokenPolicy.required_claims,
        doc="Claims every token must carry on top of `iss`, `aud`, `sub` and `exp` "
        "(dotted paths allowed).",
    )
    groups_claim: str = setting(
        verifier.TokenPolicy.groups_claim,
        doc="Claim holding the caller's groups (a dotted path such as `realm_access.roles`).",
    )
    max_token_bytes: int = setting(
        verifier.TokenPolicy.max_token_bytes, doc="Longer tokens are rejected before parsing."
    )
    max_token_age_seconds: int | None = setting(
        None, doc="Reject tokens issued (`iat`) longer ago than this."
    )
    jwks_refetch_min_seconds: int = setting(
        30,
        doc="At most one JWKS refetch per this many seconds, however many unknown `kid`s arrive.",
    )
    jwks_cache_seconds: int = setting(3600, doc="Refetch a JWKS URL after this long.")

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        if not self.keys:
            yield "keys", "must list at least one key source"
        if not self.issuers:
            yield "issuers", "must list at least one issuer"
        if not self.audiences:
            yield "audiences", "must list at least one audience"
        if not self.token_sources:
            yield "token_sources", "must list at least one token source"
        for name in ("issuers", "audiences", "required_claims"):
            for i, value in enumerate(getattr(self, name)):
                if not value:
                    yield f"{name}[{i}]", "must not be empty"
        if not self.groups_claim:
            yield "groups_claim", "must not be empty"
        if self.leeway_seconds < 0:
            yield "leeway_seconds", "must not be negative"
        if self.max_token_bytes <= 0:
            yield "max_token_bytes", "must be positive"
        if self.max_token_age_seconds is not None and self.max_token_age_seconds <= 0:
            yield "max_token_age_seconds", "must be positive"
        if self.jwks_refetch_min_seconds < 0:
            yield "jwks_refetch_min_seconds", "must not be negative"
        if not 0 < self.jwks_cache_seconds <= JWKS_MAX_STALE_SECONDS:
            yield "jwks_cache_seconds", f"must be between 1 and {JWKS_MAX_STALE_SECONDS}"
        ids = [k.id for k in self.keys]
        for i, key_id in enumerate(ids):
            if ids.index(key_id) != i:
                yield f"keys[{i}].id", f"duplicate key id {key_id!r}"
        # Build the key sources exactly as the gateway will, so a key file that does not load
        # (no usable key, a private key, a weak key) is reported here, by key path.
        for i, key in enumerate(self.keys):
            try:
                build_key_source(key, self)
            except (auth_keys.KeySourceError, SecretUnavailable) as e:
                yield f"keys[{i}]", str(e)


def build_key_source(key: KeyConfig, auth: AuthSection) -> auth_keys.KeySource:
    """The verification key source a `KeyConfig` describes. No network I/O.

    Raises KeySourceError (or SecretUnavailable for `hmac_secret`) when it cannot be used.
    """
    if key.jwks_file is not None:
        return auth_keys.JwksFileSource(key.jwks_file, algorithms=key.algorithms)
    if key.jwks_url is not None:
        return auth_keys.JwksUrlSource(
            key.jwks_url,
            algorithms=key.algorithms,
            min_refetch_interval=auth.jwks_refetch_min_seconds,
            max_age=auth.jwks_cache_seconds,
            max_stale=JWKS_MAX_STALE_SECONDS,
        )
    if key.public_key_file is not None:
        return auth_keys.PemKeySource(key.public_key_file, kid=key.kid, algorithms=key.algorithms)
    if key.hmac_secret is not None:
        return auth_keys.SharedSecretSource(
            key.hmac_secret.read().encode("utf-8"),
            kid=key.kid,
            algorithms=key.algorithms,
            origin=f"hmac_secret {key.hmac_secret.describe()}",
        )
    raise auth_keys.KeySourceError(f"key {key.id!r}: no key source configured")


def build_verifier(auth: AuthSection) -> verifier.TokenVerifier:
    """The token verifier for a validated `auth` section (what CallerAuth and mint-token use)."""
    policy = verifier.TokenPolicy(
        issuers=auth.issuers,
        audiences=auth.audiences,
        leeway_seconds=auth.leeway_seconds,
        required_claims=auth.required_claims,
        max_token_bytes=auth.max_token_bytes,
        groups_claim=auth.groups_claim,
        max_token_age_seconds=auth.max_token_age_seconds,
    )
    return verifier.TokenVerifier([build_key_source(key, auth) for key in auth.keys], policy)


@dataclasses.dataclass(frozen=True)
class InjectConfig:
    header: str = setting("authorization", doc="Header that carries the credential upstream.")
    template: str = setting(
        "Bearer {secret}", doc="Header value; `{secret}` is replaced by the credential."
    )

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        if self.template.count("{secret}") != 1:
            yield "template", "must contain `{secret}` exactly once"
        if not self.template.isprintable() or not self.template.isascii():
            yield "template", "must be printable ASCII"
        if not _HEADER_NAME.fullmatch(self.header):
            yield "header", "must be a valid header name"
        elif self.header.lower() in _RESERVED_HEADERS:
            yield "header", f"{self.header!r} cannot carry a credential"


@dataclasses.dataclass(frozen=True)
class Route:
    name: str = setting(doc="Route name, recorded with each flow and used in credential markers.")
    host: str = setting(
        doc="Verified upstream host (server address / SNI), e.g. `api.openai.com`; "
        "`*.openai.azure.com` matches any subdomain. Never matched against the Host header."
    )
    port: int = setting(443, doc="Upstream port.")
    scheme: Literal["https", "http"] = setting(
        "https", doc="`http` is only for internal services and never carries a credential."
    )
    path_prefix: str = setting(
        "/",
        doc="Only requests whose path starts with this (segment-wise, case-sensitive, "
        "percent-decoded) use the route. Paths upstreams could read differently (`;`, `\\`, "
        "`%2F`, `.`/`..`, `//`, control characters) are refused with 400 `invalid_path`.",
    )
    groups: tuple[str, ...] = setting(
        (), doc="Groups allowed to use the route; empty means any authenticated caller."
    )
    credential: SecretRef | None = setting(
        None, doc="The hidden upstream credential injected for this route."
    )
    inject: InjectConfig = setting(doc="How the credential is injected.", factory=InjectConfig)
    mcp: bool = setting(
        False,
        doc="The upstream is an MCP server (streamable HTTP): POST bodies must be JSON-RPC "
        "(400 `mcp_invalid_message` otherwise), `tools/list` answers are filtered to the tools "
        "the caller may call and pinned (see `mcp`), and recordings name the method and tool.",
    )

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        if not self.name or not self.name.isprintable() or any(c in self.name for c in "[] "):
            yield "name", "must be a non-empty name without spaces or brackets"
        if not _valid_route_host(self.host):
            yield "host", "must be a host name, `*.<domain>` or an IP address (port in `port`)"
        if not 0 < self.port < 65536:
            yield "port", "must be between 1 and 65535"
        if not self.path_prefix.startswith("/"):
            yield "path_prefix", "must start with /"
        else:
            try:
                canonical_path(self.path_prefix)
            except AmbiguousPath as e:
                yield "path_prefix", f"has {e.reason}; no request path could match it"
        if self.scheme == "http" and self.credential is not None:
            yield "credential", "credentials are only injected over https"


@dataclasses.dataclass(frozen=True)
class RedactionSection:
    rules: tuple[Path, ...] = setting(
        (DEFAULT_RULES_DIR,), doc="Rule files or directories of `*.yaml` rule files."
    )
    profile: str = setting("default", doc="Rule profile to enable (rules list their profiles).")
    enable: tuple[str, ...] = setting((), doc="Rule ids to enable on top of the profile.")
    disable: tuple[str, ...] = setting((), doc="Rule ids to disable.")
    requests: bool = setting(True, doc="Redact request bodies before they leave the gateway.")
    responses: bool = setting(True, doc="Redact response bodies before the agent sees them.")
    tag: Literal["plain", "keyed"] = setting(
        "plain",
        doc="`plain`: `[REDACTED:<rule-id>]`; `keyed`: `[REDACTED:<rule-id>:<8 hex>]` (HMAC), so "
        "the same secret maps to the same tag without revealing it.",
    )
    tag_key: SecretRef | None = setting(None, doc="HMAC key for keyed tags.")
    max_hold_chars: int = setting(
        4096,
        doc="Streams: most characters held back per channel while they could still become a "
        "secret; past this the held text is redacted, never released raw. Keep it above the "
        "longest secret you expect (JWTs, PEM bodies are matched from their head).",
    )
    binary_bodies: Literal["pass", "block"] = setting(
        "block", doc="What to do with bodies that cannot be redacted as text (images, archives)."
    )
    unknown_content_types: Literal["text", "pass", "block"] = setting(
        "text", doc="Bodies with a content type that is neither JSON, text nor form data."
    )
    worker_processes: int = setting(
        2,
        doc="Worker processes that redact buffered bodies larger than `process_bytes`, so a "
        "large body never stalls other callers on the event loop. `0`: on a thread of the gateway "
        "process instead (it shares the interpreter lock with the event loop, and a runaway "
        "cannot be stopped, only abandoned).",
    )
    process_bytes: int = setting(
        16384,
        doc="Buffered bodies (after content decoding) and query strings larger than this many "
        "bytes are redacted by a worker process (smaller ones: on the event loop, over 4 KiB on a "
        "thread).",
    )
    budget_seconds: float = setting(
        10.0,
        doc="Most time one body's redaction may take, waiting for a free worker included. Past it "
        "the worker is killed and the message refused (503 `redaction_timeout`); a worker that "
        "dies gives 503 `redaction_unavailable`. Nothing is forwarded either way.",
    )

    # The compiled rule pack, built once while the config is validated (not a config key).
    pack: RulePack | None = dataclasses.field(default=None, init=False, compare=False, repr=False)

    def check(self, parser: Parser) -> Iterable[tuple[str, str] | Problem]:
        if self.tag == "keyed" and self.tag_key is None:
            yield "tag_key", "required when tag is `keyed`"
        if self.max_hold_chars < 256:
            yield "max_hold_chars", "must be at least 256"
        if not 0 <= self.worker_processes <= 64:
            yield "worker_processes", "must be between 0 and 64"
        if self.process_bytes < 4096:
            yield "process_bytes", "must be at least 4096"
        if not 0 < self.budget_seconds <= 3600:
            yield "budget_seconds", "must be more than 0 and at most 3600"
        missing = False
        for i, path in enumerate(self.rules):
            if not path.exists():
                missing = True
                yield f"rules[{i}]", f"no such file or directory: {path}"
        if missing:
            return
        try:
            pack = load_rule_pack(
                list(self.rules), self.profile, enable=self.enable, disable=self.disable
            )
        except RuleFileError as e:  # names the rule file and the key inside it
            yield Problem(str(e.file), e.key_path, e.message)
            return
        except RuleSelectionError as e:
            yield "", str(e)
            return
        object.__setattr__(self, "pack", pack)


_POLICY_ID = regex.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_METHOD = regex.compile(r"[A-Z]{1,20}")


@dataclasses.dataclass(frozen=True)
class PatternConfig:
    regex: Regex = setting(
        doc="Regular expression (Python `regex` module syntax; `(?i)` for case-insensitive)."
    )
    min_count: int = setting(
        1, doc="The pattern is found when it matches at least this many times in one body."
    )
    description: str = setting("", doc="What the pattern is for (shown in docs and logs).")

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        if self.min_count < 1:
            yield "min_count", "must be at least 1"


@dataclasses.dataclass(frozen=True)
class MatchConfig:
    """Conditions of a policy rule or rate limit: all given conditions must hold."""

    hosts: tuple[str, ...] = setting(
        (),
        doc="Destination hosts (verified upstream host, never the Host header): `example.com`, "
        "`*.example.com` (subdomains), optionally with `:port`.",
    )
    routes: tuple[str, ...] = setting((), doc="Route names (see `routes`).")
    methods: tuple[str, ...] = setting((), doc="HTTP methods, e.g. `POST`.")
    paths: tuple[Regex, ...] = setting(
        (),
        doc="Regular expressions matched against the WHOLE path (without the query string), "
        "percent-decoded and ignoring case; ambiguous paths never get here (see `path_prefix`).",
    )
    groups: tuple[str, ...] = setting((), doc="The caller is in any of these groups.")
    subjects: tuple[str, ...] = setting((), doc="The caller's subject is one of these.")
    body_patterns: tuple[str, ...] = setting(
        (),
        doc="Names of body patterns (built-in or from `policy.patterns`); any one found matches.",
    )
    body_larger_than: int | None = setting(
        None, doc="The body (after content decoding) is larger than this many bytes."
    )
    mcp_methods: tuple[str, ...] = setting(
        (),
        doc="JSON-RPC methods of an MCP (or any JSON-RPC) request, globs: `tools/call`, "
        "`resources/*`. Each message of a batch is judged alone; the most severe decision wins.",
    )
    mcp_tools: tuple[str, ...] = setting(
        (),
        doc="Tools of a `tools/call`, globs (case-sensitive): `search`, `read_*`. Also decides "
        "which tools `tools/list` answers show the caller (those a call of would not be blocked).",
    )

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        for key, names in (("mcp_methods", self.mcp_methods), ("mcp_tools", self.mcp_tools)):
            for i, name in enumerate(names):
                if not name or not name.isprintable():
                    yield f"{key}[{i}]", "must be a non-empty name or glob"
        for i, host in enumerate(self.hosts):
            try:
                HostPattern.parse(host)
            except ValueError as e:
                yield f"hosts[{i}]", str(e)
        for i, method in enumerate(self.methods):
            if not _METHOD.fullmatch(method):
                yield f"methods[{i}]", "must be an upper-case HTTP method such as POST"
        if self.body_larger_than is not None and self.body_larger_than < 0:
            yield "body_larger_than", "must not be negative"

    @property
    def needs_body(self) -> bool:
        return bool(self.body_patterns) or self.body_larger_than is not None


@dataclasses.dataclass(frozen=True)
class PolicyRuleConfig:
    id: str = setting(doc="Stable rule id, shown to the agent and recorded with the flow.")
    action: Literal["allow", "block", "hold", "redact_only"] = setting(
        doc="`allow`; `block` (403); `hold` for an approver; `redact_only`: replace what the "
        "rule's `body_patterns` matched by `[REDACTED:policy:<id>]` and let it pass."
    )
    phase: Literal["request", "response"] = setting(
        "request", doc="Evaluate on the request, or on the upstream's response."
    )
    message: str = setting("", doc="Human explanation, shown to the agent and the approver.")
    match: MatchConfig = setting(
        doc="When the rule applies (no conditions: always).", factory=MatchConfig
    )

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        if not _POLICY_ID.fullmatch(self.id):
            yield "id", "must be 1-64 letters, digits, `_`, `.`, `:` or `-`"
        if self.action == "redact_only" and not self.match.body_patterns:
            yield "match.body_patterns", "a redact_only rule needs body_patterns to redact"


@dataclasses.dataclass(frozen=True)
class RateLimitConfig:
    id: str = setting(doc="Stable id, named in 429 answers and recorded with the flow.")
    requests: int = setting(doc="Requests admitted per window.")
    window_seconds: float = setting(doc="Length of the sliding window.")
    per: Literal["caller", "caller_and_route", "route"] = setting(
        "caller_and_route",
        doc="What is counted separately: each caller, each caller on each route (unrouted: "
        "host:port), or each route for everyone together.",
    )
    message: str = setting("", doc="Human explanation added to the 429 answer.")
    match: MatchConfig = setting(
        doc="Which requests count (no body conditions).", factory=MatchConfig
    )

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        if not _POLICY_ID.fullmatch(self.id):
            yield "id", "must be 1-64 letters, digits, `_`, `.`, `:` or `-`"
        if self.requests < 1:
            yield "requests", "must be at least 1"
        if not self.window_seconds > 0:
            yield "window_seconds", "must be positive"
        if self.match.needs_body:
            yield "match", "rate limits cannot use body_patterns or body_larger_than"


@dataclasses.dataclass(frozen=True)
class PolicySection:
    rules: tuple[PolicyRuleConfig, ...] = setting(
        (),
        doc="Evaluated in order per phase; the FIRST rule whose conditions all hold decides. "
        "Put narrow exceptions before the general rule.",
    )
    default_action: Literal["allow", "block", "hold"] = setting(
        "allow", doc="Requests no rule matches. (Responses no rule matches are allowed.)"
    )
    default_message: str = setting(
        "", doc="Message for requests decided by `default_action` (block or hold)."
    )
    rate_limits: tuple[RateLimitConfig, ...] = setting(
        (),
        doc="Checked after the rules for every request that is not blocked; all matching "
        "limits must admit it (429 with Retry-After otherwise).",
    )
    patterns: Mapping[str, PatternConfig] = setting(
        doc="Named body patterns for `body_patterns`, in addition to the built-in ones.",
        factory=dict,
    )
    scan_timeout_seconds: float = setting(
        2.0,
        doc="Most time one pattern may take on one body; past it the body is refused "
        "as uninspectable.",
    )
    stream_window_chars: int = setting(
        8192,
        doc="Streamed responses: matches up to this long are found across chunk boundaries.",
    )

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        known = {**BUILTIN_PATTERNS, **self.patterns}
        for name in self.patterns:
            if name in BUILTIN_PATTERNS:
                yield f"patterns.{name}", "is a built-in pattern name; choose another name"
            elif not _POLICY_ID.fullmatch(name):
                yield f"patterns.{name}", "names are 1-64 letters, digits, `_`, `.`, `:` or `-`"
        ids: dict[str, str] = {}
        for where, entry in self.entries():
            if entry.id in ids:
                yield f"{where}.id", f"duplicate id {entry.id!r} (also {ids[entry.id]})"
            ids.setdefault(entry.id, where)
            for j, name in enumerate(entry.match.body_patterns):
                if name not in known:
                    names = ", ".join(sorted(known))
                    yield (
                        f"{where}.match.body_patterns[{j}]",
                        f"unknown pattern {name!r}; known: {names}",
                    )
        if self.scan_timeout_seconds <= 0:
            yield "scan_timeout_seconds", "must be positive"
        if self.stream_window_chars < 256:
            yield "stream_window_chars", "must be at least 256"

    def entries(self) -> Iterable[tuple[str, PolicyRuleConfig | RateLimitConfig]]:
        """Rules and rate limits with their key paths inside the section."""
        yield from ((f"rules[{i}]", r) for i, r in enumerate(self.rules))
        yield from ((f"rate_limits[{i}]", r) for i, r in enumerate(self.rate_limits))

    @property
    def uses_hold(self) -> bool:
        return self.default_action == "hold" or any(r.action == "hold" for r in self.rules)


_LOOPBACK_NAMES = ("localhost",)


@dataclasses.dataclass(frozen=True)
class ApprovalsSection:
    admin_token: SecretRef = setting(
        doc="Bearer token of the approvals control API (at least 24 characters)."
    )
    listen_host: str = setting(
        "127.0.0.1", doc="Loopback address of the control API (it is never exposed)."
    )
    listen_port: int = setting(
        8790, doc="Port of the control API; 0 picks a free port (logged at start-up)."
    )
    timeout_seconds: float = setting(
        300.0,
        doc="A held flow no approver decided on within this time is denied (403). Agents' "
        "HTTP timeouts must be longer, or they give up first.",
    )
    max_grant_minutes: float = setting(
        480.0, doc="Longest allowance an approval may grant (`--grant-minutes`)."
    )
    webhook_url: SecretRef | None = setting(
        None,
        doc="URL notified (POST JSON) of every new pending approval. A secret reference, since "
        "chat webhook URLs carry their own credential. Failures are logged, never blocking.",
    )
    webhook_timeout_seconds: float = setting(5.0, doc="Timeout of one webhook POST.")
    webhook_format: Literal["json", "slack", "teams"] = setting(
        "json",
        doc="Payload of webhook POSTs: `json` (generic), `slack` (Block Kit, for an incoming "
        "webhook) or `teams` (an Adaptive Card, for a Teams incoming webhook or Workflow). "
        "Sent for a new approval (once, however often the agent retries) and when it is "
        "approved, denied, expires or is cancelled.",
    )
    approval_url: str | None = setting(
        None,
        doc="Link to an approval in your console, `{id}` replaced by the approval id; webhook "
        "messages carry it (Slack: a button, Teams: an Open URL action).",
    )
    require_reason: bool = setting(
        True, doc="Approvers must give a reason to approve or deny (recorded with the flow)."
    )
    retry_grace_seconds: float = setting(
        30.0,
        doc="A held request whose client goes away (an SDK timing out to retry) leaves its "
        "approval pending this long, so the retry joins it instead of opening another; with "
        "no retry by then it is cancelled (and the webhook told).",
    )
    preview_chars: int = setting(
        2048,
        doc="A held request keeps this many characters of its body, REDACTED with the request "
        "rules (responses: also the injected key), for approvers to see (console, `approvals "
        "show`; never webhooks). 0 keeps none.",
    )

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        if self.retry_grace_seconds < 0:
            yield "retry_grace_seconds", "must not be negative"
        if not 0 <= self.preview_chars <= 65536:
            yield "preview_chars", "must be between 0 and 65536"
        if self.approval_url is not None:
            link = urllib.parse.urlsplit(self.approval_url)
            if link.scheme not in ("https", "http") or not link.hostname:
                yield "approval_url", "must be an http(s) URL"
            elif "{id}" not in self.approval_url:
                yield "approval_url", "must contain `{id}` (the approval id)"
        if not _is_loopback(self.listen_host):
            yield "listen_host", "must be a loopback address (127.0.0.1, ::1 or localhost)"
        if not 0 <= self.listen_port < 65536:
            yield "listen_port", "must be between 0 and 65535"
        if not self.timeout_seconds > 0:
            yield "timeout_seconds", "must be positive"
        if not self.max_grant_minutes > 0:
            yield "max_grant_minutes", "must be positive"
        if not self.webhook_timeout_seconds > 0:
            yield "webhook_timeout_seconds", "must be positive"
        try:
            if len(self.admin_token.read()) < 24:
                yield "admin_token", "must be at least 24 characters long"
        except SecretUnavailable:
            pass  # already reported by the parser
        if self.webhook_url is not None:
            try:
                url = urllib.parse.urlsplit(self.webhook_url.read())
            except (SecretUnavailable, ValueError):
                url = None
            if url is not None and not (
                url.scheme == "https" or (url.scheme == "http" and _is_loopback(url.hostname or ""))
            ):
                yield "webhook_url", "must be an https:// URL (http only for loopback)"


@dataclasses.dataclass(frozen=True)
class ConsoleSection:
    enabled: bool = setting(
        True, doc="Serve the web console at `/console` on the control listener."
    )
    approvers: tuple[str, ...] = setting(
        (),
        doc="Groups (`auth.groups_claim`) whose members may sign in with their own token from "
        "the identity provider (verified like callers' tokens) and approve, deny and revoke. "
        "The admin token always may.",
    )
    investigators: tuple[str, ...] = setting(
        (),
        doc="Groups whose members may sign in with their own token and view approvals, "
        "activity and recordings, but not decide.",
    )
    session_minutes: float = setting(
        480.0,
        doc="How long a console sign-in lasts (a token's own expiry ends it sooner). Rotating "
        "the admin token signs everybody out.",
    )
    secure_cookie: Literal["auto", "always", "never"] = setting(
        "auto",
        doc="`Secure` on the session cookie: `auto` when the browser came over TLS through your "
        "reverse proxy (`X-Forwarded-Proto: https`), `always`, or `never`.",
    )
    allowed_hosts: tuple[str, ...] = setting(
        (),
        doc="Host names (or host:port) the console answers to besides loopback names, e.g. "
        "your reverse proxy's; any other Host header gets 421 (DNS rebinding).",
    )

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        if not self.session_minutes > 0:
            yield "session_minutes", "must be positive"
        for i, host in enumerate(self.allowed_hosts):
            if not host or any(c in host for c in "/@ *?#\\"):
                yield f"allowed_hosts[{i}]", "must be a host name or host:port"


_KEY_PREFIX = re.compile(r"[A-Za-z0-9_.:{}\-]{1,64}")


@dataclasses.dataclass(frozen=True)
class StateTlsConfig:
    ca_file: Path | None = setting(
        None, doc="CA that signed Redis' certificate (default: the system's CAs). Always verified."
    )
    cert_file: Path | None = setting(None, doc="Client certificate (mutual TLS).")
    key_file: Path | None = setting(None, doc="Key of the client certificate.")

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        if (self.cert_file is None) != (self.key_file is None):
            yield "cert_file", "cert_file and key_file go together"


@dataclasses.dataclass(frozen=True)
class StateSection:
    backend: Literal["memory", "redis"] = setting(
        "memory",
        doc="Where approvals, grants, rate-limit windows and decision history live: `memory` "
        "(this process: one replica) or `redis` (shared by every replica; see "
        "docs/DEPLOYMENT.md).",
    )
    url: SecretRef | None = setting(
        None,
        doc="redis: `redis://host:port/db` or `rediss://` (TLS). A secret reference: a URL may "
        "embed credentials.",
    )
    password: SecretRef | None = setting(
        None, doc="redis: password (AUTH), read again for every new connection (rotation)."
    )
    username: str | None = setting(None, doc="redis: ACL user name.")
    tls: StateTlsConfig | None = setting(
        None, doc="redis: TLS settings (TLS is also on for a `rediss://` URL)."
    )
    key_prefix: str = setting(
        "sluicegate:",
        doc="redis: prefix of every key and channel; one per deployment sharing a Redis.",
    )
    timeout_seconds: float = setting(
        2.0, doc="redis: connect and command timeout; past it Redis counts as unavailable."
    )
    on_unavailable: Literal["refuse", "local"] = setting(
        "refuse",
        doc="redis unreachable: `refuse` answers 503 `state_unavailable` to flows that need "
        "shared state (holds, grants, rate limits; other flows go on), `local` falls back to "
        "this replica's memory with a warning once a minute. It reconnects by itself.",
    )
    history_size: int = setting(
        10_000, doc="Decisions and revocations kept in the history (approximately, on Redis)."
    )

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        if self.backend == "redis":
            if self.url is None:
                yield "url", "required for backend: redis"
            else:
                try:
                    url = urllib.parse.urlsplit(self.url.read())
                except (SecretUnavailable, ValueError):
                    url = None
                if url is not None and (url.scheme not in ("redis", "rediss") or not url.hostname):
                    yield "url", "must be a redis:// or rediss:// URL"
        if not _KEY_PREFIX.fullmatch(self.key_prefix):
            yield "key_prefix", "1-64 letters, digits or `_ . : - { }`"
        if not 0 < self.timeout_seconds <= 60:
            yield "timeout_seconds", "must be above 0 and at most 60"
        if self.history_size < 1:
            yield "history_size", "must be at least 1"


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


DEFAULT_MASKED_HEADERS = (
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "cookie",
    "set-cookie",
)


@dataclasses.dataclass(frozen=True)
class RecordingSection:
    directory: Path = setting(
        doc="Where session files go: `<identity>/<start>-<pid>-<rand>.mitm` plus a `.chain` "
        "sidecar each. Created (mode 0700) if missing. One gateway process per directory: a "
        "second one refuses to start (a lock, `.gateway.lock`)."
    )
    signing_key: SecretRef = setting(
        doc="Ed25519 private key (PEM) that signs the hash chain of every session. Generate one "
        "with `python -m sluicegate sessions keygen --signing certs/recording-signing.pem`."
    )
    enabled: bool = setting(
        True, doc="Record every flow. Set `false` to silence the start-up warning on purpose."
    )
    audit_log: Path | None = setting(
        None, doc="JSON-lines audit log, one line per flow. Default: `<directory>/audit.jsonl`."
    )
    rotate_bytes: int = setting(64 * 1024 * 1024, doc="Start a new session file past this size.")
    rotate_seconds: int = setting(3600, doc="Start a new session file after this many seconds.")
    idle_seconds: int = setting(
        300, doc="Close (and sign) a session with no new flow for this long."
    )
    retention_days: float | None = setting(
        30, doc="Delete closed sessions last written longer ago than this. Empty: keep."
    )
    retention_bytes: int | None = setting(
        10 * 1024**3,
        doc="Delete the oldest closed sessions while all sessions together exceed this. Empty: "
        "no size limit.",
    )
    min_free_bytes: int = setting(
        64 * 1024 * 1024,
        doc="Treat the disk as full (recording unavailable) below this much free space.",
    )
    fsync: bool = setting(
        False,
        doc="fsync every flow: survives power loss, not just a process crash; costs throughput.",
    )
    on_failure: Literal["refuse", "continue"] = setting(
        "refuse",
        doc="When a flow cannot be recorded: `refuse` answers new requests with 503 "
        "`recording_unavailable` until writes work again; `continue` forwards them and logs an "
        "error per unrecorded flow.",
    )
    mask_headers: tuple[str, ...] = setting(
        DEFAULT_MASKED_HEADERS,
        doc="Headers whose values are recorded as `[masked]` unless they hold a "
        "`[credential:<route>]` marker. Proxy-Authorization is always dropped.",
    )
    seal_to: Path | None = setting(
        None,
        doc="Auditor's X25519 public key (PEM). When set, pre-redaction bodies are stored "
        "encrypted to it with each flow (`sessions unseal` reveals them with the private key).",
    )

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        for name in ("rotate_bytes", "rotate_seconds", "idle_seconds"):
            if getattr(self, name) <= 0:
                yield name, "must be positive"
        if self.min_free_bytes < 0:
            yield "min_free_bytes", "must not be negative"
        if self.retention_days is not None and self.retention_days <= 0:
            yield "retention_days", "must be positive (leave it empty to keep sessions)"
        if self.retention_bytes is not None and self.retention_bytes <= 0:
            yield "retention_bytes", "must be positive (leave it empty for no size limit)"
        if self.directory.exists() and not self.directory.is_dir():
            yield "directory", f"not a directory: {self.directory}"
        try:
            chain.Signer.from_pem(self.signing_key.read())
        except chain.ChainKeyError as e:
            yield "signing_key", str(e)
        except SecretUnavailable:
            pass  # already reported by the parser
        if self.seal_to is not None:
            try:
                sealing.load_public_key(self.seal_to.read_bytes())
            except OSError as e:
                yield "seal_to", f"cannot read {self.seal_to} ({e.strerror})"
            except sealing.SealError as e:
                yield "seal_to", str(e)

    @property
    def audit_log_path(self) -> Path:
        return self.audit_log if self.audit_log is not None else self.directory / "audit.jsonl"


@dataclasses.dataclass(frozen=True)
class WebSocketsSection:
    routes: tuple[str, ...] = setting(
        (),
        doc="Routes on which WebSocket upgrades are allowed; their messages are redacted both "
        "ways. Everywhere else an upgrade request is answered 403 `websocket_blocked` before it "
        "reaches the upstream.",
    )
    binary: Literal["block", "pass"] = setting(
        "block",
        doc="Binary messages on allowed routes cannot be redacted: `block` drops the message and "
        "closes the connection (1008, policy violation); `pass` forwards them unredacted.",
    )
    hold_seconds: float = setting(
        1.0,
        doc="Text messages of one direction are one stream: a message whose end could still "
        "become a secret with the next message is held until the next message decides it, or "
        "this long after the last message, or until either side closes (then released with what "
        "is known, redacted, before the close). A secret split across messages closes the "
        "connection (1008 `websocket_secret_split`).",
    )
    hold_messages: int = setting(
        64,
        doc="Most messages of one direction waiting behind a held one; past it, see "
        "`hold_overflow`.",
    )
    hold_bytes: int = setting(
        16 * 1024 * 1024,
        doc="Most bytes of one direction waiting behind a held message; past it, see "
        "`hold_overflow`.",
    )
    hold_overflow: Literal["release", "close"] = setting(
        "release",
        doc="Past `hold_messages` or `hold_bytes`: `release` what waits with what is known (as "
        "when `hold_seconds` pass; the rest of a secret whose head went out still closes the "
        "connection), or `close` the connection (1009 `websocket_hold_overflow`). Clean text "
        "can wait long: a rule may match hundreds of characters, which realtime deltas of a few "
        "characters each spread over more than 64 messages.",
    )

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        if not 0 < self.hold_seconds <= 60:
            yield "hold_seconds", "must be more than 0 and at most 60"
        if self.hold_messages < 1:
            yield "hold_messages", "must be at least 1"
        if self.hold_bytes < 1024:
            yield "hold_bytes", "must be at least 1024"


@dataclasses.dataclass(frozen=True)
class McpSection:
    pin_tools: bool = setting(
        True,
        doc="Pin MCP tool definitions (name, title, description, input schema) per route the "
        "first time a `tools/list` answer shows them; a later different definition is withheld "
        "from `tools/list` answers until an approver accepts it.",
    )
    on_tool_change: Literal["hold", "block"] = setting(
        "hold",
        doc="A `tools/call` of a tool whose definition changed since it was pinned: `hold` it "
        "for an approver (approving accepts the new definition; needs `approvals`), or `block` "
        "it with a JSON-RPC error until `approvals mcp-accept` accepts the new definition.",
    )


@dataclasses.dataclass(frozen=True)
class AuditWebhookSection:
    url: SecretRef = setting(
        doc="Where each audit line is POSTed (JSON) as it is written, for a SIEM. A secret "
        "reference: collector URLs often carry a token."
    )
    timeout_seconds: float = setting(5.0, doc="Timeout of one POST.")
    retries: int = setting(
        5, doc="Attempts after a failed POST (backing off 0.5 s, 1 s, 2 s... up to 30 s)."
    )
    queue_size: int = setting(
        10000,
        doc="Lines waiting to be sent at most; past it the oldest are dropped (and counted in "
        "`sluicegate_audit_push_dropped_total`). The audit log file keeps every line.",
    )

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        if not self.timeout_seconds > 0:
            yield "timeout_seconds", "must be positive"
        if not 0 <= self.retries <= 100:
            yield "retries", "must be between 0 and 100"
        if self.queue_size < 1:
            yield "queue_size", "must be at least 1"
        try:
            url = urllib.parse.urlsplit(self.url.read())
        except (SecretUnavailable, ValueError):
            url = None
        if url is not None and not (
            url.scheme == "https" or (url.scheme == "http" and _is_loopback(url.hostname or ""))
        ):
            yield "url", "must be an https:// URL (http only for loopback)"


@dataclasses.dataclass(frozen=True)
class TracesSection:
    endpoint: str = setting(
        doc="OTLP/HTTP traces URL of a collector, e.g. `http://otel-collector:4318/v1/traces`: "
        "one span per finished flow (caller, route, decision, refusal, status, redaction "
        "count; never a value, path or token), OTLP's JSON encoding."
    )
    service_name: str = setting("sluicegate", doc="`service.name` of the spans' resource.")
    queue_size: int = setting(
        2048,
        doc="Spans waiting for export at most; past it new spans are dropped (counted in "
        "`sluicegate_trace_spans_dropped_total`). Flows never wait for the collector.",
    )
    batch_size: int = setting(256, doc="Spans per export request at most.")
    flush_seconds: float = setting(1.0, doc="Export what waited this long even when fewer.")
    timeout_seconds: float = setting(
        5.0, doc="Timeout of one export request; a failed one is retried once, then dropped."
    )

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        url = urllib.parse.urlsplit(self.endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            yield "endpoint", "must be an http:// or https:// URL"
        if url.username or url.password:
            yield "endpoint", "must not carry credentials (it is logged and shown)"
        if self.queue_size < 1:
            yield "queue_size", "must be at least 1"
        if not 1 <= self.batch_size <= self.queue_size:
            yield "batch_size", "must be between 1 and queue_size"
        if not self.flush_seconds > 0:
            yield "flush_seconds", "must be positive"
        if not self.timeout_seconds > 0:
            yield "timeout_seconds", "must be positive"


@dataclasses.dataclass(frozen=True)
class MonitoringSection:
    listen_host: str = setting(
        "127.0.0.1",
        doc="Address of the monitoring listener (`/healthz`, `/readyz`, `/metrics`; nothing "
        "else, no secrets): `0.0.0.0` for Kubernetes probes and Prometheus on the pod IP.",
    )
    listen_port: int = setting(9464, doc="Its port; 0 picks a free port (logged at start-up).")
    json_log: Path | None = setting(
        None,
        doc="Also write structured logs here: one JSON object per line, one per finished flow "
        "(request id, caller, route, decision, status, rule counts; never a value) and per "
        "gateway log record, beside mitmproxy's text log.",
    )
    audit_webhook: AuditWebhookSection | None = setting(
        None, doc="Push every audit-log line to an HTTP collector as it is written."
    )
    traces: TracesSection | None = setting(
        None, doc="OpenTelemetry traces: a span per flow, exported only when this is set."
    )

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        yield from _listener_problems(self.listen_host, self.listen_port)


InnerTokenSource = Literal["authorization", "x_api_key", "api_key"]


def _listener_problems(host: str, port: int) -> Iterable[tuple[str, str]]:
    """A listener's address: an IP address (or a loopback name) and a port number."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host not in _LOOPBACK_NAMES:
            yield "listen_host", "must be an IP address (or localhost)"
    if not 0 <= port < 65536:
        yield "listen_port", "must be between 0 and 65535"


@dataclasses.dataclass(frozen=True)
class BaseUrlSection:
    prefixes: Mapping[str, str] = setting(
        doc="Path prefix -> route name, e.g. `/openai: openai` for "
        "`OPENAI_BASE_URL=http://127.0.0.1:8081/openai/v1`. The prefix is removed and the rest "
        "of the path goes to the route's upstream; authentication, routing (the route is chosen "
        "as for a proxied request to that upstream), policy, redaction, injection and recording "
        "are the proxy's. Unknown prefixes get 404 `base_url_unknown_prefix`."
    )
    listen_host: str = setting(
        "127.0.0.1",
        doc="Address of the base-URL listener, for agents that cannot use a proxy (Node before "
        "24, SDKs without proxy support): they are given `http://HOST:PORT/<prefix>` as their "
        "API's base URL. Plain HTTP carries the caller token: keep it on loopback, or have the "
        "agents speak TLS to it (the gateway's CA, as for the proxy).",
    )
    listen_port: int = setting(8081, doc="Its port; 0 picks a free port (logged at start-up).")
    token_sources: tuple[InnerTokenSource, ...] = setting(
        ("authorization", "x_api_key"),
        doc="Where base-URL callers put their token: the SDK's API key (`Authorization: Bearer`, "
        "`x-api-key`, `api-key`). Missing: 401 `missing_token`.",
    )

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        yield from _listener_problems(self.listen_host, self.listen_port)
        if not self.prefixes:
            yield "prefixes", "must name at least one prefix"
        for prefix in self.prefixes:
            problem = prefix_problem(prefix)
            if problem is not None:
                yield f"prefixes.{prefix}", problem
        if not self.token_sources:
            yield "token_sources", "must name at least one header"


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole gateway configuration."""

    version: Literal[1] = setting(doc="Config format version.")
    auth: AuthSection = setting(doc="Caller authentication by JWT.")
    gateway: GatewaySection = setting(doc="Deployment-wide settings.", factory=GatewaySection)
    routes: tuple[Route, ...] = setting(
        (), doc="Upstreams agents may reach, and their credentials."
    )
    unrouted: Literal["deny", "passthrough"] = setting(
        "deny",
        doc="Destinations with no route: `deny` (egress allowlist) or `passthrough` "
        "(forwarded without any credential, still authenticated and redacted; internal "
        "addresses are refused, see `allow_internal`).",
    )
    allow_internal: tuple[str, ...] = setting(
        (),
        doc="Internal addresses (loopback, private, link-local, CGNAT, cloud metadata...) that "
        "unrouted traffic and wildcard routes may reach anyway: an IP or CIDR block, or a host "
        "name, optionally with `:port` (`10.0.0.0/8`, `127.0.0.1:9000`, `db.corp:5432`). Checked "
        "on the address connected to; a route with an exact host always reaches the host and "
        "port it names.",
    )
    redaction: RedactionSection = setting(
        doc="Secret and PII redaction in both directions.", factory=RedactionSection
    )
    policy: PolicySection = setting(
        doc="Block, hold for approval, redact or rate-limit requests and responses.",
        factory=PolicySection,
    )
    approvals: ApprovalsSection | None = setting(
        None, doc="Just-in-time approval of held flows (required by `hold` rules)."
    )
    recording: RecordingSection | None = setting(
        None,
        doc="Session recording to `.mitm` files, signed hash chains and an audit log. Without "
        "this section nothing is recorded (the gateway warns at start-up): enable it.",
    )
    websockets: WebSocketsSection = setting(
        doc="WebSocket upgrades: blocked unless a route allows them (a side channel otherwise).",
        factory=WebSocketsSection,
    )
    mcp: McpSection = setting(
        doc="MCP servers (routes with `mcp: true`): tool pinning and what a changed tool gets.",
        factory=McpSection,
    )
    state: StateSection = setting(
        doc="Shared state of approvals, grants, rate limits and decision history: this process "
        "(`memory`) or Redis for several replicas.",
        factory=StateSection,
    )
    console: ConsoleSection | None = setting(
        None,
        doc="Web console for approvers and investigators (approvals, activity, recorded "
        "sessions), served by the approvals control listener: needs `approvals`.",
    )
    base_url: BaseUrlSection | None = setting(
        None,
        doc="Base-URL mode: a listener agents use as their API's base URL instead of a proxy "
        "(mitmproxy reverse mode), with the same authentication, routing, policy, redaction, "
        "injection and recording.",
    )
    monitoring: MonitoringSection | None = setting(
        None,
        doc="Service operations: health, readiness and Prometheus metrics on a listener of "
        "their own, structured JSON logs, audit lines pushed to a collector.",
    )
    source: Path = dataclasses.field(default=Path(), init=False, compare=False)

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        names = [r.name for r in self.routes]
        for i, name in enumerate(names):
            if names.index(name) != i:
                yield f"routes[{i}].name", f"duplicate route name {name!r}"
        # Two routes for the same destination and prefix would make the choice arbitrary.
        targets = [
            (normalize_host(r.host), r.port, r.scheme, r.path_prefix.rstrip("/"))
            for r in self.routes
        ]
        for i, target in enumerate(targets):
            first = targets.index(target)
            if first != i:
                same = f"same host, port, scheme and path_prefix as routes[{first}]"
                yield f"routes[{i}]", f"{same} ({names[first]!r})"
        for where, entry in self.policy.entries():
            for j, route in enumerate(entry.match.routes):
                if route not in names:
                    yield f"policy.{where}.match.routes[{j}]", f"no route named {route!r}"
        for j, allowance in enumerate(self.allow_internal):
            try:
                InternalAllowance.parse(allowance)
            except ValueError as e:
                yield f"allow_internal[{j}]", str(e)
        for j, route in enumerate(self.websockets.routes):
            if route not in names:
                yield f"websockets.routes[{j}]", f"no route named {route!r}"
        pins_hold = self.mcp.pin_tools and self.mcp.on_tool_change == "hold"
        if pins_hold and any(r.mcp for r in self.routes) and self.approvals is None:
            yield "approvals", "required: changed MCP tools are held for approval (`mcp`)"
        if self.policy.uses_hold and self.approvals is None:
            yield "approvals", "required: the policy holds flows for approval"
        if self.console is not None and self.console.enabled and self.approvals is None:
            yield "console", "needs an `approvals` section (its listener and admin token)"
        if self.base_url is not None:
            by_name = {r.name: r for r in self.routes}
            for prefix, name in self.base_url.prefixes.items():
                prefixed = by_name.get(name)
                if prefixed is None:
                    yield f"base_url.prefixes.{prefix}", f"no route named {name!r}"
                elif prefixed.host.startswith("*."):
                    yield (
                        f"base_url.prefixes.{prefix}",
                        f"route {name!r} has a wildcard host: a base-URL prefix needs one upstream",
                    )


@functools.lru_cache(maxsize=4096)
def normalize_host(host: str) -> str:
    """Canonical spelling of a host for comparisons: lower case, no trailing dot, IPs compressed.

    Cached: every request compares its host (and SNI) with every route's host."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _valid_route_host(host: str) -> bool:
    wildcard = host.startswith("*.")
    name = host[2:] if wildcard else host
    if not name or not name.isascii() or not name.isprintable():
        return False
    if any(c in name for c in "*/@ []\\?#%"):
        return False
    if ":" in name:  # only an IPv6 address may contain colons, and it takes no wildcard
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return False
        return not wildcard
    return all(name.split("."))


def load_config(file: str | Path) -> Config:
    """Read and validate a config file. Raises ConfigError listing every problem."""
    path = Path(file).expanduser().resolve()
    data = read_yaml(path)
    parser = Parser(path)
    if data is None:
        raise ConfigError([Problem(str(path), "", "file is empty")])
    config = parser.parse(Config, data, "")
    if parser.problems or config is None:
        raise ConfigError(parser.problems)
    object.__setattr__(config, "source", path)
    return config


_cache_lock = threading.Lock()
_cache: tuple[Path, tuple[int, int], Config | ConfigError] | None = None
_failed_at = 0.0
FAILURE_TTL = 10.0


def load_cached(file: str | Path) -> Config:
    """load_config, shared by every addon of the chain: parsed once per file version. A file
    that does not load is not parsed again by every addon either: its error is kept for
    `FAILURE_TTL` seconds (rule files and secrets it names may be fixed without touching it)."""
    global _cache, _failed_at
    path = Path(file).expanduser().resolve()
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError([Problem(str(path), "", f"cannot read file ({e.strerror})")]) from None
    stamp = (st.st_mtime_ns, st.st_size)
    with _cache_lock:
        if _cache is not None and _cache[0] == path and _cache[1] == stamp:
            if not isinstance(_cache[2], ConfigError):
                return _cache[2]
            if time.monotonic() - _failed_at < FAILURE_TTL:
                raise _cache[2]
    try:
        config = load_config(path)
    except ConfigError as e:
        with _cache_lock:
            _cache = (path, stamp, e)
            _failed_at = time.monotonic()
        raise
    with _cache_lock:
        _cache = (path, stamp, config)
    return config
