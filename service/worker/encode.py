"""Turn finished maps into reply bytes in the job's encoding (runs in the I/O thread pool, on every core:
the PNG, EXR and TIFF encoders release the GIL)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.inference import UncertaintyResult
from models.outputs import MapForm, PredictionMap
from models.probes.segmenter import Segmentation
from service import codec
from service.jobs import Encoding, MapMetadata
from service.worker.float_maps import encode_exr, encode_tiff

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
        return encode_exr(pred.array if pred.form == "float16" else pred.float_array())
    if encoding == "tiff":
        return encode_tiff(pred.float_array(), options.tiff_compression)
    return codec.encode_npy(pred.float_array())


def uncertainty_png_max(kind: str, method: str = "seeds") -> float:
    """16-bit PNGs hold [0, 1]: depth spread is already in map units; angular spread in degrees is divided by
    180 (diffusers' normals uncertainty is already an angle / pi)."""
    return 180.0 if kind == "normals" and method != "diffusers" else 1.0


def encode_uncertainty_map(
    values: np.ndarray, kind: str, method: str, encoding: Encoding, options: EncodeOptions = EncodeOptions()
) -> bytes:
    """An `[H, W]` uncertainty map in the job's encoding (16-bit PNG and colour scaled by
    `uncertainty_png_max`; raw16 / raw32: gRPC's bare little-endian floats)."""
    scale = uncertainty_png_max(kind, method)
    if encoding == "color":
        return codec.encode_spectral_png(1.0 - np.clip(values / scale, 0, 1))
    if encoding == "png":
        return codec.encode_png16(values / scale, options.png_level)
    if encoding == "exr":
        return encode_exr(values)
    if encoding == "tiff":
        return encode_tiff(values, options.tiff_compression)
    if encoding == "raw16":
        return np.ascontiguousarray(values, "<f2").tobytes()
    if encoding == "raw32":
        return np.ascontiguousarray(values, "<f4").tobytes()
    return codec.encode_npy(values)


def encode_uncertainty(
    result: UncertaintyResult, encoding: Encoding, options: EncodeOptions = EncodeOptions()
) -> dict[str, bytes]:
    kind = result.prediction.kind
    outputs = {
        "prediction": encode_prediction(result.prediction, encoding, options),
        "uncertainty": encode_uncertainty_map(result.uncertainty, kind, result.method, encoding, options),
    }
    if result.members is not None:
        outputs["members"] = codec.encode_npy(result.members)
    return outputs


def encode_prediction_outputs(
    pred: PredictionMap, encoding: Encoding, options: EncodeOptions = EncodeOptions()
) -> dict[str, bytes]:
    """A plain answer's outputs: `prediction`, and `uncertainty` when the run computed one (uncertainty=steps)."""
    outputs = {"prediction": encode_prediction(pred, encoding, options)}
    if pred.uncertainty is not None:
        outputs["uncertainty"] = encode_uncertainty_map(pred.uncertainty, pred.kind, "steps", encoding, options)
    return outputs


def map_metadata(pred: PredictionMap) -> MapMetadata:
    return MapMetadata.model_validate(pred.metadata())


def prediction_metadata(pred: PredictionMap) -> MapMetadata:
    """A plain answer's metadata; with its step-change uncertainty, that map's method, window, cost, unit and
    measure (as `/v1/uncertainty?method=steps` states them)."""
    meta = map_metadata(pred)
    if pred.uncertainty is None:
        return meta
    unit, measure = _uncertainty_words(pred.kind, "steps", "mean")
    return meta.model_copy(
        update={
            "uncertainty_unit": unit,
            "uncertainty_measure": measure,
            "uncertainty_png_max": uncertainty_png_max(pred.kind, "steps"),
            "uncertainty_max": float(pred.uncertainty.max(initial=0.0)),
        }
    )


def _uncertainty_words(kind: str, method: str, reduction: str) -> tuple[str, str]:
    """(unit, measure) of an uncertainty map."""
    unit = "degrees" if kind == "normals" else "map units (aligned members)"
    if method == "steps":
        measure = "mean change of the x0 prediction between consecutive steps, over the last steps"
        unit = "degrees" if kind == "normals" else "map units (x0 maps aligned to the last)"
    elif method == "diffusers":
        if kind == "normals":
            measure, unit = "mean angle to the mean direction (diffusers)", "fraction of pi"
        else:
            measure = "sample standard deviation" if reduction == "mean" else "median absolute deviation"
            measure, unit = f"{measure} (diffusers)", "fraction of the ensembled map's range"
    elif kind == "normals":
        measure = "mean angle to the mean direction" if reduction == "mean" else "median angle to the median"
    else:
        measure = "population standard deviation" if reduction == "mean" else "median absolute deviation"
    return unit, measure


def uncertainty_metadata(result: UncertaintyResult) -> MapMetadata:
    kind = result.prediction.kind
    unit, measure = _uncertainty_words(kind, result.method, result.reduction)
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


def class_palette(n: int) -> np.ndarray:
    """`[n, 3]` uint8 colours, well apart for small n: hues around the wheel at two lightness levels."""
    import colorsys

    hues = [(i * 0.618033988749895) % 1.0 for i in range(n)]
    rgb = [colorsys.hls_to_rgb(h, 0.5 if i % 2 == 0 else 0.35, 0.85) for i, h in enumerate(hues)]
    return np.clip(np.rint(np.array(rgb) * 255.0), 0, 255).astype(np.uint8).reshape(n, 3)


def overlay(labels: np.ndarray, image: np.ndarray, classes: int, alpha: float = 0.5) -> np.ndarray:
    """The class colours blended over the input image (resized to the map's size when it differs)."""
    colours = class_palette(classes)[labels].astype(np.float32)
    pixels = image if image.dtype == np.uint8 else np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    if pixels.shape[:2] != labels.shape:
        from PIL import Image

        pixels = np.asarray(Image.fromarray(pixels).resize(labels.shape[::-1], Image.Resampling.BILINEAR))
    blended = alpha * colours + (1.0 - alpha) * pixels.astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def encode_segmentation(
    seg: Segmentation, encoding: Encoding, image: np.ndarray, options: EncodeOptions = EncodeOptions()
) -> bytes:
    """8-bit index PNG (`png`), uint8 NPY (`npy`), or the colour overlay on the input image (`color`)."""
    if encoding == "png":
        return codec.encode_png(seg.labels, options.png_level)
    if encoding == "npy":
        return codec.encode_npy_as(seg.labels)
    if encoding == "color":
        return codec.encode_png(overlay(seg.labels, image, len(seg.classes)), options.png_level)
    raise ValueError(f"a class map is not answered as {encoding}")


def segmentation_metadata(seg: Segmentation, depth: PredictionMap | None = None) -> MapMetadata:
    h, w = seg.labels.shape
    return MapMetadata(
        kind="segmentation",
        shape=[h, w],
        height=h,
        width=w,
        affine_invariant=False,
        range=[0.0, float(len(seg.classes) - 1)],
        model=seg.model_id,
        processing_size=list(seg.processing_size),
        classes=seg.classes,
        class_pixels=seg.pixel_counts(),
        depth_kind=depth.kind if depth is not None else None,
        seed=depth.seed if depth is not None else None,
    )
