"""Turn finished maps into reply bytes in the job's encoding (runs in the I/O thread pool, on every core:
the PNG, EXR and TIFF encoders release the GIL)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.inference import UncertaintyResult
from models.outputs import MapForm, PredictionMap
from service import codec
from service.jobs import Encoding, MapMetadata

#: The form each encoding wants a map in when it leaves the device: only that crosses to the CPU.
FORM_OF: dict[Encoding, MapForm] = {
    "png": "quantized",
    "color": "color",
    "npy": "float32",
    "raw32": "float32",
    "tiff": "float32",
    "raw16": "float16",
    "exr": "float16",
}


@dataclass(frozen=True)
class EncodeOptions:
    png_level: int = 1
    tiff_compression: codec.TiffCompression = "deflate"

    def check(self) -> None:
        """Fail at start-up, not on the first TIFF request, when zstd TIFF cannot be written here."""
        if self.tiff_compression == "zstd":
            try:
                import imagecodecs  # noqa: F401 - tifffile's zstd codec
            except ImportError as exc:
                raise ValueError(
                    "tiff_compression = zstd needs the imagecodecs package (pip install imagecodecs); "
                    "or use tiff_compression = deflate"
                ) from exc


def encode_prediction(pred: PredictionMap, encoding: Encoding, options: EncodeOptions = EncodeOptions()) -> bytes:
    if encoding == "png":
        return codec.encode_map_png(pred, options.png_level)
    if encoding == "color":
        return codec.encode_color_png(pred, options.png_level)
    if encoding == "raw16":
        return np.ascontiguousarray(pred.float_array() if pred.form != "float16" else pred.array, "<f2").tobytes()
    if encoding == "raw32":
        return np.ascontiguousarray(pred.float_array(), "<f4").tobytes()
    if encoding == "exr":
        return codec.encode_exr(pred.array if pred.form == "float16" else pred.float_array())
    if encoding == "tiff":
        return codec.encode_tiff(pred.float_array(), options.tiff_compression)
    return codec.encode_npy(pred.float_array())


def uncertainty_png_max(kind: str, method: str = "seeds") -> float:
    """16-bit PNGs hold [0, 1]: depth spread is already in map units; angular spread in degrees is divided by
    180 (diffusers' normals uncertainty is already an angle / pi)."""
    return 180.0 if kind == "normals" and method != "diffusers" else 1.0


def encode_uncertainty(
    result: UncertaintyResult, encoding: Encoding, options: EncodeOptions = EncodeOptions()
) -> dict[str, bytes]:
    kind = result.prediction.kind
    scale = uncertainty_png_max(kind, result.method)
    outputs = {"prediction": encode_prediction(result.prediction, encoding, options)}
    if encoding == "color":
        outputs["uncertainty"] = codec.encode_spectral_png(1.0 - np.clip(result.uncertainty / scale, 0, 1))
    elif encoding == "png":
        outputs["uncertainty"] = codec.encode_png16(result.uncertainty / scale, options.png_level)
    elif encoding == "exr":
        outputs["uncertainty"] = codec.encode_exr(result.uncertainty)
    elif encoding == "tiff":
        outputs["uncertainty"] = codec.encode_tiff(result.uncertainty, options.tiff_compression)
    else:
        outputs["uncertainty"] = codec.encode_npy(result.uncertainty)
    if result.members is not None:
        outputs["members"] = codec.encode_npy(result.members)
    return outputs


def map_metadata(pred: PredictionMap) -> MapMetadata:
    return MapMetadata.model_validate(pred.metadata())


def uncertainty_metadata(result: UncertaintyResult) -> MapMetadata:
    kind = result.prediction.kind
    unit = "degrees" if kind == "normals" else "map units (aligned members)"
    if result.method == "steps":
        measure = "mean change of the x0 prediction between consecutive steps, over the last steps"
        unit = "degrees" if kind == "normals" else "map units (x0 maps aligned to the last)"
    elif result.method == "diffusers":
        if kind == "normals":
            measure, unit = "mean angle to the mean direction (diffusers)", "fraction of pi"
        else:
            measure = "sample standard deviation" if result.reduction == "mean" else "median absolute deviation"
            measure, unit = f"{measure} (diffusers)", "fraction of the ensembled map's range"
    elif kind == "normals":
        measure = "mean angle to the mean direction" if result.reduction == "mean" else "median angle to the median"
    else:
        measure = "population standard deviation" if result.reduction == "mean" else "median absolute deviation"
    return map_metadata(result.prediction).model_copy(
        update={
            "seeds": result.seeds,
            "reduction": result.reduction,
            "uncertainty_method": result.method,
            "uncertainty_unit": unit,
            "uncertainty_measure": measure,
            "uncertainty_png_max": uncertainty_png_max(kind, result.method),
            "uncertainty_max": float(result.uncertainty.max(initial=0.0)),
        }
    )
