"""What mitmproxy's own error messages become (mitmcompat/error_answers.classify)."""

from __future__ import annotations

import json

import pytest

from sluicegate.mitmcompat.error_answers import classify, json_response


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        (
            502,
            "Error connecting to 127.0.0.1:1: [Errno 111] Connect call failed",
            (502, "upstream_unreachable"),
        ),
        (
            502,
            "Certificate verify failed: unable to get local issuer certificate",
            (502, "upstream_tls_failed"),
        ),
        (502, "Server TLS handshake failed. x", (502, "upstream_tls_failed")),
        (502, "Error connecting to x: timed out", (504, "upstream_timeout")),
        (502, "Server disconnected.", (502, "upstream_closed")),
        (
            502,
            "peer closed connection without sending complete message body",
            (502, "upstream_closed"),
        ),
        (
            502,
            "Cannot parse HTTP response: Invalid header line: <raw bytes withheld>",
            (502, "upstream_protocol_error"),
        ),
        (
            502,
            "sluicegate: egress refused: x.test:80 resolves to an internal address (loopback)",
            (403, "egress_internal"),
        ),
        (400, "Invalid HTTP request line", (400, "bad_request")),
        (
            400,
            "mitmproxy received an HTTP CONNECT request even though it is not running in "
            "regular/upstream mode. This usually indicates a misconfiguration, please see the "
            "mitmproxy mode documentation for details.",
            (405, "base_url_proxy_request"),
        ),
        (413, "Request body exceeds mitmproxy.options.body_size_limit.", (413, "body_too_large")),
    ],
)
def test_messages_map_to_stable_codes(status: int, message: str, expected: tuple) -> None:
    got_status, code, text = classify(status, message)
    assert (got_status, code) == expected
    assert message not in text  # never quoted to the agent


def test_the_answer_is_the_documented_shape() -> None:
    response = json_response(502, "upstream_unreachable", "m", "rid-1")
    assert response.headers["x-sluicegate-request-id"] == "rid-1"
    assert response.headers["content-type"] == "application/json"
    assert json.loads(response.content) == {
        "error": {
            "code": "upstream_unreachable",
            "message": "m",
            "type": "sluicegate_error",
            "request_id": "rid-1",
        }
    }
