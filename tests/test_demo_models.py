"""The 128 px demo models shipped in models/demo/<id>/ (normals, Lotus-G disparity): each loads from its spec as
`serve` loads it, and on freshly rendered held-out scenes it beats the image-independent baselines by a margin
taken from its own evaluation (models/demo/<id>/eval.md), looser than measured so that it does not flake."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from models.training import synthetic
from models.training.config import load_config
from models.training.evaluate import load_results
from tests.conftest import REPO

if TYPE_CHECKING:
    from models.inference import DensePredictor

DEMO = REPO / "models" / "demo"
NORMALS = "lotus-d-normals-synthetic-demo"
LOTUS_G = "lotus-g-depth-synthetic-demo"
HELD_OUT = 12  # scenes rendered per test; the shipped eval used 64 (seed 12345), these use another seed
# Normals, measured: these 12 scenes 35.3 / 30.7 deg mean / median, 33.7 % under 22.5 deg, against the
# leave-one-out mean normal map's 43.6 / 41.7 / 19.4; the shipped eval 37.5 / 35.0 / 30.8 against the training
# set's mean map 43.5 / 43.2 / 17.1. Required: about half of the smaller gap.
NORMALS_MEAN_MARGIN = 3.0  # degrees
NORMALS_MEDIAN_MARGIN = 4.0  # degrees
NORMALS_WITHIN_MARGIN = 6.0  # points of the % of pixels under 22.5 degrees
# Lotus-G, measured on these 12 scenes: AbsRel 37.9 % against the leave-one-out mean map's 33.7 %, the ramp's
# 38.0 % and the constant's 42.2 %.
LOTUS_G_CONSTANT_MARGIN = 0.02
LOTUS_G_BEST_SLACK = 0.06


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Varied scenes at 128 px from a seed that neither training (1) nor the shipped validation (12345) used."""
    root = tmp_path_factory.mktemp("held-out") / "synthetic"
    synthetic.write_scenes(root, HELD_OUT, 128, 128, seed=4242, variety="varied")
    return root


def _load(model_id: str) -> DensePredictor:
    """The shipped model, loaded from its spec as `serve` loads it, after checking its folder."""
    from models.loading import load_model
    from models.spec import resolve_spec

    folder = DEMO / model_id
    spec = resolve_spec(str(folder / f"{model_id}.toml"))
    assert spec.id == model_id and spec.processing_res >= 128
    size = sum(p.stat().st_size for p in (folder / "model").rglob("*") if p.is_file())
    assert size < 8 * 2**20, size  # a few MB, like the 64 px demo
    assert load_config(folder / "config.yaml") == load_config(REPO / "configs" / f"{model_id}.yaml")
    return load_model(spec)


def test_normals_demo_beats_the_baselines(held_out: Path) -> None:
    from models.training.baselines import best, evaluate_baselines
    from models.training.evaluate import evaluate_dataset

    model = _load(NORMALS)
    assert (model.family, model.output_kind) == ("lotus-d", "normals")
    result = evaluate_dataset(model, held_out)
    strongest = best(evaluate_baselines(held_out, "normals"))
    assert result.normals is not None and strongest.normals is not None
    assert result.normals.mean < strongest.normals.mean - NORMALS_MEAN_MARGIN, (result, strongest)
    assert result.normals.median < strongest.normals.median - NORMALS_MEDIAN_MARGIN, (result, strongest)
    assert result.normals.within_22_5 > strongest.normals.within_22_5 + NORMALS_WITHIN_MARGIN, (result, strongest)
    # The shipped table (64 scenes, the training set's mean normal map) says the same.
    rows = load_results(DEMO / NORMALS / "eval.json")
    exported = rows[-1]
    assert exported.label.endswith("exported)") and exported.normals is not None
    baselines = [r.normals for r in rows if r.baseline and r.normals is not None]
    assert len(baselines) == 3
    assert exported.normals.mean < min(b.mean for b in baselines) - NORMALS_MEAN_MARGIN


def test_lotus_g_demo_learned_and_its_seeds_disagree(held_out: Path) -> None:
    """Lotus-G is only on a par with the mean disparity map (models/demo/<id>/eval.md: AbsRel 27.58 % against the
    training set's 28.10 %, delta1 55.96 % against the ramp's 55.53 %; on these 12 scenes worse: 37.9 % against
    the leave-one-out mean map's 33.7 %), so this checks what it does do: it beats the constant and its own
    starting point by a clear margin, stays within 6 AbsRel points of the best baseline, and its noise seeds give
    different maps (what the uncertainty panel shows)."""
    from models.training.baselines import evaluate_baselines
    from models.training.evaluate import evaluate_dataset

    model = _load(LOTUS_G)
    assert (model.family, model.output_kind) == ("lotus-g", "disparity")
    result = evaluate_dataset(model, held_out, seed=0)
    rows = {r.label.split(" (")[0]: r.depth for r in evaluate_baselines(held_out, "disparity")}
    assert result.depth is not None and all(d is not None for d in rows.values())
    best_abs_rel = min(d.abs_rel for d in rows.values())  # type: ignore[union-attr]
    assert result.depth.abs_rel < rows["baseline: constant"].abs_rel - LOTUS_G_CONSTANT_MARGIN, (result, rows)
    assert result.depth.abs_rel < best_abs_rel + LOTUS_G_BEST_SLACK, (result, rows)
    shipped = load_results(DEMO / LOTUS_G / "eval.json")
    start, exported = shipped[0], shipped[-1]
    assert start.label == "step 0" and exported.label.endswith("exported)")
    assert start.depth is not None and exported.depth is not None
    assert exported.depth.abs_rel < start.depth.abs_rel - 0.03  # measured 33.05 % -> 27.58 %
    # The uncertainty panel shows the spread over noise seeds: the seeds must give different maps.
    image = synthetic.generate((4242, 0), 128, 128, "varied").rgb
    a, b = (p.array for p in model.predict([image, image], seeds=[0, 1]))
    assert np.isfinite(a).all() and np.abs(a - b).mean() > 1e-4
