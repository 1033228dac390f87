"""No pickle is ever loaded: training state in safetensors + JSON, served weights safetensors only, and hub ids
pinned to a revision (read for real from a Hugging Face cache laid out by hand, offline)."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.errors import ModelLoadError, SpecError, UnsafeFormatError
from models.loading import load_model
from models.source import PICKLE_WEIGHTS, require_safetensors
from models.spec import ModelSpec, load_spec_file, resolve_spec, shipped_specs
from models.training import checkpointing as ckpt
from models.training.state_io import load_state, save_state
from tests.conftest import REPO

SHA = re.compile(r"^[0-9a-f]{40}$")
# Shipped hub specs whose upstream commit could not be confirmed from public sources when they were pinned:
# they name the branch explicitly (and warn at load). Pin each to its commit sha when it can be checked.
KNOWN_UNPINNED = {
    "lotus-depth-d-v1-0",
    "lotus-depth-g-v1-0",
    "lotus-normal-d-v1-1",
    "lotus-normal-g-v1-1",
    "marigold-depth-lcm-v1-0",
    "marigold-depth-v1-1",
    "marigold-e2e-ft-normals",
    "marigold-normals-v1-1",
    "stable-diffusion-e2e-ft-normals",
}


class _Touch:
    """A pickle that creates a file when it is unpickled: proof that a refused checkpoint is never unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (Path.touch, (str(self.path),))  # type: ignore[return-value]


# --- training state -------------------------------------------------------------------------------


def _tiny_job(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
    return model, opt, sched


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler) -> None:
    """One step that draws from every global RNG (torch, numpy, python), as the fine-tune loop may."""
    x = torch.randn(4, 6) + float(np.random.rand()) + random.random()
    loss = model(x).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def test_state_round_trip_is_exact_and_pickle_free(tmp_path: Path) -> None:
    model, opt, sched = _tiny_job()
    for _ in range(3):
        _step(model, opt, sched)
    odd = {"t": (1, 2.5, None), 3: "int key", "nan": float("nan"), "a": np.arange(3, dtype=np.uint32)}
    for name, obj in [("optimizer", opt.state_dict()), ("scheduler", sched.state_dict()), ("odd", odd)]:
        save_state(tmp_path, name, obj)
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".safetensors"}
    back = load_state(tmp_path, "optimizer")
    orig = opt.state_dict()
    assert back["param_groups"] == orig["param_groups"] and isinstance(back["param_groups"][0]["betas"], tuple)
    assert back["state"].keys() == orig["state"].keys()  # int parameter ids stay ints
    for pid, st in orig["state"].items():
        assert all(torch.equal(st[k], back["state"][pid][k]) and st[k].dtype == back["state"][pid][k].dtype for k in st)
    assert load_state(tmp_path, "scheduler") == sched.state_dict()
    got = load_state(tmp_path, "odd")
    assert got["t"] == (1, 2.5, None) and got[3] == "int key" and np.isnan(got["nan"])
    assert got["a"].dtype == np.uint32 and got["a"].tolist() == [0, 1, 2]
    with pytest.raises(TypeError, match="without pickle"):
        save_state(tmp_path, "bad", {"f": object()})


def test_resume_from_saved_state_continues_bit_identically(tmp_path: Path) -> None:
    """Save weights, optimizer, scheduler and RNG at step 3; fresh objects restored from the files reach the
    same bits at step 7 as the uninterrupted run."""
    model, opt, sched = _tiny_job()
    np.random.seed(5)
    random.seed(5)
    for _ in range(3):
        _step(model, opt, sched)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    state = ckpt.TrainerState(step=3, micro_index=3, fingerprint="f", world_size=1)
    ckpt.save_rng(folder, 0)
    ckpt.save_training_state(folder, state, model, opt, sched, None)  # type: ignore[arg-type]
    for _ in range(4):
        _step(model, opt, sched)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123)  # scramble every stream: the restore must bring them back
    np.random.seed(123)
    random.seed(123)
    model2, opt2, sched2 = _tiny_job(seed=99)
    assert ckpt.load_training_state(folder, 0, model2, opt2, sched2, None) == state  # type: ignore[arg-type]
    for _ in range(4):
        _step(model2, opt2, sched2)
    resumed = model2.state_dict()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not any(p.suffix in ckpt.PICKLE_SUFFIXES for p in folder.iterdir())


def _fake_checkpoint(root: Path, *, marker: bool, pickle_name: str | None) -> Path:
    folder = ckpt.checkpoint_dir(root, 2)
    folder.mkdir(parents=True)
    state = {"step": 2, "micro_index": 2, "fingerprint": "x", "world_size": 1}
    (folder / ckpt.STATE_FILE).write_text(json.dumps({"format": ckpt.FORMAT, **state} if marker else state))
    if pickle_name is not None:
        (folder / pickle_name).write_bytes(pickle.dumps(_Touch(root / "UNPICKLED")))
    return folder


@pytest.mark.parametrize(
    ("marker", "pickle_name"), [(False, "optimizer.pt"), (True, "rng-0.pt"), (False, None)], ids=str
)
def test_old_or_pickle_checkpoints_are_refused_not_loaded(tmp_path: Path, marker: bool, pickle_name: str) -> None:
    from models.training.trainer import finetune
    from tests.test_training_loop import _config

    folder = _fake_checkpoint(tmp_path / "run", marker=marker, pickle_name=pickle_name)
    with pytest.raises(UnsafeFormatError, match="old training-state format") as err:
        finetune(_config(tmp_path / "run"), progress=False)  # resume="auto" finds it
    message = str(err.value)
    assert str(folder) in message and "new output_dir" in message and "unpickling can run code" in message
    if pickle_name:
        assert pickle_name in message
    assert not (tmp_path / "run" / "UNPICKLED").exists()
    with pytest.raises(UnsafeFormatError):
        finetune(_config(tmp_path / "run"), resume=folder, progress=False)


def test_no_pickle_loading_left_in_models() -> None:
    """The package never calls torch.load / pickle.load, nor asks for weights_only=False."""
    offenders = []
    for path in sorted((REPO / "models").rglob("*.py")):
        text = path.read_text()
        for pattern in ("torch.load(", "pickle.load", "import pickle", "weights_only=False", "torch.save("):
            if pattern in text:
                offenders.append(f"{path.relative_to(REPO)}: {pattern}")
    assert offenders == []


# --- served weights -------------------------------------------------------------------------------


def test_tiny_and_demo_checkpoints_are_safetensors_only(tiny_dir: Any) -> None:
    folders = [tiny_dir("lotus-d", "depth"), tiny_dir("e2e-ft", "normals")]
    folders += [p.parent for p in (REPO / "models" / "demo").rglob("model_index.json")]
    assert len(folders) >= 5
    for folder in folders:
        for comp in ("unet", "vae", "text_encoder"):
            names = {p.suffix for p in (folder / comp).iterdir()}
            assert ".safetensors" in names and not names & set(PICKLE_WEIGHTS), (folder, comp, names)


def test_local_folder_with_only_pickle_weights_is_refused(tiny_dir: Any, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_dir("lotus-d", "depth"), tmp_path / "pickled")
    from safetensors.torch import load_file

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), folder / "unet" / "diffusion_pytorch_model.bin")  # what diffusers reads
    weights.unlink()
    spec = ModelSpec(id="pickled", source=str(folder))
    with pytest.raises(UnsafeFormatError) as err:
        load_model(spec)
    message = str(err.value)
    assert "model 'pickled'" in message and "only safetensors weights are loaded" in message
    assert "diffusion_pytorch_model.bin" in message
    # Both present: the pickle is ignored and the safetensors load.
    both = shutil.copytree(tiny_dir("lotus-d", "depth"), tmp_path / "both")
    shutil.copy(folder / "unet" / "diffusion_pytorch_model.bin", both / "unet")
    require_safetensors("both", both)
    assert load_model(ModelSpec(id="both", source=str(both), task="depth")).family == "lotus-d"


# --- specs and the hub ----------------------------------------------------------------------------


def test_shipped_specs_are_pinned_to_commits() -> None:
    specs = shipped_specs()
    assert specs
    unpinned = {sid for sid, s in specs.items() if not (s.revision and SHA.match(s.revision))}
    assert unpinned == KNOWN_UNPINNED
    assert all(specs[sid].revision == "main" for sid in KNOWN_UNPINNED)  # explicit, never left out


def test_revision_in_specs_and_model_arguments(tmp_path: Path) -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"
    spec = resolve_spec(f"org/some-model@{sha}")
    assert (spec.id, spec.source, spec.revision) == ("some-model", "org/some-model", sha)
    assert resolve_spec("org/some-model@v1.0").revision == "v1.0"
    assert resolve_spec("org/some-model").revision is None  # refused at load, below
    (tmp_path / "bad.toml").write_text('source = "org/x"\nrevision = "main; rm -rf"\n')
    with pytest.raises(SpecError, match="revision"):
        load_spec_file(tmp_path / "bad.toml")
    with pytest.raises(ModelLoadError, match="without a pinned revision") as err:
        load_model(ModelSpec(id="x", source="org/not-pinned"))
    assert "--model org/not-pinned@<commit sha>" in str(err.value)


_HUB_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
from models.errors import ModelLoadError
from models.loading import load_model
from models.source import resolve_source
from models.spec import ModelSpec

repo, sha, wrong = sys.argv[1:4]
model = load_model(ModelSpec(id="pinned", source=repo, revision=sha))
print("PINNED", model.family, resolve_source(ModelSpec(id="pinned", source=repo, revision=sha)))
for _ in range(2):
    print("BRANCH", resolve_source(ModelSpec(id="branch", source=repo, revision="main")))
try:
    resolve_source(ModelSpec(id="wrong", source=repo, revision=wrong))
except ModelLoadError as exc:
    print("WRONG", exc)
"""


def test_hub_revision_resolves_from_an_offline_cache(tiny_dir: Any, tmp_path: Path) -> None:
    """A hub cache as huggingface_hub writes it (`snapshots/<sha>/`, `refs/main`): revision=sha loads that
    snapshot, a branch resolves through refs/ with one warning, and an unknown sha fails clearly."""
    sha, wrong = "89abcdef0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210fedcba98"
    repo = tmp_path / "hf" / "hub" / "models--tiny-org--pinned-depth"
    snapshot = shutil.copytree(tiny_dir("lotus-d", "depth"), repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _HUB_SCRIPT, "tiny-org/pinned-depth", sha, wrong],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"PINNED lotus-d {snapshot}" in lines
    assert lines.count(f"BRANCH {snapshot}") == 2
    assert result.stderr.count("is a branch or tag, not a commit sha") == 1
    wrong_line = next(line for line in lines if line.startswith("WRONG"))
    assert "tiny-org/pinned-depth" in wrong_line and wrong in wrong_line and "HF_HUB_OFFLINE" in wrong_line
    # Hub unreachable (not declared offline): the pinned snapshot in the cache is used, with no retries.
    env = {k: v for k, v in env.items() if k != "HF_HUB_OFFLINE"} | {"HF_ENDPOINT": "http://127.0.0.1:9"}
    script = "import sys; from models.source import resolve_source; from models.spec import resolve_spec; "
    script += "print(resolve_source(resolve_spec(sys.argv[1])))"
    down = subprocess.run(
        [sys.executable, "-c", script, f"tiny-org/pinned-depth@{sha}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert down.returncode == 0 and down.stdout.strip() == str(snapshot), down.stderr
