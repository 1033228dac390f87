"""Serving a multi-step family (Marigold): many jobs in flight share each denoising step.

`StepBatch` holds the trajectories of one model and padded shape. Each `step()` is ONE UNet call over every
member of every trajectory in flight, each row at its own timestep (jobs with different step counts mix);
a trajectory that took its last step leaves with its decoded map, and new ones may be admitted before the
next step. A trajectory is what diffusers' Marigold pipeline computes for one image: the image latent
encoded once and repeated per ensemble member, the initial latent drawn from `Generator().manual_seed(seed)`
as diffusers draws it (one `[E, 4, h, w]` draw), and the checkpoint's scheduler stepped with that same
generator (LCM draws from it between steps, DDIM does not).
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers.utils.torch_utils import randn_tensor

from models.inference import BatchItem, DensePredictor, UncertaintyResult, _numpy, _to_tensor
from models.outputs import PredictionMap
from models.predictors.forms import to_form
from models.predictors.marigold import MarigoldCore
from models.predictors.processing import resize_back
from models.runtime.base import Runtime
from models.uncertainty import Reduction, reduce_normals, reduce_scalar, step_change

#: Step-change uncertainty looks at the x0 predictions of the last `STEP_WINDOW + 1` steps (fewer when the
#: trajectory is shorter): `STEP_WINDOW` changes, as many extra VAE decodes (one more when the last x0 is not
#: the final latent itself), no extra UNet call.
STEP_WINDOW = 3
UncertaintyMethod = Literal["seeds", "steps", "diffusers"]


@dataclass
class Trajectory:
    """One job on its way: its members' latents, its own scheduler and generator, how far it got."""

    key: Hashable
    item: BatchItem
    steps: int
    seed: int
    image_latent: torch.Tensor  # [E, 4, h, w]
    latent: torch.Tensor  # [E, 4, h, w]
    scheduler: Any
    generator: torch.Generator
    window: int = 0  # x0 predictions kept for the step-change uncertainty (0: none)
    index: int = 0
    x0s: list[torch.Tensor] = field(default_factory=list)

    @property
    def members(self) -> int:
        return int(self.latent.shape[0])

    @property
    def done(self) -> bool:
        return self.index >= self.steps

    @property
    def timestep(self) -> torch.Tensor:
        return self.scheduler.timesteps[self.index]


@dataclass
class Finished:
    """A trajectory that took its last step: its raw maps at the padded size (and x0 maps when tracked)."""

    trajectory: Trajectory
    maps: torch.Tensor  # [E, C, PH, PW]
    x0_maps: torch.Tensor | None = None  # [window + 1, C, PH, PW]
    x0_decodes: int = 0  # VAE decodes the x0 maps cost (the last is the final map's when they are equal)


class StepBatch:
    """The trajectories in flight on one model and padded shape."""

    def __init__(self, predictor: MultiStepPredictor) -> None:
        self.predictor = predictor
        self.core = predictor.core
        self.active: list[Trajectory] = []
        self.last_step_s = 0.0  # the UNet call (and scheduler steps) of the last step
        self.last_decode_s = 0.0  # the VAE decode of what the last step finished

    @property
    def members(self) -> int:
        return sum(t.members for t in self.active)

    @torch.inference_mode()
    def admit(
        self,
        entries: Sequence[tuple[Hashable, BatchItem]],
        stages: dict[str, float] | None = None,
        window: int = 0,
        member_seeds: Sequence[int] | None = None,
    ) -> None:
        """Encode the new images in one VAE call and start their trajectories (steps and members from each
        item, the default steps where it says none). `member_seeds` (one entry only) gives every member its
        own generator instead: the multi-seed ensemble, one trajectory per seed, keyed `(key, i)`. The x0
        predictions of the last `window` steps are kept (`STEP_WINDOW` for an item that asks for its
        step-change uncertainty), so trajectories with and without it share the batch."""
        if not entries:
            return
        stages = {} if stages is None else stages
        shapes = {it.geometry.padded_hw for _, it in entries} | {t.item.geometry.padded_hw for t in self.active}
        if len(shapes) != 1:
            raise ValueError(f"a step batch must share one processing shape, got {sorted(shapes)}")
        start = time.perf_counter()
        device = self.core.device
        x = torch.stack([_to_tensor(item, device) for _, item in entries])
        latents = self.core.encode(x)
        stages["encode"] = stages.get("encode", 0.0) + time.perf_counter() - start
        for (key, item), latent in zip(entries, latents, strict=True):
            steps = item.steps or self.predictor.default_steps
            seed = self.predictor.default_seed if item.seed is None else item.seed
            shared = member_seeds is None
            for k, s in enumerate([seed] if member_seeds is None else member_seeds):
                generator = torch.Generator("cpu").manual_seed(int(s))
                count = item.ensemble_size if shared else 1
                noise = randn_tensor(
                    (count, *latent.shape), generator=generator, device=latent.device, dtype=latent.dtype
                )
                self.active.append(
                    Trajectory(
                        key=key if shared else (key, k),
                        item=item,
                        steps=steps,
                        seed=int(s),
                        image_latent=latent.unsqueeze(0).repeat_interleave(count, dim=0),
                        latent=noise,
                        scheduler=self.core.new_scheduler(steps),
                        generator=generator,
                        window=min(max(window, STEP_WINDOW if item.step_uncertainty else 0), steps - 1),
                    )
                )

    @torch.inference_mode()
    def step(self, stages: dict[str, float] | None = None) -> list[Finished]:
        """One UNet call over every member in flight, one scheduler step per trajectory; returns (and drops)
        the trajectories that are done, decoded in one VAE call."""
        stages = {} if stages is None else stages
        if not self.active:
            return []
        start = time.perf_counter()
        timesteps = torch.cat([t.timestep.reshape(1).expand(t.members) for t in self.active])
        out = self.core.denoise(
            torch.cat([t.image_latent for t in self.active]), torch.cat([t.latent for t in self.active]), timesteps
        )
        for traj, chunk in zip(self.active, out.split([t.members for t in self.active]), strict=True):
            result = traj.scheduler.step(chunk, traj.timestep, traj.latent, generator=traj.generator)
            traj.latent = result.prev_sample
            if traj.window and traj.index >= traj.steps - 1 - traj.window:
                x0 = getattr(result, "pred_original_sample", None)
                traj.x0s.append(x0 if x0 is not None else result.denoised)
            traj.index += 1
        self.predictor.runtime.synchronize()
        unet_s = time.perf_counter() - start
        self.last_step_s = unet_s
        done = [t for t in self.active if t.done]
        self.active = [t for t in self.active if not t.done]
        start = time.perf_counter()
        finished = self._decode(done)
        self.last_decode_s = time.perf_counter() - start
        stages["unet_decode"] = stages.get("unet_decode", 0.0) + unet_s + time.perf_counter() - start
        return finished

    def _decode(self, done: list[Trajectory]) -> list[Finished]:
        """The final latents and the tracked x0 predictions in one VAE call. A last x0 equal to the final
        latent (DDIM with `set_alpha_to_one`, LCM: the last step returns its x0) is not decoded twice."""
        if not done:
            return []
        x0s = [t.x0s[:-1] if t.x0s and torch.equal(t.x0s[-1], t.latent) else t.x0s for t in done]
        parts = [t.latent for t in done] + [torch.cat(x) for x in x0s if x]
        maps = self.core.decode(torch.cat(parts))
        finals = maps[: sum(t.members for t in done)].split([t.members for t in done])
        tracked = iter(maps[sum(t.members for t in done) :].split([len(x) for x in x0s if x]))
        out = []
        for t, final, own in zip(done, finals, x0s, strict=True):
            if not t.x0s:
                out.append(Finished(t, final))
                continue
            decoded = next(tracked) if own else final[:0]
            x0_maps = decoded if len(own) == len(t.x0s) else torch.cat([decoded, final])
            out.append(Finished(t, final, x0_maps, len(own)))
        return out


class MultiStepRuntime(Runtime):
    """The torch runtime of a multi-step core. `head` runs the default steps from the given initial latent
    (`noise`) with the scheduler's own randomness; serving goes through `StepBatch`, which also batches
    across jobs and steps."""

    name = "torch"

    def __init__(self, core: MarigoldCore, default_steps: int) -> None:
        self.core = core.eval()
        self.device = core.device
        self.dtype = core.dtype
        self.output_kind = core.output_kind
        self.generative = True
        self.default_steps = default_steps

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.core.encode(images)

    @torch.inference_mode()
    def head(self, latents: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None or noise.shape != latents.shape:
            raise ValueError("a multi-step model needs an initial latent (noise) shaped like the image latent")
        scheduler = self.core.new_scheduler(self.default_steps)
        latent = noise.to(self.device, self.dtype)
        for t in scheduler.timesteps:
            out = self.core.denoise(latents, latent, t.reshape(1).expand(latents.shape[0]))
            latent = scheduler.step(out, t, latent).prev_sample
        return self.core.decode(latent)


class MultiStepPredictor(DensePredictor):
    """A Marigold model: `steps` and `ensemble_size` per item, diffusers' numbers for E = 1."""

    def __init__(
        self,
        core: MarigoldCore,
        model_id: str,
        processing_res: int,
        default_steps: int,
        default_seed: int = 0,
        auto_max_steps: int | None = None,
        scale_invariant: bool = True,
        shift_invariant: bool = True,
    ) -> None:
        super().__init__(MultiStepRuntime(core, default_steps), model_id, "marigold", processing_res, default_seed)
        self.core = core
        self._default_steps = default_steps
        self.auto_max_steps = auto_max_steps or default_steps
        self.scale_invariant = scale_invariant
        self.shift_invariant = shift_invariant

    @property
    def multi_step(self) -> bool:
        return True

    @property
    def default_steps(self) -> int:
        return self._default_steps

    def stepper(self) -> StepBatch:
        return StepBatch(self)

    @torch.inference_mode()
    def predict_batch(self, items: Sequence[BatchItem], stages: dict[str, float] | None = None) -> list[PredictionMap]:
        """Every item to its own step count, sharing each step's UNet call while they last."""
        stages = {} if stages is None else stages
        batch = self.stepper()
        batch.admit(list(enumerate(items)), stages)
        results: dict[Hashable, PredictionMap] = {}
        while batch.active:
            for done in batch.step(stages):
                start = time.perf_counter()
                results[done.trajectory.key] = self.finish_trajectory(done)
                stages["postprocess"] = stages.get("postprocess", 0.0) + time.perf_counter() - start
        return [results[i] for i in range(len(items))]

    @torch.inference_mode()
    def finish_trajectory(self, done: Finished) -> PredictionMap:
        """The answer of one finished trajectory: its map, or diffusers' ensemble of its members."""
        traj = done.trajectory
        item = traj.item
        spread: torch.Tensor | None = None
        if traj.members == 1:
            pred = self._finish_tensor(item, done.maps[0])
            extra: dict[str, object] = {}
            if item.step_uncertainty and done.x0_maps is not None:
                spread, _ = self.step_spread(item, done.x0_maps)
                extra = step_extra(len(done.x0_maps), done.x0_decodes)
        else:
            pred, _ = self.ensemble(item, done.maps, "median" if self.output_kind != "normals" else "closest")
            extra = {"ensemble_size": traj.members}
        final = to_form(pred, self.output_kind, item.form).cpu()
        return PredictionMap(
            array=final.numpy(),
            kind=self.output_kind,
            model_id=self.model_id,
            processing_size=item.geometry.processing_hw,
            seed=traj.seed,
            extra=extra,
            form=item.form,
            steps=traj.steps,
            uncertainty=None if spread is None else _numpy(spread.cpu()),
            normals_axes=self.normals_axes,
        )

    def step_spread(self, item: BatchItem, x0_maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step-change uncertainty `[H, W]` of one trajectory from its decoded x0 maps `[k + 1, C, PH, PW]`
        (oldest first), each finished like the map; also the finished maps `[k + 1, C, H, W]`. One definition
        for `/v1/uncertainty?method=steps` and for `uncertainty=steps` in a plain answer: the same numbers."""
        track = torch.stack([self._finish_tensor(item, m) for m in x0_maps])
        return step_change(track if self.output_kind == "normals" else track[:, 0]), track

    def ensemble(self, item: BatchItem, maps: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' Marigold ensembling of `[E, C, PH, PW]` members at the processing size (depth: joint
        scale/shift alignment by BFGS, then median (MAD) or mean (sample std), min-max to [0, 1]; normals: the
        member closest to the mean direction, or the mean; uncertainty = mean angle to the mean / pi), then
        resized like a single map. Returns the map `[C, H, W]` and the uncertainty `[H, W]`."""
        from diffusers import MarigoldDepthPipeline, MarigoldNormalsPipeline

        ph, pw = item.geometry.processing_hw
        members = maps[:, :, :ph, :pw].float()
        if self.output_kind == "normals":
            pred, spread = MarigoldNormalsPipeline.ensemble_normals(members, True, reduction=reduction)
        else:
            pred, spread = MarigoldDepthPipeline.ensemble_depth(
                members, self.scale_invariant, self.shift_invariant, True, reduction=reduction
            )
        pred, spread = pred[0], spread[0]
        if item.match_input_resolution:
            pred, spread = resize_back(pred, item.geometry), resize_back(spread, item.geometry)
        if self.output_kind == "normals":
            pred = pred / torch.linalg.vector_norm(pred, dim=0, keepdim=True).clamp(min=1e-6)
        return pred, spread[0]

    @torch.inference_mode()
    def predict_uncertainty(
        self,
        item: BatchItem,
        seeds: Sequence[int],
        reduction: Reduction = "mean",
        return_members: bool = False,
        method: UncertaintyMethod = "seeds",
    ) -> UncertaintyResult:
        """`seeds`: ours, as for Lotus-G (members seeded seed, seed + 1, ..., aligned to member 0 by least
        squares, population std / mean angle in degrees); `diffusers`: diffusers' ensemble of len(seeds)
        members from one generator; `steps`: how much the x0 prediction still changes over the last steps of
        one trajectory. All run as one batch."""
        batch = self.stepper()
        seed = seeds[0] if seeds else (self.default_seed if item.seed is None else item.seed)
        if method == "steps":
            item = _with(item, seed=seed, ensemble_size=1)
            steps = item.steps or self.default_steps
            if steps < 2:
                raise ValueError("step-change uncertainty needs at least 2 steps")
            batch.admit([(0, item)], window=STEP_WINDOW)
        elif method == "diffusers":
            item = _with(item, seed=seed, ensemble_size=len(seeds))
            batch.admit([(0, item)])
        else:
            if len(seeds) < 2:
                raise ValueError("uncertainty needs at least two seeds")
            item = _with(item, seed=seed, ensemble_size=1)
            batch.admit([(0, item)], member_seeds=seeds)
        finished: list[Finished] = []
        while batch.active:
            finished.extend(batch.step())
        finished.sort(key=lambda f: f.trajectory.key[1] if isinstance(f.trajectory.key, tuple) else 0)
        steps_run = finished[0].trajectory.steps
        members_maps = torch.cat([f.maps for f in finished])
        extra: dict[str, object] = {"uncertainty_method": method}
        if method == "diffusers":
            red = ("closest" if reduction == "median" else "mean") if self.output_kind == "normals" else reduction
            pred, spread = self.ensemble(item, members_maps, red)
            members = torch.stack([self._finish_tensor(item, m) for m in members_maps]).cpu()
            extra["reduction"] = red
        elif method == "steps":
            assert finished[0].x0_maps is not None
            spread, track = self.step_spread(item, finished[0].x0_maps)
            pred = self._finish_tensor(item, members_maps[0])
            members = track.cpu()
            extra.update(step_extra(len(track), finished[0].x0_decodes))
        else:
            members = torch.stack([self._finish_tensor(item, m) for m in members_maps]).cpu()
            if self.output_kind == "normals":
                pred, spread = reduce_normals(members, reduction)
            else:
                pred, spread = reduce_scalar(members[:, 0], reduction)
                pred = pred[None]
        pred = pred.cpu()
        pred_array = pred.permute(1, 2, 0) if self.output_kind == "normals" else pred[0]
        member_array = members.permute(0, 2, 3, 1) if self.output_kind == "normals" else members[:, 0]
        used = [f.trajectory.seed for f in finished]
        prediction = PredictionMap(
            array=_numpy(pred_array),
            kind=self.output_kind,
            model_id=self.model_id,
            processing_size=item.geometry.processing_hw,
            seed=seed,
            extra={"seeds": used, "reduction": reduction, **extra},
            steps=steps_run,
            normals_axes=self.normals_axes,
        )
        return UncertaintyResult(
            prediction=prediction,
            uncertainty=_numpy(spread.cpu()),
            members=_numpy(member_array) if return_members else None,
            seeds=used,
            reduction=reduction,
            method=method,
        )


def step_extra(tracked: int, decodes: int) -> dict[str, object]:
    """What the step-change uncertainty over `tracked` x0 maps says about itself: its method, its window (the
    changes averaged) and its cost (`decodes` extra VAE decodes; no UNet call)."""
    return {"uncertainty_method": "steps", "step_window": tracked - 1, "uncertainty_decodes": decodes}


def _with(item: BatchItem, **changes: Any) -> BatchItem:
    from dataclasses import replace

    return replace(item, **changes)
