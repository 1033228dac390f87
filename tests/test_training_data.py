"""Fine-tune data and metrics: synthetic geometry, dataset readers, augmentation, mixing, metrics and losses."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from models.training import folder_format, losses, metrics, synthetic
from models.training.datasets import (
    Augmentation,
    FolderDataset,
    HypersimDataset,
    MixedDataset,
    VirtualKitti2Dataset,
    hypersim_focal,
)
from models.training.synthetic import Box, Camera, Light, Plane, Rendering, Scene, Sphere, Texture

H, W = 32, 48
MIRROR = np.diag([-1.0, 1.0, 1.0])


def _texture() -> Texture:
    return Texture("checker", np.array([0.8, 0.2, 0.2]), np.array([0.2, 0.2, 0.8]), period=0.5)


def _light() -> Light:
    return Light(direction=np.array([0.0, 1.0, 0.0]), color=np.ones(3), ambient=0.3)


def _camera(
    rotation: np.ndarray | None = None, position: tuple[float, ...] = (0.0, 0.0, 0.0), f: float = 40.0
) -> Camera:
    return Camera(
        height=H,
        width=W,
        fx=f,
        fy=f,
        cx=(W - 1) / 2,
        cy=(H - 1) / 2,
        rotation=np.eye(3) if rotation is None else rotation,
        position=np.asarray(position, dtype=np.float64),
    )


def _rot_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _unit(v: tuple[float, float, float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


# --- synthetic scenes -----------------------------------------------------------------------------


def test_fronto_parallel_wall_has_constant_planar_depth() -> None:
    wall = Plane(np.array([0.0, 0.0, -3.0]), np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0]), _texture())
    r = synthetic.render(Scene([wall], _light()), _camera())
    assert r.valid.all()
    np.testing.assert_allclose(r.depth, 3.0, atol=1e-6)  # planar: the same at the corners as at the centre
    euclidean = np.linalg.norm(r.camera.backproject(r.depth.astype(np.float64)), axis=-1)
    assert euclidean[0, 0] > 3.0 * 1.2  # a Euclidean map would grow towards the corners
    np.testing.assert_allclose(r.normals, np.broadcast_to([0.0, 0.0, 1.0], r.normals.shape), atol=1e-6)


def test_floor_depth_matches_the_closed_form_of_a_pitched_camera() -> None:
    height, pitch = 1.5, math.radians(15.0)
    floor = Plane(np.zeros(3), np.array([0.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0]), _texture())
    rotation = synthetic.look_at(np.array([0.0, height, 0.0]), np.array([0.0, height - math.tan(pitch), -1.0]))
    cam = _camera(rotation, (0.0, height, 0.0))
    r = synthetic.render(Scene([floor], _light()), cam)
    # Camera-frame ray (x, y, -1) has world height change y cos(pitch) - sin(pitch); it meets the floor at
    # planar depth h / (sin(pitch) - y cos(pitch)), whatever its x.
    y = -(np.arange(H) - cam.cy) / cam.fy
    denom = math.sin(pitch) - y * math.cos(pitch)
    expected = np.where(denom > 0, height / np.where(denom > 0, denom, 1.0), np.inf)
    expected_valid = expected <= synthetic.MAX_DEPTH
    assert expected_valid.any() and not expected_valid.all()  # the horizon is in view: sky above it
    np.testing.assert_array_equal(r.valid, np.broadcast_to(expected_valid[:, None], (H, W)))
    rows = expected[expected_valid][:, None]
    np.testing.assert_allclose(r.depth[expected_valid], np.broadcast_to(rows, (len(rows), W)), rtol=1e-6)
    assert (r.depth[~r.valid] == 0).all() and (r.normals[~r.valid] == 0).all()
    up_in_camera = rotation.T @ np.array([0.0, 1.0, 0.0])
    np.testing.assert_allclose(r.normals[r.valid], np.broadcast_to(up_in_camera, (r.valid.sum(), 3)), atol=1e-6)


def _world_points(r: Rendering) -> np.ndarray:
    cam = r.camera
    return cam.backproject(r.depth.astype(np.float64)) @ cam.rotation.T + cam.position


@pytest.mark.parametrize("variety", synthetic.VARIETIES)
@pytest.mark.parametrize("seed", range(6))
def test_random_scene_geometry_is_exact(seed: int, variety: synthetic.Variety) -> None:
    r = synthetic.generate(seed, 40, 56, variety)
    points = _world_points(r)
    rays = r.camera.rays()
    normals = r.normals.astype(np.float64)
    assert r.depth.dtype == np.float32 and r.normals.dtype == np.float32 and r.valid.dtype == bool
    np.testing.assert_array_equal(r.valid, r.primitive >= 0)
    assert (r.depth[r.valid] > 0).all() and (r.depth[~r.valid] == 0).all()
    np.testing.assert_allclose(np.linalg.norm(normals[r.valid], axis=-1), 1.0, atol=1e-6)
    assert (np.einsum("hwc,hwc->hw", normals, rays)[r.valid] < 0).all()  # every normal faces the camera
    seen = set()
    for k, prim in enumerate(r.scene.primitives):
        sel = r.primitive == k
        if not sel.any():
            continue
        p, n_cam = points[sel], normals[sel]
        n_world = n_cam @ r.camera.rotation.T
        tol = 1e-5 * max(1.0, float(r.depth[sel].max()))  # float32 depth storage
        if isinstance(prim, Plane):
            np.testing.assert_allclose((p - prim.point) @ prim.normal, 0.0, atol=tol)
            np.testing.assert_allclose(np.abs(n_world @ prim.normal), 1.0, atol=1e-6)
        elif isinstance(prim, Sphere):
            np.testing.assert_allclose(np.linalg.norm(p - prim.center, axis=1), prim.radius, atol=tol)
            np.testing.assert_allclose(n_world, (p - prim.center) / prim.radius, atol=1e-4)  # radial, outwards
        else:
            local = (p - prim.center) @ prim.rotation
            np.testing.assert_allclose(np.max(np.abs(local) / prim.half_extents, axis=1), 1.0, atol=tol * 10)
            n_local = n_world @ prim.rotation  # a face normal: one local axis, pointing out of that face
            np.testing.assert_allclose(np.max(np.abs(n_local), axis=1), 1.0, atol=1e-6)
            axis = np.abs(n_local).argmax(axis=1)
            rows = np.arange(len(p))
            assert (np.sign(n_local[rows, axis]) == np.sign(local[rows, axis])).all()
        seen.add(type(prim).__name__)
    assert "Plane" in seen


def _corner_room() -> tuple[Scene, Camera]:
    """A camera at the origin looking down -z at a back wall (z = -6), a wall on its left (x = -2) and a floor
    (y = -1): every pixel's normal is known in words (faces the camera / faces right / faces up)."""
    scene = Scene(
        [
            Plane(np.array([0.0, 0.0, -6.0]), np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0]), _texture()),
            Plane(np.array([-2.0, 0.0, 0.0]), np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0]), _texture()),
            Plane(np.array([0.0, -1.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0]), _texture()),
        ],
        _light(),
    )
    return scene, _camera()


def test_normals_ground_truth_uses_the_served_convention(tmp_path: Path) -> None:
    """+x image LEFT, +y up, +z towards the camera (the released checkpoints' axes) in every training source:
    synthetic renderings, the folder format, the in-memory synthetic source and the Hypersim reader."""
    from models.outputs import NORMALS_CONVENTION
    from models.training.datasets import SyntheticDataset

    assert NORMALS_CONVENTION.startswith("+x image left")
    scene, cam = _corner_room()
    r = synthetic.render(scene, cam)
    faces_right, faces_up, faces_camera = (r.primitive == k for k in (1, 2, 0))
    assert faces_right[:, : W // 4].mean() > 0.5 and faces_up[-3:].mean() > 0.5 and faces_camera.any()
    expected = {(-1.0, 0.0, 0.0): faces_right, (0.0, 1.0, 0.0): faces_up, (0.0, 0.0, 1.0): faces_camera}
    for vector, where in expected.items():
        np.testing.assert_allclose(r.served_normals[where], np.broadcast_to(vector, (int(where.sum()), 3)), atol=1e-6)
    # The geometry itself stays in the OpenGL frame: the left wall's normal points to +x there.
    np.testing.assert_allclose(r.normals[faces_right][:, 0], 1.0, atol=1e-6)

    synthetic.write_rendering(tmp_path / "folder", "room", r)
    folder_format.write_info(tmp_path / "folder", folder_format.DatasetInfo("room", (0.01, 50.0)))
    for png in (False, True):
        if png:
            synthetic.write_rendering(tmp_path / "folder", "room", r, normals_format="png")
            (tmp_path / "folder" / "normals" / "room.npy").unlink()
        loaded = FolderDataset(tmp_path / "folder")[0]["normals"].permute(1, 2, 0).numpy()
        for vector, where in expected.items():
            np.testing.assert_allclose(loaded[where], np.broadcast_to(vector, (int(where.sum()), 3)), atol=0.02)

    # The in-memory synthetic training source and the folder format agree on random scenes too.
    source = SyntheticDataset(2, 24, 32, scene_seed=3)
    rendered = synthetic.generate((3, 1), 24, 32)
    np.testing.assert_array_equal(source[1]["normals"].permute(1, 2, 0).numpy(), rendered.served_normals)
    assert np.abs(rendered.normals[..., 0]).max() > 0.3  # x components exist, so the flip is visible

    # Hypersim stores OpenGL-frame normals (some back-facing); the reader turns them into the served ones.
    h, w = 36, 48
    f = hypersim_focal(w)
    cam = dataclasses.replace(cam, height=h, width=w, fx=f, fy=f, cx=(w - 1) / 2, cy=(h - 1) / 2)
    r = synthetic.render(scene, cam)
    images = tmp_path / "hypersim" / "ai_001_001" / "images"
    distance = np.linalg.norm(cam.backproject(r.depth.astype(np.float64)), axis=-1)
    _write_jpg(images / "scene_cam_00_final_preview" / "frame.0000.tonemap.jpg", r.rgb)
    _write_hdf5(images / "scene_cam_00_geometry_hdf5" / "frame.0000.depth_meters.hdf5", distance)
    _write_hdf5(images / "scene_cam_00_geometry_hdf5" / "frame.0000.normal_cam.hdf5", -r.normals)  # back faces
    got = HypersimDataset(tmp_path / "hypersim")[0]["normals"].permute(1, 2, 0).numpy()
    left = r.primitive == 1
    assert left.any()
    np.testing.assert_allclose(got[left], np.broadcast_to((-1.0, 0.0, 0.0), (int(left.sum()), 3)), atol=1e-6)
    np.testing.assert_allclose(got[r.valid], r.served_normals[r.valid], atol=1e-6)


def test_marigold_axes_on_a_scene_with_known_normals(tmp_path: Path) -> None:
    """Marigold was trained on Hypersim's camera-frame normals as they are (OpenGL: +x right), Lotus and E2E-FT
    on their x negated. On a scene whose normals are known, a perfect Marigold answer (the OpenGL normals) and a
    perfect Lotus answer (the served ground truth) are the same vectors once each is read in its family's axes,
    and the evaluation, which converts a model's answer to the ground truth's axes, scores both 0 degrees."""
    from models.outputs import FAMILY_NORMALS_AXES, OPENGL_AXES

    scene, cam = _corner_room()
    r = synthetic.render(scene, cam)
    faces_right = r.primitive == 1  # the wall on the camera's left faces the image's right
    marigold, lotus = FAMILY_NORMALS_AXES["marigold"], FAMILY_NORMALS_AXES["lotus-d"]
    assert marigold == OPENGL_AXES and FAMILY_NORMALS_AXES["e2e-ft"] == lotus
    assert marigold.words.startswith("+x image right") and lotus.words.startswith("+x image left")
    perfect_marigold, perfect_lotus = r.normals, r.served_normals
    np.testing.assert_allclose(
        perfect_marigold[faces_right], np.broadcast_to((1.0, 0.0, 0.0), (int(faces_right.sum()), 3)), atol=1e-6
    )
    np.testing.assert_allclose(perfect_lotus[faces_right][:, 0], -1.0, atol=1e-6)

    synthetic.write_rendering(tmp_path / "folder", "room", r)
    folder_format.write_info(tmp_path / "folder", folder_format.DatasetInfo("room", (0.01, 50.0)))
    gt = folder_format.read_sample(tmp_path / "folder", "room")
    assert gt.normals is not None and gt.normals_valid is not None
    for axes, answer in ((marigold, perfect_marigold), (lotus, perfect_lotus)):
        scored = metrics.NormalsEvaluator()
        scored.add(axes.convert(answer, folder_format.NORMALS_AXES), gt.normals, gt.normals_valid)
        assert scored.result().mean < 0.5, axes  # the GT is quantised nowhere here: NPY
    unconverted = metrics.NormalsEvaluator()
    unconverted.add(perfect_marigold, gt.normals, gt.normals_valid)
    assert unconverted.result().mean > 5.0  # scoring Marigold's raw x against Lotus axes would be wrong


def test_scenes_cover_all_primitive_kinds_and_some_sky() -> None:
    kinds, sky = set(), False
    for seed in range(12):
        r = synthetic.generate(seed, 24, 32)
        kinds |= {type(r.scene.primitives[k]).__name__ for k in np.unique(r.primitive) if k >= 0}
        sky |= bool((~r.valid).any())
        assert r.rgb.min() >= 0.0 and r.rgb.max() <= 1.0
    assert kinds == {"Plane", "Box", "Sphere"} and sky


def test_varied_scenes_widen_the_distribution_and_keep_base_scenes() -> None:
    """The "varied" scenes (the 128 px demos' data) use every texture kind, fog, fill lights, stacked objects and
    a wider camera; the default stays the "base" distribution the 64 px demo was trained on."""
    from models.training.synthetic import Box, Sphere

    kinds, fog, fill, stacked, fovs, heights = set(), 0, 0, 0, [], []
    for seed in range(24):
        r = synthetic.generate((5, seed), 24, 32, "varied")
        np.testing.assert_array_equal(r.rgb, synthetic.generate((5, seed), 24, 32, "varied").rgb)
        assert r.rgb.min() >= 0.0 and r.rgb.max() <= 1.0 and r.valid.any()
        kinds |= {p.texture.kind for p in r.scene.primitives}
        fog += r.scene.fog_density > 0
        fill += r.scene.fill is not None
        objects = [p for p in r.scene.primitives if isinstance(p, Box | Sphere)]
        tops = [p.center[1] + p.half_extents[1] for p in objects if isinstance(p, Box)]
        bottoms = [p.center[1] - (p.radius if isinstance(p, Sphere) else p.half_extents[1]) for p in objects]
        stacked += any(abs(b - t) < 1e-9 for b in bottoms for t in tops)  # resting on a box's top face
        fovs.append(2 * np.degrees(np.arctan(16 / r.camera.fx)))
        heights.append(r.camera.position[1])
    assert kinds == {"checker", "stripes", "noise", "solid", "waves"}
    assert 3 <= fog <= 18 and 5 <= fill <= 20 and stacked >= 1
    assert max(fovs) - min(fovs) > 30 and min(heights) < 0.8
    base = synthetic.generate((5, 0), 24, 32)
    np.testing.assert_array_equal(base.rgb, synthetic.generate((5, 0), 24, 32, "base").rgb)
    assert {p.texture.kind for p in base.scene.primitives} <= {"checker", "stripes", "noise"}
    assert base.scene.fog_density == 0 and base.scene.fill is None
    with pytest.raises(ValueError, match="variety"):
        synthetic.generate(0, 24, 32, "cartoon")  # type: ignore[arg-type]


def test_write_scenes_is_deterministic(tmp_path: Path) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    names = synthetic.write_scenes(tmp_path / "a", n=3, height=H, width=W, seed=7)
    synthetic.write_scenes(tmp_path / "b", n=3, height=H, width=W, seed=7)
    synthetic.write_scenes(tmp_path / "c", n=3, height=H, width=W, seed=8)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert names == ["000000", "000001", "000002"]
    assert {"rgb/000000.png", "depth/000000.npy", "mask/000000.png", "normals/000000.npy", "dataset.json"} <= set(a)
    assert a == b
    assert a["depth/000000.npy"] != c["depth/000000.npy"]


# --- generic folder format ------------------------------------------------------------------------


def test_folder_dataset_reads_png16_depth_and_png_normals(tmp_path: Path) -> None:
    synthetic.write_scenes(tmp_path, n=2, height=H, width=W, seed=1, depth_format="png", normals_format="png")
    ds = FolderDataset(tmp_path)
    assert len(ds) == 2 and ds.source == "synthetic" and ds.depth_range == synthetic.DEPTH_RANGE
    for i in range(2):
        r = synthetic.generate((1, i), H, W)
        s = ds[i]
        assert s["image"].shape == (3, H, W) and s["depth"].shape == (1, H, W) and s["valid"].dtype == torch.bool
        rgb8 = np.asarray(Image.open(tmp_path / "rgb" / f"{i:06d}.png"), dtype=np.float32)
        np.testing.assert_array_equal(s["image"].permute(1, 2, 0).numpy(), rgb8 / 255.0 * 2.0 - 1.0)
        np.testing.assert_allclose(s["image"].permute(1, 2, 0).numpy(), r.rgb * 2 - 1, atol=1 / 255 + 1e-6)
        np.testing.assert_array_equal(s["valid"][0].numpy(), r.valid)
        mm = np.rint(r.depth.astype(np.float64) * 1000.0)
        np.testing.assert_array_equal(s["depth"][0].numpy(), (mm / 1000.0).astype(np.float32))
        assert bool(s["has_normals"])
        angle = metrics.angular_errors_deg(s["normals"].permute(1, 2, 0).numpy()[r.valid], r.served_normals[r.valid])
        assert angle.max() < 0.6  # 8-bit quantisation
        np.testing.assert_array_equal(s["normals_valid"][0].numpy(), r.valid)


def test_folder_dataset_reads_npy_exactly_and_applies_mask_and_range(tmp_path: Path) -> None:
    r = synthetic.generate(3, H, W)
    depth = r.depth.copy()
    depth[0, :4] = 100.0  # beyond the dataset range: must become invalid
    mask = np.ones((H, W), bool)
    mask[-3:, -5:] = False
    folder_format.write_sample(tmp_path, "a", r.rgb, depth, r.valid, r.served_normals, write_mask_file=False)
    folder_format.write_mask(tmp_path / "mask" / "a.png", mask)
    folder_format.write_info(tmp_path, folder_format.DatasetInfo("custom", (0.5, 20.0)))
    s = FolderDataset(tmp_path)[0]
    expected_valid = r.valid & mask & (depth >= 0.5) & (depth <= 20.0)
    assert not expected_valid[0, :4].any() and expected_valid.sum() > 0
    np.testing.assert_array_equal(s["valid"][0].numpy(), expected_valid)
    np.testing.assert_array_equal(s["depth"][0].numpy(), np.where(expected_valid, depth, 0.0).astype(np.float32))
    np.testing.assert_array_equal(s["normals_valid"][0].numpy(), r.valid & mask)
    np.testing.assert_array_equal(
        s["normals"].permute(1, 2, 0).numpy()[r.valid & mask], r.served_normals[r.valid & mask]
    )


def test_normals_png_marks_invalid_pixels_and_renormalises(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    n = rng.normal(size=(H, W, 3))
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    valid = rng.random((H, W)) > 0.3
    folder_format.write_normals(tmp_path / "n.png", n, valid)
    got, got_valid = folder_format.read_normals(tmp_path / "n.png")
    np.testing.assert_array_equal(got_valid, valid)
    np.testing.assert_allclose(np.linalg.norm(got[valid], axis=-1), 1.0, atol=1e-6)
    assert metrics.angular_errors_deg(got[valid], n[valid]).max() < 0.6
    assert (got[~valid] == 0).all()


def test_exr_depth_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("OpenEXR")
    depth = np.random.default_rng(0).uniform(0.1, 30.0, size=(H, W)).astype(np.float32)
    valid = depth > 5.0
    folder_format.write_depth(tmp_path / "d.exr", depth, valid)
    got, got_valid = folder_format.read_depth(tmp_path / "d.exr")
    np.testing.assert_array_equal(got_valid, valid)
    np.testing.assert_array_equal(got, np.where(valid, depth, 0.0).astype(np.float32))


def test_exr_without_openexr_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "OpenEXR", None)
    with pytest.raises(RuntimeError, match="OpenEXR"):
        folder_format.read_depth(tmp_path / "missing.exr")


def test_folder_format_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="16-bit"):
        folder_format.write_depth(tmp_path / "far.png", np.full((2, 2), 70.0, np.float32), np.ones((2, 2), bool))
    folder_format.write_depth(tmp_path / "depth" / "x.png", np.ones((2, 2), np.float32), np.ones((2, 2), bool))
    folder_format.write_depth(tmp_path / "depth" / "x.npy", np.ones((2, 2), np.float32), np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="ambiguous"):
        folder_format.find_file(tmp_path / "depth", "x", folder_format.DEPTH_SUFFIXES)
    with pytest.raises(FileNotFoundError, match=r"dataset\.json"):
        FolderDataset(tmp_path)


# --- Hypersim and Virtual KITTI 2 -----------------------------------------------------------------


def _write_hdf5(path: Path, data: np.ndarray) -> None:
    h5py = pytest.importorskip("h5py")
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("dataset", data=data)


def _write_jpg(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(path, quality=95)


def test_hypersim_distance_becomes_planar_depth(tmp_path: Path) -> None:
    h, w = 36, 48
    scene, cam = synthetic.random_scene_and_camera(np.random.default_rng(5), h, w)
    f = hypersim_focal(w)
    cam = dataclasses.replace(cam, fx=f, fy=f, cx=(w - 1) / 2, cy=(h - 1) / 2)
    r = synthetic.render(scene, cam)
    distance = np.linalg.norm(cam.backproject(r.depth.astype(np.float64)), axis=-1)
    distance[~r.valid] = np.nan  # Hypersim marks missing geometry with NaN
    flip = np.random.default_rng(1).random((h, w)) < 0.5  # back-facing normals, as Hypersim has some
    stored_normals = np.where(flip[..., None], -r.normals, r.normals) * 2.0

    images = tmp_path / "ai_001_002" / "images"
    for frame in (0, 3):
        _write_jpg(images / "scene_cam_01_final_preview" / f"frame.{frame:04d}.tonemap.jpg", r.rgb)
        _write_hdf5(images / "scene_cam_01_geometry_hdf5" / f"frame.{frame:04d}.depth_meters.hdf5", distance)
        _write_hdf5(images / "scene_cam_01_geometry_hdf5" / f"frame.{frame:04d}.normal_cam.hdf5", stored_normals)
    # A frame whose depth is missing is skipped by the scan.
    _write_jpg(images / "scene_cam_01_final_preview" / "frame.0009.tonemap.jpg", r.rgb)

    ds = HypersimDataset(tmp_path)
    assert [ds.name(i) for i in range(len(ds))] == ["ai_001_002/cam_01/frame.0000", "ai_001_002/cam_01/frame.0003"]
    s = ds[1]
    u, v = np.meshgrid(np.arange(w), np.arange(h))
    analytic = distance * f / np.sqrt((u - (w - 1) / 2) ** 2 + (v - (h - 1) / 2) ** 2 + f**2)
    np.testing.assert_array_equal(s["valid"][0].numpy(), r.valid)
    np.testing.assert_allclose(s["depth"][0].numpy()[r.valid], analytic[r.valid], rtol=1e-6)
    np.testing.assert_allclose(s["depth"][0].numpy()[r.valid], r.depth[r.valid], rtol=1e-5)
    jpg = np.asarray(Image.open(images / "scene_cam_01_final_preview" / "frame.0003.tonemap.jpg"), np.float32)
    np.testing.assert_array_equal(s["image"].permute(1, 2, 0).numpy(), jpg / 255.0 * 2 - 1)
    assert bool(s["has_normals"])
    served = r.served_normals  # Hypersim's OpenGL frame converted to the served one (+x image left)
    np.testing.assert_allclose(s["normals"].permute(1, 2, 0).numpy()[r.valid], served[r.valid], atol=1e-6)

    split = tmp_path / "metadata_images_split_scene_v1.csv"
    split.write_text(
        "scene_name,camera_name,frame_id,included_in_public_release,exclude_reason,split_partition_name\n"
        "ai_001_002,cam_01,0,True,,train\n"
        "ai_001_002,cam_01,3,True,,test\n"
        "ai_001_002,cam_01,9,False,missing,train\n"
    )
    assert [HypersimDataset(tmp_path, split, "test").name(0)] == ["ai_001_002/cam_01/frame.0003"]
    assert len(HypersimDataset(tmp_path, split, "train")) == 1
    split.write_text(split.read_text() + "ai_001_002,cam_01,9,True,,val\n")
    with pytest.raises(FileNotFoundError, match="missing"):
        HypersimDataset(tmp_path, split, "val")


def _write_vkitti(
    root: Path, scene: str, variation: str, camera: str, frame: int, rgb: np.ndarray, cm: np.ndarray
) -> None:
    frames = root / scene / variation / "frames"
    _write_jpg(frames / "rgb" / camera / f"rgb_{frame:05d}.jpg", rgb)
    folder_format.write_png16(frames / "depth" / camera / f"depth_{frame:05d}.png", cm)


def test_virtual_kitti2_reads_centimetres_and_sky(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    cm = rng.integers(100, 7000, size=(H, W)).astype(np.uint16)
    cm[:5] = 65535  # sky
    cm[5, :3] = 9000  # 90 m: beyond the 80 m range
    rgb = rng.random((H, W, 3)).astype(np.float32)
    _write_vkitti(tmp_path, "Scene01", "clone", "Camera_0", 0, rgb, cm)
    _write_vkitti(tmp_path, "Scene01", "clone", "Camera_0", 1, rgb, cm)
    _write_vkitti(tmp_path, "Scene01", "fog", "Camera_0", 0, rgb, cm)
    _write_vkitti(tmp_path, "Scene01", "clone", "Camera_1", 0, rgb, cm)
    _write_vkitti(tmp_path, "Scene02", "clone", "Camera_0", 0, rgb, cm)

    ds = VirtualKitti2Dataset(tmp_path)
    assert len(ds) == 4  # Camera_1 is not read by default
    assert len(VirtualKitti2Dataset(tmp_path, scenes=["Scene01"], variations=["clone"])) == 2
    assert len(VirtualKitti2Dataset(tmp_path, cameras=("Camera_0", "Camera_1"))) == 5
    s = ds[0]
    assert ds.name(0) == "Scene01/clone/Camera_0/00000"
    valid = (cm < 65535) & (cm <= 8000)
    np.testing.assert_array_equal(s["valid"][0].numpy(), valid)
    np.testing.assert_array_equal(s["depth"][0].numpy(), np.where(valid, cm / np.float32(100.0), 0).astype(np.float32))
    assert not bool(s["has_normals"]) and not s["normals_valid"].any() and not s["normals"].any()
    wide = VirtualKitti2Dataset(tmp_path, depth_range=(1e-5, 1000.0))[0]  # sky is invalid by its code, not range
    np.testing.assert_array_equal(wide["valid"][0].numpy(), cm < 65535)


# --- augmentation and mixing ----------------------------------------------------------------------


def _mirror_scene(scene: Scene) -> Scene:
    prims = []
    for p in scene.primitives:
        if isinstance(p, Plane):
            prims.append(Plane(MIRROR @ p.point, MIRROR @ p.normal, MIRROR @ p.axis_u, p.texture))
        elif isinstance(p, Sphere):
            prims.append(Sphere(MIRROR @ p.center, p.radius, p.texture))
        else:
            prims.append(Box(MIRROR @ p.center, p.half_extents, MIRROR @ p.rotation @ MIRROR, p.texture))
    return Scene(prims, scene.light)


def test_hflip_equals_rendering_the_mirrored_scene(tmp_path: Path) -> None:
    scene = Scene(
        [
            Plane(np.array([0.0, 0.0, -6.0]), _unit((0.5, 0.2, 1.0)), _unit((1.0, 0.0, -0.5)), _texture()),
            Sphere(np.array([1.0, 0.3, -3.5]), 0.8, _texture()),
            Box(np.array([-1.2, -0.4, -4.0]), np.array([0.4, 0.5, 0.6]), _rot_y(0.6), _texture()),
        ],
        _light(),
    )
    cam = _camera()  # at the origin, principal point centred: mirror-symmetric about x = 0
    r = synthetic.render(scene, cam)
    mirrored = synthetic.render(_mirror_scene(scene), cam)
    synthetic.write_rendering(tmp_path, "s", r)
    folder_format.write_info(tmp_path, folder_format.DatasetInfo("mirror", (0.01, 50.0)))
    plain = FolderDataset(tmp_path)[0]
    flipped = FolderDataset(tmp_path, augmentation=Augmentation(hflip_prob=1.0))[0]

    assert flipped["valid"].all()
    np.testing.assert_allclose(flipped["depth"][0].numpy(), mirrored.depth, rtol=1e-5)
    np.testing.assert_allclose(flipped["normals"].permute(1, 2, 0).numpy(), mirrored.served_normals, atol=1e-5)
    assert np.abs(mirrored.normals[..., 0]).max() > 0.3  # the test has teeth: x components are large
    np.testing.assert_array_equal(flipped["image"].numpy(), plain["image"].flip(-1).numpy())


def test_crop_is_an_aligned_window_and_changes_with_the_epoch(tmp_path: Path) -> None:
    synthetic.write_scenes(tmp_path, n=1, height=H, width=W, seed=4)
    full = FolderDataset(tmp_path)[0]
    ds = FolderDataset(tmp_path, augmentation=Augmentation(crop_hw=(16, 24)), seed=3)
    windows = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        s = ds[0]
        assert s["image"].shape == (3, 16, 24) and s["normals"].shape == (3, 16, 24)
        np.testing.assert_array_equal(s["image"].numpy(), ds[0]["image"].numpy())  # deterministic
        matches = [
            (t, left)
            for t in range(H - 16 + 1)
            for left in range(W - 24 + 1)
            if torch.equal(full["depth"][:, t : t + 16, left : left + 24], s["depth"])
            and torch.equal(full["image"][:, t : t + 16, left : left + 24], s["image"])
            and torch.equal(full["normals"][:, t : t + 16, left : left + 24], s["normals"])
            and torch.equal(full["valid"][:, t : t + 16, left : left + 24], s["valid"])
        ]
        assert matches
        windows.add(matches[0])
    assert len(windows) > 1
    with pytest.raises(ValueError, match="larger than the image"):
        FolderDataset(tmp_path, augmentation=Augmentation(crop_hw=(H + 1, W)))[0]


def test_resize_keeps_depth_values_and_masks_exact(tmp_path: Path) -> None:
    synthetic.write_scenes(tmp_path, n=1, height=H, width=W, seed=2)
    full = FolderDataset(tmp_path)[0]
    s = FolderDataset(tmp_path, augmentation=Augmentation(resize_hw=(H // 2, W // 2)))[0]
    assert s["image"].shape == (3, H // 2, W // 2)
    # Nearest: every resized depth is an original depth, and validity travels with it.
    assert set(s["depth"].flatten().tolist()) <= set(full["depth"].flatten().tolist())
    assert torch.equal(s["valid"], s["depth"] > 0)
    assert float(s["image"].min()) >= -1.0 and float(s["image"].max()) <= 1.0


def test_mixed_dataset_follows_ratios_deterministically(tmp_path: Path) -> None:
    synthetic.write_scenes(tmp_path / "synth", n=3, height=H, width=W, seed=0)
    cm = np.full((H, W), 1234, np.uint16)
    for frame in range(2):
        _write_vkitti(tmp_path / "vk", "Scene01", "clone", "Camera_0", frame, np.zeros((H, W, 3)), cm)
    sources = [FolderDataset(tmp_path / "synth"), VirtualKitti2Dataset(tmp_path / "vk")]
    mixed = MixedDataset(sources, ratios=[9, 1], length=4000, seed=11)

    picks = [mixed.pick(i) for i in range(len(mixed))]
    share = np.mean([k == 0 for k, _ in picks])
    assert abs(share - 0.9) < 0.02
    assert {j for k, j in picks if k == 0} == {0, 1, 2} and {j for k, j in picks if k == 1} == {0, 1}
    assert picks == [MixedDataset(sources, [9, 1], 4000, seed=11).pick(i) for i in range(4000)]
    assert picks != [MixedDataset(sources, [9, 1], 4000, seed=12).pick(i) for i in range(4000)]
    mixed.set_epoch(1)
    assert picks != [mixed.pick(i) for i in range(4000)]
    assert sum(k for k, _ in (MixedDataset(sources, [0, 1], 50).pick(i) for i in range(50))) == 50

    # Items come from the picked source, and sources with and without normals collate together.
    both = next(i for i in range(4000) if mixed.pick(i)[0] == 1)
    batch = default_collate([mixed[0], mixed[both]])
    assert batch["image"].shape == (2, 3, H, W) and batch["normals"].shape == (2, 3, H, W)
    assert batch["source"][1] == "vkitti2" and not bool(batch["has_normals"][1])
    with pytest.raises(ValueError, match="ratio"):
        MixedDataset(sources, [1.0], 10)


# --- metrics --------------------------------------------------------------------------------------


def test_alignment_recovers_known_scale_and_shift() -> None:
    rng = np.random.default_rng(0)
    pred = rng.random((H, W))
    valid = rng.random((H, W)) > 0.3
    gt = np.where(valid, 2.5 * pred + 0.7, 1e3)  # invalid pixels hold garbage that must not matter
    scale, shift = metrics.fit_scale_shift(pred, gt, valid)
    assert scale == pytest.approx(2.5, abs=1e-12) and shift == pytest.approx(0.7, abs=1e-12)


def test_perfect_predictions_score_perfectly_in_both_spaces() -> None:
    rng = np.random.default_rng(1)
    gt = rng.uniform(1.0, 10.0, size=(H, W))
    valid = np.ones((H, W), bool)
    depth_score = metrics.evaluate_depth(0.2 * gt - 0.1, gt, valid, "depth", (0.5, 20.0))
    disp_score = metrics.evaluate_depth(3.0 / gt + 0.25, gt, valid, "disparity", (0.5, 20.0))
    for score in (depth_score, disp_score):
        assert score.abs_rel == pytest.approx(0.0, abs=1e-12) and score.delta1 == 1.0


def test_depth_errors_of_known_mistakes() -> None:
    gt = np.linspace(1.0, 5.0, H * W).reshape(H, W)
    valid = np.ones((H, W), bool)
    assert metrics.depth_errors(1.1 * gt, gt, valid).abs_rel == pytest.approx(0.1)
    assert metrics.depth_errors(1.1 * gt, gt, valid).delta1 == 1.0
    assert metrics.depth_errors(0.7 * gt, gt, valid).delta1 == 0.0  # too near counts like too far
    assert metrics.depth_errors(0.7 * gt, gt, valid).abs_rel == pytest.approx(0.3)
    half = np.where(np.arange(W) < W // 2, 1.3 * gt, gt)  # half the pixels 30% off: delta1 = 0.5
    assert metrics.depth_errors(half, gt, valid).delta1 == pytest.approx(0.5)
    evaluator = metrics.DepthEvaluator("depth", (0.1, 10.0))
    evaluator.add(2 * gt + 1, gt, valid)  # perfect after alignment
    evaluator.add(gt**2, gt, valid)  # imperfect
    result = evaluator.result()
    assert result.count == 2
    assert result.abs_rel == pytest.approx(evaluator.scores[1].abs_rel / 2)


def test_evaluation_masks_and_clips_to_the_depth_range() -> None:
    gt = np.linspace(1.0, 5.0, H * W).reshape(H, W)
    pred = gt.copy()
    gt_far = gt.copy()
    gt_far[0, :8] = 100.0  # outside the range: ignored even though the prediction there is garbage
    pred[0, :8] = -50.0
    assert metrics.evaluate_depth(pred, gt_far, None, "depth", (0.5, 10.0)).abs_rel == pytest.approx(0.0, abs=1e-12)
    aligned = metrics.align_depth(pred, gt, pred > 0, "depth", (0.5, 10.0))
    assert (aligned[0, :8] == 0.5).all()  # the garbage pixels are clipped up to the range's minimum
    np.testing.assert_allclose(aligned[pred > 0], gt[pred > 0], rtol=1e-12)
    disparity = np.where(pred > 0, 1.0 / gt, -5.0)  # negative disparity: "beyond infinity"
    from_disp = metrics.align_depth(disparity, gt, pred > 0, "disparity", (0.5, 10.0))
    assert (from_disp[0, :8] == 10.0).all()  # clipped to 1 / max, then to max
    np.testing.assert_allclose(from_disp[pred > 0], gt[pred > 0], rtol=1e-12)


def _rotate_about_perpendicular(n: np.ndarray, angle_deg: float, rng: np.random.Generator) -> np.ndarray:
    """Each vector rotated by exactly `angle_deg` about a random axis perpendicular to it."""
    axis = np.cross(n, rng.normal(size=n.shape))
    axis /= np.linalg.norm(axis, axis=-1, keepdims=True)
    a = math.radians(angle_deg)
    return n * math.cos(a) + np.cross(axis, n) * math.sin(a)


def test_normal_metrics_of_known_rotations() -> None:
    rng = np.random.default_rng(3)
    gt = rng.normal(size=(H, W, 3))
    gt /= np.linalg.norm(gt, axis=-1, keepdims=True)
    angles = np.where(np.arange(W) < 12, 5.0, np.where(np.arange(W) < 30, 20.0, 40.0))[None, :].repeat(H, 0)
    pred = np.empty_like(gt)
    for a in (5.0, 20.0, 40.0):
        sel = angles == a
        pred[sel] = _rotate_about_perpendicular(gt[sel], a, rng) * 3.0  # unnormalised on purpose
    np.testing.assert_allclose(metrics.angular_errors_deg(pred, gt), angles, atol=1e-9)
    score = metrics.evaluate_normals(pred, gt)
    assert score.mean == pytest.approx(angles.mean()) and score.median == pytest.approx(20.0)
    assert score.within_11_25 == pytest.approx(100 * 12 / W)
    assert score.within_22_5 == pytest.approx(100 * 30 / W) and score.within_30 == pytest.approx(100 * 30 / W)
    valid = angles < 30
    assert metrics.evaluate_normals(pred, gt, valid).within_30 == 100.0
    pooled = metrics.NormalsEvaluator()
    pooled.add(pred, gt, angles == 5.0)
    pooled.add(pred, gt, angles == 40.0)
    n5, n40 = (angles == 5.0).sum(), (angles == 40.0).sum()
    assert pooled.result().mean == pytest.approx((5.0 * n5 + 40.0 * n40) / (n5 + n40))
    assert metrics.angular_errors_deg(np.array([0.0, 0.0, 1.0]), np.array([0.0, 0.0, -1.0])) == pytest.approx(180.0)


# --- losses ---------------------------------------------------------------------------------------


def _depth_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(3, 1, 16, 20, generator=g) * 5 + 0.5
    pred = torch.rand(3, 1, 16, 20, generator=g)
    valid = torch.rand(3, 1, 16, 20, generator=g) > 0.25
    return pred, target, valid


def test_depth_loss_matches_a_float64_reference() -> None:
    pred, target, valid = _depth_batch()
    expected = []
    for b in range(3):
        m = valid[b, 0].numpy()
        s, t = metrics.fit_scale_shift(pred[b, 0].double().numpy(), target[b, 0].double().numpy(), m)
        expected.append(np.abs(s * pred[b, 0].double().numpy() + t - target[b, 0].double().numpy())[m].mean())
    got = losses.affine_invariant_l1(pred, target, valid)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(np.mean(expected)), rel=1e-5)


def test_depth_loss_is_affine_invariant_and_differentiable() -> None:
    pred, target, valid = _depth_batch(1)
    base = losses.affine_invariant_l1(pred, target, valid)
    for s, t in ((3.0, -0.5), (0.25, 2.0), (-2.0, 1.0)):
        assert float(losses.affine_invariant_l1(s * pred + t, target, valid)) == pytest.approx(float(base), rel=1e-4)
    assert float(losses.affine_invariant_l1((target - 0.3) / 2.0, target, valid)) == pytest.approx(0.0, abs=1e-5)

    leaf = pred.clone().requires_grad_(True)
    losses.affine_invariant_l1(leaf, target, valid).backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
    assert (leaf.grad[valid] != 0).any() and (leaf.grad[~valid] == 0).all()
    # The fit is differentiated through: the loss ignores shifts and scalings of the prediction, so its
    # gradient is orthogonal to both directions (not so with a detached fit).
    per_sample_shift = (leaf.grad * valid).sum(dim=(1, 2, 3))
    per_sample_scale = (leaf.grad * leaf.detach()).sum(dim=(1, 2, 3))
    torch.testing.assert_close(per_sample_shift, torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_sample_scale, torch.zeros(3), atol=1e-5, rtol=0)
    detached = pred.clone().requires_grad_(True)
    losses.affine_invariant_l1(detached, target, valid, detach_fit=True).backward()
    assert detached.grad is not None and (detached.grad * valid).sum(dim=(1, 2, 3)).abs().max() > 1e-3
    garbage = torch.where(valid, pred, torch.full_like(pred, 1e4))
    assert float(losses.affine_invariant_l1(garbage, target, valid)) == pytest.approx(float(base), rel=1e-5)

    empty = pred.clone().requires_grad_(True)
    zero = losses.affine_invariant_l1(empty, target, torch.zeros_like(valid))
    zero.backward()
    assert float(zero.detach()) == 0.0 and empty.grad is not None


def _pooled_reference(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> float:
    """Upstream E2E-FT's reduction in float64: a least-squares fit per sample, then one mean over every valid
    pixel of the batch."""
    errors = []
    for b in range(pred.shape[0]):
        m = valid[b, 0].numpy()
        p, y = pred[b, 0].double().numpy(), target[b, 0].double().numpy()
        s, t = metrics.fit_scale_shift(p, y, m)
        errors.append(np.abs(s * p + t - y)[m])
    return float(np.concatenate(errors).mean())


def test_upstream_depth_loss_is_one_mean_over_the_batch_pixels() -> None:
    pred, target, valid = _depth_batch(2)
    valid[0, 0, :12] = False  # samples with very different valid counts: the reductions must differ
    pooled = losses.affine_invariant_l1(pred, target, valid, reduction="pixel")
    per_sample = losses.affine_invariant_l1(pred, target, valid, reduction="sample")
    assert float(pooled) == pytest.approx(_pooled_reference(pred, target, valid), rel=1e-5)
    assert abs(float(pooled) - float(per_sample)) > 1e-3 * float(pooled)
    # Still affine-invariant in the prediction, and in metres: scaling the ground truth scales the loss.
    assert float(losses.affine_invariant_l1(3 * pred - 1, target, valid, reduction="pixel")) == pytest.approx(
        float(pooled), rel=1e-4
    )
    assert float(losses.affine_invariant_l1(pred, 10 * target, valid, reduction="pixel")) == pytest.approx(
        10 * float(pooled), rel=1e-4
    )
    with pytest.raises(ValueError, match="reduction"):
        losses.affine_invariant_l1(pred, target, valid, reduction="batch")  # type: ignore[arg-type]


def test_clip_to_quantiles_keeps_metres_and_drops_flat_samples() -> None:
    depth = torch.zeros(2, 1, 10, 10)
    depth[0, 0] = torch.linspace(1.0, 50.0, 100).view(10, 10)
    depth[1, 0] = 4.0  # flat: its 2 % and 98 % quantiles coincide
    valid = depth > 0
    valid[0, 0, 0, 0] = False
    target, ok = losses.clip_to_quantiles(depth, valid, 0.02, 0.98)
    values = depth[0][valid[0]]
    lo, hi = torch.quantile(values, 0.02), torch.quantile(values, 0.98)
    torch.testing.assert_close(target[0][ok[0]], values.clamp(lo, hi))  # metres, not [-1, 1]
    assert float(target[0].max()) == pytest.approx(float(hi)) and float(hi) > 45.0
    assert not ok[0, 0, 0, 0] and float(target[0, 0, 0, 0]) == 0.0
    assert not ok[1].any() and not target[1].any()  # upstream empties the mask of a flat sample
    assert valid[1].all()  # the input mask is not modified


def to_t(a: np.ndarray) -> torch.Tensor:
    """`[B, H, W, 3]` numpy -> `[B, 3, H, W]` float32 tensor."""
    return torch.from_numpy(a).float().permute(0, 3, 1, 2)


def test_normals_loss_is_the_mean_angle_and_stays_finite() -> None:
    rng = np.random.default_rng(4)
    gt = rng.normal(size=(2, 8, 10, 3))
    gt /= np.linalg.norm(gt, axis=-1, keepdims=True)
    pred = _rotate_about_perpendicular(gt, 30.0, rng)
    valid = torch.ones(2, 1, 8, 10, dtype=torch.bool)
    loss = losses.normals_angular_loss(to_t(pred) * 2.5, to_t(gt), valid)
    assert float(loss) == pytest.approx(math.pi / 6, abs=1e-5)
    same = to_t(gt).requires_grad_(True)
    out = losses.normals_angular_loss(same, to_t(gt), valid)
    out.backward()
    assert float(out.detach()) < 2e-3 and same.grad is not None and torch.isfinite(same.grad).all()
    half = valid.clone()
    half[0] = False
    mixed = to_t(np.concatenate([gt[:1], pred[1:]]))
    assert float(losses.normals_angular_loss(mixed, to_t(gt), half)) == pytest.approx(math.pi / 6, abs=1e-5)


def test_lotus_loss_and_targets() -> None:
    g = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(4))
    assert float(losses.lotus_loss(a, b)) == pytest.approx(float(((a - b) ** 2).mean()), rel=1e-6)
    both = losses.lotus_loss(a, b, c, d, reconstruction_weight=0.5)
    assert float(both) == pytest.approx(float(((a - b) ** 2).mean() + 0.5 * ((c - d) ** 2).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="both"):
        losses.lotus_loss(a, b, reconstruction_pred=c)

    depth = torch.linspace(1.0, 10.0, 100).view(1, 1, 10, 10)
    valid = torch.ones_like(depth, dtype=torch.bool)
    valid[0, 0, 0, :3] = False
    disp = losses.disparity_target(depth, valid)
    assert float(disp[valid].min()) == -1.0 and float(disp[valid].max()) == 1.0 and (disp[~valid] == 0).all()
    disparity = 1.0 / depth[valid]
    lo, hi = torch.quantile(disparity, 0.02), torch.quantile(disparity, 0.98)
    inside = valid & (1.0 / depth > lo) & (1.0 / depth < hi)
    torch.testing.assert_close(disp[inside], ((1.0 / depth[inside]) - lo) / (hi - lo) * 2 - 1)
    assert float(disp[0, 0, -1, -1]) == -1.0  # the farthest pixel has the lowest disparity
    assert float(losses.depth_target(depth, valid)[0, 0, -1, -1]) == 1.0
