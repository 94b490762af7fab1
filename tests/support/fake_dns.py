"""A mitmdump script for tests: names under `.test` resolve as the test says, lookup by lookup.

Loaded after addons/gateway.py (`-s tests/support/fake_dns.py`). `SLUICEGATE_TEST_DNS` holds JSON
`{"name.test": ["addr", ...]}`: the first lookup of a name answers the first address, the next
lookup the next one, the last one repeats (a DNS answer that changes between lookups, as DNS
rebinding does). Every other name goes to the real resolver. Each answer is logged as
`fake-dns: NAME -> ADDR`, so a test can count lookups.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from typing import Any

logger = logging.getLogger("fake_dns")
_ANSWERS: dict[str, list[str]] = json.loads(os.environ.get("SLUICEGATE_TEST_DNS", "{}"))
_asked: dict[str, int] = {}
_lock = threading.Lock()
_real_getaddrinfo = getattr(socket.getaddrinfo, "_fake_dns_real", socket.getaddrinfo)


def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
    name = host.decode() if isinstance(host, bytes) else host
    answers = _ANSWERS.get(str(name).lower().rstrip(".")) if name else None
    if not answers:
        return _real_getaddrinfo(host, port, *args, **kwargs)
    with _lock:
        n = _asked.get(name, 0)
        _asked[name] = n + 1
    address = answers[min(n, len(answers) - 1)]
    logger.warning("fake-dns: %s -> %s", name, address)
    return _real_getaddrinfo(address, port, *args, **kwargs)


getaddrinfo._fake_dns_real = _real_getaddrinfo  # type: ignore[attr-defined]
socket.getaddrinfo = getaddrinfo
