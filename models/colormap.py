"""The Spectral colour preview, as a function and as a lookup table over 16-bit map values.

Numpy only: the runtime's device applies the table with torch, the CPU path with numpy, and both give the
same bytes because both index the same table with the same quantised values.
"""

from __future__ import annotations

from functools import cache

import numpy as np

# ColorBrewer "Spectral" (11 classes), the control points of matplotlib's Spectral colormap.
SPECTRAL = np.array(
    [
        [0.619608, 0.003922, 0.258824],
        [0.835294, 0.243137, 0.309804],
        [0.956863, 0.427451, 0.262745],
        [0.992157, 0.682353, 0.380392],
        [0.996078, 0.878431, 0.545098],
        [1.000000, 1.000000, 0.749020],
        [0.901961, 0.960784, 0.596078],
        [0.670588, 0.866667, 0.643137],
        [0.400000, 0.760784, 0.647059],
        [0.196078, 0.533333, 0.741176],
        [0.368627, 0.309804, 0.635294],
    ],
    dtype=np.float64,
)
LEVELS = 65536


def spectral(values: np.ndarray) -> np.ndarray:
    """Map [0, 1] to 8-bit RGB along Spectral (0 = dark red, 1 = violet); NaN counts as 0."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(SPECTRAL) - 1)
    lo = np.floor(v).astype(np.int64).clip(0, len(SPECTRAL) - 2)
    t = (v - lo)[..., None]
    rgb = SPECTRAL[lo] * (1.0 - t) + SPECTRAL[lo + 1] * t
    return np.round(rgb * 255.0).astype(np.uint8)


@cache
def spectral_lut() -> np.ndarray:
    """`[65536, 3]` uint8: the colour of each 16-bit value `q` (that is, of `q / 65535`). Read-only."""
    lut = spectral(np.arange(LEVELS, dtype=np.float64) / (LEVELS - 1))
    lut.flags.writeable = False
    return lut
