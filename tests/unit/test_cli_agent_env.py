"""`agent-env` and the agent-host helpers: proxy URLs, tokens, CA bundles, NO_PROXY rules."""

from __future__ import annotations

import base64
import stat
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluicegate.cli import agent_env, agenthost
from sluicegate.cli.agenthost import AgentHostError, Proxy, no_proxy_entry
from tests.support.pki import TestCA as SomeCA

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
token_chars = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)


# -- proxy URLs and tokens ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port", "token"),
    [
        ("gw.internal:8080", "gw.internal", 8080, None),
        ("http://gw.internal:8080/", "gw.internal", 8080, None),
        ("http://agent:abc%2Fdef@10.0.0.5:3128", "10.0.0.5", 3128, "abc/def"),
        ("[::1]:8080", "::1", 8080, None),
    ],
)
def test_proxy_parse(text: str, host: str, port: int, token: str | None) -> None:
    assert Proxy.parse(text) == Proxy(host, port, token)


@pytest.mark.parametrize(
    "text", ["https://gw:8080", "gw.internal", "gw:notaport", "http://gw:8080/path", ""]
)
def test_proxy_parse_refuses(text: str) -> None:
    with pytest.raises(AgentHostError):
        Proxy.parse(text)


@given(token_chars)
def test_proxy_url_carries_any_token_as_the_password(token: str) -> None:
    """What clients read back from HTTPS_PROXY is the token, byte for byte, and the Basic
    credential they send is what the gateway decodes."""
    url = Proxy("gw.internal", 8080).url(token)
    parts = urllib.parse.urlsplit(url)
    assert parts.username == "agent" and parts.hostname == "gw.internal" and parts.port == 8080
    assert urllib.parse.unquote(parts.password or "") == token
    assert Proxy.parse(url).token == token
    # what Python's proxy handler sends (it unquotes user and password)
    _, user, password, _ = urllib.request._parse_proxy(url)  # type: ignore[attr-defined]
    assert user == "agent" and urllib.parse.unquote(password) == token
    value = agenthost.basic_proxy_authorization(token)
    assert base64.b64decode(value.removeprefix("Basic ")).decode() == f"agent:{token}"
    assert Proxy("gw.internal", 8080, token).redacted() == "http://agent:***@gw.internal:8080"


def test_read_token(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    assert agenthost.read_token(path) == TOKEN
    for bad in ("", "\n", "two tokens", f"{TOKEN}\n{TOKEN}", f'"{TOKEN}" x'):
        path.write_text(bad)
        with pytest.raises(AgentHostError) as e:
            agenthost.read_token(path)
        assert TOKEN not in str(e.value)
    with pytest.raises(AgentHostError):
        agenthost.read_token(tmp_path / "missing")


# -- certificates ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    first = SomeCA(tmp_path_factory.mktemp("a"), "first").cert_file.read_bytes()
    second = SomeCA(tmp_path_factory.mktemp("b"), "second").cert_file.read_bytes()
    return first, second


def test_bundle_is_system_then_gateway_each_once(cas: tuple[bytes, bytes]) -> None:
    system, gateway = cas
    noise = b"# comment\n-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"
    bundle = agenthost.bundle(noise + system + system, [gateway, system])
    assert bundle == system + gateway


def test_certificates_refuse_a_private_key(cas: tuple[bytes, bytes]) -> None:
    key = b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n"
    with pytest.raises(AgentHostError, match="private key"):
        agenthost.certificates(key + cas[0], "mitmproxy-ca.pem")
    with pytest.raises(AgentHostError, match="no PEM certificate"):
        agenthost.certificates(b"nothing here", "x.pem")
    assert agenthost.certificates(cas[0] + cas[1], "ok.pem") == [cas[0], cas[1]]


def test_system_ca_file_ignores_ssl_cert_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On rotation agent-env reruns inside the agent environment: it must not build the new
    bundle from the old one."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "old-bundle.pem"))
    (tmp_path / "old-bundle.pem").write_text("x")
    found = agenthost.system_ca_file()
    assert found is None or found != tmp_path / "old-bundle.pem"


# -- NO_PROXY -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("no_proxy", "host", "entry"),
    [
        ("*", "api.openai.com", "*"),
        ("openai.com", "api.openai.com", "openai.com"),
        ("localhost, .openai.com", "api.openai.com", ".openai.com"),
        ("*.openai.com", "api.openai.com", "*.openai.com"),
        ("API.OpenAI.com", "api.openai.com", "API.OpenAI.com"),
        ("api.openai.com:443", "api.openai.com", "api.openai.com:443"),
        ("api.openai.com:8443", "api.openai.com", None),
        ("penai.com,ai.com.evil", "api.openai.com", None),
        ("10.0.0.0/8", "10.1.2.3", "10.0.0.0/8"),
        ("10.0.0.0/8", "api.openai.com", None),
        ("127.0.0.1", "127.0.0.1", "127.0.0.1"),
        ("::1,[fd00::]:443", "fd00::", "[fd00::]:443"),
        ("fd00::/8", "[fd00::1]", "fd00::/8"),
        ("", "api.openai.com", None),
        ("localhost,127.0.0.1,::1", "api.anthropic.com", None),
    ],
)
def test_no_proxy_entry(no_proxy: str, host: str, entry: str | None) -> None:
    assert no_proxy_entry(no_proxy, host, 443) == entry


labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)


@given(st.lists(labels, min_size=1, max_size=3), st.lists(labels, min_size=1, max_size=3))
def test_no_proxy_covers_subdomains_and_only_them(domain: list[str], prefix: list[str]) -> None:
    name = ".".join(domain)
    assert no_proxy_entry(name, ".".join([*prefix, name]), 443) == name
    assert no_proxy_entry("." + name, ".".join([*prefix, name]), 443) == "." + name
    # glued to a label (no dot boundary): another domain
    other = prefix[-1] + name
    assert no_proxy_entry(name, other, 443) is None


# -- the environment ------------------------------------------------------------------------------


def source(script: str) -> dict[str, str]:
    done = subprocess.run(
        ["/bin/sh", "-c", 'eval "$1" && env -0', "sh", script],
        env={},
        capture_output=True,
        check=True,
    )
    return dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)


@settings(deadline=None)  # each example runs a shell: no per-example deadline on a busy machine
@given(
    st.text(
        st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\0"),
        min_size=1,
        max_size=30,
    )
)
def test_shell_format_round_trips_any_path(name: str) -> None:
    """Paths with spaces, quotes or `$` come out of the shell as they went in."""
    ca = Path("/tmp") / name.replace("/", "_")
    env = agent_env.environment(Proxy("gw", 8080, TOKEN), ca, Path("/b b/'x'.pem"), "")
    sourced = source(agent_env.render(env, "sh", "test"))
    assert {k: sourced[k] for k in env} == env


def test_dotenv_format_and_line_breaks() -> None:
    env = agent_env.environment(Proxy("gw", 8080, TOKEN), Path("/ca.pem"), Path("/b.pem"), "")
    lines = [x for x in agent_env.render(env, "dotenv", "test").splitlines() if x[:1] != "#"]
    assert dict(line.split("=", 1) for line in lines) == env
    env["NO_PROXY"] = "a\nHTTPS_PROXY=http://evil:1"
    with pytest.raises(AgentHostError, match="line break"):
        agent_env.render(env, "dotenv", "test")


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = agent_env.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_main_writes_bundle_and_private_env_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, cas: tuple[bytes, bytes]
) -> None:
    system, gateway = cas
    (tmp_path / "system.pem").write_bytes(system)
    (tmp_path / "gateway-ca.pem").write_bytes(gateway)
    (tmp_path / "token").write_text(TOKEN + "\n")
    out_file = tmp_path / "agent.env"
    code, out, err = run_main(
        capsys, "--proxy", "gw.internal:8080", "--token-file", str(tmp_path / "token"),
        "--ca", str(tmp_path / "gateway-ca.pem"), "--system-cas", str(tmp_path / "system.pem"),
        "--out", str(out_file),
    )  # fmt: skip
    assert code == 0, err
    assert out == "" and TOKEN not in err
    assert stat.S_IMODE(out_file.stat().st_mode) == 0o600
    env = source(out_file.read_text())
    assert env["HTTPS_PROXY"] == f"http://agent:{TOKEN}@gw.internal:8080"
    assert env["NO_PROXY"] == agenthost.DEFAULT_NO_PROXY
    bundle = tmp_path / "gateway-ca-bundle.pem"
    assert env["SSL_CERT_FILE"] == env["CURL_CA_BUNDLE"] == str(bundle)
    assert bundle.read_bytes() == system + gateway
    assert env["NODE_EXTRA_CA_CERTS"] == str(tmp_path / "gateway-ca.pem")


def test_main_gateway_only_trust(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, cas: tuple[bytes, bytes]
) -> None:
    (tmp_path / "ca.pem").write_bytes(cas[1])
    (tmp_path / "token").write_text(TOKEN)
    code, out, _ = run_main(
        capsys, "--proxy", "gw:1", "--token-file", str(tmp_path / "token"), "--ca",
        str(tmp_path / "ca.pem"), "--system-cas", "none", "--bundle", str(tmp_path / "b.pem"),
        "--format", "dotenv",
    )  # fmt: skip
    assert code == 0
    assert f"SSL_CERT_FILE={tmp_path / 'b.pem'}" in out.splitlines()
    assert (tmp_path / "b.pem").read_bytes() == cas[1]


@pytest.mark.parametrize(
    ("proxy", "ca_text", "message"),
    [
        (f"http://agent:{TOKEN}@gw:1", None, "--token-file, not inside --proxy"),
        ("gw:1", b"-----BEGIN PRIVATE KEY-----\nAA\n-----END PRIVATE KEY-----\n", "private key"),
    ],
)
def test_main_refusals(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    cas: tuple[bytes, bytes],
    proxy: str,
    ca_text: bytes | None,
    message: str,
) -> None:
    (tmp_path / "ca.pem").write_bytes(ca_text or cas[0])
    (tmp_path / "token").write_text(TOKEN)
    code, out, err = run_main(
        capsys, "--proxy", proxy, "--token-file", str(tmp_path / "token"), "--ca",
        str(tmp_path / "ca.pem"), "--system-cas", "none",
    )  # fmt: skip
    assert code == 2 and out == ""
    assert message in err and TOKEN not in err


def test_agent_host_tools_need_only_the_standard_library() -> None:
    """agent-env and doctor run on agent hosts, which have no mitmproxy or cryptography."""
    code = (
        "import sys, sluicegate.__main__, sluicegate.cli.agent_env, sluicegate.cli.doctor\n"
        "third = {'mitmproxy', 'cryptography', 'yaml', 'jwt', 'regex', 'httpx'}\n"
        "print(sorted(third & {m.split('.')[0] for m in sys.modules}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(Path(agent_env.__file__).parents[2])},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "[]"


# -- base-URL mode --------------------------------------------------------------------------------


def test_base_url_only(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """An agent that cannot use a proxy: the SDKs' base URLs and the token as their API key;
    no proxy variables, no placeholders, and (plain http on loopback) no CA needed."""
    (tmp_path / "token").write_text(TOKEN)
    code, out, err = run_main(
        capsys, "--base-url", "http://127.0.0.1:8081/", "--token-file", str(tmp_path / "token")
    )
    assert code == 0, err
    env = source(out)
    env.pop("PWD", None)  # the shell's own
    assert env == {
        "OPENAI_BASE_URL": "http://127.0.0.1:8081/openai/v1",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:8081/anthropic",
        "OPENAI_API_KEY": TOKEN,
        "ANTHROPIC_API_KEY": TOKEN,
    }
    assert "caller token" in err and TOKEN not in err


def test_base_url_with_the_proxy(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, cas: tuple[bytes, bytes]
) -> None:
    (tmp_path / "ca.pem").write_bytes(cas[1])
    (tmp_path / "token").write_text(TOKEN)
    code, out, err = run_main(
        capsys, "--proxy", "gw.internal:8080", "--base-url", "https://gw.internal:8443",
        "--openai-prefix", "/oai", "--token-file", str(tmp_path / "token"), "--ca",
        str(tmp_path / "ca.pem"), "--system-cas", "none",
    )  # fmt: skip
    assert code == 0, err
    env = source(out)
    assert env["OPENAI_BASE_URL"] == "https://gw.internal:8443/oai/v1"
    assert env["OPENAI_API_KEY"] == TOKEN and env["HTTPS_PROXY"].endswith("@gw.internal:8080")
    # The listener is reached directly, never through the proxy.
    assert env["NO_PROXY"] == f"{agenthost.DEFAULT_NO_PROXY},gw.internal"
    assert env["NODE_EXTRA_CA_CERTS"] == str(tmp_path / "ca.pem")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give --proxy"),
        (("--base-url", "https://gw:8443"), "--ca is required"),
        (("--base-url", "http://gw:8081/openai/v1"), "no path"),
        (("--base-url", "gw:8081"), "must be http(s)://"),
        (("--base-url", "http://gw:8081", "--openai-prefix", "openai"), "prefix 'openai'"),
    ],
)
def test_base_url_refusals(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    (tmp_path / "token").write_text(TOKEN)
    code, out, err = run_main(capsys, *args, "--token-file", str(tmp_path / "token"))
    assert code == 2 and out == ""
    assert message in err and TOKEN not in err
