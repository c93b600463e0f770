"""The ``evaluate`` stage: honest test-split metrics, labelled with the split protocol.

Every report says which split protocol produced it and whether that protocol leaks
(slice-level splits put one brain on both sides), so a leaky number is never quoted
without its caveat.

What "honest" means here, concretely:

* the reported probabilities are the calibrated ones (the temperature fitted on the
  validation split, never on test), with calibration shown before and after;
* slices of one brain are not independent, so confidence intervals resample subjects,
  and subject-level metrics (slices pooled per brain) are reported next to slice-level;
* the stages are ordinal, so quadratic weighted kappa is reported next to accuracy;
* a class that cannot be scored (absent from test) is named, never silently averaged;
* the network is compared with baselines that need no deep learning (majority class,
  nearest training slice, PCA + logistic regression on thumbnails) on the same test
  subjects, and the report says plainly whether it beats each one.

Pure functions (report assembly) come first; :func:`run_evaluate` is the thin I/O shell,
and :func:`run_evaluate_stage` links its results to the training run in MLflow.

Why one module of about 650 lines: the stage's pure scoring (metrics, CIs, calibration,
subject level) and its report and figures share one report dict; the metrics themselves
live in ``metrics.py``, ``calibration.py`` and ``baselines.py``.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
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
from alzstage.files import atomic_path, write_csv, write_json, write_text
from alzstage.model.calibration import (
    DEFAULT_BINS,
    apply_temperature,
    calibration_report,
    reliability_table,
)
from alzstage.model.metrics import (
    aggregate_by_subject,
    bootstrap_ci,
    confusion,
    normalized_confusion,
    one_vs_rest_auc,
    per_class_metrics,
    pr_curves,
    quadratic_weighted_kappa,
    roc_curves,
    summary_metrics,
)
from alzstage.result import StageResult

N_RESAMPLES = 1000
CI_LEVEL = 0.95
GALLERY_PER_KIND = 2  # right and wrong examples per class in the Grad-CAM gallery
KNOWN_SUBJECT_SOURCES = ("given", "pseudo")
FIGURES = ("confusion", "roc", "pr", "reliability", "gradcam_gallery")
CURVES = ("roc", "pr", "reliability")
# Test figures that also go on the training run, where the model lives in the MLflow UI.
TRAIN_RUN_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "qwk", "roc_auc_macro", "ece")


# --------------------------------------------------------------------------- pure: report


def evaluate_predictions(
    y: np.ndarray, probs: np.ndarray, classes: list[str], n_bins: int = DEFAULT_BINS
) -> dict:
    """Every image-level number from labels and (calibrated) probabilities."""
    from alzstage.model.calibration import expected_calibration_error

    y = np.asarray(y, dtype=np.int64)
    pred = probs.argmax(axis=1)
    cm = confusion(y, pred, len(classes))
    auc = one_vs_rest_auc(y, probs, classes)
    return {
        **summary_metrics(y, pred, len(classes)),
        "n_test": len(y),
        "per_class": per_class_metrics(y, pred, classes),
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": np.round(normalized_confusion(cm), 4).tolist(),
        "classes_absent_from_test": [c for i, c in enumerate(classes) if not (y == i).any()],
        "quadratic_weighted_kappa": quadratic_weighted_kappa(y, pred, len(classes)),
        "roc_auc": auc["roc_auc"],
        "pr_auc": auc["pr_auc"],
        "auc_skipped_classes": auc["skipped"],
        "ece": expected_calibration_error(probs, y, n_bins),
    }


def confidence_intervals(
    y: np.ndarray,
    pred: np.ndarray,
    classes: list[str],
    *,
    groups: np.ndarray | None,
    seed: int,
    n_resamples: int = N_RESAMPLES,
    level: float = CI_LEVEL,
) -> dict:
    """Bootstrap CIs in report form; ``unit`` says what was resampled."""
    res = bootstrap_ci(
        y, pred, len(classes), groups=groups, n_resamples=n_resamples, seed=seed, level=level
    )

    def fmt(iv: tuple[float, float] | None) -> dict[str, float] | None:
        return None if iv is None else {"low": round(iv[0], 6), "high": round(iv[1], 6)}

    return {
        "method": "percentile bootstrap, stratified by class",
        "unit": "image" if groups is None else "subject",
        "n_units": res.n_units,
        "n_resamples": res.n_resamples,
        "level": res.level,
        "seed": seed,
        **{name: fmt(iv) for name, iv in res.intervals.items()},
        "recall": {c: fmt(iv) for c, iv in zip(classes, res.recall, strict=True)},
    }


def subject_level_report(
    probs: np.ndarray,
    y: np.ndarray,
    subjects: np.ndarray,
    classes: list[str],
    *,
    seed: int,
    n_resamples: int = N_RESAMPLES,
) -> dict:
    """Metrics after pooling each subject's slices (mean log-probability).

    A clinician decides per patient, not per slice; and a model that is right on 90% of
    slices can still be right on only half the brains if its errors concentrate.
    """
    agg = aggregate_by_subject(probs, y, subjects)
    pred = agg.probs.argmax(axis=1)
    cm = confusion(agg.y, pred, len(classes))
    auc = one_vs_rest_auc(agg.y, agg.probs, classes)
    return {
        "available": True,
        "aggregation": "mean of slice log-probabilities per subject, renormalised",
        "n_subjects": len(agg.y),
        "n_subjects_per_class": {c: int((agg.y == k).sum()) for k, c in enumerate(classes)},
        "slices_per_subject": {
            "min": int(agg.n_slices.min()),
            "median": float(np.median(agg.n_slices)),
            "max": int(agg.n_slices.max()),
        },
        **summary_metrics(agg.y, pred, len(classes)),
        "quadratic_weighted_kappa": quadratic_weighted_kappa(agg.y, pred, len(classes)),
        "per_class": per_class_metrics(agg.y, pred, classes),
        "confusion_matrix": cm.tolist(),
        "roc_auc": auc["roc_auc"],
        "pr_auc": auc["pr_auc"],
        # Units are subjects already; the subject (not the subject-stage unit) is drawn.
        "ci": confidence_intervals(
            agg.y, pred, classes, groups=agg.subjects, seed=seed, n_resamples=n_resamples
        ),
    }


def known_subjects(rows: pd.DataFrame) -> np.ndarray:
    """Boolean mask: rows whose subject id is real (given) or recovered (pseudo)."""
    subj = rows.get("subject", pd.Series([""] * len(rows))).astype(str).str.strip()
    known = (subj != "").to_numpy()
    if "subject_source" in rows:
        known &= rows["subject_source"].astype(str).isin(KNOWN_SUBJECT_SOURCES).to_numpy()
    return known


def build_report(
    y: np.ndarray,
    raw_probs: np.ndarray,
    classes: list[str],
    *,
    temperature: float | None,
    temperature_source: str,
    subjects: np.ndarray | None,
    subject_ids: str,
    seed: int,
    n_resamples: int = N_RESAMPLES,
    n_bins: int = DEFAULT_BINS,
) -> dict:
    """The whole metrics.json body (without the split labels) from test predictions.

    ``subjects`` holds a subject id per slice and "" where none is known; None when the
    test split has no subject information at all (then images are the bootstrap unit
    and there is no subject-level block). ``temperature`` None means none was recorded:
    the probabilities are then reported uncalibrated, and say so.
    """
    y = np.asarray(y, dtype=np.int64)
    t = 1.0 if temperature is None else float(temperature)
    probs = apply_temperature(raw_probs, t)
    report = evaluate_predictions(y, probs, classes, n_bins)
    report["probabilities"] = (
        "UNCALIBRATED (no temperature recorded)"
        if temperature is None
        else "calibrated (temperature scaling fitted on the validation split)"
    )
    report["calibration"] = calibration_report(raw_probs, y, t, temperature_source, n_bins)
    report["calibration"]["applied"] = temperature is not None
    pred = probs.argmax(axis=1)
    known = np.zeros(len(y), bool) if subjects is None else np.asarray(subjects).astype(str) != ""
    if known.any():
        # Slices without an id are their own unit: they are independent as far as we know.
        groups = np.where(
            known, np.asarray(subjects).astype(str), [f"row:{i}" for i in range(len(y))]
        )
    else:
        groups = None
    report["ci"] = confidence_intervals(
        y, pred, classes, groups=groups, seed=seed, n_resamples=n_resamples
    )
    if known.any():
        sub = subject_level_report(
            probs[known],
            y[known],
            np.asarray(subjects)[known],
            classes,
            seed=seed,
            n_resamples=n_resamples,
        )
        sub["subject_ids"] = subject_ids
        sub["n_slices_without_subject"] = int((~known).sum())
        report["subject_level"] = sub
    else:
        report["subject_level"] = {
            "available": False,
            "reason": "no subject ids (given or recovered) in the test split",
        }
    return report


def json_safe(obj: Any) -> Any:
    """NaN/inf become null: JSON has no NaN, and DVC and browsers reject files that use it."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def flat_metrics(report: dict) -> dict[str, float]:
    """The scalar metrics logged to MLflow (None = not computable, so not logged)."""
    out: dict[str, Any] = {
        k: report.get(k) for k in ("accuracy", "balanced_accuracy", "macro_f1", "ece")
    }
    out["qwk"] = report.get("quadratic_weighted_kappa")
    out["roc_auc_macro"] = report["roc_auc"]["macro"]
    out["pr_auc_macro"] = report["pr_auc"]["macro"]
    for side in ("uncalibrated", "calibrated"):
        for k, v in report["calibration"][side].items():
            out[f"{k}_{side}"] = v
    out["temperature"] = report["calibration"]["temperature"]
    for k in ("accuracy", "balanced_accuracy", "macro_f1"):
        iv = report["ci"].get(k)
        if iv:
            out[f"{k}_ci_low"], out[f"{k}_ci_high"] = iv["low"], iv["high"]
    for c, m in report["per_class"].items():
        out.update({f"{c}_{k}": v for k, v in m.items()})
        out[f"{c}_roc_auc"] = report["roc_auc"]["per_class"].get(c)
        out[f"{c}_pr_auc"] = report["pr_auc"]["per_class"].get(c)
    sub = report.get("subject_level", {})
    if sub.get("available"):
        for k in ("accuracy", "balanced_accuracy", "macro_f1", "quadratic_weighted_kappa"):
            out[f"subject_{k}"] = sub.get(k)
        out["n_test_subjects"] = sub["n_subjects"]
    out.update(
        (k, v) for k, v in report.items() if k.startswith(("baseline_", "beats_", "network_minus_"))
    )
    return {
        k: float(v)
        for k, v in out.items()
        if v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))
    }


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float) -> Any:
    # The object API needs no pyplot state and no GUI backend: safe in any worker.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, target: Path) -> Path:
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return target


def plot_confusion(report: dict, classes: list[str], target: Path) -> Path:
    fig = _figure(10, 4.4)
    short = [c.replace("Demented", "D") for c in classes]
    for ax, key, title, fmt in (
        (fig.add_subplot(1, 2, 1), "confusion_matrix", "counts", "{:.0f}"),
        (fig.add_subplot(1, 2, 2), "confusion_matrix_normalized", "row-normalised", "{:.2f}"),
    ):
        m = np.asarray(report[key], dtype=float)
        ax.imshow(m, cmap="Blues", vmin=0, vmax=max(m.max(), 1e-9))
        for (i, j), v in np.ndenumerate(m):
            ax.text(
                j,
                i,
                fmt.format(v),
                ha="center",
                va="center",
                color="white" if v > m.max() / 2 else "black",
                fontsize=8,
            )
        ax.set_xticks(range(len(classes)), short, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), short, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"Test confusion matrix (n={report['n_test']} slices)")
    return _save(fig, target)


def plot_curves(
    curves: pd.DataFrame, classes: list[str], aucs: dict, kind: str, target: Path
) -> Path:
    """ROC or PR curves, one line per scored class plus the macro average."""
    x = "fpr" if kind == "roc" else "recall"
    fig = _figure(5.2, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    for c in classes:
        if curves[c].notna().any():
            ax.plot(curves[x], curves[c], label=f"{c} ({aucs['per_class'][c]:.3f})", lw=1.4)
    if curves["macro"].notna().any():
        ax.plot(curves[x], curves["macro"], "k--", label=f"macro ({aucs['macro']:.3f})", lw=1.6)
    if kind == "roc":
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title("One-vs-rest ROC (AUC)")
    else:
        ax.set_xlabel("recall")
        ax.set_ylabel("precision (interpolated)")
        ax.set_title("One-vs-rest precision-recall (AP)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
    return _save(fig, target)


def plot_reliability(table: pd.DataFrame, calibration: dict, target: Path) -> Path:
    fig = _figure(5.2, 5.6)
    ax, hist = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    width = 1.0 / len(table)
    ax.bar(
        table["confidence"],
        table["calibrated"].fillna(0),
        width=width * 0.9,
        alpha=0.6,
        label="accuracy (calibrated)",
        edgecolor="k",
    )
    ax.plot(
        table["confidence"],
        table["uncalibrated"],
        "o-",
        color="tab:red",
        label="accuracy (uncalibrated)",
        ms=4,
    )
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    before, after = calibration["uncalibrated"]["ece"], calibration["calibrated"]["ece"]
    ax.set_title(
        f"Reliability (T={calibration['temperature']:.2f}): ECE {before:.3f} -> {after:.3f}",
        fontsize=10,
    )
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="upper left")
    hist.bar(table["confidence"], table["count_calibrated"], width=width * 0.9, color="grey")
    hist.set_xlabel("confidence (max probability)")
    hist.set_ylabel("slices")
    hist.set_xlim(0, 1)
    return _save(fig, target)


# --------------------------------------------------------------------------- I/O shell


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
        "run_id": train_run.run_id,
        "model_uri": train_run.model_uri,
    }


def plot_column_problems(dvc_yaml: Path, written: dict[str, Path]) -> list[str]:
    """Curve columns that ``dvc.yaml``'s top-level plots name but the CSVs do not have.

    The ROC/PR CSVs have one column per class in ``base.classes``; ``dvc.yaml`` has to
    list them by name, so a new class scheme (CN / MCI / LMCI / AD) silently empties
    those charts unless someone edits it. Saying so here turns that into a warning.
    """
    import yaml

    if not dvc_yaml.exists():
        return []
    try:
        plots = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("plots") or []
    except yaml.YAMLError:
        return []
    by_name = {p.name: p for p in written.values()}
    problems = []
    for entry in plots:
        if not isinstance(entry, dict):
            continue
        for props in entry.values():
            for path, fields in ((props or {}).get("y") or {}).items():
                csv = by_name.get(Path(path).name)
                if csv is None or not csv.exists():
                    continue
                have = set(pd.read_csv(csv, nrows=0).columns)
                fields = [fields] if isinstance(fields, str) else list(fields)
                missing = [f for f in fields if f not in have]
                if missing:
                    problems.append(
                        f"dvc.yaml plots: {path} has no column(s) {missing} (it has "
                        f"{sorted(have)}); list base.classes there so dvc plots show draws them"
                    )
    return problems


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


def run_evaluate(params: Params, paths: Paths) -> StageResult:
    import keras

    import alzstage.model.network  # noqa: F401 - registers the custom layer for loading
    from alzstage.data.pixels import load_split_images
    from alzstage.evaluate.card import render_model_card
    from alzstage.inference.gradcam import write_gallery
    from alzstage.inference.pyfunc import probabilities

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    classes = params.base.classes
    x, y, rows = load_split_images(paths, params, "test")
    model = keras.models.load_model(paths.model_file, compile=False)
    raw = probabilities(model, x, params.model.input_size)  # T = 1: calibrated below
    timings["predict"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    train_run = TrainRun.read(paths.train_run)
    temperature, t_source = _temperature(train_run)
    split = SplitReport.read(paths.split_report)
    split_info = split.model_dump(mode="json")  # the whole report, for the headline and card
    validation = ValidationReport.read(paths.validation_report).model_dump(mode="json")
    known = known_subjects(rows)
    subjects = np.where(known, rows["subject"].astype(str).str.strip(), "") if known.any() else None
    report = build_report(
        y,
        raw,
        classes,
        temperature=temperature,
        temperature_source=t_source,
        subjects=subjects,
        subject_ids=split.subject_ids,
        seed=params.base.seed,
    )
    # From split.json (a declared dependency), never from params.split: the split that ran.
    report["split_strategy"] = split.strategy
    report["split_leaky"] = split.leaky
    report["split_fingerprint"] = split.fingerprint
    report["split_warning"] = split.warning
    report["dataset"] = split.dataset
    report["data_source"] = split.data_source
    timings["metrics"] = time.perf_counter() - t1

    probs = apply_temperature(raw, report["calibration"]["temperature"])
    pred = probs.argmax(axis=1)
    t_base = time.perf_counter()
    baselines = json_safe(baseline_report(paths, params, rows, y, pred, subjects))
    baselines_file = paths.reports / "baselines.json"
    write_json(baselines_file, baselines)
    report.update(headline_metrics(baselines))
    if subjects is not None and known.all():
        t_brain = time.perf_counter()
        report["brain_level"] = json_safe(brain_test_report(params, paths, rows, probs))
        timings["brain_level"] = time.perf_counter() - t_brain
    else:
        report["brain_level"] = {"available": False, "reason": "test slices without subject ids"}
    timings["baselines"] = time.perf_counter() - t_base
    paths.plots.mkdir(parents=True, exist_ok=True)
    paths.figures.mkdir(parents=True, exist_ok=True)
    conf = pd.DataFrame(
        {"actual": [classes[i] for i in y], "predicted": [classes[i] for i in pred]}
    )
    csvs = {
        "confusion": write_csv(paths.plots / "confusion.csv", conf),
        "roc": write_csv(paths.plots / "roc.csv", roc_curves(y, probs, classes)),
        "pr": write_csv(paths.plots / "pr.csv", pr_curves(y, probs, classes)),
        "reliability": write_csv(
            paths.plots / "reliability.csv", pd.DataFrame(reliability_table(raw, probs, y))
        ),
    }
    for problem in plot_column_problems(paths.root / "dvc.yaml", csvs):
        warnings.warn(problem, UserWarning, stacklevel=2)
    preds = rows[["path", "label", "subject"]].copy()
    preds["predicted"] = conf["predicted"]
    preds["confidence"] = np.round(probs.max(axis=1), 6)
    preds["low_confidence"] = probs.max(axis=1) < params.evaluate.low_confidence
    for i, c in enumerate(classes):
        preds[f"p_{c}"] = np.round(probs[:, i], 6)

    t2 = time.perf_counter()
    figs = {
        "confusion": plot_confusion(report, classes, paths.figures / "confusion.png"),
        "roc": plot_curves(
            pd.read_csv(csvs["roc"]), classes, report["roc_auc"], "roc", paths.figures / "roc.png"
        ),
        "pr": plot_curves(
            pd.read_csv(csvs["pr"]), classes, report["pr_auc"], "pr", paths.figures / "pr.png"
        ),
        "reliability": plot_reliability(
            pd.read_csv(csvs["reliability"]),
            report["calibration"],
            paths.figures / "reliability.png",
        ),
    }
    timings["plots"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    figs["gradcam_gallery"] = paths.figures / "gradcam_gallery.png"
    shown = write_gallery(
        model,
        x,
        y,
        probs,
        classes,
        figs["gradcam_gallery"],
        per_kind=GALLERY_PER_KIND,
        groups=None if subjects is None else np.where(known, subjects, rows["path"]),
    )
    timings["gradcam"] = time.perf_counter() - t3
    preds["in_gradcam_gallery"] = np.isin(np.arange(len(preds)), shown)
    pred_file = write_csv(paths.reports / "predictions_test.csv", preds)

    report = json_safe(report)
    MetricsReport.check(report, paths.metrics)  # promote reads it through this contract
    write_json(paths.metrics, report)
    write_json(paths.headline, headline(report, split_info, validation))
    card_file = paths.reports / "model_card.md"
    write_text(
        card_file,
        render_model_card(report, split_info, _provenance(params, train_run), baselines),
    )

    metrics = flat_metrics(report)
    metrics.update({f"seconds_{k}": v for k, v in timings.items()})
    leak = " (LEAKY protocol: slices of one brain on both sides)" if report["split_leaky"] else ""
    ci = report["ci"].get("balanced_accuracy") or {}
    ci_text = f" [95% CI {ci['low']:.3f}-{ci['high']:.3f}]" if ci else ""
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
        tags={
            "split.strategy": report["split_strategy"],
            "split.leaky": str(report["split_leaky"]),
            "split.fingerprint": report["split_fingerprint"],
            "data.name": report["dataset"],
            "calibration.temperature_source": t_source,
            "ci.unit": report["ci"]["unit"],
        },
        summary=(
            f"test balanced accuracy {report['balanced_accuracy']:.3f}{ci_text}, macro-F1 "
            f"{report['macro_f1']:.3f}, accuracy {report['accuracy']:.3f} on "
            f"{report['n_test']} slices, split={report['split_strategy']}{leak}; "
            f"{baselines['baselines']['pixel']['verdict']}"
        ),
    )


def run_evaluate_stage(params: Params, paths: Paths) -> StageResult:
    """:func:`run_evaluate`, then its figures and the model card onto the training run."""
    from alzstage import tracking

    result = run_evaluate(params, paths)
    train_run_id = TrainRun.read(paths.train_run).run_id
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
