"""The models served when none is configured. `serve`, `worker`, `predict` and `models` all read this one list,
so the CLI's default model is the one `/v1/depth` answers with on `make run`.

The list: every shipped demo spec (`models/demo/*.toml`, `models/demo/*/*.toml`: small models trained by
`dense-serve finetune`, coarse but real), then tiny random-weight checkpoints only for what no trained demo
covers: per task (depth, normals), a multi-seed Lotus-G model serves `/v1/uncertainty` and, where no trained
model serves the task at all, its plain endpoint too (random ones come after trained ones). The first model of a task
is that task's default (the front-end takes the first one serving it), so trained models come first, among them
deterministic ones (one answer per image) before generative ones, then the larger processing resolution.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from models.detect import CheckpointConfig, identify
from models.errors import ModelError
from models.outputs import Family, Task
from models.source import resolve_source
from models.spec import ModelSpec, load_spec_file

log = logging.getLogger(__name__)
DEMO_DIR = Path(__file__).resolve().parent.parent / "models" / "demo"
#: Families whose answers vary with the seed: the ones `/v1/uncertainty` (multi-seed) can run.
GENERATIVE: tuple[Family, ...] = ("lotus-g", "marigold")
TINY_RES = 128


@dataclass(frozen=True)
class DefaultModel:
    """One default model with what a newcomer must be told about it."""

    spec: ModelSpec
    family: Family
    task: Task
    processing_res: int
    trained: bool  # False: random weights, its maps are noise

    @property
    def generative(self) -> bool:
        return self.family in GENERATIVE


def demo_spec_files(demo_dir: Path = DEMO_DIR) -> list[Path]:
    """The shipped demo specs: `DIR/*.toml` and `DIR/*/*.toml`, in name order."""
    return sorted(demo_dir.glob("*.toml")) + sorted(demo_dir.glob("*/*.toml"))


def _demo(path: Path) -> DefaultModel | None:
    """A demo spec with its family, task and training read from the checkpoint's configs (no weights are read:
    make_tiny's checkpoints carry a random-weights mark); one that cannot be read is left out with a warning
    rather than stopping the server."""
    try:
        spec = load_spec_file(path)
        config = CheckpointConfig.read(resolve_source(spec))
        who = identify(spec, config)
    except ModelError as exc:
        log.warning("demo spec %s left out: %s", path, exc)
        return None
    return DefaultModel(spec, who.family, who.task, who.processing_res, trained=not config.random_weights)


def _tiny(tiny_dir: Path, family: Family, task: Task) -> DefaultModel:
    path = (tiny_dir / f"{family}-{task}").resolve()
    spec = ModelSpec(id=f"tiny-{family}-{task}", source=str(path), family=family, task=task, processing_res=TINY_RES)
    return DefaultModel(spec, family, task, TINY_RES, trained=False)


def default_models(tiny_dir: Path, demo_dir: Path = DEMO_DIR) -> list[DefaultModel]:
    """The default list in serving order (the first model of a task is its default); tiny checkpoints are not
    built here (`build_tiny`), so listing costs no torch import."""
    demos = [m for m in map(_demo, demo_spec_files(demo_dir)) if m is not None]
    # Trained first; then one-answer models before generative ones (Lotus-D over Lotus-G for a plain map, as the
    # Lotus authors recommend; the generative ones still serve `/v1/uncertainty`), then the larger resolution.
    demos.sort(key=lambda m: (not m.trained, m.generative, -m.processing_res))  # stable among equals
    ids = [m.spec.id for m in demos]
    for m in demos:
        if ids.count(m.spec.id) > 1:
            raise ModelError(f"two demo specs share the id '{m.spec.id}' in {demo_dir}")
    trained = [m for m in demos if m.trained]
    tiny = []
    if not any(m.task == "depth" and m.generative for m in trained):  # covers depth too when nothing trained does
        tiny.append(_tiny(tiny_dir, "lotus-g", "depth"))
    if not any(m.task == "normals" and m.generative for m in trained):  # `/v1/uncertainty?task=normals` too
        tiny.append(_tiny(tiny_dir, "lotus-g", "normals"))
    return trained + tiny + [m for m in demos if not m.trained]


def default_for(models: list[DefaultModel], task: Task) -> DefaultModel | None:
    """The model a request without `model` runs on, as the front-end picks it: the first serving the task."""
    return next((m for m in models if m.task == task), None)


def build_tiny(model: DefaultModel) -> ModelSpec:
    """Write a random-weight checkpoint the first time it is needed (a second or two; it imports torch), and
    again where an older build in the cache lacks the random-weights mark (it would be taken for a trained one)."""
    from models.detect import has_random_weights

    path = Path(model.spec.source)
    if not model.trained and not has_random_weights(path):
        from models.tiny import make_tiny

        make_tiny(path, model.family, model.task)
    return model.spec


def describe(models: list[DefaultModel]) -> str:
    """One line per default model for `dense-serve models` and the server's banner: id, task, whether it is
    the default of its endpoint, trained or random."""
    rows = []
    width = max((len(m.spec.id) for m in models), default=0)
    for m in models:
        roles = [f"/v1/{m.task}"] if default_for(models, m.task) is m else []
        if m.generative and next((d for d in models if d.task == m.task and d.generative), None) is m:
            roles.append("/v1/uncertainty" + ("" if m.task == "depth" else f" (task={m.task})"))
        role = f"default of {', '.join(roles)}" if roles else "served"
        what = "trained demo, coarse but real" if m.trained else "RANDOM WEIGHTS, noise"
        rows.append(f"{m.spec.id:{width}} {m.family:8} {m.task:8} {what}; {role}")
    return "\n".join(rows)
