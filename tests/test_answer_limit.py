"""An answer larger than `max_answer_bytes` is refused before it is enqueued (413 / INVALID_ARGUMENT naming the
limit and what to change): every answer passes through the queue's memory, so its size is bounded up front."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from service.grpc.stubs import dense_pb2 as pb
from service.grpc.stubs.dense_pb2_grpc import DenseServiceStub
from tests.service_harness import png_bytes, running_service

pytestmark = pytest.mark.anyio
MIB = 2**20


def big_png(width: int, height: int) -> bytes:
    """A real PNG of that size (flat, so it is small on the wire; the limit is about the answer)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


async def test_an_answer_over_the_limit_is_refused_with_what_to_change(tiny_dir) -> None:
    image = png_bytes(600, 500)  # 500 wide, 600 high; depth as NPY: 500 x 600 x 4 B = 1.14 MiB; as PNG16 0.57 MiB
    async with running_service(tiny_dir, models=[("lotus-d", "depth")], max_answer_bytes=MIB) as h:
        r = await h.client.post("/v1/depth?format=npy", content=image, headers={"content-type": "image/png"})
        assert r.status_code == 413, r.text
        assert r.headers["content-type"] == "application/problem+json"
        detail = r.json()["detail"]
        assert "max_answer_bytes" in detail and "500 x 600" in detail and "png" in detail, detail
        assert h.worker.stats.forwards["lotus-d-depth"] == 0  # refused before the queue
        # What the message suggests is accepted: a 16-bit PNG, or the map at the processing size.
        for query in ("format=png", "format=npy&match_input_resolution=false"):
            ok = await h.client.post(f"/v1/depth?{query}", content=image, headers={"content-type": "image/png"})
            assert ok.status_code == 200, (query, ok.text)


async def test_grpc_refuses_the_same_answer_with_the_same_reason(tiny_dir) -> None:
    async with (
        running_service(
            tiny_dir, models=[("lotus-d", "depth")], max_answer_bytes=MIB, grpc_enabled=True, grpc_port=0
        ) as h,
        grpc.aio.insecure_channel(f"127.0.0.1:{h.app.state.grpc.port}") as channel,
    ):
        stub = DenseServiceStub(channel)
        raw = pb.RawImage(height=500, width=600, data=bytes(600 * 500 * 3))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(pb.PredictRequest(raw=raw, encoding=pb.OUTPUT_ENCODING_RAW_FLOAT32))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_answer_bytes" in (err.value.details() or "")
        ok = await stub.Predict(pb.PredictRequest(raw=raw, encoding=pb.OUTPUT_ENCODING_RAW_FLOAT16))
        assert ok.status == pb.FRAME_STATUS_OK and len(ok.data) == 600 * 500 * 2


async def test_default_limit_passes_4k_normals_and_refuses_40_megapixel_normals(tiny_dir) -> None:
    """At real sizes on default settings: a 4K normals NPY (94.9 MiB) is served, a 40 MP one (458 MiB) is not."""
    async with running_service(tiny_dir, models=[("lotus-g", "normals")]) as h:
        huge = big_png(7680, 5200)  # 39.9 MP, under max_pixels
        r = await h.client.post("/v1/normals?format=npy", content=huge, headers={"content-type": "image/png"})
        assert r.status_code == 413 and "max_answer_bytes" in r.json()["detail"], r.text
        r = await h.client.post(
            "/v1/normals?format=npy", content=big_png(3840, 2160), headers={"content-type": "image/png"}
        )
        assert r.status_code == 200, r.text
        assert len(r.content) > 94 * MIB
