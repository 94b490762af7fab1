"""Throughput with recording on vs off: two gateways, same load, same run.

    python -m bench record [--requests 600] [--concurrency 16] [--rounds 3] [--fsync]

Starts a local HTTPS upstream (the test suite's fake OpenAI API), two `mitmdump -s
addons/gateway.py` processes with the same config except `recording:`, and drives the same
chat-completions load through each, alternating rounds (and their order) so machine noise hits
both alike. Prints requests/s for each and the ratio of the medians (and of the best rounds).
Numbers are noisy on small machines; compare ratios.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "addons"), str(REPO)]

import httpx  # noqa: E402

from sluicegate.recording.chain import Signer  # noqa: E402
from tests.conftest import UPSTREAM_KEY, UPSTREAM_KEY_ENV, make_config  # noqa: E402
from tests.support.gateway import Gateway  # noqa: E402
from tests.support.pki import TestCA  # noqa: E402
from tests.support.tokens import TestIdP  # noqa: E402
from tests.support.upstream import FakeUpstream  # noqa: E402

BODY = {
    "model": "gpt-test",
    "messages": [{"role": "user", "content": "Summarise the design of a recording proxy. " * 8}],
}


def drive(gw: Gateway, url: str, token: str, requests: int, concurrency: int) -> float:
    """Requests per second for `requests` POSTs over `concurrency` keep-alive clients."""
    per_worker = requests // concurrency

    def worker() -> int:
        ok = 0
        with httpx.Client(proxy=gw.proxy_url(token), verify=gw.ssl_context(), timeout=30) as c:
            for _ in range(per_worker):
                if c.post(url, json=BODY).status_code == 200:
                    ok += 1
        return ok

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        done = sum(pool.map(lambda _: worker(), range(concurrency)))
    elapsed = time.perf_counter() - start
    if done != per_worker * concurrency:
        raise SystemExit(f"only {done} of {per_worker * concurrency} requests succeeded")
    return done / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fsync", action="store_true", help="record with fsync per flow")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="sluicegate-bench-"))
    pki = TestCA(work / "pki")
    idp = TestIdP(work / "idp")
    upstream, plain = FakeUpstream(pki.issue("bench-upstream")), FakeUpstream()
    key_file = work / "signing.pem"
    key_file.write_bytes(Signer.generate().private_pem())
    base = make_config(idp, upstream, plain)
    recording = copy.deepcopy(base)
    recording["recording"] = {
        "directory": str(work / "recordings"),
        "signing_key": {"file": str(key_file)},
        "fsync": args.fsync,
    }
    env = {UPSTREAM_KEY_ENV: UPSTREAM_KEY}
    gateways = {
        "off": Gateway(base, work / "off", upstream_ca=pki.cert_file, env=env),
        "on": Gateway(recording, work / "on", upstream_ca=pki.cert_file, env=env),
    }
    token = idp.mint("bench", ["agents"])
    url = upstream.url("/v1/chat/completions")
    rates: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for gw in gateways.values():
            gw.start()
            drive(gw, url, token, args.concurrency * 4, args.concurrency)  # warm up
        for i in range(args.rounds):  # interleaved: off first on even rounds, on first on odd
            order = list(gateways.items())
            for name, gw in order if i % 2 == 0 else reversed(order):
                rates[name].append(drive(gw, url, token, args.requests, args.concurrency))
    finally:
        for gw in gateways.values():
            gw.stop()
        upstream.close()
        plain.close()
    best = {name: max(values) for name, values in rates.items()}
    middle = {name: statistics.median(values) for name, values in rates.items()}
    recorded = sum(p.stat().st_size for p in (work / "recordings").rglob("*.mitm"))
    flows = (args.requests // args.concurrency) * args.concurrency * args.rounds
    print(
        f"requests per round: {args.requests}, concurrency {args.concurrency}, "
        f"rounds {args.rounds}, fsync {args.fsync}"
    )
    for name in ("off", "on"):
        runs = ", ".join(f"{r:7.1f}" for r in rates[name])
        print(f"recording {name:3}: {runs}  req/s  (best {best[name]:.1f})")
    print(f"ratio on/off (medians of rounds): {middle['on'] / middle['off']:.3f}")
    print(f"ratio on/off (best rounds): {best['on'] / best['off']:.3f}")
    print(f"recorded: {recorded / max(flows, 1):.0f} bytes per flow")
    if not os.environ.get("SLUICEGATE_BENCH_KEEP"):
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
