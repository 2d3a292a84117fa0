"""The page's Sketch tab in headless Chromium: draw over the real case's lesion, see its patient first."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any as Case

import numpy as np
import pytest

from medret.sketch.encoder import RasterEncoder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sketch_url(lesion_index: str) -> Iterator[str]:
    import uvicorn

    from medret.serve.app import create_app
    from medret.serve.config import ServiceConfig
    from medret.serve.service import Service
    from medret.storage.s3local import free_port

    port = free_port()
    app = create_app(Service(ServiceConfig(index=lesion_index)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=30)


def outline(plane: np.ndarray) -> list[tuple[float, float]]:
    """The convex hull of a lesion plane, (x, y) box pixels, counter-clockwise."""
    from scipy.spatial import ConvexHull

    pts = np.argwhere(plane)[:, ::-1].astype(float) + 0.5
    hull = ConvexHull(pts)
    return [(float(pts[i, 0]), float(pts[i, 1])) for i in hull.vertices]


def test_draw_over_the_real_lesion_and_see_its_patient_first(
    sketch_url: str, encoder: RasterEncoder, tcga_case: Case, tmp_path: Path
) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (.ci/run does)")
        pytest.skip("no chromium installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    tg = encoder.grid
    level = int(np.argmax([(tcga_case.carried[tg.slab(i)] == 1).sum() for i in range(tg.n_levels)]))
    plane = tg.box((tcga_case.carried[tg.slab(level)] == 1).mean(axis=0)) >= 0.5
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.goto(sketch_url + "#sketch")
        page.wait_for_selector("#sketch-class option", state="attached")
        assert "32 patients are sketch-searchable" in page.inner_text("#sketch-count")
        assert page.locator("#images-view").is_hidden() and page.locator("#sketch-view").is_visible()
        page.eval_on_selector(
            "#sketch-level", "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", str(level)
        )
        page.wait_for_function("document.getElementById('sketch-template').naturalWidth > 0")
        page.select_option("#sketch-class", "edema")
        page.select_option("#sketch-tool", "polygon")
        box = page.locator("#sketch-canvas").bounding_box()
        assert box is not None
        scale = box["width"] / tg.width
        for x, y in outline(plane):
            page.mouse.click(box["x"] + x * scale, box["y"] + y * scale)
        page.click("#sketch-close")
        page.select_option("#sketch-tool", "brush")  # and a brush dab inside it
        cy, cx = np.argwhere(plane).mean(axis=0)
        page.mouse.click(box["x"] + cx * scale, box["y"] + cy * scale)
        page.click("#sketch-go")
        page.wait_for_selector(".sketch-hit")
        cards = page.locator(".sketch-hit")
        assert cards.first.get_attribute("data-patient") == "TCGA-FG-6692"
        assert "Dice 0." in cards.first.inner_text() or "Dice 1." in cards.first.inner_text()
        page.wait_for_function("document.querySelector('.sketch-hit img').naturalWidth > 0")
        assert "cells" in page.inner_text("#sketch-query")
        # the eraser takes the drawing away again: the search then says so
        page.click("#sketch-clear")
        page.click("#sketch-go")
        page.wait_for_function("document.getElementById('sketch-status').textContent.includes('Draw a lesion first')")
        page.screenshot(path=str(tmp_path / "sketch.png"), full_page=True)
        keep = os.environ.get("MEDRET_ARTIFACTS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "sketch.png", Path(keep) / "sketch-page.png")
        browser.close()
    assert (tmp_path / "sketch.png").stat().st_size > 10_000
