"""The Python client (`clients/python`, `dense_serve_client`) against a real `dense-serve serve` process: every
method and input type, bitwise equality with the raw REST answer, typed errors per problem status, retries
with one Idempotency-Key (computed once), `predict_many` order and concurrency, async parity, and the gRPC
stream helper. The client is imported as a user would: without torch and without the `service` package."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from dense_serve_client import (
    APIError,
    AsyncClient,
    Client,
    DeadlineExceeded,
    InvalidParameter,
    ModelNotFound,
    PayloadTooLarge,
    Prediction,
    QueueFull,
    RetryPolicy,
    StreamClient,
    TaskNotServed,
    TransportError,
    Unauthorized,
    UncertaintyPrediction,
    UnsupportedMedia,
)
from dense_serve_client.errors import error_class
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from models.outputs import Family, Task
from service.errors import ERRORS
from tests.conftest import REPO, SAMPLE
from tests.redis_server import free_port

KEY = "client-test-key"
SLOW_MS = 400
MAX_PIXELS = 2_000_000
TinyDir = Callable[[Family, Task], Path]


class Recorder(httpx.HTTPTransport):
    """The real HTTP transport, noting each exchange (path, Idempotency-Key, status) and the most requests
    it ever had in flight at once."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.exchanges: list[tuple[str, str | None, int]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = super().handle_request(request)
        except httpx.TransportError:
            with self.lock:
                self.exchanges.append((request.url.path, request.headers.get("idempotency-key"), 0))
            raise
        finally:
            with self.lock:
                self.in_flight -= 1
        with self.lock:
            self.exchanges.append((request.url.path, request.headers.get("idempotency-key"), response.status_code))
        return response


@dataclass
class Server:
    base: str
    grpc: str
    startup: Prediction | None = None
    startup_exchanges: list[tuple[str, str | None, int]] = field(default_factory=list)

    def client(self, **kwargs: object) -> Client:
        return Client(self.base, api_key=KEY, **kwargs)  # type: ignore[arg-type]

    def settled_jobs_ok(self, model: str) -> float:
        """Jobs done, once no earlier test's job is still running (the count holds for three batches)."""
        last, since = self.jobs_ok(model), time.monotonic()
        while time.monotonic() - since < 3 * SLOW_MS / 1000:
            time.sleep(0.1)
            if (now := self.jobs_ok(model)) != last:
                last, since = now, time.monotonic()
        return last

    def jobs_ok(self, model: str) -> float:
        text = httpx.get(f"{self.base}/metrics", timeout=10).text
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "dense_jobs_total" and s.labels.get("model") == model and s.labels.get("status") == "ok"
        )


@pytest.fixture(scope="module")
def server(tiny_dir: TinyDir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Tiny Lotus-G depth and normals and a tiny Marigold depth at 64 px, and `slow`: a simulated device (400 ms
    a batch of up to 4).
    Its first prediction is sent while the models still load: the client retries the 503s until ready."""
    root = tmp_path_factory.mktemp("client-models")
    specs: list[str] = []
    for task in ("depth", "normals"):
        (root / f"g-{task}.toml").write_text(
            f'id = "g-{task}"\nsource = "{tiny_dir("lotus-g", task)}"\nprocessing_res = 64\n'
        )
        specs += ["--model", str(root / f"g-{task}.toml")]
    (root / "slow.toml").write_text(
        f'id = "slow"\nsource = "{tiny_dir("lotus-d", "depth")}"\nbackend = "simulated"\n'
        f"simulated_batch_ms = {SLOW_MS}\nmax_batch_size = 4\nprocessing_res = 64\n"
    )
    specs += ["--model", str(root / "slow.toml")]
    marigold = tiny_dir("marigold", "depth")
    (root / "m-depth.toml").write_text(f'id = "m-depth"\nsource = "{marigold}"\nprocessing_res = 64\n')
    specs += ["--model", str(root / "m-depth.toml")]
    port, grpc_port = free_port(), free_port()
    env = {
        **os.environ,
        "DENSE_GRPC_PORT": str(grpc_port),
        "DENSE_LOG_LEVEL": "warning",
        "DENSE_QUEUE_MAX_JOBS": "2",
        "DENSE_MAX_PIXELS": str(MAX_PIXELS),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", *specs, "--port", str(port), "--api-key", KEY],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    srv = Server(f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}")
    try:
        recorder = Recorder()
        patient = RetryPolicy(max_retries=2000, backoff_s=0.05, max_wait_s=0.2)
        with Client(srv.base, api_key=KEY, retry=patient, transport=recorder) as client:
            srv.startup = client.depth(SAMPLE, model="g-depth")
        srv.startup_exchanges = recorder.exchanges
        yield srv
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def raw_post(srv: Server, path: str, image: bytes, **params: str) -> httpx.Response:
    response = httpx.post(
        f"{srv.base}{path}",
        params=params,
        files={"image": ("x.png", image, "image/png")},
        headers={"X-API-Key": KEY, "Accept-Encoding": "identity"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


# ------------------------------------------------------------------------------------------------ packaging


def test_import_pulls_neither_torch_nor_the_server() -> None:
    code = (
        "import sys, dense_serve_client as d; d.StreamClient; d.Client('http://x').close(); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'service', 'models', 'fastapi')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "clients" / "python")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_distribution_ships_its_stubs_and_nothing_of_the_server(tmp_path: Path) -> None:
    """`pip install ./clients/python` installs this wheel: the client, its gRPC stubs and its type marker."""
    import shutil
    import zipfile

    source = shutil.copytree(REPO / "clients" / "python", tmp_path / "src")  # build outside the checkout
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), source],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("dense_serve_client-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"dense_serve_client/_proto/dense_pb2.py", "dense_serve_client/_proto/dense_pb2_grpc.py"} <= names
    assert {"dense_serve_client/client.py", "dense_serve_client/stream.py", "dense_serve_client/py.typed"} <= names
    assert not [n for n in names if n.startswith(("service/", "models/", "tests/"))]
    metadata = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("METADATA"))
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert not [r for r in requires if "torch" in r]
    assert {"Requires-Dist: httpx>=0.28", "Requires-Dist: numpy>=1.26", "Requires-Dist: pillow>=11.3"} <= set(requires)


def test_client_stubs_match_the_proto() -> None:
    """By meaning, whatever grpcio-tools is installed (tests/test_grpc_codegen.py checks the bytes)."""
    from service.grpc.codegen import CLIENT_PACKAGE, CLIENT_STUBS, meaning_differences

    diffs = meaning_differences(CLIENT_STUBS, CLIENT_PACKAGE, descriptor_set=False)
    assert diffs == [], "the client's stubs are stale: run make proto"


def test_every_server_problem_has_its_exception() -> None:
    for code, cls in ERRORS.items():
        if code in ("internal", "client_closed"):
            continue
        mapped = error_class(code, cls.http_status)
        assert mapped is not APIError and mapped.code == code and mapped.http_status == cls.http_status, code


# ------------------------------------------------------------------------------------------------ REST


def test_each_method_and_input_type_matches_the_raw_answer(server: Server, tmp_path: Path) -> None:
    image = SAMPLE.read_bytes()
    pixels = np.asarray(Image.open(SAMPLE).convert("RGB"))
    raw_depth = npy(raw_post(server, "/v1/depth", image, model="g-depth", format="npy").content)
    raw_normals = npy(raw_post(server, "/v1/normals", image, model="g-normals", format="npy").content)
    with server.client() as client:
        for given in (SAMPLE, str(SAMPLE), image, bytearray(image), Image.open(SAMPLE), pixels):
            got = client.depth(given, model="g-depth")
            assert got.array.dtype == np.float32 and np.array_equal(got.array, raw_depth), type(given)
        depth = client.depth(pixels, model="g-depth")
        assert (depth.kind, depth.model, depth.seed, depth.steps, depth.batch_size) == ("depth", "g-depth", 0, 1, 1)
        assert {"decode", "queue", "compute", "encode", "total"} <= depth.timings.keys() and depth.request_id
        assert depth.attempts == 1

        normals = client.normals(pixels, model="g-normals")
        assert normals.kind == "normals" and normals.array.shape == (*pixels.shape[:2], 3)
        assert np.array_equal(normals.array, raw_normals)

        as_png = client.depth(SAMPLE, model="g-depth", format="png")  # 16-bit: within half a step
        assert np.abs(as_png.array - raw_depth).max() <= 0.5 / 65535 + 1e-7

        color = raw_post(server, "/v1/depth", image, model="g-depth", format="color").content
        assert np.array_equal(depth.colorize(), np.asarray(Image.open(io.BytesIO(color)).convert("RGB")))
        path = depth.to_png(tmp_path / "d.png")
        assert np.array_equal(np.asarray(Image.open(path)), np.round(raw_depth * 65535).astype(np.uint16))

        half = client.depth(pixels, model="g-depth", processing_res=32, match_input_resolution=False, seed=3)
        assert half.seed == 3 and max(half.array.shape) == 32

        gray = client.depth(np.asarray(Image.open(SAMPLE).convert("L")), model="g-depth")
        assert gray.array.shape == pixels.shape[:2]


def test_uncertainty_and_metadata(server: Server) -> None:
    raw = raw_post(
        server, "/v1/uncertainty", SAMPLE.read_bytes(), model="g-depth", seeds="3", return_members="true",
        format="json", json_encoding="npy",
    ).json()  # fmt: skip
    import base64

    with server.client() as client:
        got = client.uncertainty(SAMPLE, model="g-depth", seeds=3, return_members=True)
        assert got.seeds == [0, 1, 2] and got.members is not None and got.members.shape[0] == 3
        for name, array in (("prediction", got.array), ("uncertainty", got.uncertainty), ("members", got.members)):
            assert np.array_equal(array, npy(base64.b64decode(raw["outputs"][name]["data"]))), name
        normals = client.uncertainty(SAMPLE, task="normals", model="g-normals", seeds=2, reduction="median")
        assert normals.kind == "normals" and normals.uncertainty_unit == "degrees" and normals.members is None
        assert normals.reduction == "median" and normals.array.shape[-1] == 3

        models = {m.id: m for m in client.models()}
        assert set(models) == {"g-depth", "g-normals", "slow", "m-depth"}
        assert models["g-depth"].generative and models["slow"].backend == "simulated"
        health = client.health()
        assert health.alive and health.ready
        assert health.models == {"g-depth": True, "g-normals": True, "slow": True, "m-depth": True}
        assert client.predict(SAMPLE, "normals", model="g-normals").kind == "normals"
        with pytest.raises(TypeError, match="unknown parameter"):
            client.predict(SAMPLE, "depth", seeds=3)
    assert not Client(f"http://127.0.0.1:{free_port()}").health().alive


def test_multi_step_parameters_and_step_uncertainty_in_the_answer(server: Server) -> None:
    """steps, ensemble_size and uncertainty="steps" reach the server as its REST parameters: the maps equal the raw
    answers, and the step change carried by a depth answer equals the uncertainty endpoint's method=steps."""
    import base64

    raw = raw_post(
        server, "/v1/depth", SAMPLE.read_bytes(), model="m-depth", steps="3", seed="5", uncertainty="steps",
        format="json", json_encoding="npy",
    ).json()  # fmt: skip
    with server.client() as client:
        got = client.depth(SAMPLE, model="m-depth", steps=3, seed=5, uncertainty="steps")
        assert isinstance(got, UncertaintyPrediction)
        assert got.method == "steps" and got.step_window == 2 and got.steps == 3 and got.seed == 5
        for name, array in (("prediction", got.array), ("uncertainty", got.uncertainty)):
            assert np.array_equal(array, npy(base64.b64decode(raw["outputs"][name]["data"]))), name
        assert float(got.uncertainty.max()) > 0.0
        plain = client.depth(SAMPLE, model="m-depth", steps=3, seed=5)
        # The same run; the final latent is decoded in one VAE call with the tracked x0s, so equal to float noise.
        assert not isinstance(plain, UncertaintyPrediction) and np.abs(plain.array - got.array).max() < 1e-5
        endpoint = client.uncertainty(SAMPLE, model="m-depth", method="steps", steps=3, seed=5)
        assert endpoint.method == "steps" and np.array_equal(endpoint.uncertainty, got.uncertainty)
        png = client.predict(SAMPLE, "depth", model="m-depth", steps=3, seed=5, uncertainty="steps", format="png")
        assert isinstance(png, UncertaintyPrediction) and np.abs(png.uncertainty - got.uncertainty).max() < 1e-4
        ensemble = client.depth(SAMPLE, model="m-depth", steps=2, ensemble_size=2)
        assert ensemble.steps == 2 and ensemble.array.shape == got.array.shape
        with pytest.raises(InvalidParameter) as refused:
            client.depth(SAMPLE, model="g-depth", uncertainty="steps")
        assert refused.value.field == "uncertainty"


def test_typed_errors_for_each_problem(server: Server) -> None:
    with server.client(retry=RetryPolicy(max_retries=0)) as client:
        with pytest.raises(InvalidParameter) as bad:
            client.depth(SAMPLE, processing_res=7)
        assert bad.value.status == 422 and bad.value.field == "processing_res" and bad.value.request_id
        assert bad.value.type.endswith("/invalid_parameter") and "multiple of 8" in bad.value.detail
        with pytest.raises(ModelNotFound) as missing:
            client.depth(SAMPLE, model="nope")
        assert missing.value.status == 404
        with pytest.raises(TaskNotServed):
            client.normals(SAMPLE, model="g-depth")
        with pytest.raises(UnsupportedMedia) as unreadable:
            client.depth(b"this is not an image")
        assert unreadable.value.status == 415
        with pytest.raises(PayloadTooLarge) as large:
            client.depth(np.zeros((1500, 1500, 3), np.uint8))  # 2.25 M pixels > 2 M
        assert large.value.status == 413
        with pytest.raises(DeadlineExceeded) as late:
            client.depth(SAMPLE, model="slow", timeout_ms=1)
        assert late.value.status == 504
        with pytest.raises(TaskNotServed, match="multi-seed uncertainty needs a Lotus-G or Marigold model"):
            client.uncertainty(SAMPLE, model="slow")
    with Client(server.base) as anonymous, pytest.raises(Unauthorized) as denied:
        anonymous.depth(SAMPLE)
    assert denied.value.status == 401 and denied.value.title == "Missing or invalid API key"
    with pytest.raises(TypeError, match="PIL image"):
        server.client().depth(12)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uint8"):
        server.client().depth(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        server.client().depth(np.zeros((8, 8, 4), np.uint8))
    unreachable = Client(f"http://127.0.0.1:{free_port()}", retry=RetryPolicy(max_retries=2, backoff_s=0.01))
    with pytest.raises(TransportError) as gone:
        unreachable.depth(SAMPLE)
    assert gone.value.attempts == 3


def test_startup_503s_are_retried_with_one_key(server: Server) -> None:
    """The fixture's first request went out while the models loaded: 503s (Retry-After) then the answer."""
    statuses = [status for _, _, status in server.startup_exchanges]
    keys = {key for _, key, _ in server.startup_exchanges}
    assert 503 in statuses and statuses[-1] == 200, statuses
    assert len(keys) == 1 and None not in keys
    assert server.startup is not None and server.startup.attempts == len(statuses)


def test_429s_are_retried_with_one_key_each_and_computed_once(server: Server) -> None:
    """Ten at once on `slow` (queue limit 2): the server refuses some with 429; each is retried after
    Retry-After with its own key until answered, and the server computes exactly ten jobs."""
    before = server.settled_jobs_ok("slow")
    recorder = Recorder()
    images = [photo(48, 64, seed) for seed in range(10)]
    with server.client(transport=recorder) as client:
        results = list(client.predict_many(images, concurrency=10, model="slow"))
    assert len(results) == 10 and all(r.array.shape == (48, 64) for r in results)
    by_key: dict[str | None, list[int]] = {}
    for _, key, status in recorder.exchanges:
        by_key.setdefault(key, []).append(status)
    assert len(by_key) == 10 and None not in by_key
    assert any(429 in statuses for statuses in by_key.values()), by_key
    for statuses in by_key.values():
        assert statuses[-1] == 200 and set(statuses[:-1]) <= {429}, statuses
    assert sum(r.attempts for r in results) == len(recorder.exchanges)
    assert server.jobs_ok("slow") - before == 10

    # Without retries the 429 reaches the caller. Ten at once overflow a queue of 2 unless the machine spreads their
    # arrivals over several batches (seen once on a loaded CI machine), so a few rounds are allowed.
    refused: QueueFull | None = None
    with server.client(retry=RetryPolicy(max_retries=0)) as impatient:
        for _ in range(5):
            try:
                list(impatient.predict_many(images, concurrency=10, model="slow"))
            except QueueFull as exc:
                refused = exc
                break
    assert refused is not None, "ten requests at once on a queue of 2 were never refused"
    assert refused.status == 429 and refused.retry_after is not None and refused.retry_after >= 0


def test_one_idempotency_key_is_computed_once(server: Server) -> None:
    before = server.settled_jobs_ok("slow")
    with server.client() as client:
        first = client.depth(SAMPLE, model="slow", idempotency_key="same-request")
        again = client.depth(SAMPLE, model="slow", idempotency_key="same-request")
        assert np.array_equal(first.array, again.array)
        with pytest.raises(InvalidParameter) as reused:
            client.depth(SAMPLE, model="slow", processing_res=32, idempotency_key="same-request")
        assert reused.value.field == "Idempotency-Key"
    assert server.jobs_ok("slow") - before == 1


def test_predict_many_keeps_n_in_flight_and_yields_in_order(server: Server) -> None:
    sizes = [(40 + 8 * i, 64) for i in range(8)]
    images = (photo(h, w, i) for i, (h, w) in enumerate(sizes))  # a lazy iterator
    recorder = Recorder()
    with server.client(transport=recorder) as client:
        results = list(client.predict_many(images, concurrency=4, model="slow", progress=True))
    assert [r.array.shape for r in results] == sizes
    assert recorder.max_in_flight == 4
    assert max(r.batch_size or 0 for r in results) > 1  # the server batched what was in flight

    recorder = Recorder()
    with server.client(transport=recorder) as client:
        alone = list(client.predict_many([photo(h, w) for h, w in sizes[:3]], concurrency=1, model="slow"))
        assert [r.batch_size for r in alone] == [1, 1, 1] and recorder.max_in_flight == 1
        mixed = list(client.predict_many([SAMPLE, b"broken", SAMPLE], model="g-depth", return_exceptions=True))
        assert isinstance(mixed[0], Prediction) and isinstance(mixed[1], UnsupportedMedia)
        assert isinstance(mixed[2], Prediction)
        with pytest.raises(UnsupportedMedia):
            list(client.predict_many([SAMPLE, b"broken", SAMPLE], model="g-depth"))


def test_async_client_matches_the_sync_one(server: Server) -> None:
    pixels = np.asarray(Image.open(SAMPLE).convert("RGB"))
    with server.client() as client:
        depth = client.depth(pixels, model="g-depth")
        normals = client.normals(pixels, model="g-normals")
        uncertainty = client.uncertainty(pixels, model="g-depth", seeds=2)

    async def run() -> None:
        async with AsyncClient(server.base, api_key=KEY) as aclient:
            assert np.array_equal((await aclient.depth(pixels, model="g-depth")).array, depth.array)
            assert np.array_equal((await aclient.normals(SAMPLE, model="g-normals")).array, normals.array)
            got = await aclient.uncertainty(pixels, model="g-depth", seeds=2)
            assert np.array_equal(got.uncertainty, uncertainty.uncertainty)
            assert {m.id for m in await aclient.models()} == {"g-depth", "g-normals", "slow", "m-depth"}
            steps = await aclient.depth(pixels, model="m-depth", steps=2, uncertainty="steps")
            assert isinstance(steps, UncertaintyPrediction) and steps.method == "steps" and steps.step_window == 1
            assert (await aclient.health()).ready
            with pytest.raises(ModelNotFound):
                await aclient.depth(pixels, model="nope")
            sizes = [(40 + 8 * i, 64) for i in range(6)]

            async def frames():  # an async source
                for i, (h, w) in enumerate(sizes):
                    yield photo(h, w, i)

            shapes = [r.array.shape async for r in aclient.predict_many(frames(), concurrency=3, model="slow")]
            assert shapes == sizes

    asyncio.run(run())


# ------------------------------------------------------------------------------------------------ gRPC


def test_stream_client_steps_auto_and_step_uncertainty(server: Server) -> None:
    """A robot's stream on a multi-step model: `steps="auto"` with a loose deadline runs the model's default
    steps (a tight one is tested server-side with a pinned step time), and each frame carries its step-change
    uncertainty, equal to the REST answer's for the same frame and seed."""
    frames = [photo(48, 64, i) for i in range(3)]
    with StreamClient(server.grpc, api_key=KEY) as streams:
        got = list(
            streams.stream(
                frames, model="m-depth", steps="auto", uncertainty="steps", seed=1, timeout_ms=60000, encoding="raw32"
            )
        )
        fixed = list(streams.stream(frames[:1], model="m-depth", steps=2, ensemble_size=2, encoding="raw32"))
        with pytest.raises(ValueError, match="steps"):
            streams.stream(frames, model="m-depth", steps="many")  # type: ignore[arg-type]
    with server.client() as client:
        rest = client.depth(frames[1], model="m-depth", steps=got[1].steps, seed=1, uncertainty="steps")
    assert [g.steps for g in got] == [4, 4, 4]  # the tiny Marigold's default
    assert all(g.uncertainty is not None and g.uncertainty.shape == (48, 64) for g in got)
    np.testing.assert_allclose(got[1].array, rest.array, atol=1e-5)
    np.testing.assert_allclose(got[1].uncertainty, rest.uncertainty, atol=1e-5)
    assert fixed[0].steps == 2 and fixed[0].uncertainty is None and fixed[0].array.shape == (48, 64)


def test_stream_client_in_order_with_ids_and_drop_stale(server: Server) -> None:
    frames = [photo(48, 64, i) for i in range(6)]
    with StreamClient(server.grpc, api_key=KEY) as streams:
        answers = list(streams.stream(frames, model="g-depth", encoding="raw32"))
        assert [a.frame_id for a in answers] == list(range(6))
        with Client(server.base, api_key=KEY) as client:
            rest = client.depth(frames[2], model="g-depth")
        # raw float32: REST's map (the stream batched its frames, so to float rounding, not bitwise)
        np.testing.assert_allclose(answers[2].array, rest.array, atol=1e-5)
        for frame_id, array in answers:  # unpacks as (frame_id, array)
            assert array is not None and array.dtype == np.float32 and array.shape == (48, 64), frame_id

        encoded = [(100 + i, SAMPLE.read_bytes()) for i in range(3)]  # (frame_id, encoded bytes)
        got = list(streams.stream(encoded, task="normals", model="g-normals"))
        assert [g.frame_id for g in got] == [100, 101, 102] and got[0].array.shape == (192, 256, 3)
        assert got[0].kind == "normals" and got[0].total_ms > 0

        # The camera runs far faster than `slow` (400 ms a batch): latest frame wins.
        fast = [photo(32, 32, i) for i in range(12)]
        everything = list(streams.stream(fast, model="slow", drop_stale=True, max_in_flight=1, dropped="yield"))
        assert [a.frame_id for a in everything] == list(range(12))
        statuses = [a.status for a in everything]
        assert "dropped" in statuses and statuses[-1] == "ok", statuses
        assert all((a.array is None) == (a.status == "dropped") for a in everything)
        kept = [a.frame_id for a in streams.stream(fast, model="slow", drop_stale=True, max_in_flight=1)]
        assert kept == sorted(kept) and kept[-1] == 11 and len(kept) < 12

        with pytest.raises(InvalidParameter) as bad:
            list(streams.stream(frames[:2], model="g-depth", processing_res=7))
        assert bad.value.field == "processing_res"
        soft = list(streams.stream(frames[:2], model="g-depth", processing_res=7, errors="yield"))
        assert [s.status for s in soft] == ["error", "error"] and isinstance(soft[0].error, InvalidParameter)

        with streams.stream(iter(frames * 5), model="slow") as call:  # cancel midway
            first = next(call)
            call.cancel()
        assert first.frame_id == 0

        def leave_after_the_first() -> object:
            answers = streams.stream(iter(frames * 5), model="slow")
            for answer in answers:
                assert answer.frame_id == 0
                break
            return answers._call  # the iterator itself is dropped on return, as after a loop's `break`

        rpc = leave_after_the_first()
        end = time.monotonic() + 10
        while not rpc.done() and time.monotonic() < end:  # type: ignore[attr-defined]
            time.sleep(0.05)
        assert rpc.cancelled()  # type: ignore[attr-defined]

        def broken():
            yield frames[0]
            raise RuntimeError("camera unplugged")

        with pytest.raises(RuntimeError, match="camera unplugged"):
            list(streams.stream(broken(), model="g-depth"))

    with StreamClient(server.grpc) as anonymous, pytest.raises(Unauthorized):
        list(anonymous.stream(frames[:1]))


@pytest.mark.anyio
async def test_stream_client_over_tls_with_an_api_key(tiny_dir: TinyDir, tmp_path: Path) -> None:
    """The real servicer on a TLS port (a self-signed certificate for `localhost`) behind the API-key
    interceptor: the client trusts that certificate as its root, and sends its key in the metadata."""
    import grpc

    from service.grpc.server import ApiKeyInterceptor
    from service.grpc.servicer import DenseServicer
    from service.grpc.stubs import dense_pb2_grpc
    from tests.service_harness import running_service

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    async with running_service(tiny_dir, models=[("lotus-g", "depth")]) as h:
        server = grpc.aio.server(interceptors=[ApiKeyInterceptor([KEY])])
        dense_pb2_grpc.add_DenseServiceServicer_to_server(DenseServicer(h.app.state.broker, h.settings), server)
        port = server.add_secure_port(
            "localhost:0", grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
        )
        await server.start()
        frames = [photo(48, 64, i) for i in range(3)]

        def stream(**kwargs: object) -> list[int]:
            with StreamClient(f"localhost:{port}", **kwargs) as client:  # type: ignore[arg-type]
                return [f for f, _ in client.stream(frames, timeout=60)]

        try:
            assert await asyncio.to_thread(stream, api_key=KEY, root_certificates=cert) == [0, 1, 2]
            with pytest.raises(Unauthorized):
                await asyncio.to_thread(stream, root_certificates=cert.read_bytes())
            with pytest.raises(TransportError):  # plaintext to a TLS port: no answer
                await asyncio.to_thread(stream, api_key=KEY)
        finally:
            await server.stop(None)
