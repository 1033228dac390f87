"""The Redis Streams broker: front-ends and workers in separate processes, at-least-once delivery, nothing
lost, memory bounded by what is in flight. It joins the roles: `Submitter` (front-end side), `Consumer`
(worker side), `Heartbeats` (worker heartbeats, announced models), over the keys of `keys.py`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path

from redis.exceptions import RedisError

from service.errors import ServiceError
from service.jobs import Job, ModelInfo, Reply
from service.queue.base import Broker, Delivery, QueueStats
from service.queue.redis.connection import ConnectionOptions, RedisSetupError, ServerInfo, check_server
from service.queue.redis.consumer import Consumer
from service.queue.redis.counters import RedisStats
from service.queue.redis.heartbeats import Heartbeats
from service.queue.redis.keys import Keys
from service.queue.redis.scripts import Scripts
from service.queue.redis.streams import Groups
from service.queue.redis.submitter import Submitter

log = logging.getLogger(__name__)


class RedisBroker(Broker):
    def __init__(
        self,
        url: str,
        prefix: str = "dense",
        *,
        password: str | None = None,
        tls_ca_file: Path | None = None,
        max_depth: int = 256,
        stream_maxlen: int = 10_000,
        result_ttl_s: int = 60,
        answer_grace_s: float = 5.0,
        answer_store_bytes: int = 64 * 2**20,
        min_idle_ms: int = 10_000,
        max_deliveries: int = 3,
        heartbeat_s: float = 2.0,
        op_timeout_s: float = 1.0,
        consumer: str | None = None,
    ) -> None:
        self.options = ConnectionOptions(url, password, tls_ca_file, op_timeout_s)
        self.keys = Keys(prefix)
        self.r = self.options.client()
        self.rb = self.options.client(blocking=True)
        self.stats = RedisStats()
        self.server: ServerInfo | None = None
        where = self.options.where
        groups = Groups(self.r)
        self.scripts = Scripts(self.r)
        self.heartbeats = Heartbeats(self.r, self.keys, self.scripts, heartbeat_s, where)
        self.submitter = Submitter(
            self.r,
            self.rb,
            self.keys,
            groups,
            self.stats,
            where=where,
            max_depth=max_depth,
            stream_maxlen=stream_maxlen,
            result_ttl_s=result_ttl_s,
            answer_grace_s=answer_grace_s,
            scripts=self.scripts,
        )
        self.consumer = Consumer(
            self.r,
            self.rb,
            self.keys,
            groups,
            self.scripts,
            self.heartbeats,
            self.stats,
            name=consumer or f"{socket.gethostname()}-{os.getpid()}",
            where=where,
            min_idle_ms=min_idle_ms,
            max_deliveries=max_deliveries,
            stream_maxlen=stream_maxlen,
            result_ttl_s=result_ttl_s,
            answer_store_bytes=answer_store_bytes,
        )
        self._closed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._announced: list[str] = []

    # ---- lifecycle

    async def start(self) -> None:
        """Check the server now when it answers (a wrong password or an old Redis fails the start); when it
        does not, start anyway: the front-ends answer 503 and everything resumes when Redis comes up."""
        try:
            self.server = await check_server(self.r, self.options.where, self.options.has_password)
        except RedisSetupError:
            raise
        except ServiceError as exc:
            log.warning("%s; starting anyway, the queue is used as soon as it answers", exc.detail)
            return
        self.consumer.xackdel = self.server.has_xackdel

    async def close(self) -> None:
        self._closed.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.submitter.close()
        if self._announced:
            with contextlib.suppress(RedisError, OSError):
                await self.heartbeats.leave(self.consumer.name)
        await self.r.aclose()
        await self.rb.aclose()

    # ---- front-end side

    async def submit(self, job: Job, idempotency_key: str | None = None) -> Reply:
        return await self.submitter.submit(job, idempotency_key)

    async def catalog(self) -> list[ModelInfo]:
        return await self.heartbeats.catalog()

    async def dormant_models(self) -> list[ModelInfo]:
        return await self.heartbeats.dormant()

    async def declare_models(self, infos: list[ModelInfo]) -> None:
        if infos:
            await self.heartbeats.declare(infos)

    async def reachable(self) -> bool:
        try:
            return bool(await self.r.ping())
        except (RedisError, OSError):
            return False

    async def queue_stats(self, model: str) -> QueueStats:
        return await self.submitter.queue_stats(model)

    # ---- worker side

    async def publish_models(self, infos: list[ModelInfo]) -> None:
        self.heartbeats.infos = list(infos)
        self._announced = [i.id for i in infos]
        for info in infos:
            with contextlib.suppress(RedisError, OSError):
                await self.consumer.groups.ensure(self.keys.jobs(info.id))
        await self.heartbeats.beat(self.consumer.name)
        name = self.consumer.name
        self._tasks.append(
            asyncio.create_task(self.heartbeats.beat_forever(name, self._closed), name="dense-heartbeat")
        )
        reaper = self.consumer.reap_forever(self._announced, self._closed, self.heartbeats.heartbeat_s)
        self._tasks.append(asyncio.create_task(reaper, name="dense-reaper"))

    async def withdraw_models(self, ids: list[str]) -> None:
        """Stop announcing models (shutting down); the heartbeat goes on while the worker drains."""
        self.heartbeats.infos = [i for i in self.heartbeats.infos if i.id not in ids]
        with contextlib.suppress(RedisError, OSError):
            await self.heartbeats.beat(self.consumer.name)

    async def consume(self, model: str, max_items: int, timeout_s: float) -> list[Delivery]:
        return await self.consumer.consume(model, max_items, timeout_s)

    async def reply(self, delivery: Delivery, reply: Reply) -> None:
        await self.consumer.reply(delivery, reply)

    async def reject(self, delivery: Delivery, error: ServiceError) -> None:
        await self.consumer.reject(delivery, error)

    async def refresh_abandoned(self, deliveries: list[Delivery]) -> None:
        await self.consumer.refresh_abandoned(deliveries)

    async def computing(self, deliveries: list[Delivery]) -> None:
        await self.consumer.computing(deliveries)

    async def reap(self, model: str) -> int:
        return await self.consumer.reap(model)

    def depth(self, model: str) -> int:
        return len(self.consumer.reclaimed.get(model, []))
