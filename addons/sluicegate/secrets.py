"""Secret references: where a secret comes from (an environment variable or a file), read when
needed so that keys rotate without a restart. Plain and config-free, so engines can hold them."""

from __future__ import annotations

import dataclasses
import os
import threading
from pathlib import Path


class SecretUnavailable(Exception):
    """A secret reference could not be read at the time it was needed.

    The message names the reference (env var or file), never a value.
    """


_file_cache: dict[Path, tuple[tuple[int, int, int], str]] = {}
_file_cache_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class SecretRef:
    """Where a secret comes from: an environment variable or a file (e.g. a mounted secret).

    Secrets are never inlined in the config. File secrets are re-read when the file changes, so
    keys rotate without a restart. Surrounding whitespace (the trailing newline of a mounted secret)
    is stripped.
    """

    env: str | None = None
    file: Path | None = None

    def describe(self) -> str:
        return f"env:{self.env}" if self.env else f"file:{self.file}"

    def read(self) -> str:
        if self.env:
            value = os.environ.get(self.env, "").strip()
            if not value:
                raise SecretUnavailable(f"environment variable {self.env} is not set or empty")
            return value
        assert self.file is not None
        try:
            st = os.stat(self.file)
        except OSError as e:
            raise SecretUnavailable(
                f"secret file {self.file} cannot be read ({e.strerror})"
            ) from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        with _file_cache_lock:
            cached = _file_cache.get(self.file)
            if cached and cached[0] == stamp:
                return cached[1]
        try:
            value = Path(self.file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not UTF-8"
            raise SecretUnavailable(f"secret file {self.file} cannot be read ({reason})") from None
        if not value:
            raise SecretUnavailable(f"secret file {self.file} is empty")
        with _file_cache_lock:
            _file_cache[self.file] = (stamp, value)
        return value
