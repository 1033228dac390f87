"""Where a spec's checkpoint lives on this machine: a local folder, or a hub id through the Hugging Face cache.

No torch: the front-ends check their sources (preflight) without loading a model.
"""

from __future__ import annotations

import os
from pathlib import Path

from models.errors import ModelLoadError
from models.spec import ModelSpec

COMPONENT_DIRS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTS = (".safetensors", ".bin")


def resolve_source(spec: ModelSpec) -> Path:
    """A local folder as is; a hub id through the Hugging Face cache (respects HF_HUB_OFFLINE)."""
    source = Path(spec.source).expanduser()
    if source.is_dir():
        return source.resolve()
    if source.is_absolute() or spec.source.startswith((".", "~")) or spec.source.count("/") != 1:
        raise ModelLoadError(f"model '{spec.id}': local checkpoint folder '{spec.source}' does not exist")
    from huggingface_hub import snapshot_download

    hint = (
        f"download it where a network exists (`hf download {spec.source} --local-dir DIR`), copy DIR here, "
        f'and set source = "DIR" in the model spec (or pass --model DIR)'
    )
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        path = Path(
            snapshot_download(
                spec.source,
                revision=spec.revision,
                allow_patterns=[
                    "model_index.json",
                    *(f"{c}/*.json" for c in COMPONENT_DIRS),
                    "tokenizer/*.txt",
                    *(f"{c}/*.safetensors" for c in COMPONENT_DIRS),
                ],
                ignore_patterns=["*.fp16.*", "*non_ema*"],
            )
        )
        for comp in ("unet", "vae", "text_encoder"):
            if not any(p.suffix in WEIGHTS for p in (path / comp).glob("*")):
                snapshot_download(
                    spec.source,
                    revision=spec.revision,
                    allow_patterns=[f"{comp}/*.bin"],
                    ignore_patterns=["*.fp16.*", "*non_ema*"],
                )
    except Exception as exc:  # the hub client raises many types; all mean "not available here"
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else str(exc).splitlines()[0]
        raise ModelLoadError(f"model '{spec.id}': cannot fetch hub checkpoint '{spec.source}' ({why}); {hint}") from exc
    return path
