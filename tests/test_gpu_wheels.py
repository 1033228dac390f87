"""The GPU check's wheelhouse (`make gpu-wheels`): it fits the device tool's 64 MiB with the working tree, holds
only what the device image lacks, and installs offline, with the device's own command, into a clean CPython 3.12
that holds the image's packages. Builds from the package registry (as CI can); the install is offline."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from load_tests.gpu_wheels import CARRY_ANYWAY, CARRY_BUDGET_BYTES, IMAGE_PACKAGES, IMAGE_VERSIONS, target_args
from tests.conftest import REPO

#: What the GPU check needs and the image does not have (the issue's list, plus the project's own codecs).
NEEDED = {
    "dense-serve", "diffusers", "fastapi", "uvicorn", "starlette", "pydantic", "pydantic-settings",
    "python-multipart", "redis", "simplejpeg", "isal", "deflate", "openexr", "starlette-compress", "zstandard",
    "grpcio-health-checking", "grpcio-reflection", "python-json-logger",
}  # fmt: skip


def _python312() -> str | None:
    """A CPython 3.12 interpreter here: PYTHON312, python3.12 on PATH, or a pyenv build."""
    candidates = [os.environ.get("PYTHON312", ""), shutil.which("python3.12") or ""]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))
    for exe in filter(None, candidates):
        probe = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == "(3, 12)":
            return exe
    return None


#: The module fixture builds the wheelhouse (minutes): run first, by one worker (WHOLE_MODULES in conftest.py).
pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    out = tmp_path_factory.mktemp("gpu-wheels") / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "load_tests.gpu_wheels", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    yield out, json.loads((out / "manifest.json").read_text())


def test_the_wheelhouse_fits_and_holds_only_what_the_image_lacks(wheelhouse: tuple[Path, dict]) -> None:
    out, manifest = wheelhouse
    names = [w["name"] for w in manifest["wheels"]]
    assert manifest["problems"] == []
    assert len(names) == len(set(names)) == len(list(out.glob("*.whl")))  # one version of each
    assert set(names) >= NEEDED
    on_image = set(names) & IMAGE_PACKAGES
    assert on_image <= set(CARRY_ANYWAY), f"carried although the image has them: {on_image - set(CARRY_ANYWAY)}"
    assert not any(n == "torch" or n.startswith(("nvidia-", "triton")) for n in names)
    for wheel in out.glob("*.whl"):
        tags = wheel.stem.split("-")[-3:]
        assert tags[0] in ("py3", "py2.py3", "cp312") or tags[1] == "abi3", wheel.name  # CPython 3.12 can load it
        assert tags[2] == "any" or ("manylinux" in tags[2] and "x86_64" in tags[2]), wheel.name
    total = sum(w.stat().st_size for w in out.glob("*.whl"))
    assert total == manifest["wheel_bytes"] and total + manifest["tree_bytes"] <= CARRY_BUDGET_BYTES
    # The image's recorded versions were held while resolving (diffusers must live with its huggingface-hub).
    for name, version in IMAGE_VERSIONS.items():
        if name in manifest["image_side"]:
            assert manifest["image_side"][name] == version


def test_the_wheelhouse_installs_offline_into_a_clean_python_312(wheelhouse: tuple[Path, dict], tmp_path: Path) -> None:
    """The device's install command, offline (`--isolated --no-index`: no configured index or find-links), into
    a fresh CPython 3.12 venv that first receives the image's side of the resolution (from the registry) and a
    metadata-only record of the image's torch 2.11 (its CUDA wheel is gigabytes and the install never loads it)."""
    python312 = _python312()
    if python312 is None:
        pytest.skip("no CPython 3.12 here (set PYTHON312)")
    out, manifest = wheelhouse
    venv = tmp_path / "venv"
    subprocess.run([python312, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")

    def pip(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([py, "-m", "pip", "--isolated", *args], capture_output=True, text=True, timeout=600)

    image = tmp_path / "image"
    pins = [f"{n}=={v}" for n, v in manifest["image_side"].items() if n != "torch"]
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(image), *target_args(), *pins],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert download.returncode == 0, download.stderr[-3000:]
    stand_in = pip("install", "-q", "--no-index", "--no-deps", *map(str, sorted(image.glob("*.whl"))))
    assert stand_in.returncode == 0, stand_in.stderr[-3000:]
    purelib = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    record = Path(purelib) / f"torch-{IMAGE_VERSIONS['torch']}.dist-info"
    record.mkdir()
    (record / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {IMAGE_VERSIONS['torch']}\n")
    (record / "RECORD").write_text("")

    install = pip("install", "--no-index", "--find-links", str(out), "dense-serve[worker]")  # what the device runs
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
    installed = next(ln for ln in install.stdout.splitlines() if ln.startswith("Successfully installed"))
    from packaging.utils import canonicalize_name

    got = {canonicalize_name(item.rsplit("-", 1)[0]) for item in installed.split()[2:]}
    assert got == {w["name"] for w in manifest["wheels"]}  # every carried wheel is used, nothing else is fetched
    check = pip("check")
    assert check.returncode == 0, check.stdout
    imports = "fastapi, uvicorn, pydantic_settings, multipart, redis, simplejpeg, isal, deflate, OpenEXR, diffusers"
    imports += ", starlette_compress, pythonjsonlogger, grpc_health, grpc_reflection, service.api.app"
    imports += ", service.grpc.stubs.dense_pb2_grpc"  # the generated stubs accept the carried grpcio and protobuf
    smoke = subprocess.run([py, "-c", f"import {imports}"], capture_output=True, text=True, cwd=tmp_path)
    assert smoke.returncode == 0, smoke.stderr[-3000:]
