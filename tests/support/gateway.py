"""A real `mitmdump -s addons/gateway.py` process on an ephemeral port, for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from sluicegate.recording.chain import Signer

REPO = Path(__file__).resolve().parents[2]
GATEWAY_SCRIPT = REPO / "addons" / "gateway.py"
MITMDUMP = Path(sys.executable).with_name("mitmdump")
_LISTENING = re.compile(r"proxy listening at (?:\*|[\d.]+|\[[^\]]*\]):(\d+)")


def recording_section(directory: Path, **settings: Any) -> dict[str, Any]:
    """A `recording:` config section writing to `directory`, with a fresh signing key beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    signing = directory.parent / f"{directory.name}-signing.pem"
    signing.write_bytes(Signer.generate().private_pem())
    return {"directory": str(directory), "signing_key": {"file": str(signing)}, **settings}


class GatewayFailed(Exception):
    pass


# Every process started, so the session can stop (and report) any a test forgot.
STARTED: list[subprocess.Popen[bytes]] = []


def left_running() -> list[str]:
    """Command lines of gateway processes still running; each is killed first."""
    running = [proc for proc in STARTED if proc.poll() is None]
    for proc in running:
        proc.kill()
        proc.wait(timeout=15)
    STARTED.clear()
    return [" ".join(map(str, proc.args)) for proc in running]  # type: ignore[arg-type]


class Gateway:
    """mitmdump with the sluicegate chain. `logs` holds everything it printed."""

    def __init__(
        self,
        config: dict[str, Any] | Path | None,
        workdir: Path,
        *,
        upstream_ca: Path | None = None,
        script: Path = GATEWAY_SCRIPT,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.confdir = workdir / "mitmproxy"
        self.config_file: Path | None
        if config is None:
            self.config_file = None
        elif isinstance(config, Path):
            self.config_file = config
        else:
            self.config_file = workdir / "sluicegate.yaml"
            self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.args = [
            str(MITMDUMP),
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            "0",
            "--set",
            f"confdir={self.confdir}",
            "-s",
            str(script),
        ]
        if self.config_file is not None:
            self.args += ["--set", f"sluicegate_config={self.config_file}"]
        if upstream_ca is not None:
            self.args += ["--set", f"ssl_verify_upstream_trusted_ca={upstream_ca}"]
        self.args += list(extra_args)
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            # Scripts outside addons/ (hot-reload tests, fault injection) import the package too.
            "PYTHONPATH": os.pathsep.join([str(REPO / "addons"), str(REPO)]),
            **(env or {}),
        }
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
            self.env.pop(name, None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self._lines: list[str] = []
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 90) -> Gateway:
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.workdir,
        )
        STARTED.append(self.proc)
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for line in self._lines:
                    m = _LISTENING.search(line)
                    if m:
                        self.port = int(m.group(1))
            if self.port is not None and self._running_logged():
                return self
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the pump read the last lines
                raise GatewayFailed(f"mitmdump exited with {self.proc.returncode}:\n{self.logs}")
            time.sleep(0.05)
        self.stop()
        raise GatewayFailed(f"mitmdump did not start in {timeout}s:\n{self.logs}")

    def _running_logged(self) -> bool:
        # The listening line is printed before the `running` hook; give it a beat so start-up
        # errors (which make mitmdump exit) are seen before tests run.
        time.sleep(0.15)
        return self.proc is not None and self.proc.poll() is None

    def run_to_exit(self, timeout: float = 120) -> int:
        """Run expecting mitmdump to exit by itself (bad config); returns its exit code."""
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env
        )
        threading.Thread(target=self._pump, daemon=True).start()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise GatewayFailed(f"mitmdump kept running:\n{self.logs}") from None
        time.sleep(0.2)
        return code

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._lock:
                self._lines.append(raw.decode("utf-8", "replace"))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=timeout)

    def __enter__(self) -> Gateway:
        # `with Gateway(...).start() as gw:` must not start a second, never-stopped process.
        if self.proc is not None and self.proc.poll() is None:
            return self
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests use ----------------------------------------------------------------------

    @property
    def logs(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def settled_logs(self, settle: float = 0.2, timeout: float = 5) -> str:
        """The log once it stopped growing: lines arrive asynchronously, so a check that
        something was (not) logged must wait for them."""
        deadline = time.monotonic() + timeout
        logs = self.logs
        while time.monotonic() < deadline:
            time.sleep(settle)
            if self.logs == logs:
                break
            logs = self.logs
        return logs

    @property
    def ca_file(self) -> Path:
        """The gateway's CA certificate, which agents trust."""
        return self.confdir / "mitmproxy-ca-cert.pem"

    def proxy_url(self, token: str | None = None, user: str = "agent") -> str:
        if token is None:
            return f"http://127.0.0.1:{self.port}"
        return f"http://{user}:{token}@127.0.0.1:{self.port}"

    def client(self, token: str | None = None, **kw: Any) -> httpx.Client:
        """An httpx client going through the gateway (token, if any, as the proxy password)."""
        kw.setdefault("timeout", 20)
        return httpx.Client(proxy=self.proxy_url(token), verify=self.ssl_context(), **kw)

    def ssl_context(self) -> ssl.SSLContext:
        """Client-side TLS trusting only the gateway's CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def agent_env(self, token: str | None = None) -> dict[str, str]:
        """The environment an agent process needs: proxy and CA trust for common stacks."""
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        proxy = self.proxy_url(token)
        ca = str(self.ca_file)
        env.update(
            HTTPS_PROXY=proxy,
            HTTP_PROXY=proxy,
            NO_PROXY="",
            SSL_CERT_FILE=ca,
            REQUESTS_CA_BUNDLE=ca,
            CURL_CA_BUNDLE=ca,
            NODE_EXTRA_CA_CERTS=ca,
        )
        return env
