"""Procedural scenes with exact geometry: a cheap, licence-free data source to smoke-test fine-tuning end to end.

A scene is a room (or an open floor under the sky) made of infinite planes, boxes (axis-aligned or rotated)
and spheres, each with a checker, stripe or value-noise texture, lit by one directional light plus ambient
(Lambertian, no cast shadows: a directional light inside a closed room would shadow everything). Every pixel
centre is ray-cast in float64, so depth and normals are exact, not estimated.

Conventions (the same as the served outputs and the folder format):
- Camera frame of the geometry: x right, y up, z towards the viewer (the camera looks along -z), as in OpenGL
  and Hypersim.
- Pixel (row i, column j) has image coordinates (u, v) = (j, i): pixel centres sit on integers, so a centred
  principal point is ((W - 1) / 2, (H - 1) / 2). The ray through (u, v) in the camera frame is
  ((u - cx) / fx, -(v - cy) / fy, -1).
- Depth is PLANAR: the distance along the optical axis (-z of the hit point in the camera frame), in metres.
  Because the ray's z component is -1, the ray parameter of a hit is its planar depth.
- `Rendering.normals` are camera-frame unit vectors in that OpenGL frame (x right), oriented to face the camera
  (dot with the viewing ray < 0): the geometry. `Rendering.served_normals` are the same vectors in the served
  convention (+x image left, `models.outputs.NORMALS_CONVENTION`); everything that becomes ground truth
  (`write_scenes`, the in-memory training source) uses those.
- Pixels that hit nothing closer than `MAX_DEPTH` are sky: invalid, depth 0, normals 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from models.training import folder_format

MAX_DEPTH = 50.0  # metres; farther hits (the horizon of an open floor) count as sky
DEPTH_RANGE = (0.01, MAX_DEPTH)  # written to dataset.json: every valid synthetic depth lies inside
_EPS = 1e-9
WORLD_UP = np.array([0.0, 1.0, 0.0])

TextureKind = Literal["checker", "stripes", "noise", "solid", "waves"]
#: Scene distributions: "base" (the shipped 64 px demo's rooms, kept bit for bit) or "varied" (more shapes,
#: palettes, textures, lights, fog and camera poses; `_varied_scene_and_camera`).
Variety = Literal["base", "varied"]
VARIETIES: tuple[str, ...] = ("base", "varied")


@dataclass(frozen=True)
class Texture:
    """A 2D albedo pattern in surface coordinates (metres), so patterns shrink with distance like real ones."""

    kind: TextureKind
    color_a: np.ndarray  # [3] in [0, 1]
    color_b: np.ndarray  # [3] in [0, 1]
    period: float  # metres per pattern cell
    angle: float = 0.0  # stripes only, radians
    lattice: np.ndarray | None = None  # noise only: [P, P] values in [0, 1], tiled

    def albedo(self, uv: np.ndarray) -> np.ndarray:
        """`[N, 2]` surface coordinates -> `[N, 3]` albedo."""
        u, v = uv[:, 0] / self.period, uv[:, 1] / self.period
        if self.kind == "checker":
            w = ((np.floor(u) + np.floor(v)) % 2.0)[:, None]
        elif self.kind == "stripes":
            w = (np.floor(u * math.cos(self.angle) + v * math.sin(self.angle)) % 2.0)[:, None]
        elif self.kind == "solid":
            w = np.zeros((len(u), 1))
        elif self.kind == "waves":  # smooth sinusoidal bands, like the wall of assets/sample.png
            w = (0.5 + 0.5 * np.sin(math.pi * (u * math.cos(self.angle) + v * math.sin(self.angle))))[:, None]
        else:
            w = _value_noise(self.lattice, u, v)[:, None]
        return self.color_a * (1.0 - w) + self.color_b * w


def _value_noise(lattice: np.ndarray | None, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear value noise with a smoothstep fade over a tiled random lattice: smooth, cheap, deterministic."""
    if lattice is None:
        raise ValueError("a noise texture needs a lattice")
    p = lattice.shape[0]
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
    i0, j0 = iu.astype(np.int64) % p, iv.astype(np.int64) % p
    i1, j1 = (i0 + 1) % p, (j0 + 1) % p
    top = lattice[i0, j0] * (1 - fu) + lattice[i1, j0] * fu
    bottom = lattice[i0, j1] * (1 - fu) + lattice[i1, j1] * fu
    return top * (1 - fv) + bottom * fv


@dataclass(frozen=True)
class Plane:
    """Infinite plane through `point` with unit `normal`; `axis_u` is an in-plane unit vector for texturing."""

    point: np.ndarray
    normal: np.ndarray
    axis_u: np.ndarray
    texture: Texture

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        denom = dirs @ self.normal
        with np.errstate(divide="ignore", invalid="ignore"):
            t = ((self.point - origin) @ self.normal) / denom
        return np.where((np.abs(denom) > _EPS) & (t > _EPS), t, np.inf)

    def surface(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rel = points - self.point
        axis_v = np.cross(self.normal, self.axis_u)
        uv = np.stack([rel @ self.axis_u, rel @ axis_v], axis=1)
        return np.broadcast_to(self.normal, points.shape).copy(), uv


@dataclass(frozen=True)
class Sphere:
    center: np.ndarray
    radius: float
    texture: Texture

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        oc = origin - self.center
        a = np.einsum("ij,ij->i", dirs, dirs)
        b = 2.0 * (dirs @ oc)
        c = oc @ oc - self.radius**2
        disc = b * b - 4.0 * a * c
        root = np.sqrt(np.maximum(disc, 0.0))
        near, far = (-b - root) / (2.0 * a), (-b + root) / (2.0 * a)
        t = np.where(near > _EPS, near, far)
        return np.where((disc >= 0.0) & (t > _EPS), t, np.inf)

    def surface(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rel = (points - self.center) / self.radius
        normals = rel / np.linalg.norm(rel, axis=1, keepdims=True)
        # Longitude and latitude scaled by the radius: surface coordinates in metres.
        lon = np.arctan2(normals[:, 2], normals[:, 0])
        lat = np.arccos(np.clip(normals[:, 1], -1.0, 1.0))
        return normals, np.stack([lon * self.radius, lat * self.radius], axis=1)


@dataclass(frozen=True)
class Box:
    """Oriented box: `rotation` maps box-local coordinates to world; `half_extents` along the local axes."""

    center: np.ndarray
    half_extents: np.ndarray
    rotation: np.ndarray
    texture: Texture

    def intersect(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        o = self.rotation.T @ (origin - self.center)
        d = dirs @ self.rotation  # rows: R^T d
        with np.errstate(divide="ignore", invalid="ignore"):
            t1 = (-self.half_extents - o) / d
            t2 = (self.half_extents - o) / d
        # A ray parallel to a slab: inside it the slab never bounds t, outside it never hits.
        inside = np.abs(o) <= self.half_extents
        parallel = np.abs(d) < _EPS
        lo = np.where(parallel, np.where(inside, -np.inf, np.inf), np.minimum(t1, t2))
        hi = np.where(parallel, np.where(inside, np.inf, -np.inf), np.maximum(t1, t2))
        t_near, t_far = lo.max(axis=1), hi.min(axis=1)
        t = np.where(t_near > _EPS, t_near, t_far)
        return np.where((t_near <= t_far) & (t > _EPS), t, np.inf)

    def surface(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        local = (points - self.center) @ self.rotation
        ratio = np.abs(local) / self.half_extents
        axis = ratio.argmax(axis=1)
        rows = np.arange(len(points))
        n_local = np.zeros_like(local)
        n_local[rows, axis] = np.sign(local[rows, axis])
        others = np.array([[1, 2], [0, 2], [0, 1]])[axis]
        uv = np.stack([local[rows, others[:, 0]], local[rows, others[:, 1]]], axis=1)
        return n_local @ self.rotation.T, uv


Primitive = Plane | Sphere | Box


@dataclass(frozen=True)
class Camera:
    """Pinhole camera. `rotation` maps camera-frame vectors to world (columns: right, up, backwards)."""

    height: int
    width: int
    fx: float
    fy: float
    cx: float
    cy: float
    rotation: np.ndarray
    position: np.ndarray

    @property
    def intrinsics(self) -> np.ndarray:
        """`[3, 3]` K for OpenCV camera axes (x right, y down, z forward): u = fx X / Z + cx, v = fy Y / Z + cy.

        Our camera frame (y up, z backwards) maps to OpenCV's by negating y and z.
        """
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    def rays(self) -> np.ndarray:
        """`[H, W, 3]` camera-frame ray per pixel centre, with z = -1 so that the ray parameter is planar depth."""
        v, u = np.meshgrid(
            np.arange(self.height, dtype=np.float64), np.arange(self.width, dtype=np.float64), indexing="ij"
        )
        return np.stack([(u - self.cx) / self.fx, -(v - self.cy) / self.fy, -np.ones_like(u)], axis=-1)

    def backproject(self, depth: np.ndarray) -> np.ndarray:
        """Planar depth `[H, W]` -> camera-frame points `[H, W, 3]`."""
        return self.rays() * depth[..., None]


@dataclass(frozen=True)
class Light:
    direction: np.ndarray  # unit vector from the surface towards the light, world frame
    color: np.ndarray  # [3]
    ambient: float


@dataclass(frozen=True)
class Scene:
    primitives: list[Primitive]
    light: Light
    sky_top: np.ndarray = field(default_factory=lambda: np.array([0.35, 0.55, 0.9]))
    sky_horizon: np.ndarray = field(default_factory=lambda: np.array([0.85, 0.9, 0.95]))
    fill: Light | None = None  # a second directional light ("varied" scenes)
    fog_density: float = 0.0  # per metre: rgb -> mix(shaded, fog_color, 1 - exp(-density * distance))
    fog_color: np.ndarray = field(default_factory=lambda: np.array([0.7, 0.7, 0.7]))


@dataclass(frozen=True)
class Rendering:
    """One rendered view. Arrays are float32 except `valid` (bool) and `primitive` (int16, -1 = sky)."""

    rgb: np.ndarray  # [H, W, 3] in [0, 1]
    depth: np.ndarray  # [H, W] planar metres, 0 where invalid
    normals: np.ndarray  # [H, W, 3] OpenGL camera frame (x right), unit where valid, 0 elsewhere
    valid: np.ndarray  # [H, W]
    primitive: np.ndarray  # [H, W] index into scene.primitives
    camera: Camera
    scene: Scene

    @property
    def served_normals(self) -> np.ndarray:
        """The normals as ground truth for the served models: +x image left, +y up, +z towards the camera."""
        return folder_format.opengl_to_served_normals(self.normals)


def render(scene: Scene, camera: Camera) -> Rendering:
    """Ray-cast every pixel centre against every primitive and keep the nearest hit."""
    rays_cam = camera.rays().reshape(-1, 3)
    rays_world = rays_cam @ camera.rotation.T
    origin = np.asarray(camera.position, dtype=np.float64)
    n_pix = rays_cam.shape[0]

    t_best = np.full(n_pix, np.inf)
    which = np.full(n_pix, -1, dtype=np.int64)
    for k, prim in enumerate(scene.primitives):
        t = prim.intersect(origin, rays_world)
        closer = t < t_best
        t_best = np.where(closer, t, t_best)
        which = np.where(closer, k, which)
    hit = np.isfinite(t_best) & (t_best <= MAX_DEPTH)
    which = np.where(hit, which, -1)

    normals_world = np.zeros((n_pix, 3))
    albedo = np.zeros((n_pix, 3))
    points = origin + rays_world * np.where(hit, t_best, 0.0)[:, None]
    for k, prim in enumerate(scene.primitives):
        sel = which == k
        if not sel.any():
            continue
        n, uv = prim.surface(points[sel])
        normals_world[sel] = n
        albedo[sel] = prim.texture.albedo(uv)

    # Visible surfaces face the camera: flip normals that point along the viewing ray (planes seen from behind).
    facing = np.einsum("ij,ij->i", normals_world, rays_world)
    normals_world = np.where((facing > 0.0)[:, None], -normals_world, normals_world)

    light = scene.light
    lambert = np.clip(normals_world @ light.direction, 0.0, None)
    shaded = albedo * (light.ambient + (1.0 - light.ambient) * lambert[:, None]) * light.color
    if scene.fill is not None:
        fill = np.clip(normals_world @ scene.fill.direction, 0.0, None)
        shaded = shaded + albedo * fill[:, None] * scene.fill.color
    if scene.fog_density > 0.0:
        dist = np.where(hit, t_best, 0.0) * np.linalg.norm(rays_world, axis=1)
        keep = np.exp(-scene.fog_density * dist)[:, None]
        shaded = shaded * keep + scene.fog_color * (1.0 - keep)
    elevation = np.clip(rays_world[:, 1] / np.linalg.norm(rays_world, axis=1), 0.0, 1.0)[:, None]
    sky = scene.sky_horizon * (1.0 - elevation) + scene.sky_top * elevation
    rgb = np.where(hit[:, None], shaded, sky)

    normals_cam = normals_world @ camera.rotation  # rows: R^T n
    normals_cam /= np.maximum(np.linalg.norm(normals_cam, axis=1, keepdims=True), _EPS)
    normals_cam[~hit] = 0.0

    shape = (camera.height, camera.width)
    return Rendering(
        rgb=np.clip(rgb, 0.0, 1.0).reshape(*shape, 3).astype(np.float32),
        depth=np.where(hit, t_best, 0.0).reshape(shape).astype(np.float32),
        normals=normals_cam.reshape(*shape, 3).astype(np.float32),
        valid=hit.reshape(shape),
        primitive=which.reshape(shape).astype(np.int16),
        camera=camera,
        scene=scene,
    )


def look_at(position: np.ndarray, target: np.ndarray, roll: float = 0.0) -> np.ndarray:
    """Camera-to-world rotation looking from `position` at `target` with y up, rolled about the optical axis."""
    forward = np.asarray(target, dtype=np.float64) - np.asarray(position, dtype=np.float64)
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, WORLD_UP)
    if np.linalg.norm(right) < 1e-6:
        raise ValueError("look_at: the view direction is parallel to world up")
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    c, s = math.cos(roll), math.sin(roll)
    right, up = c * right + s * up, -s * right + c * up
    return np.stack([right, up, -forward], axis=1)


def random_camera(
    rng: np.random.Generator,
    height: int,
    width: int,
    rotation: np.ndarray,
    position: np.ndarray,
    fov_deg: tuple[float, float],
    center_jitter: float,
) -> Camera:
    """A pinhole camera with a random horizontal field of view, a slightly non-square pixel and a jittered
    principal point; the draws keep one order, so a scene seed renders the same scene."""
    fov_x = rng.uniform(math.radians(fov_deg[0]), math.radians(fov_deg[1]))
    fx = (width / 2.0) / math.tan(fov_x / 2.0)
    return Camera(
        height=height,
        width=width,
        fx=fx,
        fy=fx * rng.uniform(0.97, 1.03),
        cx=(width - 1) / 2.0 + rng.uniform(-center_jitter, center_jitter) * width,
        cy=(height - 1) / 2.0 + rng.uniform(-center_jitter, center_jitter) * height,
        rotation=rotation,
        position=position,
    )


def _rotation_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def random_texture(rng: np.random.Generator) -> Texture:
    kind: TextureKind = ("checker", "stripes", "noise")[int(rng.integers(3))]
    base = rng.uniform(0.15, 0.95, size=3)
    other = np.clip(base * rng.uniform(0.3, 0.8) + rng.uniform(-0.1, 0.1, size=3), 0.02, 1.0)
    return Texture(
        kind=kind,
        color_a=base,
        color_b=other,
        period=float(rng.uniform(0.1, 0.6)),
        angle=float(rng.uniform(0.0, math.pi)),
        lattice=rng.random((16, 16)) if kind == "noise" else None,
    )


def _plane(point: tuple[float, float, float], normal: tuple[float, float, float], rng: np.random.Generator) -> Plane:
    n = np.asarray(normal, dtype=np.float64)
    helper = np.array([1.0, 0.0, 0.0]) if abs(n[0]) < 0.9 else np.array([0.0, 0.0, 1.0])
    axis_u = np.cross(n, helper)
    return Plane(np.asarray(point, dtype=np.float64), n, axis_u / np.linalg.norm(axis_u), random_texture(rng))


def _plane_with(point: tuple[float, float, float], normal: tuple[float, float, float], texture: Texture) -> Plane:
    n = np.asarray(normal, dtype=np.float64)
    helper = np.array([1.0, 0.0, 0.0]) if abs(n[0]) < 0.9 else np.array([0.0, 0.0, 1.0])
    axis_u = np.cross(n, helper)
    return Plane(np.asarray(point, dtype=np.float64), n, axis_u / np.linalg.norm(axis_u), texture)


def _clear_of(position: np.ndarray, prim: Primitive, margin: float) -> bool:
    """True when `position` is at least `margin` outside the primitive (planes are handled by the room bounds)."""
    if isinstance(prim, Sphere):
        return float(np.linalg.norm(position - prim.center)) > prim.radius + margin
    if isinstance(prim, Box):
        local = np.abs(prim.rotation.T @ (position - prim.center))
        return bool(np.any(local > prim.half_extents + margin))
    return True


def random_scene_and_camera(rng: np.random.Generator, height: int, width: int) -> tuple[Scene, Camera]:
    """A room (70%) or an open floor with sky (30%), 2-7 objects, and a camera inside it looking at them."""
    half_x, half_z = rng.uniform(2.0, 6.0), rng.uniform(2.0, 6.0)
    open_air = rng.random() < 0.3
    room_h = rng.uniform(2.4, 4.0)
    prims: list[Primitive] = [_plane((0.0, 0.0, 0.0), (0.0, 1.0, 0.0), rng)]
    if open_air:
        if rng.random() < 0.7:  # a back wall, so open scenes still have vertical structure
            prims.append(_plane((0.0, 0.0, -half_z), (0.0, 0.0, 1.0), rng))
    else:
        prims.append(_plane((0.0, room_h, 0.0), (0.0, -1.0, 0.0), rng))
        for point, normal in (
            ((-half_x, 0.0, 0.0), (1.0, 0.0, 0.0)),
            ((half_x, 0.0, 0.0), (-1.0, 0.0, 0.0)),
            ((0.0, 0.0, -half_z), (0.0, 0.0, 1.0)),
            ((0.0, 0.0, half_z), (0.0, 0.0, -1.0)),
        ):
            prims.append(_plane(point, normal, rng))

    cam_pos = np.array(
        [rng.uniform(-0.5, 0.5) * half_x, rng.uniform(0.8, 2.0), rng.uniform(0.2, 0.8) * half_z], dtype=np.float64
    )
    yaw = rng.uniform(-0.6, 0.6)
    look = np.array([math.sin(yaw), 0.0, -math.cos(yaw)])

    n_objects = int(rng.integers(2, 8))
    tries = 0
    while n_objects > 0 and tries < 200:
        tries += 1
        dist = rng.uniform(1.0, 1.6 * half_z)
        side = rng.uniform(-0.7, 0.7) * dist
        base = cam_pos + look * dist + np.array([look[2], 0.0, -look[0]]) * side
        if abs(base[0]) > half_x - 0.3 or abs(base[2]) > half_z - 0.3:
            continue
        prim: Primitive
        if rng.random() < 0.5:
            half = rng.uniform(0.15, 0.7, size=3)
            if rng.random() < 0.7:  # resting on the floor, turned about the vertical
                rotation = _rotation_y(float(rng.uniform(0.0, math.pi))) if rng.random() < 0.6 else np.eye(3)
                center = np.array([base[0], half[1], base[2]])
            else:  # floating, any orientation
                rotation = _random_rotation(rng)
                center = np.array([base[0], rng.uniform(0.8, 1.8), base[2]])
            prim = Box(center, half, rotation, random_texture(rng))
        else:
            radius = rng.uniform(0.15, 0.7)
            lift = radius if rng.random() < 0.6 else rng.uniform(radius + 0.2, radius + 1.2)
            prim = Sphere(np.array([base[0], lift, base[2]]), float(radius), random_texture(rng))
        if _clear_of(cam_pos, prim, margin=0.4):
            prims.append(prim)
            n_objects -= 1

    target = cam_pos + look * 3.0 + np.array([0.0, rng.uniform(-1.8, 0.4), 0.0])
    rotation = look_at(cam_pos, target, roll=float(rng.uniform(-0.08, 0.08)))
    camera = random_camera(rng, height, width, rotation, cam_pos, fov_deg=(45.0, 75.0), center_jitter=0.03)

    elevation = rng.uniform(math.radians(30.0), math.radians(80.0))
    azimuth = rng.uniform(0.0, 2.0 * math.pi)
    light = Light(
        direction=np.array(
            [math.cos(elevation) * math.cos(azimuth), math.sin(elevation), math.cos(elevation) * math.sin(azimuth)]
        ),
        color=np.clip(1.0 + rng.uniform(-0.1, 0.1, size=3), 0.0, None),
        ambient=float(rng.uniform(0.2, 0.45)),
    )
    return Scene(prims, light), camera


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (all in [0, 1]) as RGB: palettes drawn by hue reach saturated and dark colours too."""
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def varied_texture(rng: np.random.Generator) -> Texture:
    """A texture of the "varied" scenes: five kinds, hue-sampled colours, contrast from faint to strong."""
    kind: TextureKind = ("checker", "stripes", "noise", "solid", "waves")[int(rng.integers(5))]
    base = _hsv(float(rng.random()), float(rng.uniform(0.0, 0.9)), float(rng.uniform(0.2, 1.0)))
    if rng.random() < 0.5:  # a darker shade of the same colour
        other = base * rng.uniform(0.2, 0.8)
    else:  # another hue
        other = _hsv(float(rng.random()), float(rng.uniform(0.0, 0.9)), float(rng.uniform(0.1, 1.0)))
    return Texture(
        kind=kind,
        color_a=np.clip(base, 0.02, 1.0),
        color_b=np.clip(other, 0.02, 1.0),
        period=float(np.exp(rng.uniform(math.log(0.05), math.log(1.5)))),
        angle=float(rng.uniform(0.0, math.pi)),
        lattice=rng.random((16, 16)) if kind == "noise" else None,
    )


def _varied_object(
    rng: np.random.Generator, base: np.ndarray, half_x: float, half_z: float, below: Primitive | None
) -> Primitive:
    """One box or sphere near `base` (x, z on the floor); on top of `below` when given (stacked)."""
    floor_y = 0.0
    if below is not None:
        floor_y = (below.center[1] + below.half_extents[1]) if isinstance(below, Box) else 0.0
        base = np.array([below.center[0], 0.0, below.center[2]]) + np.array([rng.uniform(-0.1, 0.1), 0, 0])
    shape = rng.random()
    if shape < 0.55:
        half = rng.uniform(0.08, 0.9, size=3)
        if rng.random() < 0.25:  # pillars and slabs (tables, shelves, posts)
            half[int(rng.integers(3))] *= rng.uniform(2.0, 3.5)
        half = np.minimum(half, [half_x * 0.6, 1.6, half_z * 0.6])
        if below is not None or rng.random() < 0.75:  # resting, turned about the vertical
            rotation = _rotation_y(float(rng.uniform(0.0, math.pi))) if rng.random() < 0.7 else np.eye(3)
            center = np.array([base[0], floor_y + half[1], base[2]])
        else:  # floating, any orientation
            rotation = _random_rotation(rng)
            center = np.array([base[0], rng.uniform(0.6, 2.2), base[2]])
        return Box(center, half, rotation, varied_texture(rng))
    radius = rng.uniform(0.1, 0.9)
    resting = below is not None or rng.random() < 0.65
    lift = floor_y + radius if resting else rng.uniform(radius + 0.2, radius + 1.5)
    return Sphere(np.array([base[0], lift, base[2]]), float(radius), varied_texture(rng))


def _varied_scene_and_camera(rng: np.random.Generator, height: int, width: int) -> tuple[Scene, Camera]:
    """The "varied" distribution: rooms of any proportion (or open floors), 2-11 objects of wider sizes with
    pillars, slabs and stacks, five texture kinds in hue-sampled palettes, a tinted key light plus an optional
    fill light, optional fog, and cameras from floor to ceiling height with wider yaw, pitch, roll and field of
    view (sometimes close to an object)."""
    half_x, half_z = rng.uniform(1.5, 8.0), rng.uniform(1.5, 8.0)
    open_air = rng.random() < 0.25
    room_h = rng.uniform(2.2, 5.0)
    prims: list[Primitive] = [_plane_with((0.0, 0.0, 0.0), (0.0, 1.0, 0.0), varied_texture(rng))]
    if open_air:
        if rng.random() < 0.7:
            prims.append(_plane_with((0.0, 0.0, -half_z), (0.0, 0.0, 1.0), varied_texture(rng)))
    else:
        prims.append(_plane_with((0.0, room_h, 0.0), (0.0, -1.0, 0.0), varied_texture(rng)))
        same_walls = rng.random() < 0.5  # one wallpaper for the whole room, or one per wall
        wall_tex = varied_texture(rng)
        for point, normal in (
            ((-half_x, 0.0, 0.0), (1.0, 0.0, 0.0)),
            ((half_x, 0.0, 0.0), (-1.0, 0.0, 0.0)),
            ((0.0, 0.0, -half_z), (0.0, 0.0, 1.0)),
            ((0.0, 0.0, half_z), (0.0, 0.0, -1.0)),
        ):
            prims.append(_plane_with(point, normal, wall_tex if same_walls else varied_texture(rng)))

    ceiling = room_h if not open_air else 4.0
    cam_pos = np.array(
        [rng.uniform(-0.6, 0.6) * half_x, rng.uniform(0.3, min(2.8, ceiling - 0.3)), rng.uniform(0.0, 0.85) * half_z],
        dtype=np.float64,
    )
    yaw = rng.uniform(-1.2, 1.2)
    look = np.array([math.sin(yaw), 0.0, -math.cos(yaw)])

    n_objects = int(rng.integers(2, 12))
    close_up = rng.random() < 0.2
    tries = 0
    placed: list[Primitive] = []
    while n_objects > 0 and tries < 300:
        tries += 1
        near = 0.7 if close_up and not placed else 1.0
        dist = rng.uniform(near, max(near + 0.5, 1.8 * half_z)) if not (close_up and not placed) else near + 0.5
        side = rng.uniform(-0.8, 0.8) * dist
        base = cam_pos + look * dist + np.array([look[2], 0.0, -look[0]]) * side
        if abs(base[0]) > half_x - 0.3 or abs(base[2]) > half_z - 0.3:
            continue
        below = None
        boxes = [q for q in placed if isinstance(q, Box) and np.allclose(q.rotation[1], [0.0, 1.0, 0.0])]
        if boxes and rng.random() < 0.2:
            below = boxes[int(rng.integers(len(boxes)))]
        prim = _varied_object(rng, base, half_x, half_z, below)
        if _clear_of(cam_pos, prim, margin=0.3):
            placed.append(prim)
            n_objects -= 1
    prims.extend(placed)

    if close_up and placed:
        target = placed[0].center + rng.uniform(-0.2, 0.2, size=3)
        if np.linalg.norm(np.cross(target - cam_pos, WORLD_UP)) < 1e-3:
            target = cam_pos + look * 3.0
    else:
        target = cam_pos + look * 3.0 + np.array([0.0, rng.uniform(-2.5, 1.0), 0.0])
    rotation = look_at(cam_pos, target, roll=float(rng.uniform(-0.2, 0.2)))
    camera = random_camera(rng, height, width, rotation, cam_pos, fov_deg=(35.0, 90.0), center_jitter=0.05)

    def direction(lo_deg: float, hi_deg: float) -> np.ndarray:
        elevation = rng.uniform(math.radians(lo_deg), math.radians(hi_deg))
        azimuth = rng.uniform(0.0, 2.0 * math.pi)
        c = math.cos(elevation)
        return np.array([c * math.cos(azimuth), math.sin(elevation), c * math.sin(azimuth)])

    warmth = rng.uniform(-0.25, 0.25)  # warm (orange) to cold (blue) key light
    key_color = np.clip(np.array([1.0 + warmth, 1.0, 1.0 - warmth]) * rng.uniform(0.7, 1.2), 0.0, None)
    light = Light(direction=direction(15.0, 88.0), color=key_color, ambient=float(rng.uniform(0.1, 0.55)))
    fill = None
    if rng.random() < 0.5:
        fill = Light(direction=direction(-30.0, 60.0), color=rng.uniform(0.05, 0.35, size=3), ambient=0.0)
    fog = float(rng.uniform(0.01, 0.12)) if rng.random() < 0.35 else 0.0
    sky_top = _hsv(float(rng.uniform(0.5, 0.7)), float(rng.uniform(0.2, 0.7)), float(rng.uniform(0.5, 1.0)))
    sky_horizon = np.clip(sky_top + rng.uniform(0.1, 0.4), 0.0, 1.0)
    return (
        Scene(
            prims,
            light,
            sky_top=sky_top,
            sky_horizon=sky_horizon,
            fill=fill,
            fog_density=fog,
            fog_color=np.full(3, rng.uniform(0.5, 0.9)),
        ),
        camera,
    )


def generate(seed: int | tuple[int, ...], height: int, width: int, variety: Variety = "base") -> Rendering:
    """One random scene rendered at `height` x `width`; the same seed (and variety) gives the same arrays, bit for
    bit. `variety` picks the scene distribution ("base" or "varied")."""
    if height < 2 or width < 2:
        raise ValueError(f"image too small: {width} x {height}")
    if variety not in VARIETIES:
        raise ValueError(f"unknown scene variety {variety!r} (one of {', '.join(VARIETIES)})")
    seq = list(seed) if isinstance(seed, tuple) else [seed]
    rng = np.random.default_rng(seq)
    make = random_scene_and_camera if variety == "base" else _varied_scene_and_camera
    scene, camera = make(rng, height, width)
    return render(scene, camera)


def write_scenes(
    out_dir: str | Path,
    n: int,
    height: int,
    width: int,
    seed: int,
    depth_format: folder_format.DepthFormat = "npy",
    normals_format: folder_format.NormalsFormat = "npy",
    variety: Variety = "base",
) -> list[str]:
    """Render `n` scenes into the generic folder format (with masks, normals and dataset.json); returns names.
    Normals are written in the served convention (+x image left), as the folder format says.

    Scene `i` uses the seed `(seed, i)`, so a set can be extended or regenerated piecewise.
    """
    root = Path(out_dir)
    names = []
    for i in range(n):
        name = f"{i:06d}"
        write_rendering(root, name, generate((seed, i), height, width, variety), depth_format, normals_format)
        names.append(name)
    folder_format.write_info(root, folder_format.DatasetInfo(name="synthetic", depth_range=DEPTH_RANGE))
    return names


#: Per-pixel classes of a synthetic scene (`semantic_labels`), in index order; index 0 is the sky.
SEMANTIC_CLASSES: tuple[str, ...] = ("sky", "floor", "ceiling", "wall", "box", "sphere")


def semantic_labels(rendering: Rendering) -> np.ndarray:
    """`[H, W]` uint8 class indices into SEMANTIC_CLASSES: a plane is floor, ceiling or wall by its normal."""
    lookup = np.zeros(len(rendering.scene.primitives) + 1, dtype=np.uint8)  # the last entry is -1: sky
    for k, prim in enumerate(rendering.scene.primitives):
        if isinstance(prim, Plane):
            up = float(prim.normal[1])
            name = "floor" if up > 0.9 else "ceiling" if up < -0.9 else "wall"
        else:
            name = "box" if isinstance(prim, Box) else "sphere"
        lookup[k] = SEMANTIC_CLASSES.index(name)
    return lookup[rendering.primitive.astype(np.int64)]


def write_rendering(
    root: str | Path,
    name: str,
    r: Rendering,
    depth_format: folder_format.DepthFormat = "npy",
    normals_format: folder_format.NormalsFormat = "npy",
) -> None:
    """One rendering as folder-format sample `name`: normals in the served convention (+x image left)."""
    folder_format.write_sample(
        Path(root),
        name,
        rgb=r.rgb,
        depth=r.depth,
        valid=r.valid,
        normals=r.served_normals,
        depth_format=depth_format,
        normals_format=normals_format,
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m models.training.synthetic OUT --count N [--height H --width W --seed S]`: write scenes."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m models.training.synthetic", description=main.__doc__)
    p.add_argument("out", type=Path, help="folder to write (folder format)")
    p.add_argument("--count", type=int, required=True, help="number of scenes")
    p.add_argument("--height", type=int, default=64, help="render height (default 64)")
    p.add_argument("--width", type=int, default=64, help="render width (default 64)")
    p.add_argument("--seed", type=int, default=0, help="scene seed: scene i uses (seed, i)")
    p.add_argument("--variety", choices=VARIETIES, default="base", help="scene distribution (default base)")
    args = p.parse_args(argv)
    write_scenes(args.out, args.count, args.height, args.width, args.seed, variety=args.variety)
    print(f"wrote {args.count} scenes to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
