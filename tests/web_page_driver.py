"""Drive the demo page (`GET /`) in a real headless Chromium: Debian's `chromium` through Playwright's Python
API (`executable_path`; Playwright's own browser download is never used).

Used by tests/test_web_page.py, and to refresh docs/client.md's screenshot against the default models (the
shipped demo depth model and the tiny Lotus-G checkpoints):

    .venv/bin/python -m tests.web_page_driver --out docs/web-page.png
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "assets" / "sample.png"
TASKS = ("depth", "normals", "uncertainty")
#: Watches the page for Content-Security-Policy violations (injected by the browser, so the CSP allows it).
CSP_WATCH = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`));
"""
#: Per map image: natural size, rendered box, and whether its pixels are more than one flat colour.
IMAGE_FACTS = """
(img) => {
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  let opaque = 0, min = 255, max = 0;
  for (let i = 0; i < px.length; i += 4) {
    if (px[i + 3] === 255) opaque += 1;
    for (let c = 0; c < 3; c++) { min = Math.min(min, px[i + c]); max = Math.max(max, px[i + c]); }
  }
  const box = img.getBoundingClientRect();
  return {natural: [img.naturalWidth, img.naturalHeight], box: [box.width, box.height],
          opaque: opaque / (px.length / 4), range: [min, max]};
}
"""
#: The pixels an image element holds, at its natural size, as a PNG data URL (read back through a canvas).
DRAWN_PIXELS = """
(el) => {
  const canvas = document.createElement("canvas");
  canvas.width = el.naturalWidth || el.width;
  canvas.height = el.naturalHeight || el.height;
  canvas.getContext("2d").drawImage(el, 0, 0);
  return canvas.toDataURL("image/png");
}
"""
#: Points the depth panel at the uploaded photo, the failure the pixel comparison must catch.
PHOTO_IN_DEPTH_PANEL = """
() => new Promise((resolve) => {
  const img = document.querySelector("#panel-depth img");
  img.onload = resolve;
  img.src = document.querySelector("#panel-input img").src;
})
"""


def rgb(png: bytes) -> np.ndarray:
    """`[H, W, 3]` uint8 of a PNG (screenshots and canvas read-backs are RGBA)."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def data_url_rgb(url: str) -> np.ndarray:
    return rgb(base64.b64decode(url.split(",", 1)[1]))


def find_chromium() -> str | None:
    """Debian's `chromium` (or `CHROMIUM` from the environment)."""
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "/usr/bin/chromium"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(args: list[str], env: dict[str, str] | None = None, ready_timeout_s: float = 240.0) -> Iterator[str]:
    """`dense-serve serve ARGS` on a free port (gRPC off), until ready; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port), *args],
        cwd=REPO,
        env={**os.environ, "DENSE_GRPC_ENABLED": "false", "DENSE_LOG_LEVEL": "warning", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"dense-serve exited: {proc.stderr.read() if proc.stderr else ''}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > end:
                raise TimeoutError("dense-serve did not become ready")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@dataclass
class PageRun:
    """What the page showed."""

    models_error: str | None = None
    panels: dict[str, dict] = field(default_factory=dict)  # task -> meta, model and notice texts + IMAGE_FACTS
    drawn: dict[str, np.ndarray] = field(default_factory=dict)  # task -> the map's pixels the page holds
    shown: dict[str, np.ndarray] = field(default_factory=dict)  # task -> a screenshot of the map as shown
    legends: dict[str, np.ndarray] = field(default_factory=dict)  # near-far, low-high bars; normals sphere
    photo_swapped: dict[str, np.ndarray] = field(default_factory=dict)  # drawn/shown after PHOTO_IN_DEPTH_PANEL
    input_natural: tuple[int, int] = (0, 0)
    invalid_errors: dict[str, str] = field(default_factory=dict)  # task -> error text after a bad parameter
    multi_step: dict[str, str] = field(default_factory=dict)  # task -> meta text of a multi-step model's run
    downloads: dict[str, Path] = field(default_factory=dict)  # "depth.npy" -> the file the page saved
    csp_violations: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)


def drive(
    base: str,
    screenshot: Path,
    image: Path = SAMPLE,
    api_key: str | None = None,
    chromium: str | None = None,
    try_bad_parameter: bool = False,
    download_to: Path | None = None,
    timeout_ms: float = 120_000,
    multi_step_model: str | None = None,
    photo_in_depth_panel: bool = False,
) -> PageRun:
    """Open the page, (enter the key,) upload `image`, wait for the three maps, screenshot the page; optionally
    download the depth map as PNG16 and NPY into `download_to`, then run with `processing_res = 7` and collect
    the errors the panels show; with `multi_step_model`, last, run depth and uncertainty on that model with
    `steps = 3` and the step-change method and collect the panels' meta text; with `photo_in_depth_panel`,
    last, show the uploaded photo in the depth panel and read its pixels again (what a broken page would do)."""
    from playwright.sync_api import sync_playwright

    run = PageRun()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium or find_chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 820})
            page.set_default_timeout(timeout_ms)
            page.add_init_script(CSP_WATCH)
            page.on("console", lambda m: run.console_errors.append(m.text) if m.type == "error" else None)
            page.goto(f"{base}/")
            if api_key is not None:
                page.wait_for_selector("#error:not([hidden])")  # /v1/models refused without the key
                run.models_error = page.inner_text("#error")
                run.console_errors.clear()  # the 401 above is expected
                page.fill("#api-key", api_key)
                page.press("#api-key", "Enter")
                page.wait_for_selector("#error", state="hidden")
            page.wait_for_selector("#model-depth option:not([value=''])", state="attached")
            page.set_input_files("#file", str(image))
            for task in TASKS:
                page.wait_for_selector(f"#panel-{task}[data-state=done]")
                facts = page.eval_on_selector(f"#panel-{task} img", IMAGE_FACTS)
                notice = page.locator(f"#panel-{task} .random-weights")
                run.panels[task] = {
                    "meta": page.inner_text(f"#panel-{task} .meta"),
                    "model": page.inner_text(f"#panel-{task} .model"),
                    "notice": notice.inner_text() if notice.is_visible() else None,
                    **facts,
                }
                run.drawn[task] = data_url_rgb(page.eval_on_selector(f"#panel-{task} img", DRAWN_PIXELS))
                run.shown[task] = rgb(page.locator(f"#panel-{task} img").screenshot())
            for bar in ("near-far", "low-high"):
                run.legends[bar] = rgb(page.locator(f".bar.{bar}").first.screenshot())
            run.legends["sphere"] = data_url_rgb(page.eval_on_selector("#panel-normals .sphere", DRAWN_PIXELS))
            page.wait_for_selector("#panel-input[data-state=done]")
            natural = page.eval_on_selector("#panel-input img", "(i) => [i.naturalWidth, i.naturalHeight]")
            run.input_natural = (natural[0], natural[1])
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            if download_to is not None:
                for fmt in ("png", "npy"):
                    with page.expect_download() as info:
                        page.click(f"#panel-depth button[data-format={fmt}]")
                    target = download_to / info.value.suggested_filename
                    info.value.save_as(target)
                    run.downloads[f"depth.{fmt}"] = target
            if try_bad_parameter:
                page.fill("#processing-res", "7")
                page.click("#run")
                for task in TASKS:
                    page.wait_for_selector(f"#panel-{task}[data-state=error]")
                    run.invalid_errors[task] = page.inner_text(f"#panel-{task} .error")
                run.console_errors = [e for e in run.console_errors if "422" not in e]  # expected refusals
            if multi_step_model is not None:
                page.fill("#processing-res", "")
                page.select_option("#model-depth", multi_step_model)
                page.select_option("#model-uncertainty", multi_step_model)
                page.fill("#steps", "3")
                page.select_option("#uncertainty-method", "steps")
                page.click("#run")
                for task in ("depth", "uncertainty"):
                    page.wait_for_selector(f"#panel-{task}[data-state=done]")
                    run.multi_step[task] = page.inner_text(f"#panel-{task} .meta")
            if photo_in_depth_panel:
                page.evaluate(PHOTO_IN_DEPTH_PANEL)
                run.photo_swapped["drawn"] = data_url_rgb(page.eval_on_selector("#panel-depth img", DRAWN_PIXELS))
                run.photo_swapped["shown"] = rgb(page.locator("#panel-depth img").screenshot())
            run.csp_violations = page.evaluate("window.__cspViolations")
        finally:
            browser.close()
    return run


@dataclass
class DocsRun:
    """What a docs page (Swagger UI, ReDoc) showed, and every URL it asked for."""

    requests: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)  # requests to anywhere but the server: aborted
    operations: list[str] = field(default_factory=list)  # the texts of `operation_selector`'s elements
    console_errors: list[str] = field(default_factory=list)


def open_docs(
    base: str, path: str, operation_selector: str, chromium: str | None = None, timeout_ms: float = 60_000
) -> DocsRun:
    """Open `base + path` with every request outside `base`'s host aborted (as on a network without internet
    access), wait until the page shows `operation_selector`, and collect its elements' texts."""
    from urllib.parse import urlsplit

    from playwright.sync_api import Route, sync_playwright

    host = urlsplit(base).hostname
    run = DocsRun()

    def gate(route: Route) -> None:
        url = route.request.url
        run.requests.append(url)
        if urlsplit(url).hostname == host or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            run.blocked.append(url)
            route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium or find_chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(timeout_ms)
            page.on("console", lambda m: run.console_errors.append(m.text) if m.type == "error" else None)
            page.route("**/*", gate)
            page.goto(f"{base}{path}")
            page.wait_for_selector(operation_selector)
            page.wait_for_load_state("networkidle")
            run.operations = [" ".join(t.split()) for t in page.locator(operation_selector).all_inner_texts()]
        finally:
            browser.close()
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "web-page.png")
    parser.add_argument("--image", type=Path, default=SAMPLE)
    args = parser.parse_args()
    if find_chromium() is None:
        print("no chromium found: apt-get install chromium", file=sys.stderr)
        return 1
    with serving([]) as base:
        result = drive(base, args.out, args.image)
    for task, panel in result.panels.items():
        print(f"{task}: {panel['model']}; {panel['meta']}")
        if panel["notice"]:
            print(f"  {panel['notice']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
