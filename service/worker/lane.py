"""Dynamic batching for one model as a three-stage pipeline, so the device never waits for the CPU:

1. read: take jobs from the broker (at most one batch ahead of the device) and decode each on the I/O pool
   as it arrives;
2. device: form a batch of one processing shape and run it (pre-processing, model, resize back and
   quantisation on the runtime's device), one batch at a time;
3. reply: encode each map on the I/O pool (every core) and answer, while the device runs the next batch.

Bounded between stages: the reader holds at most `max_batch` jobs beyond the batch computing, and one
computed batch waits for the encoder. A free device starts at once with what is decoded (continuous
batching: under load the next batch fills while the current one computes); it waits up to
`max_queue_delay_ms` only for jobs already read whose decode is still running. Deadlines and cancel markers
are checked when a job is read, when its batch forms and before it is encoded; a failing batch is rerun one
job at a time so only the job that breaks the model fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from functools import partial

from models.inference import BatchItem, UncertaintyResult
from models.multistep import MultiStepPredictor, StepBatch
from models.outputs import PredictionMap
from models.probes.depth_probe import DepthProbe
from models.probes.segmenter import Probe, Segmentation
from service import codec, logs, metrics, tracing
from service.config import Settings
from service.errors import (
    DeadlineExceeded,
    InvalidParameter,
    ModelFailure,
    PayloadTooLarge,
    ServiceError,
    Unavailable,
    UnsupportedMedia,
)
from service.jobs import Job, Reply
from service.queue.base import Broker, Delivery
from service.worker.encode import (
    FORM_OF,
    EncodeOptions,
    encode_prediction,
    encode_prediction_outputs,
    encode_segmentation,
    encode_uncertainty,
    prediction_metadata,
    segmentation_metadata,
    uncertainty_metadata,
)
from service.worker.prepare import decode_for
from service.worker.registry import ServedModel
from service.worker.stats import WorkerStats
from service.worker.steps import StepTimer

log = logging.getLogger(__name__)
IDLE_POLL_S = 0.25
BACKOFF_MAX_S = 2.0


@dataclass
class Prepared:
    """A decoded job waiting for the device."""

    delivery: Delivery
    item: BatchItem
    key: tuple[object, ...]
    decode_ms: float

    @property
    def job(self) -> Job:
        return self.delivery.job


@dataclass
class Computed:
    """A batch the device finished: its maps on the CPU in their final form, or one uncertainty result."""

    batch: list[Prepared]
    started: float
    stages: dict[str, float]
    maps: list[PredictionMap] = field(default_factory=list)
    uncertainty: UncertaintyResult | None = None
    shared: int = 0  # multi-step: members that shared the job's last step (its batch size)
    segments: list[Segmentation] | None = None


class Lane:
    def __init__(
        self,
        broker: Broker,
        served: ServedModel,
        settings: Settings,
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
        self.max_pixels = settings.max_pixels
        self.jpeg_draft = settings.jpeg_draft
        self.options = EncodeOptions(settings.png_compression, settings.tiff_compression)
        self.io_pool = io_pool
        self.compute_pool = compute_pool
        self.stats = stats
        self.busy = False  # the device is computing a batch of this lane
        self._pending: list[Prepared] = []
        self._decoding: set[asyncio.Task[None]] = set()
        self._ready = asyncio.Event()  # set when a decode finishes: the device may form a batch
        self._room = asyncio.Event()  # set when a batch is taken: the reader may read again
        self._device_free_at = time.time()
        self.multi_step = self.model.multi_step
        self.step_timer = StepTimer()  # measured time per denoising step (steps=auto); tests pin it

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`, then drain: every job already read is computed (or expired) and answered."""
        computed: asyncio.Queue[Computed | None] = asyncio.Queue(maxsize=1)
        reader = asyncio.create_task(self._read(stop), name=f"lane-read-{self.model_id}")
        replier = asyncio.create_task(self._reply_all(computed), name=f"lane-reply-{self.model_id}")
        try:
            while (batch := await self._next_batch(stop, reader)) is not None:
                if self.multi_step and batch[0].job.kind == "predict" and batch[0].job.params.probe is None:
                    async for done in self._compute_steps(batch):
                        await computed.put(done)
                    continue
                for done in await self._compute(batch):
                    await computed.put(done)  # waits while the encoder is a batch behind: bounded memory
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await computed.put(None)
            await replier

    # ------------------------------------------------------------------ stage 1: read and decode

    async def _read(self, stop: asyncio.Event) -> None:
        backoff = 0.05
        while not stop.is_set():
            self._room.clear()
            room = self.max_batch - len(self._pending) - len(self._decoding)
            if room <= 0:
                await _wait(self._room, IDLE_POLL_S)
                continue
            try:
                deliveries = await self.broker.consume(self.model_id, room, IDLE_POLL_S)
                backoff = 0.05
            except Unavailable as exc:  # the queue is down: keep what we hold, retry with backoff
                log.warning("lane %s: %s; retrying in %.2fs", self.model_id, exc.detail, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                continue
            if not deliveries:
                continue
            await self.broker.refresh_abandoned(deliveries)
            now = time.time()
            for delivery in deliveries:
                if not await self._dispose_if_dead(delivery, now):
                    task = asyncio.create_task(self._decode_one(delivery))
                    self._decoding.add(task)
                    task.add_done_callback(self._decoded)

    def _decoded(self, task: asyncio.Task[None]) -> None:
        self._decoding.discard(task)
        self._ready.set()

    async def _decode_one(self, delivery: Delivery) -> None:
        loop = asyncio.get_running_loop()
        try:
            prepared = await loop.run_in_executor(self.io_pool, self._decode, delivery)
        except ServiceError as exc:
            await self._fail(delivery, exc)
        except Exception as exc:
            await self._fail(delivery, ModelFailure(f"could not prepare the image: {exc}"))
        else:
            self._pending.append(prepared)

    def _decode(self, delivery: Delivery) -> Prepared:
        start = time.perf_counter()
        job = delivery.job
        res = job.params.processing_res
        if job.params.probe is not None and res is None and job.params.probe in self.served.probes:
            res = self.served.probes[job.params.probe].manifest.processing_res  # what the probe was trained at
        try:
            if job.raw_shape:
                pixels = codec.decode_raw_rgb(job.image, job.raw_shape[0], job.raw_shape[1], self.max_pixels)
                size = (job.raw_shape[0], job.raw_shape[1])
                geometry = self.model.plan_size(size[0], size[1], res)
            else:
                pixels, geometry = decode_for(self.model, job.image, res, self.max_pixels, self.jpeg_draft)
        except codec.ImageTooLargeError as exc:
            raise PayloadTooLarge(str(exc)) from exc
        except codec.ImageDecodeError as exc:
            raise UnsupportedMedia(str(exc)) from exc
        except ValueError as exc:
            raise InvalidParameter(str(exc), field="processing_res") from exc
        seed = self.model.resolve_seed(job.params.seed)
        form = FORM_OF[job.params.encoding] if job.kind == "predict" else "float32"
        steps = job.params.steps if isinstance(job.params.steps, int) else None  # auto: chosen at admission
        item = BatchItem(
            pixels,
            geometry,
            seed,
            job.params.match_input_resolution,
            form,
            steps,
            job.params.ensemble_size,
            step_uncertainty=job.kind == "predict" and job.params.uncertainty == "steps" and self.multi_step,
        )
        key: tuple[object, ...] = (job.kind, geometry.padded_hw) if job.kind == "predict" else (job.kind, job.id)
        if job.task == "segment" or job.params.probe is not None:  # one probe and one answer shape per batch;
            if job.params.probe not in self.served.probes:  # the UNet pass is the base model's
                raise InvalidParameter(f"probe '{job.params.probe}' is not attached to {self.model_id}", field="model")
            key = (job.task, job.params.probe, job.params.with_depth, geometry.padded_hw)
        return Prepared(delivery, item, key, (time.perf_counter() - start) * 1000.0)

    # ------------------------------------------------------------------ stage 2: batch and compute

    async def _next_batch(self, stop: asyncio.Event, reader: asyncio.Task[None]) -> list[Prepared] | None:
        """The next batch once the device is free; None when stopped and nothing is left."""
        waiting_since: float | None = None
        while True:
            self._ready.clear()
            if self._pending:
                # One look per batch at which held jobs their clients gave up on (Redis cancel markers).
                await self.broker.refresh_abandoned([p.delivery for p in self._pending])
                now = time.time()
                held = len(self._pending)
                self._pending = [p for p in self._pending if not await self._dispose_if_dead(p.delivery, now)]
                if len(self._pending) < held:
                    self._room.set()
            if self._pending:
                group = self._oldest_group()
                if len(group) >= self.max_batch or group[0].job.kind == "uncertainty" or not self._decoding:
                    return self._take(group)
                # Jobs already read are still decoding: they may join, for at most max_queue_delay_ms.
                waiting_since = waiting_since or time.monotonic()
                remaining = waiting_since + self.max_delay_s - time.monotonic()
                if remaining <= 0:
                    return self._take(group)
                await _wait(self._ready, remaining)
            elif stop.is_set() and reader.done() and not self._decoding:
                return None
            else:
                await _wait(self._ready, IDLE_POLL_S)

    def _oldest_group(self) -> list[Prepared]:
        oldest = min(self._pending, key=lambda p: p.job.enqueued_at)
        return sorted((p for p in self._pending if p.key == oldest.key), key=lambda p: p.job.enqueued_at)[
            : self.max_batch
        ]

    def _take(self, group: list[Prepared]) -> list[Prepared]:
        taken = {id(p) for p in group}
        self._pending = [p for p in self._pending if id(p) not in taken]
        self._room.set()
        return group

    async def _compute(self, batch: list[Prepared]) -> list[Computed]:
        """One forward pass; on failure, each job alone, so only the one that breaks the model fails."""
        loop = asyncio.get_running_loop()
        started = time.time()
        # How long the device sat idle while this batch's work was already in the worker: the pipeline's stall.
        idle_s = max(0.0, started - max(self._device_free_at, min(p.delivery.received_at for p in batch)))
        for p in batch:
            self.stats.record_queue_wait(self.model_id, started - p.job.enqueued_at)
        stages: dict[str, float] = {}
        done = Computed(batch, started, stages)
        failure: Exception | None = None
        await self.broker.computing([p.delivery for p in batch])
        log.debug(
            "computing %d jobs on %s, requests: %s",
            len(batch),
            self.model_id,
            ",".join(p.job.request_id for p in batch),
        )
        self.busy = True
        try:
            probe = self.served.probes.get(batch[0].job.params.probe or "")
            if isinstance(probe, DepthProbe):  # a depth probe: its maps answer like the base model's
                done.maps = await loop.run_in_executor(self.compute_pool, probe.depth, [p.item for p in batch], stages)
                self.stats.record_forward(self.model_id, len(batch), stages, idle_s)
            elif batch[0].job.task == "segment":
                params = batch[0].job.params
                assert isinstance(probe, Probe)
                done.segments, depth = await loop.run_in_executor(
                    self.compute_pool, probe.segment, [p.item for p in batch], params.with_depth, stages
                )
                done.maps = depth or []
                self.stats.record_forward(self.model_id, len(batch), stages, idle_s)
            elif batch[0].job.kind == "uncertainty":
                job = batch[0].job
                done.uncertainty = await loop.run_in_executor(
                    self.compute_pool,
                    partial(
                        self.model.predict_uncertainty,
                        self._with_steps(batch[0], started),
                        job.params.seeds or [],
                        job.params.reduction,
                        job.params.return_members,
                        method=job.params.method,
                    ),
                )
                stages["uncertainty"] = time.time() - started  # encode once + every seed's head, one call
                self.stats.record_forward(self.model_id, len(job.params.seeds or []), stages, idle_s)
            else:
                done.maps = await loop.run_in_executor(
                    self.compute_pool, self.model.predict_batch, [p.item for p in batch], stages
                )
                self.stats.record_forward(self.model_id, len(batch), stages, idle_s)
        except Exception as exc:
            failure = exc
        finally:
            self.busy = False
            self._device_free_at = time.time()
            log.debug(
                "batch of %d on %s: device %.1f ms after %.1f ms idle with work in hand",
                len(batch),
                self.model_id,
                (self._device_free_at - started) * 1000,
                idle_s * 1000,
            )
        return [done] if failure is None else await self._isolate(batch, failure)

    def _with_steps(self, p: Prepared, now: float) -> BatchItem:
        """The job's item with `steps=auto` resolved: the most steps that fit what is left of its deadline at
        the lane's measured time per step (single-step families: 1); at least 2 when the answer carries the
        change between steps (uncertainty=steps)."""
        if p.job.params.steps != "auto" or not self.multi_step:
            return p.item
        top = self.model.auto_max_steps
        steps = self.step_timer.choose(p.job.deadline - now, top)
        if p.item.step_uncertainty:
            steps = max(steps, min(2, top))
        return replace(p.item, steps=steps)

    async def _compute_steps(self, batch: list[Prepared]) -> AsyncIterator[Computed]:
        """Multi-step models: the batch's jobs step together, one UNet call per step over all of them, each
        at its own timestep; a job leaves when its steps are done (answered at once), and jobs of the same
        shape that arrived meanwhile join before the next step, while the members in flight fit `max_batch`."""
        loop = asyncio.get_running_loop()
        assert isinstance(self.model, MultiStepPredictor)
        stepper = self.model.stepper()
        shape_key = batch[0].key
        held: dict[int, tuple[Prepared, float]] = {}
        await self._admit(stepper, batch, held)
        while stepper.active:
            await self._drop_dead(stepper, held)
            if not stepper.active:
                break
            stages: dict[str, float] = {}
            members = stepper.members
            started = time.time()
            idle_s = max(0.0, started - self._device_free_at)
            self.busy = True
            try:
                finished = await loop.run_in_executor(self.compute_pool, self._step_and_finish, stepper, stages)
            except Exception as exc:  # each job in flight alone, from the start: only the one that breaks fails
                self.busy = False
                in_flight = [held[id(t)][0] for t in stepper.active if id(t) in held]
                for done in await self._isolate(in_flight, exc):
                    yield done
                return
            finally:
                self.busy = False
                self._device_free_at = time.time()
            self.step_timer.observe_step(stepper.last_step_s)
            self.stats.record_forward(self.model_id, members, stages, idle_s)
            for key, pred in finished:
                p, admitted = held.pop(key)
                # its compute: from admission to its last step, the steps it shared with others included
                life = {"unet_decode": self._device_free_at - admitted, "postprocess": stages.get("postprocess", 0.0)}
                yield Computed([p], admitted, life, maps=[pred], shared=members)
            room = self.max_batch - stepper.members
            if room > 0 and self._pending:
                now = time.time()
                self._pending = [q for q in self._pending if not await self._dispose_if_dead(q.delivery, now)]
                oldest = min(self._pending, key=lambda q: q.job.enqueued_at, default=None)
                if oldest is not None and oldest.key != shape_key:
                    continue  # another shape (or an uncertainty job) waits longer: drain, then serve it
                joiners: list[Prepared] = []
                for q in sorted(self._pending, key=lambda q: q.job.enqueued_at):
                    if q.key == shape_key and q.item.ensemble_size <= room:
                        joiners.append(q)
                        room -= q.item.ensemble_size
                if joiners:
                    self._take(joiners)
                    await self._admit(stepper, joiners, held)

    async def _drop_dead(self, stepper: StepBatch, held: dict[int, tuple[Prepared, float]]) -> None:
        """Stop stepping jobs whose deadline passed or whose client left: their answer would be thrown away."""
        await self.broker.refresh_abandoned([held[id(t)][0].delivery for t in stepper.active])
        now = time.time()
        for traj in list(stepper.active):
            p = held[id(traj)][0]
            if await self._dispose_if_dead(p.delivery, now):
                stepper.active.remove(traj)
                del held[id(traj)]

    async def _admit(self, stepper: StepBatch, jobs: list[Prepared], held: dict[int, tuple[Prepared, float]]) -> None:
        """Start the jobs' trajectories (their images encoded in one VAE call), `steps=auto` resolved now."""
        loop = asyncio.get_running_loop()
        now = time.time()
        for p in jobs:
            self.stats.record_queue_wait(self.model_id, now - p.job.enqueued_at)
        await self.broker.computing([p.delivery for p in jobs])
        items = [self._with_steps(p, now) for p in jobs]
        before = {id(t) for t in stepper.active}
        stages: dict[str, float] = {}
        entries = [(i, item) for i, item in enumerate(items)]
        await loop.run_in_executor(self.compute_pool, stepper.admit, entries, stages)
        self.step_timer.observe_fixed(stages.get("encode", 0.0) / max(1, len(jobs)) + stepper.last_decode_s)
        for traj in stepper.active:
            if id(traj) not in before:
                held[id(traj)] = (jobs[int(traj.key)], now)  # type: ignore[call-overload]
                traj.key = id(traj)

    def _step_and_finish(self, stepper: StepBatch, stages: dict[str, float]) -> list[tuple[int, PredictionMap]]:
        """One step; the maps of the jobs it finished, in their final form (compute thread)."""
        finished = stepper.step(stages)
        start = time.perf_counter()
        out = [(int(f.trajectory.key), stepper.predictor.finish_trajectory(f)) for f in finished]  # type: ignore[call-overload]
        stages["postprocess"] = stages.get("postprocess", 0.0) + time.perf_counter() - start
        return out

    async def _isolate(self, batch: list[Prepared], exc: Exception) -> list[Computed]:
        if len(batch) > 1:
            log.warning("batch of %d failed on %s (%s); retrying one by one", len(batch), self.model_id, exc)
            results: list[Computed] = []
            for p in batch:
                results.extend(await self._compute([p]))
            return results
        job = batch[0].job
        with logs.context(job.request_id, job.traceparent):
            log.error("model %s failed on job %s", self.model_id, job.id, exc_info=exc)
        self.stats.record_outcome(self.model_id, "error")
        await self.broker.reject(batch[0].delivery, ModelFailure(f"model '{self.model_id}' failed: {exc}"))
        return []

    # ------------------------------------------------------------------ stage 3: encode and reply

    async def _reply_all(self, computed: asyncio.Queue[Computed | None]) -> None:
        while (done := await computed.get()) is not None:
            await self._reply_batch(done)

    async def _reply_batch(self, done: Computed) -> None:
        loop = asyncio.get_running_loop()
        compute_done = time.time()
        encode_start = time.perf_counter()
        await self.broker.refresh_abandoned([p.delivery for p in done.batch])
        if done.segments is not None:
            calls = [
                partial(self._encode_segmentation, p, seg, done.maps[i] if done.maps else None, done)
                for i, (p, seg) in enumerate(zip(done.batch, done.segments, strict=True))
            ]
        elif done.uncertainty is not None:
            calls = [partial(self._encode_uncertainty, done.batch[0], done.uncertainty, done)]
        else:
            calls = [partial(self._encode_prediction, p, m, done) for p, m in zip(done.batch, done.maps, strict=True)]

        async def answer(p: Prepared, call: partial[Reply]) -> None:
            if await self._dispose_if_dead(p.delivery, time.time()):
                return  # nobody waits for it any more: not worth encoding
            reply = await loop.run_in_executor(self.io_pool, call)
            tp = p.job.traceparent
            tracing.record("dense.queue", tp, p.job.enqueued_at, done.started, model=self.model_id)
            tracing.record(
                "dense.compute", tp, done.started, compute_done, model=self.model_id, batch_size=len(done.batch)
            )
            await self._finish(p.delivery, reply)

        await asyncio.gather(*(answer(p, call) for p, call in zip(done.batch, calls, strict=True)))
        metrics.COMPUTE_SECONDS.labels(self.model_id, "output_encode").observe(time.perf_counter() - encode_start)

    def _encode_prediction(self, p: Prepared, pred: PredictionMap, done: Computed) -> Reply:
        t0 = time.perf_counter()
        return Reply(
            id=p.job.id,
            status="ok",
            outputs=encode_prediction_outputs(pred, p.job.params.encoding, self.options),
            metadata=prediction_metadata(pred),
            timings=_timings(p, done, t0),
            batch_size=done.shared or len(done.batch),
        )

    def _encode_segmentation(
        self, p: Prepared, seg: Segmentation, depth: PredictionMap | None, done: Computed
    ) -> Reply:
        t0 = time.perf_counter()
        outputs = {"prediction": encode_segmentation(seg, p.job.params.encoding, p.item.image, self.options)}
        if depth is not None:
            outputs["depth"] = encode_prediction(depth, p.job.params.encoding, self.options)
        return Reply(
            id=p.job.id,
            status="ok",
            outputs=outputs,
            metadata=segmentation_metadata(seg, depth),
            timings=_timings(p, done, t0),
            batch_size=len(done.batch),
        )

    def _encode_uncertainty(self, p: Prepared, result: UncertaintyResult, done: Computed) -> Reply:
        t0 = time.perf_counter()
        return Reply(
            id=p.job.id,
            status="ok",
            outputs=encode_uncertainty(result, p.job.params.encoding, self.options),
            metadata=uncertainty_metadata(result),
            timings=_timings(p, done, t0),
            batch_size=len(result.seeds),
        )

    # ------------------------------------------------------------------ outcomes

    async def _dispose_if_dead(self, delivery: Delivery, now: float) -> bool:
        """Never compute (or decode, or encode) work nobody waits for: abandoned requests, expired deadlines."""
        if delivery.abandoned():
            await self._finish(delivery, Reply(id=delivery.job.id, status="dropped"))
            return True
        if delivery.job.expired(now):
            error = DeadlineExceeded("the deadline passed before the job was answered")
            await self._fail(delivery, error, status="expired")
            return True
        return False

    async def _fail(self, delivery: Delivery, error: ServiceError, status: str = "error") -> None:
        await self._finish(delivery, Reply(id=delivery.job.id, status=status, error=error.info()))

    async def _finish(self, delivery: Delivery, reply: Reply) -> None:
        job = delivery.job
        self.stats.record_outcome(self.model_id, reply.status)
        with logs.context(job.request_id, job.traceparent):  # the broker's own lines about it too
            log.debug("job %s on %s: %s %s", job.id, self.model_id, reply.status, reply.timings or "")
            await self.broker.reply(delivery, reply)


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=max(timeout_s, 0.0))


def _timings(p: Prepared, done: Computed, encode_start: float) -> dict[str, float]:
    """Milliseconds per stage of one job; `queue` runs from enqueue to the start of its batch (decode
    included), the device stages are its batch's."""
    ms = {name: seconds * 1000.0 for name, seconds in done.stages.items()}
    return {
        "decode": p.decode_ms,
        "queue": max(0.0, (done.started - p.job.enqueued_at) * 1000.0),
        "preprocess": ms.get("preprocess", 0.0),
        "compute": ms.get("encode", 0.0)
        + ms.get("unet_decode", 0.0)
        + ms.get("uncertainty", 0.0)
        + ms.get("encode_unet", 0.0)
        + ms.get("probe", 0.0),
        "postprocess": ms.get("postprocess", 0.0),
        "encode": (time.perf_counter() - encode_start) * 1000.0,
    }
