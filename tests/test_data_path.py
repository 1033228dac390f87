"""The data path around the model at real sizes: the PNG writer, EXR/TIFF, fast JPEG decoding, quantisation on
the runtime's device, HTTP compression, idle dispatch and the pipelined lane (with a simulated device)."""

from __future__ import annotations

import asyncio
import gzip
import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from PIL import Image, ImageOps

from models.colormap import spectral_lut
from models.outputs import Family, PredictionMap, Task
from models.predictors.forms import to_form
from models.spec import ModelSpec
from service import codec
from service.worker.float_maps import decode_exr, decode_tiff, encode_exr, encode_tiff
from service.worker.prepare import decode_for
from tests.conftest import random_image
from tests.service_harness import TEST_RES, read_npy, read_png16, running_service

TinyDir = Callable[[Family, Task], Path]
HD = (1080, 1920)


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 RGB image: smooth colours plus sensor-like noise."""
    return np.round(random_image(h, w, seed) * 255).astype(np.uint8)


def jpeg(arr: np.ndarray, **options: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **{"quality": 90, **options})
    return buf.getvalue()


def smooth_map(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A served-looking [0, 1] map: a smooth field with fine detail, plus exact 0 and 1."""
    m = random_image(h, w, seed)[..., 0].astype(np.float32)
    m[0, 0], m[-1, -1] = 0.0, 1.0
    return m


def unit_normals(h: int, w: int, seed: int = 0) -> np.ndarray:
    v = random_image(h, w, seed) * 2 - 1
    v[..., 2] = np.abs(v[..., 2]) + 0.2
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def idat(data: bytes) -> bytes:
    """The concatenated IDAT payload of a PNG, checking every chunk's CRC on the way."""
    pos, out = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, tag
        if tag == b"IDAT":
            out += body
        pos += 12 + length
    return out


# --------------------------------------------------------------------------- PNG writer


@pytest.mark.parametrize(
    "shape, dtype",
    [((1, 1), np.uint8), ((1, 7), np.uint16), ((5, 1, 3), np.uint8), ((37, 53), np.uint16), ((37, 53, 3), np.uint8)],
)
def test_png_writer_round_trips_every_layout_and_level(shape: tuple[int, ...], dtype: type) -> None:
    rng = np.random.default_rng(1)
    arr = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    for level in range(10):
        data = codec.encode_png(arr, level)
        idat(data)  # every CRC is right
        img = Image.open(io.BytesIO(data))
        img.verify()
        back = np.asarray(Image.open(io.BytesIO(data)))
        assert back.shape == arr.shape and np.array_equal(back, arr), level


def test_png_writer_picks_the_filter_that_fits_the_rows() -> None:
    rows_repeat = np.tile(np.arange(0, 60000, 300, dtype=np.uint16), (50, 1))  # each row equals the last: Up
    cols_repeat = np.ascontiguousarray(rows_repeat.T)  # each row is constant: Sub
    for arr, expected in ((rows_repeat, 2), (cols_repeat, 1)):
        data = codec.encode_png(arr)
        raw = zlib.decompress(idat(data))
        assert raw[0] == expected
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), arr)


def test_png_writer_refuses_what_png_cannot_store() -> None:
    with pytest.raises(ValueError, match="uint8 or uint16"):
        codec.encode_png(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="shape"):
        codec.encode_png(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="0-9"):
        codec.encode_png(np.zeros((4, 4), np.uint8), 10)


def test_1080p_answers_decode_with_pillow_to_the_exact_quantised_values() -> None:
    depth = smooth_map(*HD, seed=2)
    stored = np.asarray(Image.open(io.BytesIO(codec.encode_png16(depth))))
    assert stored.shape == HD
    assert np.array_equal(stored, codec.quantize_unit(depth))  # round(v * 65535) in float32, as the device does
    exact = np.round(depth.astype(np.float64) * 65535).astype(np.int64)
    assert np.abs(stored.astype(np.int64) - exact).max() <= 1
    normals = unit_normals(*HD, seed=3)
    rgb = np.asarray(Image.open(io.BytesIO(codec.encode_normals_png(normals))))
    expected = np.round((normals.astype(np.float64) + 1) / 2 * 255).astype(np.uint8)
    assert rgb.shape == (*HD, 3) and np.abs(rgb.astype(int) - expected).max() <= 1  # float32 vs float64 rounding
    assert np.array_equal(rgb, codec.quantize_normals(normals))


# --------------------------------------------------------------------------- EXR, TIFF


def test_exr_is_half_float_y_or_rgb_and_round_trips() -> None:
    import OpenEXR

    depth = smooth_map(33, 47, seed=4)
    data = encode_exr(depth)
    channels = OpenEXR.File(io.BytesIO(data)).channels()
    assert set(channels) == {"Y"} and channels["Y"].pixels.dtype == np.float16
    back = decode_exr(data)
    assert np.array_equal(back, depth.astype(np.float16))  # ZIP is lossless on the halves
    assert np.abs(back.astype(np.float32) - depth).max() <= 2**-11  # half precision on [0, 1]
    normals = unit_normals(20, 30, seed=5)
    back = decode_exr(encode_exr(normals))
    assert back.shape == (20, 30, 3) and np.array_equal(back, normals.astype(np.float16))


@pytest.mark.parametrize("compression", ["deflate", "zstd", "none"])
def test_tiff_is_float32_and_round_trips_exactly(compression: codec.TiffCompression) -> None:
    import tifffile

    for arr in (smooth_map(33, 47, seed=6), unit_normals(20, 30, seed=7)):
        data = encode_tiff(arr, compression)
        page = tifffile.TiffFile(io.BytesIO(data)).pages[0]
        assert page.dtype == np.float32
        assert page.compression.name == {"deflate": "ADOBE_DEFLATE", "zstd": "ZSTD", "none": "NONE"}[compression]
        back = decode_tiff(data)
        assert back.dtype == np.float32 and np.array_equal(back, arr)


# --------------------------------------------------------------------------- JPEG decoding


@pytest.mark.parametrize(
    "options", [{}, {"subsampling": 0}, {"progressive": True}, {"subsampling": 2, "quality": 60}], ids=str
)
def test_fast_jpeg_decode_equals_pillow(options: dict[str, object]) -> None:
    data = jpeg(photo(61, 97, seed=8), **options)
    decoded = codec.decode_pixels(data)
    assert decoded.pixels.dtype == np.uint8 and not decoded.reduced
    assert np.array_equal(decoded.pixels, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    gray = jpeg(photo(40, 50, seed=9)[..., 0])
    assert np.array_equal(codec.decode_pixels(gray).pixels, np.asarray(Image.open(io.BytesIO(gray)).convert("RGB")))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(photo(30, 44, seed=orientation), exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    decoded = codec.decode_pixels(data)
    assert decoded.size == expected.shape[:2] == (codec.read_header(data).height, codec.read_header(data).width)
    assert np.array_equal(decoded.pixels, expected)


def test_large_jpeg_is_decoded_at_a_reduced_scale_never_below_the_minimum() -> None:
    data = jpeg(photo(*HD, seed=10))
    full = codec.decode_pixels(data)
    assert full.pixels.shape == (*HD, 3) and not full.reduced
    for min_size, shape in (((128, 228), (135, 240)), ((300, 500), (270 * 2, 480 * 2)), ((600, 1000), HD)):
        decoded = codec.decode_pixels(data, min_size=min_size)
        assert decoded.size == HD and decoded.pixels.shape[:2] == shape, (min_size, decoded.pixels.shape)
        assert decoded.pixels.shape[0] >= min_size[0] and decoded.pixels.shape[1] >= min_size[1]
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (shape[1], shape[0]))  # Pillow's own reduced decode: the same libjpeg scaling
        assert np.abs(decoded.pixels.astype(int) - np.asarray(img.convert("RGB")).astype(int)).max() <= 1
    cmyk = io.BytesIO()
    Image.fromarray(photo(40, 60, seed=11)).convert("CMYK").save(cmyk, format="JPEG")
    expected = np.asarray(Image.open(io.BytesIO(cmyk.getvalue())).convert("RGB"))
    assert np.array_equal(codec.decode_pixels(cmyk.getvalue()).pixels, expected)  # Pillow's path


def test_draft_decode_changes_the_map_only_slightly(tiny_model) -> None:
    """What `jpeg_draft` costs in accuracy: the map of a 1080p JPEG at processing_res 64, decoded at 1/8 scale
    (twice the processing size) vs at full size, differs by a small fraction of its range."""
    model = tiny_model("lotus-d", "depth")
    data = jpeg(photo(*HD, seed=12))
    reduced, geometry = decode_for(model, data, TEST_RES, jpeg_draft=True)
    full, full_geometry = decode_for(model, data, TEST_RES, jpeg_draft=False)
    assert reduced.shape[:2] == (135, 240) and full.shape[:2] == HD and geometry == full_geometry
    from models.inference import BatchItem

    a, b = model.predict_items([BatchItem(reduced, geometry), BatchItem(full, full_geometry)])
    assert a.array.shape == HD
    assert float(np.abs(a.array - b.array).mean()) < 0.02


# --------------------------------------------------------------------------- quantisation on the device


def test_device_forms_equal_the_cpu_encoders(tiny_model) -> None:
    _check_forms(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_forms_on_cuda_equal_the_cpu_encoders() -> None:
    _check_forms(torch.device("cuda"), lsb=1)


def _check_forms(device: torch.device, lsb: int = 0) -> None:
    depth = smooth_map(45, 71, seed=13)
    depth[1, :6] = [-0.5, 1.5, 0.5 / 65535, 1.5 / 65535, 2.5 / 65535, np.nan]  # clipping, halves, NaN
    depth = np.nan_to_num(depth)
    normals = unit_normals(45, 71, seed=14)
    t_depth = torch.from_numpy(depth)[None].to(device)
    t_normals = torch.from_numpy(normals).permute(2, 0, 1).to(device)

    def close(a: torch.Tensor, b: np.ndarray) -> None:
        got = a.cpu().numpy()
        assert got.dtype == b.dtype and got.shape == b.shape
        assert np.abs(got.astype(np.int64) - b.astype(np.int64)).max() <= lsb

    close(to_form(t_depth, "depth", "quantized"), codec.quantize_unit(depth))
    close(to_form(t_normals, "normals", "quantized"), codec.quantize_normals(normals))
    close(to_form(t_depth, "depth", "color"), codec.colorize(depth))
    close(to_form(t_depth, "disparity", "color"), codec.colorize(depth, near_is_high=True))
    close(to_form(t_normals, "normals", "color"), codec.quantize_normals(normals))
    assert np.array_equal(to_form(t_depth, "depth", "float16").cpu().numpy(), depth.astype(np.float16))
    assert np.array_equal(to_form(t_normals, "normals", "float32").cpu().numpy(), normals)
    assert np.array_equal(spectral_lut()[0], codec.spectral(np.array(0.0)))


@pytest.mark.parametrize(("family", "task"), [("lotus-g", "depth"), ("lotus-d", "normals")])
def test_a_map_quantised_on_the_device_encodes_to_the_same_bytes(tiny_model, family: Family, task: Task) -> None:
    model = tiny_model(family, task)
    image = photo(97, 131, seed=15)
    as_float = model.predict([image], processing_res=TEST_RES)[0]
    quantized = model.predict([image], processing_res=TEST_RES, form="quantized")[0]
    colour = model.predict([image], processing_res=TEST_RES, form="color")[0]
    assert quantized.array.dtype == (np.uint8 if task == "normals" else np.uint16)
    assert codec.encode_map_png(quantized) == codec.encode_map_png(as_float)
    assert codec.encode_color_png(colour) == codec.encode_color_png(as_float)
    pred = PredictionMap(as_float.array, as_float.kind, "m", as_float.processing_size)
    np.testing.assert_allclose(quantized.float_array(), pred.array, atol=1 / 255 if task == "normals" else 1e-5)


# --------------------------------------------------------------------------- the served path


def simulated(tiny_dir: TinyDir, batch_ms: float, **extra: object) -> list[ModelSpec]:
    """A model whose device sleeps `batch_ms` per batch: the data path around it is what is measured."""
    source = str(tiny_dir("lotus-d", "depth"))
    return [
        ModelSpec(
            id="sim", source=source, processing_res=TEST_RES, backend="simulated", simulated_batch_ms=batch_ms, **extra
        )
    ]


@pytest.mark.anyio
async def test_real_size_answers_in_every_format(tiny_dir: TinyDir, tiny_model) -> None:
    data = jpeg(photo(*HD, seed=16))
    model = tiny_model("lotus-d", "depth")
    pixels, geometry = decode_for(model, data, TEST_RES)
    from models.inference import BatchItem

    expected = model.predict_items([BatchItem(pixels, geometry)])[0].array
    async with running_service(tiny_dir, models=[("lotus-d", "depth")]) as h:

        async def get(query: str, **headers: str):
            r = await h.client.post(
                f"/v1/depth?{query}", content=data, headers={"content-type": "image/jpeg", **headers}
            )
            assert r.status_code == 200, r.text
            return r

        png = await get("format=png")
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.content))), codec.quantize_unit(expected))
        timing = png.headers["server-timing"]
        for stage in ("decode", "queue", "preprocess", "compute", "postprocess", "encode", "total"):
            assert f"{stage};dur=" in timing, timing
        assert np.array_equal(read_npy((await get("format=npy")).content), expected)
        exr = await get("format=exr")
        assert exr.headers["content-type"] == "image/x-exr"
        assert np.array_equal(decode_exr(exr.content), expected.astype(np.float16))
        tiff = await get("", accept="image/tiff")
        assert tiff.headers["content-type"] == "image/tiff"
        assert np.array_equal(decode_tiff(tiff.content), expected)
        colour = await get("format=color")
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(colour.content))), codec.colorize(expected))


@pytest.mark.anyio
async def test_npy_and_json_answers_are_compressed_on_request_and_png_never(tiny_dir: TinyDir) -> None:
    image = jpeg(photo(120, 160, seed=17))
    async with running_service(tiny_dir, models=[("lotus-d", "depth")]) as h:

        async def raw(query: str, encoding: str | None):
            headers = {"content-type": "image/jpeg", "accept-encoding": encoding or "identity"}
            async with h.client.stream("POST", f"/v1/depth?{query}", content=image, headers=headers) as r:
                assert r.status_code == 200
                return r.headers, b"".join([chunk async for chunk in r.aiter_raw()])

        plain_headers, plain = await raw("format=npy", None)
        assert "content-encoding" not in plain_headers
        headers, body = await raw("format=npy", "zstd, gzip")
        assert headers["content-encoding"] == "zstd" and "accept-encoding" in headers["vary"].lower()
        assert zstandard.ZstdDecompressor().decompressobj().decompress(body) == plain and len(body) < len(plain)
        headers, body = await raw("format=npy", "gzip")
        assert headers["content-encoding"] == "gzip" and gzip.decompress(body) == plain
        headers, body = await raw("format=json", "gzip")
        assert headers["content-encoding"] == "gzip" and gzip.decompress(body).startswith(b"{")
        headers, _ = await raw("format=png", "zstd, gzip")
        assert "content-encoding" not in headers  # already compressed: never again


@pytest.mark.anyio
async def test_an_idle_lane_does_not_wait_for_a_batch_and_a_busy_one_still_batches(tiny_dir: TinyDir) -> None:
    delay_ms = 3000.0
    async with running_service(tiny_dir, models=[("lotus-d", "depth")], max_queue_delay_ms=delay_ms) as h:
        stats = h.worker.stats
        r = await h.client.post(
            "/v1/depth?format=npy", content=jpeg(photo(64, 64)), headers={"content-type": "image/jpeg"}
        )
        assert r.status_code == 200
        timings = dict(part.split(";dur=") for part in r.headers["server-timing"].split(", "))
        # The worker started the batch as soon as the job was decoded: nowhere near the 3 s window.
        assert float(timings["queue"]) - float(timings["decode"]) < delay_ms / 3, timings
        assert stats.batch_sizes("lotus-d-depth")[-1] == 1
        images = [jpeg(photo(64, 64, seed=i)) for i in range(16)]
        replies = await asyncio.gather(
            *(
                h.client.post("/v1/depth?format=npy", content=im, headers={"content-type": "image/jpeg"})
                for im in images
            )
        )
        assert all(r.status_code == 200 for r in replies)
        sizes = stats.batch_sizes("lotus-d-depth")[1:]
        assert sum(sizes) == 16 and max(sizes) > 1, sizes


@pytest.mark.anyio
async def test_the_lane_decodes_the_next_batch_while_the_device_computes(tiny_dir: TinyDir) -> None:
    batch_ms = 400.0
    specs = simulated(tiny_dir, batch_ms, max_batch_size=4, max_queue_delay_ms=1000.0)
    images = [jpeg(photo(*HD, seed=20 + i)) for i in range(12)]
    async with running_service(tiny_dir, specs=specs) as h:
        replies = await asyncio.gather(
            *(
                h.client.post("/v1/depth?format=png", content=im, headers={"content-type": "image/jpeg"})
                for im in images
            )
        )
        for r in replies:
            assert r.status_code == 200, r.text
            assert read_png16(r.content).shape == HD
        batches = list(h.worker.stats.batches["sim"])[-3:]
        assert [b.size for b in batches] == [4, 4, 4]
        # Batches 2 and 3 were read and decoded while the one before them computed: the device did not wait.
        for b in batches[1:]:
            assert b.idle_s < batch_ms / 1000 / 4, batches


@pytest.mark.anyio
async def test_a_job_that_expires_while_its_batch_computes_is_not_encoded(tiny_dir: TinyDir) -> None:
    async with running_service(tiny_dir, specs=simulated(tiny_dir, 600.0)) as h:
        stats = h.worker.stats
        r = await h.client.post(
            "/v1/depth?timeout_ms=200", content=jpeg(photo(64, 64)), headers={"content-type": "image/jpeg"}
        )
        assert r.status_code == 504
        for _ in range(200):
            if stats.outcomes[("sim", "dropped")] + stats.outcomes[("sim", "expired")]:
                break
            await asyncio.sleep(0.01)
        assert stats.forwards["sim"] == 1  # it was computed (the deadline passed during the batch) ...
        assert stats.outcomes[("sim", "ok")] == 0  # ... but never encoded nor answered
        assert stats.outcomes[("sim", "dropped")] + stats.outcomes[("sim", "expired")] == 1
