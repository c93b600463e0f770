"""The ``evaluate`` stage: honest test-split metrics, labelled with the split protocol.

Every report says which split protocol produced it and whether that protocol leaks
(slice-level splits put one brain on both sides), so a leaky number is never quoted
without its caveat.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from alzstage.config import Params, Paths
from alzstage.files import atomic_path, read_json, write_json
from alzstage.model.metrics import confusion, per_class_metrics, summary_metrics
from alzstage.model.train import load_split_images
from alzstage.result import StageResult


def evaluate_predictions(y: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """All reported numbers from labels and probabilities (pure, for tests)."""
    pred = probs.argmax(axis=1)
    cm = confusion(y, pred, len(classes))
    with np.errstate(invalid="ignore", divide="ignore"):
        cm_norm = np.nan_to_num(cm / cm.sum(axis=1, keepdims=True))
    return {
        **summary_metrics(y, pred, len(classes)),
        "n_test": len(y),
        "per_class": per_class_metrics(y, pred, classes),
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": np.round(cm_norm, 4).tolist(),
        "classes_absent_from_test": [c for i, c in enumerate(classes) if not (y == i).any()],
    }


def run_evaluate(params: Params, paths: Paths) -> StageResult:
    import keras

    import alzstage.model.build  # noqa: F401 - registers the custom layer for loading
    from alzstage.model.pyfunc import probabilities

    classes = params.base.classes
    x, y, rows = load_split_images(paths, params, "test")
    model = keras.models.load_model(paths.model_file, compile=False)
    probs = probabilities(model, x, params.model.input_size)
    report = evaluate_predictions(y, probs, classes)
    split_info = read_json(paths.split_report)
    report["split_strategy"] = split_info.get("strategy", params.split.strategy)
    report["split_leaky"] = bool(split_info.get("leaky", params.split.strategy != "subject"))
    report["split_fingerprint"] = split_info.get("fingerprint", "")
    write_json(paths.metrics, report)

    paths.plots.mkdir(parents=True, exist_ok=True)
    pred = probs.argmax(axis=1)
    conf = pd.DataFrame(
        {"actual": [classes[i] for i in y], "predicted": [classes[i] for i in pred]}
    )
    conf_file = paths.plots / "confusion.csv"
    with atomic_path(conf_file) as tmp:
        conf.to_csv(tmp, index=False)
    preds = rows[["path", "label", "subject"]].copy()
    preds["predicted"] = conf["predicted"]
    for i, c in enumerate(classes):
        preds[f"p_{c}"] = np.round(probs[:, i], 6)
    pred_file = paths.reports / "predictions_test.csv"
    with atomic_path(pred_file) as tmp:
        preds.to_csv(tmp, index=False)

    metrics = {k: float(report[k]) for k in ("accuracy", "balanced_accuracy", "macro_f1")}
    for c, m in report["per_class"].items():
        metrics.update({f"{c}_{k}": float(v) for k, v in m.items()})
    leak = " (LEAKY protocol: slices of one brain on both sides)" if report["split_leaky"] else ""
    return StageResult(
        metrics=metrics,
        artifacts=[paths.metrics, conf_file, pred_file],
        tags={
            "split.strategy": report["split_strategy"],
            "split.leaky": str(report["split_leaky"]),
            "split.fingerprint": report["split_fingerprint"],
        },
        summary=(
            f"test balanced accuracy {report['balanced_accuracy']:.3f}, macro-F1 "
            f"{report['macro_f1']:.3f}, accuracy {report['accuracy']:.3f} on "
            f"{report['n_test']} slices, split={report['split_strategy']}{leak}"
        ),
    )
