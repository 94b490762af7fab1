"""CredentialInjection: put the hidden credential on the request as it leaves, and only then.

Last request-phase addon of the chain, so no other addon (policy, redaction, their logs) ever sees
the secret on the request. The secret is read on every request (`SecretRef.read()`: a rotated file
secret takes effect without a restart) and registered in `flowstate.scrub`, every encoded
variant, so response redaction and the recorder mask it if the upstream echoes it.

Once the request has left (response headers arrived, or the flow failed) the secret in the header
is replaced by the marker `[credential:<route>]` (`Bearer [credential:openai]`), so mitmweb, logs
and recordings never hold it; the secret is also scrubbed from response headers before the agent
sees them. The concealing hooks run even on flows another addon refused (`skip_refused=False`): a
refusal in the response phase must not leave the secret on the recorded request.
"""

from __future__ import annotations

from typing import Final

from mitmproxy import http

from sluicegate.config.schema import SecretUnavailable
from sluicegate.mitm import flowstate, guard
from sluicegate.mitm.base import GatewayAddon
from sluicegate.mitm.routing import Destination, chosen_route, path_still_judged, serves
from sluicegate.redaction.echo import secret_variants

MAX_REMEMBERED_SECRETS: Final = 64


def scrub_rule_id(route: str) -> str:
    return f"injected-credential:{route}"


def credential_marker(route: str) -> str:
    return f"[credential:{route}]"


class CredentialInjection(GatewayAddon):
    """Eighth in the chain: inject last, conceal as soon as the request is gone."""

    def __init__(self) -> None:
        # (route, secret) -> its scrub literals: the same for every request until the secret
        # rotates. Holds only values already in memory (the secret is read on every request).
        self._literals: dict[tuple[str, str], tuple[flowstate.ScrubLiteral, ...]] = {}

    def _scrub_literals(self, route: str, secret: str) -> tuple[flowstate.ScrubLiteral, ...]:
        key = (route, secret)
        literals = self._literals.get(key)
        if literals is None:
            rule_id = scrub_rule_id(route)
            literals = tuple(flowstate.ScrubLiteral(rule_id, v) for v in secret_variants(secret))
            if len(self._literals) >= MAX_REMEMBERED_SECRETS:
                self._literals.clear()  # rotated secrets: keep only what is in use
            self._literals[key] = literals
        return literals

    @guard.fail_closed("gateway_error")
    def request(self, flow: http.HTTPFlow) -> None:
        # Routing and policy judged the canonical path; nothing may leave on another one.
        if not path_still_judged(flow):
            raise guard.GatewayRefusal(
                500,
                "path_changed",
                "The request's path changed after routing and policy; it was not forwarded.",
            )
        route = chosen_route(flow)
        if route is None or route.credential is None:
            return
        # Routing matched the destination; if anything changed it since, the secret stays here.
        if not serves(route, Destination.of(flow)):
            raise guard.GatewayRefusal(
                500,
                "destination_changed",
                "The request's destination changed after routing; it was not forwarded.",
            )
        try:
            secret = route.credential.read()
        except SecretUnavailable:
            raise guard.GatewayRefusal(
                503,
                "credential_unavailable",
                f"The credential for route {route.name!r} is unavailable; nothing was forwarded.",
            ) from None
        if not secret.isprintable():  # a line break would let the secret split the header
            raise guard.GatewayRefusal(
                500,
                "credential_invalid",
                f"The credential for route {route.name!r} is not a valid header value.",
            )
        literals = self._scrub_literals(route.name, secret)
        if not literals:  # too short to be masked reliably wherever it is echoed
            raise guard.GatewayRefusal(
                500,
                "credential_invalid",
                f"The credential for route {route.name!r} is too short to be protected.",
            )
        st = flowstate.state(flow)
        st.scrub.extend(literals)
        template = route.inject.template
        concealed = template.replace("{secret}", credential_marker(route.name))
        st.injected = flowstate.Injected(route.inject.header, concealed)
        flow.request.headers[route.inject.header] = template.replace("{secret}", secret)

    @guard.fail_closed("gateway_error", skip_refused=False)
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        conceal(flow)
        if flow.response is not None:
            scrub_headers(flow.response.headers, flowstate.state(flow).scrub)

    @guard.fail_closed("gateway_error", skip_refused=False)
    def response(self, flow: http.HTTPFlow) -> None:
        conceal(flow)  # already done unless responseheaders failed

    @guard.fail_closed("gateway_error", skip_refused=False)
    def error(self, flow: http.HTTPFlow) -> None:
        conceal(flow)


def conceal(flow: http.HTTPFlow) -> None:
    """Put the marker in place of the injected secret (idempotent)."""
    st = flowstate.peek(flow)
    injected = st.injected if st is not None else None
    if injected is not None:
        flow.request.headers[injected.header] = injected.concealed


def scrub_headers(headers: http.Headers, literals: list[flowstate.ScrubLiteral]) -> None:
    """Replace every literal in header values by `[REDACTED:<rule id>]` (longest first)."""
    if not literals:
        return
    ordered = sorted(literals, key=lambda lit: len(lit.value), reverse=True)
    fields = []
    changed = False
    for name, value in headers.fields:
        text = value.decode("utf-8", "surrogateescape")
        for literal in ordered:
            if literal.value in text:
                text = text.replace(literal.value, f"[REDACTED:{literal.rule_id}]")
                changed = True
        fields.append((name, text.encode("utf-8", "surrogateescape")))
    if changed:
        headers.fields = tuple(fields)
