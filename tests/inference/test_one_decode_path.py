"""One slice, in every form a client sends it, through every door: one answer.

Issue 24 part 1. The same slice as an 8-bit PNG, a 16-bit PNG, a JPEG stored sideways
with an EXIF rotation, and as arrays (uint8 and 0-1 floats) goes through ``alzstage
predict``'s library call, the REST API and the registered MLflow model (in process and
behind MLflow's own scoring server); every answer has the same stage and the same
probabilities (exactly for the lossless forms, within JPEG's re-encoding otherwise).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import png_of
from PIL import Image

from alzstage.serve.demo import DemoChampion, scoped_tracking_uri

JPEG_TOLERANCE = 0.02  # JPEG re-encoding moves pixels by a grey level or two


def png16_of(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray.astype(np.uint16) * 257).save(buf, format="PNG")
    return buf.getvalue()


def exif_jpeg_of(gray: np.ndarray) -> bytes:
    """Stored turned 90 degrees counter-clockwise; its EXIF says "rotate 90 clockwise"."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(gray, 1))).save(
        buf, format="JPEG", quality=95, exif=exif.tobytes()
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def pyfunc(demo: DemoChampion):
    """The registered champion as ``mlflow.pyfunc.load_model`` gives it, with the
    tracking URI set as ``mlflow models serve -m models:/...`` has it."""
    from alzstage.tracking import load_pyfunc

    with scoped_tracking_uri(demo.tracking_uri):
        model, _ = load_pyfunc(demo.uri)
    return model


def _probs(rows: list[dict], classes: list[str]) -> np.ndarray:
    return np.array([[r[c] for c in classes] for r in rows], dtype=np.float64)


def test_one_slice_in_every_form_gets_one_answer_everywhere(
    demo: DemoChampion, pyfunc, mri_slices: list[np.ndarray], tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from alzstage.inference.loading import LoadedModel
    from alzstage.inference.predict import predict_files
    from alzstage.serve.app import ServeSettings, create_app

    # given one slice as three files and as two arrays
    gray = mri_slices[0]
    forms = {"8bit.png": png_of(gray), "16bit.png": png16_of(gray), "exif.jpg": exif_jpeg_of(gray)}
    files = []
    for name, data in forms.items():
        files.append(tmp_path / name)
        files[-1].write_bytes(data)
    classes = demo.classes

    # when predict's library call, the REST API and the MLflow model answer
    model = LoadedModel(demo.uri, classes, demo.input_size, tracking_uri=demo.tracking_uri)
    cli = [p.model_dump() for p in predict_files(model, files, 0.5)]
    app = create_app(ServeSettings(model_uri=demo.uri, tracking_uri=demo.tracking_uri))
    with TestClient(app) as client:
        parts = [("files", (name, data, "image/png")) for name, data in forms.items()]
        api = client.post("/predict", files=parts).json()["predictions"]
    frame = pyfunc.predict([gray, gray / 255.0])  # uint8 0-255, and float 0-1
    mlflow_rows = frame.to_dict("records")

    # then every answer is in distribution and has one stage
    for row in cli + api:
        assert row["out_of_distribution"] is False, row["ood_reason"]
    stages = {r["stage"] for r in cli + api + mlflow_rows}
    assert len(stages) == 1
    # and the lossless forms give the very same probabilities, the JPEG nearly
    reference = _probs(mlflow_rows[:1], classes)[0]
    cli_probs = np.array([[r["probabilities"][c] for c in classes] for r in cli])
    api_probs = np.array([[r["probabilities"][c] for c in classes] for r in api])
    for probs in (cli_probs, api_probs):
        np.testing.assert_allclose(probs[:2], [reference, reference], atol=1e-6)
        np.testing.assert_allclose(probs[2], reference, atol=JPEG_TOLERANCE)
    np.testing.assert_allclose(_probs(mlflow_rows, classes)[1], reference, atol=1e-6)
    # the EXIF JPEG is reported at its upright size
    assert (api[2]["width"], api[2]["height"]) == (176, 208)


def test_the_mlflow_model_answers_with_confidence_and_its_version(
    demo: DemoChampion, pyfunc, mri_slices: list[np.ndarray]
) -> None:
    # given the registered model, loaded as MLflow serves it
    # when it predicts two slices
    frame = pyfunc.predict(np.stack(mri_slices[:2]))
    # then each row has the stage's calibrated probability and the registry version
    for row in frame.to_dict("records"):
        probs = [row[c] for c in demo.classes]
        assert row["confidence"] == pytest.approx(max(probs))
        assert row["stage"] == demo.classes[int(np.argmax(probs))]
        assert row["model_version"] == f"{demo.model_name} v{demo.version}"


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ({"inputs": [[[0.0, 300.5], [2.0, 3.0]]]}, "outside 0-255"),
        ({"inputs": [[[0.2, 0.4], [0.6, 0.8]]], "params": {"pixel_range": "0-255"}}, None),
        ({"inputs": [[[0.0, 2.0], [0.5, 0.5]]], "params": {"pixel_range": "0-1"}}, "outside 0-1"),
        ({"inputs": [[["a", "b"], ["c", "d"]]]}, "must be numbers"),
        ({"inputs": np.full((208, 176), 90).tolist()}, "send a batch of slices"),
    ],
)
def test_mlflow_scoring_server_refuses_bad_arrays_in_a_short_message(
    pyfunc, payload: dict, words: str | None
) -> None:
    """MLflow's own scoring server app (what ``mlflow models serve`` runs), in process."""
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    # given MLflow's scoring server over the registered model
    client = TestClient(scoring_server.init(pyfunc))
    # when a request's pixels do not fit the rule
    r = client.post(
        "/invocations", content=json.dumps(payload), headers={"Content-Type": "application/json"}
    )
    if words is None:  # declared 0-255: 0.2 .. 0.8 are (dark) 0-255 values, answered
        assert r.status_code == 200, r.text
        return
    # then it is a 400 that says why in a few hundred characters, without the input
    assert r.status_code == 400, r.text
    message = r.json()["message"]
    assert words in message and len(r.content) < 700, message
    assert "Failed to predict data" not in message and "Traceback" not in message


def test_mlflow_scoring_server_reads_0_to_1_floats_as_the_same_slice(
    demo: DemoChampion, pyfunc, mri_slices: list[np.ndarray]
) -> None:
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    # given one slice as 0-255 integers and as 0-1 floats in JSON (the floats used to be
    # cast to uint8 by the input schema: a black slice)
    gray = mri_slices[1]
    client = TestClient(scoring_server.init(pyfunc))
    answers = []
    for inputs in (gray.tolist(), (gray / 255.0).tolist()):
        r = client.post(
            "/invocations",
            content=json.dumps({"inputs": [inputs]}),
            headers={"Content-Type": "application/json"},
        )
        assert r.status_code == 200, r.text
        answers.append(r.json()["predictions"][0])
    # then both get the same stage and probabilities
    a, b = answers
    assert a["stage"] == b["stage"] and a["out_of_distribution"] is False
    np.testing.assert_allclose(_probs([a], demo.classes), _probs([b], demo.classes), atol=1e-6)
    assert a["confidence"] == pytest.approx(max(a[c] for c in demo.classes))
