"""The evaluate stage's I/O shell end to end: a tiny project in, every output out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from evaluate_cases import CLASSES, LEGACY_KEYS, REPO

from alzstage.evaluate.card import RESEARCH_NOTICE


def _tiny_project(root: Path, params) -> None:
    """Decoded pixels (data/raw is gone after), split.csv, split.json, validation.json, an
    untrained model and train_run.json."""
    import keras
    from PIL import Image

    from alzstage.artifacts import SplitReport, TrainRun
    from alzstage.config import Paths
    from alzstage.data.pixels import write_pixels
    from alzstage.model.network import GrayscaleToBackbone

    rng = np.random.default_rng(0)
    rows = []
    # Subjects 0-1 of each class are test, 2-4 train (the baselines are fitted on them).
    for k, cls in enumerate(CLASSES):
        for s in range(5):
            for j in range(3):
                rel = f"images/{cls}/{cls}-{s}_s{j}.png"
                (root / "data/raw" / rel).parent.mkdir(parents=True, exist_ok=True)
                img = rng.integers(0, 60, (32, 32)).astype(np.uint8)
                img[4 * k : 4 * k + 8, 8:24] = 200
                Image.fromarray(img).save(root / "data/raw" / rel)
                rows.append([rel, cls, f"{cls}-{s}", "given", "", "test" if s < 2 else "train"])
    split = pd.DataFrame(
        rows, columns=["path", "label", "subject", "subject_source", "source_split", "split"]
    )
    write_pixels(root / "data/raw", split["path"].tolist(), params, Paths(root).pixels)
    shutil.rmtree(root / "data/raw")  # evaluate reads the decode stage's pixels only
    split.to_csv(root / "data/processed/split.csv", index=False)
    (root / "reports").mkdir()
    SplitReport(
        strategy="subject",
        leaky=False,
        fingerprint="f" * 64,
        subject_ids="given",
        warning="",
        dataset="demo",
        data_source="demo",
        leakage={"test": {"fraction_subject_in_train": 0.0, "fraction_near_duplicate": 0.25}},
    ).write(root / "reports/split.json")
    (root / "reports/validation.json").write_text(json.dumps({"n_images": 62, "n_valid": 60}))
    keras.utils.set_random_seed(0)
    layers = keras.layers
    b_in = keras.Input((32, 32, 3))
    backbone = keras.Model(
        b_in,
        layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")(b_in),
        name="backbone",
    )
    head = keras.Sequential(
        [layers.GlobalAveragePooling2D(), layers.Dense(4, activation="softmax")], name="head"
    )
    inp = keras.Input((32, 32, 1))
    x = GrayscaleToBackbone(mode="tf", name="preprocess")(inp)
    (root / "models").mkdir()
    keras.Model(inp, head(backbone(x))).save(root / "models/model.keras")
    TrainRun(
        model_md5="0123456789abcdef0123456789abcdef",
        temperature=1.3,
        input_size=(32, 32),
        recipe="transfer",
        backbone="tiny",
        weights="imagenet",
    ).write(root / "models/train_run.json")
    # The fixed pooling rule, its sets calibrated on three made-up validation brains.
    from alzstage.model.brain import BrainModel
    from alzstage.model.conformal import ConformalCalibration

    brain = BrainModel(CLASSES, aggregator="pool")
    brain.conformal = ConformalCalibration(np.array([0.2, 0.5, 0.7]), np.array([0, 1, 2]), 4, False)
    (root / "models/brain_model.json").write_text(json.dumps(brain.to_dict()))


def test_run_evaluate_writes_every_output(tmp_path: Path) -> None:
    pytest.importorskip("keras")
    from alzstage.config import Paths, parse_params
    from alzstage.evaluate.stage import run_evaluate

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["base"]["image_size"] = [32, 32]
    raw["model"]["input_size"] = [32, 32]
    params = parse_params(raw)
    _tiny_project(tmp_path, params)
    result = run_evaluate(params, Paths(tmp_path))

    rep = json.loads((tmp_path / "reports/metrics.json").read_text())
    for key in (*LEGACY_KEYS, "split_strategy", "split_leaky", "split_fingerprint"):
        assert key in rep
    assert rep["n_test"] == 24 and rep["calibration"]["temperature"] == 1.3
    assert rep["subject_level"]["n_subjects"] == 8
    for rel in ("confusion.png", "roc.png", "pr.png", "reliability.png", "gradcam_gallery.png"):
        png = tmp_path / "reports/figures" / rel
        assert png.read_bytes()[:4] == b"\x89PNG" and png in result.artifacts
    for rel in ("confusion.csv", "roc.csv", "pr.csv", "reliability.csv"):
        assert (tmp_path / "reports/plots" / rel) in result.artifacts
    card = (tmp_path / "reports/model_card.md").read_text()
    assert RESEARCH_NOTICE in card and "0123456789abcdef0123456789abcdef" in card
    preds = pd.read_csv(tmp_path / "reports/predictions_test.csv")
    assert preds["in_gradcam_gallery"].sum() >= 1
    np.testing.assert_allclose(preds[[f"p_{c}" for c in CLASSES]].sum(1), 1.0, atol=1e-5)
    assert {"accuracy", "balanced_accuracy", "macro_f1"} <= set(result.metrics)
    assert all(isinstance(v, float) for v in result.metrics.values())
    assert rep["dataset"] == "demo" and rep["data_source"] == "demo"
    # the recipe train_run.json says ran, though params.yaml (weights: none) now says scratch
    assert "- Recipe: `transfer`" in card

    # the headline: the report's figures, split.json's leak and validate's counts
    head = json.loads((tmp_path / "reports/headline.json").read_text())
    assert (tmp_path / "reports/headline.json") in result.artifacts
    assert head["bacc"] == round(rep["balanced_accuracy"], 3)
    brain = rep["brain_level"]
    assert brain["n_brains"] == 8  # the test subjects, one row each
    best = brain["scores"]["predictors"]["brain_model"]
    assert head["brain"] == round(best["balanced_accuracy_main"], 3)
    assert head["morph"] == round(
        brain["scores"]["predictors"]["morphometric"]["balanced_accuracy_main"], 3
    )
    assert head["cover"] == round(brain["conformal"]["marginal"]["coverage"], 2)
    assert head["leak"] == 0.25 and head["valid"] == "60/62"

    # baselines: fitted on the 36 train slices, scored on the network's 8 test subjects
    baselines = json.loads((tmp_path / "reports/baselines.json").read_text())
    assert (tmp_path / "reports/baselines.json") in result.artifacts
    assert baselines["n_train"] == 36 and baselines["n_test"] == 24
    assert baselines["n_pixels"] == 32 * 32  # the split's 32x32 thumbnails, flattened
    assert set(baselines["baselines"]) == {"majority", "nearest", "pixel"}
    pixel = baselines["baselines"]["pixel"]
    assert pixel["network_minus_baseline"]["unit"] == "subject"
    assert pixel["network_minus_baseline"]["n_units"] == 8
    # the bars make every class easy for a look-up; majority is exactly 1/4
    assert baselines["baselines"]["nearest"]["balanced_accuracy"] == 1.0
    assert rep["baseline_majority_balanced_accuracy"] == 0.25
    assert rep["baseline_pixel_balanced_accuracy"] == pixel["balanced_accuracy"]
    assert rep["beats_pixel_baseline"] is pixel["beats"]
    assert result.metrics["beats_pixel_baseline"] == float(pixel["beats"])
    assert "## Baselines" in card and pixel["verdict"][1:] in card
    assert pixel["verdict"] in result.summary
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert "reports/baselines.json" in dvc["stages"]["evaluate"]["outs"]
    assert "src/alzstage/evaluate/baselines.py" in dvc["stages"]["evaluate"]["deps"]
