"""The thin shell around :mod:`alzstage.model.brain` for the single split.

``train`` calls :func:`fit_split_brain_model` right after the network is trained: the
network's calibrated probabilities of the *original* training slices (not the augmented
views) fit the aggregator, and those of the validation brains calibrate the conformal
sets. The result is written to ``models/brain_model.json`` and travels inside the MLflow
model, so ``predict``, the API and ``mlflow models serve`` give the same brain stage and
set. ``evaluate`` reads it back to score the test brains, through
:func:`read_brain_model`.

:func:`split_brain_table` is the one place that turns split rows into a brain table
(probabilities from a predictor, atrophy from the decode stage's store), for train and
evaluate alike.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from alzstage.artifacts import PixelStore, read_split
from alzstage.errors import ArtifactError, MissingInputError
from alzstage.files import read_json, write_json
from alzstage.model.brain import BrainModel, BrainTable, brain_table, fit_from_params
from alzstage.model.morphometry import MORPH_FEATURES

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.config import Params, Paths


def split_brain_table(
    rows: pd.DataFrame,
    store: PixelStore,
    classes: list[str],
    probs: np.ndarray | None,
) -> BrainTable:
    """A brain table of split rows (path, label, subject); ``probs`` None: uniform
    (a table for the atrophy-only model, which reads no network output)."""
    index = {c: i for i, c in enumerate(classes)}
    if probs is None:
        probs = np.full((len(rows), len(classes)), 1.0 / len(classes))
    return brain_table(
        rows["subject"].astype(str).to_numpy(),
        probs,
        store.feature_columns_for(rows["path"], MORPH_FEATURES),
        rows["label"].map(index).to_numpy(np.int64),
    )


def fit_split_brain_model(
    params: Params, paths: Paths, predict: Callable[[np.ndarray], np.ndarray]
) -> BrainModel:
    """Fit on the training brains, calibrate on the validation brains; write the JSON.

    ``predict`` maps uint8 network inputs (N, H, W) to calibrated probabilities.
    """
    split = read_split(paths.split_file)
    store = PixelStore.read(paths.pixels)
    classes = list(params.base.classes)
    tables = {}
    for role in ("train", "val"):
        rows = split[split["split"] == role].reset_index(drop=True)
        probs = predict(store.images_for(rows["path"], params.model.input_size))
        tables[role] = split_brain_table(rows, store, classes, probs)
    # A leaky (slice-level) split has the training brains among the validation brains:
    # only brains the model never saw may calibrate its sets. None left: no sets.
    held_out = ~np.isin(tables["val"].subjects, tables["train"].subjects)
    calibration = _subset(tables["val"], held_out)
    model = fit_from_params(
        tables["train"],
        calibration if len(calibration.y) else None,
        classes,
        params.brain,
    )
    write_json(paths.brain_model, model.to_dict())
    return model


def _subset(table: BrainTable, keep: np.ndarray) -> BrainTable:
    return BrainTable(
        subjects=table.subjects[keep],
        y=table.y[keep],
        pooled=table.pooled[keep],
        morph=table.morph[keep],
        n_slices=table.n_slices[keep],
    )


def read_brain_model(path: Path) -> BrainModel:
    """``models/brain_model.json`` as a model; a missing or foreign file names the fix."""
    if not Path(path).exists():
        raise MissingInputError(f"{path}: not found; run `alzstage train` (or `dvc repro train`)")
    try:
        return BrainModel.from_dict(read_json(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(
            f"{path}: not a brain model written by train ({exc}); re-run `dvc repro train`"
        ) from None


def brain_test_report(
    params: Params, paths: Paths, test_rows: pd.DataFrame, test_probs: np.ndarray
) -> dict:
    """The test brains scored by the trained brain model, with its conformal sets, the
    fixed pooling rule, the morphometric baseline (fitted here on the training brains)
    and the majority class, paired against the brain model; and the binary view.

    Same shape as the CV's ``brain_level`` block, so one headline reads both.
    """
    from alzstage.model.brain_metrics import binary_view, bootstrap_brains
    from alzstage.model.conformal import coverage_report

    classes = list(params.base.classes)
    model = read_brain_model(paths.brain_model)
    split = read_split(paths.split_file)
    store = PixelStore.read(paths.pixels)
    train_rows = split[split["split"] == "train"].reset_index(drop=True)
    train_t = split_brain_table(train_rows, store, classes, None)
    test_t = split_brain_table(test_rows, store, classes, test_probs)
    b = params.brain
    morph = BrainModel(
        classes, "logistic", ("morphometry",), b.C, b.max_class_weight, b.confidence
    ).fit(train_t)
    probs = model.predict_proba(test_t)
    preds = {
        "brain_model": probs.argmax(axis=1),
        "pool": test_t.pooled.argmax(axis=1),
        "morphometric": morph.predict_proba(test_t).argmax(axis=1),
        "majority": np.full(len(test_t.y), np.bincount(train_t.y).argmax()),
    }
    seed = params.base.seed
    scores = bootstrap_brains(
        test_t.y, preds, test_t.subjects, classes, reference="brain_model", seed=seed
    )
    sets = model.sets(test_t)
    conformal: dict = {"confidence": model.confidence, "selected": "marginal"}
    if sets is None:
        conformal["available"] = False
        conformal["reason"] = "no held-out validation brains to calibrate on (leaky split?)"
    else:
        conformal["selected"] = "mondrian" if model.conformal.mondrian else "marginal"
        conformal[conformal["selected"]] = coverage_report(
            sets, test_t.y, classes, model.confidence
        )
        conformal["calibration_brains"] = len(model.conformal.labels)
    return {
        "default": "brain_model",
        "aggregator": model.aggregator,
        "features": list(model.features),
        "n_brains": len(test_t.y),
        "scores": scores,
        "conformal": conformal,
        "binary": binary_view(test_t.y, probs, test_t.subjects, seed=seed),
        "brains": {
            "subject": test_t.subjects.tolist(),
            "stage": [classes[i] for i in probs.argmax(axis=1)],
            "set": None
            if sets is None
            else ["|".join(c for c, k in zip(classes, row, strict=True) if k) for row in sets],
        },
    }
