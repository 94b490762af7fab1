"""A mitmdump script for recorder tests: plays the flowstate contracts of addons not on main yet.

Loaded after addons/gateway.py (`-s tests/support/recording_contracts.py`), so its hooks run after
the recorder's for the same event. It stands in for:

- auth + injection: the caller from the token (proxy password or `Authorization: Bearer`; claims
  read WITHOUT verification: this is a test stand-in), the route, the token and every variant of
  the injected credential as scrub literals; the token is stripped and the real upstream key is
  injected. It deliberately does NOT restore the `[credential:<route>]` marker, so recordings
  prove the recorder masks it by itself. Proxy user `refuse` gets a 407 on CONNECT.
- redaction: `hunter2` in a request body is replaced after handing the original to
  `flowstate.keep_original`.
- streaming: text/event-stream responses are streamed, and the bytes sent to the client are kept
  in `flowstate.state(flow).streamed_body` (mitmproxy keeps no body for streamed responses).

Each part stands down when a real addon already did its job for the flow.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import urllib.parse
from typing import Any

import jwt
from mitmproxy import http

from sluicegate.mitm import flowstate, guard

KEY = os.environ.get("SLUICEGATE_TEST_UPSTREAM_KEY", "")
_tokens: dict[str, str] = {}


def _proxy_credentials(flow: http.HTTPFlow) -> tuple[str, str] | None:
    auth = flow.request.headers.get("proxy-authorization", "")
    if not auth.lower().startswith("basic "):
        return None
    try:
        user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return user, password


def _variants(secret: str) -> list[str]:
    return [
        secret,
        json.dumps(secret)[1:-1],
        urllib.parse.quote(secret, safe=""),
        base64.b64encode(secret.encode()).decode(),
    ]


class ContractStandIn:
    def http_connect(self, flow: http.HTTPFlow) -> None:
        creds = _proxy_credentials(flow)
        if creds and creds[0] == "refuse":
            guard.answer(flow, 407, "missing_token", "Authenticate with a token.")
            return
        if creds:
            _tokens[flow.client_conn.id] = creds[1]

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        st = flowstate.state(flow)
        if st.caller is not None or flow.response is not None:
            return
        token = _tokens.get(flow.client_conn.id)
        creds = _proxy_credentials(flow)
        if creds:
            token = creds[1]
        bearer = flow.request.headers.get("authorization", "")
        if bearer.lower().startswith("bearer "):
            token = bearer[7:]
            del flow.request.headers["authorization"]
        flow.request.headers.pop("proxy-authorization", None)
        if not token:
            return
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
        fingerprint = hashlib.sha256(token.encode()).hexdigest()[:12]
        st.caller = flowstate.Caller(
            subject=claims["sub"],
            groups=tuple(claims.get("groups", ())),
            issuer=claims.get("iss", ""),
            token_id=claims.get("jti"),
            fingerprint=fingerprint,
        )
        st.route = "openai" if flow.request.scheme == "https" else "internal"
        st.scrub.append(flowstate.ScrubLiteral(f"caller-token:{fingerprint}", token))
        if st.route == "openai" and KEY:
            st.scrub += [
                flowstate.ScrubLiteral("injected-credential:openai", v) for v in _variants(KEY)
            ]
        flowstate.record(flow, "caller", st.caller.as_metadata())
        flowstate.record(flow, "route", st.route)

    def request(self, flow: http.HTTPFlow) -> None:
        st = flowstate.state(flow)
        if flow.response is not None or st.caller is None:
            return
        body = flow.request.raw_content or b""
        if b"hunter2" in body:
            flowstate.keep_original(flow, "request", body)
            flow.request.content = body.replace(b"hunter2", b"[REDACTED:password]")
            flowstate.record(flow, "redaction", {"request": {"password": body.count(b"hunter2")}})
        if st.route == "openai" and KEY:
            flow.request.headers["authorization"] = f"Bearer {KEY}"

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        st = flowstate.state(flow)
        if response is None or response.stream or st.streamed_body is not None:
            return
        if "text/event-stream" not in response.headers.get("content-type", ""):
            return
        received = st.streamed_body = bytearray()

        def stream(chunk: bytes) -> bytes:
            received.extend(chunk)
            return chunk

        response.stream = stream


addons = [ContractStandIn()]
