"""The ``evaluate`` stage: honest test-split metrics, labelled with the split protocol.

Every report says which split protocol produced it and whether that protocol leaks
(slice-level splits put one brain on both sides), so a leaky number is never quoted
without its caveat. The network is compared with baselines that need no deep learning
(majority class, nearest training slice, PCA + logistic regression on thumbnails) on the
same test subjects, and the report says plainly whether it beats each one.

This module is the I/O shell: :func:`run_evaluate` reads the model and the reports it
depends on, and writes every output; :func:`run_evaluate_stage` then links its results
to the training run in MLflow. What the report holds is :mod:`~alzstage.evaluate.report`
(pure), its curves and figures :mod:`~alzstage.evaluate.plots`, the model card
:mod:`~alzstage.evaluate.card`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd

from alzstage.artifacts import (
    MetricsReport,
    PixelStore,
    SplitReport,
    TrainRun,
    ValidationReport,
    read_split,
)
from alzstage.config import Params, Paths
from alzstage.evaluate.baselines import headline_metrics, score_baselines, thumbnail_rows
from alzstage.evaluate.brain import brain_test_report
from alzstage.evaluate.headline import headline
from alzstage.evaluate.plots import curve_tables, draw_figures, plot_column_problems, write_curves
from alzstage.evaluate.report import build_report, flat_metrics, json_safe, known_subjects
from alzstage.files import write_csv, write_json, write_text
from alzstage.model.calibration import apply_temperature
from alzstage.result import StageResult

GALLERY_PER_KIND = 2  # right and wrong examples per class in the Grad-CAM gallery
# Test figures that also go on the training run, where the model lives in the MLflow UI.
TRAIN_RUN_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "qwk", "roc_auc_macro", "ece")


@contextmanager
def _timed(timings: dict[str, float], step: str) -> Iterator[None]:
    """Add the seconds the block takes to ``timings[step]`` (logged as ``seconds_<step>``)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[step] = time.perf_counter() - t0


def _temperature(train_run: TrainRun) -> tuple[float | None, str]:
    if train_run.temperature is None:
        return None, "missing from models/train_run.json: probabilities are UNCALIBRATED"
    return train_run.temperature, "models/train_run.json (fitted on the validation split)"


def _provenance(params: Params, train_run: TrainRun) -> dict:
    d = params.data
    ref = {
        "demo": "synthetic slices from the MNI152 template (offline demo)",
        "archive": f"{d.path} (sha256 {d.sha256 or 'not pinned'})",
        "folder": f"{d.path}",
        "kaggle": f"kaggle:{d.kaggle_dataset}",
        "huggingface": f"{d.hf_endpoint}/datasets/{d.hf_repo} @ {d.hf_revision}",
        "nifti": f"{d.path} ({d.subjects_csv}; NIfTI volumes registered to MNI152)",
    }[d.source]
    return {
        "data_source": d.source,
        "data_reference": ref,
        "classes": list(params.base.classes),
        "backbone": params.model.resolved_backbone,
        "recipe": train_run.recipe,  # what the train stage ran, not what params say now
        "weights": params.model.weights,
        "input_size": list(params.model.input_size),
        "seed": params.base.seed,
        "model_md5": train_run.model_md5,
    }


def _predict_test(params: Params, paths: Paths) -> tuple[Any, Any, np.ndarray, pd.DataFrame, Any]:
    """The model, the test slices (x, y, rows) and the model's uncalibrated probabilities."""
    import keras

    import alzstage.model.network  # noqa: F401 - registers the custom layer for loading
    from alzstage.data.pixels import load_split_images
    from alzstage.inference.pyfunc import probabilities

    x, y, rows = load_split_images(paths, params, "test")
    model = keras.models.load_model(paths.model_file, compile=False)
    raw = probabilities(model, x, params.model.input_size)  # T = 1: calibrated below
    return model, x, y, rows, raw


def _test_subjects(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray | None]:
    """Which test slices have a real or recovered subject id, and the ids (None: none has)."""
    known = known_subjects(rows)
    subjects = np.where(known, rows["subject"].astype(str).str.strip(), "") if known.any() else None
    return known, subjects


def _test_report(
    params: Params,
    y: np.ndarray,
    raw: np.ndarray,
    subjects: np.ndarray | None,
    train_run: TrainRun,
    split: SplitReport,
) -> tuple[dict, str]:
    """:func:`build_report` at the temperature train fitted, labelled with the split that
    ran (from split.json, a declared dependency, never from params.split); and where the
    temperature came from."""
    temperature, t_source = _temperature(train_run)
    report = build_report(
        y,
        raw,
        params.base.classes,
        temperature=temperature,
        temperature_source=t_source,
        subjects=subjects,
        subject_ids=split.subject_ids,
        seed=params.base.seed,
    )
    report["split_strategy"] = split.strategy
    report["split_leaky"] = split.leaky
    report["split_fingerprint"] = split.fingerprint
    report["split_warning"] = split.warning
    report["dataset"] = split.dataset
    report["data_source"] = split.data_source
    return report, t_source


def baseline_report(
    paths: Paths,
    params: Params,
    test_rows: pd.DataFrame,
    y: np.ndarray,
    pred: np.ndarray,
    subjects: np.ndarray | None,
) -> dict:
    """Fit the baselines on the original training slices and score them on the test slices.

    Thumbnails are the split stage's own (:func:`~alzstage.evaluate.baselines.thumbnail_rows`
    from the decode stage's store), not derived from the network's input arrays: the
    nearest baseline then reproduces the nearest-neighbour number in split.json (at the
    default ``split.thumb_size`` of 32).
    Original slices, never the augmented set: a baseline sees what the split gave.
    """
    split = read_split(paths.split_file)
    train = split[split["split"] == "train"]
    index = {c: i for i, c in enumerate(params.base.classes)}
    store = PixelStore.read(paths.pixels)
    return score_baselines(
        thumbnail_rows(store, train["path"]),
        train["label"].map(index).to_numpy(np.int64),
        thumbnail_rows(store, test_rows["path"]),
        y,
        subjects,
        pred,
        list(params.base.classes),
        seed=params.base.seed,
    )


def _brain_level(
    params: Params,
    paths: Paths,
    rows: pd.DataFrame,
    probs: np.ndarray,
    known: np.ndarray,
    timings: dict[str, float],
) -> dict:
    """The brain-level block: scored (and timed) only when every test slice names its brain."""
    if not (known.any() and known.all()):
        return {"available": False, "reason": "test slices without subject ids"}
    with _timed(timings, "brain_level"):
        return json_safe(brain_test_report(params, paths, rows, probs))


def _predictions(
    rows: pd.DataFrame, predicted: pd.Series, probs: np.ndarray, params: Params
) -> pd.DataFrame:
    """``reports/predictions_test.csv`` without its gallery column: one row per test slice."""
    preds = rows[["path", "label", "subject"]].copy()
    preds["predicted"] = predicted
    preds["confidence"] = np.round(probs.max(axis=1), 6)
    preds["low_confidence"] = probs.max(axis=1) < params.evaluate.low_confidence
    for i, c in enumerate(params.base.classes):
        preds[f"p_{c}"] = np.round(probs[:, i], 6)
    return preds


def _summary(report: dict, baselines: dict) -> str:
    leak = " (LEAKY protocol: slices of one brain on both sides)" if report["split_leaky"] else ""
    ci = report["ci"].get("balanced_accuracy") or {}
    ci_text = f" [95% CI {ci['low']:.3f}-{ci['high']:.3f}]" if ci else ""
    return (
        f"test balanced accuracy {report['balanced_accuracy']:.3f}{ci_text}, macro-F1 "
        f"{report['macro_f1']:.3f}, accuracy {report['accuracy']:.3f} on "
        f"{report['n_test']} slices, split={report['split_strategy']}{leak}; "
        f"{baselines['baselines']['pixel']['verdict']}"
    )


def _tags(report: dict, temperature_source: str) -> dict[str, str]:
    return {
        "split.strategy": report["split_strategy"],
        "split.leaky": str(report["split_leaky"]),
        "split.fingerprint": report["split_fingerprint"],
        "data.name": report["dataset"],
        "calibration.temperature_source": temperature_source,
        "ci.unit": report["ci"]["unit"],
    }


def run_evaluate(params: Params, paths: Paths) -> StageResult:
    """Score the trained model on the test split and write every evaluate output."""
    from alzstage.evaluate.card import render_model_card
    from alzstage.inference.gradcam import write_gallery

    timings: dict[str, float] = {}
    classes = params.base.classes
    # 1. The test slices through the network, uncalibrated.
    with _timed(timings, "predict"):
        model, x, y, rows, raw = _predict_test(params, paths)
    # 2. The report: calibrated metrics, CIs, subject level, labelled with the split that ran.
    with _timed(timings, "metrics"):
        train_run = TrainRun.read(paths.train_run)
        split = SplitReport.read(paths.split_report)
        validation = ValidationReport.read(paths.validation_report).model_dump(mode="json")
        known, subjects = _test_subjects(rows)
        report, t_source = _test_report(params, y, raw, subjects, train_run, split)
    probs = apply_temperature(raw, report["calibration"]["temperature"])
    pred = probs.argmax(axis=1)
    # 3. The baselines on the same test slices, and the brain level (its own timing too).
    with _timed(timings, "baselines"):
        baselines = json_safe(baseline_report(paths, params, rows, y, pred, subjects))
        baselines_file = paths.reports / "baselines.json"
        write_json(baselines_file, baselines)
        report.update(headline_metrics(baselines))
        report["brain_level"] = _brain_level(params, paths, rows, probs, known, timings)
    # 4. The curves: written as CSV for `dvc plots`, drawn as PNG from the same frames.
    curves = curve_tables(y, raw, probs, classes)
    csvs = write_curves(curves, paths.plots)
    columns = {csvs[name]: list(t.columns) for name, t in curves.tables().items()}
    for problem in plot_column_problems(paths.root / "dvc.yaml", columns):
        warnings.warn(problem, UserWarning, stacklevel=2)
    with _timed(timings, "plots"):
        figs = draw_figures(curves, report, classes, paths.figures)
    # 5. The Grad-CAM gallery, and the predictions that say which slices it shows.
    preds = _predictions(rows, curves.confusion["predicted"], probs, params)
    figs["gradcam_gallery"] = paths.figures / "gradcam_gallery.png"
    with _timed(timings, "gradcam"):
        # Examples from different brains (a slice without an id is its own group).
        groups = None if subjects is None else np.where(known, subjects, rows["path"])
        shown = write_gallery(
            model, x, y, probs, classes, figs["gradcam_gallery"], GALLERY_PER_KIND, groups
        )
    preds["in_gradcam_gallery"] = np.isin(np.arange(len(preds)), shown)
    pred_file = write_csv(paths.reports / "predictions_test.csv", preds)
    # 6. The reports: metrics.json (promote reads it through its contract), headline, card.
    report = json_safe(report)
    MetricsReport.check(report, paths.metrics)
    write_json(paths.metrics, report)
    split_info = split.model_dump(mode="json")  # the whole report, for the headline and card
    write_json(paths.headline, headline(report, split_info, validation))
    card_file = paths.reports / "model_card.md"
    provenance = _provenance(params, train_run)
    write_text(card_file, render_model_card(report, split_info, provenance, baselines))
    # 7. What the run logs: flat metrics and step timings, every output, the split's tags.
    metrics = flat_metrics(report)
    metrics.update({f"seconds_{k}": v for k, v in timings.items()})
    return StageResult(
        metrics=metrics,
        artifacts=[
            paths.headline,
            paths.metrics,
            baselines_file,
            card_file,
            pred_file,
            *csvs.values(),
            *figs.values(),
        ],
        tags=_tags(report, t_source),
        summary=_summary(report, baselines),
    )


def run_evaluate_stage(params: Params, paths: Paths) -> StageResult:
    """:func:`run_evaluate`, then its figures and the model card onto the training run."""
    from alzstage import tracking

    result = run_evaluate(params, paths)
    # The MLflow run that wrote this model file (train_run.json holds no MLflow id).
    train_run_id = tracking.trained_model(
        TrainRun.read(paths.train_run).model_md5, tracking.tracking_uri(paths.root)
    ).run_id
    result.tags["alzstage.train_run_id"] = train_run_id
    client = tracking.client()
    for k in TRAIN_RUN_METRICS:
        if k in result.metrics:  # qwk / AUC are absent when undefined on this test set
            client.log_metric(train_run_id, f"test_{k}", result.metrics[k])
    # The model card belongs next to the model it describes.
    card = paths.reports / "model_card.md"
    if card.exists():
        client.log_artifact(train_run_id, str(card))
    return result
