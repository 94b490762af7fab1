"""A mistyped confdir (mitmproxy would mint a new CA no agent trusts) is caught at start-up."""

from __future__ import annotations

import copy
from pathlib import Path

from sluicegate.cli import ca
from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV
from tests.support.gateway import Gateway
from tests.support.pki import TestCA

ENV = {UPSTREAM_KEY_ENV: UPSTREAM_KEY}
MESSAGE = "had no CA, so mitmproxy has just created a new one that no agent trusts"


def test_a_production_gateway_refuses_to_start_on_a_freshly_minted_ca(
    tmp_path: Path, base_config: dict, pki: TestCA
) -> None:
    cfg = copy.deepcopy(base_config)
    cfg["gateway"] = {"name": "prod", "environment": "production"}
    gw = Gateway(
        cfg, tmp_path / "typo", upstream_ca=pki.cert_file, env=ENV
    )  # its confdir holds no CA
    assert gw.run_to_exit() != 0
    assert MESSAGE in gw.logs and "mistyped --set confdir" in gw.logs

    # The same config on a confdir with the gateway's CA starts (and says nothing of it).
    ready = Gateway(cfg, tmp_path / "ok", upstream_ca=pki.cert_file, env=ENV)
    ca.init(ready.confdir, "prod", ca.DEFAULT_DAYS, ca.DEFAULT_KEY_SIZE)
    with ready:
        assert MESSAGE not in ready.settled_logs()


def test_a_development_gateway_warns(tmp_path: Path, base_config: dict, pki: TestCA) -> None:
    with Gateway(
        copy.deepcopy(base_config), tmp_path / "dev", upstream_ca=pki.cert_file, env=ENV
    ) as gw:
        assert MESSAGE in gw.settled_logs()
