"""Prometheus metrics of every process (API, gRPC, worker), Triton-style names, histograms not summaries.

One module-level registry per process: the API exposes it at `/metrics`, a separate worker on its own port
(`--metrics-port`), and the all-in-one `serve` shows both sides on `/metrics`. With several workers each one is
scraped on its own and PromQL aggregates (`sum by (model)`, `histogram_quantile` over summed buckets).
No torch here: the front-ends import this.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
PREFIX = "dense"

# Latency buckets from 5 ms to 2 min: single-step predictions take 10 ms (GPU, small) to seconds (CPU, big).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30, 60, 120)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
BYTES_BUCKETS = tuple(2**k for k in range(10, 27, 2))  # 1 KiB .. 64 MiB

# ------------------------------------------------------------------------------------------------ front-ends
REQUEST_SECONDS = Histogram(
    f"{PREFIX}_request_duration_seconds",
    "End-to-end request time at the front-end (gRPC streams: per frame), by route, model, task and status.",
    ["frontend", "route", "model", "task", "status"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
REQUESTS_IN_FLIGHT = Gauge(
    f"{PREFIX}_requests_in_flight",
    "Requests (and gRPC frames) accepted and not yet answered.",
    ["frontend"],
    registry=REGISTRY,
)
REQUEST_BYTES = Counter(
    f"{PREFIX}_request_bytes_total", "Bytes received in request bodies.", ["frontend", "route"], registry=REGISTRY
)
RESPONSE_BYTES = Counter(
    f"{PREFIX}_response_bytes_total", "Bytes sent in response bodies.", ["frontend", "route"], registry=REGISTRY
)
FRAMES_DROPPED_STALE = Counter(
    f"{PREFIX}_frames_dropped_stale_total",
    "gRPC stream frames dropped without compute because a newer frame arrived (drop_stale).",
    ["model"],
    registry=REGISTRY,
)

# ------------------------------------------------------------------------------------------------ queue
QUEUE_DEPTH = Gauge(
    f"{PREFIX}_queue_depth", "Jobs waiting in the model's queue (not yet read by a worker).", ["model"],
    registry=REGISTRY,
)  # fmt: skip
QUEUE_PENDING = Gauge(
    f"{PREFIX}_queue_pending",
    "Jobs read by a worker and not yet acknowledged (Redis consumer-group pending entries).",
    ["model"],
    registry=REGISTRY,
)
QUEUE_LAG = Gauge(
    f"{PREFIX}_queue_lag", "Entries in the model's stream no worker has read yet (XLEN - pending).", ["model"],
    registry=REGISTRY,
)  # fmt: skip
QUEUE_WAIT_SECONDS = Histogram(
    f"{PREFIX}_queue_wait_seconds",
    "Time from enqueue to the start of the batch that computes the job.",
    ["model"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
JOBS_RECLAIMED = Counter(
    f"{PREFIX}_jobs_reclaimed_total", "Jobs of dead consumers claimed by this worker's reaper.", ["model"],
    registry=REGISTRY,
)  # fmt: skip
JOBS_DEAD_LETTERED = Counter(
    f"{PREFIX}_jobs_dead_lettered_total", "Jobs moved to the dead-letter stream after max_deliveries.", ["model"],
    registry=REGISTRY,
)  # fmt: skip
JOBS_EXPIRED = Counter(
    f"{PREFIX}_jobs_expired_total", "Jobs whose deadline passed before compute (answered 504, never computed).",
    ["model"], registry=REGISTRY,
)  # fmt: skip
JOBS_DROPPED = Counter(
    f"{PREFIX}_jobs_abandoned_total", "Jobs whose client had gone (cancelled, disconnected) before compute.",
    ["model"], registry=REGISTRY,
)  # fmt: skip
ANSWERS_NOT_KEPT = Counter(
    f"{PREFIX}_answers_not_kept_total",
    "Keyed answers not kept for a retry because the answer budget (answer_store_bytes) was full; a retry of one "
    "computes again.",
    ["model"],
    registry=REGISTRY,
)
ANSWERS_KEPT_BYTES = Gauge(
    f"{PREFIX}_answers_kept_bytes",
    "Bytes of keyed answers kept for Idempotency-Key retries (the budget is answer_store_bytes).",
    registry=REGISTRY,
)
JOBS_DONE = Counter(
    f"{PREFIX}_jobs_total", "Jobs a worker finished, by outcome (ok, error, expired, dropped).", ["model", "status"],
    registry=REGISTRY,
)  # fmt: skip

# ------------------------------------------------------------------------------------------------ worker
BATCH_SIZE = Histogram(
    f"{PREFIX}_batch_size",
    "Images per forward pass (uncertainty: seeds per pass). Average batch = sum / count.",
    ["model"],
    buckets=BATCH_BUCKETS,
    registry=REGISTRY,
)
COMPUTE_SECONDS = Histogram(
    f"{PREFIX}_compute_seconds",
    "Time of one batch per stage: preprocess (pixels to the device, resize, pad), encode (VAE encoder), "
    "unet_decode (UNet + decoder), postprocess (crop, resize back, quantise, copy to host), output_encode "
    "(PNG/NPY/EXR/TIFF on the I/O pool); uncertainty (a whole multi-seed pass).",
    ["model", "stage"],
    buckets=STAGE_BUCKETS,
    registry=REGISTRY,
)
COMPUTE_IDLE_SECONDS = Histogram(
    f"{PREFIX}_compute_idle_seconds",
    "Device idle time before a batch while its jobs were already in the worker (read, decoding or batching): "
    "the pipeline's stall. Near 0 when decoding overlaps the previous batch.",
    ["model"],
    buckets=STAGE_BUCKETS,
    registry=REGISTRY,
)
MODEL_LOAD_SECONDS = Gauge(
    f"{PREFIX}_model_load_seconds", "Time to load the model (and export it on first start).", ["model"],
    registry=REGISTRY,
)  # fmt: skip
MODEL_WARMUP_SECONDS = Gauge(
    f"{PREFIX}_model_warmup_seconds", "Time of the warm-up batch.", ["model"], registry=REGISTRY
)
MODEL_INFO = Gauge(
    f"{PREFIX}_model_info", "Served models (value 1), with backend, device and dtype as labels.",
    ["model", "family", "task", "backend", "device", "dtype"], registry=REGISTRY,
)  # fmt: skip
GPU_MEMORY_USED = Gauge(f"{PREFIX}_gpu_memory_used_bytes", "GPU memory in use (NVML).", ["gpu"], registry=REGISTRY)
GPU_MEMORY_TOTAL = Gauge(f"{PREFIX}_gpu_memory_total_bytes", "GPU memory in all (NVML).", ["gpu"], registry=REGISTRY)
GPU_UTILIZATION = Gauge(
    f"{PREFIX}_gpu_utilization_ratio", "GPU busy fraction over the last sample period (NVML).", ["gpu"],
    registry=REGISTRY,
)  # fmt: skip


@contextmanager
def in_flight(frontend: str) -> Iterator[None]:
    gauge = REQUESTS_IN_FLIGHT.labels(frontend)
    gauge.inc()
    try:
        yield
    finally:
        gauge.dec()


def observe_request(
    frontend: str, route: str, model: str, task: str, status: str | int, seconds: float, bytes_in: int, bytes_out: int
) -> None:
    REQUEST_SECONDS.labels(frontend, route, model or "", task or "", str(status)).observe(seconds)
    if bytes_in:
        REQUEST_BYTES.labels(frontend, route).inc(bytes_in)
    if bytes_out:
        RESPONSE_BYTES.labels(frontend, route).inc(bytes_out)


class GpuSampler:
    """NVML readings (nvidia-ml-py) when a driver is present; silently nothing otherwise."""

    def __init__(self) -> None:
        self.handles: list[tuple[str, object]] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.handles = [(str(i), pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no package, no driver, no GPU: all mean "nothing to sample"
            self.handles = []

    def sample(self) -> None:
        for index, handle in self.handles:
            try:
                mem = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                util = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            except Exception as exc:  # a GPU lost mid-run must not take the worker down
                log.warning("NVML read of GPU %s failed: %s", index, exc)
                continue
            GPU_MEMORY_USED.labels(index).set(mem.used)
            GPU_MEMORY_TOTAL.labels(index).set(mem.total)
            GPU_UTILIZATION.labels(index).set(util.gpu / 100.0)
