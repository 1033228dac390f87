"""The Lua scripts that change a job's state atomically. All run with `allow-oom`: when Redis is full
(`maxmemory`, `noeviction`), answering and acknowledging jobs, the only thing that frees memory, must still
work, and so must heartbeats (else every worker would look dead and be reclaimed). New jobs are the only
writes refused then (XADD by the front-ends), which the clients see as a 503 that names memory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

FINISH = """#!lua flags=allow-oom
-- KEYS: job stream, reply stream, result key, extra stream (a requeue into the job stream, or dead letters),
--       answered marker, kept-answers expiry (sorted set), kept-answers bytes (hash)
-- ARGV: group, consumer, entry id, xackdel, reply ttl, reply maxlen, result ttl, n reply items, n extra items,
--       extra maxlen, extra ttl, answer budget (bytes), job id, then the reply's field/value items, then the
--       extra entry's
-- Returns {0, total} when this consumer no longer owns the entry: a job reclaimed from a hung worker that wakes
-- up again is answered once, by its new owner; the late answer is dropped here. Else {1, total}, or {2, total}
-- when the answer was to be kept for a retry but the budget was full; total is the kept answers' bytes.
local owned = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #owned == 0 then return {0, 0} end
if ARGV[4] == '1' then
  redis.call('XACKDEL', KEYS[1], ARGV[1], 'IDS', 1, ARGV[3])
else
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
  redis.call('XDEL', KEYS[1], ARGV[3])
end
local n_reply, n_extra = tonumber(ARGV[8]), tonumber(ARGV[9])
local first = 14
local status, total = 1, 0
if n_reply > 0 then
  local reply = {}
  local size = 1024
  for i = first, first + n_reply - 1 do
    reply[#reply + 1] = ARGV[i]
    size = size + #ARGV[i]
  end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', unpack(reply))
  redis.call('EXPIRE', KEYS[2], ARGV[5])
  local ttl = tonumber(ARGV[7])
  if ttl > 0 then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    -- Release the bytes of kept answers that have expired (or were shortened to their grace and passed it).
    local gone = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now, 'LIMIT', 0, 1000)
    for _, id in ipairs(gone) do
      redis.call('HINCRBY', KEYS[7], '_total', -tonumber(redis.call('HGET', KEYS[7], id) or '0'))
      redis.call('HDEL', KEYS[7], id)
    end
    if #gone > 0 then redis.call('ZREM', KEYS[6], unpack(gone)) end
    redis.call('SET', KEYS[5], '1', 'EX', ttl)
    total = tonumber(redis.call('HGET', KEYS[7], '_total') or '0')
    if total + size <= tonumber(ARGV[12]) then
      redis.call('DEL', KEYS[3])
      redis.call('HSET', KEYS[3], unpack(reply))
      redis.call('EXPIRE', KEYS[3], ttl)
      redis.call('ZADD', KEYS[6], now + ttl * 1000, ARGV[13])
      redis.call('HSET', KEYS[7], ARGV[13], size)
      total = redis.call('HINCRBY', KEYS[7], '_total', size)
      -- The index outlives every answer it counts; it goes when keyed traffic stops.
      redis.call('EXPIRE', KEYS[6], ttl + 60)
      redis.call('EXPIRE', KEYS[7], ttl + 60)
    else
      status = 2
    end
  end
end
if n_extra > 0 then
  local extra = {}
  for i = first + n_reply, first + n_reply + n_extra - 1 do extra[#extra + 1] = ARGV[i] end
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[10], '*', unpack(extra))
  if tonumber(ARGV[11]) > 0 then redis.call('EXPIRE', KEYS[4], ARGV[11]) end
end
return {status, total}
"""

DELIVERED = """#!lua flags=allow-oom
-- KEYS: result key, answered marker, Idempotency-Key, kept-answers expiry; ARGV: grace (ms), job id
-- A keyed answer reached its waiting client: keep it (and its key) only the grace a retry after an answer lost
-- in transit needs. Never lengthens a lifetime; the key is left alone if it names another job by now.
local ms = tonumber(ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 1 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('PEXPIRE', KEYS[1], ms, 'LT')
  redis.call('ZADD', KEYS[4], 'XX', 'LT', now + ms, ARGV[2])
end
redis.call('PEXPIRE', KEYS[2], ms, 'LT')
local named = redis.call('GET', KEYS[3])
if named and string.sub(named, 1, #ARGV[2] + 1) == ARGV[2] .. '|' then redis.call('PEXPIRE', KEYS[3], ms, 'LT') end
return 1
"""

TOUCH = """#!lua flags=allow-oom
-- KEYS: job stream; ARGV: group, consumer, entry ids. Reset the idle time of the entries this consumer still
-- owns (a batch starts computing them), without stealing any that another worker reclaimed meanwhile.
local touched = 0
for i = 3, #ARGV do
  local owned = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #owned > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    touched = touched + 1
  end
end
return touched
"""

HEARTBEAT = """#!lua flags=allow-oom
-- KEYS: worker key, known-models hash; ARGV: body, ttl, known ttl, then model id / info pairs
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if #ARGV > 3 then
  local items = {}
  for i = 4, #ARGV do items[#items + 1] = ARGV[i] end
  redis.call('HSET', KEYS[2], unpack(items))
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
return 1
"""


@dataclass(frozen=True)
class Entry:
    """A stream entry to add: where, its field/value pairs, its cap and its key's TTL (0 = none)."""

    stream: str
    fields: dict[bytes, bytes]
    maxlen: int
    ttl_s: int = 0


@dataclass(frozen=True)
class KeptAnswer:
    """Where and how long a keyed job's answer is kept for retries, and the budget all kept answers share."""

    job_id: str
    key: str
    answered_key: str
    expiry_key: str
    bytes_key: str
    ttl_s: int
    budget_bytes: int


@dataclass(frozen=True)
class Finished:
    """What FINISH did: whether this consumer still owned the entry, whether a keyed answer was left unkept
    (the budget was full), and the bytes kept answers hold now."""

    owned: bool
    over_budget: bool = False
    kept_bytes: int = 0


def _items(fields: dict[bytes, bytes]) -> list[bytes]:
    return [item for pair in fields.items() for item in pair]


class Scripts:
    """The registered scripts of one client (EVALSHA, loaded on first use)."""

    def __init__(self, r: Redis) -> None:
        self._finish = r.register_script(FINISH)
        self._touch = r.register_script(TOUCH)
        self._heartbeat = r.register_script(HEARTBEAT)
        self._delivered = r.register_script(DELIVERED)

    async def finish(
        self,
        *,
        stream: str,
        group: str,
        consumer: str,
        entry_id: bytes,
        xackdel: bool,
        reply: Entry | None = None,
        result: KeptAnswer | None = None,
        extra: Entry | None = None,
    ) -> Finished:
        """Acknowledge and delete a job's entry, then add its reply (and keep the answer for retries, within the
        budget) and/or an extra entry; `owned` is False when this consumer no longer owns the entry (nothing was
        written)."""
        reply_items = _items(reply.fields) if reply else []
        extra_items = _items(extra.fields) if extra else []
        keep = result if reply else None
        keys = [
            stream,
            reply.stream if reply else stream,
            keep.key if keep else stream,
            extra.stream if extra else stream,
            keep.answered_key if keep else stream,
            keep.expiry_key if keep else stream,
            keep.bytes_key if keep else stream,
        ]
        args: Sequence[bytes | str | int] = [
            group,
            consumer,
            entry_id,
            int(xackdel),
            reply.ttl_s if reply else 0,
            reply.maxlen if reply else 0,
            keep.ttl_s if keep else 0,
            len(reply_items),
            len(extra_items),
            extra.maxlen if extra else 0,
            extra.ttl_s if extra else 0,
            keep.budget_bytes if keep else 0,
            keep.job_id if keep else "",
            *reply_items,
            *extra_items,
        ]
        status, total = await self._finish(keys=keys, args=list(args))
        return Finished(owned=int(status) > 0, over_budget=int(status) == 2, kept_bytes=int(total))

    async def delivered(self, keys: Sequence[str], job_id: str, grace_s: float) -> None:
        """Shorten a delivered keyed answer's lifetime to the grace (KEYS as the DELIVERED script says)."""
        await self._delivered(keys=list(keys), args=[max(0, round(grace_s * 1000)), job_id])

    async def touch(self, stream: str, group: str, consumer: str, entry_ids: Sequence[bytes]) -> int:
        if not entry_ids:
            return 0
        return int(await self._touch(keys=[stream], args=[group, consumer, *entry_ids]))

    async def heartbeat(
        self, worker_key: str, known_key: str, body: str, ttl_s: int, known_ttl_s: int, models: dict[str, str]
    ) -> None:
        items = [item for pair in models.items() for item in pair]
        await self._heartbeat(keys=[worker_key, known_key], args=[body, ttl_s, known_ttl_s, *items])
