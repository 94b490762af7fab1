"""What `agent-env` and `doctor` share: proxy URLs, tokens, PEM bundles and NO_PROXY rules.

Standard library only: these run on agent hosts, which need no mitmproxy or cryptography.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import ipaddress
import re
import ssl
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

PROXY_USER: Final = "agent"
# OpenSSL-based tools read these as their ONLY trust store: they get system CAs + gateway CA.
REPLACING_CA_VARS: Final = (
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
)
# Node adds this file to its built-in roots: the gateway CA alone is enough.
ADDITIVE_CA_VARS: Final = ("NODE_EXTRA_CA_CERTS",)
DEFAULT_NO_PROXY: Final = "localhost,127.0.0.1,::1"
# Where distributions keep their CA bundle, tried after OpenSSL's compiled-in default.
SYSTEM_CA_FILES: Final = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/pki/tls/cacert.pem",  # OpenELEC
    "/etc/ssl/cert.pem",  # macOS, Alpine, BSDs
)
_PEM: Final = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)\r?\n-----END \1-----", re.DOTALL)
_TOKEN: Final = re.compile(r"[\x21-\x7e]+")  # printable, no spaces: it goes into a URL and a header


class AgentHostError(Exception):
    """Input an agent-host tool cannot use; the message never holds a token."""


@dataclasses.dataclass(frozen=True)
class Proxy:
    """Where the gateway listens, as an agent reaches it."""

    host: str
    port: int
    token: str | None = None

    @classmethod
    def parse(cls, text: str) -> Proxy:
        """`HOST:PORT` or `http://[user:token@]HOST:PORT` (the gateway speaks plain HTTP)."""
        raw = text.strip()
        url = urllib.parse.urlsplit(raw if "://" in raw else f"http://{raw}")
        if url.scheme != "http":
            raise AgentHostError(
                f"proxy scheme {url.scheme!r}: the gateway is an http:// proxy (the tunnel "
                "inside is TLS)"
            )
        try:
            port = url.port
        except ValueError:
            raise AgentHostError("the proxy port is not a number") from None
        if not url.hostname or port is None or url.path not in ("", "/"):
            raise AgentHostError("give the proxy as HOST:PORT or http://HOST:PORT")
        token = urllib.parse.unquote(url.password) if url.password else None
        return cls(url.hostname, port, token)

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def url(self, token: str | None = None) -> str:
        """The proxy URL with the token as the proxy password (what HTTPS_PROXY holds)."""
        token = token if token is not None else self.token
        if token is None:
            return f"http://{self.netloc}"
        return f"http://{PROXY_USER}:{urllib.parse.quote(token, safe='')}@{self.netloc}"

    def redacted(self) -> str:
        return f"http://{PROXY_USER}:***@{self.netloc}" if self.token else self.url()

    def with_token(self, token: str | None) -> Proxy:
        return dataclasses.replace(self, token=token)


def basic_proxy_authorization(token: str) -> str:
    """The Proxy-Authorization value clients send for a proxy URL with `agent:<token>`."""
    return "Basic " + base64.b64encode(f"{PROXY_USER}:{token}".encode()).decode()


def read_token(path: Path) -> str:
    """The token in a file: one line of printable characters (a JWT, usually)."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise AgentHostError(f"cannot read the token file {path} ({type(e).__name__})") from None
    if not token:
        raise AgentHostError(f"the token file {path} is empty")
    if not _TOKEN.fullmatch(token):
        raise AgentHostError(
            f"the token file {path} must hold one token: no spaces, line breaks or quotes"
        )
    return token


# -- certificates -------------------------------------------------------------------------------


def pem_blocks(data: bytes) -> list[tuple[str, bytes]]:
    """(label, PEM block) for every PEM block in `data`, in order."""
    return [(m.group(1).decode(), m.group(0) + b"\n") for m in _PEM.finditer(data)]


def certificates(data: bytes, source: str) -> list[bytes]:
    """The certificate PEM blocks of a file meant for agent hosts.

    Refuses a file that holds a private key: the gateway CA key never leaves the gateway, and a
    file that has one is the wrong file (`ca export` writes certificates only).
    """
    blocks = pem_blocks(data)
    if any("PRIVATE KEY" in label for label, _ in blocks):
        raise AgentHostError(
            f"{source} holds a private key: agent hosts get the CA certificate only "
            "(`python -m sluicegate ca export`)"
        )
    certs = [block for label, block in blocks if label in ("CERTIFICATE", "TRUSTED CERTIFICATE")]
    if not certs:
        raise AgentHostError(f"{source} holds no PEM certificate")
    return certs


def _der(block: bytes) -> bytes:
    body = b"".join(block.splitlines()[1:-1])
    return base64.b64decode(body)


def system_ca_file() -> Path | None:
    """This host's CA bundle, ignoring SSL_CERT_FILE (which may already point at our bundle)."""
    candidates = [ssl.get_default_verify_paths().openssl_cafile, *SYSTEM_CA_FILES]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    try:
        import certifi
    except ImportError:
        return None
    return Path(certifi.where())


def bundle(system: bytes, gateway: Iterable[bytes]) -> bytes:
    """System CAs followed by the gateway CAs, each certificate once."""
    seen: set[bytes] = set()
    out = []
    for block in [*(b for label, b in pem_blocks(system) if label == "CERTIFICATE"), *gateway]:
        der = _der(block)
        if der not in seen:
            seen.add(der)
            out.append(block)
    return b"".join(out)


# -- the environment ----------------------------------------------------------------------------


def env_value(env: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """(variable, value) a client uses for `name`: lower case first, as curl and Python do."""
    for variable in (name.lower(), name.upper()):
        value = env.get(variable)
        if value is not None and value.strip():
            return variable, value.strip()
    return None


def no_proxy_entry(no_proxy: str, host: str, port: int) -> str | None:
    """The NO_PROXY entry that makes some common client skip the proxy for host:port, if any.

    Takes the union of client rules (Python, curl, Go, requests), since the agent may use any:
    `*`; a name matching the host or a parent domain (with or without a leading `.` or `*.`);
    an IP or CIDR range covering a literal IP host (whose text is matched like a name, too);
    an optional `:port` that must match.
    """
    host = host.strip("[]").rstrip(".").lower()
    address = _ip(host)
    for raw in re.split(r"[,\s]+", no_proxy):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return raw.strip()
        name, entry_port = _split_port(entry)
        if entry_port is not None and entry_port != port:
            continue
        if address is not None:
            with contextlib.suppress(ValueError):
                if address in ipaddress.ip_network(name.strip("[]"), strict=False):
                    return raw.strip()
        # Python and curl match IP literals by string suffix too (`0.1` covers 10.0.0.1).
        name = name.removeprefix("*").lstrip(".").rstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return raw.strip()
    return None


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _split_port(entry: str) -> tuple[str, int | None]:
    """`host:port`, `[v6]:port`, bare names and bare IPv6 addresses."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if port.isdigit():
            return host, int(port)
    return entry, None
