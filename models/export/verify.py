"""Measure an export against the fp32 PyTorch predictor on a fixed input, before anyone serves it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from models.export.manifest import TOLERANCE, ExportDtype, Verification
from models.predictors.base import SingleStepPredictor

if TYPE_CHECKING:  # the runtimes import the export formats, not the reverse
    from models.runtime.base import Runtime

#: The fixed input: a seeded batch of two 64 x 48 images (latent 8 x 6). Small so that even an SD-sized model
#: verifies in seconds on a CPU; the tests check further sizes and batch sizes.
VERIFY_SEED = 1234
VERIFY_BATCH = 2
VERIFY_HW = (48, 64)


def fixed_input(generative: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator("cpu").manual_seed(VERIFY_SEED)
    images = torch.rand((VERIFY_BATCH, 3, *VERIFY_HW), generator=gen) * 2 - 1
    noise = torch.randn((VERIFY_BATCH, 4, VERIFY_HW[0] // 8, VERIFY_HW[1] // 8), generator=gen) if generative else None
    return images, noise


def max_abs_error(reference: SingleStepPredictor, runtime: Runtime) -> float:
    images, noise = fixed_input(reference.generative)
    with torch.inference_mode():
        expected = reference(images.to(reference.device, reference.dtype), noise).float().cpu()
    got = runtime.run(images, noise).float().cpu()
    return float((got - expected).abs().max())


def verify(reference: SingleStepPredictor, runtime: Runtime, dtype: ExportDtype, provider: str) -> Verification:
    error = max_abs_error(reference, runtime)
    tol = TOLERANCE[dtype]
    return Verification(
        runtime=runtime.name,
        provider=provider,
        input=f"seed {VERIFY_SEED}, batch {VERIFY_BATCH}, {VERIFY_HW[1]}x{VERIFY_HW[0]} px, uniform in [-1, 1]",
        max_abs_error=error,
        tolerance=tol,
        passed=error <= tol,
    )
