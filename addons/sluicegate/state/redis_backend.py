"""The Redis backend: one state for every replica of a deployment.

Every change is one Lua script, so it is atomic however many replicas race (two approvers on two
replicas cannot both decide; N replicas admit exactly `requests` per window). Replicas learn of
decisions through pub/sub (one subscription per replica, `<prefix>events`): the replica holding a
request releases it as soon as the message arrives. Messages published while a replica was
disconnected are not replayed by Redis, so after every (re)subscription the replica re-reads the
approvals its requests wait for. Nothing polls.

Keys (all under the deployment's `key_prefix`):

    a:<id>        hash    an approval: request, times, replica, attempts, waiting, state,
                          resolution, claimable; expires `retention` after the approval
    pending       zset    ids of pending approvals by creation time
    d:<digest>    string  the approval a held request (caller, route, method, path, body) joins
    gk:<grant>    set     pending approvals a grant of that (identity, destination, rule) covers
    g:<grant>     string  an active grant (JSON), expiring with it
    grants        zset    active grant ids by expiry
    history       stream  decisions and revocations (capped, approximately `history_size`)
    activity      list    recently finished flows (JSON summaries, newest first, ACTIVITY_SIZE)
    rl:<limit>:<key-digest>  zset  sliding-window log of admitted requests (microseconds)
    mcp:<scope>   hash    MCP tool pins of a destination: `pin:<tool>` and `new:<tool>`
                          (a changed definition no approver accepted yet) -> fingerprint
    events        channel changes, JSON (`StateEvent.to_wire`)

Rate limits use Redis' clock (`TIME`), so replicas with skewed clocks count one window.
Redis Cluster is not supported (scripts build key names); use one primary (with replicas,
Sentinel or a managed service in front).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import secrets
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from sluicegate.policy.ratelimit import Denied
from sluicegate.state.base import (
    ACTIVITY_SIZE,
    AlreadyResolved,
    Hold,
    LimitLike,
    SharedState,
    StateUnavailable,
    StillWaiting,
    ToolPins,
    UnknownApproval,
    UnknownGrant,
)
from sluicegate.state.model import (
    Approval,
    ApprovalRequest,
    Grant,
    GrantKey,
    HistoryEntry,
    Outcome,
    Resolution,
    StateEvent,
    grant_id,
)

logger = logging.getLogger("sluicegate.state")

# Approvals (pending or decided) are kept this long past their expiry, for look-ups by id.
RETENTION_SECONDS = 3600
# A pending approval this long past its expiry has lost its holder (a replica that crashed).
ORPHAN_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class RedisSettings:
    """How to reach Redis. `password` is called for every new connection (rotation)."""

    url: str  # redis://[user@]host:port/db or rediss://...
    password: Callable[[], str | None] | None = None
    username: str | None = None
    tls: bool = False  # also implied by a rediss:// URL
    ca_file: Path | None = None  # verify the server with this CA (else the system's)
    cert_file: Path | None = None  # client certificate (mutual TLS)
    key_file: Path | None = None
    key_prefix: str = "sluicegate:"
    timeout_seconds: float = 2.0
    history_size: int = 10_000

    def describe(self) -> str:
        """host:port/db and TLS, never credentials."""
        parts = urllib.parse.urlsplit(self.url)
        tls = " (TLS)" if self.tls or parts.scheme == "rediss" else ""
        return f"{parts.hostname}:{parts.port or 6379}{parts.path or ''}{tls}"


class _Credentials(CredentialProvider):
    def __init__(self, username: str | None, password: Callable[[], str | None]) -> None:
        self.username = username
        self.password = password

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        try:
            password = self.password() or ""
        except Exception:  # an unreadable secret: the store is unavailable, nothing else
            raise RedisConnectionError("the Redis password is unavailable") from None
        return (self.username, password) if self.username else (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


_PRELUDE = """
local P = ARGV[1]
local HISTORY = ARGV[2]
local REPLICA = ARGV[3]
local NOW = tonumber(ARGV[4])
local function event(kind, id, extra)
  local msg = '{"kind":"' .. kind .. '","approval_id":' .. cjson.encode(id)
  if extra then msg = msg .. extra end
  redis.call('PUBLISH', P .. 'events', msg .. ',"replica":' .. cjson.encode(REPLICA) .. '}')
end
local function finish(id, akey, outcome, res_json, claimable)
  local f = redis.call('HMGET', akey, 'dedupe', 'gid', 'request')
  redis.call('HSET', akey, 'state', outcome, 'resolution', res_json, 'claimable', claimable)
  local dkey = P .. 'd:' .. f[1]
  if claimable ~= '1' and redis.call('GET', dkey) == id then redis.call('DEL', dkey) end
  redis.call('ZREM', P .. 'pending', id)
  redis.call('SREM', P .. 'gk:' .. f[2], id)
  redis.call('XADD', P .. 'history', 'MAXLEN', '~', HISTORY, '*',
    'kind', 'decision', 'resolution', res_json, 'request', f[3])
  event('approval_resolved', id, ',"resolution":' .. res_json)
end
"""

_HOLD = (
    _PRELUDE
    + """
local dedupe, new_id, expires, request, gid = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local retention = tonumber(ARGV[10])
local dkey = P .. 'd:' .. dedupe
local function reply(status, id)
  local f = redis.call('HMGET', P .. 'a:' .. id, 'request', 'created', 'expires', 'replica',
    'attempts', 'waiting', 'state', 'resolution')
  return {status, id, f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8] or ''}
end
local existing = redis.call('GET', dkey)
if existing then
  local akey = P .. 'a:' .. existing
  local st = redis.call('HMGET', akey, 'state', 'expires', 'claimable')
  if st[1] == 'pending' then
    if tonumber(st[2]) > NOW then
      redis.call('HINCRBY', akey, 'attempts', 1)
      redis.call('HINCRBY', akey, 'waiting', 1)
      event('approval_joined', existing)
      return reply('joined', existing)
    end
    finish(existing, akey, 'timeout', cjson.encode({approval_id = existing,
      outcome = 'timeout', at = NOW, reason = 'expired'}), '0')
  elseif st[1] == 'approved' and st[3] == '1' and tonumber(st[2]) > NOW then
    redis.call('HSET', akey, 'claimable', '0')
    redis.call('HINCRBY', akey, 'attempts', 1)
    redis.call('DEL', dkey)
    return reply('claimed', existing)
  end
end
local akey = P .. 'a:' .. new_id
if redis.call('EXISTS', akey) == 1 then return {'collision'} end
redis.call('HSET', akey, 'request', request, 'created', ARGV[4], 'expires', expires,
  'replica', REPLICA, 'attempts', 1, 'waiting', 1, 'state', 'pending', 'dedupe', dedupe,
  'gid', gid, 'claimable', '0')
local keep = math.floor((tonumber(expires) + retention) * 1000)
redis.call('PEXPIREAT', akey, keep)
redis.call('ZADD', P .. 'pending', ARGV[4], new_id)
redis.call('SET', dkey, new_id)
redis.call('PEXPIREAT', dkey, keep)
local gk = P .. 'gk:' .. gid
redis.call('SADD', gk, new_id)
local want = keep - math.floor(NOW * 1000)
if redis.call('PTTL', gk) < want then redis.call('PEXPIRE', gk, want) end
event('approval_pending', new_id)
return reply('created', new_id)
"""
)

_WITHDRAW = (
    _PRELUDE
    + """
local akey = P .. 'a:' .. ARGV[5]
local st = redis.call('HMGET', akey, 'state', 'waiting')
if st[1] ~= 'pending' then return -1 end
local waiting = tonumber(st[2]) - 1
if waiting < 0 then waiting = 0 end
redis.call('HSET', akey, 'waiting', waiting)
event('approval_withdrawn', ARGV[5])
return waiting
"""
)

_RESOLVE = (
    _PRELUDE
    + """
local id, outcome, by, reason, minutes = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local akey = P .. 'a:' .. id
local st = redis.call('HMGET', akey, 'state', 'waiting', 'request', 'gid', 'resolution')
if not st[1] then return {'unknown'} end
if st[1] ~= 'pending' then return {'already', st[5]} end
if ARGV[10] == '1' and tonumber(st[2]) > 0 then return {'waiting'} end
local res = {approval_id = id, outcome = outcome, at = NOW, reason = reason}
if by ~= '' then res.by = by end
local granting = outcome == 'approved' and minutes ~= ''
if granting then res.grant_minutes = tonumber(minutes) end
local res_json = cjson.encode(res)
local claimable = '0'
if outcome == 'approved' and tonumber(st[2]) == 0 then claimable = '1' end
finish(id, akey, outcome, res_json, claimable)
if granting then
  local gid = st[4]
  local key = cjson.decode(st[3]).grant_key
  local expires = NOW + tonumber(minutes) * 60
  local grant = cjson.encode({key = key, approval_id = id, by = by, reason = reason,
    created_at = NOW, expires_at = expires})
  local gkey = P .. 'g:' .. gid
  redis.call('SET', gkey, grant)
  redis.call('PEXPIREAT', gkey, math.floor(expires * 1000))
  redis.call('ZADD', P .. 'grants', expires, gid)
  event('grant_created', id, ',"grant_id":"' .. gid .. '"')
  for _, other in ipairs(redis.call('SMEMBERS', P .. 'gk:' .. gid)) do
    local okey = P .. 'a:' .. other
    local ost = redis.call('HMGET', okey, 'state', 'waiting')
    if ost[1] == 'pending' then
      local covered = {approval_id = other, outcome = 'approved', at = NOW,
        reason = 'covered by the grant of approval ' .. id}
      if by ~= '' then covered.by = by end
      local oc = '0'
      if tonumber(ost[2]) == 0 then oc = '1' end
      finish(other, okey, 'approved', cjson.encode(covered), oc)
    end
  end
end
return {'resolved', res_json}
"""
)

_REVOKE = (
    _PRELUDE
    + """
local gid = ARGV[5]
local gkey = P .. 'g:' .. gid
local grant = redis.call('GET', gkey)
redis.call('ZREM', P .. 'grants', gid)
if not grant then return false end
redis.call('DEL', gkey)
redis.call('XADD', P .. 'history', 'MAXLEN', '~', HISTORY, '*', 'kind', 'revocation',
  'grant', grant, 'by', ARGV[6], 'reason', ARGV[7], 'at', ARGV[4])
event('grant_revoked', cjson.decode(grant).approval_id, ',"grant_id":"' .. gid .. '"')
return grant
"""
)

# KEYS: one sliding-window log per (limit, key); ARGV: member, then requests and window (µs)
# per key. Admits all or nothing; a denial returns the 1-based index of the limit that makes
# the caller wait longest and that wait in microseconds.
_ACQUIRE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local worst, worst_wait = 0, -1
for i, key in ipairs(KEYS) do
  local requests = tonumber(ARGV[2 * i])
  local window = tonumber(ARGV[2 * i + 1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  local count = redis.call('ZCARD', key)
  if count >= requests then
    local oldest = redis.call('ZRANGE', key, count - requests, count - requests, 'WITHSCORES')
    local wait = tonumber(oldest[2]) + window - now
    if wait > worst_wait then worst, worst_wait = i, wait end
  end
end
if worst > 0 then
  if worst_wait < 0 then worst_wait = 0 end
  return {worst, worst_wait}
end
for i, key in ipairs(KEYS) do
  local window = tonumber(ARGV[2 * i + 1])
  redis.call('ZADD', key, now, ARGV[1])
  redis.call('PEXPIRE', key, math.ceil(window / 1000) + 1000)
end
return {0, 0}
"""


class RedisState(SharedState):
    kind = "redis"
    durable = True

    def __init__(
        self,
        settings: RedisSettings,
        replica: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(replica)
        self.settings = settings
        self._clock = clock
        self._prefix = settings.key_prefix
        self._channel = f"{self._prefix}events"
        self._client = self._make_client(settings.timeout_seconds, retries=1)
        # Pub/sub blocks reading: no read timeout; errors end the subscription, which the
        # listener then renews (and re-reads what it may have missed).
        self._sub_client = self._make_client(None, retries=0)
        self._scripts = {
            name: self._client.register_script(text)
            for name, text in (
                ("hold", _HOLD),
                ("withdraw", _WITHDRAW),
                ("resolve", _RESOLVE),
                ("revoke", _REVOKE),
                ("acquire", _ACQUIRE),
            )
        }
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._available = True
        self._last_error = ""
        self._closing = False
        # Resolutions seen on the channel lately: a hold registered just after its decision
        # was published finds it here.
        self._recent: collections.OrderedDict[str, Resolution] = collections.OrderedDict()

    def _make_client(self, timeout: float | None, retries: int) -> aioredis.Redis:
        s = self.settings
        parts = urllib.parse.urlsplit(s.url)
        tls = s.tls or parts.scheme == "rediss"
        username = s.username or (urllib.parse.unquote(parts.username) if parts.username else None)
        url_password = urllib.parse.unquote(parts.password) if parts.password else None
        netloc = parts.hostname or "localhost"
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port:
            netloc += f":{parts.port}"
        url = urllib.parse.urlunsplit(
            ("rediss" if tls else "redis", netloc, parts.path, parts.query, "")
        )
        password = s.password or (lambda: url_password)
        kwargs: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": timeout,
            "socket_connect_timeout": s.timeout_seconds,
            "socket_keepalive": True,
            "retry": Retry(NoBackoff(), retries),
            "client_name": "sluicegate",
        }
        if username or s.password or url_password:
            kwargs["credential_provider"] = _Credentials(username, password)
        if tls:
            kwargs.update(
                ssl_cert_reqs="required",
                ssl_check_hostname=True,
                ssl_ca_certs=str(s.ca_file) if s.ca_file else None,
                ssl_certfile=str(s.cert_file) if s.cert_file else None,
                ssl_keyfile=str(s.key_file) if s.key_file else None,
            )
        return aioredis.Redis.from_url(url, **kwargs)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._listener = asyncio.get_running_loop().create_task(self._listen())
        # Down is logged; requests needing state are handled by the caller's policy.
        with contextlib.suppress(StateUnavailable):
            await self._call(self._client.ping())

    async def wait_subscribed(self, timeout: float) -> bool:
        """Until this replica receives changes (tests and start-up checks)."""
        try:
            await asyncio.wait_for(self._subscribed.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        self._closing = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        for client in (self._client, self._sub_client):
            with contextlib.suppress(Exception):
                await client.aclose()
        await super().close()

    @property
    def available(self) -> bool:
        return self._available

    def _down(self, error: BaseException) -> StateUnavailable:
        reason = type(error).__name__
        if isinstance(error, RedisConnectionError) and "auth" in str(error).lower():
            reason = "authentication failed"
        if self._available or reason != self._last_error:
            logger.error("sluicegate: state: Redis %s unavailable (%s)", self._where, reason)
        self._available = False
        self._last_error = reason
        self._subscribed.clear()
        return StateUnavailable(f"shared state (Redis) unavailable: {reason}")

    def _up(self) -> None:
        if not self._available:
            logger.warning("sluicegate: state: Redis %s available again", self._where)
        self._available = True
        self._last_error = ""

    @property
    def _where(self) -> str:
        return self.settings.describe()

    async def _call(self, awaitable: Any) -> Any:
        try:
            result = await awaitable
        except (RedisError, OSError) as e:
            raise self._down(e) from None
        self._up()
        return result

    def _args(self, *rest: Any) -> list[Any]:
        return [
            self._prefix,
            self.settings.history_size,
            self.replica,
            repr(self._clock()),
            *rest,
        ]

    # -- the listener ---------------------------------------------------------------------------

    async def _listen(self) -> None:
        backoff = 0.05
        while not self._closing:
            pubsub = self._sub_client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                self._up()
                self._subscribed.set()
                backoff = 0.05
                await self._resync()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._on_message(message["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                if not self._closing:
                    self._down(e)
            except Exception:  # a bug here must not end the subscription for good
                logger.exception("sluicegate: state: listener failed; resubscribing")
            finally:
                self._subscribed.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            if self._closing:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _on_message(self, data: str) -> None:
        try:
            event = StateEvent.from_wire(data)
        except (ValueError, KeyError, TypeError):
            logger.warning("sluicegate: state: ignored a malformed event")
            return
        if event.resolution is not None:
            self._recent[event.resolution.approval_id] = event.resolution
            while len(self._recent) > 1000:
                self._recent.popitem(last=False)
        self._emit(event)

    async def _resync(self) -> None:
        """Deliver decisions this replica's holds may have missed while unsubscribed."""
        ids = list(self._holds)
        if not ids:
            return
        pipe = self._client.pipeline(transaction=False)
        for approval_id in ids:
            pipe.hmget(self._key("a", approval_id), "state", "resolution")
        rows = await pipe.execute()
        for approval_id, (state, resolution) in zip(ids, rows, strict=True):
            if state is None:
                resolution_obj = Resolution(
                    approval_id, "cancelled", self._clock(), reason="the approval was lost"
                )
                self._release(resolution_obj)
            elif state != "pending" and resolution:
                self._release(Resolution.from_record(json.loads(resolution)))

    def _key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    # -- rate limits ----------------------------------------------------------------------------

    async def acquire(self, hits: Sequence[tuple[LimitLike, str]]) -> Denied | None:
        if not hits:
            return None
        keys: list[str] = []
        args: list[Any] = [secrets.token_hex(8)]
        for limit, key in hits:
            digest = hashlib.sha256(key.encode()).hexdigest()[:32]
            keys.append(self._key("rl", limit.id, digest))
            args += [limit.requests, max(1, round(limit.window_seconds * 1_000_000))]
        index, wait_us = await self._call(self._scripts["acquire"](keys=keys, args=args))
        if int(index) == 0:
            return None
        limit = hits[int(index) - 1][0]
        return Denied(limit.id, int(wait_us) / 1_000_000)

    # -- approvals ----------------------------------------------------------------------------

    async def hold(self, request: ApprovalRequest, *, dedupe: str, timeout: float) -> Hold:
        record = json.dumps(request.to_record(), separators=(",", ":"))
        gid = grant_id(request.grant_key)
        for _ in range(5):
            expires = self._clock() + timeout
            reply = await self._call(
                self._scripts["hold"](
                    args=self._args(
                        dedupe,
                        secrets.token_hex(4),
                        repr(expires),
                        record,
                        gid,
                        RETENTION_SECONDS,
                    )
                )
            )
            if reply[0] != "collision":
                break
        else:
            raise StateUnavailable("could not allocate an approval id")
        status, approval_id = reply[0], reply[1]
        approval = _approval(approval_id, reply[2:])
        if status == "claimed":
            assert approval.resolution is not None
            return Hold(self, approval, created=False, claimed=approval.resolution)
        hold = Hold(self, approval, created=status == "created")
        self._register(hold)
        recent = self._recent.get(approval_id)
        if recent is not None:
            self._release(recent)
        return hold

    async def withdraw(self, hold: Hold) -> bool:
        if hold.withdrawn:
            return False
        hold.withdrawn = True
        self._unregister(hold)
        waiting = await self._call(self._scripts["withdraw"](args=self._args(hold.id)))
        return int(waiting) == 0

    async def resolve(
        self,
        approval_id: str,
        outcome: Outcome,
        *,
        by: str | None = None,
        reason: str = "",
        grant_minutes: float | None = None,
        only_if_abandoned: bool = False,
    ) -> Resolution:
        minutes = repr(float(grant_minutes)) if grant_minutes and outcome == "approved" else ""
        reply = await self._call(
            self._scripts["resolve"](
                args=self._args(
                    approval_id,
                    outcome,
                    by or "",
                    reason,
                    minutes,
                    "1" if only_if_abandoned else "0",
                )
            )
        )
        status = reply[0]
        if status == "unknown":
            raise UnknownApproval(approval_id)
        if status == "waiting":
            raise StillWaiting(approval_id)
        resolution = Resolution.from_record(json.loads(reply[1]))
        if status == "already":
            raise AlreadyResolved(resolution)
        # Our own holds learn it from the channel too; releasing here is faster and idempotent.
        self._release(resolution)
        return resolution

    async def pending(self) -> list[Approval]:
        ids = await self._call(self._client.zrange(self._key("pending"), 0, -1))
        approvals = await self._approvals(ids)
        now = self._clock()
        result: list[Approval] = []
        for approval_id, approval in zip(ids, approvals, strict=True):
            if approval is None:  # expired with its retention: its holder is long gone
                await self._call(self._client.zrem(self._key("pending"), approval_id))
                continue
            abandoned = approval.waiting == 0 and approval.expires_at <= now
            if abandoned or approval.expires_at + ORPHAN_SECONDS <= now:
                with contextlib.suppress(AlreadyResolved, UnknownApproval, StillWaiting):
                    await self.resolve(
                        approval.id, "timeout", reason="expired with no request waiting"
                    )
                continue
            if approval.resolution is None:
                result.append(approval)
        return result

    async def approval(self, approval_id: str) -> Approval | None:
        return (await self._approvals([approval_id]))[0]

    async def _approvals(self, ids: Sequence[str]) -> list[Approval | None]:
        if not ids:
            return []
        pipe = self._client.pipeline(transaction=False)
        for approval_id in ids:
            pipe.hmget(
                self._key("a", approval_id),
                "request",
                "created",
                "expires",
                "replica",
                "attempts",
                "waiting",
                "state",
                "resolution",
            )
        rows = await self._call(pipe.execute())
        return [
            None if row[0] is None else _approval(approval_id, row)
            for approval_id, row in zip(ids, rows, strict=True)
        ]

    async def history(self, limit: int = 100) -> list[HistoryEntry]:
        if limit <= 0:
            return []
        rows = await self._call(self._client.xrevrange(self._key("history"), count=limit))
        entries: list[HistoryEntry] = []
        for _id, fields in rows:
            try:
                entries.append(_history_entry(fields))
            except (ValueError, KeyError, TypeError):
                logger.warning("sluicegate: state: skipped a malformed history entry")
        return entries

    # -- activity ----------------------------------------------------------------------------

    async def publish_activity(self, entries: Sequence[Any]) -> None:
        if not entries:
            return
        key = self._key("activity")
        # No MULTI (not in the documented ACL): a trim racing another replica's push is harmless.
        pipe = self._client.pipeline(transaction=False)
        pipe.lpush(key, *(json.dumps(e, separators=(",", ":")) for e in entries))
        pipe.ltrim(key, 0, ACTIVITY_SIZE - 1)
        pipe.publish(self._channel, StateEvent("activity", replica=self.replica).to_wire())
        await self._call(pipe.execute())

    async def activity(self, limit: int = 200) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        raws = await self._call(self._client.lrange(self._key("activity"), 0, limit - 1))
        entries: list[dict[str, Any]] = []
        for raw in raws:
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    # -- MCP tool pins ----------------------------------------------------------------------------

    async def tool_pins(self, scope: str) -> ToolPins:
        raw = await self._call(self._client.hgetall(self._key("mcp", scope)))
        return _tool_pins(raw)

    async def pin_tools(
        self, scope: str, seen: Mapping[str, str], changed: Mapping[str, str] = {}
    ) -> ToolPins:
        key = self._key("mcp", scope)
        # HSETNX per tool: the first definition any replica saw stays the pin.
        pipe = self._client.pipeline(transaction=False)
        for tool, fingerprint in seen.items():
            pipe.hsetnx(key, f"pin:{tool}", fingerprint)
        for tool, fingerprint in changed.items():
            pipe.hset(key, f"new:{tool}", fingerprint)
        pipe.hgetall(key)
        results = await self._call(pipe.execute())
        return _tool_pins(results[-1])

    async def accept_tool(self, scope: str, tool: str, fingerprint: str) -> None:
        key = self._key("mcp", scope)
        pipe = self._client.pipeline(transaction=False)
        pipe.hset(key, f"pin:{tool}", fingerprint)
        pipe.hdel(key, f"new:{tool}")
        await self._call(pipe.execute())

    # -- grants -------------------------------------------------------------------------------

    async def grant(self, key: GrantKey) -> Grant | None:
        raw = await self._call(self._client.get(self._key("g", grant_id(key))))
        return self._live_grant(raw)

    def _live_grant(self, raw: str | None) -> Grant | None:
        if raw is None:
            return None
        grant = Grant.from_record(json.loads(raw))
        return grant if grant.expires_at > self._clock() else None

    async def granted(self, identity: str, destination: str, rules: Iterable[str]) -> list[str]:
        rules = list(rules)
        if not rules:
            return []
        keys = [self._key("g", grant_id((identity, destination, r))) for r in rules]
        raws = await self._call(self._client.mget(keys))
        return [r for r, raw in zip(rules, raws, strict=True) if self._live_grant(raw)]

    async def grants(self) -> list[Grant]:
        now = self._clock()
        index = self._key("grants")
        await self._call(self._client.zremrangebyscore(index, "-inf", now))
        ids = await self._call(self._client.zrange(index, 0, -1))
        if not ids:
            return []
        raws = await self._call(self._client.mget([self._key("g", gid) for gid in ids]))
        return [g for g in (self._live_grant(raw) for raw in raws) if g is not None]

    async def revoke(self, grant_id: str, *, by: str, reason: str) -> Grant:
        raw = await self._call(self._scripts["revoke"](args=self._args(grant_id, by, reason)))
        grant = self._live_grant(raw) if raw else None
        if grant is None:
            raise UnknownGrant(grant_id)
        return grant


def _tool_pins(raw: Mapping[str, str]) -> ToolPins:
    pinned = {k[4:]: v for k, v in raw.items() if k.startswith("pin:")}
    changed = {k[4:]: v for k, v in raw.items() if k.startswith("new:") and pinned.get(k[4:]) != v}
    return ToolPins(pinned, changed)


def _approval(approval_id: str, fields: Sequence[Any]) -> Approval:
    request, created, expires, replica, attempts, waiting, state, resolution = fields[:8]
    return Approval(
        id=approval_id,
        request=ApprovalRequest.from_record(json.loads(request)),
        created_at=float(created),
        expires_at=float(expires),
        replica=str(replica),
        attempts=int(attempts),
        waiting=int(waiting),
        resolution=(
            Resolution.from_record(json.loads(resolution))
            if state != "pending" and resolution
            else None
        ),
    )


def _history_entry(fields: dict[str, str]) -> HistoryEntry:
    if fields["kind"] == "decision":
        return HistoryEntry.decision(
            Resolution.from_record(json.loads(fields["resolution"])),
            ApprovalRequest.from_record(json.loads(fields["request"])),
        )
    grant = Grant.from_record(json.loads(fields["grant"]))
    at = float(fields["at"])
    at = at if math.isfinite(at) else 0.0
    return HistoryEntry.revocation(grant, at, fields["by"], fields["reason"])
