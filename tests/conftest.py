"""Shared fixtures: tiny checkpoints built once per test session (per xdist worker), real images."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from models.outputs import Family, Task

COMBOS: list[tuple[Family, Task]] = [
    ("lotus-g", "depth"),
    ("lotus-g", "normals"),
    ("lotus-d", "depth"),
    ("lotus-d", "normals"),
    ("e2e-ft", "depth"),
    ("e2e-ft", "normals"),
]
REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "assets" / "sample.png"

torch.set_num_threads(1)  # two xdist workers on two cores
# Servers the tests start (serve, api, and the load tests' servers) take any free gRPC port unless a test names
# one: two xdist workers each starting a server would both ask for 50051, and a taken port is refused.
os.environ.setdefault("DENSE_GRPC_PORT", "0")


def require_tool(name: str, apt_package: str) -> str:
    """The path of a command-line tool a test needs. Missing, the test is skipped with the reason and the Debian
    package to install, except in CI (`CI` set): CI installs such tools (`.ci/run`), so a missing one there is a
    failure, never a silent skip. Only for tools apt can install; GPU and tritonserver checks skip as before."""
    path = shutil.which(name)
    if path is not None:
        return path
    reason = f"{name} is not on PATH (Debian: apt-get install {apt_package})"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI installs it, so this test must run there, not skip", pytrace=False)
    pytest.skip(reason)


#: Modules whose module fixture trains a probe, exports ONNX or loads the Marigold pipelines: with `-n 2` one worker
#: runs each of them whole, so the fixture is built once (spread over both workers, it was built up to three times
#: per worker). `--dist loadgroup` with `xdist_group` marks would say this, but pytest 9.2 with xdist 3.8 ignores the
#: marks (pytest-dev/pytest-xdist#1386): the scheduler below groups by file name instead.
WHOLE_MODULES = frozenset(
    f"tests/{name}.py"
    for name in (
        "test_depth_probes",
        "test_export",
        "test_gpu_wheels",
        "test_marigold_multistep",
        "test_probe_serving",
        "test_probes",
    )
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `heavy` (the learning runs, the 800-request volume test, and the WHOLE_MODULES) go first, in
    their usual order, single tests before whole modules, so that each worker starts with one. Last in the
    collection, one of them ran alone while the other worker had finished everything else."""

    def rank(item: pytest.Item) -> tuple[bool, bool]:
        return item.get_closest_marker("heavy") is None, item.nodeid.split("::")[0] in WHOLE_MODULES

    items.sort(key=rank)  # stable: the order within each rank stays


@pytest.hookimpl(optionalhook=True)  # without xdist (-p no:xdist) the hook is simply unused
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """With `-n N` and no `--dist` (or `--dist load`): xdist's scope scheduler, one unit per test except the
    WHOLE_MODULES (one unit each), handed out in collection order as workers free up (no reorder by size)."""
    if config.getvalue("dist") != "load":
        return None  # an explicit --dist choice is xdist's
    from xdist.scheduler import LoadScopeScheduling

    class HeavyFirst(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::")[0]
            return path if path in WHOLE_MODULES else nodeid

    config.option.loadscopereorder = False
    return HeavyFirst(config, log)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Family, Task], Path]:
    """Builds each tiny checkpoint on first use, then reuses it."""
    from models.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    built: dict[tuple[str, str], Path] = {}

    def get(family: Family, task: Task) -> Path:
        key = (family, task)
        if key not in built:
            built[key] = make_tiny(root / f"{family}-{task}", family, task, seed=0)
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_dir: Callable[[Family, Task], Path]):
    """A loaded DensePredictor per (family, task), cached for the session."""
    from models.loading import load_model
    from models.spec import resolve_spec

    loaded: dict[tuple[str, str], object] = {}

    def get(family: Family, task: Task):
        key = (family, task)
        if key not in loaded:
            loaded[key] = load_model(resolve_spec(str(tiny_dir(family, task))))
        return loaded[key]

    return get


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (float32 [H, W, 3] in [0, 1]), so resizing is not trivially lossless."""
    rng = np.random.default_rng(seed)
    base = rng.random((max(2, h // 4), max(2, w // 4), 3)).astype(np.float32)
    t = torch.from_numpy(base).permute(2, 0, 1)[None]
    up = torch.nn.functional.interpolate(t, (h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    noise = rng.random((h, w, 3)).astype(np.float32) * 0.2
    return np.clip(up.numpy() * 0.8 + noise, 0.0, 1.0).astype(np.float32)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_url():
    """A real Redis for the session: REDIS_URL, or a private server started here (and stopped after)."""
    from tests.redis_server import RedisServer, external_url

    url = external_url()
    if url:
        yield url
        return
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture
def redis_prefix() -> str:
    """A key namespace per test, so tests sharing one server never see each other's keys."""
    import uuid

    return f"t{uuid.uuid4().hex[:10]}"
