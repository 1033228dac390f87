"""The demo page at `GET /`: served with a strict CSP and cache headers, auth-exempt only as configured, and
working in a real headless Chromium against a running `dense-serve serve` (with an API key)."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from models.outputs import Family, Task
from service.api.app import create_app
from service.api.routes_page import CSP, load_page
from service.config import Settings
from service.queue.memory import MemoryBroker
from tests.conftest import SAMPLE
from tests.web_page_driver import TASKS, drive, find_chromium, free_port, open_docs, serving

API_KEY = "page-test-key"


def _app_client(**settings: object) -> httpx.AsyncClient:
    app = create_app(Settings(**settings), MemoryBroker())
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.mark.anyio
async def test_page_headers_cache_and_csp() -> None:
    async with _app_client() as client:
        page = await client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == CSP
        assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP and "unsafe-eval" not in CSP
        assert page.headers["cache-control"] == "no-cache" and page.headers["x-content-type-options"] == "nosniff"
        html = page.text
        assert "<script>" not in html and re.search(r"<[^>]*\son\w+\s*=", html) is None  # no inline code
        assert "style=" not in html and "{{" not in html
        again = await client.get("/", headers={"If-None-Match": page.headers["etag"]})
        assert again.status_code == 304 and again.content == b""

        _, assets = load_page()
        for name, asset in assets.items():
            url = f"/ui/{name}?v={asset.etag[:8]}"
            assert url in html
            got = await client.get(url)
            assert got.status_code == 200 and got.content == asset.body
            assert got.headers["cache-control"] == "public, max-age=31536000, immutable"
            stale = await client.get(f"/ui/{name}?v=00000000")  # an old page's URL: served, but revalidated
            assert stale.headers["cache-control"] == "no-cache"
        missing = await client.get("/ui/evil.js")
        assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"


@pytest.mark.anyio
async def test_page_auth_exemption_follows_settings() -> None:
    async with _app_client(api_keys=[API_KEY]) as client:  # default: open like /docs; the API is not
        assert (await client.get("/")).status_code == 200
        assert (await client.get("/v1/models")).status_code == 401
    async with _app_client(api_keys=[API_KEY], auth_exempt_web_page=False) as client:
        refused = await client.get("/")
        assert refused.status_code == 401 and refused.json()["title"] == "Missing or invalid API key"
        assert (await client.get("/", headers={"X-API-Key": API_KEY})).status_code == 200
    async with _app_client(web_page=False) as client:
        assert (await client.get("/")).status_code == 404


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium; without one the browser test skips, except under CI where it must run."""
    found = find_chromium()
    problem = None
    if found is None:
        problem = "no Chromium: apt-get install chromium (.ci/run does it)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "the playwright package is missing (pip install -e '.[dev]')"
    if problem is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {problem}")
        pytest.skip(problem)
    assert found is not None
    return found


def test_page_in_headless_chromium(
    chromium: str, tiny_dir: Callable[[Family, Task], Path], tmp_path: Path, record_property
) -> None:
    """Upload the sample image, wait for depth, normals and uncertainty, check the pictures, then a bad
    parameter's problem shown in every panel, then a Marigold run with steps and the step-change uncertainty.
    The screenshot stays in the test's tmp dir."""
    specs = []
    for task in ("depth", "normals"):
        spec = tmp_path / f"g-{task}.toml"
        spec.write_text(f'id = "g-{task}"\nsource = "{tiny_dir("lotus-g", task)}"\nprocessing_res = 64\n')
        specs += ["--model", str(spec)]
    marigold = tmp_path / "m-depth.toml"
    marigold.write_text(f'id = "m-depth"\nsource = "{tiny_dir("marigold", "depth")}"\nprocessing_res = 64\n')
    specs += ["--model", str(marigold)]
    screenshot = tmp_path / "web-page.png"
    with serving([*specs, "--api-key", API_KEY]) as base:
        run = drive(
            base, screenshot, SAMPLE, api_key=API_KEY, chromium=chromium, try_bad_parameter=True,
            download_to=tmp_path, multi_step_model="m-depth",
        )  # fmt: skip
    record_property("screenshot", str(screenshot))
    print(f"screenshot: {screenshot}")

    assert run.models_error is not None and run.models_error.startswith("Missing or invalid API key")
    width, height = Image.open(SAMPLE).size
    assert run.input_natural == (width, height)
    for task in TASKS:
        panel = run.panels[task]
        assert panel["natural"] == [width, height], (task, panel)  # maps come back at the input's size
        box_w, box_h = panel["box"]
        assert box_w > 100 and abs(box_w / box_h - width / height) < 0.02, (task, panel)
        assert panel["opaque"] == 1.0 and panel["range"][1] > 0, (task, panel)  # drawn, not blank
        assert "batch of" in panel["meta"] and "total" in panel["meta"], panel["meta"]
    assert run.panels["depth"]["meta"].startswith("g-depth (depth)")
    assert run.panels["normals"]["meta"].startswith("g-normals (normals)")
    png16, npy = run.downloads["depth.png"], run.downloads["depth.npy"]
    assert png16.name == "sample-depth.png" and npy.name == "sample-depth.npy"
    depth = np.load(npy, allow_pickle=False)
    assert depth.dtype == np.float32 and depth.shape == (height, width)
    assert np.array_equal(np.asarray(Image.open(png16)), np.round(depth * 65535).astype(np.uint16))
    for task, error in run.invalid_errors.items():
        assert error.startswith("Invalid parameter: processing_res"), (task, error)
    # a multi-step model: steps and the step-change method reach it (single-step models are sent neither)
    assert run.multi_step["depth"].startswith("m-depth (depth)") and "; 3 steps" in run.multi_step["depth"]
    assert run.multi_step["uncertainty"].startswith("m-depth") and "; 3 steps" in run.multi_step["uncertainty"]
    assert run.multi_step["uncertainty"].endswith("; method steps")
    assert run.panels["uncertainty"]["meta"].endswith("; method seeds")
    assert "steps" not in run.panels["depth"]["meta"]
    assert run.csp_violations == [] and run.console_errors == []
    shot = Image.open(screenshot)
    assert shot.size[0] == 1400 and shot.size[1] >= 600


@contextlib.contextmanager
def docs_server() -> Iterator[str]:
    """The REST app (no models: the docs need none) on a real uvicorn server on loopback; its base URL."""
    server = uvicorn.Server(
        uvicorn.Config(create_app(Settings(), MemoryBroker()), host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.parametrize(
    ("path", "operation_selector"),
    [("/docs", ".opblock-summary"), ("/redoc", "[data-section-id^='operation/']")],
)
def test_docs_work_offline(chromium: str, path: str, operation_selector: str) -> None:
    """Swagger UI and ReDoc load their assets from this server and render every operation, with every request
    beyond the server's own host aborted, as on a network without internet access."""
    with docs_server() as base:
        spec = httpx.get(f"{base}/openapi.json").json()
        run = open_docs(base, path, operation_selector, chromium)
    assert run.blocked == [] and all(url.startswith(base) for url in run.requests), run.requests
    assert any("/docs-assets/" in url for url in run.requests) and f"{base}/openapi.json" in run.requests
    summaries = [op["summary"] for item in spec["paths"].values() for op in item.values()]
    assert len(run.operations) == len(summaries), run.operations
    for summary in summaries:
        assert any(summary in shown for shown in run.operations), (summary, run.operations)
    # ReDoc's sidebar asks for its logo from its CDN: the pages' CSP stops that in the browser (no request)
    blocked_by_csp = [e for e in run.console_errors if "violates the following Content Security Policy" in e]
    assert run.console_errors == blocked_by_csp and (path == "/redoc" or not blocked_by_csp), run.console_errors
