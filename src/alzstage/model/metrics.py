"""Classification metrics shared by training (model selection) and evaluation (reporting).

Plain accuracy rewards predicting the majority class on this imbalanced data, so model
selection uses balanced accuracy or macro-F1, and reports always show all of them.
"""

from __future__ import annotations

import numpy as np


def summary_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    labels = list(range(n_classes))
    present = sorted(set(np.asarray(y_true).tolist()))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # Balanced accuracy averages recall over classes present in y_true only; a class
        # with no test subjects cannot be scored and is reported as such elsewhere.
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if present else 0.0,
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=present or labels, average="macro", zero_division=0)
        ),
    }


def per_class_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]
) -> dict[str, dict[str, float]]:
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(classes))), zero_division=0
    )
    return {
        c: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(s[i]),
        }
        for i, c in enumerate(classes)
    }


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, y_pred, labels=list(range(n_classes)))
