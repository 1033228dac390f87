"""Evaluate a served model on folder-format datasets with the standard protocol; Markdown and JSON tables.

Predictions come from `DensePredictor.predict`, the very call the service makes (any backend), so a score
describes what clients get, resizing and padding included. Maps are predicted at the input resolution and
scored there (see models/training/metrics.py for alignment, clipping and averaging).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from models.inference import DensePredictor
from models.outputs import OutputKind
from models.training import folder_format
from models.training.metrics import DepthEvaluator, DepthMetrics, NormalMetrics, NormalsEvaluator

CHUNK = 16  # images read and predicted together (predict() batches within a chunk)


@dataclass(frozen=True)
class EvalResult:
    """One model on one dataset. Exactly one of `depth` and `normals` is set."""

    label: str
    dataset: str
    output_kind: OutputKind
    images: int
    processing_res: int
    depth: DepthMetrics | None = None
    normals: NormalMetrics | None = None
    baseline: bool = False  # an image-independent prediction (models/training/baselines.py), not a model

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def evaluate_dataset(
    model: DensePredictor,
    root: str | Path,
    *,
    processing_res: int | None = None,
    limit: int | None = None,
    seed: int | None = None,
    batch_size: int = 4,
    label: str | None = None,
    progress: bool = False,
) -> EvalResult:
    """Score `model` on every sample of the folder dataset `root` (the first `limit` by name)."""
    root = Path(root)
    info = folder_format.read_info(root)
    names = folder_format.list_names(root)[:limit]
    if not names:
        raise ValueError(f"{root}: no samples to evaluate")
    kind = model.output_kind
    res = model.processing_res if processing_res is None else processing_res
    space = "disparity" if kind == "disparity" else "depth"
    depth_eval = None if kind == "normals" else DepthEvaluator(space, info.depth_range)
    normals_eval = NormalsEvaluator() if kind == "normals" else None
    bar = tqdm(total=len(names), desc=f"eval {info.name}", unit="img", disable=not progress, leave=False)
    for start in range(0, len(names), CHUNK):
        chunk = names[start : start + CHUNK]
        samples = [folder_format.read_sample(root, n) for n in chunk]
        preds = model.predict(
            [s.rgb for s in samples], processing_res=res, seeds=seed, batch_size=batch_size, on_batch=bar.update
        )
        for name, sample, pred in zip(chunk, samples, preds, strict=True):
            if normals_eval is not None:
                if sample.normals is None or sample.normals_valid is None:
                    raise ValueError(f"{root}: sample {name!r} has no normals; cannot score a normals model")
                # in the ground truth's axes: a Marigold map's x points the other way (models.outputs)
                normals = model.normals_axes.convert(pred.array, folder_format.NORMALS_AXES)
                normals_eval.add(normals, sample.normals, sample.normals_valid)
            else:
                assert depth_eval is not None
                depth_eval.add(pred.array, sample.depth, sample.valid)
    bar.close()
    return EvalResult(
        label=label or model.model_id,
        dataset=info.name if info.name else root.name,
        output_kind=kind,
        images=len(names),
        processing_res=res,
        depth=depth_eval.result() if depth_eval else None,
        normals=normals_eval.result() if normals_eval else None,
    )


def to_markdown(results: Sequence[EvalResult]) -> str:
    """A depth table and/or a normals table (each only when there are rows for it)."""
    depth = [r for r in results if r.depth is not None]
    normals = [r for r in results if r.normals is not None]
    parts = []
    if depth:
        lines = [
            "| model | dataset | kind | images | res | AbsRel (%) ↓ | δ1 (%) ↑ |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for r in depth:
            assert r.depth is not None
            lines.append(
                f"| {r.label} | {r.dataset} | {r.output_kind} | {r.images} | {_res(r)} "
                f"| {r.depth.abs_rel * 100:.2f} | {r.depth.delta1 * 100:.2f} |"
            )
        parts.append("\n".join(lines))
    if normals:
        lines = [
            "| model | dataset | images | res | mean (°) ↓ | median (°) ↓ | < 11.25° (%) | < 22.5° (%) | < 30° (%) |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in normals:
            n = r.normals
            assert n is not None
            lines.append(
                f"| {r.label} | {r.dataset} | {r.images} | {_res(r)} | {n.mean:.2f} | {n.median:.2f} "
                f"| {n.within_11_25:.2f} | {n.within_22_5:.2f} | {n.within_30:.2f} |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _res(r: EvalResult) -> str:
    return "–" if r.baseline else str(r.processing_res)


def to_json(results: Sequence[EvalResult]) -> str:
    return json.dumps([r.as_dict() for r in results], indent=2) + "\n"


def write_results(results: Sequence[EvalResult], path: str | Path) -> Path:
    """`.json` writes the JSON list; anything else (`.md`) the Markdown tables."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(results) if path.suffix.lower() == ".json" else to_markdown(results))
    return path


def load_results(path: str | Path) -> list[EvalResult]:
    """Read back a JSON results file (for comparing runs)."""
    rows = json.loads(Path(path).read_text())
    out = []
    for row in rows:
        depth = DepthMetrics(**row["depth"]) if row.get("depth") else None
        normals = NormalMetrics(**row["normals"]) if row.get("normals") else None
        out.append(EvalResult(**{**row, "depth": depth, "normals": normals}))
    return out
