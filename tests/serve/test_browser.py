"""The web page in a real browser: upload scans, see stage, chart, Grad-CAM and summary.

Debian's Chromium (``/usr/bin/chromium``) driven by Playwright, against ``alzstage
serve``'s app running in uvicorn on 127.0.0.1 with the session's demo champion. The
browser is started with the flags this machine's closed network needs, and the test
also proves the page never asks for anything but this server (no CDN).

The screenshot lands in ``reports/test-artifacts/`` (git-ignored; override with
``ALZSTAGE_TEST_ARTIFACTS``) so a person can look at what the test saw.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import uvicorn_in_thread
from PIL import Image

from alzstage.serve.demo import DemoChampion

CHROMIUM = Path("/usr/bin/chromium")
# Headless, as root, on a machine with no route out: without the background-networking
# flags Chromium keeps trying (and failing) to reach Google's services.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(
    os.environ.get(
        "ALZSTAGE_TEST_ARTIFACTS",
        Path(__file__).resolve().parents[2] / "reports" / "test-artifacts",
    )
)

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian chromium at /usr/bin/chromium "
        "(apt-get install -y --no-install-recommends chromium)",
    ),
]


@pytest.fixture(scope="module")
def server(demo: DemoChampion) -> Iterator[str]:
    """The real app under uvicorn in a background thread; yields its base URL."""
    from alzstage.serve.app import ServeSettings, create_app

    app = create_app(ServeSettings(model_uri=demo.uri, tracking_uri=demo.tracking_uri))
    with uvicorn_in_thread(app) as url:
        yield url


def _png(path: Path, gray: np.ndarray) -> Path:
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


def test_upload_shows_stage_chart_gradcam_and_summary(
    server: str, tmp_path: Path, mri_slices: list[np.ndarray]
) -> None:
    from test_ood import photo_like

    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    scans = [
        _png(tmp_path / "slice_a.png", mri_slices[0]),
        _png(tmp_path / "slice_b.png", mri_slices[1]),
    ]
    holiday = _png(tmp_path / "holiday.png", photo_like(0))  # not a brain: no stage
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not a PNG")
    requested: list[str] = []

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1400})
            page.on("request", lambda req: requested.append(req.url))
            console_errors: list[str] = []
            page.on(
                "console", lambda m: console_errors.append(m.text) if m.type == "error" else None
            )
            page.goto(server + "/")

            expect = sync_api.expect
            expect(page.get_by_test_id("notice")).to_contain_text("Research use only")
            expect(page.get_by_test_id("notice")).to_contain_text("not a diagnosis")
            # The model version is shown before anything is uploaded.
            expect(page.get_by_test_id("model-version")).to_contain_text(
                "alzstage-demo v1", timeout=60_000
            )
            # ...with what it was trained on: the demo model is flagged as synthetic.
            expect(page.get_by_test_id("model-version")).to_contain_text("trained on dataset demo")
            expect(page.get_by_test_id("synthetic-demo")).to_be_visible()

            page.set_input_files("#files", [str(p) for p in [*scans, holiday, bad]])
            page.click("#submit")
            stages = page.get_by_test_id("stage")
            expect(stages).to_have_count(2, timeout=90_000)
            classes = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]
            for i in range(2):
                assert stages.nth(i).inner_text() in classes
            # One probability chart per readable scan, one bar per class.
            charts = page.get_by_test_id("prob-chart")
            expect(charts).to_have_count(2)
            assert charts.first.locator("rect.bar").count() == len(classes)
            # Grad-CAM overlays decoded by the browser, beside the originals (the
            # out-of-distribution image is shown too, without an overlay).
            for kind, n in (("gradcam", 2), ("original", 3)):
                imgs = page.get_by_test_id(kind)
                expect(imgs).to_have_count(n)
                for i in range(n):
                    assert imgs.nth(i).evaluate("img => img.complete && img.naturalWidth > 0")
            # The photograph gets no stage, only why.
            expect(page.get_by_test_id("ood")).to_have_count(1)
            expect(page.get_by_test_id("ood")).to_contain_text("Out of distribution")
            expect(page.get_by_test_id("ood-reason")).to_contain_text("not like the training MRI")
            # The unreadable file is reported, the batch still answered.
            expect(page.get_by_test_id("error")).to_contain_text("HTTP 415")
            summary = page.get_by_test_id("summary")
            expect(summary).to_be_visible()
            assert page.get_by_test_id("distribution-chart").locator("rect.bar").count() == 4
            expect(page.locator("#confidence-table tbody tr")).to_have_count(4)
            expect(page.locator("#confidence-table")).to_contain_text("out of distribution")
            expect(page.locator("#status")).to_contain_text("alzstage-demo v1 (synthetic demo")

            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "browser-predict.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
        finally:
            browser.close()

    outside = [u for u in requested if not u.startswith((server, "data:", "blob:"))]
    assert outside == [], f"the page requested something other than its own server: {outside}"
    assert not console_errors, console_errors


def test_api_docs_render_offline(server: str) -> None:
    """Swagger UI comes from the installed package (fastapi-offline), not a CDN."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    requested: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page()
            page.on("request", lambda req: requested.append(req.url))
            page.goto(server + "/docs")
            sync_api.expect(page.locator(".swagger-ui .info .title")).to_contain_text(
                "alzstage", timeout=30_000
            )
            sync_api.expect(page.locator(".opblock-summary-path").first).to_be_visible()
            paths = page.locator(".opblock-summary-path").all_inner_texts()
            assert {"/predict", "/model", "/health"} <= {p.strip() for p in paths}
        finally:
            browser.close()
    outside = [u for u in requested if not u.startswith((server, "data:", "blob:"))]
    assert outside == [], outside
