"""Internal addresses: what egress may not reach unless the configuration names it.

An agent sending traffic through the gateway must not use it to reach the gateway host's own
services (its loopback: the approvals API, local databases), the networks behind it (RFC 1918,
ULA, CGNAT) or a cloud metadata service (169.254.169.254, fd00:ec2::254), which hands out the
host's own credentials. A destination whose address is internal is refused unless a route with an
exact host names it (host and port), or `allow_internal` lists it.

Names are no protection: `2130706433`, `0x7f.1` and `127.1` are 127.0.0.1 to the resolver, and a
DNS name can resolve to anything, differently from one lookup to the next. So the decision is
taken on the address actually connected to (the gateway resolves once, checks every address and
connects to a checked one: mitmcompat/upstream_connect.py); `name_class` is only the early,
DNS-free answer for literal addresses and well-known names, so most refusals are a clear 403
before any connection.

| class | IPv4 | IPv6 |
|---|---|---|
| loopback | 127.0.0.0/8 | ::1 |
| unspecified ("this host") | 0.0.0.0/8 | :: |
| private | 10/8, 172.16/12, 192.168/16 | fc00::/7 (ULA), fec0::/10 (site-local) |
| cgnat | 100.64.0.0/10 | |
| link-local | 169.254.0.0/16 | fe80::/10 |
| metadata | 169.254.169.254, 169.254.170.2, 100.100.100.200, 192.0.0.192 | fd00:ec2::254 |
| reserved | 192.0.0.0/24, 198.18.0.0/15, 240.0.0.0/4 | ::/96, 64:ff9b:1::/48, 100::/64 |
| multicast | 224.0.0.0/4 | ff00::/8 |

IPv6 addresses that carry an IPv4 address (`::ffff:127.0.0.1`, NAT64 `64:ff9b::7f00:1`, 6to4
`2002:7f00:1::`) are classified by the IPv4 address they carry.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import socket
from collections.abc import Iterable
from typing import Final

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_METADATA: Final = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "192.0.0.192", "fd00:ec2::254")
)
_CLASSES: Final[tuple[tuple[IPNetwork, str], ...]] = tuple(
    (ipaddress.ip_network(net), name)
    for net, name in (
        ("127.0.0.0/8", "loopback"),
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("100.64.0.0/10", "cgnat"),
        ("169.254.0.0/16", "link-local"),
        ("192.0.0.0/24", "reserved"),
        ("198.18.0.0/15", "reserved"),
        ("240.0.0.0/4", "reserved"),
        ("224.0.0.0/4", "multicast"),
        ("::1/128", "loopback"),
        ("::/128", "unspecified"),
        ("fc00::/7", "private"),
        ("fec0::/10", "private"),
        ("fe80::/10", "link-local"),
        ("::/96", "reserved"),
        ("64:ff9b:1::/48", "reserved"),
        ("100::/64", "reserved"),
        ("ff00::/8", "multicast"),
    )
)
_NAT64: Final = ipaddress.ip_network("64:ff9b::/96")
_6TO4: Final = ipaddress.ip_network("2002::/16")

# Names that are internal wherever the gateway runs (RFC 6761 localhost, cloud metadata services).
_INTERNAL_NAMES: Final = {
    "localhost": "loopback",
    "localhost.localdomain": "loopback",
    "ip6-localhost": "loopback",
    "ip6-loopback": "loopback",
    "metadata": "metadata",
    "metadata.google.internal": "metadata",
    "metadata.goog": "metadata",
    "instance-data": "metadata",
    "instance-data.ec2.internal": "metadata",
}


def address_class(address: IPAddress | str) -> str | None:
    """The internal class of an address (see the module table), or None for a public one."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
        carried = _carried_ipv4(ip)
        if carried is not None:
            return address_class(carried)
    if ip in _METADATA:
        return "metadata"
    for network, name in _CLASSES:
        if ip.version == network.version and ip in network:
            return name
    return None


def _carried_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _6TO4:
        return ip.sixtofour
    return None


@functools.lru_cache(maxsize=4096)
def literal_address(host: str) -> IPAddress | None:
    """`host` as an IP address if the resolver would read it as one, in any spelling it accepts
    (`2130706433`, `0x7f.1`, `0177.0.0.1`, `127.1`, `[::1]`, `::ffff:127.0.0.1`)."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    if not host or not all(c in "0123456789abcdefxABCDEFX." for c in host):
        return None
    try:  # the C library's inet_aton: the spellings getaddrinfo accepts for IPv4
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


@functools.lru_cache(maxsize=4096)
def unusual_ipv4(host: str) -> bool:
    """Whether `host` is an IPv4 address only the C resolver reads as one (`2130706433`,
    `0x7f.1`, `127.1`, `0177.0.0.1`): anything matching hosts by text would miss it."""
    literal = literal_address(host)
    return literal is not None and literal.version == 4 and host.strip() != str(literal)


@functools.lru_cache(maxsize=4096)
def name_class(host: str) -> str | None:
    """The internal class of a host known without DNS (a literal address, `localhost`, a cloud
    metadata name), or None: only its resolved addresses can tell."""
    literal = literal_address(host)
    if literal is not None:
        return address_class(literal)
    name = host.strip().lower().rstrip(".")
    if name.endswith(".localhost"):
        return "loopback"
    return _INTERNAL_NAMES.get(name)


@dataclasses.dataclass(frozen=True)
class InternalAllowance:
    """One `allow_internal` entry: an IP network or a host name, on one port or any."""

    network: IPNetwork | None
    host: str | None
    port: int | None

    @classmethod
    def parse(cls, text: str) -> InternalAllowance:
        """`10.0.0.0/8`, `127.0.0.1:8080`, `[::1]:8080`, `db.internal:5432`, `db.internal`.
        Raises ValueError with a message fit for a config error."""
        bad = ValueError(
            f"{text!r}: expected an IP address or CIDR block, or a host name, optionally with :port"
        )
        spec, port_text = text.strip(), None
        if spec.startswith("["):
            spec, _, rest = spec[1:].partition("]")
            if rest and not rest.startswith(":"):
                raise bad
            port_text = rest[1:] if rest else None
        elif spec.count(":") == 1:
            spec, port_text = spec.split(":")
        port = _port(port_text) if port_text is not None else None
        if not spec or any(c in spec for c in " @?#\\"):
            raise bad
        try:
            return cls(ipaddress.ip_network(spec, strict=False), None, port)
        except ValueError:
            pass
        if "/" in spec or ":" in spec or "*" in spec:
            raise bad
        return cls(None, _normal(spec), port)

    def covers(self, host: str, port: int, address: IPAddress | None) -> bool:
        if self.port is not None and port != self.port:
            return False
        if self.network is not None:
            return address is not None and _unmapped(address) in self.network
        return _normal(host) == self.host


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError("port must be a number between 1 and 65535")
    return int(text)


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)
def _normal(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    literal = literal_address(host)
    return str(literal) if literal is not None else host


class EgressGuard:
    """Which internal destinations may be reached: those an exact route names (host and port)
    and those `allow_internal` lists; every other internal address is refused."""

    def __init__(
        self,
        named: Iterable[tuple[str, int]] = (),
        allowances: Iterable[InternalAllowance] = (),
    ) -> None:
        self._named = frozenset((_normal(host), port) for host, port in named)
        self._allowances = tuple(allowances)

    def named(self, host: str, port: int) -> bool:
        """Whether the configuration names `host:port` itself (so it may be internal)."""
        return (_normal(host), port) in self._named or any(
            a.host is not None and a.covers(host, port, None) for a in self._allowances
        )

    def refusal_for_name(self, host: str, port: int) -> str | None:
        """The internal class that refuses `host:port` without DNS, or None (not known yet)."""
        kind = name_class(host)
        if kind is None or self.named(host, port):
            return None
        literal = literal_address(host)
        if literal is not None and self._allowed_address(host, port, literal):
            return None
        return kind

    def refusal_for_address(self, host: str, port: int, address: str) -> str | None:
        """The internal class that refuses connecting to `address` for `host:port`, or None."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        kind = address_class(ip)
        if kind is None or self.named(host, port) or self._allowed_address(host, port, ip):
            return None
        return kind

    def _allowed_address(self, host: str, port: int, ip: IPAddress) -> bool:
        return (str(_unmapped(ip)), port) in self._named or any(
            a.network is not None and a.covers(host, port, ip) for a in self._allowances
        )
