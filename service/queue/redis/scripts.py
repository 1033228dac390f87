"""The Lua scripts that change a job's state atomically. All run with `allow-oom`: when Redis is full
(`maxmemory`, `noeviction`), answering and acknowledging jobs, the only thing that frees memory, must still
work, and so must heartbeats (else every worker would look dead and be reclaimed). New jobs are the only
writes refused then (XADD by the front-ends), which the clients see as a 503 that names memory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

FINISH = """#!lua flags=allow-oom
-- KEYS: job stream, reply stream, result key, extra stream (a requeue into the job stream, or dead letters)
-- ARGV: group, consumer, entry id, xackdel, reply ttl, reply maxlen, result ttl, n reply items, n extra items,
--       extra maxlen, extra ttl, then the reply's field/value items, then the extra entry's
-- Only the consumer that owns the entry may answer it: a job reclaimed from a hung worker that wakes up
-- again is answered once, by its new owner; the late answer is dropped here (returns 0).
local owned = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #owned == 0 then return 0 end
if ARGV[4] == '1' then
  redis.call('XACKDEL', KEYS[1], ARGV[1], 'IDS', 1, ARGV[3])
else
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
  redis.call('XDEL', KEYS[1], ARGV[3])
end
local n_reply, n_extra = tonumber(ARGV[8]), tonumber(ARGV[9])
local first = 12
if n_reply > 0 then
  local reply = {}
  for i = first, first + n_reply - 1 do reply[#reply + 1] = ARGV[i] end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', unpack(reply))
  redis.call('EXPIRE', KEYS[2], ARGV[5])
  if tonumber(ARGV[7]) > 0 then
    redis.call('DEL', KEYS[3])
    redis.call('HSET', KEYS[3], unpack(reply))
    redis.call('EXPIRE', KEYS[3], ARGV[7])
  end
end
if n_extra > 0 then
  local extra = {}
  for i = first + n_reply, first + n_reply + n_extra - 1 do extra[#extra + 1] = ARGV[i] end
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[10], '*', unpack(extra))
  if tonumber(ARGV[11]) > 0 then redis.call('EXPIRE', KEYS[4], ARGV[11]) end
end
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


def _items(fields: dict[bytes, bytes]) -> list[bytes]:
    return [item for pair in fields.items() for item in pair]


class Scripts:
    """The registered scripts of one client (EVALSHA, loaded on first use)."""

    def __init__(self, r: Redis) -> None:
        self._finish = r.register_script(FINISH)
        self._touch = r.register_script(TOUCH)
        self._heartbeat = r.register_script(HEARTBEAT)

    async def finish(
        self,
        *,
        stream: str,
        group: str,
        consumer: str,
        entry_id: bytes,
        xackdel: bool,
        reply: Entry | None = None,
        result_key: str = "",
        result_ttl_s: int = 0,
        extra: Entry | None = None,
    ) -> bool:
        """Acknowledge and delete a job's entry, then add its reply (and stored result) and/or an extra entry;
        False when this consumer no longer owns the entry (nothing was written)."""
        reply_items = _items(reply.fields) if reply else []
        extra_items = _items(extra.fields) if extra else []
        keys = [stream, reply.stream if reply else stream, result_key or stream, extra.stream if extra else stream]
        args: Sequence[bytes | str | int] = [
            group,
            consumer,
            entry_id,
            int(xackdel),
            reply.ttl_s if reply else 0,
            reply.maxlen if reply else 0,
            result_ttl_s if reply and result_key else 0,
            len(reply_items),
            len(extra_items),
            extra.maxlen if extra else 0,
            extra.ttl_s if extra else 0,
            *reply_items,
            *extra_items,
        ]
        return bool(await self._finish(keys=keys, args=list(args)))

    async def touch(self, stream: str, group: str, consumer: str, entry_ids: Sequence[bytes]) -> int:
        if not entry_ids:
            return 0
        return int(await self._touch(keys=[stream], args=[group, consumer, *entry_ids]))

    async def heartbeat(
        self, worker_key: str, known_key: str, body: str, ttl_s: int, known_ttl_s: int, models: dict[str, str]
    ) -> None:
        items = [item for pair in models.items() for item in pair]
        await self._heartbeat(keys=[worker_key, known_key], args=[body, ttl_s, known_ttl_s, *items])
