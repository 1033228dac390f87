"""What both sides share about the streams: how a job and a reply are laid out in an entry, the consumer
group, and the queue's numbers (waiting, pending)."""

from __future__ import annotations

import json

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from service.jobs import Job, Reply
from service.queue.base import QueueStats
from service.queue.redis.keys import GROUP


def job_fields(job: Job, attempt: int) -> dict[bytes, bytes]:
    """The image travels as raw bytes beside the JSON: no base64 inflation."""
    return {
        b"job": job.model_dump_json(exclude={"image"}).encode(),
        b"image": job.image,
        b"attempt": str(attempt).encode(),
    }


def read_job(fields: dict[bytes, bytes]) -> tuple[Job, int]:
    """An entry back to its job and delivery attempt; KeyError/ValueError for a foreign or corrupt entry."""
    job = Job.model_validate({**json.loads(fields[b"job"]), "image": fields.get(b"image", b"")})
    return job, int(fields.get(b"attempt", b"1"))


def reply_fields(reply: Reply) -> dict[bytes, bytes]:
    fields = {b"reply": reply.model_dump_json(exclude={"outputs"}).encode()}
    fields.update({f"out:{name}".encode(): data for name, data in reply.outputs.items()})
    return fields


def read_reply(fields: dict[bytes, bytes]) -> Reply:
    reply = Reply.model_validate_json(fields[b"reply"])
    reply.outputs = {k.decode()[4:]: v for k, v in fields.items() if k.startswith(b"out:")}
    return reply


class Groups:
    """Creates each model's stream and consumer group once per connection lifetime."""

    def __init__(self, r: Redis) -> None:
        self.r = r
        self._made: set[str] = set()

    async def ensure(self, stream: str) -> None:
        if stream in self._made:
            return
        try:
            await self.r.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._made.add(stream)

    def forget(self, stream: str | None = None) -> None:
        """After an outage (a restarted Redis has lost the groups), or for one stream that reported NOGROUP."""
        if stream is None:
            self._made.clear()
        else:
            self._made.discard(stream)


async def group_info(r: Redis, stream: str) -> tuple[dict | None, int]:
    """Our group's entry of XINFO GROUPS (None while no stream or group exists yet) and the stream's XLEN, read
    in one round trip so that the two describe the same moment."""
    async with r.pipeline(transaction=True) as pipe:
        pipe.xlen(stream)
        pipe.xinfo_groups(stream)
        length, groups = await pipe.execute(raise_on_error=False)
    if isinstance(length, Exception):
        raise length
    if isinstance(groups, Exception):
        if isinstance(groups, ResponseError):  # no such stream yet
            return None, 0
        raise groups
    group = next((g for g in groups if g.get("name") in (GROUP, GROUP.encode())), None)
    return group, int(length or 0)


def stats_of(group: dict | None, length: int) -> QueueStats:
    """waiting = XLEN - pending: every answered job's entry is deleted (XACK+XDEL or XACKDEL in the reply script,
    on every path), so the stream holds exactly the jobs in flight, and those a worker has read are pending.

    Redis's own `lag` of XINFO GROUPS is not used: once entries are deleted out of order (several workers, the
    one that read second finishing first) Redis cannot compute it and reports NULL until the gap closes, which
    read as an empty queue (no 429, no scale-up) while hundreds of jobs waited."""
    if group is None:
        return QueueStats(depth=0, pending=0, lag=0)
    pending = int(group.get("pending") or 0)
    waiting = max(0, length - pending)
    return QueueStats(depth=waiting, pending=pending, lag=waiting)
