"""Event-loop lag under adversarial bodies: no single message may hold the loop over 50 ms.

Two tables. First, the redaction engine alone on adversarial texts (keyword runs such as `pwd`
repeated, PEM BEGIN lines without an END, credential keys with no value, tag and token prefixes
repeated...) at 4, 16 and 64 KiB: milliseconds per body and the growth from 16 to 64 KiB (4 is
linear, 16 would be quadratic). Second, the way the gateway runs it (`mitm.redaction._off_loop`:
on the loop up to THREAD_BYTES, on a thread up to `redaction.process_bytes`, else in a worker
process, with a time budget) next to a heartbeat task on the same asyncio loop: the worst lag
the heartbeat saw while each body was redacted.

    .venv/bin/python scripts/bench_loop_lag.py [--sizes 4,16,64] [--profile default]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "addons"), str(ROOT)]

from sluicegate.mitm import redaction as redaction_addon  # noqa: E402
from sluicegate.redaction.bodies import BodyPolicy, redact_body  # noqa: E402
from sluicegate.redaction.offload import OffloadPool, WorkerSetup  # noqa: E402
from sluicegate.redaction.redactor import Redactor  # noqa: E402
from sluicegate.redaction.rules import Direction, load_rule_pack  # noqa: E402

BUDGET_MS = 50.0
PROCESS_BYTES = 16384  # redaction.process_bytes' default
BUDGET_SECONDS = 10.0  # redaction.budget_seconds' default

# name -> (content type, the repeated unit)
ADVERSARIAL: dict[str, tuple[str, str]] = {
    "pwd run": ("text/plain", "pwd"),
    "pwd lines": ("text/plain", "db_pwd\n"),
    "password= pairs": ("application/x-www-form-urlencoded", "password=&"),
    "PEM BEGIN lines": ("text/plain", "-----BEGIN RSA PRIVATE KEY-----\n"),
    "PEM BEGIN, no END": ("text/plain", "-----BEGIN PRIVATE KEY-----AAAA"),
    "secret: runs": ("text/plain", "secret: "),
    "token keys (JSON)": ("application/json", '{"token":"'),
    "xml password": ("application/xml", "<password>"),
    "quotes and commas": ("text/plain", '("token", \''),
    "tag prefixes": ("text/plain", "[REDACTED:"),
    "ghp_ prefixes": ("text/plain", "ghp_"),
    "base64 run": ("text/plain", "QUJDREVGR0hJSktMTU5PUA=="),
    "url userinfo": ("text/plain", "https://u:p@"),
    "curl -u": ("text/plain", "curl -u a:"),
}


def body_of(unit: str, size: int) -> bytes:
    return (unit * (size // len(unit) + 1))[:size].encode()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


async def lag_while(work: Callable[[], object]) -> float:
    """Worst lateness (ms) of a 1 ms heartbeat on this loop while `work` runs."""
    worst = 0.0
    done = asyncio.Event()

    async def heartbeat() -> None:
        nonlocal worst
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, (time.perf_counter() - before) * 1000 - 1)

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.005)
    try:
        await work()  # type: ignore[misc]
    finally:
        done.set()
        await beat
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4,16,64", help="body sizes in KiB")
    parser.add_argument("--profile", default="default")
    args = parser.parse_args()
    sizes = [int(s) * 1024 for s in args.sizes.split(",")]
    pack = load_rule_pack([ROOT / "rules"], args.profile)
    redactor = Redactor(pack, Direction.REQUEST)
    policy = BodyPolicy()
    redactor.redact_text("warm up")

    print(f"engine: ms per body ({args.profile} rules); growth = time(64K) / time(16K)")
    header = "| input | " + " | ".join(f"{s // 1024} KiB" for s in sizes) + " | growth |"
    print(header + "\n|" + "---|" * (len(sizes) + 2))
    for name, (content_type, unit) in ADVERSARIAL.items():
        times = []
        for size in sizes:
            body = body_of(unit, size)
            work = functools.partial(redact_body, body, content_type, redactor, policy)
            times.append(timed(work))
        growth = times[-1] / times[-2] if len(times) > 1 and times[-2] > 0.05 else float("nan")
        cells = " | ".join(f"{t:.1f}" for t in times)
        print(f"| {name} | {cells} | {growth:.1f} |")

    print(
        f"\ngateway path: worst event-loop lag (ms) while one body is redacted "
        f"(on the loop up to {redaction_addon.THREAD_BYTES} bytes, a thread up to "
        f"{PROCESS_BYTES}, else a worker process)"
    )
    print(header.replace("growth", "over 50 ms?") + "\n|" + "---|" * (len(sizes) + 2))
    failures = 0

    async def run() -> None:
        nonlocal failures
        pool = OffloadPool(WorkerSetup(pack, True, True), workers=1, budget_seconds=BUDGET_SECONDS)
        await pool.ready()
        for name, (content_type, unit) in ADVERSARIAL.items():
            lags = []
            for size in [*sizes, redaction_addon.THREAD_BYTES]:
                body = body_of(unit, size)

                async def work(body: bytes = body, content_type: str = content_type) -> None:
                    if len(body) > PROCESS_BYTES:  # as mitm/redaction.py's _redact_body
                        await pool.redact(body, content_type, Direction.REQUEST, policy)
                        return
                    await redaction_addon._off_loop(
                        len(body), BUDGET_SECONDS, redact_body, body, content_type, redactor,
                        policy,
                    )  # fmt: skip

                lags.append(await lag_while(work))
            over = max(lags) > BUDGET_MS
            failures += over
            cells = " | ".join(f"{lag:.1f}" for lag in lags[: len(sizes)])
            print(f"| {name} | {cells} | {'YES' if over else 'no'} (at limit {lags[-1]:.1f}) |")
        pool.stop()

    asyncio.run(run())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
