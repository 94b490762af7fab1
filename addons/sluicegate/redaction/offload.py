"""Large bodies redacted in worker processes: no body stalls the event loop, a runaway is killed.

A body is redacted on the gateway's event loop when it is small. A large one (over
`redaction.process_bytes`) goes to a pool of worker processes, each its own interpreter
(`sys.executable -I`), started with one end of a socketpair. The gateway awaits the answer
without blocking the loop, and the rules' CPU time is spent outside its GIL, so other callers
keep being served at full speed while an 8 MB body is redacted.

Same rules, proven: a worker rebuilds the parent's rule pack from the rule files' texts the
parent read (`RulePack.sources`, never the files again, which may have changed since) and
checks the fingerprint of what it built (`setup_fingerprint`: every rule's pattern, flags,
keywords, window, validators, the tag key's effect) against the parent's; the parent checks the
worker's answer again. A worker that disagrees is killed and never used.

Fails closed: a job that takes longer than the budget (`redaction.budget_seconds`) kills its
worker (`RedactionTimeout`); a worker that dies, or cannot start, is `RedactionUnavailable`.
Either way the caller gets nothing of the body. Waiting for a free worker counts against the same
budget (a flood of large bodies queues, then times out; small callers are not in that queue).
A killed or dead worker is replaced in the background.

Protocol (one job at a time per worker): frames of a 12-byte head (header length, payload
length), a JSON header and a raw payload. The first frame is `init` (the setup), answered with
the worker's fingerprint; then `redact` jobs (the decoded body as payload; the flow's literal
secrets in the header), answered with the result or a refusal (`BodyRefused`'s code and
message, which never hold body data) or an error (the exception's type only). A worker writes
nothing to stdout or stderr and dies with the gateway (`PR_SET_PDEATHSIG` on Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sluicegate.redaction.bodies import BodyPolicy, BodyRefused, BodyResult, redact_body
from sluicegate.redaction.memo import CleanTexts, MemoRedactor
from sluicegate.redaction.redactor import KeyedTagger, LiteralSecret, Redactor, Tagger, plain_tag
from sluicegate.redaction.rules import Direction, RulePack, RuleSource, pack_from_sources

logger = logging.getLogger("sluicegate.redaction.offload")

PROTOCOL = 1
# How long a new worker may take to import the engines and compile the rule pack.
STARTUP_SECONDS = 60.0
# After a worker failed to start, jobs fail at once for this long instead of spawning again.
RESTART_BACKOFF_SECONDS = 5.0
_HEAD = struct.Struct("!IQ")  # header length, payload length
MAX_HEADER = 64 * 1024 * 1024
MAX_PAYLOAD = 1 << 34
LITERAL_REDACTORS = 64
_PROBE = ("offload-probe", "a probe value for the tagger")
_ADDONS_DIR = str(Path(__file__).resolve().parents[2])
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from sluicegate.redaction.offload import serve; serve(int(sys.argv[2]), int(sys.argv[3]))"
)


class OffloadError(Exception):
    """A body the pool could not redact; nothing of it may be forwarded."""

    code = "redaction_unavailable"


class RedactionTimeout(OffloadError):
    """The job (or the wait for a worker) took longer than the budget; the worker was killed."""

    code = "redaction_timeout"


class RedactionUnavailable(OffloadError):
    """No worker could do the job: it died, could not start, or disagreed on the rules."""

    code = "redaction_unavailable"


class WorkerError(OffloadError):
    """The redaction raised in the worker (a bug, like an exception in the gateway itself)."""

    code = "redaction_error"


class _ProtocolError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class WorkerSetup:
    """What a worker needs to build the parent's redactors (it reads no config and no file)."""

    pack: RulePack
    requests: bool  # request rules on
    responses: bool  # response rules on (off: only a flow's literals are masked)
    tag_key: bytes | None = None  # keyed tags' HMAC key; None: plain tags
    decode: bool = True

    def __post_init__(self) -> None:
        if (self.pack.rules or self.pack.key_rules) and not self.pack.sources:
            raise ValueError("a rule pack built without its rule files' texts cannot be offloaded")

    def fingerprint(self) -> str:
        return setup_fingerprint(
            self.pack, _tagger(self.tag_key), self.requests, self.responses, self.decode
        )

    def message(self) -> dict[str, Any]:
        return {
            "op": "init",
            "protocol": PROTOCOL,
            "sources": [[s.path, s.text] for s in self.pack.sources],
            "profile": self.pack.profile,
            "enable": list(self.pack.enable),
            "disable": list(self.pack.disable),
            "requests": self.requests,
            "responses": self.responses,
            "tag_key": self.tag_key.hex() if self.tag_key is not None else None,
            "decode": self.decode,
            "fingerprint": self.fingerprint(),
        }


def setup_fingerprint(
    pack: RulePack, tagger: Tagger, requests: bool, responses: bool, decode: bool = True
) -> str:
    """What redaction a process does: the pack's fingerprint, the tagger's output on a probe
    (the key's effect, never the key), which directions have rules, whether encoded spans are
    decoded."""
    digest = hashlib.sha256()
    parts = (pack.fingerprint(), tagger(*_PROBE), str(requests), str(responses), str(decode))
    for part in parts:
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


def _tagger(key: bytes | None) -> Tagger:
    return KeyedTagger(key) if key is not None else plain_tag


# -- the parent's side ----------------------------------------------------------------------------


class OffloadPool:
    """Up to `workers` worker processes; `redact` runs one body on one of them.

    Workers start on first need or on `warm()` (which needs a running event loop), and are
    replaced in the background when one is killed or dies. `close()` kills idle workers at once
    and busy ones when their job ends.
    """

    def __init__(
        self,
        setup: WorkerSetup,
        *,
        workers: int,
        budget_seconds: float,
        startup_seconds: float = STARTUP_SECONDS,
    ) -> None:
        if workers < 1:
            raise ValueError("an offload pool needs at least one worker")
        self.setup = setup
        self.budget_seconds = budget_seconds
        self.startup_seconds = startup_seconds
        self._init = json.dumps(setup.message()).encode()
        self._fingerprint = setup.fingerprint()
        self._slots = [_Slot(self, index) for index in range(workers)]
        self._free: asyncio.Queue[_Slot] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self.failed_at = 0.0  # monotonic time of the last failed start
        self.failure: str | None = None  # why the last start failed (no traffic data)

    @property
    def workers(self) -> int:
        return len(self._slots)

    def pids(self) -> list[int]:
        """Process ids of the running workers (tests, benchmarks)."""
        return [s.worker.pid for s in self._slots if s.worker is not None and s.worker.alive()]

    def warm(self) -> None:
        """Start every worker now, in the background (needs a running event loop)."""
        self._bind()
        for slot in self._slots:
            slot.warm()

    def rewarm(self) -> None:
        if not self.closed:
            self.warm()

    async def ready(self) -> None:
        """Wait until every worker has started (raises `RedactionUnavailable` if one cannot)."""
        self.warm()
        for slot in self._slots:
            await slot.ready()

    async def redact(
        self,
        body: bytes,
        content_type: str | None,
        direction: Direction,
        policy: BodyPolicy,
        literals: Sequence[LiteralSecret] = (),
        scope: str = "",
    ) -> BodyResult:
        """`bodies.redact_body(body, content_type, <the runtime's redactor>, policy)` with the
        parent's rules for `direction` plus `literals`, in a worker process. `scope` is whose
        clean texts the worker may remember (`memo.MemoRedactor`, per caller as in-process)."""
        if self.closed:
            raise RedactionUnavailable("the offload pool is closed")
        header = {
            "op": "redact",
            "direction": str(direction),
            "content_type": content_type,
            "policy": dataclasses.asdict(policy),
            "literals": [[s.rule_id, s.value] for s in literals],
            "scope": scope,
        }
        free = self._bind()
        try:
            async with asyncio.timeout(self.budget_seconds):
                slot = await free.get()
        except TimeoutError:
            raise RedactionTimeout("no worker became free within the budget") from None
        try:
            reply, payload = await slot.run(json.dumps(header).encode(), body)
        finally:
            free.put_nowait(slot)
        return _result(reply, payload, body)

    def close(self) -> None:
        """For good (a new config took over): kill idle workers now and busy ones when their
        job ends; no new job is taken."""
        self.closed = True
        for slot in self._slots:
            if not slot.busy:
                slot.discard()

    def stop(self) -> None:
        """Kill every worker now (the gateway stops); a later job starts them again."""
        for slot in self._slots:
            slot.discard()

    def _bind(self) -> asyncio.Queue[_Slot]:
        """The queue of free slots on the running event loop. The gateway has one loop; a
        new one (tests) gets a new queue, and starts pending on the old one are forgotten
        (a start cancelled with its loop killed its worker)."""
        loop = asyncio.get_running_loop()
        if self._free is None or self._loop is not loop:
            self._loop = loop
            self._free = asyncio.Queue()
            for slot in self._slots:
                slot.starting = None
                slot.busy = False
                self._free.put_nowait(slot)
        return self._free


class _Slot:
    """One place in the pool: at most one worker process, (re)started as needed."""

    def __init__(self, pool: OffloadPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.worker: _Worker | None = None
        self.starting: asyncio.Task[_Worker] | None = None
        self.busy = False

    def warm(self) -> None:
        if self.worker is not None and not self.busy and not self.worker.alive():
            self.discard()  # died while idle
        if self.pool.closed or self.worker is not None or self.starting is not None:
            return
        if time.monotonic() - self.pool.failed_at < RESTART_BACKOFF_SECONDS:
            return
        self.starting = asyncio.get_running_loop().create_task(self._start())
        self.starting.add_done_callback(_retrieve)

    async def ready(self) -> _Worker:
        if self.worker is not None and self.worker.alive():
            return self.worker
        if self.worker is not None:
            self.discard()
        if self.pool.closed:
            raise RedactionUnavailable("the offload pool is closed")
        if self.starting is None:
            if time.monotonic() - self.pool.failed_at < RESTART_BACKOFF_SECONDS:
                raise RedactionUnavailable(f"redaction workers cannot start: {self.pool.failure}")
            self.warm()
        assert self.starting is not None
        try:
            # Shielded: a caller that goes away does not stop a start others will need.
            return await asyncio.shield(self.starting)
        except RedactionUnavailable:
            raise
        except Exception as e:  # pragma: no cover - _start maps every failure
            raise RedactionUnavailable(type(e).__name__) from None

    async def _start(self) -> _Worker:
        pool = self.pool
        worker: _Worker | None = None
        try:
            worker = _Worker.spawn()
            async with asyncio.timeout(pool.startup_seconds):
                reply, _ = await worker.call(pool._init)
            if not reply.get("ok"):
                raise _StartFailed(str(reply.get("error", "refused")))
            if reply.get("fingerprint") != pool._fingerprint:
                raise _StartFailed("fingerprint mismatch: the worker built different rules")
            if pool.closed:
                raise _StartFailed("the offload pool was closed")
        except asyncio.CancelledError:
            if worker is not None:
                worker.kill()
            raise
        except (_StartFailed, TimeoutError, OSError, _ProtocolError) as e:
            if worker is not None:
                worker.kill()
            reason = str(e) if isinstance(e, _StartFailed) else type(e).__name__
            pool.failed_at = time.monotonic()
            pool.failure = reason
            logger.error("sluicegate: a redaction worker could not start: %s", reason)
            # Try again after the back-off (jobs meanwhile fail at once: 503).
            asyncio.get_running_loop().call_later(RESTART_BACKOFF_SECONDS * 1.1, pool.rewarm)
            raise RedactionUnavailable(f"a redaction worker could not start: {reason}") from None
        finally:
            self.starting = None
        self.worker = worker
        pool.failed_at = 0.0
        pool.failure = None
        return worker

    async def run(self, header: bytes, body: bytes) -> tuple[dict[str, Any], bytes]:
        worker = await self.ready()
        self.busy = True
        try:
            async with asyncio.timeout(self.pool.budget_seconds):
                reply = await worker.call(header, body)
        except TimeoutError:
            self.busy = False
            logger.warning(
                "sluicegate: redaction worker %d killed: over its %.3g s budget",
                worker.pid,
                self.pool.budget_seconds,
            )
            self.discard()
            self.pool.warm()
            raise RedactionTimeout("the body was not redacted within the budget") from None
        except (OSError, _ProtocolError):
            self.busy = False
            logger.error("sluicegate: redaction worker %d died during a job", worker.pid)
            self.discard()
            self.pool.warm()  # this one, and any other that died with it
            raise RedactionUnavailable("the redaction worker died") from None
        except BaseException:
            self.busy = False
            # Cancelled mid-job (the client left): its answer would be read by the next job.
            # The next job starts a new worker (not now: the loop may be shutting down).
            self.discard()
            raise
        finally:
            self.busy = False
        if self.pool.closed:
            self.discard()
        return reply

    def discard(self) -> None:
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.kill()


class _StartFailed(Exception):
    pass


class _Worker:
    """One worker process and the parent's end of its socketpair (non-blocking)."""

    def __init__(self, process: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.process = process
        self.sock = sock
        self.pid = process.pid

    @classmethod
    def spawn(cls) -> _Worker:
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOT, _ADDONS_DIR, str(theirs.fileno()),
                 str(os.getpid())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,  # nothing a worker knows goes to a log
                env={},  # none of the gateway's environment (credentials live there)
                start_new_session=True,  # a terminal's ^C is for the gateway, which kills it
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        return cls(process, ours)

    def alive(self) -> bool:
        return self.process.poll() is None

    async def call(self, header: bytes, payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        """Send one frame (a JSON header, a payload) and read the answer."""
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, _HEAD.pack(len(header), len(payload)) + header)
        if payload:
            await loop.sock_sendall(self.sock, payload)
        head = await _recv_exactly(loop, self.sock, _HEAD.size)
        header_size, payload_size = _HEAD.unpack(head)
        if header_size > MAX_HEADER or payload_size > MAX_PAYLOAD:
            raise _ProtocolError("frame too large")
        header = json.loads(await _recv_exactly(loop, self.sock, header_size))
        if not isinstance(header, dict):
            raise _ProtocolError("bad header")
        return header, await _recv_exactly(loop, self.sock, payload_size)

    def kill(self) -> None:
        try:
            self.sock.close()
        finally:
            if self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
            # Reaped off the loop (SIGKILL makes it quick, but never block the loop on it).
            threading.Thread(target=self.process.wait, daemon=True).start()


def _retrieve(task: asyncio.Task[_Worker]) -> None:
    """A background start nobody awaited: its failure is already in `pool.failure`."""
    if not task.cancelled():
        task.exception()


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = await loop.sock_recv_into(sock, view[got:])
        if n == 0:
            raise _ProtocolError("the worker closed the connection")
        got += n
    return bytes(buffer)


def _result(reply: dict[str, Any], payload: bytes, body: bytes) -> BodyResult:
    if reply.get("ok"):
        counts = {str(k): int(v) for k, v in dict(reply.get("counts") or {}).items()}
        new_body = body if reply.get("same") else payload
        return BodyResult(new_body, bool(reply.get("changed")), counts, reply.get("kind", "text"))
    refused = reply.get("refused")
    if isinstance(refused, list) and len(refused) == 2:
        raise BodyRefused(str(refused[0]), str(refused[1]))
    raise WorkerError(f"redaction failed in the worker: {reply.get('error', 'unknown')}")


# -- the worker's side ----------------------------------------------------------------------------


class _Redactors:
    """The worker's redactors, built from an `init` message; its fingerprint."""

    def __init__(self, init: dict[str, Any]) -> None:
        if init.get("protocol") != PROTOCOL:
            raise ValueError(f"protocol {init.get('protocol')!r}, expected {PROTOCOL}")
        sources = tuple(RuleSource(str(p), str(t)) for p, t in init["sources"])
        profile = str(init["profile"])
        if sources:
            pack = pack_from_sources(
                sources, profile, enable=init["enable"], disable=init["disable"]
            )
        else:
            pack = RulePack(rules=(), key_rules=(), profile=profile)
        key = init.get("tag_key")
        self.tagger = _tagger(bytes.fromhex(key) if key is not None else None)
        decode = bool(init.get("decode", True))
        self.requests, self.responses = bool(init["requests"]), bool(init["responses"])
        self.request = Redactor(pack, Direction.REQUEST, tagger=self.tagger, decode=decode)
        self.response = Redactor(pack, Direction.RESPONSE, tagger=self.tagger, decode=decode)
        no_rules = RulePack(rules=(), key_rules=(), profile="none")
        self.scrub_only = Redactor(no_rules, Direction.RESPONSE, tagger=self.tagger)
        # The Hyperscan databases of the rules in use, before the worker answers `init`: its
        # first job does not pay for them (workers redact whole bodies: no stream index).
        for on, redactor in ((self.requests, self.request), (self.responses, self.response)):
            if on:
                redactor.warm(stream=False)
        self.fingerprint = setup_fingerprint(
            pack, self.tagger, self.requests, self.responses, decode
        )
        self._with_literals: OrderedDict[tuple[str, tuple[LiteralSecret, ...]], Redactor] = (
            OrderedDict()
        )
        # Clean texts per caller, as the parent keeps them (`runtime.RedactionRuntime.clean`).
        self.clean = {direction: CleanTexts() for direction in Direction}
        self.pack = pack

    def for_job(self, direction: str, literals: tuple[LiteralSecret, ...]) -> Redactor:
        if direction == Direction.REQUEST:
            if not self.requests:
                raise ValueError("request rules are off")
            base = self.request
        else:
            base = self.response if self.responses else self.scrub_only
        if not literals:
            return base
        key = (direction, literals)
        redactor = self._with_literals.get(key)
        if redactor is None:
            redactor = self._with_literals[key] = base.with_literals(literals)
            while len(self._with_literals) > LITERAL_REDACTORS:
                self._with_literals.popitem(last=False)
        return redactor

    def job(self, header: dict[str, Any], body: bytes) -> tuple[dict[str, Any], bytes]:
        literals = tuple(LiteralSecret(str(r), str(v)) for r, v in header.get("literals", ()))
        direction = Direction(str(header["direction"]))
        # As `runtime.RedactionRuntime.*_text_redactor`: responses without rules remember nothing.
        remembers = direction == Direction.REQUEST or self.responses
        redactor = MemoRedactor(
            self.for_job(direction, literals),
            self.pack if remembers else self.scrub_only.pack,
            direction,
            self.clean[direction] if remembers else None,
            str(header.get("scope", "")),
            literals=[literal.value for literal in literals],
        )
        policy = BodyPolicy(**header["policy"])
        try:
            result = redact_body(body, header.get("content_type"), redactor, policy)
        except BodyRefused as e:
            return {"ok": False, "refused": [e.code, e.message]}, b""
        same = result.body is body or result.body == body
        reply = {
            "ok": True,
            "changed": result.changed,
            "counts": result.counts,
            "kind": result.kind,
            "same": same,
        }
        return reply, b"" if same else result.body


def serve(fd: int, parent: int) -> None:
    """A worker's main loop: `init`, then one `redact` job after another until the parent
    closes its end (or dies: then the kernel kills this process)."""
    _die_with_parent(parent)
    sock = socket.socket(fileno=fd)
    frame = _read_frame(sock)
    if frame is None:
        return
    try:
        redactors = _Redactors(frame[0])
    except Exception as e:  # rule texts and config values only: safe to say
        _write_frame(sock, {"ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}"}, b"")
        return
    if redactors.fingerprint != frame[0].get("fingerprint"):
        _write_frame(sock, {"ok": False, "error": "fingerprint mismatch"}, b"")
        return
    _write_frame(sock, {"ok": True, "fingerprint": redactors.fingerprint, "pid": os.getpid()}, b"")
    while True:
        frame = _read_frame(sock)
        if frame is None:
            return
        header, body = frame
        try:
            reply, payload = redactors.job(header, body)
        except Exception as e:  # never the message: it could quote the body
            reply, payload = {"ok": False, "error": type(e).__name__}, b""
        _write_frame(sock, reply, payload)


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(0)  # the parent is already gone


def _read_frame(sock: socket.socket) -> tuple[dict[str, Any], bytes] | None:
    head = _read_exactly(sock, _HEAD.size)
    if head is None:
        return None
    header_size, payload_size = _HEAD.unpack(head)
    if header_size > MAX_HEADER or payload_size > MAX_PAYLOAD:
        return None
    header = _read_exactly(sock, header_size)
    payload = _read_exactly(sock, payload_size)
    if header is None or payload is None:
        return None
    return json.loads(header), payload


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return bytes(buffer)


def _write_frame(sock: socket.socket, header: dict[str, Any], payload: bytes) -> None:
    data = json.dumps(header).encode()
    sock.sendall(_HEAD.pack(len(data), len(payload)) + data)
    if payload:
        sock.sendall(payload)
