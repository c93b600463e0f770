"""Operating ``alzstage serve`` (issue 24 part 6): what an operator can check from outside.

``/health`` reports the limits the server runs with, a file name too long for the
multipart parser gets a 400 naming that limit, and the API docs pages have a content
security policy that still lets them render (checked in a real browser when Debian's
Chromium is there). The MLflow model's side of part 6 (short 400s, confidence and
version in its answer) is in ``tests/inference/test_one_decode_path.py``.
"""

from __future__ import annotations

import base64
import hashlib
import re

import numpy as np
import pytest
from conftest import png_of, uvicorn_in_thread
from fastapi.testclient import TestClient
from test_browser import CHROMIUM, CHROMIUM_ARGS  # as test_browser.py starts it

from alzstage.serve.app import ServeSettings, create_app
from alzstage.serve.demo import DemoChampion


def _bare_app(**settings: object):
    """An app whose model is never needed by these tests (nothing gets that far)."""
    return create_app(ServeSettings(model_uri="/no/such/model.keras", **settings))


def test_health_reports_the_limits_the_server_runs_with() -> None:
    # given a server started with non-default limits, as `alzstage serve` flags set them
    given = {
        "max_file_bytes": 1234,
        "max_request_bytes": 5678,
        "max_files": 3,
        "max_volume_bytes": 999,
        "max_pixels": 100,
        "max_request_pixels": 400,
        "max_concurrent": 1,
        "max_queued": 0,
        "allowed_origins": ("https://a.team",),
        "allowed_hosts": ("alz.internal",),
    }
    with TestClient(_bare_app(**given)) as client:
        # when an operator asks /health
        body = client.get("/health").json()
    # then every limit is there, as given, beside the fixed ones
    assert body["status"] == "ok" and body["model_loaded"] is False
    limits = body["limits"]
    for key, value in given.items():
        assert limits[key] == (list(value) if isinstance(value, tuple) else value), key
    assert limits["max_filename_header_bytes"] == 4224
    assert limits["shown_filename_chars"] == 200 and limits["body_timeout_s"] == 60.0


def test_health_limits_default_to_the_serve_defaults() -> None:
    with TestClient(_bare_app()) as client:
        limits = client.get("/health").json()["limits"]
    defaults = ServeSettings()
    assert limits["max_file_bytes"] == defaults.max_file_bytes == 20 * 2**20
    assert limits["max_request_pixels"] == defaults.max_request_pixels


def test_a_5000_character_file_name_gets_a_400_naming_the_limit(
    demo: DemoChampion, mri_slices: list[np.ndarray]
) -> None:
    # given the server and a good slice
    app = create_app(ServeSettings(model_uri=demo.uri, tracking_uri=demo.tracking_uri))
    data = png_of(mri_slices[0])
    with TestClient(app) as client:
        # when it is sent under a 5,000-character name, and under a 300-character one
        long = client.post("/predict", files=[("files", ("a" * 5000 + ".png", data, "image/png"))])
        fine = client.post("/predict", files=[("files", ("b" * 300 + ".png", data, "image/png"))])
    # then the first is a 400 that names the limit and the fix
    assert long.status_code == 400
    detail = long.json()["detail"]
    assert "4,224 bytes" in detail and "file name" in detail and "rename the file" in detail
    # and the second is answered, its name shown cut to 200 characters
    assert fine.status_code == 200, fine.text
    assert fine.json()["predictions"][0]["filename"] == "b" * 200


def test_other_malformed_multipart_keeps_its_own_answer() -> None:
    # a body that is not multipart at all is not blamed on a file name
    with TestClient(_bare_app()) as client:
        r = client.post(
            "/predict",
            content=b"--xyz\r\nnot a header\r\n\r\n",
            headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        )
    assert r.status_code in (400, 422) and "file name" not in r.text


def _inline_scripts(html: str) -> list[str]:
    return re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/docs/oauth2-redirect"])
def test_docs_pages_have_a_csp_that_allows_only_their_own_inline_script(path: str) -> None:
    # given the server; when a docs page is fetched
    with TestClient(_bare_app()) as client:
        r = client.get(path)
    # then it has a policy: own origin only, no inline script but its own by hash
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "object-src 'none'" in csp
    assert "frame-ancestors 'none'" in csp
    script_src = csp.split("script-src", 1)[1].split(";", 1)[0]
    assert "'unsafe-inline'" not in script_src and "'unsafe-eval'" not in script_src
    hashes = re.findall(r"'sha256-([^']+)'", script_src)
    want = [
        base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()
        for s in _inline_scripts(r.text)
    ]
    assert hashes == want
    assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium at /usr/bin/chromium")
def test_docs_render_in_a_browser_under_their_csp() -> None:
    """Swagger UI and ReDoc still work with the policy on: only outside loads are blocked."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    violations: list[str] = []
    with uvicorn_in_thread(_bare_app()) as url, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page()
            page.on(
                "console",
                lambda m: violations.append(m.text) if "Content Security Policy" in m.text else 0,
            )
            page.goto(url + "/docs")
            sync_api.expect(page.locator(".swagger-ui .info .title")).to_contain_text(
                "alzstage", timeout=30_000
            )
            sync_api.expect(page.locator(".opblock-summary-path").first).to_be_visible()
            page.goto(url + "/redoc")
            sync_api.expect(page.locator("h1").first).to_contain_text("alzstage", timeout=30_000)
        finally:
            browser.close()
    # nothing of the server's own, inline or eval'd was blocked; what was blocked is an
    # outside address (ReDoc's built-in logo from its CDN): the policy doing its job
    own = [v for v in violations if url in v or "inline" in v or "eval" in v]
    assert own == [], own
    assert all(re.search(r"'https?://(?!127\.0\.0\.1)", v) for v in violations), violations
