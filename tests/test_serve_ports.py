"""Two `dense-serve serve` processes on one machine: a taken HTTP or gRPC port is refused in one `error:` line
(exit 2) and never shared, `--grpc-port` gives the second server its own gRPC port, and the line that says
where a server listens comes only once both of its sockets accept connections."""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from service.grpc.stubs import dense_pb2 as pb
from service.grpc.stubs import dense_pb2_grpc
from tests.conftest import REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def _serve_args(folder: Path, model: Path, model_id: str, port: int, grpc_port: int) -> list[str]:
    """`serve` of one tiny checkpoint under its own id (so that each server's answers say which one it is)."""
    spec = folder / f"{model_id}.toml"
    spec.write_text(f'id = "{model_id}"\nsource = "{model}"\n')
    serve = [sys.executable, "-m", "service.cli", "serve", "--model", str(spec)]
    return [*serve, "--port", str(port), "--grpc-port", str(grpc_port)]


ENV = {**os.environ, "DENSE_WARMUP": "false", "DENSE_SHUTDOWN_GRACE_S": "1"}


@contextmanager
def _server(args: list[str]) -> Iterator[tuple[str, list[int]]]:
    """A running server; yields the first line it printed and the ports accepting connections the moment it
    was printed (HTTP, gRPC)."""
    proc = subprocess.Popen(args, env=ENV, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stderr is not None
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
    try:
        first = lines.get(timeout=120)
        port, grpc_port = int(args[args.index("--port") + 1]), int(args[args.index("--grpc-port") + 1])
        accepting = [p for p in (port, grpc_port) if _accepts(p)]
        yield first, accepting
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _refused(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=120)


def _served_ids(grpc_port: int) -> set[str]:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = dense_pb2_grpc.DenseServiceStub(channel)
        deadline = time.monotonic() + 120
        while True:  # the models are announced once loaded
            ids = {m.id for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
            if ids or time.monotonic() > deadline:
                return ids
            time.sleep(0.2)


def test_second_server_refuses_taken_ports_and_runs_on_its_own(tiny_dir, tmp_path: Path) -> None:
    model = tiny_dir("lotus-d", "depth")
    http1, grpc1, http2, grpc2 = (_free_port() for _ in range(4))
    with _server(_serve_args(tmp_path, model, "first", http1, grpc1)) as (first_line, accepting):
        # The first line says where it listens and what it serves, and is printed only once both ports accept.
        assert first_line.startswith(f"dense-serve listening on http://127.0.0.1:{http1} and gRPC 127.0.0.1:{grpc1}")
        assert "serving first" in first_line
        assert accepting == [http1, grpc1]

        for port, grpc_port, what, flag in ((http1, grpc2, "HTTP", "--port"), (http2, grpc1, "gRPC", "--grpc-port")):
            taken = http1 if what == "HTTP" else grpc1
            result = _refused(_serve_args(tmp_path, model, "second", port, grpc_port))
            assert result.returncode == 2, result.stderr
            assert result.stderr.splitlines() == [
                f"error: {what} port {taken} on 127.0.0.1 is in use (another dense-serve?); choose another with {flag}"
            ]
            assert "listening" not in result.stdout + result.stderr
            assert not _accepts(grpc2 if what == "HTTP" else http2), "the refused server left a port bound"

        # --grpc-port: a second server on its own ports; each gRPC port reaches its own server, every time.
        with _server(_serve_args(tmp_path, model, "second", http2, grpc2)) as (second_line, accepting2):
            assert second_line.startswith(
                f"dense-serve listening on http://127.0.0.1:{http2} and gRPC 127.0.0.1:{grpc2}"
            )
            assert accepting2 == [http2, grpc2]
            for _ in range(10):
                assert _served_ids(grpc1) == {"first"}
                assert _served_ids(grpc2) == {"second"}


def test_a_port_held_by_another_program_is_refused(tiny_dir, tmp_path: Path) -> None:
    """Not only another dense-serve: any listening socket on the gRPC port (gRPC's SO_REUSEPORT would have
    shared a port held by another SO_REUSEPORT server)."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    with holder:
        taken = holder.getsockname()[1]
        result = _refused(_serve_args(tmp_path, tiny_dir("lotus-d", "depth"), "m", _free_port(), taken))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: gRPC port {taken} on 127.0.0.1 is in use (another dense-serve?); choose another with --grpc-port"
    ]
