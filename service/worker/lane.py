"""Dynamic batching for one model: gather jobs, group them by processing shape, run a group when it is
full or its oldest job has waited `max_queue_delay_ms`, reply to each job."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial

from models.inference import BatchItem, UncertaintyResult
from models.outputs import PredictionMap
from service import codec, logs, metrics, tracing
from service.errors import (
    DeadlineExceeded,
    InvalidParameter,
    ModelFailure,
    PayloadTooLarge,
    ServiceError,
    Unavailable,
    UnsupportedMedia,
)
from service.jobs import ErrorInfo, Job, Reply
from service.queue.base import Broker, Delivery
from service.worker.encode import encode_prediction, encode_uncertainty, uncertainty_metadata
from service.worker.registry import ServedModel
from service.worker.stats import WorkerStats

log = logging.getLogger(__name__)
IDLE_POLL_S = 0.25
BACKOFF_MAX_S = 2.0


@dataclass
class Prepared:
    delivery: Delivery
    item: BatchItem
    key: tuple[object, ...]

    @property
    def job(self) -> Job:
        return self.delivery.job


class Lane:
    def __init__(
        self,
        broker: Broker,
        served: ServedModel,
        max_pixels: int,
        io_pool: Executor,
        compute_pool: Executor,
        stats: WorkerStats,
    ) -> None:
        self.broker = broker
        self.served = served
        self.model = served.predictor
        self.model_id = served.info.id
        self.max_batch = served.info.max_batch_size
        self.max_delay_s = served.info.max_queue_delay_ms / 1000.0
        self.max_pixels = max_pixels
        self.io_pool = io_pool
        self.compute_pool = compute_pool
        self.stats = stats
        self.busy = False

    async def run(self, stop: asyncio.Event) -> None:
        pending: list[Prepared] = []
        backoff = 0.05
        while not (stop.is_set() and not pending):
            deliveries: list[Delivery] = []
            if not stop.is_set():
                wait = self._time_to_due(pending) if pending else IDLE_POLL_S
                try:
                    deliveries = await self.broker.consume(self.model_id, self.max_batch, wait)
                    backoff = 0.05
                except Unavailable as exc:  # the queue is down: keep what we hold, retry with backoff
                    log.warning("lane %s: %s; retrying in %.2fs", self.model_id, exc.detail, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
            # One look per round at which held or new jobs their clients gave up on (Redis cancel markers).
            await self.broker.refresh_abandoned([*(p.delivery for p in pending), *deliveries])
            pending.extend(await self._prepare(deliveries))
            pending = await self._drop_dead(pending)
            batch = self._take_due(pending, force=stop.is_set())
            if batch:
                self.busy = True
                try:
                    await self._execute(batch)
                finally:
                    self.busy = False

    # ------------------------------------------------------------------ batching

    def _time_to_due(self, pending: list[Prepared]) -> float:
        oldest = min(p.job.enqueued_at for p in pending)
        return max(0.0, oldest + self.max_delay_s - time.time())

    def _take_due(self, pending: list[Prepared], force: bool) -> list[Prepared]:
        if not pending:
            return []
        oldest = min(pending, key=lambda p: p.job.enqueued_at)
        group = [p for p in pending if p.key == oldest.key][: self.max_batch]
        due = (
            force
            or oldest.job.kind == "uncertainty"  # a multi-seed job is a whole batch by itself
            or len(group) >= self.max_batch
            or time.time() >= oldest.job.enqueued_at + self.max_delay_s
        )
        if not due:
            return []
        for p in group:
            pending.remove(p)
        return group

    async def _drop_dead(self, pending: list[Prepared]) -> list[Prepared]:
        now = time.time()
        return [p for p in pending if not await self._dispose_if_dead(p.delivery, now)]

    async def _dispose_if_dead(self, delivery: Delivery, now: float) -> bool:
        """Never compute (or even decode) work nobody waits for: abandoned requests, expired deadlines."""
        if delivery.abandoned():
            await self._finish(delivery, Reply(id=delivery.job.id, status="dropped"))
            return True
        if delivery.job.expired(now):
            error = DeadlineExceeded("the deadline passed before the job was computed")
            await self._fail(delivery, error, status="expired")
            return True
        return False

    # ------------------------------------------------------------------ stages

    async def _prepare(self, deliveries: list[Delivery]) -> list[Prepared]:
        now = time.time()
        deliveries = [d for d in deliveries if not await self._dispose_if_dead(d, now)]
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(self.io_pool, self._decode, d) for d in deliveries), return_exceptions=True
        )
        prepared = []
        for delivery, result in zip(deliveries, results, strict=True):
            if isinstance(result, ServiceError):
                await self._fail(delivery, result)
            elif isinstance(result, BaseException):
                await self._fail(delivery, ModelFailure(f"could not prepare the image: {result}"))
            else:
                prepared.append(result)
        return prepared

    def _decode(self, delivery: Delivery) -> Prepared:
        job = delivery.job
        try:
            if job.raw_shape:
                image = codec.decode_raw_rgb(job.image, job.raw_shape[0], job.raw_shape[1], self.max_pixels)
            else:
                image = codec.decode_image(job.image, self.max_pixels)
        except codec.ImageTooLargeError as exc:
            raise PayloadTooLarge(str(exc)) from exc
        except codec.ImageDecodeError as exc:
            raise UnsupportedMedia(str(exc)) from exc
        try:
            geometry = self.model.plan(image, job.params.processing_res)
        except ValueError as exc:
            raise InvalidParameter(str(exc), field="processing_res") from exc
        seed = self.model.resolve_seed(job.params.seed)
        item = BatchItem(image, geometry, seed, job.params.match_input_resolution)
        key: tuple[object, ...] = (job.kind, geometry.padded_hw) if job.kind == "predict" else (job.kind, job.id)
        return Prepared(delivery, item, key)

    async def _execute(self, batch: list[Prepared]) -> None:
        loop = asyncio.get_running_loop()
        started = time.time()
        for p in batch:
            self.stats.record_queue_wait(self.model_id, started - p.job.enqueued_at)
        stages: dict[str, float] = {}
        try:
            if batch[0].job.kind == "uncertainty":
                job = batch[0].job
                result = await loop.run_in_executor(
                    self.compute_pool,
                    self.model.predict_uncertainty,
                    batch[0].item,
                    job.params.seeds or [],
                    job.params.reduction,
                    job.params.return_members,
                )
                stages["uncertainty"] = time.time() - started  # encode once + every seed's head, one call
                self.stats.record_forward(self.model_id, len(job.params.seeds or []), stages)
            else:
                maps = await loop.run_in_executor(
                    self.compute_pool, self.model.predict_batch, [p.item for p in batch], stages
                )
                self.stats.record_forward(self.model_id, len(batch), stages)
        except Exception as exc:
            if len(batch) > 1:
                # Isolate the failure: rerun one by one so only the job that breaks the model fails.
                log.warning("batch of %d failed on %s (%s); retrying one by one", len(batch), self.model_id, exc)
                for p in batch:
                    await self._execute([p])
                return
            with logs.context(batch[0].job.request_id, batch[0].job.traceparent):
                log.exception("model %s failed on job %s", self.model_id, batch[0].job.id)
            self.stats.record_outcome(self.model_id, "error")
            await self.broker.reject(batch[0].delivery, ModelFailure(f"model '{self.model_id}' failed: {exc}"))
            return
        compute_ms = (time.time() - started) * 1000.0
        if batch[0].job.kind == "uncertainty":
            calls = [partial(self._encode_uncertainty, batch[0], result, started, compute_ms)]
        else:
            calls = [
                partial(self._encode_prediction, p, m, started, compute_ms, len(batch))
                for p, m in zip(batch, maps, strict=True)
            ]
        encode_start = time.perf_counter()
        replies = await asyncio.gather(*(loop.run_in_executor(self.io_pool, call) for call in calls))
        metrics.COMPUTE_SECONDS.labels(self.model_id, "output_encode").observe(time.perf_counter() - encode_start)
        done = time.time()
        for p, reply in zip(batch, replies, strict=True):
            tp = p.job.traceparent
            tracing.record("dense.queue", tp, p.job.enqueued_at, started, model=self.model_id)
            tracing.record("dense.compute", tp, started, done, model=self.model_id, batch_size=len(batch))
            await self._finish(p.delivery, reply)

    def _encode_prediction(
        self, p: Prepared, pred: PredictionMap, started: float, compute_ms: float, batch_size: int
    ) -> Reply:
        t0 = time.perf_counter()
        data = encode_prediction(pred, p.job.params.encoding)
        return Reply(
            id=p.job.id,
            status="ok",
            outputs={"prediction": data},
            metadata=pred.metadata(),
            timings=_timings(p.job, started, compute_ms, t0),
            batch_size=batch_size,
        )

    def _encode_uncertainty(self, p: Prepared, result: UncertaintyResult, started: float, compute_ms: float) -> Reply:
        t0 = time.perf_counter()
        return Reply(
            id=p.job.id,
            status="ok",
            outputs=encode_uncertainty(result, p.job.params.encoding),
            metadata=uncertainty_metadata(result),
            timings=_timings(p.job, started, compute_ms, t0),
            batch_size=len(result.seeds),
        )

    async def _fail(self, delivery: Delivery, error: ServiceError, status: str = "error") -> None:
        await self._finish(
            delivery, Reply(id=delivery.job.id, status=status, error=ErrorInfo(code=error.code, detail=error.detail))
        )

    async def _finish(self, delivery: Delivery, reply: Reply) -> None:
        job = delivery.job
        self.stats.record_outcome(self.model_id, reply.status)
        with logs.context(job.request_id, job.traceparent):  # the broker's own lines about it too
            log.debug("job %s on %s: %s %s", job.id, self.model_id, reply.status, reply.timings or "")
            await self.broker.reply(delivery, reply)


def _timings(job: Job, started: float, compute_ms: float, encode_start: float) -> dict[str, float]:
    return {
        "queue": max(0.0, (started - job.enqueued_at) * 1000.0),
        "compute": compute_ms,
        "encode": (time.perf_counter() - encode_start) * 1000.0,
    }
