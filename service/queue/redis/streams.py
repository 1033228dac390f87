"""What both sides share about the streams: how a job and a reply are laid out in an entry, the consumer
group, and the queue's numbers (lag, pending)."""

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


async def group_info(r: Redis, stream: str) -> dict | None:
    """XINFO GROUPS of a stream, our group's entry (None while no stream or group exists yet)."""
    try:
        groups = await r.xinfo_groups(stream)
    except ResponseError:
        return None
    return next((g for g in groups if g.get("name") in (GROUP, GROUP.encode())), None)


def stats_of(group: dict | None) -> QueueStats:
    """lag = entries no worker has read yet; pending = read and not yet acknowledged."""
    if group is None:
        return QueueStats(depth=0, pending=0, lag=0)
    lag = group.get("lag")
    lag = int(lag) if isinstance(lag, int) else 0
    return QueueStats(depth=lag, pending=int(group.get("pending") or 0), lag=lag)
