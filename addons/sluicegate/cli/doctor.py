"""`python -m sluicegate doctor`: is this agent host set up to use the gateway? Run it in the
agent's own environment (after sourcing what `agent-env` printed):

    python -m sluicegate doctor [--proxy URL] [--token-file F] [--ca FILE] [--probe-url URL]
                                [--api-host HOST ...]

Checks, each with what to fix when it fails:
  proxy-env   HTTPS_PROXY / HTTP_PROXY are set and agree (without them agents connect directly)
  no-proxy    NO_PROXY does not send the API hosts (and the probe host) around the gateway
  proxy       the gateway accepts TCP connections
  token       the gateway accepts the token (a CONNECT to the probe host; a 407/401 names the
              reason: expired, bad_signature, ...)
  ca          (with --ca) the gateway's certificates are signed by that CA
  trust-python  Python's default TLS context (SSL_CERT_FILE...) trusts the gateway
  trust:VAR   each CA variable that is set (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, ...) does too
  curl, node  the tool reaches the probe URL through the gateway / trusts it (skipped if absent)
  node-proxy  Node's own fetch (the openai Node SDK's) goes through the gateway: Node < 24
              ignores HTTPS_PROXY and would go straight to the API
  git         git sends proxy credentials on its first CONNECT (GIT_HTTP_PROXY_AUTHMETHOD=basic)
  probe       a GET of the probe URL through the gateway is answered by the upstream
  base-url:VAR  (OPENAI_BASE_URL / ANTHROPIC_BASE_URL set, or --base-url) the SDK's base URL is
              the gateway's base-URL listener: a GET of its models endpoint, with the SDK's API
              key (the caller token), is answered through the gateway (not straight by the API,
              not refused: 401 names the token's problem, 404 an unknown prefix)

The token comes from --token-file, else from the proxy URL's password (--proxy, HTTPS_PROXY); it
is never printed. Exit codes: 0 no check failed (warnings allowed), 1 a check failed, 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final, Literal

from sluicegate.cli.agenthost import (
    ADDITIVE_CA_VARS,
    REPLACING_CA_VARS,
    AgentHostError,
    Proxy,
    basic_proxy_authorization,
    env_value,
    no_proxy_entry,
    read_token,
)

Status = Literal["pass", "warn", "fail", "skip"]
DEFAULT_PROBE: Final = "https://api.openai.com/v1/models"
DEFAULT_API_HOSTS: Final = ("api.openai.com", "api.anthropic.com")
GATEWAY_ERROR_TYPE: Final = "sluicegate_error"
MAX_HEAD: Final = 16 * 1024
MAX_BODY: Final = 64 * 1024
# curl exit codes that mean "the server certificate was not trusted"
CURL_TLS_FAILURES: Final = frozenset({35, 51, 60, 77, 83})
CURL_PROXY_FAILURES: Final = frozenset({5, 7})

_EXPIRED = "the token expired: get a fresh one and regenerate the agent environment"
_WRONG_KEY = (
    "the token is not signed by a key this gateway trusts (another IdP or environment?): "
    "get a token from the gateway's identity provider"
)
_CLOCK = "the token is not valid yet: check this host's clock"
_NOT_A_TOKEN = "the token file does not hold one whole JWT: check it for truncation or extra text"
TOKEN_FIXES: Final = {
    "missing_token": "put the token in the proxy URL: HTTPS_PROXY=http://agent:<token>@HOST:PORT "
    "(`agent-env` prints it)",
    "expired": _EXPIRED,
    "too_old": _EXPIRED,
    "not_yet_valid": _CLOCK,
    "issued_in_future": _CLOCK,
    "bad_signature": _WRONG_KEY,
    "unknown_kid": _WRONG_KEY,
    "missing_kid": _WRONG_KEY,
    "ambiguous_kid": _WRONG_KEY,
    "alg_not_allowed": _WRONG_KEY,
    "wrong_issuer": "the token is from another issuer: request one for this gateway",
    "wrong_audience": "the token is for another audience: request one for this gateway",
    "missing_claim": "the token lacks a claim the gateway requires: ask the IdP's admin",
    "invalid_claim": "a claim of the token is not what the gateway accepts: ask the IdP's admin",
    "malformed": _NOT_A_TOKEN,
    "too_large": _NOT_A_TOKEN,
    "ambiguous_token": "send the token once: as the proxy password only",
    "jwks_unavailable": "the gateway cannot fetch its signing keys: tell the gateway's operator",
}
ROUTING_FIXES: Final = {
    "egress_denied": "the gateway has no route for the probe host: pass --probe-url with an API "
    "URL the gateway routes",
    "group_not_allowed": "the token's groups do not include the route's: ask for the right group",
}
NODE_PROBE: Final = r"""
const http = require('http'), net = require('net'), tls = require('tls');
const e = process.env, host = e.SLUICEGATE_DOCTOR_HOST, port = +e.SLUICEGATE_DOCTOR_PORT;
const out = (o) => { process.stdout.write(JSON.stringify(o)); process.exit(0); };
const target = net.isIPv6(host) ? `[${host}]:${port}` : `${host}:${port}`;
const req = http.request({
  host: e.SLUICEGATE_DOCTOR_PROXY_HOST, port: +e.SLUICEGATE_DOCTOR_PROXY_PORT,
  method: 'CONNECT', path: target, timeout: +e.SLUICEGATE_DOCTOR_TIMEOUT_MS,
  headers: {'proxy-authorization': e.SLUICEGATE_DOCTOR_AUTH},
});
req.on('connect', (res, socket) => {
  if (res.statusCode !== 200) { socket.destroy(); out({connect: res.statusCode}); }
  const options = {socket, host};
  if (!net.isIP(host)) options.servername = host;
  const s = tls.connect(options, () => { s.destroy(); out({ok: s.authorized}); });
  s.on('error', (err) => out({ok: false, code: err.code || 'error'}));
});
req.on('timeout', () => out({ok: false, code: 'TIMEOUT'}));
req.on('error', (err) => out({ok: false, code: err.code || 'error'}));
req.end();
"""

# Does Node's own fetch (what the openai Node SDK uses) go through the gateway? Every answer the
# gateway gives carries x-sluicegate-request-id; an answer without it, or a direct connection
# error, means Node went around the proxy.
NODE_FETCH_PROBE: Final = r"""
const out = (o) => { process.stdout.write(JSON.stringify(o)); process.exit(0); };
const version = process.versions.node;
if (typeof fetch !== 'function') out({version, nofetch: true});
const e = process.env, signal = AbortSignal.timeout(+e.SLUICEGATE_DOCTOR_TIMEOUT_MS);
const why = (err) => (err.cause && (err.cause.code || err.cause.message)) || err.code || `${err}`;
fetch(e.SLUICEGATE_DOCTOR_URL, {signal})
  .then((r) => out({version, status: r.status, gateway: r.headers.has('x-sluicegate-request-id')}))
  .catch((err) => out({version, error: why(err)}));
"""
BASE_URL_VARS: Final = ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL")
BASE_URL_KEY_VARS: Final = {
    "OPENAI_BASE_URL": "OPENAI_API_KEY",
    "ANTHROPIC_BASE_URL": "ANTHROPIC_API_KEY",
}
BASE_URL_FIX: Final = (
    "export what `python -m sluicegate agent-env --base-url http://<gateway>:<base-URL port>` "
    "prints"
)
NODE_TLS_ERRORS: Final = ("CERT", "SELF_SIGNED", "UNABLE_TO", "ERR_TLS")
NODE_PROXY_FIX: Final = (
    "Node reads HTTPS_PROXY only from version 24 on, with NODE_USE_ENV_PROXY=1 (agent-env sets "
    "it): use Node 24+, or give the agent a proxy-aware fetch (README, 'Node.js agents')"
)


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclasses.dataclass(frozen=True)
class Answer:
    """An HTTP response head (and body) read from the proxy or the upstream."""

    status: int
    headers: dict[str, str]
    body: bytes

    def gateway_error(self) -> tuple[str, str] | None:
        """(code, message) when the gateway itself answered (its JSON error shape)."""
        try:
            error = json.loads(self.body)["error"]
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(error, dict) or error.get("type") != GATEWAY_ERROR_TYPE:
            return None
        return str(error.get("code", "?")), str(error.get("message", ""))


class TunnelRefused(Exception):
    """The proxy answered the CONNECT with something other than 200."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.status)
        self.answer = answer


def read_answer(sock: socket.socket | ssl.SSLSocket, *, head_only: bool = False) -> Answer:
    """Read one HTTP/1.1 response; the body by Content-Length, chunks, or until close."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("the connection closed before a complete response head")
        data += chunk
        if len(data) > MAX_HEAD:
            raise ConnectionError("response head too large")
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("iso-8859-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ConnectionError("not an HTTP response")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    status = int(parts[1])
    if head_only and status == 200:
        return Answer(status, headers, b"")
    return Answer(status, headers, _read_body(sock, headers, rest))


def _read_body(sock: socket.socket | ssl.SSLSocket, headers: dict[str, str], body: bytes) -> bytes:
    length = headers.get("content-length")
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    want = int(length) if length and length.isdigit() else None
    while len(body) < MAX_BODY and (want is None or len(body) < want):
        if chunked and body.endswith(b"0\r\n\r\n"):
            break
        try:
            chunk = sock.recv(16384)
        except (TimeoutError, ssl.SSLError, OSError):
            break
        if not chunk:
            break
        body += chunk
    return _dechunk(body) if chunked else body[: want if want is not None else MAX_BODY]


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


class Doctor:
    """Runs the checks against one gateway and probe URL, in the given environment."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        proxy: Proxy | None,
        token: str | None,
        ca_file: Path | None,
        probe_url: str,
        api_hosts: Sequence[str] = DEFAULT_API_HOSTS,
        timeout: float = 10.0,
        base_url: str | None = None,
    ) -> None:
        self.env = env
        self.explicit_proxy = proxy
        self.token = token
        self.ca_file = ca_file
        self.probe = urllib.parse.urlsplit(probe_url)
        if self.probe.scheme != "https" or not self.probe.hostname:
            raise AgentHostError("--probe-url must be an https:// URL")
        self.probe_host: str = self.probe.hostname
        self.probe_port = self.probe.port or 443
        self.api_hosts = api_hosts
        self.timeout = timeout
        self.checks: list[Check] = []
        # (variable, SDK base URL): the SDKs that talk to the gateway's base-URL listener.
        self.base_urls = [(v, env[v].strip()) for v in BASE_URL_VARS if env.get(v, "").strip()]
        if base_url is not None:
            self.base_urls = [("--base-url", base_url.strip())] + [
                b for b in self.base_urls if b[0] != "OPENAI_BASE_URL"
            ]

    # -- running ---------------------------------------------------------------------------

    def run(self) -> list[Check]:
        env_proxy = self._check_proxy_env()
        self._check_no_proxy()
        proxy = self.explicit_proxy or env_proxy
        if proxy is None:
            self._check_base_urls()
            self._skip_rest("no proxy to check: set HTTPS_PROXY or pass --proxy")
            return self.checks
        token = self._token(proxy, env_proxy)
        proxy = proxy.with_token(token)
        if not self._check_reachable(proxy):
            self._skip_rest("needs a reachable proxy")
            return self.checks
        if not self._check_token(proxy):
            self._skip_rest("needs a tunnel through the gateway (see above)")
            return self.checks
        self._check_trust(proxy)
        self._check_curl(proxy)
        self._check_node(proxy)
        self._check_node_proxy()
        self._check_git()
        self._check_probe(proxy)
        self._check_base_urls()
        return self.checks

    def add(self, name: str, status: Status, detail: str, fix: str = "") -> None:
        self.checks.append(Check(name, status, self._clean(detail), self._clean(fix)))

    def _clean(self, text: str) -> str:
        """Never print the token, even where a tool echoed it."""
        keys = [self.env.get(name, "").strip() for name in BASE_URL_KEY_VARS.values()]
        for secret in (self.token, self.explicit_proxy and self.explicit_proxy.token, *keys):
            if secret and len(secret) >= 8:
                text = text.replace(secret, "***").replace(urllib.parse.quote(secret), "***")
        return text

    def _skip_rest(self, reason: str) -> None:
        done = {c.name for c in self.checks}
        for name in ("proxy", "token", "trust-python", "curl", "node", "node-proxy", "probe"):
            if name not in done:
                self.add(name, "skip", reason)

    # -- environment -------------------------------------------------------------------------

    def _check_proxy_env(self) -> Proxy | None:
        https = env_value(self.env, "https_proxy")
        if https is None and self.base_urls:
            self.add(
                "proxy-env",
                "warn",
                "HTTPS_PROXY is not set: only SDKs given the gateway's base URL ("
                + ", ".join(name for name, _ in self.base_urls)
                + ") go through it; every other tool connects directly",
                "export the proxy variables too (`agent-env --proxy ... --base-url ...`)",
            )
            return None
        if https is None:
            self.add(
                "proxy-env",
                "fail",
                "HTTPS_PROXY is not set: agents in this environment connect directly, "
                "bypassing the gateway",
                "export the variables `python -m sluicegate agent-env` prints",
            )
            return None
        try:
            proxy = Proxy.parse(https[1])
        except AgentHostError as e:
            self.add("proxy-env", "fail", f"{https[0]} is not usable: {e}", "fix the variable")
            return None
        self.token = self.token or proxy.token  # for _clean, before anything is printed
        problems = []
        upper, lower = self.env.get("HTTPS_PROXY"), self.env.get("https_proxy")
        if upper and lower and upper.strip() != lower.strip():
            problems.append("https_proxy and HTTPS_PROXY differ (curl and Python use https_proxy)")
        if self.explicit_proxy and self.explicit_proxy.netloc != proxy.netloc:
            problems.append(f"{https[0]} points at {proxy.netloc}, not at --proxy")
        if problems:
            self.add("proxy-env", "fail", "; ".join(problems), "export what `agent-env` prints")
            return proxy
        self.add("proxy-env", "pass", f"{https[0]}={proxy.redacted()}")
        http = env_value(self.env, "http_proxy")
        if http is None or _netloc(http[1]) != proxy.netloc:
            self.add(
                "proxy-env",
                "warn",
                "http_proxy is not the gateway: plain-http requests bypass it (curl reads only "
                "the lower-case http_proxy)",
                "set HTTP_PROXY and http_proxy like HTTPS_PROXY",
            )
        return proxy

    def _check_no_proxy(self) -> None:
        hosts = dict.fromkeys([self.probe_host, *self.api_hosts])
        found = []
        for variable in ("NO_PROXY", "no_proxy"):
            value = self.env.get(variable, "")
            for host in hosts:
                entry = no_proxy_entry(value, host, self.probe_port)
                if entry is not None:
                    found.append(f"{variable} entry {entry!r} covers {host}")
        if found:
            self.add(
                "no-proxy",
                "fail",
                "; ".join(found) + ": those requests go directly, bypassing the gateway",
                "remove those entries from NO_PROXY and no_proxy",
            )
        else:
            self.add("no-proxy", "pass", f"NO_PROXY leaves {', '.join(hosts)} to the gateway")

    def _token(self, proxy: Proxy, env_proxy: Proxy | None) -> str | None:
        if self.token and env_proxy and env_proxy.token and env_proxy.token != self.token:
            self.add(
                "token-env",
                "warn",
                "HTTPS_PROXY carries another token than --token-file: agents use HTTPS_PROXY's; "
                "checking --token-file's",
                "regenerate the environment with `agent-env`",
            )
        return self.token or proxy.token

    # -- network -------------------------------------------------------------------------------

    def _check_reachable(self, proxy: Proxy) -> bool:
        try:
            socket.create_connection((proxy.host, proxy.port), timeout=self.timeout).close()
        except OSError as e:
            self.add(
                "proxy",
                "fail",
                f"cannot connect to the gateway at {proxy.netloc} ({e.strerror or e})",
                "check the host and port, that the gateway runs, and firewalls in between",
            )
            return False
        self.add("proxy", "pass", f"{proxy.netloc} accepts connections")
        return True

    @contextlib.contextmanager
    def tunnel(self, proxy: Proxy) -> Iterator[socket.socket]:
        """A CONNECT tunnel to the probe host; raises TunnelRefused with the proxy's answer."""
        sock = socket.create_connection((proxy.host, proxy.port), timeout=self.timeout)
        try:
            target = f"{self.probe.netloc.rpartition('@')[2]}"
            if self.probe.port is None:
                target = f"{target}:{self.probe_port}"
            head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
            if proxy.token:
                head += f"Proxy-Authorization: {basic_proxy_authorization(proxy.token)}\r\n"
            sock.sendall((head + "\r\n").encode())
            answer = read_answer(sock, head_only=True)
            if answer.status != 200:
                raise TunnelRefused(answer)
            yield sock
        finally:
            sock.close()

    def _check_token(self, proxy: Proxy) -> bool:
        """The CONNECT carries the token: 200 = accepted; a refusal names its reason."""
        if not proxy.token:
            self.add(
                "token",
                "fail",
                "no token: the proxy URL has no password",
                TOKEN_FIXES["missing_token"],
            )
            return False
        try:
            with self.tunnel(proxy):
                pass
        except TunnelRefused as refused:
            return self._refused_tunnel(refused.answer)
        except OSError as e:
            self.add("token", "fail", f"the CONNECT failed ({e})", "check the gateway's logs")
            return False
        self.add("token", "pass", "the gateway accepted the token")
        return True

    def _refused_tunnel(self, answer: Answer) -> bool:
        error = answer.gateway_error()
        if error is None:
            self.add(
                "token",
                "fail",
                f"HTTP {answer.status} to CONNECT, not from sluicegate: is HTTPS_PROXY another "
                "proxy, or is the gateway behind one?",
                "point HTTPS_PROXY at the gateway",
            )
            return False
        code, message = error
        if answer.status in (401, 407):
            self.add(
                "token",
                "fail",
                f"the gateway rejected the token: {code} (HTTP {answer.status})",
                TOKEN_FIXES.get(code, "get a valid token for this gateway"),
            )
            return False
        if answer.status >= 500:  # e.g. gateway_not_configured: refused before authentication
            self.add(
                "token",
                "fail",
                f"the gateway cannot serve: {code}: {message}",
                "a gateway-side problem: tell its operator (see the gateway's log)",
            )
            return False
        # Routing and policy refuse a tunnel only after authentication passed.
        self.add("token", "pass", "the gateway accepted the token")
        self.add(
            "probe",
            "fail",
            f"the gateway refused a tunnel to {self.probe_host}:{self.probe_port}: "
            f"{code}: {message}",
            ROUTING_FIXES.get(code, "see the gateway's policy for this code"),
        )
        return False

    def _handshake(self, proxy: Proxy, context: ssl.SSLContext) -> ssl.SSLSocket:
        """TLS through a fresh tunnel; the caller closes the socket."""
        with self.tunnel(proxy) as raw:
            detached = socket.socket(fileno=raw.detach())
        try:
            detached.settimeout(self.timeout)
            return context.wrap_socket(detached, server_hostname=self.probe_host)
        except BaseException:
            detached.close()
            raise

    def _verifies(self, proxy: Proxy, context: ssl.SSLContext) -> tuple[bool, str]:
        """(verified, why not / issuer) for the gateway's certificate of the probe host."""
        try:
            tls = self._handshake(proxy, context)
        except ssl.SSLCertVerificationError as e:
            return False, e.verify_message or str(e.reason)
        except (ssl.SSLError, OSError, TunnelRefused) as e:
            return False, f"TLS failed: {type(e).__name__}"
        with tls:
            issuer = dict(pair[0] for pair in tls.getpeercert().get("issuer", ()))  # type: ignore
        return True, f"issued by {issuer.get('commonName', '?')}"

    def _check_trust(self, proxy: Proxy) -> None:
        ca_ok = None
        if self.ca_file is not None:
            try:
                ca_context = ssl.create_default_context(cafile=str(self.ca_file))
            except (OSError, ssl.SSLError) as e:
                self.add("ca", "fail", f"cannot load --ca {self.ca_file} ({type(e).__name__})")
            else:
                ca_ok, why = self._verifies(proxy, ca_context)
                if ca_ok:
                    self.add("ca", "pass", f"--ca signs the gateway's certificates ({why})")
                else:
                    self.add(
                        "ca",
                        "fail",
                        f"the gateway's certificate is not signed by --ca {self.ca_file}: {why}",
                        "get the current CA export from the gateway's operator (`ca export`); "
                        "the CA may have been rotated",
                    )
        ok, why = self._verifies(proxy, ssl.create_default_context())
        source = env_value(self.env, "SSL_CERT_FILE") or ("SSL_CERT_FILE", "<system default>")
        if ok:
            self.add("trust-python", "pass", f"Python trusts the gateway ({why})")
        else:
            fix = "export SSL_CERT_FILE=<the bundle `agent-env` wrote> (system CAs + gateway CA)"
            if ca_ok is False:
                fix = "first get the right CA (see `ca`); then " + fix
            self.add(
                "trust-python",
                "fail",
                f"Python does not trust the gateway's CA ({source[0]}={source[1]}): {why}",
                fix,
            )
        checked: dict[str, tuple[bool, str]] = {}
        for variable in (*REPLACING_CA_VARS, *ADDITIVE_CA_VARS):
            value = self.env.get(variable, "").strip()
            if not value:
                if variable == "REQUESTS_CA_BUNDLE":
                    self.add(
                        f"trust:{variable}",
                        "warn",
                        "not set: Python requests uses certifi's bundle, without the gateway CA",
                        "export it like `agent-env` prints",
                    )
                continue
            if value not in checked:
                checked[value] = self._file_verifies(proxy, Path(value))
            file_ok, why = checked[value]
            if file_ok:
                self.add(f"trust:{variable}", "pass", f"{value} holds the gateway CA")
            else:
                self.add(
                    f"trust:{variable}",
                    "fail",
                    f"{value} does not let tools verify the gateway: {why}",
                    f"point {variable} at the file `agent-env` set it to",
                )

    def _file_verifies(self, proxy: Proxy, path: Path) -> tuple[bool, str]:
        try:
            context = ssl.create_default_context(cafile=str(path))
        except (OSError, ssl.SSLError) as e:
            return False, f"cannot load it ({type(e).__name__})"
        return self._verifies(proxy, context)

    # -- tools -------------------------------------------------------------------------------

    def _tool(self, name: str) -> str | None:
        return shutil.which(name, path=self.env.get("PATH", os.defpath))

    def _check_curl(self, proxy: Proxy) -> None:
        curl = self._tool("curl")
        if curl is None:
            self.add("curl", "skip", "curl not found on PATH")
            return
        command = [curl, "-sS", "-w", "\n%{http_code} %{http_connect}", "--max-time"]
        command += [str(int(self.timeout)), "-H", "accept: application/json", self.probe.geturl()]
        try:
            done = subprocess.run(
                command, env=dict(self.env), capture_output=True, timeout=self.timeout + 5
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            self.add("curl", "fail", f"curl did not run ({type(e).__name__})")
            return
        body, _, codes = done.stdout.rpartition(b"\n")
        http_code, _, connect_code = codes.decode(errors="replace").partition(" ")
        error = done.stderr.decode(errors="replace").strip().splitlines()
        why = error[0] if error else f"exit {done.returncode}"
        if done.returncode in CURL_TLS_FAILURES:
            self.add(
                "curl",
                "fail",
                f"curl does not trust the gateway's CA: {why}",
                "export CURL_CA_BUNDLE=<the bundle `agent-env` wrote>",
            )
        elif connect_code in ("401", "407"):
            code = Answer(int(connect_code), {}, body).gateway_error()
            self.add(
                "curl",
                "fail",
                f"the gateway rejected curl's token ({code[0] if code else connect_code})",
                "curl reads https_proxy before HTTPS_PROXY: make both hold the token",
            )
        elif done.returncode in CURL_PROXY_FAILURES:
            self.add("curl", "fail", f"curl could not reach the proxy: {why}", "check https_proxy")
        elif done.returncode != 0:
            self.add("curl", "fail", f"curl failed: {why}")
        elif connect_code != "200":
            self.add(
                "curl",
                "fail",
                f"curl went to {self.probe_host} without the proxy (HTTP {http_code})",
                "check https_proxy and no_proxy",
            )
        else:
            self.add("curl", "pass", f"curl got HTTP {http_code} through the gateway")

    def _check_node(self, proxy: Proxy) -> None:
        node = self._tool("node")
        if node is None:
            self.add("node", "skip", "node not found on PATH")
            return
        env = {
            **self.env,
            "SLUICEGATE_DOCTOR_HOST": self.probe_host,
            "SLUICEGATE_DOCTOR_PORT": str(self.probe_port),
            "SLUICEGATE_DOCTOR_PROXY_HOST": proxy.host,
            "SLUICEGATE_DOCTOR_PROXY_PORT": str(proxy.port),
            "SLUICEGATE_DOCTOR_AUTH": basic_proxy_authorization(proxy.token or ""),
            "SLUICEGATE_DOCTOR_TIMEOUT_MS": str(int(self.timeout * 1000)),
        }
        try:
            done = subprocess.run(
                [node, "-e", NODE_PROBE], env=env, capture_output=True, timeout=self.timeout + 5
            )
            result = json.loads(done.stdout or b"{}")
        except (OSError, subprocess.TimeoutExpired, ValueError) as e:
            self.add("node", "fail", f"node did not run the check ({type(e).__name__})")
            return
        if result.get("ok"):
            self.add(
                "node", "pass", "Node trusts the gateway (built-in roots + NODE_EXTRA_CA_CERTS)"
            )
        elif "connect" in result:
            self.add(
                "node", "fail", f"the gateway answered Node's CONNECT with {result['connect']}"
            )
        else:
            self.add(
                "node",
                "fail",
                f"Node does not trust the gateway's CA: {result.get('code', '?')}",
                "export NODE_EXTRA_CA_CERTS=<the gateway CA file> (read when node starts)",
            )

    def _check_node_proxy(self) -> None:
        """Node before 24 ignores HTTPS_PROXY: its fetch (and the openai Node SDK) would go
        straight to the API while every other check passes."""
        node = self._tool("node")
        if node is None:
            self.add("node-proxy", "skip", "node not found on PATH")
            return
        env = {
            **self.env,
            "SLUICEGATE_DOCTOR_URL": self.probe.geturl(),
            "SLUICEGATE_DOCTOR_TIMEOUT_MS": str(int(self.timeout * 1000)),
        }
        try:
            done = subprocess.run(
                [node, "-e", NODE_FETCH_PROBE],
                env=env,
                capture_output=True,
                timeout=self.timeout + 5,
            )
            result = json.loads(done.stdout or b"{}")
        except (OSError, subprocess.TimeoutExpired, ValueError) as e:
            self.add("node-proxy", "fail", f"node did not run the check ({type(e).__name__})")
            return
        version = result.get("version", "?")
        if result.get("nofetch"):
            self.add("node-proxy", "skip", f"Node {version} has no fetch")
        elif result.get("gateway"):
            self.add("node-proxy", "pass", f"Node {version}'s fetch goes through the gateway")
        elif "status" in result:
            self.add(
                "node-proxy",
                "fail",
                f"Node {version}'s fetch reached {self.probe_host} directly (HTTP "
                f"{result['status']}, not through the gateway): a Node agent bypasses it",
                NODE_PROXY_FIX,
            )
        elif any(mark in str(result.get("error", "")) for mark in NODE_TLS_ERRORS) and not any(
            c.name == "node" and c.status == "pass" for c in self.checks
        ):
            # Node does not trust the gateway: a TLS failure says nothing about the route taken.
            self.add(
                "node-proxy",
                "warn",
                f"Node {version}'s fetch failed on TLS ({result.get('error')}): see the node check",
            )
        else:
            self.add(
                "node-proxy",
                "fail",
                f"Node {version}'s fetch tried {self.probe_host} directly and failed "
                f"({result.get('error', '?')}): it does not use the gateway",
                NODE_PROXY_FIX,
            )

    def _check_git(self) -> None:
        """git sends proxy credentials only after a 407 unless told otherwise: its first CONNECT
        then fails with "could not read Username"."""
        git = self._tool("git")
        if git is None:
            self.add("git", "skip", "git not found on PATH")
            return
        method = self.env.get("GIT_HTTP_PROXY_AUTHMETHOD")
        if method is None:
            try:
                done = subprocess.run(
                    [git, "config", "--get", "http.proxyAuthMethod"],
                    env=dict(self.env),
                    capture_output=True,
                    timeout=10,
                )
                method = done.stdout.decode(errors="replace").strip() or None
            except (OSError, subprocess.TimeoutExpired):
                method = None
        if method == "basic":
            self.add("git", "pass", "git sends the proxy credentials at once (basic)")
        else:
            self.add(
                "git",
                "fail",
                f"git's proxy auth method is {method or 'anyauth (the default)'}: its first "
                'CONNECT carries no credentials and fails ("could not read Username")',
                "export GIT_HTTP_PROXY_AUTHMETHOD=basic (agent-env prints it)",
            )

    def _check_base_urls(self) -> None:
        for variable, base in self.base_urls:
            BaseUrlCheck(self, variable, base).run()

    def _check_probe(self, proxy: Proxy) -> None:
        contexts = [ssl.create_default_context()]
        if self.ca_file is not None:
            with contextlib.suppress(OSError, ssl.SSLError):
                contexts.append(ssl.create_default_context(cafile=str(self.ca_file)))
        for context in contexts:
            try:
                tls = self._handshake(proxy, context)
            except (ssl.SSLError, OSError, TunnelRefused):
                continue
            with tls:
                try:
                    answer = self._get(tls)
                except OSError as e:
                    self.add("probe", "fail", f"no answer to the probe request ({e})")
                    return
            self._judge_probe(answer)
            return
        self.add("probe", "skip", "needs TLS to the gateway that verifies (see trust-python)")

    def _get(self, tls: ssl.SSLSocket) -> Answer:
        path = self.probe.path or "/"
        if self.probe.query:
            path += "?" + self.probe.query
        host = self.probe.netloc.rpartition("@")[2]
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n"
            "User-Agent: sluicegate-doctor\r\nConnection: close\r\n\r\n"
        )
        tls.sendall(request.encode())
        return read_answer(tls)

    def _judge_probe(self, answer: Answer) -> None:
        url = self.probe.geturl()
        error = answer.gateway_error()
        if error is not None:
            code, message = error
            fix = TOKEN_FIXES.get(code) or ROUTING_FIXES.get(code) or "see the gateway's policy"
            self.add("probe", "fail", f"the gateway refused GET {url}: {code}: {message}", fix)
        elif answer.status in (502, 503, 504):
            self.add(
                "probe",
                "fail",
                f"GET {url}: HTTP {answer.status}: the gateway could not reach the upstream",
                "tell the gateway's operator (upstream DNS, egress, or upstream TLS)",
            )
        elif answer.status in (401, 403):
            self.add(
                "probe",
                "warn",
                f"GET {url}: the upstream answered HTTP {answer.status}: it may not accept the "
                "credential the gateway injects",
                "tell the gateway's operator",
            )
        else:
            self.add("probe", "pass", f"GET {url}: HTTP {answer.status} from the upstream")


class BaseUrlCheck:
    """GET the models endpoint of one SDK base URL, directly (no proxy), as the SDK would."""

    def __init__(self, doctor: Doctor, variable: str, base: str) -> None:
        self.doctor, self.variable, self.base = doctor, variable, base.rstrip("/")
        self.name = f"base-url:{variable}"

    def run(self) -> None:
        parts = urllib.parse.urlsplit(self.base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.doctor.add(
                self.name, "fail", f"{self.variable} is not an http(s) URL", BASE_URL_FIX
            )
            return
        anthropic = self.variable == "ANTHROPIC_BASE_URL"
        url = self.base + ("/v1/models" if anthropic else "/models")
        key_var = BASE_URL_KEY_VARS.get(self.variable, "OPENAI_API_KEY")
        key = self.doctor.token or self.doctor.env.get(key_var, "").strip()
        headers = {"accept": "application/json", "user-agent": "sluicegate-doctor"}
        if key and anthropic:
            headers |= {"x-api-key": key, "anthropic-version": "2023-06-01"}
        elif key:
            headers["authorization"] = f"Bearer {key}"
        try:
            answer = self._get(url, headers)
        except (OSError, ValueError) as e:
            why = getattr(e, "reason", None) or e
            self.doctor.add(
                self.name,
                "fail",
                f"cannot reach {self.variable}={self.base} ({why})",
                "check the host and port of the gateway's base-URL listener (base_url in its "
                "config), that it runs, and for https that SSL_CERT_FILE trusts the gateway CA",
            )
            return
        self._judge(answer, key_var, bool(key))

    def _get(self, url: str, headers: dict[str, str]) -> Answer:
        request = urllib.request.Request(url, headers=headers)
        context = ssl.create_default_context()
        if self.doctor.ca_file is not None:
            with contextlib.suppress(OSError, ssl.SSLError):
                context.load_verify_locations(cafile=str(self.doctor.ca_file))
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        try:
            with opener.open(request, timeout=self.doctor.timeout) as response:
                return Answer(
                    response.status,
                    {k.lower(): v for k, v in response.headers.items()},
                    response.read(MAX_BODY),
                )
        except urllib.error.HTTPError as e:
            return Answer(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read(MAX_BODY))

    def _judge(self, answer: Answer, key_var: str, has_key: bool) -> None:
        where = f"{self.variable}={self.base}"
        if REQUEST_ID_HEADER not in answer.headers:
            self.doctor.add(
                self.name,
                "fail",
                f"{where} answered HTTP {answer.status} without the gateway's request id: it is "
                "not the gateway, so this SDK bypasses it",
                BASE_URL_FIX,
            )
            return
        error = answer.gateway_error()
        if error is None:
            self.doctor.add(
                self.name,
                "pass",
                f"{where} is the gateway's base-URL listener (HTTP {answer.status} from the "
                "upstream through it)",
            )
            return
        code, message = error
        if answer.status == 401:
            fix = (
                TOKEN_FIXES.get(code, "get a valid token for this gateway")
                if has_key
                else f"set {key_var} to the caller token (`agent-env --base-url` does)"
            )
            self.doctor.add(
                self.name, "fail", f"the gateway rejected the API key as a token: {code}", fix
            )
        elif code == "base_url_unknown_prefix":
            self.doctor.add(
                self.name,
                "fail",
                f"{where}: the gateway knows no such prefix ({message})",
                "use a prefix of the gateway's base_url.prefixes (agent-env --openai-prefix / "
                "--anthropic-prefix)",
            )
        elif code == "not_a_proxy_request":
            self.doctor.add(
                self.name,
                "fail",
                f"{where} is the gateway's proxy port, not its base-URL listener",
                "use the base_url.listen_port of the gateway's config (default 8081)",
            )
        else:
            self.doctor.add(
                self.name,
                "warn",
                f"{where} is the gateway, which refused the models request: {code}: {message}",
                ROUTING_FIXES.get(code, "see the gateway's policy for this code"),
            )


REQUEST_ID_HEADER: Final = "x-sluicegate-request-id"


def _netloc(text: str) -> str | None:
    try:
        return Proxy.parse(text).netloc
    except AgentHostError:
        return None


def report(checks: Sequence[Check]) -> str:
    lines = []
    for check in checks:
        lines.append(f"{check.status.upper():5} {check.name:14} {check.detail}")
        if check.fix and check.status in ("fail", "warn"):
            lines.append(f"{'':20} fix: {check.fix}")
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    lines.append(f"{failed} failed, {warned} warning(s)" if failed or warned else "all good")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sluicegate doctor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--proxy", help="the gateway (default: HTTPS_PROXY)")
    parser.add_argument("--token-file", type=Path, help="token (default: HTTPS_PROXY's password)")
    parser.add_argument("--ca", type=Path, help="the gateway CA export, to tell wrong CA apart")
    parser.add_argument(
        "--probe-url",
        default=DEFAULT_PROBE,
        help=f"an API URL the gateway routes ({DEFAULT_PROBE})",
    )
    parser.add_argument(
        "--api-host",
        action="append",
        help="an API host that must not be in NO_PROXY (repeatable; default: "
        + ", ".join(DEFAULT_API_HOSTS)
        + ")",
    )
    parser.add_argument(
        "--base-url",
        help="an OpenAI SDK base URL to check (default: OPENAI_BASE_URL; ANTHROPIC_BASE_URL "
        "is checked too when set)",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per network step")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        proxy = Proxy.parse(args.proxy) if args.proxy else None
        token = read_token(args.token_file.expanduser()) if args.token_file else None
        doctor = Doctor(
            os.environ,
            proxy=proxy,
            token=token or (proxy.token if proxy else None),
            ca_file=args.ca.expanduser().absolute() if args.ca else None,
            probe_url=args.probe_url,
            api_hosts=args.api_host or DEFAULT_API_HOSTS,
            timeout=args.timeout,
            base_url=args.base_url,
        )
    except AgentHostError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    checks = doctor.run()
    sys.stdout.write(report(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0
