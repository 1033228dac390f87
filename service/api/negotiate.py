"""Choose the answer format from `format` or the `Accept` header (default: 16-bit PNG)."""

from __future__ import annotations

from service.api.schemas import MEDIA_TYPES
from service.errors import NotAcceptable
from service.request import Format

#: Accept media types -> format, in the order a wildcard prefers them.
ACCEPTED: dict[str, Format] = {
    "application/json": "json",
    "application/x-npy": "npy",
    "application/octet-stream": "npy",
    "image/png": "png",
    "image/*": "png",
    "*/*": "png",
    "image/x-exr": "exr",
    "image/aces": "exr",
    "image/tiff": "tiff",
    "image/tiff-fx": "tiff",
}


def choose(fmt: Format | None, accept: str | None) -> Format:
    if fmt is not None:
        return fmt
    for media in _ranked(accept or "*/*"):
        if media in ACCEPTED:
            return ACCEPTED[media]
    offered = ", ".join(sorted(set(MEDIA_TYPES.values())))
    raise NotAcceptable(f"cannot produce any of: {accept}; available: {offered} (or use the format parameter)")


def _ranked(accept: str) -> list[str]:
    entries: list[tuple[float, int, str]] = []
    for i, part in enumerate(accept.split(",")):
        media, *opts = [p.strip() for p in part.split(";")]
        q = 1.0
        for opt in opts:
            if opt.startswith("q="):
                try:
                    q = float(opt[2:])
                except ValueError:
                    q = 0.0
        if media and q > 0:
            entries.append((-q, i, media.lower()))
    return [media for _, _, media in sorted(entries)]
