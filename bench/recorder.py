"""What recording costs per flow, in process, and whether the flow encoding is still exact.

    python -m bench recorder [--flows 2000] [--rounds 5] [--against OTHER_CHECKOUT]

Drives `--flows` small JSON chat flows through the whole chain (as `python -m bench
profile_chain` does: token auth, a route with an injected credential, the default rule pack both
ways, recording on) and splits the Recorder's `response` hook into its parts: the snapshot (copy
of the flow's state, decoded and masked bodies, metadata), of which the flow encoding
(`recording/tnetstring.py`), the session write (chain line, signed heads, `write` calls) and the
audit line. Then it encodes every captured flow state again, `--rounds` times, with our encoder
and with mitmproxy's reference (`mitmproxy.io.tnetstring.dumps`), checks that every record is
byte-identical, and prints the median µs per flow of each (and of `--against`'s encoder: what a
change bought). CPU-bound and in process, so the
figures vary little with other load (the machine is shared; medians of rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.lib import median
from bench.profile_chain import KEY_ENV, Driver, chain, drive, write_config


class Timer:
    """Wraps a function and adds up the CPU time spent in it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()  # CPU time: the machine is shared
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - start
                self.calls += 1

        return timed


def run_chain(flows: int) -> tuple[dict[str, float], list[tuple[Any, dict[int, bytes]]]]:
    """µs per flow of the recorder's parts, and the (state, known) pairs it encoded."""
    from mitmproxy.test import taddons

    from sluicegate.mitm import recorder as recorder_mod
    from sluicegate.mitm import snapshot as snapshot_mod
    from sluicegate.recording import audit as audit_mod
    from sluicegate.recording import store as store_mod
    from sluicegate.recording import tnetstring
    from tests.support.tokens import TestIdP

    captured: list[tuple[Any, dict[int, bytes]]] = []
    timers = {name: Timer() for name in ("snapshot", "encode", "write", "audit")}
    real_dumps = tnetstring.dumps

    def capturing_dumps(value: Any, known: Any = tnetstring.NO_KNOWN) -> bytes:
        captured.append((value, dict(known)))
        return real_dumps(value, known)

    timers["hook"] = Timer()
    patches = [
        (recorder_mod.Recorder, "response", timers["hook"].wrap(recorder_mod.Recorder.response)),
        (recorder_mod, "snapshot", timers["snapshot"].wrap(snapshot_mod.snapshot)),
        (snapshot_mod.tnetstring, "dumps", timers["encode"].wrap(capturing_dumps)),
        (store_mod.SessionStore, "write", timers["write"].wrap(store_mod.SessionStore.write)),
        (audit_mod.AuditLog, "commit", timers["audit"].wrap(audit_mod.AuditLog.commit)),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    args = argparse.Namespace(flows=flows, size=0, cprofile=0)
    os.environ.setdefault(KEY_ENV, "sk-profile-upstream-0123456789abcdefghijklmnop")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            idp = TestIdP(work / "idp")
            config = write_config(work, idp)
            addons = chain()
            with taddons.context(*addons) as tctx:
                for addon in addons:
                    tctx.configure(addon, sluicegate_config=str(config))
                driver = Driver(addons)
                for owner, name, fn in patches:
                    setattr(owner, name, fn)
                asyncio.run(drive(args, driver, idp.mint("profile-agent", ["agents"])))
                for addon in addons:
                    addon.done()
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
    total = flows + 20  # drive() warms up with 20 untimed flows; the parts count them too
    parts = {name: t.seconds / max(t.calls, 1) * 1e6 for name, t in timers.items()}
    parts["Recorder.response"] = parts.pop("hook")
    parts["Recorder.requestheaders"] = driver.times["Recorder.requestheaders"] / flows * 1e6
    parts["flows"] = total
    return parts, captured[-flows:]


def load_encoder(checkout: Path) -> Any:
    """Another checkout's `recording/tnetstring.py`, as a module of its own."""
    path = checkout / "addons" / "sluicegate" / "recording" / "tnetstring.py"
    spec = importlib.util.spec_from_file_location("bench_other_tnetstring", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def encode_rates(
    captured: list[tuple[Any, dict[int, bytes]]], rounds: int, against: Path | None = None
) -> tuple[dict[str, float], int]:
    """Median µs per flow of our encoder, of mitmproxy's (and of `against`'s), interleaved;
    the number of records compared (every one byte-identical, or the bench stops)."""
    from mitmproxy.io import tnetstring as reference

    from sluicegate.recording import tnetstring

    for state, known in captured:
        ours = tnetstring.dumps(state, known)
        if ours != reference.dumps(state):
            raise SystemExit("the recorder's encoding differs from mitmproxy's: not byte-identical")
    encoders: dict[str, Callable[[Any, dict[int, bytes]], bytes]] = {
        "ours": tnetstring.dumps,
        "mitmproxy": lambda state, known: reference.dumps(state),
    }
    if against is not None:
        encoders[str(against)] = load_encoder(against).dumps
    times: dict[str, list[float]] = {name: [] for name in encoders}
    for i in range(rounds):
        for name in list(encoders) if i % 2 == 0 else reversed(list(encoders)):
            encode = encoders[name]
            start = time.process_time()
            for state, known in captured:
                encode(state, known)
            times[name].append(time.process_time() - start)
    n = len(captured)
    return {name: median(t) / n * 1e6 for name, t in times.items()}, n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="200 flows, 1 round (CI)")
    parser.add_argument(
        "--against", type=Path, help="also time another checkout's encoder (e.g. before a change)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.flows, args.rounds = 200, 1
    parts, captured = run_chain(args.flows)
    rates, n = encode_rates(captured, args.rounds, args.against)
    print(f"load {os.getloadavg()[0]:.1f} at end; {args.flows} small JSON flows through the chain")
    print(f"  {parts['Recorder.response']:7.1f} µs  Recorder.response (whole hook)")
    print(f"  {parts['snapshot']:7.1f} µs    snapshot (state copy, bodies, masking, metadata)")
    print(f"  {parts['encode']:7.1f} µs      of which the flow encoding")
    print(f"  {parts['write']:7.1f} µs    session write (chain line, signed heads, write calls)")
    print(f"  {parts['audit']:7.1f} µs    audit line")
    print(f"  {parts['Recorder.requestheaders']:7.1f} µs  Recorder.requestheaders (readiness)")
    print(
        f"flow encoding alone, {n} records byte-identical to mitmproxy's, median of "
        f"{args.rounds} interleaved rounds (CPU): ours {rates['ours']:.1f} µs/flow, mitmproxy's "
        f"{rates['mitmproxy']:.1f} µs/flow"
        + "".join(
            f", {k}'s {v:.1f} µs/flow" for k, v in rates.items() if k not in ("ours", "mitmproxy")
        )
    )
    return 0
