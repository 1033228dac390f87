"""The wheelhouse for the GPU check: the wheels a lent GPU machine needs besides what its image has.

    .venv/bin/python -m load_tests.gpu_wheels [--out .gpu-wheels]        (make gpu-wheels)

The device machine (the device tool's notes, kind `nvidia-h200`) runs Python 3.12 with torch,
transformers, numpy, onnxruntime (CPU), pillow, grpcio, ... but no diffusers, fastapi, uvicorn or redis, and it
cannot reach a package registry. So this resolves the project's runtime dependencies for CPython 3.12 on
manylinux x86_64 against that image (its recorded versions are pinned, so nothing is picked that the image's own
packages cannot live with), keeps only what the image lacks, builds the project itself as a wheel, and checks
that the wheelhouse and the working tree that travels with it fit the device tool's 64 MiB. On the device:

    python3 -m pip install --no-index --find-links .gpu-wheels 'dense-serve[worker]'

installs exactly the missing ones (pip keeps the image's packages where they satisfy the requirements).
`manifest.json` in the wheelhouse lists every wheel with why it is there, and the image packages the
resolution relied on.
"""

from __future__ import annotations

import argparse
import email.parser
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / ".gpu-wheels"
#: What the device tool carries in one call: the working tree plus carried paths (its README's Limits).
CARRY_BUDGET_BYTES = 64 * 1024 * 1024
PYTHON_VERSION = "3.12"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
#: The Python packages of the device image ('cuda'), as the device tool's notes list them (read 2026-11-17).
_IMAGE_LIST = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize
    huggingface-hub hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
    jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite
    lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
    multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
    nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
    nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless
    optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
    pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
    pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
    python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
    scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson
    six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
    tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision
    tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug
    wheel wrapt xarray xxhash yarl zipp
"""
IMAGE_PACKAGES = frozenset(canonicalize_name(n) for n in _IMAGE_LIST.split())
#: Versions the device tool's notes record for the image (a session's `pip list`, 2026-11): pinned while resolving,
#: so the wheels chosen work with them (diffusers must accept huggingface-hub 1.33, not the newest hub).
IMAGE_VERSIONS = {
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
    "onnx": "1.23.1",
    "onnxruntime": "1.30.0",
    "safetensors": "0.8.0",
    "tokenizers": "0.23.2",
    "torch": "2.11.0",
    "torchvision": "0.26.0",
    "transformers": "5.17.0",
    "triton": "3.6.0",
}
#: On the image, but at a version nobody recorded, while the project needs a release that new: carried so an
#: older image copy cannot stop the install (pip installs the carried wheel only if the image's falls short).
#: On the image, never resolved here (see `resolve`).
NOT_RESOLVED = frozenset({"torch"})
#: The device runs the worker side (models, runtimes): the project is installed with these extras.
PROJECT_EXTRAS = ("worker",)
CARRY_ANYWAY = {
    "grpcio": "service/grpc/stubs are generated for grpcio>=1.85.1 and refuse an older runtime",
    "protobuf": "the generated dense_pb2 validates the protobuf runtime (>=7.35.1)",
}


@dataclass
class Wheel:
    file: str
    name: str
    version: str
    bytes: int
    why: str


@dataclass
class Manifest:
    python: str
    platforms: list[str]
    wheels: list[Wheel]
    #: Image packages the resolution relied on, at the version it used (recorded ones pinned).
    image_side: dict[str, str]
    #: Image packages whose version is not recorded: assumed to satisfy what the wheels require.
    assumed_on_image: list[str]
    wheel_bytes: int
    tree_bytes: int
    budget_bytes: int
    problems: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.wheel_bytes + self.tree_bytes <= self.budget_bytes


def pip(*args: str, cwd: Path | None = None) -> None:
    """This interpreter's pip; raises with pip's own message when it fails."""
    proc = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"pip {args[0]} failed:\n{proc.stderr[-4000:]}")


def target_args() -> list[str]:
    """pip options that pick wheels for the device's interpreter, whatever runs this script."""
    args = ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp"]
    args += ["--abi", "cp" + PYTHON_VERSION.replace(".", "")]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    return args


def wheel_metadata(path: Path) -> email.message.Message:
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(zf.read(name).decode())


def requirements_of(path: Path, extras: tuple[str, ...] = ()) -> list[Requirement]:
    """A wheel's requirements on the device (markers for CPython 3.12 on Linux), with those of `extras`; a
    self-reference (`dense-serve[worker]` inside another extra) is left out: its requirements are listed too."""
    env = {"python_version": PYTHON_VERSION, "python_full_version": PYTHON_VERSION + ".3"}
    env |= {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
    env |= {"implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix"}
    meta = wheel_metadata(path)
    own = canonicalize_name(meta["Name"])
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    return [
        r
        for r in reqs
        if canonicalize_name(r.name) != own
        and any(r.marker is None or r.marker.evaluate(env | {"extra": e}) for e in ("", *extras))
    ]


def tree_bytes(repo: Path = REPO) -> int:
    """What the device tool sends besides carried paths: tracked files and untracked ones git does not ignore."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout
    files = {repo / p for p in out.decode().split("\0") if p}
    return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())


def build_project_wheel(dest: Path) -> Path:
    """The project as a wheel (its metadata carries the requirements the device's pip resolves), built from a
    copy of the files that travel, so a stale `build/` folder or an ignored file can never end up in it."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    with tempfile.TemporaryDirectory() as tmp:
        src, built = Path(tmp) / "src", Path(tmp) / "wheel"
        for rel in filter(None, listed.split("\0")):
            if (REPO / rel).is_file():
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, src / rel)
        pip("wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(built), str(src))
        (wheel,) = built.glob("dense_serve-*.whl")
        return Path(shutil.copy2(wheel, dest))


def resolve(project_wheel: Path, work: Path) -> dict[str, str]:
    """name -> version of the project's runtime closure for the device, the image's recorded versions pinned.

    torch is left out of the request (the image has it; resolving it would fetch a CUDA build's metadata and
    its nvidia-* dependencies for nothing) and added back at the image's version.
    """
    wanted = [  # without markers: those were evaluated for the device (an extra's would not hold for pip)
        f"{r.name}{'[' + ','.join(sorted(r.extras)) + ']' if r.extras else ''}{r.specifier}"
        for r in requirements_of(project_wheel, PROJECT_EXTRAS)
        if canonicalize_name(r.name) not in NOT_RESOLVED
    ]
    constraints = work / "image-constraints.txt"
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(IMAGE_VERSIONS.items())))
    report = work / "report.json"
    pip(
        "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
        "--target", str(work / "target"), *target_args(), "-c", str(constraints), *wanted,
    )  # fmt: skip
    items = json.loads(report.read_text())["install"]
    closure = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in items}
    return closure | {n: IMAGE_VERSIONS[n] for n in NOT_RESOLVED}


def why(name: str) -> str:
    if name in CARRY_ANYWAY:
        return "on the image at an unrecorded version; " + CARRY_ANYWAY[name]
    return "not on the device image"


def check_closure(wheels: dict[str, Path]) -> tuple[list[str], list[str]]:
    """Every requirement of every carried wheel is met by another carried wheel or by the image.

    Returns (problems, image packages assumed to be new enough because their version is not recorded).
    """
    problems: list[str] = []
    assumed: set[str] = set()
    versions = {n: Version(wheel_metadata(p)["Version"]) for n, p in wheels.items()}
    for name, path in wheels.items():
        for req in requirements_of(path, PROJECT_EXTRAS if name == "dense-serve" else ()):
            dep = canonicalize_name(req.name)
            if dep in versions:
                if not req.specifier.contains(versions[dep], prereleases=True):
                    problems.append(f"{name} needs {req}, the wheelhouse has {dep} {versions[dep]}")
            elif dep in IMAGE_VERSIONS:
                if not req.specifier.contains(IMAGE_VERSIONS[dep], prereleases=True):
                    problems.append(f"{name} needs {req}, the image has {dep} {IMAGE_VERSIONS[dep]}")
            elif dep in IMAGE_PACKAGES:
                assumed.add(dep)
            else:
                problems.append(f"{name} needs {req}: neither carried nor on the image")
    return problems, sorted(assumed)


def build(out: Path) -> Manifest:
    """Rebuild `out` from scratch: project wheel, resolution, downloads, checks, manifest.json."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        project = build_project_wheel(out)
        closure = resolve(project, work)
        carried = {n: v for n, v in closure.items() if n not in IMAGE_PACKAGES or n in CARRY_ANYWAY}
        image_side = {n: v for n, v in closure.items() if n not in carried}
        downloads = work / "dl"
        pip("download", "--no-deps", "--quiet", "-d", str(downloads), *target_args(),
            *(f"{n}=={v}" for n, v in sorted(carried.items())))  # fmt: skip
        for path in downloads.glob("*.whl"):
            shutil.copy2(path, out / path.name)
    files = {canonicalize_name(wheel_metadata(p)["Name"]): p for p in sorted(out.glob("*.whl"))}
    wheels = [
        Wheel(
            p.name, n, wheel_metadata(p)["Version"], p.stat().st_size, why(n) if n != "dense-serve" else "the project"
        )
        for n, p in sorted(files.items())
    ]
    problems, assumed = check_closure(files)
    if len(files) != len(list(out.glob("*.whl"))):
        problems.append("two versions of one package: pip's --no-deps install of *.whl would stop")
    manifest = Manifest(
        python=PYTHON_VERSION,
        platforms=list(PLATFORMS),
        wheels=wheels,
        image_side=image_side,
        assumed_on_image=assumed,
        wheel_bytes=sum(w.bytes for w in wheels),
        tree_bytes=tree_bytes(),
        budget_bytes=CARRY_BUDGET_BYTES,
        problems=problems,
    )
    if not manifest.fits:
        manifest.problems.append(
            f"wheelhouse {manifest.wheel_bytes / 2**20:.1f} MiB + working tree {manifest.tree_bytes / 2**20:.1f} MiB "
            f"is over the device tool's {CARRY_BUDGET_BYTES / 2**20:.0f} MiB"
        )
    (out / "manifest.json").write_text(json.dumps(asdict(manifest), indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    manifest = build(args.out)
    for w in manifest.wheels:
        print(f"{w.bytes / 2**20:7.2f} MiB  {w.file}  ({w.why})")
    print(
        f"{len(manifest.wheels)} wheels, {manifest.wheel_bytes / 2**20:.1f} MiB; with the working tree "
        f"({manifest.tree_bytes / 2**20:.1f} MiB): {(manifest.wheel_bytes + manifest.tree_bytes) / 2**20:.1f} of "
        f"{CARRY_BUDGET_BYTES / 2**20:.0f} MiB"
    )
    if manifest.assumed_on_image:
        print("image packages assumed new enough (version unrecorded): " + ", ".join(manifest.assumed_on_image))
    for problem in manifest.problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if manifest.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
