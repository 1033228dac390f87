"""The docs' examples, run as written against a real `dense-serve serve` on the default models: the README's
quickstart curls and the StreamClient example of docs/client.md each do what their page says they do. An
example is found by the sentence before it in README.md or any docs/*.md page, wherever it has moved."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import REPO, SAMPLE, require_tool

PAGES = {path: path.read_text() for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _block_after(marker: str, language: str) -> str:
    """The first fenced block of `language` after `marker` in the one page (README.md, docs/*.md) that has it."""
    found = [text for text in PAGES.values() if marker in text]
    assert len(found) == 1, f"{marker!r} is on {len(found)} pages of README.md and docs/*.md, not one"
    text = found[0]
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, text.index(marker))
    assert match is not None, marker
    return match.group(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    """`make run`'s server: the default models, on free ports (HTTP, gRPC)."""
    port, grpc_port = _free_port(), _free_port()
    env = {**os.environ, "DENSE_TINY_DIR": str(tmp_path_factory.mktemp("tiny")), "DENSE_SHUTDOWN_GRACE_S": "1"}
    args = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--grpc-port", str(grpc_port)]
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "the server exited"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.3)
        yield port, grpc_port
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_quickstart_curls_write_their_files_and_print_nothing_big(server, tmp_path: Path) -> None:
    curl = require_tool("curl", "curl")
    port, _ = server
    lines = [line for line in _block_after("Try it from another shell", "bash").splitlines() if line.startswith("curl")]
    assert len(lines) == 3, lines
    for line in lines:
        command = line.split("  #")[0].replace("localhost:8000", f"127.0.0.1:{port}")
        command = command.replace("assets/sample.png", str(SAMPLE))
        result = subprocess.run(
            [curl, "-sS", "--fail", *shlex.split(command)[1:]], cwd=tmp_path, capture_output=True, timeout=120
        )
        assert result.returncode == 0, (line, result.stderr)
        assert len(result.stdout) < 1024, (line, len(result.stdout))  # a terminal gets no base64
    w, h = Image.open(SAMPLE).size
    for name in ("depth.png", "uncertainty.png"):
        image = Image.open(tmp_path / name)
        assert image.size == (w, h) and image.mode.startswith("I"), name  # 16-bit, at the input's size
    assert (tmp_path / "normals.npy").read_bytes().startswith(b"\x93NUMPY")


def test_stream_client_example_answers_every_recorded_frame_and_shows_the_dropped(server) -> None:
    _, grpc_port = server
    code = _block_after("`StreamClient` wraps the gRPC stream", "python").replace(
        "localhost:50051", f"127.0.0.1:{grpc_port}"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    recorded, live = result.stdout.splitlines()
    assert recorded == "recorded: 30 of 30 frames answered"
    ok, dropped, total = map(int, re.fullmatch(r"live: (\d+) answered, (\d+) dropped of (\d+)", live).groups())  # type: ignore[union-attr]
    assert total == 60 and ok + dropped == 60 and ok >= 1, live  # every frame accounted for, none silently lost
