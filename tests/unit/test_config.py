"""Strict config loading: every problem named by file and key path."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sluicegate.config import DEFAULT_RULES_DIR as REPO_RULES
from sluicegate.config import ConfigError, load_config
from sluicegate.config.schema import SecretRef, SecretUnavailable


def _jwks() -> str:
    """A JWKS with one usable RSA key: the gateway refuses key sets it cannot verify with."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig"}]})


JWKS = _jwks()


def write(tmp_path: Path, *parts: str) -> Path:
    (tmp_path / "jwks.json").write_text(JWKS)
    path = tmp_path / "gateway.yaml"
    text = "\n".join(textwrap.dedent(part) for part in parts)
    path.write_text(text.replace("RULES", str(REPO_RULES)))
    return path


MINIMAL = """
    version: 1
    auth:
      keys: [{id: k, jwks_file: jwks.json, algorithms: [RS256]}]
      issuers: [https://idp]
      audiences: [sluicegate]
    redaction:
      rules: [RULES]
"""


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return [f"{p.path}: {p.message}" for p in e.value.problems]


def test_minimal_config_loads_with_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.unrouted == "deny"
    assert config.gateway.environment == "production"
    assert config.auth.keys[0].jwks_file == tmp_path / "jwks.json"
    assert config.redaction.rules == (REPO_RULES,)
    assert config.redaction.pack is not None and config.redaction.pack.rules


def test_every_problem_is_reported_with_its_key_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL,
        """
    routes:
      - {name: a, host: api.example.com, credentail: {env: X}}
      - {name: b, host: "api.example.com:443", port: "443"}
    gateway: {max_body_bytes: true}
    unrouted: allow
    """,
    )
    found = problems(path)
    assert any(
        p.startswith("routes[0].credentail: unknown key (did you mean 'credential'?)")
        for p in found
    )
    assert "routes[1].port: must be an integer, not a string" in found
    assert "gateway.max_body_bytes: must be an integer, not a boolean" in found
    assert "unrouted: must be one of 'deny', 'passthrough', not 'allow'" in found


def test_problem_text_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL, "\nextra: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: extra: unknown key")


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL, "\nunrouted: deny\nunrouted: passthrough\n")
    assert any("duplicate key 'unrouted'" in p for p in problems(path))


def test_inline_secret_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL,
        "\nroutes: [{name: a, host: h.example, credential: sk-live-inline}]\n",
    )
    found = problems(path)
    assert found == [
        "routes[0].credential: secrets must not be inlined in the config: "
        "use {env: VAR_NAME} or {file: PATH}"
    ]
    assert "sk-live-inline" not in str(found)


def test_missing_secret_sources_are_reported(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SG_UNIT_MISSING", raising=False)
    path = write(
        tmp_path,
        MINIMAL,
        """
    routes:
      - {name: a, host: a.example, credential: {env: SG_UNIT_MISSING}}
      - {name: b, host: b.example, credential: {file: nowhere/key}}
      - {name: c, host: c.example, credential: {env: X, file: y}}
    """,
    )
    found = problems(path)
    assert (
        "routes[0].credential: secret unavailable: environment variable SG_UNIT_MISSING "
        "is not set or empty" in found
    )
    assert any(p.startswith("routes[1].credential: secret unavailable: secret file") for p in found)
    assert "routes[2].credential: must have exactly one of 'env' or 'file'" in found


def test_credentials_only_over_https(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SG_UNIT_KEY", "k")
    path = write(
        tmp_path,
        MINIMAL,
        "\nroutes: [{name: a, host: a.example, scheme: http, credential: {env: SG_UNIT_KEY}}]\n",
    )
    assert problems(path) == ["routes[0].credential: credentials are only injected over https"]


def test_hmac_algorithms_need_a_shared_secret(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("[RS256]", "[RS256, HS256, none]"))
    found = problems(path)
    assert "auth.keys[0].algorithms[1]: 'HS256' cannot be used with a public key" in found
    assert "auth.keys[0].algorithms[2]: 'none' cannot be used with a public key" in found


def test_file_secret_is_reread_when_it_changes(tmp_path: Path) -> None:
    secret = tmp_path / "key"
    secret.write_text("first\n")
    ref = SecretRef(file=secret)
    assert ref.read() == "first"
    secret.write_text("second-and-longer\n")
    assert ref.read() == "second-and-longer"
    secret.unlink()
    with pytest.raises(SecretUnavailable, match="cannot be read") as e:
        ref.read()
    assert "second" not in str(e.value)


def test_base_url_section(tmp_path: Path) -> None:
    routes = """
    routes:
      - {name: openai, host: api.openai.com}
      - {name: azure, host: "*.openai.azure.com"}
    """
    config = load_config(
        write(tmp_path, MINIMAL, routes, "base_url: {prefixes: {/openai: openai}}")
    )
    assert config.base_url is not None
    assert (config.base_url.listen_host, config.base_url.listen_port) == ("127.0.0.1", 8081)
    assert dict(config.base_url.prefixes) == {"/openai": "openai"}
    assert config.base_url.token_sources == ("authorization", "x_api_key")
    bad = """
    base_url:
      listen_host: gateway.example
      listen_port: 70000
      prefixes: {/openai: nope, openai: openai, /a/../b: openai, /azure: azure}
    """
    found = problems(write(tmp_path, MINIMAL, routes, bad))
    assert "base_url.listen_host: must be an IP address (or localhost)" in found
    assert "base_url.listen_port: must be between 0 and 65535" in found
    assert any(p.startswith("base_url.prefixes.openai: must be `/`") for p in found)
    assert any(p.startswith("base_url.prefixes./a/../b: must") for p in found)
    sources = "base_url: {prefixes: {/openai: openai}, token_sources: [proxy_authorization]}"
    found = problems(write(tmp_path, MINIMAL, routes, sources))
    assert any(p.startswith("base_url.token_sources[0]: must be one of") for p in found)
    # Cross-section checks run once the section itself is valid.
    cross = "base_url: {prefixes: {/openai: nope, /azure: azure}}"
    found = problems(write(tmp_path, MINIMAL, routes, cross))
    assert "base_url.prefixes./openai: no route named 'nope'" in found
    assert any("wildcard host" in p and p.startswith("base_url.prefixes./azure") for p in found)
