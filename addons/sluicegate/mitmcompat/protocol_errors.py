"""mitmproxy's protocol errors quote raw bytes: keep them out of every output.

When an upstream sends a malformed or cut-off response head, or bytes after a complete response,
mitmproxy's HTTP/1 layer describes the problem with the bytes themselves (`unexpected server
response: b'HTTP/1.1 200 OK\\r\\nx-debug: <the injected key>...'`, `Cannot parse HTTP response:
Invalid header line: b'...'`, `Unexpected data from server: b'...'`). That text becomes the error
page sent to the agent, the flow's error (printed by mitmdump and recorded) and log lines, all
outside any redaction: an upstream echoing the injected credential in a broken header would hand
it to the agent. Client-side errors quote the client's bytes the same way, token included.

mitmproxy offers no hook between the parser and those outputs, so this addon replaces every bytes
literal in protocol error messages (`RequestProtocolError` / `ResponseProtocolError`, the source
of the error page and `flow.error`) and in mitmproxy's connection log lines by `<raw bytes
withheld>`. ProxyHardening installs it when the chain loads, once per process; it stays installed
when the script is unloaded (like the chain sentinel): never less careful after a failed reload.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import Any, Final

from mitmproxy.proxy.layers.http import _events

from sluicegate import mitmcompat

WITHHELD: Final = "<raw bytes withheld>"
# A Python bytes literal as `repr(bytes)` writes it, either quote style. No word boundary is
# required before the `b`: withholding a harmless `verb'x'` costs less than missing a literal.
_BYTES_LITERAL: Final = re.compile(r"""b'(?:[^'\\]|\\.)*'|b"(?:[^"\\]|\\.)*\"""")
# Where mitmproxy's connection handlers log (`ConnectionHandler.log`).
CONNECTION_LOGGER: Final = "mitmproxy.proxy.server"
_MARK: Final = "_sluicegate_scrubbed"


def scrub(message: str) -> str:
    """`message` with every bytes literal replaced by WITHHELD.

    An unterminated literal (a message cut short by someone) is withheld to the end of the text.
    """
    text = _BYTES_LITERAL.sub(WITHHELD, message)
    cut = re.search(r"""b['"]""", text)
    return text if cut is None else text[: cut.start()] + WITHHELD


class _LogScrub(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = scrub(message)
        if record.exc_info or record.exc_text:
            # "mitmproxy has crashed!" comes with a traceback whose last line quotes the event
            # that broke the layer, data and all: folded into the message, scrubbed.
            trace = record.exc_text or _FORMATTER.formatException(record.exc_info)  # type: ignore[arg-type]
            scrubbed = f"{scrubbed}\n{scrub(trace)}"
            record.exc_info, record.exc_text = None, None
        if scrubbed != message:
            record.msg, record.args = scrubbed, ()
        return True


_FORMATTER: Final = logging.Formatter()


def _scrubbing_init(init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def wrapper(self: Any, stream_id: int, message: str, *args: Any, **kwargs: Any) -> None:
        init(self, stream_id, scrub(message), *args, **kwargs)

    setattr(wrapper, _MARK, True)
    return wrapper


def install() -> None:
    """Scrub protocol error messages and connection log lines from now on (idempotent)."""
    mitmcompat.require("protocol_errors")
    for cls in (_events.RequestProtocolError, _events.ResponseProtocolError):
        if not getattr(cls.__init__, _MARK, False):
            cls.__init__ = _scrubbing_init(cls.__init__)  # type: ignore[method-assign]
    logger = logging.getLogger(CONNECTION_LOGGER)
    if not any(isinstance(f, _LogScrub) for f in logger.filters):
        logger.addFilter(_LogScrub())
