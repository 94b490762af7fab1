"""Unit-test helpers for gateway addons: a config file, a configured addon, test flows."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from mitmproxy import connection, http
from mitmproxy.test import taddons, tflow, tutils

from sluicegate.mitm.base import GatewayAddon
from tests.support.gateway import REPO
from tests.support.tokens import TestIdP

T = TypeVar("T")


def write_config(directory: Path, idp: TestIdP, **sections: Any) -> Path:
    """A config file trusting `idp`; keyword arguments replace or add top-level sections."""
    config: dict[str, Any] = {
        "version": 1,
        "auth": idp.auth_config(),
        "redaction": {"rules": [str(REPO / "rules")]},
        **sections,
    }
    # A new file per call: the shared config cache keys on path and mtime.
    path = directory / f"sluicegate-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextlib.contextmanager
def configured(*addons: GatewayAddon, config: Path) -> Iterator[taddons.context]:
    """`addons` loaded into a test master with `sluicegate_config=config`.

    They are unregistered from the guard's live set afterwards, as mitmproxy's `done` would:
    other tests check the chain sentinel with no live addon.
    """
    with taddons.context(*addons) as tctx:
        try:
            for addon in addons:
                tctx.configure(addon, sluicegate_config=str(config))
            yield tctx
        finally:
            for addon in addons:
                addon.done()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def client(sni: str | None = None) -> connection.Client:
    conn = tflow.tclient_conn()
    conn.sni = sni
    return conn


def flow_to(
    host: str,
    port: int,
    *,
    scheme: str = "https",
    path: str = "/v1/chat/completions",
    method: str = "POST",
    headers: dict[str, str] | None = None,
    client_conn: connection.Client | None = None,
    sni: str | None = None,
) -> http.HTTPFlow:
    """A request to `host:port` as mitmproxy sees it inside a tunnel (server = destination)."""
    server = tflow.tserver_conn()
    server.address = (host, port)
    server.sni = sni
    request = tutils.treq(
        host=host,
        port=port,
        scheme=scheme.encode(),
        method=method.encode(),
        path=path.encode(),
        headers=http.Headers([(k.encode(), v.encode()) for k, v in (headers or {}).items()]),
        content=b"",
    )
    return tflow.tflow(client_conn=client_conn or client(), server_conn=server, req=request)


def connect_flow(
    host: str,
    port: int,
    *,
    headers: dict[str, str] | None = None,
    client_conn: connection.Client | None = None,
) -> http.HTTPFlow:
    """A CONNECT request for `host:port`."""
    request = tutils.treq(
        host=host,
        port=port,
        method=b"CONNECT",
        scheme=b"",
        authority=f"{host}:{port}".encode(),
        path=b"",
        headers=http.Headers([(k.encode(), v.encode()) for k, v in (headers or {}).items()]),
        content=b"",
    )
    server = tflow.tserver_conn()
    server.address = None
    server.sni = None
    return tflow.tflow(client_conn=client_conn or client(), server_conn=server, req=request)
