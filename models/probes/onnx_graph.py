"""Where a probe's ONNX graphs come from when its base model is served on ONNX Runtime.

`probe_head.onnx` (outputs map, features, logits; attention fused as in the base export) and its logits-only
twin `probe_logits.onnx` are only valid for the exact MLP weights, taps and base checkpoint they were traced
from, so they come with a sidecar `probe_head.onnx.json` holding the probe's key: sha256 over `probe.toml` and
`probe.safetensors` (which names the base checkpoint's hash) and the graph layout version. At attach time:

1. `DIR/probe_head.onnx` (written by `dense-serve probe export DIR --out DIR/probe_head.onnx`) when its sidecar
   holds this key;
2. else the engine cache, `ENGINE_CACHE/probes/<id>-<key[:16]>/probe_head.onnx`, exported there on first use
   from the base checkpoint (on the CPU, fp32; written to a temporary folder and renamed, so workers starting
   together never read half a graph). A base served from an export folder without its checkpoint cannot be
   traced: the error says to run `dense-serve probe export`.

A depth probe follows the same rules with its own graph (`DepthHeadGraph`: outputs map, features, depth_strong
and depth_weak when trained), its depth-only twin `probe_depth.onnx` and its own layout in the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from models.errors import ModelLoadError
from models.export.graphs import TRACE_LATENT_HW
from models.predictors.base import SingleStepPredictor
from models.probes.artifact import MANIFEST, WEIGHTS
from models.probes.depth import DepthHeads
from models.probes.features import TapConfig
from models.probes.mlp import PixelEnsemble
from models.spec import ModelSpec

log = logging.getLogger(__name__)

GRAPH = "probe_head.onnx"
LOGITS_GRAPH = "probe_logits.onnx"
#: Bumped when the graph's inputs, outputs or tracing change: older cached graphs are then not reused.
LAYOUT = "probe-head-v2"


#: The pruned twin of each task's graph: its own outputs alone (no VAE decoder for the unused `map`).
PRUNED = {"segment": LOGITS_GRAPH, "depth": "probe_depth.onnx"}
#: A depth probe's graph layout (models/probes/export.py, `DepthHeadGraph`).
DEPTH_LAYOUT = "probe-depth-v1"


def probe_key(folder: Path, layout: str = LAYOUT) -> str:
    digest = hashlib.sha256(layout.encode())
    for name in (MANIFEST, WEIGHTS):
        digest.update(name.encode())
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def sidecar(graph: Path) -> Path:
    return graph.with_name(graph.name + ".json")


def matches(graph: Path, key: str, task: str = "segment") -> bool:
    try:
        return (
            graph.is_file()
            and pruned_graph(graph, task).is_file()
            and json.loads(sidecar(graph).read_text()).get("probe_key") == key
        )
    except (OSError, ValueError):
        return False


def logits_graph(graph: Path) -> Path:
    """The same graph pruned to its `logits` output: ONNX Runtime runs every node of a session, bound or not,
    so a segment-only batch would pay for the VAE decoder of the unused `map` (measured: 27 ms vs 19 ms)."""
    return pruned_graph(graph, "segment")


def pruned_graph(graph: Path, task: str) -> Path:
    """The graph pruned to the probe's own outputs (`logits`; a depth probe's `depth_*`): `logits_graph`'s why."""
    return graph.with_name(PRUNED[task])


def write_graph(core: SingleStepPredictor, taps: TapConfig, ensemble: PixelEnsemble, out: Path, key: str) -> Path:
    """Trace the probe head at the base export's odd trace size (valid for every latent size), fuse its
    attention as the base heads are, write it and its logits-only twin, and the key last."""
    from models.probes.export import export_probe_onnx

    return _write(lambda path: export_probe_onnx(core, taps, ensemble, path, TRACE_LATENT_HW), out, key, "segment")


def write_depth_graph(core: SingleStepPredictor, taps: TapConfig, heads: DepthHeads, out: Path, key: str) -> Path:
    """`write_graph` for a depth probe (`taps`: its serving taps); the twin `probe_depth.onnx` has no `map`."""
    from models.probes.export import export_depth_onnx

    return _write(lambda path: export_depth_onnx(core, taps, heads, path, TRACE_LATENT_HW), out, key, "depth")


def _write(export: Callable[[Path], Path], out: Path, key: str, task: str) -> Path:
    import onnx

    from models.export.onnx_export import fuse_attention, save

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dense-probe-") as tmp:
        model = fuse_attention(export(Path(tmp) / GRAPH))
    save(model, out)
    names = [i.name for i in model.graph.input]
    own = [o.name for o in model.graph.output if o.name not in ("map", "features")]
    save(onnx.utils.Extractor(model).extract_model(names, own), pruned_graph(out, task))
    layout = DEPTH_LAYOUT if task == "depth" else LAYOUT
    sidecar(out).write_text(json.dumps({"probe_key": key, "layout": layout, "task": task}) + "\n")
    return out


def cached_graph(
    folder: Path, probe_id: str, cache: Path, taps: TapConfig, ensemble: PixelEnsemble, checkpoint: ModelSpec | None
) -> Path:
    """The probe's graph: the folder's own when it matches, else the cache's, exported now if missing.
    `checkpoint`: the base checkpoint (its folder as source, its family and output kind), None when absent."""

    def write(core: SingleStepPredictor, out: Path, key: str) -> Path:
        return write_graph(core, taps, ensemble, out, key)

    return cached(folder, probe_id, cache, checkpoint, "segment", write)


def cached(
    folder: Path,
    probe_id: str,
    cache: Path,
    checkpoint: ModelSpec | None,
    task: str,
    write: Callable[[SingleStepPredictor, Path, str], Path],
) -> Path:
    """`cached_graph` for either task: `write(core, path, key)` traces the graph from the eager base core."""
    key = probe_key(folder, DEPTH_LAYOUT if task == "depth" else LAYOUT)
    own = folder / GRAPH
    if matches(own, key, task):
        return own
    target = cache / "probes" / f"{probe_id}-{key[:16]}" / GRAPH
    if matches(target, key, task):
        return target
    if checkpoint is None:
        raise ModelLoadError(
            f"probe '{probe_id}': its base model runs from an export without its checkpoint, so the probe's ONNX "
            f"graph cannot be traced here; write it with `dense-serve probe export {folder} --out {own}`"
        )
    log.info("exporting probe %s to %s (first start with these weights)", probe_id, target)
    core = _reference_core(checkpoint)
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".probe-", dir=target.parent.parent) as tmp:
        stage = Path(tmp) / "graph"  # a folder: a large graph keeps its weights in files beside it
        stage.mkdir()
        write(core, stage / GRAPH, key)
        if matches(target, key, task):  # another worker finished first: keep its graph
            return target
        if target.parent.exists():
            shutil.rmtree(target.parent)
        stage.rename(target.parent)
    return target


def _reference_core(spec: ModelSpec) -> SingleStepPredictor:
    """The base checkpoint as an eager CPU fp32 core, as `dense-serve export` traces it."""
    import torch

    from models.build import build_core
    from models.detect import CheckpointConfig, identify

    path = Path(spec.source)
    cfg = CheckpointConfig.read(path)
    return build_core(path, cfg, identify(spec, cfg), torch.device("cpu"), torch.float32)
