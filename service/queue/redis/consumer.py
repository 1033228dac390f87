"""The worker side: read jobs, answer and acknowledge them (deleting their entries), retry or dead-letter the
ones that fail, and reclaim the jobs of workers that died or hung.

Recovery does not wait for idle timers when it need not: a consumer whose heartbeat key has expired is dead,
and its unacknowledged jobs are claimed at once (within a heartbeat TTL of its death). `min_idle_ms` covers
the other case, a worker whose process lives but whose device is stuck: a live worker keeps the jobs it holds
fresh while its batches make progress, so only a stuck one's jobs go idle that long. A reclaimed job's late
answer from its old owner is dropped atomically (scripts.FINISH), so every request gets one answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from service import logs, metrics
from service.errors import ErrorInfo, ModelFailure, ServiceError
from service.jobs import Reply
from service.queue.base import Delivery
from service.queue.redis.connection import unavailable
from service.queue.redis.counters import RedisStats
from service.queue.redis.heartbeats import Heartbeats
from service.queue.redis.keys import DEAD_MAXLEN, DEAD_TTL_S, GROUP, REPLY_STREAM_MAXLEN, REPLY_STREAM_TTL_S, Keys
from service.queue.redis.scripts import Entry, KeptAnswer, Scripts
from service.queue.redis.streams import Groups, job_fields, read_job, reply_fields

log = logging.getLogger(__name__)
PRECISE_WAIT_S = 0.15  # below this, wait by polling (Redis's own timeouts are coarse)
POLL_INTERVAL_S = 0.002
RECLAIM_BATCH = 256


@dataclass
class RedisDelivery(Delivery):
    entry_id: bytes = b""
    cancelled: bool = False

    def abandoned(self) -> bool:
        return self.cancelled


class Consumer:
    def __init__(
        self,
        r: Redis,
        rb: Redis,
        keys: Keys,
        groups: Groups,
        scripts: Scripts,
        heartbeats: Heartbeats,
        stats: RedisStats,
        *,
        name: str,
        where: str,
        min_idle_ms: int,
        max_deliveries: int,
        stream_maxlen: int,
        result_ttl_s: int,
        answer_store_bytes: int,
    ) -> None:
        self.r, self.rb = r, rb
        self.keys = keys
        self.groups = groups
        self.scripts = scripts
        self.heartbeats = heartbeats
        self.stats = stats
        self.name = name
        self.where = where
        self.min_idle_ms = min_idle_ms
        self.max_deliveries = max_deliveries
        self.stream_maxlen = stream_maxlen
        self.result_ttl_s = result_ttl_s
        self.answer_store_bytes = answer_store_bytes
        self.xackdel = False  # set from the server's capabilities at start
        self.reclaimed: dict[str, list[RedisDelivery]] = defaultdict(list)
        self._own_pending_done: set[str] = set()
        self._held: dict[bytes, str] = {}  # entry id -> model, for jobs read and not yet answered
        self._last_progress = float("-inf")  # no batch has started yet

    # ------------------------------------------------------------------ read

    async def consume(self, model: str, max_items: int, timeout_s: float) -> list[Delivery]:
        if self.reclaimed[model]:
            taken, self.reclaimed[model] = self.reclaimed[model][:max_items], self.reclaimed[model][max_items:]
            return list(taken)
        stream = self.keys.jobs(model)
        # On start, a worker first re-reads its own pending entries (a restart under the same name).
        start = "0" if model not in self._own_pending_done else ">"
        try:
            await self.groups.ensure(stream)
            if start == "0" or timeout_s >= PRECISE_WAIT_S:
                # BLOCK 0 means "forever" to Redis: never let a wait round down to it.
                block = max(1, round(timeout_s * 1000)) if start == ">" and timeout_s > 0 else None
                response = await self.rb.xreadgroup(GROUP, self.name, {stream: start}, count=max_items, block=block)
            else:
                response = await self._poll(stream, max_items, timeout_s)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                self.groups.forget(stream)
                return []
            raise unavailable(exc, self.where) from exc
        except (RedisError, OSError) as exc:
            self.groups.forget(stream)
            raise unavailable(exc, self.where) from exc
        if start == "0":
            self._own_pending_done.add(model)
        deliveries = []
        for _stream, entries in response or []:
            for entry_id, fields in entries:
                delivery = await self._delivery(model, entry_id, fields, redelivered=start == "0")
                if delivery is not None:
                    deliveries.append(delivery)
        return deliveries

    async def _poll(self, stream: str, max_items: int, timeout_s: float) -> list:
        """Short waits poll without BLOCK: Redis times blocked reads only to ~1/hz (100 ms at hz 10)."""
        end = time.monotonic() + timeout_s
        while True:
            response = await self.r.xreadgroup(GROUP, self.name, {stream: ">"}, count=max_items)
            remaining = end - time.monotonic()
            if (response and response[0][1]) or remaining <= 0:
                return response
            await asyncio.sleep(min(remaining, POLL_INTERVAL_S))

    async def _delivery(
        self, model: str, entry_id: bytes, fields: dict[bytes, bytes] | None, redelivered: bool = False, times: int = 1
    ) -> RedisDelivery | None:
        stream = self.keys.jobs(model)
        try:
            if not fields:
                raise KeyError("the entry was deleted")
            job, attempt = read_job(fields)
        except (KeyError, ValueError) as exc:  # trimmed, foreign or corrupt entry: acknowledge and move on
            log.error("dropping unreadable entry %s of %s: %s", entry_id, model, exc)
            self.stats.unreadable_entries += 1
            with contextlib.suppress(RedisError, OSError):
                await self.r.xack(stream, GROUP, entry_id)
                await self.r.xdel(stream, entry_id)
            return None
        attempt += max(times - 1, 1 if redelivered else 0)
        self._held[entry_id] = model
        return RedisDelivery(job=job, attempt=attempt, entry_id=entry_id)

    async def refresh_abandoned(self, deliveries: list[Delivery]) -> None:
        """One MGET of the cancel markers of the jobs a lane holds."""
        held = [d for d in deliveries if isinstance(d, RedisDelivery) and not d.cancelled]
        if not held:
            return
        try:
            marks = await self.r.mget([self.keys.cancel(d.job.id) for d in held])
        except (RedisError, OSError):
            return  # the queue is down; the lane finds out on its next read
        for delivery, mark in zip(held, marks, strict=True):
            delivery.cancelled = mark is not None

    async def computing(self, deliveries: list[Delivery]) -> None:
        """A batch of these starts: reset their idle clocks (they are not hung) and note the progress."""
        self._last_progress = time.monotonic()
        by_stream: dict[str, list[bytes]] = defaultdict(list)
        for d in deliveries:
            if isinstance(d, RedisDelivery):
                by_stream[self.keys.jobs(d.job.model)].append(d.entry_id)
        with contextlib.suppress(RedisError, OSError):  # at worst they are reclaimed and answered twice
            for stream, ids in by_stream.items():
                await self.scripts.touch(stream, GROUP, self.name, ids)

    # ------------------------------------------------------------------ answer

    async def reply(self, delivery: Delivery, reply: Reply) -> None:
        assert isinstance(delivery, RedisDelivery)
        reply.worker = self.name
        job = delivery.job
        keep = job.keep_result and reply.status in ("ok", "error")
        await self._finish(
            delivery,
            reply=Entry(job.reply_to, reply_fields(reply), REPLY_STREAM_MAXLEN, REPLY_STREAM_TTL_S)
            if job.reply_to
            else None,
            keep=keep,
            what="reply",
        )

    async def reject(self, delivery: Delivery, error: ServiceError) -> None:
        """Retry on any worker (requeue with attempt + 1) until `max_deliveries`, then dead-letter."""
        assert isinstance(delivery, RedisDelivery)
        if delivery.attempt >= self.max_deliveries:
            await self.dead_letter(delivery, error.detail)
            return
        stream = self.keys.jobs(delivery.job.model)
        retry = Entry(stream, job_fields(delivery.job, delivery.attempt + 1), self.stream_maxlen)
        if await self._finish(delivery, extra=retry, what="requeue"):
            self.stats.requeued += 1

    async def dead_letter(self, delivery: RedisDelivery, reason: str) -> None:
        job = delivery.job
        dead = self.keys.dead(job.model)
        detail = (
            f"job {job.id} failed {delivery.attempt} times and was moved to the dead-letter stream '{dead}': {reason}"
        )
        reply = Reply(
            id=job.id,
            status="error",
            error=ErrorInfo(code=ModelFailure.code, detail=detail),
            worker=self.name,
        )
        # The image is not kept: dead letters are for inspection (the job, why, how often), and stay small.
        entry = {
            b"job": job.model_dump_json(exclude={"image"}).encode(),
            b"image_bytes": str(len(job.image)).encode(),
            b"reason": reason.encode(),
            b"attempts": str(delivery.attempt).encode(),
        }
        with logs.context(job.request_id, job.traceparent):
            done = await self._finish(
                delivery,
                reply=Entry(job.reply_to, reply_fields(reply), REPLY_STREAM_MAXLEN, REPLY_STREAM_TTL_S)
                if job.reply_to
                else None,
                keep=job.keep_result,
                extra=Entry(dead, entry, DEAD_MAXLEN, DEAD_TTL_S),
                what="dead-letter",
            )
            if done:
                self.stats.dead_lettered += 1
                metrics.JOBS_DEAD_LETTERED.labels(job.model).inc()
                log.warning("%s", detail)

    async def _finish(
        self,
        delivery: RedisDelivery,
        *,
        reply: Entry | None = None,
        keep: bool = False,
        extra: Entry | None = None,
        what: str,
    ) -> bool:
        """Run scripts.FINISH, riding out a short outage (else the entry stays pending and is reclaimed)."""
        job = delivery.job
        owned = False
        kept = (
            KeptAnswer(
                job_id=job.id,
                key=self.keys.result(job.id),
                answered_key=self.keys.answered(job.id),
                expiry_key=self.keys.kept_expiry(),
                bytes_key=self.keys.kept_bytes(),
                ttl_s=self.result_ttl_s,
                budget_bytes=self.answer_store_bytes,
            )
            if keep
            else None
        )
        for attempt in range(20):
            try:
                finished = await self.scripts.finish(
                    stream=self.keys.jobs(job.model),
                    group=GROUP,
                    consumer=self.name,
                    entry_id=delivery.entry_id,
                    xackdel=self.xackdel,
                    reply=reply,
                    result=kept,
                    extra=extra,
                )
                owned = finished.owned
                if kept is not None and finished.owned:
                    metrics.ANSWERS_KEPT_BYTES.set(finished.kept_bytes)
                    if finished.over_budget:
                        metrics.ANSWERS_NOT_KEPT.labels(job.model).inc()
                break
            except (RedisError, OSError) as exc:
                if attempt == 19:
                    log.error("could not %s job %s: %s (another worker will take it over)", what, job.id, exc)
                    break
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
        self._held.pop(delivery.entry_id, None)
        if not owned:
            self.stats.late_replies_discarded += 1
            log.info("job %s was reclaimed by another worker meanwhile; this %s is dropped", job.id, what)
        return owned

    # ------------------------------------------------------------------ reclaim

    async def reap(self, model: str) -> int:
        """Claim the jobs of dead consumers (heartbeat expired) at once, and of live ones idle past
        `min_idle_ms` (hung); dead-letter those delivered too often. Returns how many this worker took."""
        stream = self.keys.jobs(model)
        await self.groups.ensure(stream)
        await self._keep_held_fresh(stream, model)
        taken = 0
        consumers = await self.r.xinfo_consumers(stream, GROUP)
        others = [c for c in consumers if _name(c) != self.name]
        alive = await self.heartbeats.alive([_name(c) for c in others])
        for c in others:
            name = _name(c)
            if name in alive:
                continue
            if int(c.get("pending") or 0) == 0:
                await self.r.xgroup_delconsumer(stream, GROUP, name)  # a departed worker: keep XINFO small
                continue
            pending = await self.r.xpending_range(stream, GROUP, "-", "+", RECLAIM_BATCH, consumername=name)
            times = {p["message_id"]: int(p["times_delivered"]) for p in pending}
            # min-idle of one heartbeat: two reapers racing for the same dead worker do not both win.
            claimed = await self.r.xclaim(
                stream, GROUP, self.name, int(self.heartbeats.heartbeat_s * 1000), list(times)
            )
            for entry_id, fields in claimed:
                taken += await self._take_over(model, entry_id, fields, times.get(entry_id, 1) + 1, dead=True)
        # Hung: idle past min_idle_ms under a live heartbeat (never our own: we know what we hold).
        idle = await self.r.xpending_range(stream, GROUP, "-", "+", RECLAIM_BATCH, idle=self.min_idle_ms)
        stuck = {p["message_id"]: int(p["times_delivered"]) for p in idle if _name(p) != self.name}
        if stuck:
            claimed = await self.r.xclaim(stream, GROUP, self.name, self.min_idle_ms, list(stuck))
            for entry_id, fields in claimed:
                taken += await self._take_over(model, entry_id, fields, stuck.get(entry_id, 1) + 1, dead=False)
        return taken

    async def _keep_held_fresh(self, stream: str, model: str) -> None:
        """Jobs read ahead wait for the batch before them; while batches keep starting they are not hung."""
        if (time.monotonic() - self._last_progress) * 1000 >= self.min_idle_ms / 2:
            return  # no batch started for a while: if the device is stuck, let other workers take them
        ids = [entry_id for entry_id, m in self._held.items() if m == model]
        if ids:
            await self.scripts.touch(stream, GROUP, self.name, ids)

    async def _take_over(
        self, model: str, entry_id: bytes, fields: dict[bytes, bytes] | None, delivered: int, dead: bool
    ) -> int:
        delivery = await self._delivery(model, entry_id, fields, times=delivered)
        if delivery is None:
            return 0
        if dead:
            self.stats.reclaimed_from_dead += 1
        else:
            self.stats.reclaimed_from_hung += 1
        metrics.JOBS_RECLAIMED.labels(model).inc()
        if delivery.attempt > self.max_deliveries:
            await self.dead_letter(
                delivery, f"delivered {delivery.attempt - 1} times without an answer (its workers died)"
            )
            return 0
        log.info(
            "reclaimed job %s (request %s) of %s from a %s worker, delivery %d",
            delivery.job.id, delivery.job.request_id, model, "dead" if dead else "hung", delivery.attempt,
        )  # fmt: skip
        self.reclaimed[model].append(delivery)
        return 1

    async def reap_forever(self, models: list[str], closed: asyncio.Event, interval_s: float) -> None:
        while not closed.is_set():
            await asyncio.sleep(interval_s)
            for model in list(models):
                try:
                    await self.reap(model)
                except (RedisError, OSError) as exc:
                    log.debug("reaper: %s", exc)
                    self.groups.forget()


def _name(row: dict) -> str:
    """The consumer's name in an XINFO CONSUMERS or XPENDING row."""
    name = row.get("name", row.get("consumer"))
    return name.decode() if isinstance(name, bytes) else str(name)
