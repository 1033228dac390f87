"""What both front-ends (REST and gRPC) decide the same way before enqueueing a job."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from models.outputs import FAMILY_NORMALS_AXES, MULTI_STEP_FAMILIES, ServedTask, task_of
from models.probes.declaration import ProbeDeclaration
from models.spec import DEFAULT_PROCESSING_RES, ModelSpec
from service.errors import ModelNotFound, PayloadTooLarge, TaskNotServed, Unavailable
from service.jobs import Job, JobKind, JobParams, ModelInfo
from service.queue.base import Broker
from service.request import PredictionRequest, check_for_model

log = logging.getLogger(__name__)


async def declare_models(broker: Broker, infos: list[ModelInfo], retry_s: float = 2.0) -> None:
    """Record the configured models with the broker, retrying while the queue is down (run as a task)."""
    while infos:
        try:
            await broker.declare_models(infos)
            return
        except Exception as exc:  # the queue is unreachable: the front-end answers 503 meanwhile
            log.warning("cannot declare the configured models yet (%s); retrying", exc)
            await asyncio.sleep(retry_s)


def declared_info(spec: ModelSpec, max_batch_size: int, max_queue_delay_ms: float) -> ModelInfo | None:
    """What a front-end can say of a model from its spec alone (no checkpoint, no torch): enough to accept
    jobs for it before any worker announced it, when the spec names its family and task or output kind."""
    if spec.family is None or (spec.task is None and spec.output_kind is None):
        return None
    kind = spec.output_kind or ("normals" if spec.task == "normals" else "depth")
    return ModelInfo(
        id=spec.id,
        family=spec.family,
        task=spec.task or task_of(kind),
        output_kind=kind,
        generative=spec.family == "lotus-g",
        processing_res=spec.processing_res if spec.processing_res is not None else DEFAULT_PROCESSING_RES,
        backend=spec.backend,
        device="(no worker yet)",
        dtype=spec.dtype,
        max_batch_size=spec.max_batch_size or max_batch_size,
        max_queue_delay_ms=spec.max_queue_delay_ms if spec.max_queue_delay_ms is not None else max_queue_delay_ms,
        multi_step=spec.family in MULTI_STEP_FAMILIES,
        default_steps=spec.steps or (0 if spec.family in MULTI_STEP_FAMILIES else 1),  # 0: the checkpoint's
        normals_convention=FAMILY_NORMALS_AXES[spec.family].words if kind == "normals" else None,
    )


def declared_probe_infos(
    probe: ProbeDeclaration, base: ModelInfo | None, max_batch_size: int, max_queue_delay_ms: float
) -> list[ModelInfo]:
    """A probe's catalog entries from its `probe.toml` alone (what a worker announces once it attached it),
    on the base model's declared entry, or on one made from the probe's own fields when the base is not
    declared (its family, the server's batching defaults)."""
    if base is None:
        multi_step = probe.family in MULTI_STEP_FAMILIES
        base = ModelInfo(
            id=probe.base_model,
            family=probe.family,
            task="depth",
            output_kind="depth",
            generative=False,
            processing_res=probe.processing_res,
            device="(no worker yet)",
            dtype="auto",
            max_batch_size=max_batch_size,
            max_queue_delay_ms=max_queue_delay_ms,
            multi_step=multi_step,
            default_steps=0 if multi_step else 1,
        )
    return base.probe_entries(probe)


async def waiting_models(broker: Broker, expected: Sequence[str] = ()) -> list[ModelInfo]:
    """Models without a live worker whose jobs may wait for one (scale from zero): the configured ones when
    the front-end has a model list (a retired model is refused, not queued for nobody), else any known one."""
    dormant = await broker.dormant_models()
    return [m for m in dormant if m.id in expected] if expected else dormant


async def resolve_model(
    broker: Broker,
    name: str | None,
    task: ServedTask,
    kind: JobKind,
    expected: Sequence[str] = (),
    scale_from_zero: bool = False,
) -> ModelInfo:
    """The model a request runs on: the named one, or the first serving the task; typed errors otherwise.

    With `scale_from_zero`, models whose workers are all gone still take jobs: they wait in the stream until
    an autoscaler (KEDA on the stream lag) starts a worker, within the request's deadline.
    """
    catalog = await broker.catalog()
    if scale_from_zero:
        catalog = catalog + await waiting_models(broker, expected)
    if name is None:
        serving = [m for m in catalog if m.task == task and (m.generative or kind != "uncertainty")]
        if serving:
            return serving[0]
        if not catalog or set(expected) - {m.id for m in catalog}:
            raise Unavailable("no model is ready yet; try again shortly", retry_after=1)
        if task == "segment":
            raise TaskNotServed("no probe is served: segmentation needs one (dense-serve serve --probe DIR)")
        need = "a Lotus-G or Marigold model" if kind == "uncertainty" else "a model"
        raise TaskNotServed(f"no served model predicts {task}; this request needs {need} for {task}")
    info = next((m for m in catalog if m.id == name), None)
    if info is None:
        if name in expected:
            raise Unavailable(f"model '{name}' is still loading; try again shortly", retry_after=1)
        known = ", ".join(m.id for m in catalog) or "(none ready)"
        raise ModelNotFound(f"unknown model '{name}'; served models: {known}", model=name)
    if info.task != task:
        raise TaskNotServed(f"model '{name}' predicts {info.output_kind}, not {task}", model=name)
    if kind == "uncertainty" and not info.generative:
        raise TaskNotServed(
            f"model '{name}' ({info.family}) is deterministic, so seeds do not vary it: multi-seed "
            "uncertainty needs a Lotus-G or Marigold model",
            model=name,
        )
    return info


#: Bytes per value of each answer format, uncompressed: the bound an answer's size is checked against.
_VALUE_BYTES = {"npy": 4, "tiff": 4, "raw32": 4, "png": 2, "exr": 2, "raw16": 2}


def answer_size_bound(request: PredictionRequest, info: ModelInfo, width: int, height: int) -> int:
    """The most bytes the answer to `request` can take for a `width` x `height` image: every map it carries at its
    output size, in its format before any compression (PNG and TIFF deflate only make it smaller)."""
    if request.match_input_resolution:
        out_w, out_h = width, height
    else:
        res = request.processing_res or info.processing_res
        scale = res / max(width, height) if res else 1.0
        out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
    pixels = out_w * out_h
    fmt = request.format
    encoding = request.json_encoding if fmt == "json" else fmt
    if encoding == "color":
        per_map = 3 * pixels  # an 8-bit RGB picture of any map
    else:
        per_map = _VALUE_BYTES.get(encoding, 4) * pixels * (3 if info.output_kind == "normals" else 1)
    maps = 1 + (request.uncertainty != "none" or request.kind == "uncertainty") + request.with_depth
    total = maps * per_map
    if request.kind == "uncertainty" and request.return_members and fmt == "json":
        total += len(request.ensemble or ()) * 4 * pixels * (3 if info.output_kind == "normals" else 1)
    return total * 4 // 3 if fmt == "json" else total  # JSON carries base64


def check_answer_size(
    request: PredictionRequest, info: ModelInfo, width: int, height: int, max_answer_bytes: int
) -> None:
    """413 before enqueueing an answer larger than the server lets through its queue, with what to change."""
    size = answer_size_bound(request, info, width, height)
    if size > max_answer_bytes:
        mib = 2**20
        raise PayloadTooLarge(
            f"the answer for a {width} x {height} image as {request.format} would take up to {size / mib:.1f} MiB, "
            f"over this server's answer limit of {max_answer_bytes / mib:.1f} MiB (max_answer_bytes); ask for a "
            "smaller format (png), fewer outputs, match_input_resolution=false, or send a smaller image"
        )


def make_job(
    request: PredictionRequest,
    info: ModelInfo,
    image: bytes,
    *,
    default_timeout_ms: int,
    request_id: str,
    traceparent: str | None,
    image_size: tuple[int, int],
    max_answer_bytes: int,
    raw_shape: list[int] | None = None,
) -> Job:
    """The job a validated request becomes, the same way from REST and gRPC; refused (422) when it asks the
    model for what its family cannot do (steps of a single-step family, ...), 413 when its answer would be larger
    than `max_answer_bytes` for the image's `image_size` (width, height)."""
    check_for_model(request, info.id, info.family, info.multi_step, info.default_steps)
    check_answer_size(request, info, *image_size, max_answer_bytes)
    timeout_ms = request.timeout_ms or default_timeout_ms
    params = JobParams.of(request)
    if info.base_model is not None:  # a probe: its jobs join its base model's queue, to share the UNet pass
        params = params.model_copy(update={"probe": info.id})
    return Job(
        kind=request.kind,
        model=info.base_model or info.id,
        task=request.task,
        deadline=time.time() + timeout_ms / 1000.0,
        image=image,
        raw_shape=raw_shape,
        request_id=request_id,
        traceparent=traceparent,
        params=params,
    )
