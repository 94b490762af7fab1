"""The shared-state engine: the same contract on the memory backend and on a real redis-server,
and what only Redis gives (several replicas, atomicity under races, durability, TLS, passwords,
outages and recovery, the local fallback)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sluicegate.policy.ratelimit import Limit
from sluicegate.state import (
    AlreadyResolved,
    ApprovalRequest,
    LocalFallback,
    MemoryState,
    RedisSettings,
    RedisState,
    SharedState,
    StateUnavailable,
    StillWaiting,
    UnknownApproval,
    UnknownGrant,
    grant_id,
    request_digest,
)
from sluicegate.state.base import ACTIVITY_SIZE
from tests.support.pki import TestCA
from tests.support.redis_server import RedisServer

T = TypeVar("T")
KEY = ("https://idp|alice", "route:openai", "deletes")


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def request(**kw: Any) -> ApprovalRequest:
    base: dict[str, Any] = {
        "request_id": "req-1",
        "rule_id": "deletes",
        "message": "Deleting needs a human.",
        "phase": "request",
        "subject": "alice",
        "issuer": "https://idp",
        "groups": ("agents",),
        "route": "openai",
        "host": "api.openai.com",
        "port": 443,
        "method": "DELETE",
        "path": "/v1/files/x",
        "grant_key": KEY,
    }
    base.update(kw)
    return ApprovalRequest(**base)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


def settings(server: RedisServer, prefix: str | None = None, **kw: Any) -> RedisSettings:
    prefix = prefix or f"test:{secrets.token_hex(4)}:"
    return RedisSettings(url=server.url, key_prefix=prefix, timeout_seconds=1.0, **kw)


Factory = Callable[..., contextlib.AbstractAsyncContextManager[SharedState]]


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    """Opens started backends of one kind; on Redis, replicas of one deployment (one prefix)."""
    prefix = f"test:{secrets.token_hex(4)}:"

    @contextlib.asynccontextmanager
    async def open_state(replica: str = "r1", **kw: Any) -> AsyncIterator[SharedState]:
        state: SharedState
        if request.param == "memory":
            state = MemoryState(replica, **kw)
        else:
            server = request.getfixturevalue("redis_server")
            state = RedisState(settings(server, prefix), replica, **kw)
        await state.start()
        if isinstance(state, RedisState):
            assert await state.wait_subscribed(5)
        try:
            yield state
        finally:
            await state.close()

    return open_state


# -- the contract, on both backends ---------------------------------------------------------------


def test_a_decision_releases_the_waiting_request(backend: Factory) -> None:
    async def main() -> None:
        async with backend() as state:
            hold = await state.hold(request(), dedupe="d1", timeout=30)
            assert hold.created and hold.claimed is None
            assert [a.id for a in await state.pending()] == [hold.id]
            waiter = asyncio.ensure_future(state.wait(hold, 30))
            await asyncio.sleep(0.05)
            assert not waiter.done()
            resolution = await state.resolve(hold.id, "approved", by="bob", reason="ticket 42")
            got = await asyncio.wait_for(waiter, 5)
            assert got == resolution
            assert (got.outcome, got.by, got.reason) == ("approved", "bob", "ticket 42")
            assert await state.pending() == []
            with pytest.raises(AlreadyResolved) as e:
                await state.resolve(hold.id, "denied", by="carol", reason="late")
            assert e.value.resolution == resolution
            with pytest.raises(UnknownApproval):
                await state.resolve("00000000", "approved", by="bob", reason="x")
            approval = await state.approval(hold.id)
            assert approval is not None and approval.status == "approved"
            [entry] = await state.history()
            assert (entry.kind, entry.outcome, entry.by, entry.approval_id) == (
                "decision",
                "approved",
                "bob",
                hold.id,
            )
            assert entry.request == request()

    run(main())


def test_retries_of_the_same_request_join_one_approval(backend: Factory) -> None:
    async def main() -> None:
        async with backend() as state:
            first = await state.hold(request(), dedupe="same", timeout=30)
            second = await state.hold(request(request_id="req-2"), dedupe="same", timeout=30)
            other = await state.hold(request(request_id="req-3"), dedupe="other", timeout=30)
            assert first.created and not second.created and other.created
            assert second.id == first.id != other.id
            [a, b] = await state.pending()
            assert (a.id, a.attempts, a.waiting) == (first.id, 2, 2)
            assert (b.id, b.attempts) == (other.id, 1)
            # The first attempt goes away (its client timed out): the approval stays pending.
            assert await state.withdraw(first) is False
            assert (await state.pending())[0].waiting == 1
            waiter = asyncio.ensure_future(state.wait(second, 30))
            await state.resolve(first.id, "denied", by="bob", reason="no")
            resolution = await asyncio.wait_for(waiter, 5)
            assert resolution is not None and resolution.outcome == "denied"
            # Once decided, the same request opens a new approval.
            again = await state.hold(request(), dedupe="same", timeout=30)
            assert again.created and again.id != first.id

    run(main())


def test_an_approval_nobody_waits_for_is_claimed_by_the_next_retry_once(
    backend: Factory,
) -> None:
    async def main() -> None:
        async with backend() as state:
            hold = await state.hold(request(), dedupe="d", timeout=30)
            assert await state.withdraw(hold) is True  # nobody waits any more
            assert await state.withdraw(hold) is False  # idempotent
            await state.resolve(hold.id, "approved", by="bob", reason="ok")
            retry = await state.hold(request(), dedupe="d", timeout=30)
            assert retry.claimed is not None and retry.claimed.outcome == "approved"
            assert retry.id == hold.id and not retry.created
            assert await state.wait(retry, 0) == retry.claimed
            # Claimed once: the next identical request is held again.
            third = await state.hold(request(), dedupe="d", timeout=30)
            assert third.created and third.claimed is None

    run(main())


def test_abandoned_approvals_can_be_cancelled_only_when_nobody_waits(backend: Factory) -> None:
    async def main() -> None:
        async with backend() as state:
            hold = await state.hold(request(), dedupe="d", timeout=30)
            with pytest.raises(StillWaiting):
                await state.resolve(hold.id, "cancelled", only_if_abandoned=True)
            await state.withdraw(hold)
            resolution = await state.resolve(
                hold.id, "cancelled", reason="withdrawn", only_if_abandoned=True
            )
            assert resolution.outcome == "cancelled"
            assert await state.pending() == []

    run(main())


def test_timeout_is_resolved_by_the_holder_and_a_racing_decision_wins(
    backend: Factory,
) -> None:
    async def main() -> None:
        async with backend() as state:
            hold = await state.hold(request(), dedupe="d", timeout=0.2)
            assert await state.wait(hold, 0.05) is None
            timeout = await state.resolve(hold.id, "timeout", reason="no approver")
            assert timeout.outcome == "timeout"
            raced = await state.hold(request(), dedupe="e", timeout=30)
            await state.resolve(raced.id, "approved", by="bob", reason="just in time")
            with pytest.raises(AlreadyResolved) as e:
                await state.resolve(raced.id, "timeout")
            assert e.value.resolution.outcome == "approved"

    run(main())


def test_grants_cover_pending_approvals_and_can_be_revoked(backend: Factory) -> None:
    async def main() -> None:
        async with backend() as state:
            a = await state.hold(request(), dedupe="a", timeout=30)
            b = await state.hold(request(path="/v1/files/y"), dedupe="b", timeout=30)
            c = await state.hold(
                request(rule_id="other", grant_key=(*KEY[:2], "other")), dedupe="c", timeout=30
            )
            waiter_b = asyncio.ensure_future(state.wait(b, 30))
            await state.resolve(a.id, "approved", by="bob", reason="sprint", grant_minutes=30)
            covered = await asyncio.wait_for(waiter_b, 5)
            assert covered is not None and covered.outcome == "approved"
            assert f"grant of approval {a.id}" in covered.reason
            assert [p.id for p in await state.pending()] == [c.id]
            grant = await state.grant(KEY)
            assert grant is not None and grant.approval_id == a.id and grant.by == "bob"
            assert grant.id == grant_id(KEY)
            assert await state.granted(KEY[0], KEY[1], ["deletes", "other"]) == ["deletes"]
            assert [g.id for g in await state.grants()] == [grant.id]
            revoked = await state.revoke(grant.id, by="carol", reason="done")
            assert revoked.id == grant.id
            assert await state.grant(KEY) is None and await state.grants() == []
            with pytest.raises(UnknownGrant):
                await state.revoke(grant.id, by="carol", reason="again")
            history = await state.history()
            assert history[0].kind == "revocation" and history[0].by == "carol"
            assert {h.approval_id for h in history if h.kind == "decision"} == {a.id, b.id}

    run(main())


def test_grants_expire(backend: Factory) -> None:
    async def main() -> None:
        async with backend() as state:
            hold = await state.hold(request(), dedupe="a", timeout=30)
            await state.resolve(hold.id, "approved", by="bob", reason="r", grant_minutes=0.01)
            assert await state.grant(KEY) is not None
            await asyncio.sleep(0.7)
            assert await state.grant(KEY) is None
            assert await state.grants() == []

    run(main())


def test_subscribers_see_every_change(backend: Factory) -> None:
    async def main() -> None:
        async with backend() as state, state.subscribe() as changes:
            hold = await state.hold(request(), dedupe="a", timeout=30)
            await state.hold(request(), dedupe="a", timeout=30)
            await state.withdraw(hold)
            await state.resolve(hold.id, "approved", by="bob", reason="r", grant_minutes=5)
            await state.revoke(grant_id(KEY), by="bob", reason="r")
            kinds = []
            for _ in range(6):
                event = await changes.get(timeout=5)
                assert event is not None and event.approval_id == hold.id
                kinds.append(event.kind)
            assert kinds == [
                "approval_pending",
                "approval_joined",
                "approval_withdrawn",
                "approval_resolved",
                "grant_created",
                "grant_revoked",
            ]

    run(main())


def test_rate_limits_are_exact_sliding_windows(backend: Factory) -> None:
    async def main() -> None:
        async with backend() as state:
            per_caller = Limit("per-caller", 3, 0.5)
            per_route = Limit("per-route", 100, 60)
            hits = [(per_caller, "alice"), (per_route, "openai")]
            assert [await state.acquire(hits) for _ in range(3)] == [None] * 3
            denied = await state.acquire(hits)
            assert denied is not None and denied.limit_id == "per-caller"
            assert 0 < denied.retry_after <= 0.5
            assert await state.acquire([(per_caller, "bob")]) is None  # keys apart
            # Denied requests consumed nothing, from either limit.
            tight = Limit("per-route", 4, 60)
            assert await state.acquire([(tight, "openai")]) is None  # 3 + bob's 0 + this
            assert await state.acquire([(tight, "openai")]) is not None
            await asyncio.sleep(denied.retry_after + 0.05)
            assert await state.acquire([(per_caller, "alice")]) is None

    run(main())


# -- several replicas on one Redis ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def replicas(
    server: RedisServer, n: int = 2, prefix: str | None = None
) -> AsyncIterator[list[RedisState]]:
    prefix = prefix or f"test:{secrets.token_hex(4)}:"
    states = [RedisState(settings(server, prefix), f"replica-{i}") for i in range(n)]
    for state in states:
        await state.start()
        assert await state.wait_subscribed(5)
    try:
        yield states
    finally:
        for state in states:
            await state.close()


def test_a_request_held_on_one_replica_is_decided_on_another_and_released_at_once(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        async with replicas(redis_server) as (a, b):
            hold = await a.hold(request(), dedupe="d", timeout=30)
            waiter = asyncio.ensure_future(a.wait(hold, 30))
            [seen] = await b.pending()
            assert (seen.id, seen.replica) == (hold.id, "replica-0")
            loop = asyncio.get_running_loop()
            decided_at = loop.time()
            await b.resolve(hold.id, "approved", by="bob", reason="r")
            resolution = await asyncio.wait_for(waiter, 5)
            assert resolution is not None and resolution.by == "bob"
            assert loop.time() - decided_at < 0.5  # pushed, not polled
            # A retry through the other replica joins the same approval.
            again = await a.hold(request(), dedupe="x", timeout=30)
            joined = await b.hold(request(), dedupe="x", timeout=30)
            assert joined.id == again.id and not joined.created
            waiters = [asyncio.ensure_future(s.wait(h, 30)) for s, h in ((a, again), (b, joined))]
            await a.resolve(again.id, "denied", by="carol", reason="no")
            results = await asyncio.wait_for(asyncio.gather(*waiters), 5)
            assert [r.outcome for r in results if r] == ["denied", "denied"]

    run(main())


def test_a_grant_made_on_one_replica_holds_on_the_other(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with replicas(redis_server) as (a, b):
            hold = await b.hold(request(), dedupe="d", timeout=30)
            await b.resolve(hold.id, "approved", by="bob", reason="r", grant_minutes=10)
            grant = await a.grant(KEY)
            assert grant is not None and grant.approval_id == hold.id
            await a.revoke(grant.id, by="carol", reason="over")
            assert await b.grant(KEY) is None

    run(main())


def test_concurrent_decisions_from_two_replicas_decide_once(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with replicas(redis_server) as (a, b):
            for _ in range(20):
                hold = await a.hold(request(), dedupe=secrets.token_hex(4), timeout=30)
                results = await asyncio.gather(
                    a.resolve(hold.id, "approved", by="bob", reason="r"),
                    b.resolve(hold.id, "denied", by="carol", reason="r"),
                    return_exceptions=True,
                )
                won = [r for r in results if not isinstance(r, BaseException)]
                lost = [r for r in results if isinstance(r, AlreadyResolved)]
                assert len(won) == 1 and len(lost) == 1
                assert lost[0].resolution == won[0]
                await a.wait(hold, 5)

    run(main())


def test_a_limit_of_n_admits_exactly_n_across_replicas_under_concurrency(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        async with replicas(redis_server, 3) as states:
            limit = Limit("fleet", 25, 60)
            results = await asyncio.gather(
                *(states[i % 3].acquire([(limit, "alice")]) for i in range(90))
            )
            assert sum(r is None for r in results) == 25
            denied = [r for r in results if r is not None]
            assert all(r.limit_id == "fleet" and 59 < r.retry_after <= 60 for r in denied)

    run(main())


def test_pending_approvals_and_grants_survive_a_replica_restart(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        prefix = f"test:{secrets.token_hex(4)}:"
        async with replicas(redis_server, 1, prefix) as (first,):
            hold = await first.hold(request(), dedupe="d", timeout=60)
            granted = await first.hold(
                request(rule_id="g", grant_key=(*KEY[:2], "g")), dedupe="g", timeout=60
            )
            await first.resolve(granted.id, "approved", by="bob", reason="r", grant_minutes=5)
            await first.withdraw(hold)  # the replica stops: its request goes away
        async with replicas(redis_server, 1, prefix) as (restarted,):
            assert [a.id for a in await restarted.pending()] == [hold.id]
            assert await restarted.grant((*KEY[:2], "g")) is not None
            retry = await restarted.hold(request(), dedupe="d", timeout=60)
            assert retry.id == hold.id and not retry.created
            [entry] = await restarted.history()
            assert entry.approval_id == granted.id

    run(main())


def test_key_prefixes_keep_deployments_apart(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with replicas(redis_server, 1) as (one,), replicas(redis_server, 1) as (two,):
            hold = await one.hold(request(), dedupe="d", timeout=30)
            assert await two.pending() == []
            with pytest.raises(UnknownApproval):
                await two.resolve(hold.id, "approved", by="bob", reason="r")
            limit = Limit("l", 1, 60)
            assert await one.acquire([(limit, "k")]) is None
            assert await two.acquire([(limit, "k")]) is None

    run(main())


def test_orphaned_approvals_time_out_when_listed(redis_server: RedisServer) -> None:
    async def main() -> None:
        async with replicas(redis_server, 1) as (state,):
            hold = await state.hold(request(), dedupe="d", timeout=0.1)
            await state.withdraw(hold)
            await asyncio.sleep(0.2)
            assert await state.pending() == []
            approval = await state.approval(hold.id)
            assert approval is not None and approval.status == "timeout"

    run(main())


# -- passwords, TLS ---------------------------------------------------------------------------


def test_password_is_read_for_every_new_connection(tmp_path: Path) -> None:
    password = secrets.token_hex(16)
    current = {"value": password}
    with RedisServer(tmp_path / "redis", password=password) as server:

        async def main() -> None:
            state = RedisState(
                settings(server, password=lambda: current["value"]),
                "r",
                clock=__import__("time").time,
            )
            await state.start()
            try:
                assert await state.acquire([(Limit("l", 5, 60), "k")]) is None
                # Rotated on the server: new connections use the new value.
                rotated = secrets.token_hex(16)
                await state._client.config_set("requirepass", rotated)
                current["value"] = rotated
                await state._client.execute_command("CLIENT", "KILL", "TYPE", "normal")
                assert await state.acquire([(Limit("l", 5, 60), "k")]) is None
                wrong = RedisState(settings(server, password=lambda: "wrong"), "r")
                with pytest.raises(StateUnavailable) as e:
                    await wrong.acquire([(Limit("l", 5, 60), "k")])
                assert "wrong" not in str(e.value) and password not in str(e.value)
                await wrong.close()
                none = RedisState(settings(server), "r")
                with pytest.raises(StateUnavailable):
                    await none.pending()
                await none.close()
            finally:
                await state.close()

        run(main())


def test_tls_with_a_verified_server_and_a_client_certificate(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "pki", name="redis test CA")
    server_cert = ca.issue("redis")
    client_cert = ca.issue("gateway-client")
    with RedisServer(
        tmp_path / "redis", tls=server_cert, ca_file=ca.cert_file, require_client_cert=True
    ) as server:

        async def main() -> None:
            good = RedisState(
                settings(
                    server,
                    ca_file=ca.cert_file,
                    cert_file=client_cert.cert_file,
                    key_file=client_cert.key_file,
                ),
                "r",
            )
            await good.start()
            try:
                assert await good.wait_subscribed(5)
                hold = await good.hold(request(), dedupe="d", timeout=30)
                await good.resolve(hold.id, "approved", by="bob", reason="r")
            finally:
                await good.close()
            other_ca = TestCA(tmp_path / "other", name="someone else")
            untrusted = RedisState(
                settings(
                    server,
                    ca_file=other_ca.cert_file,
                    cert_file=client_cert.cert_file,
                    key_file=client_cert.key_file,
                ),
                "r",
            )
            with pytest.raises(StateUnavailable):
                await untrusted.pending()
            await untrusted.close()
            no_client_cert = RedisState(settings(server, ca_file=ca.cert_file), "r")
            with pytest.raises(StateUnavailable):
                await no_client_cert.pending()
            await no_client_cert.close()

        run(main())


# -- outages ------------------------------------------------------------------------------------


def test_an_outage_raises_state_unavailable_and_everything_recovers_by_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:

        async def main() -> None:
            async with replicas(server) as (a, b):
                hold = await a.hold(request(), dedupe="d", timeout=60)
                waiter = asyncio.ensure_future(a.wait(hold, 60))
                server.kill()
                with pytest.raises(StateUnavailable):
                    await b.acquire([(Limit("l", 5, 60), "k")])
                with pytest.raises(StateUnavailable):
                    await b.pending()
                assert not b.available
                await asyncio.to_thread(server.restart)
                # Commands reconnect at once; subscriptions renew by themselves.
                assert await b.acquire([(Limit("l", 5, 60), "k")]) is None
                assert b.available
                assert await a.wait_subscribed(10) and await b.wait_subscribed(10)
                # The approval survived (append-only file): decide it on b, a is released.
                await b.resolve(hold.id, "approved", by="bob", reason="after the outage")
                resolution = await asyncio.wait_for(waiter, 5)
                assert resolution is not None and resolution.reason == "after the outage"

        with caplog.at_level(logging.WARNING, "sluicegate.state"):
            run(main())
        assert "unavailable (ConnectionError)" in caplog.text
        assert "available again" in caplog.text
    finally:
        server.stop()


def test_decisions_published_while_a_replica_was_unsubscribed_are_not_lost(
    redis_server: RedisServer,
) -> None:
    async def main() -> None:
        async with replicas(redis_server) as (a, b):
            hold = await a.hold(request(), dedupe="d", timeout=60)
            waiter = asyncio.ensure_future(a.wait(hold, 60))
            # Cut a's subscription (as a network blip would) and decide while it is away.
            await b._client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            await b.resolve(hold.id, "approved", by="bob", reason="r")
            resolution = await asyncio.wait_for(waiter, 10)
            assert resolution is not None and resolution.outcome == "approved"

    run(main())


def test_local_fallback_keeps_a_replica_working_and_warns_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path / "redis").start()
    clock = {"now": 0.0}
    try:

        async def main() -> None:
            shared = RedisState(settings(server), "r")
            state = LocalFallback(shared, warn_every=60, monotonic=lambda: clock["now"])
            await state.start()
            try:
                limit = Limit("l", 2, 60)
                assert await state.acquire([(limit, "k")]) is None
                server.kill()
                # Per replica now: the local window starts empty.
                assert await state.acquire([(limit, "k")]) is None
                assert await state.acquire([(limit, "k")]) is None
                assert await state.acquire([(limit, "k")]) is not None
                hold = await state.hold(request(), dedupe="d", timeout=30)
                assert hold.owner is state.local
                assert [a.id for a in await state.pending()] == [hold.id]
                waiter = asyncio.ensure_future(state.wait(hold, 30))
                await state.resolve(hold.id, "approved", by="bob", reason="r", grant_minutes=5)
                assert (await asyncio.wait_for(waiter, 5)) is not None
                assert await state.grant(KEY) is not None
                clock["now"] = 61.0
                assert await state.acquire([(Limit("m", 5, 60), "k")]) is None
                await asyncio.to_thread(server.restart)
                assert await state.acquire([(Limit("m", 5, 60), "k")]) is None
                assert state.shared.available
            finally:
                await state.close()

        with caplog.at_level(logging.WARNING, "sluicegate.state"):
            run(main())
        warnings = [r for r in caplog.records if "local state" in r.getMessage()]
        assert len(warnings) == 2  # at the outage, then a minute later
    finally:
        server.stop()


def test_request_digest_separates_its_parts() -> None:
    assert request_digest("a", "bc") != request_digest("ab", "c")
    assert request_digest("a", b"x") == request_digest("a", "x")


def test_the_documented_acl_is_enough(tmp_path: Path) -> None:
    """docs/DEPLOYMENT.md's ACL user (its prefix only) can do everything the gateway does."""
    admin_password = secrets.token_hex(16)
    with RedisServer(tmp_path / "redis", password=admin_password) as server:

        async def main() -> None:
            import redis.asyncio as aioredis

            admin = aioredis.Redis.from_url(server.url, password=admin_password)
            rules = "+@read +@write +@scripting +@pubsub +ping +time +select +client|setname"
            await admin.execute_command(
                "ACL", "SETUSER", "gateway", "on", ">gw-password", "resetchannels",
                "~acl:*", "&acl:events", *rules.split(),
            )  # fmt: skip
            await admin.aclose()
            config = RedisSettings(
                url=server.url,
                username="gateway",
                password=lambda: "gw-password",
                key_prefix="acl:",
                timeout_seconds=1,
            )
            a, b = RedisState(config, "a"), RedisState(config, "b")
            for state in (a, b):
                await state.start()
                assert await state.wait_subscribed(5)
            try:
                assert await a.acquire([(Limit("l", 1, 60), "k")]) is None
                hold = await a.hold(request(), dedupe="d", timeout=30)
                waiter = asyncio.ensure_future(a.wait(hold, 30))
                await b.resolve(hold.id, "approved", by="bob", reason="r", grant_minutes=1)
                assert (await asyncio.wait_for(waiter, 5)) is not None
                assert [g.id for g in await b.grants()] == [grant_id(KEY)]
                await b.revoke(grant_id(KEY), by="bob", reason="r")
                assert len(await a.history()) == 2
                assert await a.pending() == []
                await a.publish_activity([{"flow_id": "f1"}])
                assert await b.activity(5) == [{"flow_id": "f1"}]
                await a.pin_tools("route:mcp", {"search": "sha256:1"}, {"rm": "sha256:9"})
                await b.accept_tool("route:mcp", "rm", "sha256:9")
                pins = await a.tool_pins("route:mcp")
                assert pins.pinned == {"search": "sha256:1", "rm": "sha256:9"} and not pins.changed
            finally:
                await a.close()
                await b.close()

        run(main())


# -- activity feed ------------------------------------------------------------------------------


def test_activity_is_shared_newest_first_bounded_and_announced(backend: Factory) -> None:
    async def main() -> None:
        async with backend("r1") as one, backend("r2") as two:
            # Redis: every replica hears of it; memory: this process only.
            subscription = (two if one.kind == "redis" else one).subscribe()
            await one.publish_activity([{"flow_id": "a", "n": 1}, {"flow_id": "b", "n": 2}])
            event = await subscription.get(5)
            assert event is not None and event.kind == "activity"
            subscription.close()
            mine = await one.activity(10)
            assert [e["flow_id"] for e in mine] == ["b", "a"]
            if one.kind == "redis":  # every replica's flows, from any replica
                assert [e["flow_id"] for e in await two.activity(10)] == ["b", "a"]
            await one.publish_activity([{"flow_id": str(i)} for i in range(ACTIVITY_SIZE + 5)])
            everything = await one.activity(ACTIVITY_SIZE * 2)
            assert len(everything) == ACTIVITY_SIZE
            assert everything[0]["flow_id"] == str(ACTIVITY_SIZE + 4)
            assert await one.activity(0) == []

    run(main())


def test_activity_falls_back_to_local_memory(redis_server: RedisServer) -> None:
    async def main() -> None:
        down = RedisSettings(url="redis://127.0.0.1:1/0", key_prefix="x:", timeout_seconds=0.2)
        state = LocalFallback(RedisState(down, "r1"), MemoryState("r1"))
        await state.start()
        try:
            await state.publish_activity([{"flow_id": "local", "time": "2026"}])
            assert [e["flow_id"] for e in await state.activity(5)] == ["local"]
        finally:
            await state.close()

    run(main())


# -- MCP tool pins ---------------------------------------------------------------------------


def test_tool_pins_trust_the_first_definition_until_an_approver_accepts_another(
    backend: Factory,
) -> None:
    async def main() -> None:
        async with backend("r1") as one, backend("r2") as two:
            scope = f"route:mcp-{secrets.token_hex(3)}"
            assert (await one.tool_pins(scope)).pinned == {}
            pins = await one.pin_tools(scope, {"search": "sha256:a", "read": "sha256:b"})
            assert pins.pinned == {"search": "sha256:a", "read": "sha256:b"}
            # A later (or racing) first sight never replaces a pin.
            again = await two.pin_tools(scope, {"search": "sha256:EVIL"}, {"search": "sha256:EVIL"})
            if one.kind == "redis":  # shared by every replica
                assert again.pinned["search"] == "sha256:a"
                assert again.changed == {"search": "sha256:EVIL"}
            seen = await one.tool_pins(scope)
            if one.kind == "memory":
                await one.pin_tools(scope, {}, {"search": "sha256:EVIL"})
                seen = await one.tool_pins(scope)
            assert seen.changed == {"search": "sha256:EVIL"}
            await one.accept_tool(scope, "search", "sha256:EVIL")
            accepted = await (two if one.kind == "redis" else one).tool_pins(scope)
            assert accepted.pinned["search"] == "sha256:EVIL" and accepted.changed == {}
            # Another destination is another scope.
            assert (await one.tool_pins(scope + "x")).pinned == {}

    run(main())
