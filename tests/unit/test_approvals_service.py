"""The approvals service over the shared state: one approval and one notice however often a
request is retried, withdrawal with a grace period for retries, expiry, decisions."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from sluicegate.approvals.payloads import Notice
from sluicegate.approvals.service import Approvals
from sluicegate.state import ApprovalRequest, MemoryState, RedisSettings, RedisState
from tests.support.redis_server import RedisServer

T = TypeVar("T")
REQUEST = ApprovalRequest(
    request_id="req-1",
    rule_id="deletes",
    message="Deleting needs a human.",
    phase="request",
    subject="alice",
    issuer="https://idp",
    groups=("agents",),
    route="openai",
    host="api.openai.com",
    port=443,
    method="DELETE",
    path="/v1/files/x",
    grant_key=("https://idp|alice", "route:openai", "deletes"),
)


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def service(state: object, grace: float = 0.2) -> tuple[Approvals, list[Notice]]:
    notices: list[Notice] = []
    approvals = Approvals(
        state,  # type: ignore[arg-type]
        notifier=notices.append,
        link_template="https://console.example/approvals/{id}",
        retry_grace_seconds=grace,
    )
    return approvals, notices


async def until(predicate: object, timeout: float = 5) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)


def test_retries_after_disconnects_make_one_approval_and_one_notice() -> None:
    async def main() -> None:
        state = MemoryState()
        approvals, notices = service(state, grace=5)
        first = asyncio.ensure_future(
            approvals.hold(REQUEST, dedupe="d", timeout=30, client_id="c1")
        )
        await until(lambda: notices)
        assert approvals.cancel_client("c1") == 1
        cancelled = await first
        assert cancelled.outcome == "cancelled"
        retry = asyncio.ensure_future(
            approvals.hold(REQUEST, dedupe="d", timeout=30, client_id="c2")
        )
        await until(lambda: state.waiting_here)
        [pending] = await state.pending()
        assert pending.attempts == 2
        await approvals.decide(pending.id, approve=True, by="bob", reason="ok")
        assert (await retry).outcome == "approved"
        assert [n.event for n in notices] == ["approval_pending", "approval_approved"]
        assert notices[0].link == f"https://console.example/approvals/{pending.id}"

    run(main())


def test_a_withdrawn_request_not_retried_is_cancelled_and_announced() -> None:
    async def main() -> None:
        state = MemoryState()
        approvals, notices = service(state, grace=0.1)
        held = asyncio.ensure_future(approvals.hold(REQUEST, dedupe="d", timeout=30, client_id="c"))
        await until(lambda: notices)
        approvals.cancel_client("c")
        await held
        await until(lambda: len(notices) == 2)
        assert notices[1].event == "approval_cancelled"
        assert "not retried within 0.1 seconds" in (notices[1].resolution.reason or "")  # type: ignore[union-attr]
        assert await state.pending() == []

    run(main())


def test_expiry_is_announced_once_and_says_what_the_agent_got() -> None:
    async def main() -> None:
        state = MemoryState()
        approvals, notices = service(state)
        resolution = await approvals.hold(REQUEST, dedupe="d", timeout=0.1)
        assert resolution.outcome == "timeout"
        assert resolution.reason == "no approver decided within 0.1 seconds"
        assert [n.event for n in notices] == ["approval_pending", "approval_expired"]
        assert "403 approval_timeout" in notices[1].agent

    run(main())


def test_joined_requests_on_two_replicas_expire_with_one_notice(tmp_path: object) -> None:
    with RedisServer(tmp_path / "redis") as server:  # type: ignore[operator]

        async def main() -> None:
            settings = RedisSettings(url=server.url, key_prefix="svc:", timeout_seconds=1)
            a, b = RedisState(settings, "a"), RedisState(settings, "b")
            for s in (a, b):
                await s.start()
                assert await s.wait_subscribed(5)
            try:
                on_a, notices_a = service(a)
                on_b, notices_b = service(b)
                results = await asyncio.gather(
                    on_a.hold(REQUEST, dedupe="d", timeout=0.5),
                    on_b.hold(REQUEST, dedupe="d", timeout=0.5),
                )
                assert [r.outcome for r in results] == ["timeout", "timeout"]
                events = [n.event for n in notices_a + notices_b]
                assert events.count("approval_pending") == 1
                assert events.count("approval_expired") == 1
            finally:
                await a.close()
                await b.close()

        run(main())
