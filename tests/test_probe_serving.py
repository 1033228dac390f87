"""Probes served beyond the embedded REST path: gRPC streams of segmentation frames."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from PIL import Image

from models.spec import load_spec_file
from service.grpc.stubs import dense_pb2 as pb
from service.grpc.stubs.dense_pb2_grpc import DenseServiceStub
from tests.service_harness import read_npy, running_service
from tests.test_probes import DEMO_SPEC, _image, trained_probe  # noqa: F401  (trained_probe: a fixture)

pytestmark = pytest.mark.anyio


async def test_stream_of_segment_frames_equals_unary_answers(trained_probe, tiny_dir) -> None:  # noqa: F811
    """Frames of mixed sizes (several batches of one shape each), a depth frame among them on the same base
    queue, the stream's steps_auto on: every segment answer, in frame order, equals the unary gRPC Predict and the
    REST /v1/segment map."""
    folder, _ = trained_probe
    spec = load_spec_file(DEMO_SPEC)
    sizes = [(48, 64), (64, 48), (48, 64), (40, 40), (48, 64), (64, 48)]
    images = [_image(h, w, seed=20 + i)[0] for i, (h, w) in enumerate(sizes)]
    settings = {"grpc_enabled": True, "grpc_port": 0, "max_queue_delay_ms": 30}
    async with running_service(tiny_dir, specs=[spec], probes=[str(folder)], **settings) as h:  # noqa: SIM117
        async with grpc.aio.insecure_channel(f"127.0.0.1:{h.app.state.grpc.port}") as channel:
            stub = DenseServiceStub(channel)

            async def frames() -> AsyncIterator[pb.StreamRequest]:
                yield pb.StreamRequest(config=pb.StreamConfig(max_in_flight=8, steps_auto=True))
                for i, image in enumerate(images):
                    yield pb.StreamRequest(
                        frame=pb.PredictRequest(encoded=image, frame_id=i, task=pb.TASK_SEGMENT, model="rooms-ci")
                    )
                    if i == 2:  # the base model's own task on the same queue, between probe frames
                        yield pb.StreamRequest(frame=pb.PredictRequest(encoded=image, frame_id=100))
                yield pb.StreamRequest(
                    frame=pb.PredictRequest(
                        encoded=images[0], frame_id=7, task=pb.TASK_SEGMENT, encoding=pb.OUTPUT_ENCODING_NPY
                    )
                )

            replies = [r async for r in stub.StreamPredict(frames())]
            assert [r.frame_id for r in replies] == [0, 1, 2, 100, 3, 4, 5, 7]
            assert all(r.status == pb.FRAME_STATUS_OK for r in replies), [r.error_message for r in replies]
            by_id = {r.frame_id: r for r in replies}
            assert by_id[100].kind == "disparity" and by_id[100].model == "lotus-d-synthetic-demo"
            for i, image in enumerate(images):
                streamed = by_id[i]
                assert streamed.kind == "segmentation" and streamed.model == "rooms-ci"
                assert streamed.encoding == pb.OUTPUT_ENCODING_PNG16 and tuple(streamed.shape) == sizes[i]
                unary = await stub.Predict(pb.PredictRequest(encoded=image, task=pb.TASK_SEGMENT))
                rest = await h.client.post("/v1/segment?format=npy", files={"image": ("f.png", image, "image/png")})
                labels = np.asarray(Image.open(io.BytesIO(streamed.data)))
                assert np.array_equal(labels, np.asarray(Image.open(io.BytesIO(unary.data))))
                assert np.array_equal(labels, read_npy(rest.content))
                assert dict(streamed.class_pixels) == dict(unary.class_pixels)
                assert list(streamed.classes) == list(unary.classes)
            assert np.array_equal(read_npy(by_id[7].data), np.asarray(Image.open(io.BytesIO(by_id[0].data))))
            assert max(h.worker.stats.batch_sizes("lotus-d-synthetic-demo")) > 1  # frames did batch
