"""What training optimises: class weights and the loss.

Both recipes, the CV folds and the multi-worker loop use these, so a weighted sample
means the same thing everywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from alzstage.config import ORDINAL_FOCAL_MESSAGE, Params
from alzstage.errors import ConfigError

#: Probabilities are clipped to [EPS, 1 - EPS] before a log, so a loss is never infinite.
EPS = 1e-7


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


def cumulative_from_probs(probs: np.ndarray) -> np.ndarray:
    """(n, K) class probabilities -> (n, K-1) cumulative P(y > k) = sum_{j>k} p_j, k < K-1.

    The quantities an ordinal model is judged on: each column is one "is the stage beyond
    k?" question, so a rank-consistent model has every row non-increasing.
    """
    p = np.asarray(probs, dtype=np.float64)
    return np.cumsum(p[:, ::-1], axis=1)[:, ::-1][:, 1:]


def ordinal_cumulative_bce(y_true: Any, y_pred: Any) -> Any:
    """Per-sample sum over thresholds k of BCE(1[y > k], P(y > k)), from class probabilities.

    The loss of ``train.head: ordinal``. CORN (Shi et al. 2021) trains each conditional
    P(y > k | y > k-1) on the samples with y > k-1; here the marginal P(y > k) = sum_{j>k} p_j
    is scored on every sample instead, because the model outputs class probabilities (so
    that temperature scaling, evaluation and serving see one (n, K) vector for both heads)
    and the marginals are exactly what a rank-consistent head gets right or wrong. A
    prediction two stages off misses two thresholds and pays twice. Per-sample values (not
    a reduced scalar), like the focal loss, so Keras applies class and sample weights and
    averages over the batch the same way for every loss.
    """
    from keras import ops

    p = ops.cast(y_pred, "float32")
    n_classes = p.shape[-1]
    y = ops.cast(ops.reshape(y_true, (-1, 1)), "int32")
    thresholds = ops.arange(n_classes - 1, dtype="int32")[None, :]
    target = ops.cast(ops.greater(y, thresholds), "float32")  # 1[y > k]
    # P(y > k) from the top down and P(y <= k) from the bottom up: each is a sum of
    # probabilities, never 1 minus a number close to 1.
    above = ops.flip(ops.cumsum(ops.flip(p, axis=-1), axis=-1), axis=-1)[:, 1:]
    at_or_below = ops.cumsum(p, axis=-1)[:, :-1]
    above = ops.clip(above, EPS, 1.0 - EPS)
    at_or_below = ops.clip(at_or_below, EPS, 1.0 - EPS)
    bce = -(target * ops.log(above) + (1.0 - target) * ops.log(at_or_below))
    return ops.sum(bce, axis=-1)


def make_loss(params: Params) -> Any:
    """Cross-entropy, or focal loss to down-weight the many easy majority-class slices.

    With ``train.head: ordinal`` the cross-entropy is the ordinal head's cumulative one
    (:func:`ordinal_cumulative_bce`); focal loss is a softmax loss and is refused there.
    """
    import keras

    if params.train.head == "ordinal":
        if params.train.loss != "cross_entropy":
            raise ConfigError(ORDINAL_FOCAL_MESSAGE)
        return ordinal_cumulative_bce
    if params.train.loss == "cross_entropy":
        return keras.losses.SparseCategoricalCrossentropy()
    n_classes = len(params.base.classes)
    gamma = params.train.focal_gamma

    def sparse_focal(y_true: Any, y_pred: Any) -> Any:
        # Per-sample values (not a reduced scalar) so class weights still apply per sample.
        y = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), n_classes)
        return keras.losses.categorical_focal_crossentropy(y, y_pred, gamma=gamma)

    return sparse_focal
