"""Raw bytes quoted by mitmproxy's protocol errors never reach an error page, a log or a flow."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.proxy.layers.http import _events

from sluicegate.mitmcompat import protocol_errors
from sluicegate.mitmcompat.protocol_errors import WITHHELD, scrub

SECRET = b"ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"


@pytest.mark.parametrize(
    "message",
    [
        f"unexpected server response: {b'HTTP/1.1 200 OK' + chr(13).encode() + SECRET!r}",
        f"Cannot parse HTTP response: Invalid header line: {b'x-key ' + SECRET!r}",
        f"Unexpected data from server: {SECRET + b' it' + bytes([39]) + b's'!r}",  # b"..." form
        f"cut short: {SECRET!r}"[:-5],
    ],
)
def test_bytes_literals_are_withheld(message: str) -> None:
    scrubbed = scrub(message)
    assert "ghp_" not in scrubbed and WITHHELD in scrubbed
    assert scrubbed.split(":")[0] == message.split(":")[0]  # what went wrong stays readable


def test_messages_without_bytes_stay_as_they_are() -> None:
    for message in ("server closed connection", "HTTP/1 protocol error: bad chunk"):
        assert scrub(message) == message


@given(st.binary(max_size=200), st.text(max_size=40))
def test_no_quoted_bytes_survive(data: bytes, prefix: str) -> None:
    scrubbed = scrub(f"{prefix}{data!r}")
    assert repr(data) not in scrubbed or data == b""


def test_installed_protocol_errors_and_log_lines_are_scrubbed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    protocol_errors.install()
    protocol_errors.install()  # idempotent
    # mitmproxy 12 requires an ErrorCode, mitmproxy 11 has an HTTP status default.
    codes = getattr(_events, "ErrorCode", None)
    extra = (codes.GENERIC_SERVER_ERROR,) if codes else ()
    error = _events.ResponseProtocolError(1, f"unexpected server response: {SECRET!r}", *extra)
    assert "ghp_" not in error.message and WITHHELD in error.message
    extra = (codes.GENERIC_CLIENT_ERROR,) if codes else ()
    request_error = _events.RequestProtocolError(1, f"bad: {SECRET!r}", *extra)
    assert "ghp_" not in request_error.message
    with caplog.at_level(logging.INFO):
        logging.getLogger(protocol_errors.CONNECTION_LOGGER).info(
            "Unexpected data from server: %r", SECRET
        )
    assert "ghp_" not in caplog.text and WITHHELD in caplog.text


def test_crash_tracebacks_are_scrubbed_too(caplog: pytest.LogCaptureFixture) -> None:
    """ "mitmproxy has crashed!" is logged with exc_info whose last line quotes the event."""
    protocol_errors.install()
    try:
        raise AssertionError(f"Unexpected event: ResponseData(data=bytearray({SECRET!r}))")
    except AssertionError:
        with caplog.at_level(logging.INFO):
            logging.getLogger(protocol_errors.CONNECTION_LOGGER).error(
                "mitmproxy has crashed!", exc_info=True
            )
    assert "ghp_" not in caplog.text
    assert "mitmproxy has crashed!" in caplog.text and "AssertionError" in caplog.text
