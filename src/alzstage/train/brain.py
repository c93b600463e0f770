"""The thin shell around :mod:`alzstage.model.brain` for the single split.

``train`` calls :func:`fit_split_brain_model` right after the network is trained: the
network's calibrated probabilities of the *original* training slices (not the augmented
views) fit the aggregator, and those of the validation brains calibrate the conformal
sets. The result is written to ``models/brain_model.json`` and travels inside the MLflow
model, so ``predict``, the API and ``mlflow models serve`` give the same brain stage and
set. ``evaluate`` reads it back to score the test brains, through
:func:`alzstage.model.brain.read_brain_model`
(:func:`alzstage.evaluate.brain.brain_test_report`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from alzstage.artifacts import PixelStore, read_split
from alzstage.files import write_json
from alzstage.model.brain import (
    BrainModel,
    fit_from_params,
    split_brain_table,
    subset_table,
)

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.config import Params, Paths


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
    calibration = subset_table(tables["val"], held_out)
    model = fit_from_params(
        tables["train"],
        calibration if len(calibration.y) else None,
        classes,
        params.brain,
    )
    write_json(paths.brain_model, model.to_dict())
    return model
