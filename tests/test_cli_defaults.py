"""The CLI and the server agree on the default models: one list (service/defaults.py) for `serve`, `predict`
without --model, `predict --model ID` with the ids /v1/models shows, and `dense-serve models`."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from models.detect import RANDOM_WEIGHTS_KEY
from service.cli import main
from service.defaults import DEMO_DIR, default_for, default_models, demo_spec_files
from tests.conftest import REPO, SAMPLE

DEMO_SPEC = DEMO_DIR / "lotus-d-synthetic-demo.toml"


def _spec(folder: Path, name: str, source: Path, res: int) -> Path:
    """A demo spec as `dense-serve finetune` writes one: an id, a checkpoint folder, a processing size."""
    path = folder / f"{name}.toml"
    path.write_text(f'id = "{name}"\nsource = "{source}"\nprocessing_res = {res}\n')
    return path


def _trained(tiny: Path, folder: Path) -> Path:
    """A tiny checkpoint's copy without the random-weights mark, as a fine-tune export writes its index: what
    the default list reads as a trained model (only the configs are read, never the weights)."""
    copy = shutil.copytree(tiny, folder)
    index = json.loads((copy / "model_index.json").read_text())
    del index[RANDOM_WEIGHTS_KEY]
    (copy / "model_index.json").write_text(json.dumps(index))
    return copy


def test_shipped_defaults_put_the_trained_demo_first_and_random_only_where_needed(tmp_path: Path) -> None:
    models = default_models(tmp_path / "tiny")
    trained = [m for m in models if m.trained]
    assert {m.spec.id for m in trained} >= {"lotus-d-synthetic-demo"}
    assert len(trained) == len(demo_spec_files()), "every shipped demo spec is served"
    assert models[: len(trained)] == trained, "trained models come before random ones"
    assert default_for(models, "depth").trained  # type: ignore[union-attr]
    for task in ("depth", "normals"):
        assert default_for(models, task) is not None, task
    assert any(m.task == "depth" and m.generative for m in models), "/v1/uncertainty needs a multi-seed model"
    for m in models:
        if not m.trained:  # a random one only for what no trained demo covers
            covered = [t for t in trained if t.task == m.task and (t.generative or not m.generative)]
            assert not covered, (m.spec.id, [t.spec.id for t in covered])
    assert not (tmp_path / "tiny").exists(), "listing the defaults builds nothing"


def test_random_models_only_for_what_no_trained_demo_covers(tiny_dir, tmp_path: Path, caplog) -> None:
    ckpt = tmp_path / "ckpt"
    d_depth = _trained(tiny_dir("lotus-d", "depth"), ckpt / "d-depth")
    demo = tmp_path / "demo"
    (demo / "g-depth").mkdir(parents=True)
    _spec(demo, "d-depth-64", d_depth, 64)
    _spec(demo / "g-depth", "g-depth-128", _trained(tiny_dir("lotus-g", "depth"), ckpt / "g-depth"), 128)
    _spec(demo, "d-normals", _trained(tiny_dir("lotus-d", "normals"), ckpt / "d-normals"), 64)
    _spec(demo, "e-normals-random", tiny_dir("e2e-ft", "normals"), 256)  # marked random: no default, listed last
    (demo / "broken.toml").write_text('id = "broken"\nsource = "no-such-folder"\n')
    with caplog.at_level(logging.WARNING):
        models = default_models(tmp_path / "tiny", demo)
    # Trained first; a random Lotus-G normals model only for `/v1/uncertainty?task=normals` (Lotus-D gives one
    # answer whatever the seed), after the trained normals model that `/v1/normals` defaults to.
    assert [(m.spec.id, m.trained) for m in models] == [
        ("d-depth-64", True),
        ("d-normals", True),
        ("g-depth-128", True),
        ("tiny-lotus-g-normals", False),
        ("e-normals-random", False),
    ]
    # One answer per image before a generative model's seed-dependent one, whatever the resolution.
    assert default_for(models, "depth").spec.id == "d-depth-64"  # type: ignore[union-attr]
    assert default_for(models, "normals").spec.id == "d-normals"  # type: ignore[union-attr]  # trained first
    assert "broken" in caplog.text, "an unreadable demo spec is left out, with a warning"

    # Only a deterministic depth model trained: a random Lotus-G depth model for uncertainty, after it.
    only_d = tmp_path / "only-d"
    only_d.mkdir()
    _spec(only_d, "d-depth", d_depth, 64)
    ids = [(m.spec.id, m.trained) for m in default_models(tmp_path / "tiny", only_d)]
    assert ids == [("d-depth", True), ("tiny-lotus-g-depth", False), ("tiny-lotus-g-normals", False)]


def test_predict_without_model_is_the_default_and_the_demo_id_is_the_demo_spec(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("DENSE_TINY_DIR", str(tmp_path / "tiny"))
    default = default_for(default_models(tmp_path / "tiny"), "depth")
    assert default is not None
    args = ["predict", str(SAMPLE), "--format", "npy", "--processing-res", "64"]
    assert main([*args, "--out", str(tmp_path / "default")]) == 0
    assert f"({default.spec.id}: " in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "by-id"), "--model", "lotus-d-synthetic-demo"]) == 0
    assert "(lotus-d-synthetic-demo: lotus-d disparity" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "by-file"), "--model", str(DEMO_SPEC)]) == 0
    by_id = np.load(tmp_path / "by-id" / "sample_disparity.npy")
    np.testing.assert_array_equal(by_id, np.load(tmp_path / "by-file" / "sample_disparity.npy"))
    (written,) = (tmp_path / "default").iterdir()
    if default.spec.id == "lotus-d-synthetic-demo":  # the default while no larger trained depth demo is shipped
        np.testing.assert_array_equal(np.load(written), by_id)
    assert "RANDOM WEIGHTS" not in capsys.readouterr().err  # the demo is trained

    # Normals: the default normals model; a random-weight one is named as such.
    normals = default_for(default_models(tmp_path / "tiny"), "normals")
    assert normals is not None
    assert main([*args, "--out", str(tmp_path / "normals"), "--task", "normals"]) == 0
    captured = capsys.readouterr()
    assert f"({normals.spec.id}: " in captured.out and (tmp_path / "normals" / "sample_normals.npy").is_file()
    assert ("has RANDOM WEIGHTS" in captured.err) != normals.trained, captured.err


def test_predict_a_missing_file_fails_before_any_model_library_loads(tmp_path: Path) -> None:
    code = (
        "import sys; from service.cli import main; rc = main(sys.argv[1:]); "
        "print('loaded:', sorted({'torch', 'diffusers'} & set(sys.modules))); sys.exit(rc)"
    )
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code, "predict", "nonexistent.jpg", "--out", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: nonexistent.jpg: cannot read file: No such file or directory"]
    assert "loaded: []" in result.stdout, "neither torch nor diffusers was imported: no model was loaded"
    assert not (tmp_path / "out").exists()
    assert elapsed < 30, elapsed  # seconds on a loaded 2-core machine; a model load imports torch first


def test_predict_refuses_a_default_model_for_another_task(capsys) -> None:
    assert main(["predict", str(SAMPLE), "--model", "lotus-d-synthetic-demo", "--task", "normals"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: model 'lotus-d-synthetic-demo' predicts depth, not normals"]


def test_models_lists_the_default_models_then_the_shipped_specs(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    demo = next(line for line in out.splitlines() if "lotus-d-synthetic-demo" in line)
    assert "trained demo" in demo and "default of /v1/depth" in demo
    for line in out.splitlines():
        if line.strip().startswith("tiny-"):
            assert "RANDOM WEIGHTS" in line, line
    assert out.index("lotus-d-synthetic-demo") < out.index("GonzaloMG/marigold-e2e-ft-depth")


def test_a_tiny_checkpoint_cached_without_the_mark_is_rebuilt_with_it(tiny_dir, tmp_path: Path) -> None:
    """A cache written before checkpoints carried the random-weights mark would be served as trained."""
    from models.detect import has_random_weights
    from service.defaults import build_tiny

    cache = tmp_path / "tiny"
    (random_depth,) = [m for m in default_models(cache, tmp_path / "no-demos") if m.task == "depth"]
    _trained(tiny_dir("lotus-g", "depth"), Path(random_depth.spec.source))  # an old, unmarked build
    assert not has_random_weights(Path(random_depth.spec.source))
    build_tiny(random_depth)
    assert has_random_weights(Path(random_depth.spec.source))
