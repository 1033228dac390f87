"""The last step on the runtime's device: a map in the form the answer needs, so only that crosses to the CPU.

The arithmetic is the CPU encoder's (service/codec/maps.py), operation for operation in float32, so both
give the same integers: `round(clamp(v, 0, 1) * 65535)` and `round((clamp(n, -1, 1) + 1) / 2 * 255)`,
round half to even in both numpy and torch.
"""

from __future__ import annotations

from functools import cache

import torch

from models.colormap import spectral_lut
from models.outputs import MapForm, OutputKind


def to_form(pred: torch.Tensor, kind: OutputKind, form: MapForm) -> torch.Tensor:
    """`[C, H, W]` float32 on the device -> a contiguous `[H, W]` or `[H, W, 3]` tensor in `form`."""
    if form == "color":
        if kind == "normals":
            return to_form(pred, kind, "quantized")
        values = 1.0 - pred[0] if kind == "disparity" else pred[0]
        return _lut(pred.device)[quantize_unit(values).to(torch.int32)].contiguous()
    if form == "quantized":
        if kind == "normals":
            q = pred.clamp(-1.0, 1.0).add_(1.0).div_(2.0).mul_(255.0).round_().to(torch.uint8)
            return q.permute(1, 2, 0).contiguous()
        return quantize_unit(pred[0]).to(torch.uint16).contiguous()
    layout = pred.permute(1, 2, 0) if kind == "normals" else pred[0]
    return layout.to(torch.float16 if form == "float16" else torch.float32).contiguous()


def quantize_unit(values: torch.Tensor) -> torch.Tensor:
    """`round(clamp(v, 0, 1) * 65535)`, still float (integers up to 65535 are exact in float32); in place
    on the clamped copy: four passes over a 1080p map cost 2 ms on one CPU core, not 9."""
    return values.clamp(0.0, 1.0).mul_(65535.0).round_()


@cache
def _lut(device: torch.device) -> torch.Tensor:
    return torch.from_numpy(spectral_lut().copy()).to(device)
