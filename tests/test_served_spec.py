"""One precedence for what a served model runs with (service.processes.served_spec): settings that override every
model win over the spec, the spec wins over the server's defaults. Before, Settings won for engine_cache (a
spec's own cache was silently ignored) while the spec won for batching."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.errors import SpecError
from models.spec import ModelSpec
from service.config import Settings
from service.processes import served_spec, serving_specs


def spec_file(tmp_path: Path, source: Path, **fields: object) -> Path:
    lines = [f'source = "{source}"', *(f"{k} = {v!r}".replace("'", '"') for k, v in fields.items())]
    path = tmp_path / "my-depth.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_spec_wins_over_server_defaults_and_fills_nothing_it_sets(tmp_path: Path, tiny_dir) -> None:
    path = spec_file(
        tmp_path, tiny_dir("lotus-d", "depth"), engine_cache="/srv/engines", max_batch_size=2, max_queue_delay_ms=1.5
    )
    settings = Settings(models=[str(path)], max_batch_size=16, max_queue_delay_ms=9.0, engine_cache=Path("/x"))
    (spec,), _ = serving_specs(settings)
    assert (spec.engine_cache, spec.max_batch_size, spec.max_queue_delay_ms) == ("/srv/engines", 2, 1.5)


def test_server_defaults_fill_what_the_spec_leaves_unset(tmp_path: Path, tiny_dir) -> None:
    path = spec_file(tmp_path, tiny_dir("lotus-d", "depth"))
    settings = Settings(models=[str(path)], max_batch_size=16, max_queue_delay_ms=9.0, engine_cache=Path("/x"))
    (spec,), _ = serving_specs(settings)
    assert (spec.engine_cache, spec.max_batch_size, spec.max_queue_delay_ms) == ("/x", 16, 9.0)


def test_overriding_settings_win_over_the_spec_for_configured_and_default_models(tmp_path: Path, tiny_dir) -> None:
    path = spec_file(tmp_path, tiny_dir("lotus-d", "depth"), device="cuda", dtype="fp16", backend="onnxruntime")
    settings = Settings(models=[str(path)], device="cpu", dtype="fp32", backend="torch")
    (spec,), _ = serving_specs(settings)
    assert (spec.device, spec.dtype, spec.backend) == ("cpu", "fp32", "torch")
    # Not given: the spec keeps its own.
    (spec,), _ = serving_specs(Settings(models=[str(path)]))
    assert (spec.device, spec.dtype, spec.backend) == ("cuda", "fp16", "onnxruntime")
    # The default models (no --model) follow the same rule.
    defaults, _ = serving_specs(Settings(device="cpu", tiny_dir=tmp_path / "tiny"))
    assert defaults and all(s.device == "cpu" for s in defaults)


def test_an_invalid_override_names_the_model() -> None:
    spec = ModelSpec(id="m", source="/nowhere")
    with pytest.raises(SpecError, match="model 'm'"):
        served_spec(spec, Settings.model_construct(device=None, dtype="fp64", backend=None, engine_cache=Path("c"),
                                                    max_batch_size=8, max_queue_delay_ms=5.0))  # fmt: skip
