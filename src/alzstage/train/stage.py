"""The ``train`` stage as DVC runs it: train, log the model to MLflow, record where it went.

``models/train_run.json`` is a stage output like ``models/model.keras``: evaluate reads
the temperature from it, promote what to tag, and both find the MLflow run through the
model file's md5, which the run is tagged with (the file holds no MLflow id, so that the
same training writes the same bytes). It is written here, by the stage, so the train
stage's code dependencies cover it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from alzstage.artifacts import PixelStore, TrainReport, TrainRun
from alzstage.files import md5_file
from alzstage.inference.ood import fit_from_pixels
from alzstage.inference.pyfunc import log_pyfunc, probabilities
from alzstage.train.brain import fit_split_brain_model
from alzstage.train.recipe import run_train

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.config import Params, Paths
    from alzstage.result import StageResult
    from alzstage.tracking import StageRun


def run_train_stage(params: Params, paths: Paths, tracker: StageRun) -> StageResult:
    """:func:`run_train`, then the pyfunc on ``tracker``'s run and ``models/train_run.json``."""
    import keras

    result = run_train(params, paths, tracker)
    report = TrainReport.read(paths.train_report)
    h, w = params.model.input_size
    # The brain-level model: fitted on the training brains, its sets calibrated on the
    # validation brains, with this network's calibrated probabilities.
    network = keras.models.load_model(paths.model_file, compile=False)
    brain = fit_split_brain_model(
        params, paths, lambda x: probabilities(network, x, (h, w), report.temperature)
    )
    meta = {
        "classes": params.base.classes,
        "input_size": [h, w],
        "temperature": report.temperature,
        "backbone": params.model.resolved_backbone,
    }
    # The input check and leak guard travel with the model (alzstage.inference.ood).
    store = PixelStore.read(paths.pixels)
    check, thumbnails = fit_from_pixels(paths.split_file, store, (h, w))
    meta["input_check"] = check.model_dump(mode="json")
    meta["brain_model"] = brain.to_dict()
    example = np.zeros((1, h, w), dtype=np.uint8)
    model_uri = log_pyfunc(paths.model_file, meta, example, training_thumbnails=thumbnails)
    from alzstage.tracking import TAG_MODEL_MD5, TAG_MODEL_URI

    model_md5 = md5_file(paths.model_file)
    tracker.set_tags({TAG_MODEL_MD5: model_md5, TAG_MODEL_URI: model_uri})
    TrainRun(
        model_md5=model_md5,
        temperature=meta["temperature"],
        input_size=(h, w),
        recipe=report.recipe,
        backbone=meta["backbone"],
        weights=params.model.weights,
    ).write(paths.train_run)
    result.artifacts.extend([paths.train_run, paths.brain_model])
    result.tags["brain.aggregator"] = brain.aggregator
    result.metrics["brain_calibration_brains"] = float(
        0 if brain.conformal is None else len(brain.conformal.labels)
    )
    return result
