"""Shared fixtures: local upstreams with their own CA, a test IdP, and real gateway processes."""

from __future__ import annotations

import copy
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from tests.support.gateway import REPO, Gateway, left_running
from tests.support.pki import TestCA
from tests.support.tokens import TestIdP
from tests.support.upstream import FakeUpstream

# CI runs property tests with a fixed seed, so a landing is never decided by a lucky draw; local
# runs explore new examples (and a failure found there becomes a regression test).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# The hidden upstream credential the gateway injects. Distinctive, so tests can grep for it.
UPSTREAM_KEY = "sk-proj-UPSTREAMSECRET" + secrets.token_hex(12)
UPSTREAM_KEY_ENV = "SLUICEGATE_TEST_UPSTREAM_KEY"


@pytest.fixture(scope="session", autouse=True)
def _no_gateway_left_running() -> Iterator[None]:
    """A test that starts a gateway and never stops it is a bug (a stray proxy on the machine)."""
    yield
    stray = left_running()
    assert not stray, f"{len(stray)} gateway process(es) left running: {stray}"


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def upstream(pki: TestCA) -> Iterator[FakeUpstream]:
    """The fake OpenAI/Anthropic API over HTTPS (its own CA, trusted by the gateway)."""
    server = FakeUpstream(pki.issue("api-upstream"))
    yield server
    server.close()


@pytest.fixture(scope="session")
def other_upstream(pki: TestCA) -> Iterator[FakeUpstream]:
    """A second HTTPS upstream with no route: where an attacker would like to send the key."""
    server = FakeUpstream(pki.issue("other-upstream"))
    yield server
    server.close()


@pytest.fixture(scope="session")
def plain_upstream() -> Iterator[FakeUpstream]:
    """A plain-HTTP upstream (an internal service)."""
    server = FakeUpstream()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _reset_upstreams(request: pytest.FixtureRequest) -> None:
    for name in ("upstream", "other_upstream", "plain_upstream"):
        if name in request.fixturenames:
            request.getfixturevalue(name).reset()


@pytest.fixture(scope="session")
def idp(tmp_path_factory: pytest.TempPathFactory) -> TestIdP:
    return TestIdP(tmp_path_factory.mktemp("idp"))


@pytest.fixture(scope="session")
def upstream_key() -> str:
    return UPSTREAM_KEY


def make_config(idp: TestIdP, upstream: FakeUpstream, plain: FakeUpstream) -> dict[str, Any]:
    """A complete gateway config for the test upstreams. Tests copy and adjust it."""
    return {
        "version": 1,
        "gateway": {"name": "test-gateway", "environment": "development"},
        "auth": idp.auth_config(),
        "routes": [
            {
                "name": "openai",
                "host": "127.0.0.1",
                "port": upstream.port,
                "groups": ["agents"],
                "credential": {"env": UPSTREAM_KEY_ENV},
                "inject": {"header": "authorization", "template": "Bearer {secret}"},
            },
            {
                "name": "internal",
                "host": "127.0.0.1",
                "port": plain.port,
                "scheme": "http",
            },
        ],
        "redaction": {"rules": [str(REPO / "rules")]},
    }


@pytest.fixture(scope="session")
def base_config(idp: TestIdP, upstream: FakeUpstream, plain_upstream: FakeUpstream) -> dict:
    return make_config(idp, upstream, plain_upstream)


GatewayFactory = Callable[..., Gateway]


@pytest.fixture
def start_gateway(tmp_path: Path, pki: TestCA, base_config: dict) -> Iterator[GatewayFactory]:
    """Start gateways with a modified config: `start_gateway(lambda cfg: ...)`; stopped after."""
    started: list[Gateway] = []

    def start(
        edit: Callable[[dict], Any] | None = None,
        *,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        config: dict | Path | None = None,
        **kw: Any,
    ) -> Gateway:
        cfg = copy.deepcopy(base_config) if config is None else config
        if edit is not None and isinstance(cfg, dict):
            edit(cfg)
        gw = Gateway(
            cfg,
            tmp_path / f"gw{len(started)}",
            upstream_ca=pki.cert_file,
            extra_args=extra_args,
            env={UPSTREAM_KEY_ENV: UPSTREAM_KEY, **(env or {})},
            **kw,
        )
        started.append(gw)
        return gw.start()

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture(scope="session")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, pki: TestCA, base_config: dict
) -> Iterator[Gateway]:
    """One gateway with the default test config, shared by tests that do not change it."""
    gw = Gateway(
        copy.deepcopy(base_config),
        tmp_path_factory.mktemp("gateway"),
        upstream_ca=pki.cert_file,
        env={UPSTREAM_KEY_ENV: UPSTREAM_KEY},
    )
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture
def token(idp: TestIdP) -> str:
    """A valid token for a caller in group `agents`."""
    return idp.mint()
