"""The front-end side: put a job in its model's stream and await the reply on this instance's reply stream.

One XREAD loop per API instance resolves the waiting requests' futures and deletes every reply it has read,
so replies hold memory only while in transit. Results are kept (`result:{id}`) only for requests that send
an Idempotency-Key, so a retry, on any instance, gets the same answer without computing again: once delivered
to the waiting client only for `answer_grace_s` (a retry after an answer lost in transit), the full
`result_ttl_s` when the client left first, and never past the deployment's `answer_store_bytes` budget (the
worker's FINISH script checks it; a retry of an answer not kept computes again).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Coroutine
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import DeadlineExceeded, InvalidParameter, QueueFull, ServiceError, Unavailable
from service.jobs import Job, Reply
from service.queue.base import DrainRate, QueueStats, fingerprint
from service.queue.redis.connection import is_oom, unavailable
from service.queue.redis.counters import RedisStats
from service.queue.redis.keys import REPLY_STREAM_TTL_S, Keys
from service.queue.redis.scripts import Scripts
from service.queue.redis.streams import Groups, group_info, job_fields, read_reply, stats_of

log = logging.getLogger(__name__)

# Delete an Idempotency-Key only while it still names our job (another instance may have claimed it since).
RELEASE_IF_OURS = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class Submitter:
    def __init__(
        self,
        r: Redis,
        rb: Redis,
        keys: Keys,
        groups: Groups,
        stats: RedisStats,
        *,
        where: str,
        max_depth: int,
        stream_maxlen: int,
        result_ttl_s: int,
        answer_grace_s: float,
        scripts: Scripts,
    ) -> None:
        self.r, self.rb = r, rb  # rb: the blocking client (no socket timeout) for the reply loop
        self.keys = keys
        self.groups = groups
        self.stats = stats
        self.where = where
        self.max_depth = max_depth
        self.stream_maxlen = stream_maxlen
        self.result_ttl_s = result_ttl_s
        self.answer_grace_s = answer_grace_s
        self.scripts = scripts
        self.reply_stream = keys.replies(uuid.uuid4().hex[:12])
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._loop: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()  # fire-and-forget writes (cancel markers)
        self._rates: dict[str, DrainRate] = defaultdict(DrainRate)
        self._entries_read: dict[str, int] = {}
        self.closed = False

    async def close(self) -> None:
        self.closed = True
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=1.0)
        self.fail_waiting(Unavailable("the service is shutting down"))
        with contextlib.suppress(RedisError, OSError):
            await self.r.delete(self.reply_stream)

    def fail_waiting(self, error: ServiceError) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)

    async def submit(self, job: Job, idempotency_key: str | None = None) -> Reply:
        if self.closed:
            raise Unavailable("the service is shutting down")
        if job.expired():
            raise DeadlineExceeded(f"job {job.id} was already past its deadline when enqueued")
        job.reply_to = self.reply_stream
        job.keep_result = idempotency_key is not None
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._reply_loop(), name="dense-replies")
        stream = self.keys.jobs(job.model)
        # What this job's claim of the key says (its own job id: releasing it can never free another's claim).
        # Known before the SET is sent: a client leaving while the SET is on the wire leaves us unsure whether
        # Redis took it, and the release below must cover that too.
        claimed = self._claim_value(job) if idempotency_key is not None else None
        add: asyncio.Task[Any] | None = None
        try:
            while idempotency_key is not None:
                existing = await self._claim_key(idempotency_key, job, claimed)
                if existing is None:
                    break
                job_id, its_deadline = existing
                reply = await self._await_existing(job_id, job.deadline, its_deadline)
                if reply is not None:
                    self._delivered(job_id, idempotency_key)
                    return reply
                # That job was answered and its answer is no longer kept, or it never came (its deadline passed
                # unanswered: an XADD whose reply was lost may not have added it): claim the key again.
            await self._check_depth(job.model)
            future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            self._waiting[job.id] = future
            await self.groups.ensure(stream)
            # Shielded: a client leaving while the XADD is on the wire must not leave us unsure whether the job
            # exists (Redis may have added it); the task's outcome says, and the except branch acts on it.
            add = asyncio.create_task(
                self.r.xadd(stream, job_fields(job, attempt=1), maxlen=self.stream_maxlen, approximate=True)
            )
            await asyncio.shield(add)
        except BaseException as exc:
            # Not enqueued (refused, Redis lost, or the client left first): a claimed key must not make a retry
            # wait for a job that will never exist. If the client left during the XADD, wait for it: a job
            # that made it into the stream keeps its key (the retry gets its stored answer) or, without a key,
            # is marked cancelled so no worker computes it for nobody.
            self._waiting.pop(job.id, None)
            if add is not None or claimed is not None:
                self._in_background(self._settle_unqueued(job, add, idempotency_key, claimed), f"dense-settle-{job.id}")
            if isinstance(exc, RedisError | OSError):
                if is_oom(exc):
                    self.stats.rejected_out_of_memory += 1
                raise unavailable(exc, self.where) from exc
            raise
        try:
            reply = await asyncio.wait_for(asyncio.shield(future), timeout=max(0.0, job.deadline - time.time()))
            if idempotency_key is not None:
                self._delivered(job.id, idempotency_key)
            return reply
        except TimeoutError:
            raise DeadlineExceeded(f"no answer within the deadline for job {job.id}") from None
        except asyncio.CancelledError:
            # The client went away (disconnect, gRPC cancel, a stream closed): tell the workers, so a job still
            # waiting in the stream or read ahead by a worker is dropped instead of computed. Not for a request
            # with an Idempotency-Key: its client retries, and the retry waits for this job's stored answer.
            if not job.keep_result:
                self._mark_cancelled(job)
            raise
        finally:
            self._waiting.pop(job.id, None)

    def _delivered(self, job_id: str, key: str) -> None:
        """The answer reached its client, which was still waiting: keep it only `answer_grace_s` from now."""
        keys = [self.keys.result(job_id), self.keys.answered(job_id), self._idem_key(key), self.keys.kept_expiry()]
        self._in_background(self._shorten(keys, job_id), f"dense-delivered-{job_id}")

    async def _shorten(self, keys: list[str], job_id: str) -> None:
        with contextlib.suppress(RedisError, OSError):  # best effort: without it the answer lives its full TTL
            await self.scripts.delivered(keys, job_id, self.answer_grace_s)

    def _mark_cancelled(self, job: Job) -> None:
        ttl = max(1, int(job.deadline - time.time()) + 1)
        self._in_background(self._set_cancel_marker(job.id, ttl), f"dense-cancel-{job.id}")

    def _in_background(self, write: Coroutine[Any, Any, None], name: str) -> None:
        """Run a best-effort write that must outlive a cancelled request."""
        task = asyncio.create_task(write, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _settle_unqueued(
        self, job: Job, add: asyncio.Task[Any] | None, key: str | None, claimed: bytes | None
    ) -> None:
        """After a failed or abandoned submit: release the claimed key unless the job did reach the stream; a
        job that reached it without a key is marked cancelled (its client is gone)."""
        queued = False
        if add is not None:
            with contextlib.suppress(BaseException):
                await add
            # A reply that timed out leaves it unknown whether Redis added the job: count it as queued, so a
            # job without a key is marked cancelled, and a keyed one keeps its key (a retry waits for it, at
            # most until its deadline, then computes anew).
            queued = (
                add.done()
                and not add.cancelled()
                and (add.exception() is None or isinstance(add.exception(), RedisTimeoutError))
            )
        if not queued:
            if key is not None and claimed is not None:
                await self._release_key(key, claimed)
        elif not job.keep_result:
            await self._set_cancel_marker(job.id, max(1, int(job.deadline - time.time()) + 1))

    async def _release_key(self, key: str, value: bytes) -> None:
        with contextlib.suppress(RedisError, OSError):  # best effort: without it the key expires with its TTL
            await self.r.eval(RELEASE_IF_OURS, 1, self._idem_key(key), value)

    async def _set_cancel_marker(self, job_id: str, ttl: int) -> None:
        with contextlib.suppress(RedisError, OSError):  # best effort: without it the job is computed, as before
            await self.r.set(self.keys.cancel(job_id), b"1", ex=ttl)

    async def _check_depth(self, model: str) -> None:
        """429 when the jobs in flight for the model (waiting + pending = XLEN) reach `max_depth`."""
        group, length = await group_info(self.r, self.keys.jobs(model))
        if group is None:
            return  # no stream yet: nothing waits
        read = group.get("entries-read")
        if isinstance(read, int):
            last = self._entries_read.get(model)
            if last is not None and read > last:
                self._rates[model].record(read - last)
            self._entries_read[model] = read
        stats = stats_of(group, length)
        depth = stats.depth + (stats.pending or 0)
        if depth >= self.max_depth:
            raise QueueFull(
                f"{depth} jobs are pending or waiting for model '{model}' (limit {self.max_depth})",
                retry_after=self._rates[model].retry_after(depth),
            )

    async def queue_stats(self, model: str) -> QueueStats:
        return stats_of(*await group_info(self.r, self.keys.jobs(model)))

    def _idem_key(self, key: str) -> str:
        return self.keys.idem(hashlib.sha256(key.encode()).hexdigest())

    @staticmethod
    def _claim_value(job: Job) -> bytes:
        return f"{job.id}|{fingerprint(job)}|{job.deadline}".encode()

    async def _claim_key(self, key: str, job: Job, value: bytes) -> tuple[str, float] | None:
        """Register the key for this job (claimed as `value`), or return the job id and deadline of an earlier
        live submission instead."""
        idem = self._idem_key(key)
        if await self.r.set(idem, value, nx=True, ex=self.result_ttl_s):
            return None
        stored = await self.r.get(idem)
        if stored is None:
            await self.r.set(idem, value, ex=self.result_ttl_s)
            return None
        job_id, fp, deadline = stored.decode().split("|")
        if fp != fingerprint(job):
            raise InvalidParameter("Idempotency-Key was already used for a different request", field="Idempotency-Key")
        if not await self.r.exists(self.keys.result(job_id)) and (
            float(deadline) < time.time() or await self.r.exists(self.keys.answered(job_id))
        ):
            # That attempt expired unanswered, or was answered and its answer not kept: start anew.
            await self.r.set(idem, value, ex=self.result_ttl_s)
            return None
        return job_id, float(deadline)

    async def _await_existing(self, job_id: str, deadline: float, its_deadline: float) -> Reply | None:
        """The earlier submission's answer, once there; None when it was answered and its answer is not kept, or
        when its own deadline passed without an answer (a worker answers a job by then, or drops it)."""
        while time.time() < deadline:
            if time.time() > its_deadline + 1.0 and job_id not in self._waiting:
                return None
            future = self._waiting.get(job_id)
            if future is not None:
                try:
                    return await asyncio.wait_for(asyncio.shield(future), timeout=max(0.0, deadline - time.time()))
                except TimeoutError:
                    break
            async with self.r.pipeline(transaction=True) as pipe:
                stored, answered = (
                    await pipe.hgetall(self.keys.result(job_id)).exists(self.keys.answered(job_id)).execute()
                )
            if stored:
                return read_reply(stored)
            if answered:
                return None
            await asyncio.sleep(0.05)
        raise DeadlineExceeded(f"no answer within the deadline for job {job_id}")

    async def _reply_loop(self) -> None:
        last_id = b"0-0"
        backoff = 0.1
        connected = True
        next_refresh = 0.0
        while not self.closed:
            try:
                if time.monotonic() >= next_refresh:
                    await self.r.expire(self.reply_stream, REPLY_STREAM_TTL_S)
                    next_refresh = time.monotonic() + REPLY_STREAM_TTL_S / 3
                response = await self.rb.xread({self.reply_stream: last_id}, count=256, block=1000)
            except (RedisError, OSError) as exc:
                if connected:
                    log.warning("reply stream: lost Redis (%s); failing %d waiting requests", exc, len(self._waiting))
                    self.fail_waiting(unavailable(exc, self.where))
                    connected = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if not connected:
                log.info("reply stream: Redis is back")
                connected, backoff, next_refresh = True, 0.1, 0.0
                self.groups.forget()
            read: list[bytes] = []
            for _stream, entries in response or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    read.append(entry_id)
                    reply = read_reply(fields)
                    future = self._waiting.get(reply.id)
                    if future is not None and not future.done():
                        future.set_result(reply)
                    elif reply.status == "ok":
                        self.stats.orphan_replies += 1
            if read:
                with contextlib.suppress(RedisError, OSError):  # left behind, they expire with the stream
                    await self.r.xdel(self.reply_stream, *read)
