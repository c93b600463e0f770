"""What training optimises: class weights and the loss.

Both recipes, the CV folds and the multi-worker loop use these, so a weighted sample
means the same thing everywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from alzstage.config import Params


def class_weights(
    labels: np.ndarray, classes: list[str], spec: Any, max_weight: float | None = None
) -> dict[int, float] | None:
    """``balanced`` = n / (k * n_c) over classes present in training; or an explicit map.

    ``max_weight`` caps the balanced weights only: an explicit map is taken as written,
    because whoever wrote it chose those numbers.
    """
    if spec == "none":
        return None
    if isinstance(spec, dict):
        return {i: float(spec.get(c, 1.0)) for i, c in enumerate(classes)}
    counts = np.bincount(labels, minlength=len(classes))
    present = counts > 0
    n, k = counts.sum(), present.sum()
    weights = {i: float(n / (k * counts[i])) if counts[i] else 0.0 for i in range(len(classes))}
    if max_weight is not None:
        weights = {i: min(w, float(max_weight)) for i, w in weights.items()}
    return weights


def make_loss(params: Params) -> Any:
    """Cross-entropy, or focal loss to down-weight the many easy majority-class slices."""
    import keras

    if params.train.loss == "cross_entropy":
        return keras.losses.SparseCategoricalCrossentropy()
    n_classes = len(params.base.classes)
    gamma = params.train.focal_gamma

    def sparse_focal(y_true: Any, y_pred: Any) -> Any:
        # Per-sample values (not a reduced scalar) so class weights still apply per sample.
        y = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), n_classes)
        return keras.losses.categorical_focal_crossentropy(y, y_pred, gamma=gamma)

    return sparse_focal
