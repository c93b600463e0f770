"""The evaluate stage's curves and figures: the CSVs ``dvc plots`` draws, and their PNGs.

:func:`curve_tables` computes each curve once; the same frames are written as CSV
(:func:`write_curves`) and drawn as PNG (:func:`draw_figures`), so a figure never
re-reads a file its own stage has just written, and shows exactly what the CSV holds.
The object API of matplotlib needs no pyplot state and no GUI backend: safe in any worker.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from alzstage.files import atomic_path, write_csv
from alzstage.model.calibration import reliability_table
from alzstage.model.metrics import pr_curves, roc_curves

FIGURES = ("confusion", "roc", "pr", "reliability", "gradcam_gallery")
CURVES = ("roc", "pr", "reliability")


@dataclass(frozen=True)
class Curves:
    """The test split's curve tables, one ``reports/plots/<name>.csv`` each."""

    confusion: pd.DataFrame  # actual and predicted class of every test slice
    roc: pd.DataFrame
    pr: pd.DataFrame
    reliability: pd.DataFrame  # accuracy per confidence bin, before and after scaling

    def tables(self) -> dict[str, pd.DataFrame]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def curve_tables(y: np.ndarray, raw: np.ndarray, probs: np.ndarray, classes: list[str]) -> Curves:
    """Every curve of the test split from labels, raw and calibrated probabilities."""
    pred = probs.argmax(axis=1)
    return Curves(
        confusion=pd.DataFrame(
            {"actual": [classes[i] for i in y], "predicted": [classes[i] for i in pred]}
        ),
        roc=roc_curves(y, probs, classes),
        pr=pr_curves(y, probs, classes),
        reliability=pd.DataFrame(reliability_table(raw, probs, y)),
    )


def write_curves(curves: Curves, folder: Path) -> dict[str, Path]:
    """``<folder>/<name>.csv`` for each curve (atomically); returns the files by name."""
    folder.mkdir(parents=True, exist_ok=True)
    return {name: write_csv(folder / f"{name}.csv", t) for name, t in curves.tables().items()}


def draw_figures(curves: Curves, report: dict, classes: list[str], folder: Path) -> dict[str, Path]:
    """The confusion, ROC, PR and reliability PNGs, from the frames in memory."""
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "confusion": plot_confusion(report, classes, folder / "confusion.png"),
        "roc": plot_curves(curves.roc, classes, report["roc_auc"], "roc", folder / "roc.png"),
        "pr": plot_curves(curves.pr, classes, report["pr_auc"], "pr", folder / "pr.png"),
        "reliability": plot_reliability(
            curves.reliability, report["calibration"], folder / "reliability.png"
        ),
    }


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


def plot_column_problems(dvc_yaml: Path, written: Mapping[Path, Iterable[str]]) -> list[str]:
    """Curve columns that ``dvc.yaml``'s top-level plots name but the CSVs do not have.

    ``written`` maps each CSV written to its columns. The ROC/PR CSVs have one column
    per class in ``base.classes``; ``dvc.yaml`` has to list them by name, so a new class
    scheme (CN / MCI / LMCI / AD) silently empties those charts unless someone edits it.
    Saying so here turns that into a warning.
    """
    import yaml

    if not dvc_yaml.exists():
        return []
    try:
        plots = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("plots") or []
    except yaml.YAMLError:
        return []
    by_name = {Path(p).name: set(columns) for p, columns in written.items()}
    problems = []
    for entry in plots:
        if not isinstance(entry, dict):
            continue
        for props in entry.values():
            for path, fields_ in ((props or {}).get("y") or {}).items():
                have = by_name.get(Path(path).name)
                if have is None:
                    continue
                fields_ = [fields_] if isinstance(fields_, str) else list(fields_)
                missing = [f for f in fields_ if f not in have]
                if missing:
                    problems.append(
                        f"dvc.yaml plots: {path} has no column(s) {missing} (it has "
                        f"{sorted(have)}); list base.classes there so dvc plots show draws them"
                    )
    return problems
