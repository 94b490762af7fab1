"""egress.addresses: which addresses are internal, in every spelling, and what names them."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sluicegate.egress.addresses import (
    EgressGuard,
    InternalAllowance,
    address_class,
    literal_address,
    name_class,
    unusual_ipv4,
)
from sluicegate.mitmcompat import upstream_connect


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("10.1.2.3", "private"),
        ("172.31.255.255", "private"),
        ("192.168.0.1", "private"),
        ("fd12:3456::1", "private"),
        ("fec0::1", "private"),
        ("100.64.0.1", "cgnat"),
        ("100.127.255.254", "cgnat"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("169.254.169.254", "metadata"),
        ("169.254.170.2", "metadata"),
        ("100.100.100.200", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "metadata"),
        ("64:ff9b::a00:1", "private"),
        ("2002:a9fe:a9fe::", "metadata"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "reserved"),
        ("198.18.0.1", "reserved"),
        ("8.8.8.8", None),
        ("172.32.0.1", None),
        ("100.128.0.1", None),
        ("2606:4700::1111", None),
        ("64:ff9b::808:808", None),
    ],
)
def test_address_classes(address: str, kind: str | None) -> None:
    assert address_class(address) == kind


@pytest.mark.parametrize(
    "spelling",
    ["2130706433", "0x7f.1", "0177.0.0.1", "127.1", "0x7f000001", "017700000001", "127.0.1"],
)
def test_every_spelling_the_resolver_accepts_is_read_as_the_address(spelling: str) -> None:
    resolved = {info[4][0] for info in socket.getaddrinfo(spelling, 80, type=socket.SOCK_STREAM)}
    literal = literal_address(spelling)
    assert literal is not None and {str(literal)} == resolved
    assert name_class(spelling) == "loopback"


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_decimal_and_hex_spellings_agree_with_the_resolver(n: int) -> None:
    expected = ipaddress.IPv4Address(n)
    assert literal_address(str(n)) == expected
    assert literal_address(hex(n)) == expected


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("localhost", "loopback"),
        ("LOCALHOST.", "loopback"),
        ("api.localhost", "loopback"),
        ("[::1]", "loopback"),
        ("[::ffff:127.0.0.1]", "loopback"),
        ("metadata.google.internal", "metadata"),
        ("metadata.goog", "metadata"),
        ("api.openai.com", None),
        ("cafe.example", None),
        ("deadbeef", None),
    ],
)
def test_names_known_without_dns(host: str, kind: str | None) -> None:
    assert name_class(host) == kind


def test_routes_name_their_host_and_port_only() -> None:
    guard = EgressGuard(named=[("127.0.0.1", 8443), ("db.corp", 5432)])
    assert guard.refusal_for_name("127.0.0.1", 8443) is None
    assert guard.refusal_for_name("2130706433", 8443) is None  # the same address
    assert guard.refusal_for_name("127.0.0.1", 8444) == "loopback"
    assert guard.refusal_for_address("db.corp", 5432, "10.0.0.5") is None
    assert guard.refusal_for_address("db.corp", 5433, "10.0.0.5") == "private"
    assert guard.refusal_for_address("other.corp", 8443, "127.0.0.1") is None  # same address
    assert guard.refusal_for_address("other.corp", 9, "127.0.0.1") == "loopback"
    assert guard.refusal_for_address("api.example", 443, "93.184.216.34") is None


@pytest.mark.parametrize(
    ("entry", "host", "port", "address", "covered"),
    [
        ("10.0.0.0/8", "x", 1, "10.9.9.9", True),
        ("10.0.0.0/8", "x", 1, "::ffff:10.9.9.9", True),
        ("10.0.0.0/8", "x", 1, "192.168.0.1", False),
        ("127.0.0.1:9000", "x", 9000, "127.0.0.1", True),
        ("127.0.0.1:9000", "x", 9001, "127.0.0.1", False),
        ("[::1]:9000", "x", 9000, "::1", True),
        ("db.corp:5432", "DB.corp.", 5432, "10.0.0.1", True),
        ("db.corp", "db.corp", 1, "10.0.0.1", True),
        ("db.corp", "evil.corp", 1, "10.0.0.1", False),
    ],
)
def test_allowances(entry: str, host: str, port: int, address: str, covered: bool) -> None:
    guard = EgressGuard(allowances=[InternalAllowance.parse(entry)])
    assert (guard.refusal_for_address(host, port, address) is None) is covered


@pytest.mark.parametrize("entry", ["", "x y", "[::1]x", "a:b:c", "*.corp", "1.2.3.4:0", "h:99999"])
def test_bad_allowances_are_config_errors(entry: str) -> None:
    with pytest.raises(ValueError):
        InternalAllowance.parse(entry)


# -- the connection itself: resolve once, check, connect to the checked address ---------------


@pytest.fixture
def listener() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Resolutions of `name.test`: first a public address, then 127.0.0.1 (rebinding)."""
    asked: list[str] = []
    real = socket.getaddrinfo

    def fake(host: str, port: int, *args: object, **kwargs: object) -> list:
        if host == "name.test":
            address = "203.0.113.9" if not asked else "127.0.0.1"
            asked.append(address)
            return real(address, port, *args, **kwargs)  # type: ignore[arg-type]
        return real(host, port, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return asked


def test_the_connection_goes_to_the_address_that_was_checked(
    monkeypatch: pytest.MonkeyPatch, listener: int, resolver: list[str]
) -> None:
    seen: list[str] = []

    def check(host: str, port: int, address: str) -> str | None:
        seen.append(address)
        return EgressGuard().refusal_for_address(host, port, address)

    monkeypatch.setattr(upstream_connect, "check", check)

    async def connect() -> None:
        await upstream_connect.open_connection("name.test", listener)

    resolver.append("(first lookup spent elsewhere)")  # the next answer is 127.0.0.1
    with pytest.raises(upstream_connect.EgressRefused, match="internal address"):
        asyncio.run(connect())
    assert seen == ["127.0.0.1"]
    assert resolver == ["(first lookup spent elsewhere)", "127.0.0.1"]  # one lookup, no other


def test_allowed_addresses_are_connected_without_a_second_lookup(
    monkeypatch: pytest.MonkeyPatch, listener: int
) -> None:
    lookups: list[str] = []
    real = socket.getaddrinfo

    def counting(host: str, *args: object, **kwargs: object) -> list:
        lookups.append(host)
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", counting)
    monkeypatch.setattr(
        upstream_connect, "check", EgressGuard(named=[("localhost", listener)]).refusal_for_address
    )

    async def connect() -> tuple[str, int]:
        _, writer = await upstream_connect.open_connection("localhost", listener)
        peer = writer.get_extra_info("peername")
        writer.close()
        return peer

    assert asyncio.run(connect())[1] == listener
    assert lookups.count("localhost") == 1


@pytest.mark.parametrize(
    ("host", "unusual"),
    [
        ("1572395042", True),
        ("0x5db8d822", True),
        ("93.184.55834", True),
        ("0135.0270.0330.042", True),
        ("93.184.216.34", False),
        ("[::1]", False),
        ("example.com", False),
    ],
)
def test_unusual_ipv4_spellings(host: str, unusual: bool) -> None:
    assert unusual_ipv4(host) is unusual
