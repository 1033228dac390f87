"""The deploy's Redis ACL users on a real server: deploy/k8s/base/redis/start.sh fills in users.acl and starts a
throwaway redis-server (or the valkey-server the tests fall back to) with it, as the Kubernetes and Compose
deployments do. dense-serve's user works on its key prefix and nowhere else, KEDA's user can only read stream
lengths, and dense-serve itself starts, serves and answers as its user."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.redis_server import free_port, server_binary

REPO = Path(__file__).resolve().parent.parent
START = REPO / "deploy" / "k8s" / "base" / "redis" / "start.sh"
PREFIX = "dense"
PASSWORDS = {"default": "admin-pw", "dense-serve": "app-pw", "keda": "keda-pw"}


def connect(port: int, **kwargs: str) -> redis.Redis:
    """No retries: a refused login fails at once (redis-py retries connection errors with backoff by default)."""
    return redis.Redis(port=port, socket_timeout=2, retry=Retry(NoBackoff(), 0), **kwargs)


@dataclass(frozen=True)
class AclRedis:
    port: int

    def client(self, user: str) -> redis.Redis:
        return connect(self.port, username=user, password=PASSWORDS[user])

    def url(self, user: str) -> str:
        return f"redis://{user}@127.0.0.1:{self.port}/0"


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[AclRedis]:
    # start.sh execs `redis-server`: the binary the other Redis tests use, under that name.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "redis-server").symlink_to(server_binary())
    port = free_port()
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "REDIS_ADMIN_PASSWORD": PASSWORDS["default"],
        "REDIS_APP_PASSWORD": PASSWORDS["dense-serve"],
        "REDIS_KEDA_PASSWORD": PASSWORDS["keda"],
        "DENSE_REDIS_PREFIX": PREFIX,
        "REDIS_ACL_FILE": str(tmp_path / "users.acl"),
    }
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    proc = subprocess.Popen(["/bin/sh", str(START), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    server = AclRedis(port)
    try:
        admin = server.client("default")
        for _ in range(200):
            try:
                if admin.ping():
                    break
            except redis.ConnectionError:
                if proc.poll() is not None:
                    pytest.fail(f"redis did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
                time.sleep(0.02)
        assert (tmp_path / "users.acl").stat().st_mode & 0o077 == 0, "the filled-in ACL file is private"
        assert PASSWORDS["dense-serve"] not in (tmp_path / "users.acl").read_text(), "hashes only"
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def refused(call: object, *args: object) -> bool:
    """The ACL said no: NOPERM, or (a key inside a script) "can't access" on Redis 7.0."""
    try:
        call(*args)  # type: ignore[operator]
    except redis.exceptions.NoPermissionError:
        return True
    except redis.ResponseError as exc:
        return "NOPERM" in str(exc) or "can't access" in str(exc)
    return False


def test_start_script_refuses_to_run_without_passwords(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "REDIS_ACL_FILE": str(tmp_path / "users.acl"), "REDIS_APP_PASSWORD": "x"}
    result = subprocess.run(["/bin/sh", str(START)], env=env, capture_output=True, text=True, timeout=10)
    assert result.returncode != 0 and "REDIS_ADMIN_PASSWORD" in result.stderr
    bad_prefix = {**env, "REDIS_ADMIN_PASSWORD": "a", "DENSE_REDIS_PREFIX": "a}:*"}
    result = subprocess.run(["/bin/sh", str(START)], env=bad_prefix, capture_output=True, text=True, timeout=10)
    assert result.returncode == 2 and "DENSE_REDIS_PREFIX" in result.stderr


def test_no_one_gets_in_without_a_user_and_password(acl_redis: AclRedis) -> None:
    with pytest.raises(redis.AuthenticationError):
        connect(acl_redis.port).get("x")
    with pytest.raises(redis.AuthenticationError):
        connect(acl_redis.port, username="dense-serve", password="wrong").ping()


def test_the_app_user_works_on_its_prefix_and_nowhere_else(acl_redis: AclRedis) -> None:
    app = acl_redis.client("dense-serve")
    mine, stream = f"{{{PREFIX}}}:result:1", f"{{{PREFIX}}}:jobs:m"
    assert app.xadd(stream, {"a": "b"}) and app.xlen(stream) == 1
    app.xgroup_create(stream, "workers", id="0")
    assert app.xreadgroup("workers", "w", {stream: ">"}, count=1)
    assert app.eval("return redis.call('SET', KEYS[1], ARGV[1])", 1, mine, "v") == b"OK"
    sha = app.script_load("return redis.call('GET', KEYS[1])")
    assert app.evalsha(sha, 1, mine) == b"v"
    assert app.info("server")["redis_version"]
    with app.pipeline(transaction=True) as pipe:
        assert pipe.xlen(stream).xinfo_groups(stream).execute()[0] == 1
    assert list(app.scan_iter(match=f"{{{PREFIX}}}:worker:*")) == []
    for key in ("other", "{other}:jobs:m", "{densex}:result:1"):
        assert refused(app.set, key, "v"), key
        assert refused(app.get, key), key
        assert refused(app.eval, "return redis.call('SET', KEYS[1], 'v')", 1, key), key
    # A script cannot reach past the prefix by naming keys it was not given either.
    assert refused(app.eval, "return redis.call('GET', 'other')", 0)
    for command in (("FLUSHALL",), ("CONFIG", "GET", "maxmemory"), ("KEYS", "*"), ("ACL", "LIST"), ("SHUTDOWN",)):
        assert refused(app.execute_command, *command), command


def test_the_keda_user_reads_stream_lengths_only(acl_redis: AclRedis) -> None:
    app, keda = acl_redis.client("dense-serve"), acl_redis.client("keda")
    stream = f"{{{PREFIX}}}:jobs:m"
    app.xadd(stream, {"a": "b"})
    assert keda.ping() and keda.xlen(stream) == 1
    assert keda.xlen(f"{{{PREFIX}}}:jobs:not-yet") == 0, "XLEN of a missing stream is 0, not an error"
    assert refused(keda.xadd, stream, {"a": "b"})
    assert refused(keda.delete, stream)
    assert refused(keda.xlen, f"{{{PREFIX}}}:replies:api")  # not a job stream
    assert refused(keda.get, f"{{{PREFIX}}}:result:1")
    assert refused(keda.execute_command, "XINFO", "GROUPS", stream)
    assert refused(keda.eval, "return 1", 0)


def test_dense_serve_starts_and_answers_as_its_acl_user(acl_redis: AclRedis) -> None:
    """The real broker with the deploy's URL form (user in the URL, password apart): the start-up checks (PING, INFO,
    the XACKDEL probe), a job submitted, consumed and answered, a keyed answer stored and replayed."""
    from service.jobs import Job, ModelInfo, Reply
    from service.queue.redis import RedisBroker

    info = ModelInfo(
        id="m", family="lotus-d", task="depth", output_kind="depth", generative=False, processing_res=64,
        device="cpu", dtype="float32", max_batch_size=8, max_queue_delay_ms=5,
    )  # fmt: skip
    password = PASSWORDS["dense-serve"]

    async def scenario() -> None:
        api = RedisBroker(acl_redis.url("dense-serve"), PREFIX, password=password)
        worker = RedisBroker(acl_redis.url("dense-serve"), PREFIX, password=password, consumer="w1")
        try:
            await api.start()
            await worker.start()
            assert api.server is not None
            await worker.publish_models([info])
            for key in (None, "retry-1"):
                job = Job(model="m", task="depth", deadline=time.time() + 20, image=b"x")
                answer = asyncio.create_task(api.submit(job, idempotency_key=key))
                deliveries: list = []
                while not deliveries:
                    deliveries = await worker.consume("m", 8, 0.2)
                (delivery,) = deliveries
                await worker.reply(delivery, Reply(id=delivery.job.id, status="ok", outputs={"depth": b"map"}))
                assert (await answer).status == "ok"
            again = await api.submit(Job(model="m", task="depth", deadline=time.time() + 20, image=b"x"), "retry-1")
            assert again.status == "ok" and again.outputs == {"depth": b"map"}, "the keyed answer was replayed"
            assert acl_redis.client("keda").xlen(f"{{{PREFIX}}}:jobs:m") == 0
        finally:
            await api.close()
            await worker.close()

    asyncio.run(asyncio.wait_for(scenario(), 20))
