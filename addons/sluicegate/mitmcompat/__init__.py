"""Every patch of mitmproxy internals, in one place, each behind a version guard.

mitmproxy offers no hook where some of the gateway's guarantees must be enforced (scrubbing raw
bytes it quotes in protocol errors, capping HTTP/1 heads while it reads them, closing a
WebSocket). Those patches live here and nowhere else. Each one:

- names the internals it touches in its docstring, and has a contract test per internal in
  tests/unit/test_mitmcompat.py that fails when a mitmproxy release changes them;
- installs only on a mitmproxy version listed in `SUPPORTED` (`require`), so an untested
  release refuses to start instead of running with a guard silently gone.
"""

from __future__ import annotations

from mitmproxy import version

# mitmproxy release lines the patches are written and contract-tested for.
SUPPORTED: tuple[str, ...] = ("11.0.", "12.")


class UnsupportedMitmproxy(RuntimeError):
    """The running mitmproxy is not one the patches were tested on."""


def supported(release: str = version.VERSION) -> bool:
    return release.startswith(SUPPORTED)


def require(patch: str, release: str = version.VERSION) -> None:
    """Refuse to install `patch` on an untested mitmproxy (fail closed at start-up)."""
    if not supported(release):
        raise UnsupportedMitmproxy(
            f"{patch}: mitmproxy {release} is not a supported release "
            f"({', '.join(s + 'x' for s in SUPPORTED)}); the gateway will not run on it"
        )
