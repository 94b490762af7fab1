"""CallerAuth: every flow belongs to a caller whose JWT the gateway verified, or it goes nowhere.

Where the token comes from (`auth.token_sources`):
- the proxy password: `Proxy-Authorization` (Basic, the JWT as password, as HTTPS_PROXY=
  http://agent:<jwt>@gateway sends it; or Bearer) on CONNECT, where it then covers every request
  inside the tunnel (HTTP/2 streams included), or on each plain-HTTP proxy request;
- the inner request's `Authorization: Bearer`, `x-api-key` or `api-key` header, for agents that
  use their token as the "API key" of an SDK;
- on the base-URL listener (`mitm/base_url.py`), only the inner headers of
  `base_url.token_sources`: there is no proxy to authenticate to, so a missing token is 401.

A tunnel's token is kept in memory (never in the flow) and verified again for every request in
the tunnel, so an expiring token or a key removed by a config reload takes effect at once (the
verifier remembers the signature check only; see `TokenVerifier`). A
tunnel's proxy token is authoritative: the inner token headers are then the SDK's placeholder
"API key" and only stripped.

All of these headers are stripped before anything else sees the request, refused or not, so the
token never reaches the upstream, the log or a recording (its fingerprint may); the token is also
registered in `flowstate.scrub` (`caller-token:<fingerprint>`) so an echo of it is masked too.
Refusals: 407 with `Proxy-Authenticate` for the proxy credential, 401 for inner tokens, the reason
code (`expired`, `bad_signature`, ...) as the error code, or `missing_token`. The upstream is never
contacted for a refused flow: ProxyHardening makes mitmproxy connect lazily.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Final

from mitmproxy import connection, http

from sluicegate import config as config_mod
from sluicegate.auth import extract
from sluicegate.auth.verifier import Reason, TokenRejected, TokenVerifier, token_fingerprint
from sluicegate.mitm import flowstate, guard
from sluicegate.mitm.base import GatewayAddon
from sluicegate.mitm.base_url import is_base_url_flow

logger = logging.getLogger("sluicegate.auth")

PROXY_SOURCE: Final = "proxy_authorization"
BASE_URL_SOURCE: Final = "base_url"
# auth.token_sources names -> the request header the engine reads for them
INNER_HEADERS: Final = {
    "authorization": "authorization",
    "x_api_key": "x-api-key",
    "api_key": "api-key",
}
# Stripped from every request whatever the configured sources: caller credentials never leave.
CALLER_CREDENTIAL_HEADERS: Final = ("proxy-authorization", *extract.INNER_TOKEN_HEADERS)
MISSING_TOKEN: Final = "missing_token"
# flowstate.scrub rule id prefix for the caller's token (the recorder writes `[caller-token:<fp>]`)
CALLER_TOKEN_SCRUB: Final = "caller-token"
MIN_SCRUB_CHARS: Final = 16
REALM: Final = "sluicegate"


class TunnelTokens:
    """The proxy token each CONNECT tunnel was opened with, by client connection.

    `None` marks a tunnel opened without one (its requests must carry an inner token). Keyed by
    `flow.client_conn`, which is the same object for every flow of a connection. Module-level, so
    tunnels survive a hot reload of the gateway script; entries go with `client_disconnected`
    (and with the connection object, being weak).
    """

    def __init__(self) -> None:
        self._tokens: weakref.WeakKeyDictionary[connection.Client, str | None] = (
            weakref.WeakKeyDictionary()
        )

    def open(self, client: connection.Client, token: str | None) -> None:
        self._tokens[client] = token

    def close(self, client: connection.Client) -> None:
        self._tokens.pop(client, None)

    def is_tunnel(self, client: connection.Client) -> bool:
        return client in self._tokens

    def token(self, client: connection.Client) -> str | None:
        return self._tokens.get(client)


TUNNELS: Final = TunnelTokens()


class CallerAuth(GatewayAddon):
    """Second in the chain: verify the caller's token, attach the caller, strip the token."""

    def __init__(self) -> None:
        self._verifier: TokenVerifier | None = None
        self._proxy_source = False
        self._inner_sources: tuple[str, ...] = ()
        self._base_url_sources: tuple[str, ...] = ()
        self._prefetch: asyncio.Task[None] | None = None

    def apply(self, config: config_mod.Config) -> None:
        self._verifier = config_mod.build_verifier(config.auth)
        sources = config.auth.token_sources
        self._proxy_source = PROXY_SOURCE in sources
        self._inner_sources = tuple(INNER_HEADERS[s] for s in sources if s in INNER_HEADERS)
        base_url = config.base_url
        base_sources = base_url.token_sources if base_url is not None else ()
        self._base_url_sources = tuple(INNER_HEADERS[s] for s in base_sources)

    def running(self) -> None:
        # Load remote key sets before the first caller waits for them (failures are logged).
        # Sync hook: mitmproxy calls `running` synchronously when it reloads a script.
        if self._verifier is not None:
            self._prefetch = asyncio.get_running_loop().create_task(self._verifier.arefresh())

    def client_disconnected(self, client: connection.Client) -> None:
        TUNNELS.close(client)

    @guard.fail_closed("gateway_error")
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        value = flow.request.headers.get("proxy-authorization")
        # The CONNECT flow itself can be logged or recorded (a refused CONNECT is).
        flow.request.headers.pop("proxy-authorization", None)
        TUNNELS.close(flow.client_conn)  # an earlier CONNECT on this connection counts no more
        if self._proxy_source and value is not None:
            token = self._proxy_token(flow, value)
            await self._authenticate(flow, PROXY_SOURCE, token)
            TUNNELS.open(flow.client_conn, token)
            # Once per tunnel, not per request: in mitmdump every log record, even one below
            # the console's level, is formatted and dispatched to all addons (~100 µs).
            caller = flowstate.state(flow).caller
            logger.debug(
                "sluicegate: tunnel opened by caller %s (token %s) [request %s]",
                caller.subject if caller else "-",
                caller.fingerprint if caller else "-",
                flow.id,
            )
        elif self._inner_sources:
            TUNNELS.open(flow.client_conn, None)  # the requests inside must carry a token
        else:
            raise self._refusal(flow, MISSING_TOKEN, PROXY_SOURCE, None)

    @guard.fail_closed("gateway_error")
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        headers = flow.request.headers
        # One pass over the fields instead of a lookup per name (each one scans them all).
        names = {name.lower() for name, _ in headers.fields}
        present = [name for name in CALLER_CREDENTIAL_HEADERS if name.encode() in names]
        found = {name: headers[name] for name in present}
        for name in present:
            del headers[name]
        if is_base_url_flow(flow):
            candidate = self._inner_candidate(flow, found, self._base_url_sources)
            if candidate is None:
                raise self._refusal(flow, MISSING_TOKEN, BASE_URL_SOURCE, None)
            await self._authenticate(flow, *candidate)
            return
        candidate = self._candidate(flow, found)
        if candidate is None:
            # Outside a tunnel the agent talks to us as its proxy: ask for the proxy password.
            ask_proxy = self._proxy_source and not TUNNELS.is_tunnel(flow.client_conn)
            raise self._refusal(flow, MISSING_TOKEN, PROXY_SOURCE if ask_proxy else None, None)
        await self._authenticate(flow, *candidate)

    def _candidate(self, flow: http.HTTPFlow, found: dict[str, str]) -> tuple[str, str] | None:
        """(source, token) of a request: its tunnel's, its own proxy token, or an inner one."""
        tunnel_token = TUNNELS.token(flow.client_conn)
        if tunnel_token is not None:
            return PROXY_SOURCE, tunnel_token
        proxy_value = found.get("proxy-authorization")
        if self._proxy_source and proxy_value is not None:
            return PROXY_SOURCE, self._proxy_token(flow, proxy_value)
        return self._inner_candidate(flow, found, self._inner_sources)

    def _inner_candidate(
        self, flow: http.HTTPFlow, found: dict[str, str], sources: tuple[str, ...]
    ) -> tuple[str, str] | None:
        try:
            return extract.token_from_inner_headers(found, sources)
        except TokenRejected as rejected:
            raise self._refusal(flow, rejected.reason, "inner", None) from None

    def _proxy_token(self, flow: http.HTTPFlow, value: str) -> str:
        """The token in a Proxy-Authorization value; a value that carries none is `malformed`."""
        try:
            token = extract.token_from_proxy_authorization(value)
        except TokenRejected as rejected:
            raise self._refusal(flow, rejected.reason, PROXY_SOURCE, None) from None
        if token is None:
            raise self._refusal(flow, Reason.MALFORMED, PROXY_SOURCE, None)
        return token

    async def _authenticate(self, flow: http.HTTPFlow, source: str, token: str) -> None:
        """Verify `token` and attach its caller to the flow, or refuse the flow."""
        verifier = self._verifier
        if verifier is None:  # the guard refuses flows while unconfigured; never forward
            raise RuntimeError("CallerAuth is not configured")
        fingerprint = token_fingerprint(token)
        # Wherever the token turns up again (an echo, a body), recordings and responses mask it;
        # a rejected token may still be a real credential (e.g. for another audience). Short
        # values ("x", "placeholder") are no credential, and masking them would mangle records.
        if len(token) >= MIN_SCRUB_CHARS:
            flowstate.state(flow).scrub.append(
                flowstate.ScrubLiteral(f"{CALLER_TOKEN_SCRUB}:{fingerprint}", token)
            )
        try:
            identity = await verifier.averify(token)
        except TokenRejected as rejected:
            raise self._refusal(flow, rejected.reason, source, fingerprint) from None
        caller = flowstate.Caller(
            subject=identity.subject,
            groups=identity.groups,
            issuer=identity.issuer,
            token_id=identity.token_id,
            fingerprint=identity.fingerprint,
        )
        flowstate.state(flow).caller = caller
        flowstate.record(flow, "caller", caller.as_metadata())

    def _refusal(
        self, flow: http.HTTPFlow, reason: str, source: str | None, fingerprint: str | None
    ) -> guard.GatewayRefusal:
        logger.info(
            "sluicegate: caller token rejected: %s (source %s, token %s) [request %s]",
            reason,
            source or "none",
            fingerprint or "none",
            flow.id,
        )
        if reason == MISSING_TOKEN and source == BASE_URL_SOURCE:
            message = (
                "A caller token is required: give it to the SDK as its API key "
                "(OPENAI_API_KEY=<token>, sent as Authorization: Bearer <token>)."
            )
        elif reason == MISSING_TOKEN:
            message = (
                "A caller token is required: use it as the proxy password "
                "(HTTPS_PROXY=http://agent:<token>@<gateway>) or as the API key."
            )
        else:
            message = f"The caller token was rejected ({reason})."
        if source == PROXY_SOURCE:
            return guard.GatewayRefusal(
                407, reason, message, {"proxy-authenticate": f'Basic realm="{REALM}"'}
            )
        challenge = f'Bearer realm="{REALM}"'
        if reason != MISSING_TOKEN:
            challenge += ', error="invalid_token"'
        return guard.GatewayRefusal(401, reason, message, {"www-authenticate": challenge})
