"""Image decoding with limits, and the map encodings. Shared by the front-ends, the worker and the CLI; no torch.

`decode` reads images (header probe, fast JPEG, EXIF orientation, limits), `png` writes PNG fast, `maps` holds
the answer formats (PNG16, normals PNG, colour, NPY, EXR, TIFF) and the one definition of quantisation.
"""

from models.colormap import spectral
from service.codec.decode import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_FORMATS,
    DecodedImage,
    ImageDecodeError,
    ImageHeader,
    ImageTooLargeError,
    check_raw_rgb,
    decode_image,
    decode_pixels,
    decode_raw_rgb,
    probe_image,
    read_header,
    to_float,
)
from service.codec.maps import (
    TiffCompression,
    colorize,
    decode_normals_png,
    decode_npy,
    decode_png16,
    encode_color_png,
    encode_map_png,
    encode_normals_png,
    encode_npy,
    encode_npy_as,
    encode_png16,
    encode_spectral_png,
    quantize_normals,
    quantize_unit,
)
from service.codec.png import encode_png

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_FORMATS",
    "DecodedImage",
    "ImageDecodeError",
    "ImageHeader",
    "ImageTooLargeError",
    "TiffCompression",
    "check_raw_rgb",
    "colorize",
    "decode_image",
    "decode_normals_png",
    "decode_npy",
    "decode_pixels",
    "decode_png16",
    "decode_raw_rgb",
    "encode_color_png",
    "encode_map_png",
    "encode_normals_png",
    "encode_npy",
    "encode_npy_as",
    "encode_png",
    "encode_png16",
    "encode_spectral_png",
    "probe_image",
    "quantize_normals",
    "quantize_unit",
    "read_header",
    "spectral",
    "to_float",
]
