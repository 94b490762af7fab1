"""The `policy:` and `approvals:` config sections: strict validation with key paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from sluicegate.config import ConfigError, load_config
from sluicegate.policy.decisions import Action, Phase
from sluicegate.runtime import build_policy

TOKEN_ENV = "SLUICEGATE_TEST_POLICY_ADMIN"
HS_ENV = "SLUICEGATE_TEST_POLICY_HS"


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "a" * 32)
    monkeypatch.setenv(HS_ENV, "h" * 32)


def config(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "version": 1,
        "auth": {
            "keys": [{"id": "k", "hmac_secret": {"env": HS_ENV}, "algorithms": ["HS256"]}],
            "issuers": ["i"],
            "audiences": ["a"],
        },
        "routes": [{"name": "openai", "host": "api.openai.com"}],
    }
    data.update(sections)
    return data


def load(tmp_path: Path, data: dict[str, Any]):
    path = tmp_path / "sluicegate.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def problems(tmp_path: Path, **sections: Any) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, config(tmp_path, **sections))
    return [f"{p.path}: {p.message}" for p in e.value.problems]


APPROVALS = {"admin_token": {"env": TOKEN_ENV}}


def test_full_policy_section_loads_and_compiles(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        config(
            tmp_path,
            policy={
                "rules": [
                    {
                        "id": "paste",
                        "action": "block",
                        "message": "No paste sites.",
                        "match": {"hosts": ["pastebin.com", "*.paste.ee", "localhost:8443"]},
                    },
                    {
                        "id": "files",
                        "action": "hold",
                        "match": {
                            "routes": ["openai"],
                            "methods": ["POST"],
                            "paths": ["/v1/files(/.*)?"],
                            "groups": ["agents"],
                        },
                    },
                    {
                        "id": "hosts",
                        "action": "redact_only",
                        "match": {"body_patterns": ["internal-host"]},
                    },
                    {
                        "id": "pipes",
                        "phase": "response",
                        "action": "block",
                        "match": {"body_patterns": ["pipe-to-shell"]},
                    },
                ],
                "patterns": {"internal-host": {"regex": r"\bdb\d+\.corp\b", "min_count": 1}},
                "rate_limits": [{"id": "rl", "requests": 10, "window_seconds": 60}],
            },
            approvals=APPROVALS,
        ),
    )
    assert cfg.approvals is not None and cfg.approvals.listen_host == "127.0.0.1"
    policy = build_policy(cfg.policy)
    assert [r.id for r in policy.request_rules] == ["paste", "files", "hosts"]
    assert [(r.id, r.phase) for r in policy.response_rules] == [("pipes", Phase.RESPONSE)]
    assert policy.request_rules[2].action is Action.REDACT_ONLY
    assert policy.request_rules[2].when.body_patterns[0].name == "internal-host"
    assert policy.rate_limits[0].limit.requests == 10
    assert policy.uses_hold


def test_defaults_allow_everything_without_an_approvals_section(tmp_path: Path) -> None:
    cfg = load(tmp_path, config(tmp_path))
    assert cfg.approvals is None
    policy = build_policy(cfg.policy)
    assert policy.default.action is Action.ALLOW and not policy.uses_hold


def test_bad_regexes_are_config_errors_naming_the_key_path(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        policy={
            "patterns": {"broken": {"regex": "(unclosed"}},
            "rules": [{"id": "r", "action": "block", "match": {"paths": ["/ok", "[bad"]}}],
        },
    )
    assert any(
        p.startswith("policy.patterns.broken.regex: invalid regular expression") for p in found
    )
    assert any(
        p.startswith("policy.rules[0].match.paths[1]: invalid regular expression") for p in found
    )


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (
            {"rules": [{"id": "r", "action": "block", "match": {"body_patterns": ["nope"]}}]},
            "policy.rules[0].match.body_patterns[0]: unknown pattern 'nope'",
        ),
        (
            {"rules": [{"id": "r", "action": "blok"}]},
            "policy.rules[0].action: must be one of",
        ),
        (
            {"rules": [{"id": "r", "action": "block"}, {"id": "r", "action": "allow"}]},
            "policy.rules[1].id: duplicate id 'r'",
        ),
        (
            {
                "rules": [{"id": "r", "action": "block"}],
                "rate_limits": [{"id": "r", "requests": 1, "window_seconds": 1}],
            },
            "policy.rate_limits[0].id: duplicate id 'r'",
        ),
        (
            {"rules": [{"id": "(default)", "action": "block"}]},
            "policy.rules[0].id: must be 1-64 letters",
        ),
        (
            {"rules": [{"id": "r", "action": "redact_only"}]},
            "policy.rules[0].match.body_patterns: a redact_only rule needs body_patterns",
        ),
        (
            {"rules": [{"id": "r", "action": "block", "match": {"hosts": ["https://x.com"]}}]},
            "policy.rules[0].match.hosts[0]: must be a host name",
        ),
        (
            {"rules": [{"id": "r", "action": "block", "match": {"methods": ["post"]}}]},
            "policy.rules[0].match.methods[0]: must be an upper-case HTTP method",
        ),
        (
            {"rules": [{"id": "r", "action": "block", "match": {"routes": ["nope"]}}]},
            "policy.rules[0].match.routes[0]: no route named 'nope'",
        ),
        (
            {"rules": [{"id": "r", "action": "block", "match": {"grups": ["x"]}}]},
            "policy.rules[0].match.grups: unknown key (did you mean 'groups'?)",
        ),
        (
            {"rate_limits": [{"id": "l", "requests": 0, "window_seconds": 0}]},
            "policy.rate_limits[0].requests: must be at least 1",
        ),
        (
            {
                "rate_limits": [
                    {
                        "id": "l",
                        "requests": 1,
                        "window_seconds": 1,
                        "match": {"body_larger_than": 5},
                    }
                ]
            },
            "policy.rate_limits[0].match: rate limits cannot use body_patterns",
        ),
        (
            {"patterns": {"private-key": {"regex": "x"}}},
            "policy.patterns.private-key: is a built-in pattern name",
        ),
        ({"default_action": "hold"}, "approvals: required: the policy holds flows"),
        (
            {"rules": [{"id": "r", "action": "hold"}]},
            "approvals: required: the policy holds flows",
        ),
    ],
)
def test_policy_problems(tmp_path: Path, policy: dict[str, Any], expected: str) -> None:
    found = problems(tmp_path, policy=policy)
    assert any(p.startswith(expected) for p in found), found


@pytest.mark.parametrize(
    ("approvals", "expected"),
    [
        ({"admin_token": "inline-token-value-inline-token"}, "approvals.admin_token: secrets must"),
        (
            {"admin_token": {"env": "SLUICEGATE_TEST_UNSET"}},
            "approvals.admin_token: secret unavailable",
        ),
        ({**APPROVALS, "listen_host": "0.0.0.0"}, "approvals.listen_host: must be a loopback"),
        ({**APPROVALS, "listen_port": 70000}, "approvals.listen_port: must be between"),
        ({**APPROVALS, "timeout_seconds": 0}, "approvals.timeout_seconds: must be positive"),
        ({**APPROVALS, "webhook_url": "https://hooks.example/x"}, "approvals.webhook_url: secrets"),
        ({**APPROVALS, "listen": 1}, "approvals.listen: unknown key"),
    ],
)
def test_approvals_problems(tmp_path: Path, approvals: dict[str, Any], expected: str) -> None:
    found = problems(tmp_path, approvals=approvals)
    assert any(p.startswith(expected) for p in found), found


def test_short_admin_token_and_plain_http_webhook_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICEGATE_TEST_SHORT", "short")
    monkeypatch.setenv("SLUICEGATE_TEST_HOOK", "http://hooks.example/x")
    found = problems(
        tmp_path,
        approvals={
            "admin_token": {"env": "SLUICEGATE_TEST_SHORT"},
            "webhook_url": {"env": "SLUICEGATE_TEST_HOOK"},
        },
    )
    assert "approvals.admin_token: must be at least 24 characters long" in found
    assert "approvals.webhook_url: must be an https:// URL (http only for loopback)" in found
    assert not any("short" in p.split(":", 1)[1] or "hooks.example" in p for p in found)


def test_loopback_http_webhook_and_ipv6_loopback_are_fine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLUICEGATE_TEST_HOOK", "http://127.0.0.1:9/hook")
    cfg = load(
        tmp_path,
        config(
            tmp_path,
            approvals={
                **APPROVALS,
                "listen_host": "::1",
                "webhook_url": {"env": "SLUICEGATE_TEST_HOOK"},
            },
        ),
    )
    assert cfg.approvals is not None and cfg.approvals.listen_host == "::1"
