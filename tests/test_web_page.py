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

from models.colormap import spectral
from models.outputs import FAMILY_NORMALS_AXES, Family, NormalsAxes, Task
from service.api.app import create_app
from service.api.routes_page import CSP, load_page
from service.codec import quantize_normals
from service.config import Settings
from service.queue.memory import MemoryBroker
from tests.conftest import SAMPLE
from tests.test_random_weights import trained_copy
from tests.web_page_driver import TASKS, PageRun, drive, find_chromium, free_port, open_docs, rgb, serving

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
    """Upload the sample image, wait for depth, normals and uncertainty, check that each panel shows the
    server's colour answer for its model (and not the photo), the random-weight notice only where the model is
    random, the legends in the server's colours, then a bad parameter's problem shown in every panel, then a
    Marigold run with steps and the step-change uncertainty. The screenshot stays in the test's tmp dir."""
    # depth (and uncertainty): a random-weight tiny checkpoint; normals: the same files without the mark, as a
    # fine-tune export writes them (tests/test_random_weights.py), so the page must call it trained
    trained_normals = trained_copy(tiny_dir("lotus-g", "normals"), tmp_path / "trained-normals", "lotus-g", "normals")
    specs = []
    for task, source in (("depth", tiny_dir("lotus-g", "depth")), ("normals", trained_normals)):
        spec = tmp_path / f"g-{task}.toml"
        spec.write_text(f'id = "g-{task}"\nsource = "{source}"\ntask = "{task}"\nprocessing_res = 64\n')
        specs += ["--model", str(spec)]
    marigold = tmp_path / "m-depth.toml"
    marigold.write_text(f'id = "m-depth"\nsource = "{tiny_dir("marigold", "depth")}"\nprocessing_res = 64\n')
    specs += ["--model", str(marigold)]
    screenshot = tmp_path / "web-page.png"
    with serving([*specs, "--api-key", API_KEY]) as base:
        run = drive(
            base, screenshot, SAMPLE, api_key=API_KEY, chromium=chromium, try_bad_parameter=True,
            download_to=tmp_path, multi_step_model="m-depth", photo_in_depth_panel=True,
        )  # fmt: skip
        answers = {task: colour_answer(base, task, model) for task, model in PANEL_MODELS.items()}
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
    check_pixels(run, answers, record_property)
    check_notices_and_legends(run)
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


#: The model each panel runs in test_page_in_headless_chromium (the first of its kind in the model lists).
PANEL_MODELS = {"depth": "g-depth", "normals": "g-normals", "uncertainty": "g-depth"}
#: Mean absolute difference (0-255) between a panel's pixels and the server's colour answer, at most: the page
#: holds the answer's bytes (read back: 0 unless batching changed a rounding), and shows them scaled to its box.
DRAWN_MAX, SHOWN_MAX = 1.0, 4.0
#: ... and at least, between the server's answer and the uploaded photo (what a broken panel would show).
PHOTO_MIN = 30.0


def colour_answer(base: str, task: str, model: str) -> np.ndarray:
    """The server's colour preview of the sample for `task` by `model`, asked for directly (not by the page)."""
    params = {"model": model, "format": "color", **({"task": "depth"} if task == "uncertainty" else {})}
    answer = httpx.post(
        f"{base}/v1/{task}", params=params, content=SAMPLE.read_bytes(), timeout=120,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "image/png"},
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    return rgb(answer.content)


def mad(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two RGB images, `b` scaled to `a`'s size when they differ."""
    if a.shape != b.shape:
        b = np.asarray(Image.fromarray(b).resize((a.shape[1], a.shape[0]), Image.Resampling.BOX))
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def check_pixels(run: PageRun, answers: dict[str, np.ndarray], record_property) -> None:
    """Each panel holds and shows its own answer, far from the photo; a panel showing the photo fails."""
    photo = rgb(SAMPLE.read_bytes())
    for task in TASKS:
        drawn, shown, answer = run.drawn[task], run.shown[task], answers[task]
        scores = {"drawn": mad(drawn, answer), "shown": mad(shown, answer), "photo": mad(drawn, photo)}
        record_property(f"pixels_{task}", scores)
        print(f"{task}: mean abs diff {scores}")
        assert drawn.shape == answer.shape and scores["drawn"] <= DRAWN_MAX, (task, scores)
        assert scores["shown"] <= SHOWN_MAX and scores["photo"] >= PHOTO_MIN, (task, scores)
        assert mad(answer, photo) >= PHOTO_MIN, task
    # the failure this check exists for: the depth panel showing the uploaded photo instead of its map
    swapped = run.photo_swapped
    assert mad(swapped["drawn"], photo) == 0.0 and mad(swapped["shown"], photo) <= SHOWN_MAX
    assert mad(swapped["drawn"], answers["depth"]) >= PHOTO_MIN and mad(swapped["shown"], answers["depth"]) >= PHOTO_MIN


def check_notices_and_legends(run: PageRun) -> None:
    """The random-weight notice where the model is random (depth, uncertainty) and not where it is trained;
    each panel names its model and processing_res; the legends are the server's colours."""
    for task in ("depth", "uncertainty"):
        notice = run.panels[task]["notice"]
        assert notice is not None and notice.startswith("Random weights: g-depth") and "noise" in notice, notice
        assert run.panels[task]["model"] == "g-depth: lotus-g depth, processing_res 64; random weights"
    assert run.panels["normals"]["notice"] is None
    assert run.panels["normals"]["model"] == "g-normals: lotus-g normals, processing_res 64; trained"
    # depth: near (0) to far (1) left to right; uncertainty: low to high, Spectral reversed (service codec)
    for bar, values in (("near-far", lambda t: t), ("low-high", lambda t: 1.0 - t)):
        row = run.legends[bar][run.legends[bar].shape[0] // 2]
        expected = spectral(values((np.arange(len(row)) + 0.5) / len(row)))
        assert mad(row[None], expected[None]) <= 3.0, bar
    # normals: a sphere facing the camera, coloured as the server colours a normal in Lotus' axes
    sphere = run.legends["sphere"]
    size = sphere.shape[0]
    u, v = np.meshgrid((np.arange(size) + 0.5) / (size / 2) - 1, 1 - (np.arange(size) + 0.5) / (size / 2))
    inside = u**2 + v**2 < 0.95
    opengl = np.stack([u, v, np.sqrt(np.clip(1 - u**2 - v**2, 0, 1))], axis=-1)
    expected = quantize_normals(NormalsAxes().convert(opengl, FAMILY_NORMALS_AXES["lotus-g"]))
    assert np.abs(sphere[inside].astype(int) - expected[inside].astype(int)).max() <= 1
    assert sphere[size // 2, size - 3, 0] < 40  # facing image right is low red in Lotus' axes (+x left)


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
