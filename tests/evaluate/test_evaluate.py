"""The evaluate stage: report assembly (pure), the model card, and the I/O shell end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from alzstage.evaluate.card import LEAKAGE_CAVEAT, RESEARCH_NOTICE, render_model_card
from alzstage.evaluate.stage import (
    build_report,
    flat_metrics,
    json_safe,
    known_subjects,
)

CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]
LEGACY_KEYS = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "per_class",
    "confusion_matrix",
    "n_test",
)
REPO = Path(__file__).resolve().parents[2]


def _fixture(n_subjects: int = 12, slices: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    y_subj = np.arange(n_subjects) % 4
    y = np.repeat(y_subj, slices)
    subjects = np.repeat([f"s{i}" for i in range(n_subjects)], slices)
    logits = rng.normal(0, 1, (len(y), 4))
    logits[np.arange(len(y)), y] += 1.5
    logits *= 4  # over-confident
    p = np.exp(logits - logits.max(1, keepdims=True))
    return y, p / p.sum(1, keepdims=True), subjects


def _report(subjects=True, **kw) -> dict:
    y, p, s = _fixture()
    return build_report(
        y,
        p,
        CLASSES,
        temperature=kw.pop("temperature", 2.0),
        temperature_source="validation",
        subjects=s if subjects else None,
        subject_ids="given",
        seed=0,
        n_resamples=kw.pop("n_resamples", 200),
    )


def test_report_keeps_legacy_keys_and_adds_the_rest() -> None:
    rep = _report()
    for key in LEGACY_KEYS:
        assert key in rep
    assert sum(map(sum, rep["confusion_matrix"])) == rep["n_test"] == 72
    for key in ("quadratic_weighted_kappa", "roc_auc", "pr_auc", "ece", "calibration", "ci"):
        assert key in rep
    assert rep["ci"]["unit"] == "subject" and rep["ci"]["n_units"] == 12
    cal = rep["calibration"]
    assert cal["temperature"] == 2.0
    assert rep["ece"] == pytest.approx(cal["calibrated"]["ece"])  # reported = calibrated
    assert cal["applied"] and rep["probabilities"].startswith("calibrated")
    lo, hi = rep["ci"]["balanced_accuracy"]["low"], rep["ci"]["balanced_accuracy"]["high"]
    assert lo <= rep["balanced_accuracy"] <= hi


def test_subject_level_block() -> None:
    rep = _report()
    sub = rep["subject_level"]
    assert sub["available"] and sub["n_subjects"] == 12
    assert sub["n_subjects_per_class"] == dict.fromkeys(CLASSES, 3)
    assert sum(map(sum, sub["confusion_matrix"])) == 12
    assert sub["ci"]["unit"] == "subject"


def test_without_subjects_images_are_the_unit() -> None:
    rep = _report(subjects=False)
    assert rep["ci"]["unit"] == "image" and rep["ci"]["n_units"] == 72
    assert rep["subject_level"]["available"] is False


def test_unknown_subject_rows_are_their_own_unit() -> None:
    y, p, s = _fixture()
    s = s.copy()
    s[:6] = ""  # subject s0's slices lose their id: six independent units
    rep = build_report(
        y,
        p,
        CLASSES,
        temperature=1.0,
        temperature_source="x",
        subjects=s,
        subject_ids="mixed",
        seed=0,
        n_resamples=50,
    )
    assert rep["ci"]["n_units"] == 11 + 6
    assert rep["subject_level"]["n_subjects"] == 11
    assert rep["subject_level"]["n_slices_without_subject"] == 6


def test_known_subjects_mask() -> None:
    rows = pd.DataFrame(
        {
            "subject": ["a", "", "c", "d"],
            "subject_source": ["given", "none", "none", "pseudo"],
        }
    )
    assert known_subjects(rows).tolist() == [True, False, False, True]


def test_report_is_strict_json_and_flat_metrics_are_finite() -> None:
    y = np.zeros(6, int)  # one class only: QWK and AUCs are undefined
    p = np.tile([0.7, 0.1, 0.1, 0.1], (6, 1))
    rep = json_safe(
        build_report(
            y,
            p,
            CLASSES,
            temperature=1.0,
            temperature_source="x",
            subjects=None,
            subject_ids="none",
            seed=0,
            n_resamples=20,
        )
    )
    json.dumps(rep, allow_nan=False)
    assert rep["quadratic_weighted_kappa"] is None
    assert rep["classes_absent_from_test"] == CLASSES[1:]
    flat = flat_metrics(rep)
    assert all(np.isfinite(v) for v in flat.values())
    assert "qwk" not in flat and flat["accuracy"] == 1.0


def test_missing_temperature_is_reported_as_uncalibrated() -> None:
    y, p, s = _fixture()
    rep = build_report(
        y,
        p,
        CLASSES,
        temperature=None,
        temperature_source="missing",
        subjects=s,
        subject_ids="given",
        seed=0,
        n_resamples=20,
    )
    assert rep["calibration"]["applied"] is False
    assert rep["calibration"]["calibrated"] == rep["calibration"]["uncalibrated"]
    assert rep["probabilities"].startswith("UNCALIBRATED")
    card = render_model_card(json_safe(rep), SPLIT_INFO, PROVENANCE)
    assert "probabilities are uncalibrated" in card


SPLIT_INFO = {
    "strategy": "stratified",
    "leaky": True,
    "warning": "Slice-level split: neighbouring slices...",
    "subject_ids": "given",
    "n_images": 72,
    "test_size": 0.2,
    "val_size": 0.15,
    "counts": {"test": {**dict.fromkeys(CLASSES, 18), "total": 72}},
    "subjects": {"test": {**dict.fromkeys(CLASSES, 3), "total": 12}},
}
PROVENANCE = {"classes": CLASSES, "weights": "none", "data_source": "demo", "backbone": "resnet50"}


def test_model_card_carries_leakage_caveat_and_research_notice() -> None:
    rep = json_safe(_report())
    rep.update(split_strategy="stratified", split_leaky=True, split_warning="w")
    card = render_model_card(rep, SPLIT_INFO, PROVENANCE)
    assert RESEARCH_NOTICE in card
    assert LEAKAGE_CAVEAT.format(strategy="stratified") in card
    assert "not a medical device" in card
    assert f"{rep['balanced_accuracy']:.3f}" in card
    ci = rep["ci"]["balanced_accuracy"]
    assert f"{ci['low']:.3f} - {ci['high']:.3f}" in card
    assert "SYNTHETIC" in card and "random initialisation" in card


def test_model_card_without_leak_and_with_few_subjects() -> None:
    y, p, s = _fixture()
    s = np.where(y == 3, "only-one", s)  # ModerateDemented: a single test subject
    rep = json_safe(
        build_report(
            y,
            p,
            CLASSES,
            temperature=1.0,
            temperature_source="v",
            subjects=s,
            subject_ids="given",
            seed=0,
            n_resamples=50,
        )
    )
    rep.update(split_strategy="subject", split_leaky=False)
    card = render_model_card(rep, {**SPLIT_INFO, "leaky": False}, PROVENANCE)
    assert "Leakage caveat" not in card and RESEARCH_NOTICE in card
    assert "fewer than 3 test subjects: ModerateDemented (1)" in card
    assert "top of its search range" not in card
    rep["calibration"]["temperature"] = 19.99997
    assert "top of its search range" in render_model_card(rep, SPLIT_INFO, PROVENANCE)


def _baselines(pixel_beaten: bool) -> dict:
    """A baselines.json body: the network beats majority, and the pixel model or not."""
    from alzstage.evaluate.baselines import compare_with_baselines

    y = np.repeat(np.arange(4), 6)
    subjects = np.repeat([f"s{i}" for i in range(8)], 3)
    network = y.copy()
    network[::2] = 0  # right on half the slices of each class but NonDemented
    pixel = y if not pixel_beaten else (y + 1) % 4
    return json_safe(
        compare_with_baselines(
            y,
            network,
            {"majority": np.zeros_like(y), "pixel": pixel},
            subjects,
            CLASSES,
            seed=0,
            n_resamples=200,
        )
    )


def test_model_card_reports_a_network_that_does_not_beat_the_pixel_baseline() -> None:
    # given: a pixel baseline that is right everywhere, a network that is not
    rep = json_safe(_report())
    baselines = _baselines(pixel_beaten=False)
    # when
    card = render_model_card(rep, SPLIT_INFO, PROVENANCE, baselines)
    # then: said at the top and in the table, next to the numbers
    top = card[: card.index("## Model")]
    assert "> **The network does NOT beat the pixel baseline" in top
    section = card[card.index("## Baselines") : card.index("## Calibration")]
    assert "**NO**" in section and "| yes |" in section  # majority is beaten
    assert "paired percentile bootstrap" in section and "8 subjects" in section
    assert "- The network beats the majority-class baseline (" in section


def test_model_card_of_a_network_that_beats_every_baseline_has_no_warning() -> None:
    rep = json_safe(_report())
    card = render_model_card(rep, SPLIT_INFO, PROVENANCE, _baselines(pixel_beaten=True))
    assert "does NOT beat" not in card and "**NO**" not in card
    assert "## Baselines" not in render_model_card(rep, SPLIT_INFO, PROVENANCE)


def _brain_level(brain_pred: np.ndarray, morph_pred: np.ndarray) -> dict:
    """A brain_level block as brain_test_report writes it, for 12 test brains."""
    from alzstage.evaluate.brain import binary_view, bootstrap_brains
    from alzstage.model.conformal import coverage_report

    y = np.repeat([0, 1, 2], 4)
    subjects = np.array([f"b{i}" for i in range(len(y))])
    probs = np.full((len(y), 4), 0.05)
    probs[np.arange(len(y)), brain_pred] = 0.85
    sets = np.eye(4, dtype=bool)[brain_pred] | np.eye(4, dtype=bool)[y]
    preds = {"brain_model": brain_pred, "pool": y * 0, "morphometric": morph_pred}
    return json_safe(
        {
            "default": "brain_model",
            "aggregator": "logistic",
            "features": ["cnn", "morphometry"],
            "n_brains": len(y),
            "scores": bootstrap_brains(
                y, preds, subjects, CLASSES, reference="brain_model", seed=0, n_resamples=300
            ),
            "conformal": {
                "confidence": 0.9,
                "selected": "marginal",
                "marginal": coverage_report(sets, y, CLASSES, 0.9),
                "calibration_brains": 20,
            },
            "binary": binary_view(y, probs, subjects, seed=0, n_resamples=200),
        }
    )


def test_model_card_says_the_brain_model_does_not_beat_the_morphometric_baseline() -> None:
    # given: a brain model and a morphometric baseline that are right on the same brains
    y = np.repeat([0, 1, 2], 4)
    pred = y.copy()
    pred[[1, 5]] = 2
    rep = json_safe(_report())
    rep["brain_level"] = _brain_level(pred, pred.copy())
    # when
    card = render_model_card(rep, SPLIT_INFO, PROVENANCE)
    # then: the section scores both, with the paired difference and a plain verdict
    section = card[card.index("## Brain level") : card.index("## Calibration")]
    best = rep["brain_level"]["scores"]["predictors"]["brain_model"]
    assert f"| brain model | {best['balanced_accuracy_main']:.3f} |" in section
    assert "morphometric baseline (CSF fraction only)" in section
    assert (
        "- The brain model does not beat the morphometric baseline (paired difference "
        "+0.000, 95% CI +0.000 to +0.000: the interval includes 0), main classes."
    ) in section
    # ... beats the pooling rule that is always wrong on two thirds of the brains
    assert "- The brain model beats the fixed pooling rule (paired difference +0.500" in section
    # ... the conformal coverage on the test brains and the number of calibration brains
    assert "coverage 1.000 on 12 test brains, mean set size 1.17; calibrated on 20" in section
    # ... and the binary view with intervals
    assert "Binary view (not demented vs any dementia, 12 brains): sensitivity 1.000" in section
    assert "specificity 0.750" in section and "ROC AUC 0.875" in section


def test_model_card_without_a_brain_level_block_has_no_brain_section() -> None:
    rep = json_safe(_report())
    assert "## Brain level" not in render_model_card(rep, SPLIT_INFO, PROVENANCE)
    rep["brain_level"] = {"available": False, "reason": "test slices without subject ids"}
    card = render_model_card(rep, SPLIT_INFO, PROVENANCE)
    assert "## Brain level\n\nNot scored: test slices without subject ids." in card


def test_flat_metrics_carry_the_baseline_headline() -> None:
    from alzstage.evaluate.baselines import headline_metrics

    rep = json_safe(_report())
    rep.update(headline_metrics(_baselines(pixel_beaten=False)))
    flat = flat_metrics(rep)
    assert flat["beats_pixel_baseline"] == 0.0 and flat["beats_majority_baseline"] == 1.0
    assert flat["baseline_pixel_balanced_accuracy"] == 1.0
    assert flat["network_minus_pixel_balanced_accuracy"] < 0


def test_dvc_plot_definitions_match_the_csv_columns() -> None:
    """dvc.yaml names curve columns; a renamed column would silently drop a chart."""
    from alzstage.model.calibration import reliability_table
    from alzstage.model.metrics import pr_curves, roc_curves

    y, p, _ = _fixture()
    written = {
        "reports/plots/roc.csv": set(roc_curves(y, p, CLASSES)),
        "reports/plots/pr.csv": set(pr_curves(y, p, CLASSES)),
        "reports/plots/reliability.csv": set(pd.DataFrame(reliability_table(p, p, y))),
    }
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["base"]["classes"] == CLASSES
    checked = set()
    for entry in dvc["plots"]:
        if isinstance(entry, str):
            continue
        (props,) = entry.values()
        for path, fields in (props.get("y") or {}).items():
            if path in written:
                fields = [fields] if isinstance(fields, str) else fields
                assert {props["x"], *fields} <= written[path], path
                checked.add(path)
    assert checked == set(written)
    outs = {next(iter(o)) if isinstance(o, dict) else o for o in dvc["stages"]["evaluate"]["outs"]}
    assert set(written) <= outs


# --------------------------------------------------------------------------- I/O shell


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
        run_id="r1",
        model_uri="models:/m-1",
        runs_uri="runs:/r1/model",
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
    assert RESEARCH_NOTICE in card and "models:/m-1" in card
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


def _split_and_validation(subject_leak: float = 0.0, near_duplicates: float = 0.0):
    leakage = {
        "fraction_subject_in_train": subject_leak,
        "fraction_near_duplicate": near_duplicates,
    }
    return {"leakage": {"test": leakage}}, {"n_images": 5120, "n_valid": 5120}


def test_headline_is_eight_short_keys_rounded_for_a_narrow_row() -> None:
    from alzstage.evaluate.brain import bootstrap_brains
    from alzstage.evaluate.headline import headline
    from alzstage.model.conformal import coverage_report

    # given: a full report with a brain-level block, and an honest split
    report = _report()
    y = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    pred = np.array([0, 1, 1, 1, 2, 0, 0, 1])
    subjects = np.array([f"s{i}" for i in range(8)])
    sets = np.eye(4, dtype=bool)[pred] | np.eye(4, dtype=bool)[y]
    report["brain_level"] = {
        "default": "brain_model",
        "scores": bootstrap_brains(
            y,
            {"brain_model": pred, "morphometric": y * 0},
            subjects,
            CLASSES,
            reference="brain_model",
            seed=0,
            n_resamples=200,
        ),
        "conformal": {"selected": "marginal", "marginal": coverage_report(sets, y, CLASSES, 0.9)},
    }
    report = json_safe(report)
    # when
    head = headline(report, *_split_and_validation())
    # then: the figures, rounded to 3 digits; the CI as text; the counts as valid/checked
    best = report["brain_level"]["scores"]["predictors"]["brain_model"]
    ci = best["ci"]["balanced_accuracy_main"]
    assert head == {
        "brain": round(best["balanced_accuracy_main"], 3),
        "brain_ci": f"{ci['low']:.2f}-{ci['high']:.2f}",
        # main classes: the two with 3 brains; always the first stage recalls one of them
        "morph": 0.5,
        "cover": 1.0,
        "set": 1.2,  # two sets of two stages among eight brains: 1.25
        "bacc": round(report["balanced_accuracy"], 3),
        "leak": 0.0,
        "valid": "5120/5120",
    }
    assert all(len(k) <= 9 for k in head)  # dvc metrics show: one column per key


def test_headline_leak_is_the_larger_measured_leak_and_missing_figures_are_null() -> None:
    from alzstage.evaluate.headline import headline

    # given: no subject ids, and a slice-level split that leaks subjects into test
    report = json_safe(_report(subjects=False))
    report["quadratic_weighted_kappa"] = None  # undefined on this test set
    head = headline(report, *_split_and_validation(subject_leak=0.9, near_duplicates=0.4))
    assert head["leak"] == 0.9
    assert head["brain"] is None and head["cover"] is None


def test_plot_column_problems_name_a_class_scheme_dvc_yaml_does_not_list(tmp_path) -> None:
    """CN / MCI classes with the Kaggle names in dvc.yaml: the empty chart is reported."""
    from alzstage.evaluate.stage import plot_column_problems
    from alzstage.model.metrics import roc_curves

    y, p, _ = _fixture()
    roc = tmp_path / "roc.csv"
    roc_curves(y, p, ["CN", "MCI", "LMCI", "AD"]).to_csv(roc, index=False)
    (problem,) = plot_column_problems(REPO / "dvc.yaml", {"roc": roc})
    assert "reports/plots/roc.csv" in problem and "NonDemented" in problem and "CN" in problem
    roc_curves(y, p, CLASSES).to_csv(roc, index=False)
    assert plot_column_problems(REPO / "dvc.yaml", {"roc": roc}) == []
