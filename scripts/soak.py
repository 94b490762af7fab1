"""Soak test: mixed traffic through the gateway for minutes; memory, descriptors, recordings.

    python scripts/soak.py [--minutes 10] [--rate 200] [--workers 8] [--sample-seconds 30]

One gateway (full chain: token auth, a route with an injected credential, the default rule pack
both ways, a policy block rule, recording on; approvals off) in front of bench/upstream.py.
Workers send a weighted mix, paced to `--rate` requests per second in total:

  json      small chat requests (one in five with a secret in the prompt), keep-alive tunnels
  sse       streamed chat completions of 50 events
  big       a 100 KB prompt now and then
  blocked   a request the policy blocks (403)
  no_token  a tunnel opened without a token, a request inside with no token either (401)
  bad_token a CONNECT with a garbage token (407)
  egress    a CONNECT to a destination no route serves (403)

Tunnels are reopened every 200 requests. Every request, CONNECTs included, carries
`x-soak-seq: N`; a request counts as answered once its whole response was read. At the end the
gateway is stopped (SIGTERM, so sessions are sealed), every session file is read back with
`mitmproxy.io.FlowReader`, and every answered sequence number must be in a recorded flow.
Printed: RSS and open descriptors of the gateway over time, and idle (no connection open) after
the warm-up and at the end; answered and recorded counts, and missing flows (there must be
none). Exit status 1 on missing flows, unreadable session files, more descriptors open at the
idle end than at the idle baseline, or errors the gateway logged.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mitmproxy import io as mitmio

from bench.lib import (
    BenchEnv,
    Conn,
    HttpError,
    Process,
    Response,
    Target,
    get,
    post,
)

SEQ_HEADER = "x-soak-seq"
SECRET = "ghp_" + "S0ak9TestTokenAbCdEfGhIjKlMnOpQrStUv12"
MIX = {"json": 60, "sse": 12, "big": 3, "blocked": 10, "no_token": 5, "bad_token": 5, "egress": 5}
REOPEN_EVERY = 200
CHAT = "/v1/chat/completions"
WARMUP_SECONDS = 60
IDLE_SECONDS = 2.0
# Session files open and close with rotation and idle timeouts: two per identity.
FD_SLACK = 4


class Soak:
    def __init__(
        self, env: BenchEnv, gateway: Process, upstream: Process, args: argparse.Namespace
    ):
        self.env = env
        self.gateway = gateway
        self.upstream = upstream
        self.args = args
        self.tls = env.client_tls()
        self.seq = 0
        self.answered: set[int] = set()
        self.kinds: collections.Counter[str] = collections.Counter()
        self.unexpected: collections.Counter[str] = collections.Counter()
        self.rng = random.Random(7)
        kinds, weights = zip(*MIX.items(), strict=True)
        self.kind_list, self.weights = list(kinds), list(weights)

    def target(self, token: str | None = "valid", port: int | None = None, seq: int = 0) -> Target:
        return Target(
            self.gateway.port,
            "127.0.0.1",
            port or self.upstream.port,
            self.env.token if token == "valid" else token,
            self.tls,
            ((SEQ_HEADER, str(seq)),),
        )

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def worker(self, deadline: float, interval: float) -> None:
        conn: Conn | None = None
        used = 0
        next_at = time.monotonic()
        while time.monotonic() < deadline:
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            kind = self.rng.choices(self.kind_list, self.weights)[0]
            try:
                if kind in ("no_token", "bad_token", "egress"):
                    await self.refused_connect(kind)
                else:
                    if conn is None or used >= REOPEN_EVERY:
                        if conn is not None:
                            await conn.close()
                        conn = await Conn.open(self.target(seq=self.next_seq()))
                        used = 0
                    used += 1
                    await self.in_tunnel(conn, kind)
                self.kinds[kind] += 1
            except (OSError, asyncio.IncompleteReadError, HttpError) as e:
                self.unexpected[f"{kind}: {type(e).__name__}"] += 1
                if conn is not None:
                    await conn.close()
                conn = None
        if conn is not None:
            await conn.close()

    async def in_tunnel(self, conn: Conn, kind: str) -> None:
        seq = self.next_seq()
        header = f"{SEQ_HEADER}: {seq}\r\n"
        target = self.target()
        if kind == "sse":
            _, _, size = await conn.stream(get(target, "/sse?n=50", header), _ANY)
            expected, response = 200, Response(200 if size else 0, {}, b"")
        else:
            if kind == "json":
                secret = f" my token is {SECRET}." if seq % 5 == 0 else ""
                body = _chat(f"Question {seq}: what does a proxy do?{secret}")
                path, expected = CHAT, 200
            elif kind == "big":
                body = _chat(f"Question {seq}: " + "lorem ipsum dolor sit amet " * 3800)
                path, expected = "/v1/chat/completions?size=2000", 200
            else:  # blocked by the policy rule
                body = _chat(f"Question {seq}")
                path, expected = "/v1/blocked", 403
            response = await conn.request(post(target, path, body, header))
        if response.status != expected:
            self.unexpected[f"{kind}: status {response.status}"] += 1
        self.answered.add(seq)

    async def refused_connect(self, kind: str) -> None:
        seq = self.next_seq()
        if kind == "no_token":
            await self.tunnel_without_token(seq)
            return
        if kind == "bad_token":
            target, expected = self.target(token="not-a-jwt-" + "x" * 30, seq=seq), 407
        else:
            target, expected = self.target(port=self.upstream.port + 1, seq=seq), 403
        try:
            conn = await Conn.open(target)
        except HttpError as e:
            if e.status != expected:
                self.unexpected[f"{kind}: status {e.status}"] += 1
            self.answered.add(seq)
            return
        await conn.close()
        self.unexpected[f"{kind}: tunnel opened"] += 1

    async def tunnel_without_token(self, seq: int) -> None:
        """A CONNECT without a token opens (inner tokens are allowed); the request inside has
        only the SDK's placeholder key, which is no token: 401."""
        conn = await Conn.open(self.target(token=None, seq=seq))
        try:
            inner = self.next_seq()
            header = f"{SEQ_HEADER}: {inner}\r\n"
            response = await conn.request(post(self.target(), CHAT, _chat("hi"), header))
        finally:
            await conn.close()
        if response.status != 401:
            self.unexpected[f"no_token: status {response.status}"] += 1
        self.answered.add(inner)

    async def run(self) -> Samples:
        """Warm-up, an idle pause (the baseline), the rest of the run, an idle pause (the end)."""
        args = self.args
        total = args.minutes * 60
        samples = Samples(time.monotonic(), self.sample("start"))
        warm_up = min(WARMUP_SECONDS, total * 0.2)
        await self.phase(warm_up, samples)
        await asyncio.sleep(IDLE_SECONDS)  # connections closed, nothing in flight
        samples.baseline = self.sample(f"idle after {warm_up:.0f} s warm-up")
        await self.phase(total - warm_up, samples)
        await asyncio.sleep(IDLE_SECONDS)
        samples.end = self.sample("idle at the end")
        return samples

    def sample(self, label: str) -> Sample:
        return Sample(label, self.gateway.rss(), self.gateway.fds(), len(self.answered))

    async def phase(self, seconds: float, samples: Samples) -> None:
        args = self.args
        deadline = time.monotonic() + seconds
        interval = args.workers / args.rate
        workers = [
            asyncio.create_task(self.worker(deadline, interval)) for _ in range(args.workers)
        ]
        while time.monotonic() < deadline:
            await asyncio.sleep(min(args.sample_seconds, max(0.0, deadline - time.monotonic())))
            now = time.monotonic() - samples.started
            sample = self.sample(f"{now:.0f} s")
            samples.during.append(sample)
            print(
                f"  {sample.label:>6}  RSS {sample.rss / 2**20:7.1f} MiB  fds {sample.fds:4d}  "
                f"answered {sample.answered:7d}",
                flush=True,
            )
        await asyncio.gather(*workers)


@dataclasses.dataclass
class Sample:
    label: str
    rss: int
    fds: int
    answered: int


@dataclasses.dataclass
class Samples:
    started: float
    start: Sample
    baseline: Sample | None = None
    end: Sample | None = None
    during: list[Sample] = dataclasses.field(default_factory=list)


_ANY = re.compile(rb"data:")


def _chat(text: str) -> bytes:

    return json.dumps(
        {"model": "gpt-bench", "messages": [{"role": "user", "content": text}]}
    ).encode()


def recorded_seqs(directory: Path) -> tuple[collections.Counter[int], int, list[str]]:
    """Sequence numbers in every recorded flow (CONNECTs included), flows read, problems."""
    seqs: collections.Counter[int] = collections.Counter()
    flows = 0
    problems = []
    for path in sorted(directory.glob("*/*.mitm")):
        with path.open("rb") as f:
            try:
                for flow in mitmio.FlowReader(f).stream():
                    flows += 1
                    value = flow.request.headers.get(SEQ_HEADER)
                    if value is not None:
                        seqs[int(value)] += 1
            except Exception as e:  # a file stock mitmproxy cannot read is a finding
                problems.append(f"{path.name}: {type(e).__name__}: {e}")
    return seqs, flows, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second, total")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--sample-seconds", type=float, default=30.0)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sluicegate-soak-"))
    env = BenchEnv(work)
    policy = {
        "rules": [{"id": "soak-blocked", "action": "block", "match": {"paths": ["/v1/blocked"]}}]
    }
    upstream = env.start_upstream()
    config = env.config(upstream.port, policy=policy)
    recordings = work / "recordings-1"
    gateway = env.start_gateway(config)
    status = 0
    try:
        print(
            f"soak: {args.minutes:g} min, {args.rate:g} req/s over {args.workers} workers, "
            f"mix {MIX}; gateway pid {gateway.pid}"
        )
        soak = Soak(env, gateway, upstream, args)
        samples = asyncio.run(soak.run())
    finally:
        gateway.stop()
        upstream.stop()
    try:
        seqs, flows, problems = recorded_seqs(recordings)
        missing = sorted(soak.answered - set(seqs))
        duplicated = sorted(s for s, n in seqs.items() if n > 1)
        errors = [line.strip() for line in gateway.lines if " error" in line.lower()]
        base, end = samples.baseline, samples.end
        assert base is not None and end is not None
        sessions = len(list(recordings.glob("*/*.mitm")))
        print(f"\nrequests answered: {len(soak.answered)} ({dict(soak.kinds)})")
        print(f"flows recorded: {flows} in {sessions} session files")
        example = f" e.g. {missing[:5]}" if missing else ""
        print(f"answered but not recorded: {len(missing)}{example}")
        print(f"recorded more than once: {len(duplicated)}")
        print(
            f"RSS MiB: start {samples.start.rss / 2**20:.1f}, {base.label} "
            f"{base.rss / 2**20:.1f}, {end.label} {end.rss / 2**20:.1f} "
            f"(max while running {max(s.rss for s in samples.during) / 2**20:.1f})"
        )
        print(
            f"open fds: start {samples.start.fds}, {base.label} {base.fds}, {end.label} {end.fds}"
        )
        if soak.unexpected:
            print(f"unexpected answers: {dict(soak.unexpected)}")
        if problems:
            print(f"unreadable session files: {problems[:3]}")
        if errors:
            print(f"gateway logged {len(errors)} error line(s), e.g. {errors[0]}")
        if missing or duplicated or problems or errors or end.fds > base.fds + FD_SLACK:
            status = 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
