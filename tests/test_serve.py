"""``alzstage serve``: the REST API's contract, its limits and failure modes, and parity
with ``mlflow models serve``.

Everything runs against a real registered champion (see ``demo`` in test_predict.py,
built once per session) in a temporary sqlite store; nothing touches the repo's
``mlflow.db``.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, png_bytes, wait_until_up
from PIL import Image

from alzstage.serve.demo import DemoChampion

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from alzstage.serve.app import ServeSettings, create_app  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _app(demo: DemoChampion, **overrides: object):
    return create_app(
        ServeSettings(model_uri=demo.uri, tracking_uri=demo.tracking_uri, **overrides)
    )


@pytest.fixture(scope="module")
def client(demo: DemoChampion):
    with TestClient(_app(demo)) as c:
        yield c


def _files(*items: tuple[str, bytes, str]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", item) for item in items]


# --------------------------------------------------------------------------- endpoints


def test_health_does_not_need_the_model(demo: DemoChampion) -> None:
    with TestClient(_app(demo)) as c:
        r = c.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "model_loaded": False}


def test_model_reports_version_alias_and_registry_metrics(client, demo: DemoChampion) -> None:
    r = client.get("/model")
    assert r.status_code == 200
    body = r.json()
    assert body["name"] == "alzstage-demo" and body["alias"] == "champion"
    assert body["dataset"] == "demo" and body["synthetic_demo"] is True
    assert "SYNTHETIC" in body["provenance"] and body["recipe"] == "untrained"
    assert body["version"] == demo.version
    assert body["metrics"] == {"balanced_accuracy": 0.625, "macro_f1": 0.6, "accuracy": 0.7}
    assert body["split_strategy"] == "subject" and body["split_leaky"] is False
    assert body["classes"] == demo.classes and body["temperature"] == demo.temperature
    assert client.get("/health").json()["model_loaded"] is True


def test_predict_one_good_file_matches_the_pyfunc(client, demo: DemoChampion) -> None:
    import mlflow

    from alzstage.model.inputs import to_model_array
    from alzstage.model.predict import decode_image
    from alzstage.serve.demo import scoped_tracking_uri

    data = png_bytes(0)
    r = client.post("/predict", files=_files(("slice.png", data, "image/png")))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {
        "uri": demo.uri,
        "name": "alzstage-demo",
        "version": demo.version,
        "alias": "champion",
        "dataset": "demo",
        "recipe": "untrained",
        "synthetic_demo": True,
        "provenance": "trained on dataset demo (SYNTHETIC demo images, not real MRI: "
        "meaningless on real scans), recipe untrained (resnet50)",
    }
    (p,) = body["predictions"]
    assert p["status"] == 200 and p["error"] is None and p["gradcam"] is None
    assert (p["width"], p["height"]) == (44, 52)
    assert list(p["probabilities"]) == demo.classes
    with scoped_tracking_uri(demo.tracking_uri):
        ref = mlflow.pyfunc.load_model(demo.uri)
    expected = ref.predict(to_model_array(decode_image(data), demo.input_size)[None])
    got = np.array([p["probabilities"][c] for c in demo.classes])
    np.testing.assert_allclose(got, expected[demo.classes].to_numpy()[0], atol=1e-6)
    assert p["stage"] == expected["stage"][0] and p["confidence"] == pytest.approx(got.max())


def test_predict_with_gradcam_returns_an_overlay_png(client) -> None:
    r = client.post("/predict?gradcam=true", files=_files(("s.png", png_bytes(1), "image/png")))
    assert r.status_code == 200
    url = r.json()["predictions"][0]["gradcam"]
    assert url.startswith("data:image/png;base64,")
    import base64

    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (44, 52)


def test_bad_file_alone_is_415_and_corrupt_file_is_422(client) -> None:
    r = client.post("/predict", files=_files(("notes.txt", b"hello, not an image", "text/plain")))
    assert r.status_code == 415
    assert "notes.txt" in r.json()["detail"] and "JPEG or PNG" in r.json()["detail"]
    r = client.post("/predict", files=_files(("cut.png", png_bytes(2)[:120], "image/png")))
    assert r.status_code == 422
    assert r.json()["predictions"][0]["status"] == 422
    assert "truncated" in r.json()["detail"]


def test_mixed_batch_still_answers_the_good_files(client) -> None:
    r = client.post(
        "/predict",
        files=_files(
            ("a.png", png_bytes(3), "image/png"),
            ("notes.txt", b"plain text", "text/plain"),
            ("cut.png", png_bytes(4)[:120], "image/png"),
            ("b.png", png_bytes(5), "image/png"),
        ),
    )
    assert r.status_code == 200
    body = r.json()
    assert [p["status"] for p in body["predictions"]] == [200, 415, 422, 200]
    assert [p["filename"] for p in body["predictions"]] == [
        "a.png",
        "notes.txt",
        "cut.png",
        "b.png",
    ]
    assert body["predictions"][1]["stage"] is None and body["predictions"][3]["stage"]
    s = body["summary"]
    assert s["n_images"] == 4 and s["n_predicted"] == 2 and s["n_errors"] == 2
    assert sum(s["stage_counts"].values()) == 2


def test_missing_files_field_is_422_with_a_message(client) -> None:
    r = client.post("/predict")
    assert r.status_code == 422 and "multipart/form-data" in r.json()["detail"]


# --------------------------------------------------------------------------- limits


def test_oversize_file_is_413_and_the_rest_still_predicted(demo: DemoChampion) -> None:
    big = png_bytes(6, (300, 300))
    with TestClient(_app(demo, max_file_bytes=len(big) - 1)) as c:
        r = c.post("/predict", files=_files(("big.png", big, "image/png")))
        assert r.status_code == 413 and "--max-upload-mb" in r.json()["detail"]
        assert c.get("/health").json()["model_loaded"] is False  # refused before loading
        r = c.post(
            "/predict",
            files=_files(("big.png", big, "image/png"), ("ok.png", png_bytes(7), "image/png")),
        )
    assert r.status_code == 200
    assert [p["status"] for p in r.json()["predictions"]] == [413, 200]


def test_request_body_limit_413_declared_and_chunked(demo: DemoChampion) -> None:
    with TestClient(_app(demo, max_request_bytes=50_000)) as c:
        r = c.post("/predict", files=_files(("big.png", png_bytes(8, (400, 400)), "image/png")))
        assert r.status_code == 413 and "--max-request-mb" in r.json()["detail"]

        def chunks():  # no Content-Length: the limit must hold while streaming
            for _ in range(20):
                yield b"x" * 10_000

        r = c.post(
            "/predict",
            content=chunks(),
            headers={"Content-Type": "multipart/form-data; boundary=zzz"},
        )
        assert r.status_code == 413


def test_too_many_files_is_413(demo: DemoChampion) -> None:
    with TestClient(_app(demo, max_files=2)) as c:
        r = c.post(
            "/predict", files=_files(*[(f"{i}.png", png_bytes(i), "image/png") for i in range(3)])
        )
    assert r.status_code == 413 and "--max-files" in r.json()["detail"]


def test_decompression_bomb_is_422_not_a_crash(demo: DemoChampion) -> None:
    bomb = io.BytesIO()
    Image.new("L", (4000, 4000)).save(bomb, format="PNG")  # 16 MP in a few KB
    with TestClient(_app(demo, max_pixels=1_000_000)) as c:
        r = c.post("/predict", files=_files(("bomb.png", bomb.getvalue(), "image/png")))
    assert r.status_code == 422 and "decompression-bomb" in r.json()["detail"]


def test_no_disk_use_of_client_names_and_temp_files_cleaned(
    client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    # > 1 MiB, so Starlette spools it to a temp file rather than memory.
    noisy = png_bytes(9, (1200, 1200))
    assert len(noisy) > 1024 * 1024
    evil = "../../../../tmp/alzstage-evil.png"
    r = client.post("/predict", files=_files((evil, noisy, "image/png")))
    assert r.status_code == 200
    assert r.json()["predictions"][0]["filename"] == "alzstage-evil.png"  # display only
    assert not Path("/tmp/alzstage-evil.png").exists()
    assert list(spool.iterdir()) == []


# --------------------------------------------------------------------------- no champion


def test_no_champion_is_503_with_the_fix(tmp_path: Path) -> None:
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    app = create_app(ServeSettings(model_uri="models:/alzstage@champion", tracking_uri=empty))
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/health").status_code == 200
        for r in (
            c.get("/model"),
            c.post("/predict", files=_files(("a.png", png_bytes(0), "image/png"))),
        ):
            assert r.status_code == 503
            detail = r.json()["detail"]
            assert "dvc repro" in detail and "alzstage promote" in detail
            assert "Traceback" not in r.text


# --------------------------------------------------------------------------- CLI


def test_serve_command_binds_loopback_unless_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn
    from typer.testing import CliRunner

    from alzstage.cli import app

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.setenv("ALZSTAGE_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({"app": app, **kw}))

    result = CliRunner().invoke(app, ["serve", "--max-upload-mb", "2", "--max-files", "5"])
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["host"] == "127.0.0.1" and call["port"] == 8000
    settings = call["app"].state.settings
    assert settings.max_file_bytes == 2 * 2**20 and settings.max_files == 5
    assert settings.model_uri == "models:/alzstage-demo@champion"  # params: data.source demo
    assert "data.source: demo" in settings.model_choice
    assert settings.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert call["app"].state.model_cache.loaded is False  # lazy: nothing loaded at start
    assert "warning" not in result.output

    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--port", "9001"])
    assert result.exit_code == 0, result.output
    assert calls[-1]["host"] == "0.0.0.0" and calls[-1]["port"] == 9001
    assert "unauthenticated" in result.output


# --------------------------------------------------------------------------- page & docs


def test_page_is_self_contained_with_notice(client) -> None:
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "Research use only" in r.text and "not a diagnosis" in r.text
    static = Path(__file__).resolve().parents[1] / "src" / "alzstage" / "serve" / "static"
    for f in static.iterdir():
        text = f.read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text and "//cdn" not in text, f.name
    for asset in ("static/app.js", "static/app.css"):
        assert client.get(f"/{asset}").status_code == 200


def test_openapi_docs_are_served_without_a_cdn(client) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/model", "/health"} <= set(spec["paths"])
    docs = client.get("/docs").text
    assert "cdn." not in docs and "swagger-ui-bundle.js" in docs
    js = docs.split('src="', 1)[1].split('"', 1)[0]
    assert client.get(js).status_code == 200


# --------------------------------------------------------------------------- schemathesis


def test_api_conforms_to_its_openapi_schema(demo: DemoChampion) -> None:
    """Schemathesis-generated requests to every operation: no 5xx, every response
    (status code, content type, body) as documented in the OpenAPI schema.

    Driven through ``as_strategy`` in a plain test rather than ``schema.parametrize``,
    whose lazy-fixture loader does not run under pytest 9; bounded to a few examples
    per operation so the suite stays fast.
    """
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import positive_data_acceptance

    app = _app(demo, max_files=4)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/predict", "/model", "/health"}
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=12,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case) -> None:
            # Random bytes are schema-valid (a schema cannot say "a decodable PNG"), and
            # refusing them with the documented 415/422 is correct, so the "positive data
            # must be accepted" check does not apply; every other default check does.
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        check()


# --------------------------------------------------------------------------- mlflow serve


@pytest.mark.integration
def test_mlflow_models_serve_returns_the_cli_probabilities(
    demo: DemoChampion, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``mlflow models serve`` on the champion == ``alzstage predict`` within 1e-5."""
    from typer.testing import CliRunner

    from alzstage.cli import app
    from alzstage.model.inputs import load_gray

    files = []
    for i in range(3):
        path = tmp_path / "in" / f"s{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(png_bytes(20 + i, (60, 50)))
        files.append(path)
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "params.yaml").write_text((REPO / "params.yaml").read_text())

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "ALZSTAGE_"))}
    env.update(
        MLFLOW_TRACKING_URI=demo.tracking_uri,
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        MLFLOW_ENABLE_TELEMETRY="false",
        DO_NOT_TRACK="1",
    )
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", demo.uri, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    log = tmp_path / "mlflow-serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        # Meanwhile, the CLI's numbers (in-process, same store). MLflow writes the URIs
        # into os.environ; monkeypatch removes them again after the test.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", demo.tracking_uri)
        monkeypatch.setenv("MLFLOW_REGISTRY_URI", demo.tracking_uri)
        monkeypatch.setenv("ALZSTAGE_ROOT", str(tmp_path / "project"))
        cli = CliRunner().invoke(app, ["predict", *map(str, files), "-f", "json"])
        assert cli.exit_code == 0, cli.output
        cli_probs = np.array(
            [[p[c] for c in demo.classes] for p in json.loads(cli.stdout)["predictions"]]
        )

        wait_until_up(f"http://127.0.0.1:{port}/ping", proc, log, "mlflow models serve")

        pixels = [load_gray(f, demo.input_size).tolist() for f in files]
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": pixels}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            served = json.loads(r.read())["predictions"]
        served_probs = np.array([[p[c] for c in demo.classes] for p in served])
        np.testing.assert_allclose(served_probs, cli_probs, atol=1e-5)
        assert [p["stage"] for p in served] == [
            p["stage"] for p in json.loads(cli.stdout)["predictions"]
        ]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
