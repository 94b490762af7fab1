"""The README's "Onboarding an agent host", followed on a temp directory.

Generate the CA (`ca init`), mint a token against a dev config with its own signing key, start the
gateway on that confdir, print the agent environment (`agent-env`), and run curl and Python
clients with ONLY that environment. `doctor` passes there and names the problem when the CA is not
trusted, the token is bad, or a request would bypass the gateway. A CA rotation keeps agents
working across the switch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from sluicegate.auth import devtokens
from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV, make_config
from tests.support.gateway import REPO, Gateway
from tests.support.pki import TestCA as UpstreamCA
from tests.support.tokens import TestIdP as IdP
from tests.support.upstream import FakeUpstream

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
CA_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO")
CLIENT_TIMEOUT = 60


def sluicegate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m sluicegate ...` as a user runs it (this worktree's package)."""
    base = env if env is not None else dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "sluicegate", *args],
        env={**base, "PYTHONPATH": str(REPO / "addons")},
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def shell_environment(script: str) -> dict[str, str]:
    """What a POSIX shell gets from sourcing `script`, limited to the names it exports."""
    names = [
        line.split()[1].split("=", 1)[0]
        for line in script.splitlines()
        if line.startswith("export ")
    ]
    done = subprocess.run(
        ["/bin/sh", "-c", 'eval "$1" && env -0', "sh", script],
        env={},
        capture_output=True,
        timeout=10,
    )
    assert done.returncode == 0, done.stderr
    seen = dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)
    return {name: seen[name] for name in names}


@dataclasses.dataclass
class Onboarding:
    workdir: Path
    config: Path
    signing_key: Path
    ca_export: Path
    token_file: Path
    token: str

    proxy: str = ""  # HOST:PORT, once the gateway runs

    def agent_env(
        self,
        token_file: Path | None = None,
        *,
        no_proxy: str = "",
        proxy: str | None = None,
        ca: Path | None = None,
    ) -> str:
        """What `agent-env` prints for this host (shell format)."""
        return ok(
            sluicegate(
                "agent-env",
                "--proxy",
                proxy or self.proxy,
                "--token-file",
                str(token_file or self.token_file),
                "--ca",
                str(ca or self.ca_export),
                "--no-proxy",
                no_proxy,
            )
        )


def dev_setup(workdir: Path, upstream: FakeUpstream, plain: FakeUpstream, idp: IdP) -> Path:
    """A development config like scripts/dev_setup.py makes: a local signing key, routes to the
    test upstreams (the injected key comes from the environment)."""
    key = devtokens.generate_signing_key(workdir / "dev-signing-key", "dev")
    config = make_config(idp, upstream, plain)
    config["auth"] = {
        "keys": [{"id": "dev", "jwks_file": str(key.jwks), "algorithms": ["RS256"]}],
        "issuers": ["sluicegate-dev"],
        "audiences": ["sluicegate"],
    }
    path = workdir / "sluicegate.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_token(path: Path, token: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path


def start(confdir_parent: Path, config: Path, pki: UpstreamCA) -> Gateway:
    """The gateway with `confdir_parent/mitmproxy` as its confdir (Gateway's layout)."""
    return Gateway(
        config,
        confdir_parent,
        upstream_ca=pki.cert_file,
        env={UPSTREAM_KEY_ENV: UPSTREAM_KEY},
    ).start()


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def onboarding(
    tmp_path_factory: pytest.TempPathFactory,
    upstream: FakeUpstream,
    plain_upstream: FakeUpstream,
    idp: IdP,
) -> Onboarding:
    work = tmp_path_factory.mktemp("onboarding")
    config = dev_setup(work, upstream, plain_upstream, idp)
    confdir = work / "gateway" / "mitmproxy"
    ok(sluicegate("ca", "init", "--confdir", str(confdir), "--key-size", "2048"))
    (work / "agent").mkdir()
    ca_export = work / "agent" / "gateway-ca.pem"
    ok(sluicegate("ca", "export", "--confdir", str(confdir), "--out", str(ca_export)))
    key = work / "dev-signing-key" / "dev.private.pem"
    token = ok(
        sluicegate(
            "mint-token",
            "--config",
            str(config),
            "--key",
            str(key),
            "--sub",
            "alice",
            "--groups",
            "agents",
        )
    ).strip()
    token_file = write_token(work / "agent" / "token", token)
    return Onboarding(work, config, key, ca_export, token_file, token)


@pytest.fixture(scope="module")
def onboarded_gateway(onboarding: Onboarding, pki: UpstreamCA) -> Iterator[Gateway]:
    confdir = onboarding.workdir / "gateway" / "mitmproxy"
    before = snapshot(confdir)
    gateway = start(onboarding.workdir / "gateway", onboarding.config, pki)
    onboarding.proxy = f"127.0.0.1:{gateway.port}"
    yield gateway
    gateway.stop()
    # It served the CA `ca init` made and wrote nothing: a read-only mount (k8s Secret) works.
    assert snapshot(confdir) == before


@pytest.fixture
def agent_env(onboarding: Onboarding, onboarded_gateway: Gateway) -> dict[str, str]:
    return shell_environment(onboarding.agent_env())


def doctor(
    env: dict[str, str], upstream: FakeUpstream, *args: str
) -> subprocess.CompletedProcess[str]:
    """doctor in the agent's environment (plus PATH, so it finds curl and node)."""
    full = {**env, "PATH": os.environ.get("PATH", os.defpath)}
    return sluicegate("doctor", "--probe-url", upstream.url("/echo"), *args, env=full)


def status_of(output: str, check: str) -> str:
    """The status word of the first line reporting `check`."""
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] == check:
            return parts[0]
    raise AssertionError(f"no {check} line in:\n{output}")


# -- the printed environment works for real clients -----------------------------------------------


def test_printed_environment_has_proxy_token_and_trust(
    onboarding: Onboarding, agent_env: dict[str, str]
) -> None:
    assert agent_env["HTTPS_PROXY"] == f"http://agent:{onboarding.token}@{onboarding.proxy}"
    assert agent_env["https_proxy"] == agent_env["http_proxy"] == agent_env["HTTPS_PROXY"]
    assert agent_env["NO_PROXY"] == ""
    bundle = Path(agent_env["SSL_CERT_FILE"])
    assert {agent_env[v] for v in CA_VARS} == {str(bundle)}
    assert agent_env["NODE_EXTRA_CA_CERTS"] == str(onboarding.ca_export)
    # the bundle is the system CAs plus the gateway CA; never a key
    gateway_ca = onboarding.ca_export.read_bytes()
    assert bundle.read_bytes().endswith(gateway_ca)
    assert bundle.read_bytes().count(b"BEGIN CERTIFICATE") > 1
    assert b"PRIVATE KEY" not in bundle.read_bytes()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_only_the_printed_environment(
    onboarding: Onboarding, agent_env: dict[str, str], upstream: FakeUpstream
) -> None:
    done = subprocess.run(
        [
            shutil.which("curl") or "curl",
            "-sS",
            "--fail-with-body",
            "-H",
            "content-type: application/json",
            "-d",
            json.dumps(CHAT),
            upstream.url("/v1/chat/completions"),
        ],
        env=agent_env,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert json.loads(done.stdout)["object"] == "chat.completion"
    (got,) = upstream.received
    assert got.header("authorization") == f"Bearer {UPSTREAM_KEY}"
    assert onboarding.token.encode() not in got.raw()


PYTHON_CLIENTS = {
    "urllib": """
import json, sys, urllib.request
request = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(),
                                 headers={"content-type": "application/json"})
with urllib.request.urlopen(request, timeout=30) as response:
    print(json.load(response)["object"])
""",
    "openai": """
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1].rsplit("/chat/", 1)[0], api_key="sk-placeholder")
messages = [{"role": "user", "content": "hi"}]
reply = client.chat.completions.create(model="gpt-test", messages=messages)
print(reply.object)
""",
}


@pytest.mark.parametrize("client", sorted(PYTHON_CLIENTS))
def test_python_clients_with_only_the_printed_environment(
    client: str, onboarding: Onboarding, agent_env: dict[str, str], upstream: FakeUpstream
) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            PYTHON_CLIENTS[client],
            upstream.url("/v1/chat/completions"),
            json.dumps(CHAT),
        ],
        env=agent_env,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "chat.completion"
    (got,) = upstream.received
    assert got.header("authorization") == f"Bearer {UPSTREAM_KEY}"
    assert onboarding.token.encode() not in got.raw()


# -- doctor ---------------------------------------------------------------------------------------


def test_doctor_passes_on_the_onboarded_host(
    onboarding: Onboarding, agent_env: dict[str, str], upstream: FakeUpstream
) -> None:
    done = doctor(agent_env, upstream, "--ca", str(onboarding.ca_export))
    # Node before 24 ignores HTTPS_PROXY whatever the environment: doctor says so (the only
    # failure allowed here).
    bypassing_node = node_major() is not None and (node_major() or 0) < 24
    assert done.returncode == (1 if bypassing_node else 0), done.stdout + done.stderr
    for check in ("proxy-env", "no-proxy", "proxy", "token", "ca", "trust-python", "probe"):
        assert status_of(done.stdout, check) == "PASS", done.stdout
    for variable in (*CA_VARS, "NODE_EXTRA_CA_CERTS"):
        assert status_of(done.stdout, f"trust:{variable}") == "PASS"
    for tool in ("curl", "node", "git"):
        assert status_of(done.stdout, tool) == ("PASS" if shutil.which(tool) else "SKIP")
    node_proxy = "SKIP" if node_major() is None else "FAIL" if bypassing_node else "PASS"
    assert status_of(done.stdout, "node-proxy") == node_proxy, done.stdout
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAIL")]
    assert all(line.split()[1] == "node-proxy" for line in failed), done.stdout
    assert onboarding.token not in done.stdout + done.stderr


def passes_but_for_node(done: subprocess.CompletedProcess[str]) -> bool:
    """doctor found nothing wrong, except a Node before 24 that ignores HTTPS_PROXY anyway."""
    failed = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("FAIL")]
    bypassing_node = (node_major() or 24) < 24
    return failed == (["node-proxy"] if bypassing_node else []) and done.returncode == int(
        bypassing_node
    )


def node_major() -> int | None:
    node = shutil.which("node")
    if node is None:
        return None
    done = subprocess.run([node, "-p", "process.versions.node"], capture_output=True, text=True)
    return int(done.stdout.split(".")[0])


@pytest.mark.skipif(shutil.which("node") is None, reason="no node on this machine")
def test_doctor_catches_a_node_that_bypasses_the_proxy(
    onboarding: Onboarding, agent_env: dict[str, str], upstream: FakeUpstream
) -> None:
    """Without NODE_USE_ENV_PROXY (and on any Node before 24) Node's fetch goes straight to the
    API while every other check passes: doctor names it."""
    env = {k: v for k, v in agent_env.items() if k != "NODE_USE_ENV_PROXY"}
    done = doctor(env, upstream, "--ca", str(onboarding.ca_export))
    assert done.returncode == 1
    assert status_of(done.stdout, "node-proxy") == "FAIL", done.stdout
    assert f"Node {node_major()}." in done.stdout and "127.0.0.1 directly" in done.stdout
    assert "Node 24+" in done.stdout  # the fix
    assert status_of(done.stdout, "probe") == "PASS"  # everything else is fine


def test_doctor_checks_that_git_sends_proxy_credentials(
    onboarding: Onboarding, agent_env: dict[str, str], upstream: FakeUpstream, tmp_path: Path
) -> None:
    if shutil.which("git") is None:
        pytest.skip("no git on this machine")
    assert agent_env["GIT_HTTP_PROXY_AUTHMETHOD"] == "basic"
    assert agent_env["OPENAI_API_KEY"].startswith("sk-placeholder-")  # never a real key
    env = {k: v for k, v in agent_env.items() if k != "GIT_HTTP_PROXY_AUTHMETHOD"}
    env["HOME"] = str(tmp_path)  # no user gitconfig setting it either
    env["GIT_CONFIG_NOSYSTEM"] = "1"
    done = doctor(env, upstream, "--ca", str(onboarding.ca_export))
    assert status_of(done.stdout, "git") == "FAIL"
    assert "export GIT_HTTP_PROXY_AUTHMETHOD=basic" in done.stdout


def test_doctor_names_an_untrusted_ca(
    onboarding: Onboarding, agent_env: dict[str, str], upstream: FakeUpstream, pki: UpstreamCA
) -> None:
    """The host trusts some other CA (the upstream's): every trust check fails; --ca is right,
    so the fix is the trust variables, not the CA file."""
    wrong = {**agent_env, **dict.fromkeys(CA_VARS, str(pki.cert_file))}
    wrong["NODE_EXTRA_CA_CERTS"] = str(pki.cert_file)
    done = doctor(wrong, upstream, "--ca", str(onboarding.ca_export))
    assert done.returncode == 1
    assert status_of(done.stdout, "token") == "PASS"
    assert status_of(done.stdout, "ca") == "PASS"
    assert status_of(done.stdout, "trust-python") == "FAIL"
    assert "Python does not trust the gateway's CA" in done.stdout
    assert "fix: export SSL_CERT_FILE=" in done.stdout
    for variable in CA_VARS:
        assert status_of(done.stdout, f"trust:{variable}") == "FAIL"
    if shutil.which("curl"):
        assert status_of(done.stdout, "curl") == "FAIL"
        assert "curl does not trust the gateway's CA" in done.stdout
    if shutil.which("node"):
        assert status_of(done.stdout, "node") == "FAIL"

    # And with a --ca that is not the gateway's either, doctor says to fetch the right one.
    done = doctor(wrong, upstream, "--ca", str(pki.cert_file))
    assert status_of(done.stdout, "ca") == "FAIL"
    assert "may have been rotated" in done.stdout


def test_doctor_names_an_expired_token(
    onboarding: Onboarding, onboarded_gateway: Gateway, upstream: FakeUpstream
) -> None:
    expired = devtokens.mint_token(
        onboarding.signing_key.read_bytes(),
        "dev",
        subject="alice",
        groups=["agents"],
        issuer="sluicegate-dev",
        audience="sluicegate",
        ttl_seconds=60,
        now=int(time.time()) - 3600,
    )
    token_file = write_token(onboarding.workdir / "expired-token", expired)
    env = shell_environment(onboarding.agent_env(token_file))
    done = doctor(env, upstream)
    assert done.returncode == 1
    assert status_of(done.stdout, "token") == "FAIL"
    assert "rejected the token: expired (HTTP 407)" in done.stdout
    assert "fix: the token expired" in done.stdout
    assert status_of(done.stdout, "probe") == "SKIP"
    assert expired not in done.stdout + done.stderr


def test_doctor_names_a_token_signed_by_another_key(
    onboarding: Onboarding, onboarded_gateway: Gateway, upstream: FakeUpstream
) -> None:
    other = devtokens.generate_signing_key(onboarding.workdir / "other-key", "dev")
    forged = devtokens.mint_token(
        other.private_key.read_bytes(),
        "dev",
        subject="alice",
        groups=["agents"],
        issuer="sluicegate-dev",
        audience="sluicegate",
        ttl_seconds=600,
    )
    token_file = write_token(onboarding.workdir / "forged-token", forged)
    # The environment is right; --token-file is checked (and its mismatch with it noted).
    env = shell_environment(onboarding.agent_env())
    done = doctor(env, upstream, "--token-file", str(token_file))
    assert done.returncode == 1
    assert status_of(done.stdout, "token-env") == "WARN"
    assert status_of(done.stdout, "token") == "FAIL"
    assert "rejected the token: bad_signature" in done.stdout
    assert "not signed by a key this gateway trusts" in done.stdout


def test_doctor_notices_a_bypass(
    onboarding: Onboarding, onboarded_gateway: Gateway, upstream: FakeUpstream
) -> None:
    covered = shell_environment(onboarding.agent_env(no_proxy="localhost,127.0.0.0/8"))
    done = doctor(covered, upstream, "--ca", str(onboarding.ca_export))
    assert done.returncode == 1
    assert status_of(done.stdout, "no-proxy") == "FAIL"
    assert "NO_PROXY entry '127.0.0.0/8' covers 127.0.0.1" in done.stdout
    if shutil.which("curl"):  # curl honours the CIDR entry and goes direct: noticed too
        assert status_of(done.stdout, "curl") == "FAIL"

    full = shell_environment(onboarding.agent_env())
    missing = {k: v for k, v in full.items() if "proxy" not in k.lower()}
    done = doctor(
        missing, upstream, "--proxy", onboarding.proxy, "--token-file", str(onboarding.token_file)
    )
    assert done.returncode == 1
    assert status_of(done.stdout, "proxy-env") == "FAIL"
    assert "HTTPS_PROXY is not set" in done.stdout
    assert status_of(done.stdout, "token") == "PASS"  # the gateway itself is fine


def test_doctor_names_an_unreachable_gateway(
    onboarding: Onboarding, upstream: FakeUpstream
) -> None:
    env = shell_environment(onboarding.agent_env(proxy="127.0.0.1:9"))
    done = doctor(env, upstream)
    assert done.returncode == 1
    assert status_of(done.stdout, "proxy") == "FAIL"
    assert status_of(done.stdout, "token") == "SKIP"


# -- CA rotation ----------------------------------------------------------------------------------


def test_ca_rotation_keeps_agents_working(
    onboarding: Onboarding, tmp_path: Path, upstream: FakeUpstream, pki: UpstreamCA
) -> None:
    """stage -> distribute the bundle -> activate + restart -> finish: the agent's environment,
    generated once from the transition bundle, works before and after the switch."""
    confdir = tmp_path / "gw" / "mitmproxy"
    ca_file = tmp_path / "agent-ca.pem"
    ok(sluicegate("ca", "init", "--confdir", str(confdir), "--key-size", "2048"))
    ok(sluicegate("ca", "rotate", "stage", "--confdir", str(confdir), "--key-size", "2048"))
    ok(sluicegate("ca", "export", "--confdir", str(confdir), "--out", str(ca_file)))
    assert ca_file.read_bytes().count(b"BEGIN CERTIFICATE") == 2

    def doctor_against(gateway: Gateway) -> subprocess.CompletedProcess[str]:
        env = shell_environment(onboarding.agent_env(proxy=f"127.0.0.1:{gateway.port}", ca=ca_file))
        return doctor(env, upstream)

    with start(tmp_path / "gw", onboarding.config, pki) as old:
        assert passes_but_for_node(doctor_against(old))
    ok(sluicegate("ca", "rotate", "activate", "--confdir", str(confdir)))
    with start(tmp_path / "gw", onboarding.config, pki) as new:
        done = doctor_against(new)
        assert passes_but_for_node(done), done.stdout
        # Before the bundle was distributed, an agent that only knew the old CA would fail:
        old_only = tmp_path / "old-only.pem"
        retired = next((confdir / "retired").iterdir())
        old_only.write_bytes((retired / "mitmproxy-ca-cert.pem").read_bytes())
        env = shell_environment(onboarding.agent_env(proxy=f"127.0.0.1:{new.port}", ca=old_only))
        assert status_of(doctor(env, upstream).stdout, "trust-python") == "FAIL"
    ok(sluicegate("ca", "rotate", "finish", "--confdir", str(confdir)))
    ok(sluicegate("ca", "export", "--confdir", str(confdir), "--out", str(ca_file)))
    assert ca_file.read_bytes() == (confdir / "mitmproxy-ca-cert.pem").read_bytes()
