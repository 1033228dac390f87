"""Redis Streams broker: separate API and worker processes, at-least-once delivery, nothing lost.

Layout (every key under `prefix`):
- `jobs:{model}`   one stream per model, consumer group `workers`; each worker is a named consumer
- `replies:{api}`  one reply stream per API instance, read by one blocking loop that resolves futures
- `result:{id}`    the reply, kept `result_ttl_s` for Idempotency-Key retries
- `idem:{sha}`     Idempotency-Key -> job id, fingerprint, deadline
- `worker:{name}`  a worker's heartbeat and the models it serves (TTL 3 heartbeats)
- `dead:{model}`   dead-letter stream for jobs that failed `max_deliveries` times
- `cancel:{id}`    the client gave up on this job (TTL until its deadline): workers drop it uncomputed
- `models:known`   every model a worker ever announced (TTL a week): lets the API accept jobs for a model
                   whose workers were scaled to zero

A reply and its XACK go in one MULTI; a crashed worker's jobs are reclaimed by the others with
XAUTOCLAIM after `min_idle_ms`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from service import logs, metrics
from service.errors import DeadlineExceeded, InvalidParameter, ModelFailure, QueueFull, ServiceError, Unavailable
from service.jobs import ErrorInfo, Job, ModelInfo, Reply
from service.queue.base import Broker, Delivery, DrainRate, QueueStats, fingerprint

log = logging.getLogger(__name__)
GROUP = "workers"
REPLY_STREAM_TTL_S = 300
REPLY_STREAM_MAXLEN = 10_000
DEAD_TTL_S = 7 * 24 * 3600
KNOWN_MODELS_TTL_S = 7 * 24 * 3600
CATALOG_CACHE_S = 0.5
PRECISE_WAIT_S = 0.15  # below this, wait by polling (Redis's own timeouts are coarse)
POLL_INTERVAL_S = 0.002


@dataclass
class RedisDelivery(Delivery):
    entry_id: bytes = b""
    cancelled: bool = False

    def abandoned(self) -> bool:
        return self.cancelled


def _encode_reply(reply: Reply) -> dict[bytes, bytes]:
    fields = {b"reply": reply.model_dump_json(exclude={"outputs"}).encode()}
    fields.update({f"out:{name}".encode(): data for name, data in reply.outputs.items()})
    return fields


def _decode_reply(fields: dict[bytes, bytes]) -> Reply:
    reply = Reply.model_validate_json(fields[b"reply"])
    reply.outputs = {k.decode()[4:]: v for k, v in fields.items() if k.startswith(b"out:")}
    return reply


class RedisBroker(Broker):
    def __init__(
        self,
        url: str,
        prefix: str = "dense",
        *,
        max_depth: int = 256,
        stream_maxlen: int = 10_000,
        result_ttl_s: int = 600,
        min_idle_ms: int = 60_000,
        max_deliveries: int = 3,
        heartbeat_s: float = 2.0,
        op_timeout_s: float = 0.5,
        consumer: str | None = None,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.max_depth = max_depth
        self.stream_maxlen = stream_maxlen
        self.result_ttl_s = result_ttl_s
        self.min_idle_ms = min_idle_ms
        self.max_deliveries = max_deliveries
        self.heartbeat_s = heartbeat_s
        self.op_timeout_s = op_timeout_s
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.instance = uuid.uuid4().hex[:12]
        self.reply_stream = self._key("replies", self.instance)
        no_retry = Retry(NoBackoff(), 0)
        # Short timeouts so an outage is a fast 503; blocking reads get their own client without a socket timeout.
        self.r = Redis.from_url(url, socket_connect_timeout=op_timeout_s, socket_timeout=op_timeout_s, retry=no_retry)
        self.rb = Redis.from_url(url, socket_connect_timeout=op_timeout_s, socket_timeout=None, retry=no_retry)
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()  # fire-and-forget writes (cancel markers)
        self._closed = False
        self._groups: set[str] = set()
        self._rates: dict[str, DrainRate] = defaultdict(DrainRate)
        self._entries_read: dict[str, int] = {}
        self._catalog: tuple[float, list[ModelInfo]] = (0.0, [])
        # worker side
        self._infos: list[ModelInfo] = []
        self._reclaimed: dict[str, list[RedisDelivery]] = defaultdict(list)
        self._own_pending_done: set[str] = set()
        self._inflight: set[bytes] = set()
        self.stats: dict[str, int] = defaultdict(int)

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # ================================================================== lifecycle

    async def start(self) -> None:
        """Nothing to start eagerly: the reply loop starts with the first submission (API side only)."""

    def _ensure_reply_loop(self) -> None:
        if not any(t.get_name() == "dense-replies" and not t.done() for t in self._tasks):
            self._tasks.append(asyncio.create_task(self._reply_loop(), name="dense-replies"))

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._fail_waiting(Unavailable("the service is shutting down"))
        with contextlib.suppress(RedisError, OSError):
            await self.r.delete(self.reply_stream)
        await self.r.aclose()
        await self.rb.aclose()

    def _fail_waiting(self, error: ServiceError) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)

    # ================================================================== front-end side

    async def reachable(self) -> bool:
        try:
            return bool(await self.r.ping())
        except (RedisError, OSError):
            return False

    async def submit(self, job: Job, idempotency_key: str | None = None) -> Reply:
        if self._closed:
            raise Unavailable("the service is shutting down")
        if job.expired():
            raise DeadlineExceeded(f"job {job.id} was already past its deadline when enqueued")
        job.reply_to = self.reply_stream
        self._ensure_reply_loop()
        try:
            if idempotency_key is not None:
                existing = await self._claim_key(idempotency_key, job)
                if existing is not None:
                    return await self._await_existing(existing, job.deadline)
            await self._check_depth(job.model)
            future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            self._waiting[job.id] = future
            await self._ensure_group(job.model)
            await self.r.xadd(
                self._key("jobs", job.model),
                self._job_fields(job, attempt=1),
                maxlen=self.stream_maxlen,
                approximate=True,
            )
        except (RedisError, OSError) as exc:
            self._waiting.pop(job.id, None)
            raise Unavailable(f"the queue (Redis) is unreachable: {exc}", retry_after=1) from exc
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=max(0.0, job.deadline - time.time()))
        except TimeoutError:
            raise DeadlineExceeded(f"no answer within the deadline for job {job.id}") from None
        except asyncio.CancelledError:
            # The client went away (disconnect, gRPC cancel, a stream closed): tell the workers, so a job still
            # waiting in the stream or in a batching window is dropped instead of computed.
            self._mark_cancelled(job)
            raise
        finally:
            self._waiting.pop(job.id, None)

    def _mark_cancelled(self, job: Job) -> None:
        ttl = max(1, int(job.deadline - time.time()) + 1)
        task = asyncio.create_task(self._set_cancel_marker(job.id, ttl), name=f"dense-cancel-{job.id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _set_cancel_marker(self, job_id: str, ttl: int) -> None:
        with contextlib.suppress(RedisError, OSError):  # best effort: without it the job is computed, as before
            await self.r.set(self._key("cancel", job_id), b"1", ex=ttl)

    async def refresh_abandoned(self, deliveries: list[Delivery]) -> None:
        """One MGET of the cancel markers of the jobs a lane holds."""
        held = [d for d in deliveries if isinstance(d, RedisDelivery) and not d.cancelled]
        if not held:
            return
        try:
            marks = await self.r.mget([self._key("cancel", d.job.id) for d in held])
        except (RedisError, OSError):
            return  # the queue is down; the lane finds out on its next read
        for delivery, mark in zip(held, marks, strict=True):
            delivery.cancelled = mark is not None

    @staticmethod
    def _job_fields(job: Job, attempt: int) -> dict[bytes, bytes]:
        return {
            b"job": job.model_dump_json(exclude={"image"}).encode(),
            b"image": job.image,
            b"attempt": str(attempt).encode(),
        }

    async def _group(self, model: str) -> dict | None:
        """XINFO GROUPS of the model's stream, our group's entry (None while no stream or group exists yet)."""
        try:
            groups = await self.r.xinfo_groups(self._key("jobs", model))
        except ResponseError:
            return None
        return next((g for g in groups if g.get("name") in (GROUP, GROUP.encode())), None)

    @staticmethod
    def _stats_of(group: dict | None) -> QueueStats:
        """lag = entries no worker has read yet; pending = read and not yet acknowledged."""
        if group is None:
            return QueueStats(depth=0, pending=0, lag=0)
        lag = group.get("lag")
        lag = int(lag) if isinstance(lag, int) else 0
        return QueueStats(depth=lag, pending=int(group.get("pending") or 0), lag=lag)

    async def _check_depth(self, model: str) -> None:
        """429 when pending + lag of the model's stream reaches `max_depth`."""
        group = await self._group(model)
        if group is None:
            return  # no stream yet: nothing waits
        read = group.get("entries-read")
        if isinstance(read, int):
            last = self._entries_read.get(model)
            if last is not None and read > last:
                self._rates[model].record(read - last)
            self._entries_read[model] = read
        stats = self._stats_of(group)
        depth = (stats.pending or 0) + (stats.lag or 0)
        if depth >= self.max_depth:
            raise QueueFull(
                f"{depth} jobs are pending or waiting for model '{model}' (limit {self.max_depth})",
                retry_after=self._rates[model].retry_after(depth),
            )

    async def _claim_key(self, key: str, job: Job) -> str | None:
        """Register the key for this job; return the job id of an earlier live submission instead."""
        idem = self._key("idem", hashlib.sha256(key.encode()).hexdigest())
        value = f"{job.id}|{fingerprint(job)}|{job.deadline}".encode()
        if await self.r.set(idem, value, nx=True, ex=self.result_ttl_s):
            return None
        stored = await self.r.get(idem)
        if stored is None:
            await self.r.set(idem, value, ex=self.result_ttl_s)
            return None
        job_id, fp, deadline = stored.decode().split("|")
        if fp != fingerprint(job):
            raise InvalidParameter("Idempotency-Key was already used for a different request", field="Idempotency-Key")
        if float(deadline) < time.time() and not await self.r.exists(self._key("result", job_id)):
            await self.r.set(idem, value, ex=self.result_ttl_s)  # that attempt expired unanswered: start anew
            return None
        return job_id

    async def _await_existing(self, job_id: str, deadline: float) -> Reply:
        while time.time() < deadline:
            future = self._waiting.get(job_id)
            if future is not None:
                try:
                    return await asyncio.wait_for(asyncio.shield(future), timeout=max(0.0, deadline - time.time()))
                except TimeoutError:
                    break
            stored = await self.r.hgetall(self._key("result", job_id))
            if stored:
                return _decode_reply(stored)
            await asyncio.sleep(0.05)
        raise DeadlineExceeded(f"no answer within the deadline for job {job_id}")

    async def _reply_loop(self) -> None:
        last_id = b"0-0"
        backoff = 0.1
        connected = True
        next_refresh = 0.0
        while not self._closed:
            try:
                if time.monotonic() >= next_refresh:
                    await self.r.expire(self.reply_stream, REPLY_STREAM_TTL_S)
                    next_refresh = time.monotonic() + REPLY_STREAM_TTL_S / 3
                response = await self.rb.xread({self.reply_stream: last_id}, count=256, block=1000)
            except (RedisError, OSError) as exc:
                if connected:
                    log.warning("reply stream: lost Redis (%s); failing %d waiting requests", exc, len(self._waiting))
                    lost = Unavailable("the connection to the queue (Redis) was lost; retry", retry_after=1)
                    self._fail_waiting(lost)
                    connected = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if not connected:
                log.info("reply stream: Redis is back")
                connected, backoff, next_refresh = True, 0.1, 0.0
                self._groups.clear()
            for _stream, entries in response or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    reply = _decode_reply(fields)
                    future = self._waiting.get(reply.id)
                    if future is not None and not future.done():
                        future.set_result(reply)
                    elif reply.status == "ok":
                        self.stats["late_or_duplicate_replies"] += 1

    async def catalog(self) -> list[ModelInfo]:
        stamp, cached = self._catalog
        if time.monotonic() - stamp < CATALOG_CACHE_S:
            return cached
        try:
            infos: dict[str, ModelInfo] = {}
            async for key in self.r.scan_iter(match=self._key("worker", "*"), count=100):
                raw = await self.r.get(key)
                if raw:
                    for item in json.loads(raw)["models"]:
                        infos.setdefault(item["id"], ModelInfo(**item))
        except (RedisError, OSError) as exc:
            raise Unavailable(f"the queue (Redis) is unreachable: {exc}", retry_after=1) from exc
        result = sorted(infos.values(), key=lambda m: m.id)
        self._catalog = (time.monotonic(), result)
        return result

    # ================================================================== worker side

    async def _ensure_group(self, model: str) -> None:
        if model in self._groups:
            return
        try:
            await self.r.xgroup_create(self._key("jobs", model), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(model)

    async def publish_models(self, infos: list[ModelInfo]) -> None:
        self._infos = list(infos)
        for info in infos:
            with contextlib.suppress(RedisError, OSError):
                await self._ensure_group(info.id)
        await self._heartbeat_once()
        self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="dense-heartbeat"))
        self._tasks.append(asyncio.create_task(self._reaper_loop(), name="dense-reaper"))

    async def withdraw_models(self, ids: list[str]) -> None:
        self._infos = [i for i in self._infos if i.id not in ids]
        with contextlib.suppress(RedisError, OSError):
            if self._infos:
                await self._heartbeat_once()
            else:
                await self.r.delete(self._key("worker", self.consumer))

    async def _heartbeat_once(self) -> None:
        body = json.dumps({"consumer": self.consumer, "models": [i.model_dump() for i in self._infos]})
        known = self._key("models", "known")
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.set(self._key("worker", self.consumer), body, ex=max(1, int(self.heartbeat_s * 3)))
            if self._infos:  # remembered after the workers are gone, so the API can wake them (scale-to-zero)
                pipe.hset(known, mapping={i.id: i.model_dump_json() for i in self._infos})
                pipe.expire(known, KNOWN_MODELS_TTL_S)
            await pipe.execute()

    async def dormant_models(self) -> list[ModelInfo]:
        try:
            known = await self.r.hgetall(self._key("models", "known"))
        except (RedisError, OSError) as exc:
            raise Unavailable(f"the queue (Redis) is unreachable: {exc}", retry_after=1) from exc
        live = {m.id for m in await self.catalog()}
        infos = [ModelInfo.model_validate_json(v) for v in known.values()]
        return sorted((i for i in infos if i.id not in live), key=lambda m: m.id)

    async def _heartbeat_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.heartbeat_s)
            if not self._infos:
                continue
            try:
                await self._heartbeat_once()
            except (RedisError, OSError) as exc:
                log.debug("heartbeat failed: %s", exc)
                self._groups.clear()

    async def consume(self, model: str, max_items: int, timeout_s: float) -> list[Delivery]:
        if self._reclaimed[model]:
            taken, self._reclaimed[model] = self._reclaimed[model][:max_items], self._reclaimed[model][max_items:]
            return list(taken)
        key = self._key("jobs", model)
        # On start, a worker first re-reads its own pending entries (a restart under the same name).
        start = "0" if model not in self._own_pending_done else ">"
        try:
            await self._ensure_group(model)
            if start == "0" or timeout_s >= PRECISE_WAIT_S:
                # BLOCK 0 means "forever" to Redis: never let a wait round down to it.
                block = max(1, round(timeout_s * 1000)) if start == ">" and timeout_s > 0 else None
                response = await self.rb.xreadgroup(GROUP, self.consumer, {key: start}, count=max_items, block=block)
            else:
                response = await self._poll(key, max_items, timeout_s)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                self._groups.discard(model)
                return []
            raise
        except (RedisError, OSError) as exc:
            self._groups.discard(model)
            raise Unavailable(f"the queue (Redis) is unreachable: {exc}") from exc
        if start == "0":
            self._own_pending_done.add(model)
        deliveries = []
        for _stream, entries in response or []:
            for entry_id, fields in entries:
                delivery = await self._delivery(model, entry_id, fields, redelivered=start == "0")
                if delivery is not None:
                    deliveries.append(delivery)
        return deliveries

    async def _poll(self, key: str, max_items: int, timeout_s: float) -> list:
        """Short waits (filling a batch) poll without BLOCK: Redis times blocked reads only to ~1/hz
        (100 ms at the default hz 10), which would add up to 100 ms to every batch."""
        end = time.monotonic() + timeout_s
        while True:
            response = await self.r.xreadgroup(GROUP, self.consumer, {key: ">"}, count=max_items)
            remaining = end - time.monotonic()
            if (response and response[0][1]) or remaining <= 0:
                return response
            await asyncio.sleep(min(remaining, POLL_INTERVAL_S))

    async def _delivery(
        self, model: str, entry_id: bytes, fields: dict[bytes, bytes], redelivered: bool = False, times: int = 1
    ) -> RedisDelivery | None:
        try:
            job = Job.model_validate({**json.loads(fields[b"job"]), "image": fields.get(b"image", b"")})
        except (KeyError, ValueError) as exc:  # trimmed, foreign or corrupt entry: acknowledge and move on
            log.error("dropping unreadable entry %s of %s: %s", entry_id, model, exc)
            await self.r.xack(self._key("jobs", model), GROUP, entry_id)
            return None
        attempt = int(fields.get(b"attempt", b"1")) + max(times - 1, 1 if redelivered else 0)
        self._inflight.add(entry_id)
        return RedisDelivery(job=job, attempt=attempt, entry_id=entry_id)

    async def reply(self, delivery: Delivery, reply: Reply) -> None:
        assert isinstance(delivery, RedisDelivery)
        reply.metadata.setdefault("worker", self.consumer)
        fields = _encode_reply(reply)
        job = delivery.job
        for attempt in range(20):  # ride out a short outage; otherwise the entry stays pending and is reclaimed
            try:
                async with self.r.pipeline(transaction=True) as pipe:
                    if job.reply_to:
                        pipe.xadd(job.reply_to, fields, maxlen=REPLY_STREAM_MAXLEN, approximate=True)
                        pipe.expire(job.reply_to, REPLY_STREAM_TTL_S)
                    if reply.status in ("ok", "error"):
                        pipe.hset(self._key("result", job.id), mapping=fields)
                        pipe.expire(self._key("result", job.id), self.result_ttl_s)
                    pipe.xack(self._key("jobs", job.model), GROUP, delivery.entry_id)
                    await pipe.execute()
                break
            except (RedisError, OSError) as exc:
                if attempt == 19 or self._closed:
                    log.error("could not deliver the reply of job %s: %s (it will be redelivered)", job.id, exc)
                    break
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
        self._inflight.discard(delivery.entry_id)

    async def reject(self, delivery: Delivery, error: ServiceError) -> None:
        """Retry on any worker (requeue with attempt + 1) until `max_deliveries`, then dead-letter."""
        assert isinstance(delivery, RedisDelivery)
        if delivery.attempt >= self.max_deliveries:
            await self._dead_letter(delivery, error.detail)
            return
        job = delivery.job
        try:
            async with self.r.pipeline(transaction=True) as pipe:
                pipe.xadd(
                    self._key("jobs", job.model),
                    self._job_fields(job, delivery.attempt + 1),
                    maxlen=self.stream_maxlen,
                    approximate=True,
                )
                pipe.xack(self._key("jobs", job.model), GROUP, delivery.entry_id)
                await pipe.execute()
            self.stats["requeued"] += 1
        except (RedisError, OSError) as exc:
            log.error("could not requeue job %s: %s (it will be reclaimed)", job.id, exc)
        self._inflight.discard(delivery.entry_id)

    async def _dead_letter(self, delivery: RedisDelivery, reason: str) -> None:
        with logs.context(delivery.job.request_id, delivery.job.traceparent):
            await self._dead_letter_job(delivery, reason)

    async def _dead_letter_job(self, delivery: RedisDelivery, reason: str) -> None:
        job = delivery.job
        dead = self._key("dead", job.model)
        detail = (
            f"job {job.id} failed {delivery.attempt} times and was moved to the dead-letter stream '{dead}': {reason}"
        )
        reply = Reply(
            id=job.id,
            status="error",
            error=ErrorInfo(code=ModelFailure.code, detail=detail),
            metadata={"worker": self.consumer, "attempts": delivery.attempt},
        )
        fields = _encode_reply(reply)
        try:
            async with self.r.pipeline(transaction=True) as pipe:
                pipe.xadd(
                    dead,
                    {
                        b"job": job.model_dump_json(exclude={"image"}).encode(),
                        b"image": job.image,
                        b"reason": reason.encode(),
                        b"attempts": str(delivery.attempt).encode(),
                    },
                    maxlen=1000,
                    approximate=True,
                )
                pipe.expire(dead, DEAD_TTL_S)
                if job.reply_to:
                    pipe.xadd(job.reply_to, fields, maxlen=REPLY_STREAM_MAXLEN, approximate=True)
                pipe.hset(self._key("result", job.id), mapping=fields)
                pipe.expire(self._key("result", job.id), self.result_ttl_s)
                pipe.xack(self._key("jobs", job.model), GROUP, delivery.entry_id)
                await pipe.execute()
            self.stats["dead_lettered"] += 1
            metrics.JOBS_DEAD_LETTERED.labels(job.model).inc()
            log.warning("%s", detail)
        except (RedisError, OSError) as exc:
            log.error("could not dead-letter job %s: %s", job.id, exc)
        self._inflight.discard(delivery.entry_id)

    async def _reaper_loop(self) -> None:
        interval = max(0.05, self.min_idle_ms / 2000.0)
        while not self._closed:
            await asyncio.sleep(interval)
            for info in list(self._infos):
                try:
                    await self.reap(info.id)
                except (RedisError, OSError) as exc:
                    log.debug("reaper: %s", exc)

    async def reap(self, model: str) -> int:
        """Claim jobs idle longer than `min_idle_ms` (their worker died); dead-letter the ones delivered
        too often. Returns how many were claimed for this worker."""
        key = self._key("jobs", model)
        await self._ensure_group(model)
        _next, claimed, deleted = await self.r.xautoclaim(key, GROUP, self.consumer, self.min_idle_ms, "0-0", count=64)
        if deleted:
            await self.r.xack(key, GROUP, *deleted)
        taken = 0
        for entry_id, fields in claimed:
            if entry_id in self._inflight:
                continue  # ours and still being computed
            info = await self.r.xpending_range(key, GROUP, min=entry_id, max=entry_id, count=1)
            times = int(info[0]["times_delivered"]) if info else 2
            delivery = await self._delivery(model, entry_id, fields, times=times)
            if delivery is None:
                continue
            self.stats["reclaimed"] += 1
            metrics.JOBS_RECLAIMED.labels(model).inc()
            if delivery.attempt > self.max_deliveries:
                await self._dead_letter(
                    delivery, f"delivered {delivery.attempt - 1} times without an answer (its workers died)"
                )
                continue
            self._reclaimed[model].append(delivery)
            taken += 1
        return taken

    def depth(self, model: str) -> int:
        return len(self._reclaimed.get(model, []))

    async def queue_stats(self, model: str) -> QueueStats:
        return self._stats_of(await self._group(model))
