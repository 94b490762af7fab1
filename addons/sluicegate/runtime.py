"""Builders: a validated `Config` into the engine objects the addons run on.

Engines never read config types; everything that turns a config section into an engine object
lives here, so the engines stay importable (and testable, benchmarkable) without the config.
"""

from __future__ import annotations

from sluicegate.config import Config, MatchConfig, PolicySection, StateSection
from sluicegate.policy.conditions import Conditions, HostPattern, compile_path_rule
from sluicegate.policy.decisions import Action, Phase
from sluicegate.policy.engine import Policy
from sluicegate.policy.patterns import BUILTIN_PATTERNS, Pattern, _compile
from sluicegate.policy.ratelimit import Limit
from sluicegate.policy.rules import RateLimitRule, Rule
from sluicegate.redaction.bodies import BodyPolicy
from sluicegate.redaction.offload import OffloadPool, WorkerSetup
from sluicegate.redaction.redactor import KeyedTagger, Redactor, Tagger
from sluicegate.redaction.rules import Direction, RulePack, load_rule_pack
from sluicegate.redaction.runtime import RedactionRuntime
from sluicegate.state import LocalFallback, MemoryState, RedisSettings, RedisState, SharedState


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
            paths=tuple(compile_path_rule(p) for p in match.paths),
            groups=frozenset(match.groups),
            subjects=frozenset(match.subjects),
            body_patterns=tuple(patterns[n] for n in match.body_patterns),
            body_larger_than=match.body_larger_than,
            mcp_methods=tuple(match.mcp_methods),
            mcp_tools=tuple(match.mcp_tools),
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


# The runtime of the config in force: every addon of the chain shares it (one memo of clean
# texts, one cache of redactors with literals), rebuilt only when the config object changes.
_shared: tuple[Config, RedactionRuntime] | None = None


def for_config(config: Config) -> RedactionRuntime:
    """The one redaction runtime of `config`, shared by Redaction, StreamRedaction, WebSockets."""
    global _shared
    shared = _shared
    if shared is not None and shared[0] is config:
        return shared[1]
    runtime = build_redaction(config)
    _shared = (config, runtime)
    if shared is not None and shared[1].offload is not None:
        shared[1].offload.close()  # its workers end once their jobs are done
    return runtime


def build_redaction(config: Config) -> RedactionRuntime:
    """A new redaction runtime for `config` (addons share one: `for_config`)."""
    section = config.redaction
    pack = section.pack
    if pack is None:  # a config built without validation (tests)
        pack = load_rule_pack(
            list(section.rules), section.profile, enable=section.enable, disable=section.disable
        )
    tagger: Tagger | None = None
    tag_key: bytes | None = None
    if section.tag == "keyed":
        assert section.tag_key is not None
        tag_key = section.tag_key.read().encode()
        tagger = KeyedTagger(tag_key)
    no_rules = RulePack(rules=(), key_rules=(), profile="none")
    request = Redactor(pack, Direction.REQUEST, tagger=tagger) if section.requests else None
    response = Redactor(pack, Direction.RESPONSE, tagger=tagger) if section.responses else None
    scrub_only = Redactor(no_rules, Direction.RESPONSE, tagger=tagger)
    # Hyperscan databases and stream indexes now (0.1-0.4 s each), not on the first request;
    # a failure here fails the config being applied (start-up or reload), never a request.
    for redactor in (request, response, scrub_only):
        if redactor is not None:
            redactor.warm()
    offload = None
    if section.worker_processes > 0:
        offload = OffloadPool(
            WorkerSetup(pack, section.requests, section.responses, tag_key),
            workers=section.worker_processes,
            budget_seconds=section.budget_seconds,
        )
    return RedactionRuntime(
        request=request,
        response=response,
        response_scrub_only=scrub_only,
        body_policy=BodyPolicy(
            binary=section.binary_bodies,
            unknown=section.unknown_content_types,
            sse_max_hold=section.max_hold_chars,
            sse_max_event_bytes=min(8 << 20, config.gateway.max_body_bytes),
        ),
        max_hold=section.max_hold_chars,
        max_body_bytes=config.gateway.max_body_bytes,
        offload=offload,
        process_bytes=section.process_bytes,
        budget_seconds=section.budget_seconds,
    )


def build_state(section: StateSection, replica: str) -> SharedState:
    """The `state:` backend (not started: `await state.start()` on the event loop that uses it).

    The URL is read now; the password on every new connection (so it rotates without a restart).
    """
    if section.backend == "memory":
        return MemoryState(replica, history_size=section.history_size)
    assert section.url is not None  # validated
    password = section.password
    tls = section.tls
    settings = RedisSettings(
        url=section.url.read(),
        password=password.read if password is not None else None,
        username=section.username,
        tls=tls is not None,
        ca_file=tls.ca_file if tls else None,
        cert_file=tls.cert_file if tls else None,
        key_file=tls.key_file if tls else None,
        key_prefix=section.key_prefix,
        timeout_seconds=section.timeout_seconds,
        history_size=section.history_size,
    )
    shared = RedisState(settings, replica)
    if section.on_unavailable == "local":
        return LocalFallback(shared, MemoryState(replica, history_size=section.history_size))
    return shared
