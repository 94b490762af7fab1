"""Worker processes for large bodies (redaction/offload.py): the same redaction as in-process,
the same rules proven by fingerprint, a runaway killed at the budget, a dead worker refused."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sluicegate.redaction import offload
from sluicegate.redaction.bodies import BodyPolicy, BodyRefused, BodyResult, redact_body
from sluicegate.redaction.offload import (
    OffloadPool,
    RedactionTimeout,
    RedactionUnavailable,
    WorkerSetup,
)
from sluicegate.redaction.redactor import KeyedTagger, LiteralSecret, Redactor
from sluicegate.redaction.rules import (
    Direction,
    RulePack,
    RuleSource,
    load_rule_pack,
    pack_from_sources,
)
from tests.support.gateway import REPO
from tests.support.rule_secrets import example

RULES = REPO / "rules"
PACK = load_rule_pack([RULES])
OPENAI = example("openai-api-key")
GITHUB = example("github-token")
AWS = example("aws-secret-access-key")
KEY = "sk-injected-" + "k" * 24
TAG_KEY = b"offload-test-tag-key-0123456789"
LITERALS = [LiteralSecret("injected-credential:openai", KEY)]
# Adversarial text: ~11 µs per character with the default pack, linear (scripts/bench_loop_lag.py).
# Adversarial text: ~3.7 µs per byte with the default pack (about 3.7 s at 1 MB).
SLOW = b"api_key=" * 125_000

T = TypeVar("T")


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def pool(loop: asyncio.AbstractEventLoop) -> Iterator[OffloadPool]:
    """Two workers with the default pack and keyed tags, started once for the module."""
    pool = OffloadPool(WorkerSetup(PACK, True, True, TAG_KEY), workers=2, budget_seconds=60.0)
    loop.run_until_complete(pool.ready())
    yield pool
    pool.stop()


def run(loop: asyncio.AbstractEventLoop, coro: Awaitable[T]) -> T:
    async def wrapped() -> T:
        return await coro

    return loop.run_until_complete(wrapped())


def gone(pid: int, within: float = 5.0) -> bool:
    """Whether process `pid` has exited (and was reaped) within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def in_process(
    body: bytes,
    content_type: str | None,
    direction: Direction,
    policy: BodyPolicy,
    literals: list[LiteralSecret],
) -> BodyResult | BodyRefused:
    redactor = Redactor(PACK, direction, tagger=KeyedTagger(TAG_KEY), literals=literals)
    try:
        return redact_body(body, content_type, redactor, policy)
    except BodyRefused as e:
        return e


def chat(text: str) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()


FILLER = "the build passed; nothing else to report. " * 800  # ~34 KB: a "large" body
MULTIPART = (
    b'--XyZ\r\nContent-Disposition: form-data; name="password"\r\n\r\nhunter2-Secret!9\r\n'
    b'--XyZ\r\nContent-Disposition: form-data; name="notes"\r\n\r\n'
    + f"{FILLER} {GITHUB.text}".encode()
    + b"\r\n--XyZ--\r\n"
)
SSE = b"".join(
    b"data: " + json.dumps({"choices": [{"delta": {"content": piece}}]}).encode() + b"\n\n"
    for piece in [FILLER[:20000], " token ", GITHUB.text[:9], GITHUB.text[9:], " done"]
)
CASES: list[tuple[str, bytes, str | None, Direction, BodyPolicy, list[LiteralSecret]]] = [
    ("json request", chat(f"{FILLER} {OPENAI.text}"), "application/json", Direction.REQUEST,
     BodyPolicy(), []),
    ("clean json", chat(FILLER), "application/json", Direction.REQUEST, BodyPolicy(), []),
    ("text response with literal", f"{FILLER} echo {KEY} {AWS.text}".encode(), "text/plain",
     Direction.RESPONSE, BodyPolicy(), LITERALS),
    ("form", f"q={FILLER}&token={GITHUB.text}".encode(), "application/x-www-form-urlencoded",
     Direction.REQUEST, BodyPolicy(), []),
    ("multipart", MULTIPART, "multipart/form-data; boundary=XyZ", Direction.REQUEST,
     BodyPolicy(), []),
    ("utf-16 json", chat(f"{FILLER} {OPENAI.text}").decode().encode("utf-16"),
     "application/json", Direction.REQUEST, BodyPolicy(), []),
    ("json labelled text, trailing data", chat(GITHUB.text) + FILLER.encode(), "text/plain",
     Direction.RESPONSE, BodyPolicy(), []),
    ("binary passed, literal scrubbed", b"\x89PNG" + FILLER.encode() + KEY.encode(),
     "image/png", Direction.RESPONSE, BodyPolicy(binary="pass"), LITERALS),
    ("binary blocked", b"\x89PNG" + FILLER.encode(), "image/png", Direction.REQUEST,
     BodyPolicy(), []),
    ("no content type", f"{FILLER} {OPENAI.text}".encode(), None, Direction.REQUEST,
     BodyPolicy(), []),
    # A buffered event stream: the SSE engine's own policy (hold, event size, budget) travels too.
    ("event stream", SSE, "text/event-stream", Direction.RESPONSE,
     BodyPolicy(sse_max_hold=64, sse_budget_seconds=5.0), []),
    ("event stream, event over its limit", SSE, "text/event-stream", Direction.RESPONSE,
     BodyPolicy(sse_max_event_bytes=128), []),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "content_type", "direction", "policy", "literals"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_a_worker_redacts_exactly_as_the_gateway_process(
    loop: asyncio.AbstractEventLoop,
    pool: OffloadPool,
    body: bytes,
    content_type: str | None,
    direction: Direction,
    policy: BodyPolicy,
    literals: list[LiteralSecret],
) -> None:
    expected = in_process(body, content_type, direction, policy, literals)
    try:
        got: BodyResult | BodyRefused = run(
            loop, pool.redact(body, content_type, direction, policy, literals)
        )
    except BodyRefused as e:
        got = e
    if isinstance(expected, BodyRefused):
        assert isinstance(got, BodyRefused)
        assert (got.code, got.message) == (expected.code, expected.message)
        return
    assert isinstance(got, BodyResult)
    assert got == expected  # body, changed, counts, kind
    for secret in (OPENAI.secret, GITHUB.secret, AWS.secret, KEY):
        if secret.encode() in body:
            assert secret.encode() not in got.body


def test_the_workers_run_in_their_own_processes_without_our_environment(
    pool: OffloadPool,
) -> None:
    pids = pool.pids()
    assert len(pids) == 2 and os.getpid() not in pids
    for pid in pids:
        assert Path(f"/proc/{pid}/environ").read_bytes() == b""  # no credential env vars
        assert Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[1] == str(os.getpid())
        assert b"-I" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def test_jobs_run_side_by_side_on_both_workers(
    loop: asyncio.AbstractEventLoop, pool: OffloadPool
) -> None:
    body = chat(f"{FILLER} {OPENAI.text}")

    async def both() -> list[BodyResult]:
        return list(
            await asyncio.gather(
                *(pool.redact(body, "application/json", Direction.REQUEST, BodyPolicy())
                  for _ in range(6))
            )
        )  # fmt: skip

    results = run(loop, both())
    assert all(r.counts == {"openai-api-key": 1} for r in results)
    assert len({r.body for r in results}) == 1


def test_the_pack_is_rebuilt_from_the_texts_the_parent_read() -> None:
    assert PACK.sources and all(isinstance(s, RuleSource) for s in PACK.sources)
    assert [s.path for s in PACK.sources] == sorted(str(p) for p in RULES.glob("*.yaml"))
    rebuilt = pack_from_sources(PACK.sources, PACK.profile)
    assert rebuilt.fingerprint() == PACK.fingerprint()
    assert [r.id for r in rebuilt.rules] == [r.id for r in PACK.rules]
    some = PACK.rules[0].id
    narrower = load_rule_pack([RULES], disable=[some])
    assert narrower.disable == (some,)
    assert narrower.fingerprint() != PACK.fingerprint()
    again = pack_from_sources(narrower.sources, "default", disable=narrower.disable)
    assert again.fingerprint() == narrower.fingerprint()
    assert load_rule_pack([RULES], "strict").fingerprint() != PACK.fingerprint()


def test_a_worker_builds_the_databases_of_its_rules_before_its_first_job() -> None:
    """As the gateway process: a worker's first large body does not pay for the Hyperscan
    database (0.2-0.4 s, against the body's budget); a direction whose rules are off builds
    none."""
    redactors = offload._Redactors(WorkerSetup(PACK, True, False).message())
    assert redactors.pack is not PACK  # rebuilt from the texts: nothing compiled before
    request = redactors.request._compiled.keywords
    assert request._fast is not None and not request._fast_pending
    assert redactors.response._compiled.keywords._fast_pending  # response rules are off


def test_a_worker_that_builds_other_rules_is_never_used(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """The parent's pack differs from what its sources build (a rule file edited under it, a
    worker of another version): the worker refuses, the parent refuses the body."""
    edited = tuple(
        RuleSource(s.path, s.text.replace("github-token", "github-token-edited"))
        for s in PACK.sources
    )
    assert edited != PACK.sources
    lying = RulePack(PACK.rules, PACK.key_rules, PACK.profile, sources=edited)
    pool = OffloadPool(WorkerSetup(lying, True, True), workers=1, budget_seconds=30.0)
    try:
        with pytest.raises(RedactionUnavailable, match="fingerprint mismatch"):
            run(loop, pool.redact(chat(OPENAI.text), "application/json", Direction.REQUEST,
                                  BodyPolicy()))  # fmt: skip
        assert pool.pids() == []
        assert pool.failure is not None and "fingerprint" in pool.failure
        # Within the back-off, a job fails at once rather than spawning again.
        started = time.monotonic()
        with pytest.raises(RedactionUnavailable):
            run(loop, pool.redact(b"x", "text/plain", Direction.REQUEST, BodyPolicy()))
        assert time.monotonic() - started < 1.0
    finally:
        pool.stop()


def test_a_tagger_with_another_key_is_another_fingerprint() -> None:
    plain = WorkerSetup(PACK, True, True).fingerprint()
    keyed = WorkerSetup(PACK, True, True, TAG_KEY).fingerprint()
    other = WorkerSetup(PACK, True, True, TAG_KEY[::-1]).fingerprint()
    no_responses = WorkerSetup(PACK, True, False, TAG_KEY).fingerprint()
    no_decoding = WorkerSetup(PACK, True, True, TAG_KEY, decode=False).fingerprint()
    assert len({plain, keyed, other, no_responses, no_decoding}) == 5
    assert TAG_KEY.hex() not in keyed


def test_a_pack_without_its_sources_cannot_be_offloaded() -> None:
    bare = RulePack(PACK.rules, PACK.key_rules, PACK.profile)
    with pytest.raises(ValueError, match="texts"):
        WorkerSetup(bare, True, True)
    WorkerSetup(RulePack((), (), "none"), False, False)  # no rules: nothing to rebuild


def test_a_job_over_budget_kills_its_worker_and_the_pool_recovers(
    loop: asyncio.AbstractEventLoop,
) -> None:
    pool = OffloadPool(WorkerSetup(PACK, True, True), workers=1, budget_seconds=0.3)
    try:
        run(loop, pool.ready())
        [pid] = pool.pids()
        started = time.monotonic()
        with pytest.raises(RedactionTimeout):
            run(loop, pool.redact(SLOW, "text/plain", Direction.REQUEST, BodyPolicy()))
        assert time.monotonic() - started < 2.0  # the budget, not the job's ~3 s
        assert gone(pid), "the runaway worker is still running"
        # A replacement starts in the background; the next job gets it.
        pool.budget_seconds = 60.0
        result = run(
            loop,
            pool.redact(chat(OPENAI.text), "application/json", Direction.REQUEST, BodyPolicy()),
        )
        assert result.counts == {"openai-api-key": 1}
        assert pool.pids() and pool.pids() != [pid]
    finally:
        pool.stop()


def test_waiting_for_a_busy_worker_counts_against_the_budget(
    loop: asyncio.AbstractEventLoop,
) -> None:
    pool = OffloadPool(WorkerSetup(PACK, True, True), workers=1, budget_seconds=60.0)
    try:
        run(loop, pool.ready())

        async def queued() -> tuple[BaseException | None, float, bool]:
            slow = asyncio.ensure_future(
                pool.redact(SLOW, "text/plain", Direction.REQUEST, BodyPolicy())
            )
            await asyncio.sleep(0.1)
            pool.budget_seconds = 0.3  # the queued job's budget; the running one keeps 60 s
            started = time.monotonic()
            error: BaseException | None = None
            try:
                await pool.redact(b"hello", "text/plain", Direction.REQUEST, BodyPolicy())
            except RedactionTimeout as e:
                error = e
            waited = time.monotonic() - started
            still_running = not slow.done()
            slow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await slow
            return error, waited, still_running

        error, waited, still_running = run(loop, queued())
        assert isinstance(error, RedactionTimeout) and "free" in str(error)
        assert waited < 1.0 and still_running
    finally:
        pool.stop()


def test_a_worker_that_dies_mid_job_is_refused_and_replaced(
    loop: asyncio.AbstractEventLoop,
) -> None:
    pool = OffloadPool(WorkerSetup(PACK, True, True), workers=1, budget_seconds=60.0)
    try:
        run(loop, pool.ready())
        [pid] = pool.pids()

        async def crash() -> BodyResult:
            job = asyncio.ensure_future(
                pool.redact(SLOW, "text/plain", Direction.REQUEST, BodyPolicy())
            )
            await asyncio.sleep(0.3)
            os.kill(pid, signal.SIGKILL)
            return await job

        started = time.monotonic()
        with pytest.raises(RedactionUnavailable):
            run(loop, crash())
        assert time.monotonic() - started < 2.0
        result = run(
            loop, pool.redact(chat(GITHUB.text), "application/json", Direction.REQUEST,
                              BodyPolicy())
        )  # fmt: skip
        assert result.counts == {"github-token": 1}
        assert pool.pids() != [pid]
    finally:
        pool.stop()


def test_a_worker_killed_while_idle_is_replaced_before_the_next_job(
    loop: asyncio.AbstractEventLoop,
) -> None:
    pool = OffloadPool(WorkerSetup(PACK, True, True), workers=1, budget_seconds=60.0)
    try:
        run(loop, pool.ready())
        [pid] = pool.pids()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pool.pids() and time.monotonic() < deadline:  # `pids` reaps the dead one
            time.sleep(0.02)
        assert pool.pids() == []
        result = run(
            loop, pool.redact(chat(OPENAI.text), "application/json", Direction.REQUEST,
                              BodyPolicy())
        )  # fmt: skip
        assert result.counts == {"openai-api-key": 1}
    finally:
        pool.stop()


def test_a_closed_pool_refuses_and_its_workers_exit(loop: asyncio.AbstractEventLoop) -> None:
    pool = OffloadPool(WorkerSetup(PACK, True, True), workers=2, budget_seconds=60.0)
    run(loop, pool.ready())
    pids = pool.pids()
    pool.close()
    assert all(gone(pid) for pid in pids)
    with pytest.raises(RedactionUnavailable):
        run(loop, pool.redact(b"x", "text/plain", Direction.REQUEST, BodyPolicy()))


def test_a_worker_remembers_clean_texts_per_caller_and_still_finds_literals(
    loop: asyncio.AbstractEventLoop, pool: OffloadPool
) -> None:
    """Workers keep clean texts per caller as the gateway process does; a remembered text that
    holds a flow's literal is still redacted (memo.MemoRedactor's exactness)."""
    body = f"{FILLER} the key is {KEY} today".encode()
    policy = BodyPolicy()

    def job(literals: list[LiteralSecret], scope: str) -> BodyResult:
        return run(
            loop, pool.redact(body, "text/plain", Direction.RESPONSE, policy, literals, scope)
        )

    for _ in range(3):  # both workers see it, clean, for caller "a"
        assert job([], "a").changed is False
    with_literal = job(LITERALS, "a")
    assert with_literal == in_process(body, "text/plain", Direction.RESPONSE, policy, LITERALS)
    assert KEY.encode() not in with_literal.body
    assert with_literal.counts == {"injected-credential:openai": 1}


FRAGMENTS = [
    OPENAI.text, GITHUB.text, AWS.text, KEY, "password=hunter2-Secret!9", '"token": "',
    "\\u0067hp_", "ghp_", "[REDACTED:github-token]", "é", "\u2028", "\\", '"', "\n", " ",
    "the build passed", "{", "}", "=", "&", "%20", "\ufeff", "\x00",
]  # fmt: skip


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pieces=st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=12), max_size=40),
    content_type=st.sampled_from(
        ["application/json", "text/plain", "application/x-www-form-urlencoded", None]
    ),
    direction=st.sampled_from(list(Direction)),
    wrap_json=st.booleans(),
)
def test_worker_and_gateway_process_agree_on_any_body(
    loop: asyncio.AbstractEventLoop,
    pool: OffloadPool,
    pieces: list[str],
    content_type: str | None,
    direction: Direction,
    wrap_json: bool,
) -> None:
    text = "".join(pieces)
    body = (json.dumps({"content": text}) if wrap_json else text).encode("utf-8", "surrogatepass")
    literals = LITERALS if direction == Direction.RESPONSE else []
    policy = BodyPolicy()
    expected = in_process(body, content_type, direction, policy, literals)
    try:
        got: BodyResult | BodyRefused = run(
            loop, pool.redact(body, content_type, direction, policy, literals, "caller")
        )
    except BodyRefused as e:
        got = e
    if isinstance(expected, BodyRefused):
        assert isinstance(got, BodyRefused) and got.code == expected.code
    else:
        assert got == expected
