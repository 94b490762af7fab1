"""One gateway per recording directory (a lock), and `sessions verify` telling a session a running
gateway is still writing from one whose gateway is gone."""

from __future__ import annotations

import copy
import signal
from pathlib import Path

from tests.e2e.test_recording import sessions_cli
from tests.support.gateway import Gateway, recording_section
from tests.support.pki import TestCA
from tests.support.upstream import FakeUpstream

ENV = "SLUICEGATE_TEST_UPSTREAM_KEY"


def test_a_second_gateway_on_one_recording_directory_refuses_to_start(
    tmp_path: Path, base_config: dict, pki: TestCA, upstream: FakeUpstream, token: str
) -> None:
    cfg = copy.deepcopy(base_config)
    cfg["recording"] = recording_section(tmp_path / "recordings")
    env = {ENV: "sk-test-key"}
    first = Gateway(cfg, tmp_path / "a", upstream_ca=pki.cert_file, env=env).start()
    try:
        with first.client(token) as client:
            assert client.get(upstream.url("/echo")).status_code == 200
        second = Gateway(cfg, tmp_path / "b", upstream_ca=pki.cert_file, env=env)
        assert second.run_to_exit() != 0
        assert "is being recorded to by another gateway (pid " in second.logs
        assert "give each gateway process its own recording.directory" in second.logs

        live = sessions_cli("verify", "--dir", str(tmp_path / "recordings"))
        assert live.returncode == 3, live.stdout + live.stderr
        assert "LIVE" in live.stdout, live.stdout
        assert "the gateway recording it is running (pid" in live.stdout
    finally:
        first.stop(signal.SIGKILL)
    gone = sessions_cli("verify", "--dir", str(tmp_path / "recordings"))
    assert gone.returncode == 3, gone.stdout + gone.stderr
    assert "LIVE" not in gone.stdout
    assert "no gateway is recording to this directory" in gone.stdout
    # The lock died with the process: a new gateway starts on the directory.
    third = Gateway(cfg, tmp_path / "c", upstream_ca=pki.cert_file, env=env).start()
    third.stop()
