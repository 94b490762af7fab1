"""The gateway's one YAML config file: its schema and its loader.

Loaded once at start-up (and again only when `sluicegate_config` changes or the file's mtime does),
validated strictly: an unknown key, a wrong type, a regex that does not compile or a secret whose
source is missing stops the gateway with a message naming the file and the key path.
Secrets are never inlined: they are `{env: NAME}` or `{file: PATH}` references (see `SecretRef`).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from sluicegate.schema import (
    ConfigError,
    Parser,
    Problem,
    SecretRef,
    read_yaml,
    setting,
)

__all__ = ["Config", "ConfigError", "Problem", "SecretRef", "load_cached", "load_config"]

REPO_DIR = Path(__file__).resolve().parents[2]
DEFAULT_RULES_DIR = REPO_DIR / "rules"

TokenSource = Literal["proxy_authorization", "authorization", "x_api_key", "api_key"]

ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})


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

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        if self.max_body_bytes <= 0:
            yield "max_body_bytes", "must be positive"


@dataclasses.dataclass(frozen=True)
class KeyConfig:
    id: str = setting(doc="A label for this key source, used in logs.")
    algorithms: tuple[str, ...] = setting(
        doc="Algorithms accepted with this key. Never `none`; HS* only with `hmac_secret`."
    )
    jwks_file: Path | None = setting(None, doc="A JWKS file of public keys.")
    jwks_url: str | None = setting(
        None, doc="An https URL serving a JWKS; cached, refetched on an unknown `kid`."
    )
    public_key_file: Path | None = setting(None, doc="A PEM public key (RSA, EC or Ed25519).")
    hmac_secret: SecretRef | None = setting(
        None, doc="A shared secret for HS256/384/512. Only when explicitly configured."
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
        for name in ("jwks_file", "public_key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                yield name, f"file not found: {path}"
        if self.jwks_url is not None and not self.jwks_url.startswith(
            ("https://", "http://127.0.0.1", "http://localhost")
        ):
            yield "jwks_url", "must be an https:// URL"


@dataclasses.dataclass(frozen=True)
class AuthSection:
    keys: tuple[KeyConfig, ...] = setting(doc="Where token-signing keys come from.")
    issuers: tuple[str, ...] = setting(doc="Accepted `iss` values.")
    audiences: tuple[str, ...] = setting(doc="Accepted `aud` values.")
    token_sources: tuple[TokenSource, ...] = setting(
        ("proxy_authorization", "authorization", "x_api_key", "api_key"),
        doc="Where a caller's token may come from: the proxy password (`Proxy-Authorization`, "
        "Basic or Bearer, covering the whole CONNECT tunnel) and/or the inner request's "
        "`Authorization: Bearer`, `x-api-key` or `api-key` header.",
    )
    leeway_seconds: int = setting(30, doc="Clock skew allowed for `exp`, `nbf` and `iat`.")
    required_claims: tuple[str, ...] = setting(
        ("exp", "iat", "sub"), doc="Claims every token must carry."
    )
    groups_claim: str = setting(
        "groups",
        doc="Claim holding the caller's groups (a dotted path such as `realm_access.roles`).",
    )
    max_token_bytes: int = setting(8192, doc="Longer tokens are rejected before parsing.")
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
        ids = [k.id for k in self.keys]
        for i, key_id in enumerate(ids):
            if ids.index(key_id) != i:
                yield f"keys[{i}].id", f"duplicate key id {key_id!r}"


@dataclasses.dataclass(frozen=True)
class InjectConfig:
    header: str = setting("authorization", doc="Header that carries the credential upstream.")
    template: str = setting(
        "Bearer {secret}", doc="Header value; `{secret}` is replaced by the credential."
    )

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        if self.template.count("{secret}") != 1:
            yield "template", "must contain `{secret}` exactly once"
        if not self.header or any(c in self.header for c in " :\r\n"):
            yield "header", "must be a valid header name"


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
    path_prefix: str = setting("/", doc="Only requests whose path starts with this use the route.")
    groups: tuple[str, ...] = setting(
        (), doc="Groups allowed to use the route; empty means any authenticated caller."
    )
    credential: SecretRef | None = setting(
        None, doc="The hidden upstream credential injected for this route."
    )
    inject: InjectConfig = setting(doc="How the credential is injected.", factory=InjectConfig)

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        if not self.name:
            yield "name", "must not be empty"
        if not self.host or any(c in self.host for c in "/@ ") or self.host.count(":") == 1:
            yield "host", "must be a bare host name or IP address (the port goes in `port`)"
        if not 0 < self.port < 65536:
            yield "port", "must be between 1 and 65535"
        if not self.path_prefix.startswith("/"):
            yield "path_prefix", "must start with /"
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
        512,
        doc="Streams: most characters held back per channel while they could still become a "
        "secret; past this the held text is redacted, never released raw.",
    )
    binary_bodies: Literal["pass", "block"] = setting(
        "block", doc="What to do with bodies that cannot be redacted as text (images, archives)."
    )
    unknown_content_types: Literal["text", "pass", "block"] = setting(
        "text", doc="Bodies with a content type that is neither JSON, text nor form data."
    )

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        if self.tag == "keyed" and self.tag_key is None:
            yield "tag_key", "required when tag is `keyed`"
        if self.max_hold_chars < 16:
            yield "max_hold_chars", "must be at least 16"
        for i, path in enumerate(self.rules):
            if not path.exists():
                yield f"rules[{i}]", f"no such file or directory: {path}"


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
        "(forwarded without any credential, still authenticated and redacted).",
    )
    redaction: RedactionSection = setting(
        doc="Secret and PII redaction in both directions.", factory=RedactionSection
    )
    source: Path = dataclasses.field(default=Path(), init=False, compare=False)

    def check(self, parser: Parser) -> Iterable[tuple[str, str]]:
        names = [r.name for r in self.routes]
        for i, name in enumerate(names):
            if names.index(name) != i:
                yield f"routes[{i}].name", f"duplicate route name {name!r}"


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
_cache: tuple[Path, tuple[int, int], Config] | None = None


def load_cached(file: str | Path) -> Config:
    """load_config, shared by every addon of the chain: parsed once per file version."""
    global _cache
    path = Path(file).expanduser().resolve()
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError([Problem(str(path), "", f"cannot read file ({e.strerror})")]) from None
    stamp = (st.st_mtime_ns, st.st_size)
    with _cache_lock:
        if _cache is not None and _cache[0] == path and _cache[1] == stamp:
            return _cache[2]
    config = load_config(path)
    with _cache_lock:
        _cache = (path, stamp, config)
    return config
