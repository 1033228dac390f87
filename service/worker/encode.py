"""Turn finished maps into reply bytes in the job's encoding (runs in the I/O thread pool)."""

from __future__ import annotations

import numpy as np

from models.inference import UncertaintyResult
from models.outputs import PredictionMap
from service import codec
from service.jobs import Encoding


def encode_prediction(pred: PredictionMap, encoding: Encoding) -> bytes:
    if encoding in ("raw16", "raw32"):
        return pred.array.astype("<f2" if encoding == "raw16" else "<f4").tobytes()
    if encoding == "npy":
        return codec.encode_npy(pred.array)
    if encoding == "color":
        return codec.encode_color_png(pred)
    return codec.encode_map_png(pred)


def uncertainty_png_max(kind: str) -> float:
    """16-bit PNGs hold [0, 1]: depth spread is already in map units; angular spread is divided by 180 deg."""
    return 180.0 if kind == "normals" else 1.0


def encode_uncertainty(result: UncertaintyResult, encoding: Encoding) -> dict[str, bytes]:
    kind = result.prediction.kind
    scale = uncertainty_png_max(kind)
    outputs = {"prediction": encode_prediction(result.prediction, encoding)}
    if encoding == "npy":
        outputs["uncertainty"] = codec.encode_npy(result.uncertainty)
    elif encoding == "color":
        outputs["uncertainty"] = codec.encode_spectral_png(1.0 - np.clip(result.uncertainty / scale, 0, 1))
    else:
        outputs["uncertainty"] = codec.encode_png16(result.uncertainty / scale)
    if result.members is not None:
        outputs["members"] = codec.encode_npy(result.members)
    return outputs


def uncertainty_metadata(result: UncertaintyResult) -> dict[str, object]:
    kind = result.prediction.kind
    return {
        **result.prediction.metadata(),
        "seeds": result.seeds,
        "reduction": result.reduction,
        "uncertainty_unit": "degrees" if kind == "normals" else "map units (aligned members)",
        "uncertainty_measure": (
            "mean angle to the mean direction" if result.reduction == "mean" else "median angle to the median direction"
        )
        if kind == "normals"
        else ("standard deviation" if result.reduction == "mean" else "median absolute deviation"),
        "uncertainty_png_max": uncertainty_png_max(kind),
        "uncertainty_max": float(result.uncertainty.max(initial=0.0)),
    }
