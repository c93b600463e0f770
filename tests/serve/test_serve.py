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
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, png_bytes, png_of, wait_until_up
from PIL import Image

from alzstage.serve.demo import DemoChampion

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from alzstage.serve.app import ServeSettings, create_app  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
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
    assert r.status_code == 200
    assert {k: r.json()[k] for k in ("status", "model_loaded")} == {
        "status": "ok",
        "model_loaded": False,
    }


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


def test_predict_one_good_file_matches_the_pyfunc(
    client, demo: DemoChampion, mri_slices: list[np.ndarray]
) -> None:
    from alzstage.serve.demo import scoped_tracking_uri
    from alzstage.tracking import load_pyfunc

    data = png_of(mri_slices[0])
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
    assert (p["width"], p["height"]) == (176, 208)
    assert p["out_of_distribution"] is False and p["ood_reason"] == ""
    assert p["seen_in_training"] is False and 0.5 < p["training_correlation"] < 0.99
    assert list(p["probabilities"]) == demo.classes
    with scoped_tracking_uri(demo.tracking_uri):
        ref, _ = load_pyfunc(demo.uri)  # mlflow.pyfunc.load_model, as MLflow serves it
    # the pyfunc takes the slice at its own size, as a client sends it
    expected = ref.predict(mri_slices[0][None])
    got = np.array([p["probabilities"][c] for c in demo.classes])
    np.testing.assert_allclose(got, expected[demo.classes].to_numpy(np.float64)[0], atol=1e-6)
    assert p["stage"] == expected["stage"][0] and p["confidence"] == pytest.approx(got.max())
    assert expected["out_of_distribution"][0] is False


def test_the_api_and_the_cli_library_give_one_and_the_same_result(
    client, demo: DemoChampion, mri_slices: list[np.ndarray], tmp_path: Path
) -> None:
    from alzstage.inference.loading import LoadedModel
    from alzstage.inference.predict import predict_files
    from alzstage.serve.schemas import ImagePrediction

    # given one slice, as a file for the CLI and as an upload for the API
    path = tmp_path / "slice.png"
    path.write_bytes(png_of(mri_slices[2]))
    model = LoadedModel(demo.uri, demo.classes, demo.input_size, tracking_uri=demo.tracking_uri)
    # when both predict it
    (from_cli,) = predict_files(model, [path], 0.5)
    r = client.post("/predict", files=_files(("slice.png", path.read_bytes(), "image/png")))
    # then the API's answer is the CLI's typed result, field for field, but for the name
    from_api = ImagePrediction.model_validate(r.json()["predictions"][0])
    assert from_api.filename == "slice.png" and from_cli.filename == str(path)
    assert from_api.model_copy(update={"filename": str(path)}) == from_cli


def test_predict_with_gradcam_returns_an_overlay_png(client, mri_slices: list[np.ndarray]) -> None:
    r = client.post(
        "/predict?gradcam=true", files=_files(("s.png", png_of(mri_slices[1]), "image/png"))
    )
    assert r.status_code == 200
    url = r.json()["predictions"][0]["gradcam"]
    assert url.startswith("data:image/png;base64,")
    import base64

    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (176, 208)


def test_bad_file_alone_is_415_and_corrupt_file_is_422(client) -> None:
    r = client.post("/predict", files=_files(("notes.txt", b"hello, not an image", "text/plain")))
    assert r.status_code == 415
    assert "notes.txt" in r.json()["detail"] and "JPEG or PNG" in r.json()["detail"]
    r = client.post("/predict", files=_files(("cut.png", png_bytes(2)[:120], "image/png")))
    assert r.status_code == 422
    assert r.json()["predictions"][0]["status"] == 422
    assert "truncated" in r.json()["detail"]


def test_mixed_batch_still_answers_the_good_files(client, mri_slices: list[np.ndarray]) -> None:
    r = client.post(
        "/predict",
        files=_files(
            ("a.png", png_of(mri_slices[2]), "image/png"),
            ("notes.txt", b"plain text", "text/plain"),
            ("cut.png", png_bytes(4)[:120], "image/png"),
            ("b.png", png_of(mri_slices[3]), "image/png"),
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


def test_two_apps_in_one_process_each_answer_with_their_own_settings(
    demo: DemoChampion,
) -> None:
    # given two apps built from the same router, with different file-count limits
    files = _files(*[(f"{i}.png", png_bytes(i), "image/png") for i in range(2)])
    strict, roomy = _app(demo, max_files=1), _app(demo, max_files=2)
    # when each gets the same two files
    with TestClient(strict) as a, TestClient(roomy) as b:
        refused, answered = a.post("/predict", files=files), b.post("/predict", files=files)
    # then each route read its own app's state, not a shared module-level one
    assert refused.status_code == 413 and "the limit is 1" in refused.json()["detail"]
    assert answered.status_code == 200
    assert strict.state.model_cache is not roomy.state.model_cache


def test_missing_files_field_is_422_with_a_message(client) -> None:
    r = client.post("/predict")
    assert r.status_code == 422 and "multipart/form-data" in r.json()["detail"]


# --------------------------------------------------------------------------- one brain


def test_brain_endpoint_gives_one_brain_answer_with_its_set(
    client, demo: DemoChampion, mri_slices: list[np.ndarray]
) -> None:
    from alzstage.model.conformal import describe_set

    # given four slices of one brain, a noise image and a damaged file, uploaded together
    files = _files(
        *[(f"s{i}.png", png_of(g), "image/png") for i, g in enumerate(mri_slices[:4])],
        ("noise.png", png_bytes(5, (208, 176)), "image/png"),
        ("cut.png", png_bytes(6)[:120], "image/png"),
    )
    # when they are sent as one brain, with Grad-CAM
    r = client.post("/predict/brain?gradcam=true", files=files)
    # then one brain-level answer with the brain model's stage, its set and the reference
    assert r.status_code == 200, r.text
    body = r.json()
    (b,) = body["predictions"]
    assert body["model"]["synthetic_demo"] is True
    assert b["kind"] == "brain" and b["status"] == 200
    assert (b["n_slices"], b["n_slices_used"]) == (6, 4)
    assert b["brain_model"] == "logistic" and b["stage"] in b["prediction_set"]
    assert b["set_text"] == describe_set(b["prediction_set"], b["set_confidence"])
    assert b["pooled_stage"] in demo.classes and list(b["probabilities"]) == demo.classes
    # ... and the per-slice strip: the usable slices with their image, the others left out
    by_name = {s["filename"]: s for s in b["slices"]}
    assert list(by_name) == ["s0.png", "s1.png", "s2.png", "s3.png", "noise.png", "cut.png"]
    assert by_name["noise.png"]["out_of_distribution"] is True
    assert by_name["noise.png"]["left_out"].startswith("out of distribution")
    assert "truncated" in by_name["cut.png"]["left_out"] and by_name["cut.png"]["image"] is None
    used = [s for s in b["slices"] if not s["left_out"]]
    assert all(s["image"].startswith("data:image/png;base64,") for s in used)
    assert [s["index"] for s in used if s["gradcam"]] == sorted(
        s["index"] for s in used if s["informative"]
    )


def test_brain_endpoint_without_a_usable_slice_is_422_naming_why(client) -> None:
    # given only an image that is not a brain MRI slice
    files = _files(("noise.png", png_bytes(7, (208, 176)), "image/png"))
    # when it is sent as a brain
    r = client.post("/predict/brain", files=files)
    # then the request fails with the reason and the fix, not a stage
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "none of its 1 slice file(s) can be used" in detail and "out of distribution" in detail


# --------------------------------------------------------------------------- input check


def test_out_of_distribution_images_get_no_stage_and_say_why(
    client, mri_slices: list[np.ndarray]
) -> None:
    from test_ood import photo_like

    # given two real-like slices and four things that are not brain MRI slices
    files = _files(
        ("brain.png", png_of(mri_slices[0]), "image/png"),
        ("black.png", png_of(np.zeros((208, 176), np.uint8)), "image/png"),
        ("dot.png", png_of(np.full((1, 1), 128, np.uint8)), "image/png"),
        ("noise.png", png_bytes(3, (208, 176)), "image/png"),
        ("holiday.png", png_of(photo_like(0)), "image/png"),
        ("brain2.png", png_of(mri_slices[1]), "image/png"),
    )
    # when they are sent together
    r = client.post("/predict", files=files)
    # then each non-brain image is answered (200) with the reason and no stage at all
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["out_of_distribution"] for p in preds] == [False, True, True, True, True, False]
    for p in preds[1:5]:
        assert p["status"] == 200 and p["error"] is None
        assert p["stage"] is None and p["probabilities"] is None and p["confidence"] is None
        assert p["ood_reason"].startswith("not like the training MRI slices")
    assert "1x1 pixels" in preds[2]["ood_reason"]
    assert preds[0]["stage"] and preds[5]["stage"]
    s = r.json()["summary"]
    assert (s["n_images"], s["n_predicted"], s["n_out_of_distribution"]) == (6, 2, 4)
    assert s["out_of_distribution_files"] == ["black.png", "dot.png", "noise.png", "holiday.png"]
    assert sum(s["stage_counts"].values()) == 2


def test_only_out_of_distribution_images_is_still_an_answer(client) -> None:
    r = client.post("/predict", files=_files(("n.png", png_bytes(1, (208, 176)), "image/png")))
    assert r.status_code == 200
    assert r.json()["summary"]["n_predicted"] == 0
    assert r.json()["predictions"][0]["out_of_distribution"] is True


def test_a_training_slice_is_flagged_seen_in_training(client, demo: DemoChampion) -> None:
    from alzstage.serve.demo import demo_training_files

    train_file = demo_training_files(demo.root / "training-slices")[7]
    r = client.post("/predict", files=_files(("again.jpg", train_file.read_bytes(), "image/jpeg")))
    (p,) = r.json()["predictions"]
    assert p["seen_in_training"] is True and p["training_correlation"] >= 0.999
    assert p["stage"] and p["out_of_distribution"] is False  # valid input, optimistic answer
    assert r.json()["summary"]["seen_in_training_files"] == ["again.jpg"]


def test_model_describes_its_input_check(client) -> None:
    check = client.get("/model").json()["input_check"]
    assert check["n_images"] == 96 and check["sizes"] == {"208x176": 96}
    assert check["n_training_thumbnails"] == 96 and check["seen_threshold"] == 0.99
    assert set(check["bounds"]) >= {"contrast", "foreground_fraction", "mean_correlation"}
    assert "mean_thumbnail" not in check


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


def test_request_pixel_budget_refuses_files_past_it(demo: DemoChampion) -> None:
    # given three 3000x3000 PNGs (9 M pixels each, a few KB on the wire)
    blank = io.BytesIO()
    Image.new("L", (3000, 3000)).save(blank, format="PNG")
    files = _files(*[(f"{i}.png", blank.getvalue(), "image/png") for i in range(3)])
    # when the request may decode 20 M pixels in total
    with TestClient(_app(demo, max_request_pixels=20_000_000)) as c:
        r = c.post("/predict", files=files)
    # then the first two are decoded and the third is refused alone, naming the setting
    preds = r.json()["predictions"]
    assert [p["status"] for p in preds] == [200, 200, 413]
    assert "max_request_pixels" in preds[2]["error"] and "20,000,000" in preds[2]["error"]


def test_large_jpeg_is_shrunk_while_decoding() -> None:
    from alzstage.data.images import PixelBudget, decode_slice
    from alzstage.errors import RequestTooLarge

    big = io.BytesIO()
    Image.new("L", (4000, 3000), 90).save(big, format="JPEG")
    d = decode_slice(big.getvalue(), max_side=512)
    assert (d.width, d.height) == (4000, 3000)  # the file's size, for the input check
    assert 512 <= max(d.gray.shape) <= 1024  # decoded at 1/4 scale by the JPEG decoder
    png = io.BytesIO()
    Image.new("L", (4000, 3000), 90).save(png, format="PNG")
    assert 512 <= max(decode_slice(png.getvalue(), max_side=512).gray.shape) <= 1024
    budget = PixelBudget(13_000_000)
    decode_slice(big.getvalue(), budget=budget)
    with pytest.raises(RequestTooLarge):
        decode_slice(big.getvalue(), budget=budget)


def test_inference_gate_queues_then_answers_503_with_retry_after() -> None:
    import asyncio

    from alzstage.serve.guards import InferenceGate

    release = asyncio.Event()
    idle_calls: list[int] = []

    async def slow_app(scope, receive, send) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    gate = InferenceGate(slow_app, max_active=1, max_queued=2, on_idle=lambda: idle_calls.append(1))

    async def call(path: str = "/predict") -> list[dict]:
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": path, "headers": []}
        await gate(scope, receive, send)
        return sent

    async def scenario() -> tuple[list[list[dict]], list[dict], list[dict], tuple[int, int]]:
        admitted = [asyncio.create_task(call()) for _ in range(3)]  # 1 runs, 2 wait
        await asyncio.sleep(0.05)
        state = (gate.active, gate.waiting)
        refused = await call()  # the fourth finds every slot and queue place taken
        other = asyncio.create_task(call("/health"))  # not gated
        await asyncio.sleep(0.05)
        release.set()
        return [await t for t in admitted], refused, await other, state

    done, refused, other, state = asyncio.run(scenario())
    assert state == (1, 2)
    assert [m[0]["status"] for m in done] == [200, 200, 200] and other[0]["status"] == 200
    assert refused[0]["status"] == 503
    headers = dict(refused[0]["headers"])
    assert headers[b"retry-after"] == b"5"
    assert b"server busy" in refused[1]["body"]
    assert (gate.active, gate.waiting) == (0, 0) and idle_calls  # memory handed back


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


@pytest.fixture
def uvicorn_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """A project at ``tmp_path``, and a uvicorn that only records what it is asked to run."""
    import uvicorn

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.setenv("ALZSTAGE_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({"app": app, **kw}))
    return calls


def test_serve_command_binds_loopback_unless_told(
    tmp_path: Path, uvicorn_calls: list[dict]
) -> None:
    from typer.testing import CliRunner

    from alzstage.cli import app

    calls = uvicorn_calls
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


LIMITS = (
    "max_file_bytes",
    "max_request_bytes",
    "max_files",
    "max_pixels",
    "max_request_pixels",
    "max_concurrent",
    "max_queued",
    "max_volume_bytes",
    "allowed_origins",
    "allowed_hosts",
)


def test_serve_flags_set_every_limit_and_default_to_the_settings(
    uvicorn_calls: list[dict],
) -> None:
    from typer.testing import CliRunner

    from alzstage.cli import app

    # given a project and a uvicorn that only records what it was asked to run
    calls = uvicorn_calls
    # when serve starts without limit flags, then with every one of them
    plain = CliRunner().invoke(app, ["serve"])
    flags = ["--max-request-pixels", "1000", "--max-concurrent", "1", "--max-queued", "0"]
    flags += ["--allow-origin", "https://a.team", "--allow-origin", "https://b.team"]
    flags += ["--allow-host", "alz.internal"]
    tuned = CliRunner().invoke(app, ["serve", *flags])
    # then the defaults are ServeSettings' own, and each flag reaches its setting
    assert plain.exit_code == 0 and tuned.exit_code == 0, plain.output + tuned.output
    default, given = calls[0]["app"].state.settings, calls[1]["app"].state.settings
    assert {k: getattr(default, k) for k in LIMITS} == {
        k: getattr(ServeSettings(), k) for k in LIMITS
    }
    assert (given.max_request_pixels, given.max_concurrent, given.max_queued) == (1000, 1, 0)
    assert given.allowed_origins == ("https://a.team", "https://b.team")
    assert given.allowed_hosts == ("alz.internal",)


# --------------------------------------------------------------------------- page & docs


def test_page_is_self_contained_with_notice(client) -> None:
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "Research use only" in r.text and "not a diagnosis" in r.text
    static = Path(__file__).resolve().parents[2] / "src" / "alzstage" / "serve" / "static"
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


# --------------------------------------------------------------------------- headers & origins


def test_every_response_says_nosniff(client, demo: DemoChampion) -> None:
    docs_js = client.get("/docs").text.split('src="', 1)[1].split('"', 1)[0]
    responses = [
        client.get("/"),
        client.get("/health"),
        client.get("/model"),
        client.get("/docs"),
        client.get(docs_js),
        client.get("/openapi.json"),
        client.get("/static/app.js"),
        client.get("/static/missing.js"),
        client.get("/no-such-route"),
        client.post("/predict"),  # 422
        client.post("/predict", files=_files(("x.txt", b"text", "text/plain"))),  # 415
        client.post("/predict", headers={"Origin": "http://evil.example"}),  # 403
    ]
    with TestClient(_app(demo, max_request_bytes=10)) as small:
        responses.append(small.post("/predict", content=b"x" * 100))  # 413 from middleware
    for r in responses:
        assert r.headers.get("x-content-type-options") == "nosniff", (r.url, r.status_code)
        assert r.headers.get("x-frame-options") == "DENY"
    assert "default-src 'self'" in responses[0].headers["content-security-policy"]


def test_cross_origin_post_is_refused_before_the_body_is_read(
    client, mri_slices: list[np.ndarray], demo: DemoChampion
) -> None:
    files = _files(("a.png", png_of(mri_slices[0]), "image/png"))
    # a page on another site: refused, and no CORS header lets it read anything
    r = client.post("/predict", files=files, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-origin POST" in r.json()["detail"]
    assert "access-control-allow-origin" not in r.headers
    r = client.post("/predict", files=files, headers={"Origin": "null"})  # sandboxed page
    assert r.status_code == 403
    # the server's own page (same scheme, host and port) and scripts (no Origin) are served
    assert client.post("/predict", files=files, headers={"Origin": "http://testserver"}).is_success
    assert client.post("/predict", files=files).is_success
    # GETs are not refused: they change nothing
    assert client.get("/health", headers={"Origin": "http://evil.example"}).status_code == 200
    # an origin the operator allows
    app = _app(demo, allowed_origins=("https://dashboard.team",))
    with TestClient(app) as c:
        r = c.post("/predict", files=files, headers={"Origin": "https://dashboard.team"})
    assert r.status_code == 200


def test_dns_rebinding_host_is_refused_on_loopback() -> None:
    import asyncio

    from alzstage.serve.guards import OriginGuard

    async def ok_app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = OriginGuard(ok_app, allowed_hosts=("alz.internal",))

    def status(host: str, server: str = "127.0.0.1") -> int:
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b""}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "GET",
            "path": "/model",
            "scheme": "http",
            "server": (server, 8000),
            "headers": [(b"host", host.encode())],
        }
        asyncio.run(guard(scope, receive, send))
        return sent[0]["status"]

    for host in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "alz.internal:8000"):
        assert status(host) == 200, host
    assert status("attacker.example:8000") == 421  # rebound to 127.0.0.1
    assert status("attacker.example:8000", server="10.0.0.5") == 200  # not loopback: no rule


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


def _invoke(port: int, payload: object) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.integration
def test_mlflow_models_serve_takes_native_slices_like_the_cli(
    demo: DemoChampion,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mri_slices: list[np.ndarray],
) -> None:
    """The real ``mlflow models serve`` on the champion: native 208x176 slices give the
    CLI's numbers (1e-5), a network-size slice is accepted, an out-of-distribution one is
    flagged with the same fields, and a malformed request is a 400, not a 500."""
    from typer.testing import CliRunner

    from alzstage.cli import app
    from alzstage.data.images import to_model_array

    files = []
    for i in range(3):
        path = tmp_path / "in" / f"s{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(png_of(mri_slices[i]))
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
        cli_preds = json.loads(cli.stdout)["predictions"]
        cli_probs = np.array([[p[c] for c in demo.classes] for p in cli_preds])

        wait_until_up(f"http://127.0.0.1:{port}/ping", proc, log, "mlflow models serve")

        # native 208x176 slices, as exported: the CLI's probabilities and fields
        status, body = _invoke(port, {"inputs": [g.tolist() for g in mri_slices[:3]]})
        assert status == 200, body
        served = body["predictions"]
        served_probs = np.array([[p[c] for c in demo.classes] for p in served])
        np.testing.assert_allclose(served_probs, cli_probs, atol=1e-5)
        assert [p["stage"] for p in served] == [p["stage"] for p in cli_preds]
        for p in served:
            assert p["out_of_distribution"] is False and p["seen_in_training"] is False
        # the same slices as ONE brain (the signature's `brain` parameter): one row
        status, body = _invoke(
            port, {"inputs": [g.tolist() for g in mri_slices[:3]], "params": {"brain": True}}
        )
        assert status == 200, body
        (brain,) = body["predictions"]
        assert brain["n_slices_used"] == 3 and brain["stage"] in brain["prediction_set"]
        assert brain["set_text"].endswith("(90%)") and brain["brain_model"] == "logistic"
        # a slice already at the network's input size is accepted too
        small = to_model_array(mri_slices[0], demo.input_size)
        status, body = _invoke(port, {"inputs": [small.tolist()]})
        assert status == 200 and body["predictions"][0]["stage"] in demo.classes
        # an out-of-distribution slice: no stage, null probabilities, the reason
        status, body = _invoke(port, {"inputs": [np.zeros((208, 176), np.uint8).tolist()]})
        (p,) = body["predictions"]
        assert status == 200 and p["out_of_distribution"] is True and p["stage"] is None
        assert p[demo.classes[0]] is None and "contrast 0" in p["ood_reason"]
        # malformed: one 2D slice without the batch axis, and pixel values that are text
        for bad in ({"inputs": mri_slices[0].tolist()}, {"inputs": [[["a", "b"]]]}):
            status, body = _invoke(port, bad)
            assert status == 400, (status, body)
            assert "Traceback" not in body.get("message", "")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
