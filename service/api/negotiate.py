"""Choose the response representation from `format` or the `Accept` header (default: 16-bit PNG)."""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import ServiceError
from service.jobs import Encoding

MEDIA_TYPES: dict[Encoding, str] = {
    "png16": "image/png",
    "color": "image/png",
    "npy": "application/x-npy",
    "exr": "image/x-exr",
    "tiff": "image/tiff",
}
FORMATS: dict[str, Encoding] = {
    "png": "png16",
    "png16": "png16",
    "npy": "npy",
    "color": "color",
    "exr": "exr",
    "tiff": "tiff",
}


class NotAcceptable(ServiceError):
    code, title = "not_acceptable", "Not acceptable"


@dataclass(frozen=True)
class OutputChoice:
    as_json: bool
    encoding: Encoding

    @property
    def media_type(self) -> str:
        return "application/json" if self.as_json else MEDIA_TYPES[self.encoding]


def choose(fmt: str | None, accept: str | None, json_encoding: str = "png") -> OutputChoice:
    inner: Encoding = "npy" if json_encoding == "npy" else "png16"
    if fmt:
        if fmt == "json":
            return OutputChoice(True, inner)
        return OutputChoice(False, FORMATS[fmt])
    for media in _ranked(accept or "*/*"):
        if media == "application/json":
            return OutputChoice(True, inner)
        if media in ("application/x-npy", "application/octet-stream"):
            return OutputChoice(False, "npy")
        if media in ("image/png", "image/*", "*/*"):
            return OutputChoice(False, "png16")
        if media in ("image/x-exr", "image/aces"):
            return OutputChoice(False, "exr")
        if media in ("image/tiff", "image/tiff-fx"):
            return OutputChoice(False, "tiff")
    raise NotAcceptable(
        f"cannot produce any of: {accept}; available: image/png, application/x-npy, image/x-exr, image/tiff, "
        "application/json (or use the format parameter)"
    )


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
