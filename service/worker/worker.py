"""A worker: loads its models, announces them, runs one batching lane per model, drains on stop."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from models.spec import ModelSpec
from service import metrics
from service.config import Settings
from service.jobs import ModelInfo
from service.queue.base import Broker
from service.readiness import WorkerState
from service.worker.lane import Lane
from service.worker.registry import ServedModel, attach_probes, load_served
from service.worker.stats import WorkerStats

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, broker: Broker, specs: list[ModelSpec], settings: Settings) -> None:
        self.broker = broker
        self.specs = specs
        self.settings = settings
        self.stats = WorkerStats()
        self.state: WorkerState = "idle"
        self.error: str | None = None
        self.served: dict[str, ServedModel] = {}
        self.lanes: dict[str, Lane] = {}
        self.probe_infos: list[ModelInfo] = []
        self._stop = asyncio.Event()
        self._io_pool = ThreadPoolExecutor(settings.io_threads, thread_name_prefix="dense-io")
        self._compute_pools: dict[str, ThreadPoolExecutor] = {}
        self._main: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def start(self) -> None:
        self.state = "loading"
        self._main = asyncio.create_task(self._run(), name="dense-worker")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for spec in self.specs:
                pool = ThreadPoolExecutor(1, thread_name_prefix=f"dense-model-{spec.id}")
                self._compute_pools[spec.id] = pool
                self.served[spec.id] = await loop.run_in_executor(
                    pool,
                    load_served,
                    spec,
                    self.settings.max_batch_size,
                    self.settings.max_queue_delay_ms,
                    self.settings.warmup,
                )
            self.probe_infos = await loop.run_in_executor(None, attach_probes, self.served, list(self.settings.probes))
        except Exception as exc:
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("worker failed to load models: %s", self.error)
            return
        for model_id, served in self.served.items():
            self.lanes[model_id] = Lane(
                self.broker, served, self.settings, self._io_pool, self._compute_pools[model_id], self.stats
            )
        await self.broker.publish_models([s.info for s in self.served.values()] + self.probe_infos)
        for served in self.served.values():
            i = served.info
            metrics.MODEL_LOAD_SECONDS.labels(i.id).set(served.load_s)
            metrics.MODEL_WARMUP_SECONDS.labels(i.id).set(served.warmup_s)
            metrics.MODEL_INFO.labels(i.id, i.family, i.task, i.backend, i.device, i.dtype).set(1)
        self.state = "ready"
        sampler = asyncio.create_task(self._sample_metrics(), name="dense-worker-metrics")
        try:
            await asyncio.gather(*(lane.run(self._stop) for lane in self.lanes.values()))
        finally:
            sampler.cancel()

    async def _sample_metrics(self) -> None:
        """Queue gauges (depth, pending, lag) and GPU readings, every `metrics_interval_s`."""
        gpus = metrics.GpuSampler()
        while not self._stop.is_set():
            for model in self.served:
                try:
                    q = await self.broker.queue_stats(model)
                except Exception as exc:  # the queue may be down; the lanes report that, metrics just skip
                    log.debug("queue stats for %s: %s", model, exc)
                    continue
                metrics.QUEUE_DEPTH.labels(model).set(q.depth)
                if q.pending is not None:
                    metrics.QUEUE_PENDING.labels(model).set(q.pending)
                if q.lag is not None:
                    metrics.QUEUE_LAG.labels(model).set(q.lag)
            gpus.sample()
            await asyncio.sleep(self.settings.metrics_interval_s)

    async def stop(self) -> None:
        """Stop taking jobs, finish the batches in hand, then release the threads."""
        if self.state in ("stopping", "stopped"):
            return
        self.state = "stopping"
        await self.broker.withdraw_models(list(self.served) + [i.id for i in self.probe_infos])
        self._stop.set()
        if self._main is not None:
            try:
                await asyncio.wait_for(self._main, timeout=self.settings.shutdown_grace_s or None)
            except TimeoutError:
                log.warning("worker did not drain within %.0fs", self.settings.shutdown_grace_s)
                self._main.cancel()
        self._io_pool.shutdown(wait=False, cancel_futures=True)
        for pool in self._compute_pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self.state = "stopped"
