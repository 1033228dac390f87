"""Where a spec's checkpoint lives on this machine: a local folder, or a hub id through the Hugging Face cache.

No torch: the front-ends check their sources (preflight) without loading a model.

Only safetensors weights are used: a pickle (`.bin`, `.pt`, ...) can run code when loaded, so a folder whose
weights exist only as pickles is refused here, before any library sees it, and the hub download never fetches
them. A hub id must name a revision (`revision` in the spec, or `--model ORG/NAME@REV`): the hub's `main` moves,
so an unpinned id could serve different (or tampered) weights tomorrow; a branch or tag is allowed with a
warning, a 40-hex commit sha pins it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from models.errors import ModelLoadError, UnsafeFormatError
from models.spec import ModelSpec

log = logging.getLogger(__name__)

COMPONENT_DIRS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
_warned_unpinned: set[tuple[str, str]] = set()


def resolve_source(spec: ModelSpec) -> Path:
    """A local folder as is; a hub id at its pinned revision through the Hugging Face cache (respects
    HF_HUB_OFFLINE). Either way the weights must be safetensors."""
    source = Path(spec.source).expanduser()
    if source.is_dir():
        path = source.resolve()
    elif source.is_absolute() or spec.source.startswith((".", "~")) or spec.source.count("/") != 1:
        raise ModelLoadError(f"model '{spec.id}': local checkpoint folder '{spec.source}' does not exist")
    else:
        path = _fetch(spec)
    require_safetensors(spec.id, path)
    return path


def _fetch(spec: ModelSpec) -> Path:
    if not spec.revision:
        raise ModelLoadError(
            f"model '{spec.id}': cannot fetch hub checkpoint '{spec.source}' without a pinned revision; set "
            f'revision = "<commit sha>" in its model spec (or pass --model {spec.source}@<commit sha>)'
        )
    if not COMMIT_SHA.match(spec.revision) and (spec.source, spec.revision) not in _warned_unpinned:
        _warned_unpinned.add((spec.source, spec.revision))
        log.warning(
            "model '%s': hub revision '%s' of %s is a branch or tag, not a commit sha: what it names can change; "
            "pin the 40-hex commit",
            spec.id,
            spec.revision,
            spec.source,
        )
    from huggingface_hub import HfApi

    hint = (
        f"download it where a network exists (`hf download {spec.source} --revision {spec.revision} --local-dir "
        f'DIR`), copy DIR here, and set source = "DIR" in the model spec (or pass --model DIR)'
    )
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        if not offline:
            # One request without retries: an unreachable hub or an unknown revision fails at once (the file
            # listing of a pinned commit retries for half a minute).
            HfApi().model_info(spec.source, revision=spec.revision)
        return _snapshot(spec, local_only=False)
    except Exception as exc:  # the hub client raises many types; all mean "not available here"
        if not offline:
            try:
                return _snapshot(spec, local_only=True)  # no network, but this revision is in the cache
            except Exception:
                pass
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else str(exc).splitlines()[0]
        raise ModelLoadError(
            f"model '{spec.id}': cannot fetch hub checkpoint '{spec.source}' at revision {spec.revision} ({why}); "
            f"{hint}"
        ) from exc


def _snapshot(spec: ModelSpec, local_only: bool) -> Path:
    """The pinned revision's config, tokenizer and safetensors files (never a pickle) through the cache."""
    from huggingface_hub import snapshot_download

    return Path(
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
            local_files_only=local_only,
        )
    )


def require_safetensors(model_id: str, path: Path) -> None:
    """Refuse a diffusers folder with a weight component that has pickle weights and no safetensors.

    Folders without these components (exports, partial folders) pass: their own loaders say what is missing.
    """
    for comp in WEIGHT_COMPONENTS:
        folder = path / comp
        if not folder.is_dir():
            continue
        files = [p for p in folder.iterdir() if p.is_file()]
        pickles = sorted(p.name for p in files if p.suffix in PICKLE_WEIGHTS)
        if pickles and not any(p.suffix == ".safetensors" for p in files):
            raise UnsafeFormatError(
                f"model '{model_id}': {folder} has only pickle weights ({', '.join(pickles)}); only safetensors "
                "weights are loaded (a pickle can run code when loaded). Use a revision of the checkpoint that "
                "ships .safetensors, or convert it once on a machine where you trust the file (load it and "
                "save_pretrained(DIR, safe_serialization=True))"
            )
