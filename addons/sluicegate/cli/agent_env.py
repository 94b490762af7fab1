"""`python -m sluicegate agent-env`: the environment an agent host needs to use the gateway.

    python -m sluicegate agent-env --proxy gateway.internal:8080 --token-file ~/.sluicegate/token \\
        --ca gateway-ca.pem [--bundle PATH] [--no-proxy LIST] [--format sh|dotenv] [--out FILE]
    python -m sluicegate agent-env --base-url http://127.0.0.1:8081 --token-file TOKEN [...]

Prints (or writes to --out, mode 0600: it holds the token) the proxy variables, with the token as
the proxy password, and the CA variables of the common stacks. SSL_CERT_FILE, REQUESTS_CA_BUNDLE,
CURL_CA_BUNDLE and GIT_SSL_CAINFO *replace* the trust store of OpenSSL-based tools, Python
requests, curl and git, so they point at a bundle written here: this host's system CAs followed
by the gateway CA (with the gateway CA alone, hosts in NO_PROXY would fail TLS). Node's
NODE_EXTRA_CA_CERTS *adds* to its built-in roots, so it gets the gateway CA file itself.

`--base-url` (the gateway's base-URL listener, `base_url` in its config) is for agents that cannot
use a proxy (Node before 24): it prints OPENAI_BASE_URL (`<url>/openai/v1`) and
ANTHROPIC_BASE_URL (`<url>/anthropic`; other prefixes with --openai-prefix / --anthropic-prefix)
and sets the SDKs' API keys to the caller token, which is how base-URL requests authenticate.
Without --proxy only those are printed (and, with --ca, the CA variables); with both, the
base-URL host is added to NO_PROXY so the proxy does not carry requests meant for the listener.

`--ca` is what `python -m sluicegate ca export` wrote (several certificates during a CA rotation).
After a rotation, deliver the new export to the same path and rerun: the variables stay the same,
the bundle is rewritten. The token is read from a file, never taken on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from sluicegate.cli.agenthost import (
    ADDITIVE_CA_VARS,
    DEFAULT_NO_PROXY,
    REPLACING_CA_VARS,
    AgentHostError,
    Proxy,
    bundle,
    certificates,
    no_proxy_entry,
    read_token,
    system_ca_file,
)
from sluicegate.egress.base_url import prefix_problem

NO_SYSTEM_CAS = "none"
# SDKs refuse to start without an API key; the gateway injects the real one, so the agent gets a
# placeholder (never a real key: whatever the agent sends in these headers is stripped).
BASE_URL_VARS = ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "OPENAI_API_KEY", "ANTHROPIC_API_KEY")
PLACEHOLDER_KEYS = {
    "OPENAI_API_KEY": "sk-placeholder-the-gateway-injects-the-real-key",
    "ANTHROPIC_API_KEY": "sk-ant-placeholder-the-gateway-injects-the-real-key",
}


def environment(proxy: Proxy, ca_file: Path, bundle_file: Path, no_proxy: str) -> dict[str, str]:
    """The variables, in the order they are printed. Both cases of the proxy variables: curl
    reads only `http_proxy` in lower case, and lower case wins where both are set."""
    url = proxy.url()
    env = {
        "HTTPS_PROXY": url,
        "https_proxy": url,
        "HTTP_PROXY": url,
        "http_proxy": url,
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
        "NODE_USE_ENV_PROXY": "1",
        "GIT_HTTP_PROXY_AUTHMETHOD": "basic",
        **PLACEHOLDER_KEYS,
    }
    env.update(dict.fromkeys(REPLACING_CA_VARS, str(bundle_file)))
    env.update(dict.fromkeys(ADDITIVE_CA_VARS, str(ca_file)))
    return env


@dataclasses.dataclass(frozen=True)
class BaseUrl:
    """The gateway's base-URL listener: `http(s)://host:port`, without a path."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> BaseUrl:
        parts = urllib.parse.urlsplit(text.strip().rstrip("/"))
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AgentHostError("--base-url must be http(s)://HOST[:PORT] (the base-URL listener)")
        if parts.username or parts.password or parts.query or parts.fragment or parts.path:
            raise AgentHostError(
                "--base-url is the listener's root, http(s)://HOST:PORT: no path, user or query "
                "(the prefixes are --openai-prefix and --anthropic-prefix)"
            )
        default = 443 if parts.scheme == "https" else 80
        return cls(parts.scheme, parts.hostname, port or default)

    def root(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def base_url_environment(
    base: BaseUrl, token: str, openai_prefix: str, anthropic_prefix: str
) -> dict[str, str]:
    """The SDKs' base URLs and the caller token as their API key."""
    for prefix in (openai_prefix, anthropic_prefix):
        if prefix_problem(prefix) is not None:
            raise AgentHostError(f"prefix {prefix!r}: {prefix_problem(prefix)}")
    return {
        "OPENAI_BASE_URL": f"{base.root()}{openai_prefix}/v1",
        "ANTHROPIC_BASE_URL": f"{base.root()}{anthropic_prefix}",
        "OPENAI_API_KEY": token,
        "ANTHROPIC_API_KEY": token,
    }


def render(env: dict[str, str], fmt: str, system_source: str) -> str:
    """Shell (`export K=V`, for `eval` or `source`) or dotenv (`K=V`, for systemd's
    EnvironmentFile= and `docker --env-file`), with comments saying why each group is there.
    Groups whose variables are absent (no proxy, no CA) are left out."""
    for name, value in env.items():
        if "\n" in value or "\r" in value:
            raise AgentHostError(f"{name} would contain a line break")

    def line(name: str) -> str:
        value = env[name]
        return f"export {name}={shlex.quote(value)}" if fmt == "sh" else f"{name}={value}"

    lines = [
        "# sluicegate agent environment (python -m sluicegate agent-env). It holds the caller",
        "# token: keep it readable by the agent's user only.",
    ]
    if "HTTPS_PROXY" in env:
        lines += [
            "# Every HTTP(S) request goes through the gateway; the token is the proxy password.",
            *(line(n) for n in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")),
            "# Hosts reached directly, NOT through the gateway (never the API hosts).",
            line("NO_PROXY"),
            line("no_proxy"),
            "# Node.js >= 24 uses the proxy variables only with this set; older Node ignores them",
            "# (the agent needs its own proxy setting there, or the base URLs below).",
            line("NODE_USE_ENV_PROXY"),
            "# git sends proxy credentials only after a 407 unless told to send them at once (its",
            '# first CONNECT would fail with "could not read Username").',
            line("GIT_HTTP_PROXY_AUTHMETHOD"),
        ]
    if "OPENAI_BASE_URL" in env:
        lines += [
            "# Base-URL mode, for agents that cannot use a proxy: the SDKs talk to the gateway's",
            "# base-URL listener, which forwards to the API; the caller token is their API key",
            "# (the gateway verifies it, strips it and injects the route's real key).",
            *(line(n) for n in BASE_URL_VARS),
        ]
    else:
        lines += [
            "# Placeholders, NOT keys: SDKs want one set; the gateway strips it and injects the",
            "# real key of the route (the agent never holds it).",
            *(line(n) for n in PLACEHOLDER_KEYS),
        ]
    if REPLACING_CA_VARS[0] in env:
        lines += [
            "# These REPLACE the trust store of OpenSSL-based tools, Python (ssl, requests,",
            f"# httpx), curl and git: a bundle of {system_source} plus the gateway CA.",
            *(line(n) for n in REPLACING_CA_VARS),
            "# Node adds this to its built-in roots: the gateway CA alone.",
            *(line(n) for n in ADDITIVE_CA_VARS),
        ]
    return "\n".join(lines) + "\n"


def write_private(path: Path, text: str) -> None:
    """Create or replace `path` with mode 0600 (it holds the token)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_public(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sluicegate agent-env",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--proxy", help="the gateway, HOST:PORT (required without --base-url)")
    parser.add_argument("--token-file", required=True, type=Path, help="file with the token")
    parser.add_argument(
        "--ca",
        type=Path,
        help="the gateway CA certificate(s) (`ca export`; required with --proxy or an https "
        "--base-url)",
    )
    parser.add_argument(
        "--base-url",
        help="the gateway's base-URL listener, http(s)://HOST:PORT: print OPENAI_BASE_URL and "
        "ANTHROPIC_BASE_URL, with the token as the SDKs' API key",
    )
    parser.add_argument("--openai-prefix", default="/openai", help="its OpenAI prefix (/openai)")
    parser.add_argument(
        "--anthropic-prefix", default="/anthropic", help="its Anthropic prefix (/anthropic)"
    )
    parser.add_argument(
        "--bundle",
        type=Path,
        help="where to write system CAs + gateway CA (default: beside --ca, *-bundle.pem)",
    )
    parser.add_argument(
        "--system-cas",
        help="this host's CA bundle (default: found automatically); `none` trusts the gateway "
        "CA only, so no TLS connection works except through the gateway",
    )
    parser.add_argument(
        "--no-proxy",
        default=DEFAULT_NO_PROXY,
        help=f"hosts reached directly (default {DEFAULT_NO_PROXY!r}; '' for none)",
    )
    parser.add_argument("--format", choices=("sh", "dotenv"), default="sh")
    parser.add_argument("--out", type=Path, help="write here, mode 0600 (default: stdout)")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        text, notes = run(args)
    except AgentHostError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_private(args.out.expanduser().absolute(), text)
        notes.append(f"wrote {args.out} (mode 0600)")
    for note in notes:
        print(note, file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(the rendered environment, notes for stderr); writes the CA bundle."""
    if args.proxy is None and args.base_url is None:
        raise AgentHostError("give --proxy (the gateway's proxy), --base-url, or both")
    base = BaseUrl.parse(args.base_url) if args.base_url is not None else None
    if args.ca is None and (args.proxy is not None or (base and base.scheme == "https")):
        raise AgentHostError("--ca is required: the agent must trust the gateway's CA")
    token = read_token(args.token_file.expanduser())
    env: dict[str, str] = {}
    notes: list[str] = []
    source = ""
    if args.ca is not None:
        ca_file = args.ca.expanduser().absolute()
        bundle_file, source, count = _write_bundle(args, ca_file)
        notes.append(f"CA bundle: {bundle_file} ({source} + {count} gateway CA certificate(s))")
    if args.proxy is not None:
        proxy = Proxy.parse(args.proxy)
        if proxy.token is not None:
            raise AgentHostError("give the token with --token-file, not inside --proxy")
        no_proxy = args.no_proxy.strip()
        if base is not None and no_proxy_entry(no_proxy, base.host, base.port) is None:
            # Requests for the listener must not be sent to it through the proxy.
            no_proxy = ",".join(filter(None, [no_proxy, base.host]))
        env.update(environment(proxy.with_token(token), ca_file, bundle_file, no_proxy))
    elif args.ca is not None:
        env.update(dict.fromkeys(REPLACING_CA_VARS, str(bundle_file)))
        env.update(dict.fromkeys(ADDITIVE_CA_VARS, str(ca_file)))
    if base is not None:
        for name in PLACEHOLDER_KEYS:
            env.pop(name, None)
        env.update(base_url_environment(base, token, args.openai_prefix, args.anthropic_prefix))
        notes.append(
            "base-URL mode: OPENAI_API_KEY and ANTHROPIC_API_KEY hold the caller token (the "
            "gateway verifies and strips it); the real keys stay in the gateway"
        )
    notes.append("check this host with: python -m sluicegate doctor (in the environment above)")
    return render(env, args.format, source), notes


def _write_bundle(args: argparse.Namespace, ca_file: Path) -> tuple[Path, str, int]:
    gateway_certs = certificates(ca_file.read_bytes(), str(ca_file))
    bundle_file = (args.bundle or ca_file.with_name(f"{ca_file.stem}-bundle.pem")).expanduser()
    bundle_file = bundle_file.absolute()
    if bundle_file == ca_file:
        raise AgentHostError("--bundle must not be the --ca file")
    if args.system_cas == NO_SYSTEM_CAS:
        system, source = b"", "no system CAs (--system-cas none)"
    else:
        found = Path(args.system_cas).expanduser() if args.system_cas else system_ca_file()
        if found is None:
            raise AgentHostError(
                "found no system CA bundle on this host: pass --system-cas FILE, or "
                "--system-cas none to trust the gateway CA only"
            )
        system, source = found.read_bytes(), f"the system CAs ({found})"
    write_public(bundle_file, bundle(system, gateway_certs))
    return bundle_file, source, len(gateway_certs)
