"""Secure by default, each rule provoked for real: front-ends refuse to start open unless told, keys rotate from a
secrets directory without a restart (REST and gRPC alike), concurrency limits answer 503 / RESOURCE_EXHAUSTED,
5xx answers carry no exception text, the Redis password stays out of start-up lines, and only the image
formats we decode are ever parsed."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from PIL import Image, PcxImagePlugin
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError

from service import keys as keys_module
from service.api.app import create_app
from service.cli import build_parser, main
from service.config import Settings
from service.errors import ModelFailure, ServiceError, Unavailable
from service.grpc.server import GrpcFrontend
from service.grpc.stubs import dense_pb2 as pb
from service.grpc.stubs.dense_pb2_grpc import DenseServiceStub
from service.keys import ApiKeys, auth_refusal
from service.queue.memory import MemoryBroker
from tests.conftest import REPO
from tests.redis_server import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper().startswith("DENSE_") and name != "DENSE_GRPC_PORT":
            monkeypatch.delenv(name)
    return monkeypatch


class FailingBroker(MemoryBroker):
    """A broker whose catalog raises `error` (when set): what any request meets first."""

    error: BaseException | None = None

    async def catalog(self) -> list[Any]:
        if self.error is not None:
            raise self.error
        return await super().catalog()


@asynccontextmanager
async def frontend(settings: Settings, broker: MemoryBroker | None = None) -> AsyncIterator[tuple[Any, Any]]:
    """The real REST app (and gRPC beside it when enabled) on an in-process queue, without a worker or torch."""
    grpc_frontend = GrpcFrontend(settings, host="127.0.0.1", port=0) if settings.grpc_enabled else None
    app = create_app(settings, broker or MemoryBroker(), grpc=grpc_frontend)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            yield app, client


# --------------------------------------------------------------------------- refusing to start open


def refused(*args: str) -> list[str]:
    """`dense-serve ARGS` in its own process (a regression would serve, not hang the suite): its stderr lines,
    after checking it exited with status 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DENSE_")}
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    return proc.stderr.strip().splitlines()


@pytest.mark.parametrize("role", ["api", "grpc"])
def test_frontends_refuse_to_start_without_keys(role: str) -> None:
    err = refused(role, "--port", "0", "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    assert len(err) == 1 and err[0].startswith(f"error: dense-serve {role} has no API key"), err
    assert "--api-key" in err[0] and "DENSE_API_KEYS_DIR" in err[0] and "--no-auth (DENSE_AUTH=off)" in err[0]


def test_serve_reachable_from_other_machines_without_keys_is_refused() -> None:
    err = refused("serve", "--host", "0.0.0.0", "--port", "0", "--grpc-port", "0")
    assert len(err) == 1 and err[0].startswith("error: dense-serve serve listens on 0.0.0.0"), err
    assert "--no-auth" in err[0]


def test_no_auth_flag_and_env_say_open_on_purpose(clean_env: pytest.MonkeyPatch) -> None:
    for role in ("serve", "api", "grpc"):
        assert build_parser().parse_args([role, "--no-auth"]).auth == "off"
    clean_env.setenv("DENSE_AUTH", "off")
    assert auth_refusal(Settings(), "api", ["0.0.0.0"]) is None


def _dir_with(tmp_path: Path, **files: str) -> Path:
    folder = tmp_path / "keys"
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize(
    ("role", "hosts", "settings", "refused"),
    [
        ("serve", ["127.0.0.1", "127.0.0.1"], {}, None),  # a laptop: open on loopback
        ("serve", ["::1"], {}, None),
        ("serve", ["localhost"], {}, None),
        ("serve", ["127.0.0.1", "0.0.0.0"], {}, "listens on 0.0.0.0"),  # gRPC bound wide counts too
        ("serve", ["10.0.0.8"], {"auth": "off"}, None),
        ("serve", ["127.0.0.1"], {"auth": "on"}, "auth is on"),
        ("api", ["127.0.0.1"], {}, "has no API key"),  # loopback or not: a front-end serves others
        ("api", ["0.0.0.0"], {"api_keys": ["k"]}, None),
        ("grpc", ["0.0.0.0"], {"api_keys_dir": "KEYS"}, None),
        ("grpc", ["0.0.0.0"], {"api_keys_dir": "EMPTY"}, "holds no key"),
        ("api", ["0.0.0.0"], {"api_keys_dir": "MISSING"}, "is not a directory"),
        ("api", ["0.0.0.0"], {"api_keys": ["k"], "auth": "off"}, "drop one of the two"),
    ],
)
def test_auth_rule(
    role: Any, hosts: list[str], settings: dict[str, Any], refused: str | None, clean_env, tmp_path: Path
) -> None:
    folders = {
        "KEYS": _dir_with(tmp_path, primary="k1\n"),
        "EMPTY": tmp_path / "empty",
        "MISSING": tmp_path / "missing",
    }
    folders["EMPTY"].mkdir()
    if "api_keys_dir" in settings:
        settings = {**settings, "api_keys_dir": folders[settings["api_keys_dir"]]}
    why = auth_refusal(Settings(**settings), role, hosts)
    if refused is None:
        assert why is None
    else:
        assert why is not None and refused in why, why


# --------------------------------------------------------------------------- keys from a secrets directory


def _mount_secret(folder: Path, version: str, **keys: str) -> None:
    """What the kubelet does for a Secret volume: files in a timestamped folder, `..data` pointing at it (swapped
    atomically on update), and one visible link per key through `..data`."""
    data = folder / f"..{version}"
    data.mkdir()
    for name, value in keys.items():
        (data / name).write_text(value)
    tmp = folder / "..data_tmp"
    tmp.symlink_to(data.name)
    os.replace(tmp, folder / "..data")
    for name in keys:
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(Path("..data") / name)


def test_a_secret_volume_rotates_keys_without_a_restart(tmp_path: Path) -> None:
    folder = tmp_path / "secret"
    folder.mkdir()
    _mount_secret(folder, "2024_01", primary="key-one\n")
    now = [0.0]
    keys = ApiKeys(["fixed"], folder, reload_s=2.0, clock=lambda: now[0])
    assert keys.valid("key-one") and keys.valid("fixed") and not keys.valid("..data") and not keys.valid("")
    (folder / "primary").resolve().unlink()  # the kubelet's swap: the old folder goes, a new one comes
    _mount_secret(folder, "2024_02", primary="key-two")
    now[0] = 1.0
    assert keys.valid("key-one"), "re-read at most every reload_s"
    now[0] = 2.5
    assert keys.valid("key-two") and not keys.valid("key-one") and keys.valid("fixed")


def test_every_key_is_compared_whatever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = keys_module.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", counting)
    assert ApiKeys(["first", "second", "third"]).valid("first")
    assert calls == [b"first", b"second", b"third"], "an early exit would tell by its time which key matched"


async def test_rest_and_grpc_take_rotated_keys_from_one_directory(tmp_path: Path, clean_env) -> None:
    folder = _dir_with(tmp_path, primary="old-key")
    settings = Settings(api_keys_dir=folder, api_keys_reload_s=0.05, grpc_port=0, host="127.0.0.1")
    async with frontend(settings) as (app, client):
        port = app.state.grpc.port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = DenseServiceStub(channel)

            async def rest(key: str | None) -> int:
                return (await client.get("/v1/models", headers={"x-api-key": key} if key else {})).status_code

            async def rpc(key: str | None) -> grpc.StatusCode:
                metadata = (("authorization", f"Bearer {key}"),) if key else ()
                try:
                    await stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10)
                except grpc.aio.AioRpcError as err:
                    return err.code()
                return grpc.StatusCode.OK

            assert (await rest("old-key"), await rpc("old-key")) == (200, grpc.StatusCode.OK)
            assert (await rest(None), await rpc(None)) == (401, grpc.StatusCode.UNAUTHENTICATED)
            (folder / "primary").write_text("new-key")
            await asyncio.sleep(0.15)
            assert (await rest("new-key"), await rpc("new-key")) == (200, grpc.StatusCode.OK)
            assert (await rest("old-key"), await rpc("old-key")) == (401, grpc.StatusCode.UNAUTHENTICATED)
            (folder / "primary").unlink()  # every key withdrawn: closed, not open
            await asyncio.sleep(0.15)
            assert (await rest("new-key"), await rpc("new-key")) == (401, grpc.StatusCode.UNAUTHENTICATED)


# --------------------------------------------------------------------------- concurrency limits


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def test_http_limit_concurrency_answers_503_to_one_request_too_many(redis_url: str, redis_prefix: str) -> None:
    """`dense-serve api` with room for 2: a slow upload in flight plus one more request is one too many."""
    port = free_port()
    env = {**os.environ, "DENSE_REDIS_PREFIX": redis_prefix, "DENSE_HTTP_LIMIT_CONCURRENCY": "2"}
    env.pop("DENSE_API_KEYS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "api", "--redis-url", redis_url, "--port", str(port), "--no-auth"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 60
        while _get(f"{base}/healthz") != 200:
            assert proc.poll() is None, "the api process exited"
            assert time.monotonic() < end, "the api process never answered"
            time.sleep(0.1)
        for _ in range(20):  # until the slow request itself got in (a probe's closed connection may count a moment)
            time.sleep(0.3)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
                slow.sendall(
                    b"POST /v1/depth HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
                    + b"\x89PNG\r\n\x1a\n"
                )  # ... and the rest of the upload never comes
                time.sleep(0.5)
                slow.setblocking(False)
                try:
                    slow.recv(1)
                    continue  # answered already (503): try again
                except BlockingIOError:
                    pass  # still in flight
                assert _get(f"{base}/healthz") == 503
                break
        else:
            pytest.fail("the slow request was never let in")
        end = time.monotonic() + 10
        while _get(f"{base}/healthz") != 200:  # the slow one gone, there is room again
            assert time.monotonic() < end, "no room after the slow request went away"
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def test_grpc_max_concurrent_rpcs_answers_resource_exhausted(clean_env) -> None:
    settings = Settings(auth="off", grpc_port=0, grpc_max_concurrent_rpcs=1)
    async with frontend(settings) as (app, _), grpc.aio.insecure_channel(f"127.0.0.1:{app.state.grpc.port}") as channel:
        stub = DenseServiceStub(channel)
        release = asyncio.Event()

        async def held_open() -> AsyncIterator[pb.StreamRequest]:
            yield pb.StreamRequest(config=pb.StreamConfig(max_in_flight=1))  # the call reaches the server
            await release.wait()

        stream: Any = None
        exhausted = None
        end = time.monotonic() + 20
        while exhausted is None and time.monotonic() < end:
            if stream is None or stream.done():  # a stream that lost the race to a ListModels was refused: again
                stream = stub.StreamPredict(held_open())
                await asyncio.sleep(0.2)  # it reaches the server in a moment
            try:
                await stub.ListModels(pb.ListModelsRequest(), timeout=5)
            except grpc.aio.AioRpcError as err:
                exhausted = err
            await asyncio.sleep(0.05)
        assert exhausted is not None and exhausted.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exhausted
        release.set()
        assert [r async for r in stream] == []
        await stub.ListModels(pb.ListModelsRequest(), timeout=5)  # room again


# --------------------------------------------------------------------------- 5xx without internals


SECRET = "password=hunter2 at /srv/models/private"


async def test_rest_5xx_carry_a_generic_line_and_the_request_id(clean_env, caplog) -> None:
    async with frontend(Settings(grpc_enabled=False)) as (app, client):

        async def boom() -> None:
            raise RuntimeError(SECRET)

        async def model_failure() -> None:
            raise ModelFailure(f"model 'm' failed: {SECRET}")

        async def ours() -> None:
            raise Unavailable("the queue is out of memory (maxmemory reached, noeviction): retry", retry_after=2)

        for path, handler in (("/boom", boom), ("/model-failure", model_failure), ("/ours", ours)):
            app.add_api_route(path, handler)
        with caplog.at_level(logging.ERROR):
            for path, status in (("/boom", 500), ("/model-failure", 500)):
                r = await client.get(path, headers={"x-request-id": "req-77"})
                problem = r.json()
                assert r.status_code == status and r.headers["content-type"] == "application/problem+json"
                assert "hunter2" not in r.text and "RuntimeError" not in r.text and "/srv" not in r.text, r.text
                assert "req-77" in problem["detail"] and problem["request_id"] == "req-77", problem
        assert "hunter2" in caplog.text, "the log keeps what the client is not told"
        r = await client.get("/ours")
        assert r.status_code == 503 and "out of memory" in r.json()["detail"] and r.headers["retry-after"] == "2"


async def test_redis_outage_is_the_queue_is_unreachable_without_host_or_exception(clean_env, caplog) -> None:
    from service.queue.redis.connection import unavailable

    where = "redis://10.1.2.3:6379/0"
    with caplog.at_level(logging.WARNING):
        down = unavailable(RedisConnectionError("Error 111 connecting to 10.1.2.3:6379. Connection refused."), where)
    assert down.detail == "the queue is unreachable; retry shortly" and down.extra["retry_after"] == 1
    assert "10.1.2.3" in caplog.text
    full = unavailable(OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'."), where)
    assert "out of memory" in full.detail and "10.1.2.3" not in full.detail and "OOM command" not in full.detail

    port = free_port()  # nothing listens: a real connection refused, through the real broker, to a client
    settings = Settings(queue="redis", redis_url=f"redis://:hunter2@127.0.0.1:{port}/0", grpc_enabled=False)
    from service.processes import make_broker

    async with frontend(settings, make_broker(settings)) as (_, client):  # type: ignore[arg-type]
        r = await client.get("/v1/models")
    assert r.status_code == 503, r.text
    assert r.json()["detail"] == "the queue is unreachable; retry shortly", r.text
    assert str(port) not in r.text and "hunter2" not in r.text and "refused" not in r.text.lower()


@pytest.mark.parametrize(
    ("error", "code", "shown"),
    [
        (RuntimeError(SECRET), grpc.StatusCode.INTERNAL, None),
        (ModelFailure(f"model 'm' failed: {SECRET}"), grpc.StatusCode.INTERNAL, None),
        (Unavailable("no model is ready yet; try again shortly"), grpc.StatusCode.UNAVAILABLE, "no model is ready"),
    ],
)
async def test_grpc_errors_carry_no_internals(error: Exception, code: grpc.StatusCode, shown: str | None) -> None:
    broker = FailingBroker()
    async with frontend(Settings(auth="off", grpc_port=0), broker) as (app, _):
        broker.error = error
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.state.grpc.port}") as channel:
            stub = DenseServiceStub(channel)
            metadata = (("x-request-id", "grpc-req-7"),)
            for call in (stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10),
                         stub.Predict(pb.PredictRequest(encoded=b"x"), metadata=metadata, timeout=10)):  # fmt: skip
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                details = err.value.details() or ""
                assert err.value.code() == code and "hunter2" not in details and "RuntimeError" not in details
                if shown:
                    assert shown in details
                else:
                    assert "grpc-req-7" in details
                    assert dict(err.value.trailing_metadata() or ())["x-request-id"] == "grpc-req-7"

            async def one_frame() -> AsyncIterator[pb.StreamRequest]:
                yield pb.StreamRequest(frame=pb.PredictRequest(encoded=b"x", frame_id=3))

            frames = [r async for r in stub.StreamPredict(one_frame(), timeout=10)]
            assert [(f.frame_id, f.status) for f in frames] == [(3, pb.FRAME_STATUS_ERROR)]
            assert "hunter2" not in frames[0].error_message and "RuntimeError" not in frames[0].error_message


def test_a_500_detail_is_never_public_and_ours_are() -> None:
    assert not ServiceError("x").public and not ModelFailure("x").public
    assert Unavailable("x").public
    assert ModelFailure(SECRET).client_detail("r1") == "Model failed on this request; the server's log has the " \
        "detail under request id r1"  # fmt: skip


# --------------------------------------------------------------------------- the Redis password in start-up lines


def test_the_grpc_start_up_line_names_redis_without_its_password(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import service.cli
    import service.processes

    async def fake_run_grpc(settings: Settings, specs: list[Any], announce: Callable[[str], None]) -> int:
        announce("127.0.0.1:1")
        return 0

    clean_env.setattr(service.processes, "run_grpc", fake_run_grpc)
    clean_env.setattr(service.processes, "preflight_queue", lambda settings: None)
    clean_env.setattr(service.cli.logs, "configure", lambda *a, **k: None)
    clean_env.setattr(service.cli.tracing, "setup", lambda *a, **k: None)
    url = "redis://:hunter2@redis.internal:6379/0"
    assert main(["grpc", "--no-auth", "--port", "0", "--redis-url", url]) == 0
    err = capsys.readouterr().err
    assert "redis://redis.internal:6379/0" in err and "hunter2" not in err, err


# --------------------------------------------------------------------------- only the formats we decode


def _pcx() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(out, "PCX")
    return out.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\nshowpage\n%%EOF\n"


@pytest.mark.parametrize("image", [_pcx(), EPS], ids=["pcx", "eps"])
async def test_a_format_pillow_knows_but_we_do_not_decode_is_a_415_unparsed(
    image: bytes, tiny_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import EpsImagePlugin

    from tests.service_harness import running_service

    parsed: list[str] = []
    for plugin in (PcxImagePlugin.PcxImageFile, EpsImagePlugin.EpsImageFile):
        real = plugin._open

        def spy(self: Any, _real: Callable[[Any], None] = real) -> None:
            parsed.append(type(self).__name__)
            _real(self)

        monkeypatch.setattr(plugin, "_open", spy)
    async with running_service(tiny_dir, models=[("lotus-d", "depth")]) as h:
        r = await h.client.post("/v1/depth", content=image, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 415 and r.headers["content-type"] == "application/problem+json", r.text
    detail = r.json()["detail"]
    assert "not one of the supported formats" in detail and "PNG" in detail and "JPEG" in detail, detail
    assert parsed == [], f"Pillow parsed a client's bytes with {parsed}"
