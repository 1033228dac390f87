"""Random weights are a fact of the checkpoint, not of its id: `make_tiny` marks the folder it writes, loading
reads the mark, and `/v1/models` (and gRPC ListModels) say `random_weights` for whatever id serves the folder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from models.detect import RANDOM_WEIGHTS_KEY, CheckpointConfig, has_random_weights
from models.loading import load_model
from models.outputs import Family, Task
from models.probes.declaration import ProbeDeclaration
from models.spec import ModelSpec
from models.tiny import write_model_index
from service.grpc.stubs import dense_pb2 as pb
from service.grpc.stubs.dense_pb2_grpc import DenseServiceStub
from service.jobs import ModelInfo
from tests.service_harness import running_service


def trained_copy(tiny: Path, out: Path, family: Family, task: Task) -> Path:
    """The tiny checkpoint's files with the index a fine-tune export writes (models/training/checkpointing.py
    rewrites it with the same helper): a stand-in for trained weights that costs no training."""
    shutil.copytree(tiny, out)
    write_model_index(out, family, task)
    return out


def test_make_tiny_marks_its_checkpoint_and_a_trained_index_is_unmarked(
    tiny_dir: Callable[[Family, Task], Path], tmp_path: Path
) -> None:
    folder = tiny_dir("lotus-g", "depth")
    assert json.loads((folder / "model_index.json").read_text())[RANDOM_WEIGHTS_KEY] is True
    assert CheckpointConfig.read(folder).random_weights and has_random_weights(folder)
    # what a fine-tune export writes (the same helper, no marker), and a folder without an index
    write_model_index(tmp_path, "lotus-g", "depth")
    assert RANDOM_WEIGHTS_KEY not in json.loads((tmp_path / "model_index.json").read_text())
    assert not has_random_weights(tmp_path) and not has_random_weights(tmp_path / "missing")


def test_loaded_predictor_carries_the_mark(tiny_dir: Callable[[Family, Task], Path], tmp_path: Path) -> None:
    tiny = tiny_dir("lotus-g", "normals")
    assert load_model(ModelSpec(id="plain-name", source=str(tiny), processing_res=64)).random_weights is True
    trained = trained_copy(tiny, tmp_path / "trained", "lotus-g", "normals")
    unmarked = ModelSpec(id="tiny-named", source=str(trained), task="normals", processing_res=64)
    assert load_model(unmarked).random_weights is False


@pytest.mark.anyio
async def test_models_endpoint_says_random_weights_by_checkpoint_not_id(
    tiny_dir: Callable[[Family, Task], Path], tmp_path: Path
) -> None:
    """A tiny checkpoint under an ordinary id is flagged; an unmarked one under a `tiny-` id is not."""
    trained = trained_copy(tiny_dir("lotus-d", "depth"), tmp_path / "trained", "lotus-d", "depth")
    specs = [
        ModelSpec(id="looks-trained", source=str(tiny_dir("lotus-g", "depth")), processing_res=64),
        ModelSpec(id="tiny-looking", source=str(trained), task="depth", processing_res=64),
    ]
    async with running_service(tiny_dir, specs=specs, grpc_enabled=True, grpc_port=0) as svc:
        listed = (await svc.client.get("/v1/models")).json()["models"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.app.state.grpc.port}") as channel:
            over_grpc = (await DenseServiceStub(channel).ListModels(pb.ListModelsRequest())).models
    flags = {m["id"]: m["random_weights"] for m in listed}
    assert flags == {"looks-trained": True, "tiny-looking": False}
    assert {m.id: m.random_weights for m in over_grpc if m.HasField("random_weights")} == flags


def test_probe_entries_are_trained_heads_on_whatever_base() -> None:
    """A probe's head is trained (on its base's features, random or not): its entries say false once the base
    is loaded, and stay unknown (null) while only declared."""
    probe = ProbeDeclaration(id="seg", base_model="base", family="lotus-g", processing_res=64, classes=["a", "b"])
    base = ModelInfo(
        id="base", family="lotus-g", task="depth", output_kind="depth", generative=True, processing_res=64,
        device="cpu", dtype="fp32", max_batch_size=4, max_queue_delay_ms=5.0, random_weights=True,
    )  # fmt: skip
    assert [e.random_weights for e in base.probe_entries(probe)] == [False]
    declared = base.model_copy(update={"random_weights": None})
    assert [e.random_weights for e in declared.probe_entries(probe)] == [None]
