"""The lock files (requirements/*.txt, written by `make lock`) agree with pyproject.toml and with each other, and
the environment the suite runs in is the lock: a fresh machine installs exactly what CI tested."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

LOCKS = REPO / "requirements"
#: Each universal lock and the extras of dense-serve it must satisfy (torch comes from torch-cpu / torch-pypi).
UNIVERSAL = {"base": (), "worker": ("worker",), "train": ("train",), "dev": ("dev",)}


@dataclass(frozen=True)
class Pin:
    name: str
    version: Version
    marker: Marker | None
    hashes: tuple[str, ...]

    def applies(self, env: dict[str, str] | None = None) -> bool:
        return self.marker is None or self.marker.evaluate(env)


@cache
def pins(lock: str) -> tuple[Pin, ...]:
    """The `name==version ; marker` entries of a lock file with their --hash options."""
    text = (LOCKS / f"{lock}.txt").read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", "\n".join(line for line in text.splitlines() if not line.startswith("#")))
    out = []
    for entry in entries:
        head = entry.split("\\", 1)[0].strip()
        if not head or head.startswith("-"):
            continue
        requirement = Requirement(head)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"{lock}.txt: {head} is not an exact pin"
        out.append(
            Pin(
                canonicalize_name(requirement.name),
                Version(spec.version),
                requirement.marker,
                tuple(re.findall(r"--hash=(sha256:[0-9a-f]{64})", entry)),
            )
        )
    return tuple(out)


def pinned(lock: str, env: dict[str, str] | None = None) -> dict[str, Version]:
    """What the lock installs in an environment (this interpreter's by default)."""
    return {p.name: p.version for p in pins(lock) if p.applies(env)}


def project_requirements(pyproject: Path, extras: tuple[str, ...]) -> list[Requirement]:
    """The project's requirements with these extras, its own extras (`dense-serve[worker]`) followed."""
    project = tomllib.loads(pyproject.read_text())["project"]
    name = canonicalize_name(project["name"])
    todo, seen, out = list(extras), set(), [Requirement(r) for r in project["dependencies"]]
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for raw in project["optional-dependencies"][extra]:
            requirement = Requirement(raw)
            if canonicalize_name(requirement.name) == name:
                todo.extend(requirement.extras)
            else:
                out.append(requirement)
    return out


def unmet(requirements: list[Requirement], locked: dict[str, Version], extra: str = "") -> list[str]:
    """The requirements (applicable here) that the locked versions do not satisfy or that the lock lacks."""
    problems = []
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        if name not in locked:
            problems.append(f"{requirement}: not in the lock")
        elif not requirement.specifier.contains(locked[name], prereleases=True):
            problems.append(f"{requirement}: locked {locked[name]}")
    return problems


@pytest.mark.parametrize("lock", sorted(UNIVERSAL))
def test_every_requirement_of_pyproject_is_locked_at_a_version_it_allows(lock: str) -> None:
    requirements = project_requirements(REPO / "pyproject.toml", UNIVERSAL[lock])
    locked = pinned(lock) | pinned("torch-cpu")
    assert unmet(requirements, locked) == [], "run `make lock` (docs/development.md: Updating a dependency)"
    if lock == "dev":
        client = project_requirements(REPO / "clients/python/pyproject.toml", ("all",))
        assert unmet(client, locked) == [], "run `make lock` (docs/development.md: Updating a dependency)"


def test_every_pin_is_exact_and_hashed_and_the_locks_agree_with_each_other() -> None:
    dev: dict[str, set[Version]] = {}
    for pin in pins("dev"):
        dev.setdefault(pin.name, set()).add(pin.version)
    for lock in ("base", "worker", "train", "torch-cpu", "torch-pypi", "dev"):
        for pin in pins(lock):
            assert pin.hashes, f"{lock}.txt: {pin.name} has no hash"
            if pin.name in dev and pin.name != "torch":  # one version per Python where dev.txt splits by marker
                assert pin.version in dev[pin.name], f"{lock}.txt has {pin.name} {pin.version}, dev.txt {dev[pin.name]}"
    assert "torch" not in dev, "torch comes from torch-cpu.txt or torch-pypi.txt, never from the universal locks"
    cpu, pypi = pinned("torch-cpu")["torch"], pinned("torch-pypi")["torch"]
    assert cpu.local == "cpu" and cpu.public == pypi.public, (cpu, pypi)


def test_the_gpu_lock_pins_cuda_torch_onnxruntime_gpu_and_tensorrt_together() -> None:
    linux_312 = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux"}
    gpu = pinned("gpu", linux_312)
    assert gpu["torch"].public == pinned("torch-cpu")["torch"].public and gpu["torch"].local is None
    assert {"onnxruntime-gpu", "tensorrt", "nvidia-ml-py"} <= set(gpu) and "onnxruntime" not in gpu
    assert any(name.startswith("nvidia-cudnn") for name in gpu)
    requirements = project_requirements(REPO / "pyproject.toml", ("gpu", "train"))
    problems = [p for p in unmet(requirements, gpu) if not p.startswith(("valkey", "triton"))]
    assert problems == [], "run `make lock`"
    dev = pinned("dev", linux_312)
    shared = sorted(set(gpu) & set(dev))
    assert len(shared) > 40 and [n for n in shared if gpu[n] != dev[n]] == []


def test_the_suite_runs_on_exactly_the_lock() -> None:
    """What CI tests is what `make test` installs: every package the dev lock names for this interpreter is
    installed at its locked version (a local change to .venv shows up here, not as a fresh machine going red)."""
    wanted = pinned("dev") | pinned("torch-cpu" if "+cpu" in metadata.version("torch") else "torch-pypi")
    wrong = {}
    for name, version in wanted.items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = f"locked {version}, installed {installed}"
    assert wrong == {}, "the venv is not the lock: `make install` (or `make lock` after changing pyproject.toml)"


def test_the_unmet_check_can_fail() -> None:
    """The checks above compare meaning: a floor above the locked version, or a package the lock lacks, is found."""
    locked = pinned("dev")
    assert unmet([Requirement("fastapi>=999")], locked) == [f"fastapi>=999: locked {locked['fastapi']}"]
    assert unmet([Requirement("not-a-dependency>=1")], locked) == ["not-a-dependency>=1: not in the lock"]
    assert unmet([Requirement("fastapi>=999; sys_platform == 'nowhere'")], locked) == []
