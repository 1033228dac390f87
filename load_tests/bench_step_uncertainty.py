"""What `uncertainty=steps` costs in a plain answer: the same Marigold job with and without it.

    .venv/bin/python -m load_tests.bench_step_uncertainty [--steps 4 10] [--res 64 256] [--repeats 7] [--model DIR]

Both run through the serving code (`MultiStepPredictor.predict_batch`, one job, its `StepBatch`), interleaved,
medians reported. It counts what each ran: UNet calls (rows) and decoded maps (VAE rows), by wrapping the
model's own `denoise` and `decode`. With the uncertainty the UNet calls must be the same (the x0 predictions
come from the scheduler steps that run anyway) and the decoded maps `k + 1` more (k = min(3, steps - 1)); the
time it adds is those decodes and the step-change arithmetic. Default model: a tiny random-weight Marigold on
one CPU thread (its VAE is as cheap next to its UNet as a real one is not: the ratio is the model's, not a GPU's).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


class Counter:
    """Rows through the model's UNet and VAE decoder, by wrapping the core's own stage methods."""

    def __init__(self, core) -> None:
        self.unet_calls = self.unet_rows = self.decoded = 0
        denoise, decode = core.denoise, core.decode

        def counted_denoise(image_latent, latent, timesteps):
            self.unet_calls += 1
            self.unet_rows += int(latent.shape[0])
            return denoise(image_latent, latent, timesteps)

        def counted_decode(latents):
            self.decoded += int(latents.shape[0])
            return decode(latents)

        core.denoise, core.decode = counted_denoise, counted_decode

    def reset(self) -> None:
        self.unet_calls = self.unet_rows = self.decoded = 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 10])
    parser.add_argument("--res", type=int, nargs="+", default=[64, 256], help="processing resolutions")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--model", type=Path, help="a Marigold checkpoint folder (default: a tiny one, built now)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from models.inference import BatchItem
    from models.loading import load_model
    from models.spec import ModelSpec
    from models.tiny import make_tiny

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = args.model or make_tiny(Path(tmp) / "marigold", "marigold", "depth")
        for res in args.res:
            model = load_model(ModelSpec(id="bench-marigold", source=str(source), device="cpu", processing_res=res))
            counter = Counter(model.core)
            image = np.random.default_rng(0).random((res * 3 // 4, res, 3), dtype=np.float32)
            geometry = model.plan(image)
            for steps in args.steps:
                items = {
                    flag: BatchItem(image, geometry, 0, True, "float32", steps, step_uncertainty=flag)
                    for flag in (False, True)
                }
                model.predict_batch([items[True]])  # warm-up
                times: dict[bool, list[float]] = {False: [], True: []}
                counts: dict[bool, tuple[int, int, int]] = {}
                for _ in range(args.repeats):
                    for flag in (False, True):
                        counter.reset()
                        start = time.perf_counter()
                        (pred,) = model.predict_batch([items[flag]])
                        times[flag].append((time.perf_counter() - start) * 1000.0)
                        counts[flag] = (counter.unet_calls, counter.unet_rows, counter.decoded)
                        assert (pred.uncertainty is not None) == flag
                plain, with_u = statistics.median(times[False]), statistics.median(times[True])
                rows.append((res, steps, plain, with_u, counts[False], counts[True]))
    print(f"one job, tiny Marigold, {args.threads} CPU thread(s), medians of {args.repeats} interleaved runs")
    print()
    print("| processing res | steps | plain ms | with uncertainty=steps ms | ratio | UNet calls | decoded maps |")
    print("|---|---|---|---|---|---|---|")
    for res, steps, plain, with_u, (calls0, _, dec0), (calls1, _, dec1) in rows:
        print(
            f"| {res} | {steps} | {plain:.1f} | {with_u:.1f} | {with_u / plain:.2f}x | {calls0} / {calls1} | "
            f"{dec0} / {dec1} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
