"""A real `redis-server` on a free loopback port with its own directory, for tests.

Installed by the test setup (`scripts/dev.sh test`) and by `.ci/run`; a missing binary fails the
tests that need it (they never skip). `stop()` / `start()` again on the same port is how tests
take Redis away and bring it back.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.gateway import STARTED
from tests.support.pki import ServerCert


class RedisFailed(Exception):
    pass


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisFailed(
            "redis-server is not installed: `scripts/dev.sh test` installs it "
            "(apt-get install -y redis-server)"
        )
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """redis-server bound to 127.0.0.1. With `tls`, it serves TLS only (client certificates
    optional unless `require_client_cert`)."""

    def __init__(
        self,
        directory: Path,
        *,
        password: str | None = None,
        tls: ServerCert | None = None,
        ca_file: Path | None = None,
        require_client_cert: bool = False,
        appendonly: bool = True,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.tls = tls
        self.ca_file = ca_file
        self.require_client_cert = require_client_cert
        self.appendonly = appendonly
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_file = directory / "redis.log"

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def args(self) -> list[str]:
        args = [
            redis_server_binary(),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.log_file),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]
        if self.tls is not None:
            assert self.ca_file is not None
            args += [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(self.tls.cert_file),
                "--tls-key-file",
                str(self.tls.key_file),
                "--tls-ca-cert-file",
                str(self.ca_file),
                "--tls-auth-clients",
                "yes" if self.require_client_cert else "optional",
            ]
        else:
            args += ["--port", str(self.port)]
        if self.password is not None:
            args += ["--requirepass", self.password]
        return args

    def start(self, timeout: float = 15) -> RedisServer:
        self.proc = subprocess.Popen(
            self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        STARTED.append(self.proc)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RedisFailed(f"redis-server exited with {self.proc.returncode}: {self.log}")
            if "Ready to accept connections" in self.log:
                return self
            time.sleep(0.02)
        self.stop()
        raise RedisFailed(f"redis-server did not start in {timeout}s: {self.log}")

    @property
    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """Gone at once, as a crashed or unreachable Redis is."""
        self.stop(signal.SIGKILL)

    def restart(self) -> RedisServer:
        self.stop()
        # The log is appended to: only the new process's readiness counts.
        self.log_file.unlink(missing_ok=True)
        return self.start()

    def __enter__(self) -> RedisServer:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
