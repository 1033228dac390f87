"""What both front-ends (REST and gRPC) decide the same way before enqueueing a job."""

from __future__ import annotations

from collections.abc import Sequence

from models.outputs import Task
from service.errors import ModelNotFound, TaskNotServed, Unavailable
from service.jobs import JobKind, ModelInfo
from service.queue.base import Broker


async def resolve_model(
    broker: Broker,
    name: str | None,
    task: Task,
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
        catalog = catalog + await broker.dormant_models()
    if name is None:
        serving = [m for m in catalog if m.task == task and (m.generative or kind != "uncertainty")]
        if serving:
            return serving[0]
        if not catalog or set(expected) - {m.id for m in catalog}:
            raise Unavailable("no model is ready yet; try again shortly", retry_after=1)
        need = "a Lotus-G model" if kind == "uncertainty" else "a model"
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
            "uncertainty needs a Lotus-G model",
            model=name,
        )
    return info
