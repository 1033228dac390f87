"""Shape profiles: which batch sizes and padded image sizes an engine is built for, one per resolution bucket.

Profiles nest (each covers every size up to its bucket) because TensorRT ranges are per dimension and cannot
express "long edge between two buckets" for both orientations; the smallest covering profile is picked, whose
kernels were tuned for that bucket's optimal shape.
"""

from __future__ import annotations

from collections.abc import Sequence

from models.export.manifest import Profile


def bucket_profiles(resolutions: Sequence[int], max_batch: int) -> list[Profile]:
    profiles = []
    for res in sorted(set(resolutions)):
        if res % 8 or res < 16:
            raise ValueError(f"resolution buckets must be multiples of 8 and at least 16, got {res}")
        profiles.append(
            Profile(
                min_batch=1,
                opt_batch=max_batch,
                max_batch=max_batch,
                min_hw=(8, 8),
                opt_hw=(res * 3 // 4 // 8 * 8, res),
                max_hw=(res, res),
            )
        )
    return profiles


def pick_profile(profiles: Sequence[Profile], batch: int, hw: tuple[int, int]) -> int:
    for index, p in enumerate(profiles):
        if p.min_batch <= batch <= p.max_batch and all(
            lo <= v <= hi for v, lo, hi in zip(hw, p.min_hw, p.max_hw, strict=True)
        ):
            return index
    built = ", ".join(f"batch {p.min_batch}-{p.max_batch} up to {p.max_hw[1]}x{p.max_hw[0]}" for p in profiles)
    raise ValueError(f"no engine profile covers batch {batch} at {hw[1]}x{hw[0]} px (built for: {built})")


def graph_shapes(graph: str, profile: Profile, channels: int = 3) -> dict[str, tuple[tuple[int, ...], ...]]:
    """min/opt/max input shapes of one graph under a profile (the head sees latents, 1/8 of the pixels)."""

    def shape(batch: int, hw: tuple[int, int]) -> tuple[int, ...]:
        if graph == "encoder":
            return (batch, channels, *hw)
        return (batch, 4, hw[0] // 8, hw[1] // 8)

    return {
        "min": shape(profile.min_batch, profile.min_hw),
        "opt": shape(profile.opt_batch, profile.opt_hw),
        "max": shape(profile.max_batch, profile.max_hw),
    }
