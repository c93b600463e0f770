"""One training phase: compile, fit with per-epoch validation scoring, keep the best.

Shared by both recipes (``train.train_from_scratch`` and the transfer phases in
``train/transfer.py``). The callback scores validation with alzstage's own balanced
metrics (Keras's ``accuracy`` would be the majority-class rate), restores the best
epoch's weights, and can stop at a caller's target (``stop_when``), which is how the
time-to-target benchmark ends a run without patching this module.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from alzstage.config import AugmentParams, Params
from alzstage.model.metrics import summary_metrics
from alzstage.train.distribute import fit_distributed
from alzstage.train.feed import batches, predict_array
from alzstage.train.losses import make_loss

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.tracking import StageRun

#: Called with each epoch's validation row (``HISTORY_COLUMNS`` keys); True stops there.
StopWhen = Callable[[dict[str, Any]], bool]


@dataclass
class PhaseResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best: float = -1.0
    seconds: float = 0.0
    samples: int = 0
    #: ``stop_when`` ended the phase (the caller's target was reached).
    reached_target: bool = False


def make_epoch_callback(
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    monitor: str,
    patience: int,
    phase: str,
    offset: int,
    tracker: StageRun | None,
    batch_size: int,
    stop_when: StopWhen | None = None,
) -> Any:
    """A callback that scores validation each epoch and keeps the best weights.

    ``stop_when`` sees each epoch's row after scoring; True ends the phase there (a
    time-to-target run stops at its target, as MLPerf counts it).
    """
    import keras

    class SelectOnBalancedMetrics(keras.callbacks.Callback):
        """Score on validation each epoch; keep the best weights by balanced metric."""

        def __init__(self) -> None:
            super().__init__()
            self.result = PhaseResult()
            self.best_weights: list[np.ndarray] | None = None
            self.wait = 0

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.t_epoch = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            seconds = time.perf_counter() - self.t_epoch
            probs = predict_array(self.model, x_val, batch_size)
            pred = probs.argmax(axis=1)
            scores = summary_metrics(y_val, pred, n_classes)
            eps = 1e-7
            val_loss = float(-np.mean(np.log(probs[np.arange(len(y_val)), y_val] + eps)))
            lr = self.model.optimizer.learning_rate
            row = {
                "epoch": offset + epoch + 1,
                "phase": phase,
                "loss": float(logs.get("loss", np.nan)),
                "val_loss": val_loss,
                "val_accuracy": scores["accuracy"],
                "val_balanced_accuracy": scores["balanced_accuracy"],
                "val_macro_f1": scores["macro_f1"],
                "learning_rate": float(np.asarray(lr)),
                "epoch_seconds": seconds,
            }
            self.result.history.append(row)
            if tracker is not None:
                tracker.log_metrics(
                    {k: v for k, v in row.items() if k not in ("epoch", "phase")}, step=row["epoch"]
                )
            if stop_when is not None and stop_when(row):
                self.result.reached_target = True
                self.model.stop_training = True
            current = row[monitor]
            if current > self.result.best:
                self.result.best = current
                self.best_weights = self.model.get_weights()
                self.wait = 0
            else:
                self.wait += 1
                if self.wait >= patience:
                    self.model.stop_training = True

        def on_train_end(self, logs: dict | None = None) -> None:
            if self.best_weights is not None:
                self.model.set_weights(self.best_weights)

    return SelectOnBalancedMetrics()


def make_optimizer(
    lr: float, steps_per_epoch: int, epochs: int, warmup_epochs: float, weight_decay: float
) -> Any:
    """Adam (AdamW when ``weight_decay`` > 0) on a cosine decay, after a linear warm-up.

    A from-scratch network's first steps, with BatchNorm statistics still settling,
    diverge at the full rate: ``warmup_epochs`` ramps the rate from 0 first.
    """
    import keras

    warmup = round(warmup_epochs * steps_per_epoch)
    steps = max(1, steps_per_epoch * epochs - warmup)
    if warmup:
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=steps, alpha=0.01, warmup_target=lr, warmup_steps=warmup
        )
    else:
        schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps, alpha=0.1)
    if weight_decay:
        return keras.optimizers.AdamW(schedule, weight_decay=weight_decay)
    return keras.optimizers.Adam(schedule)


def fit_phase(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    lr: float,
    epochs: int,
    params: Params,
    phase: str,
    offset: int,
    tracker: StageRun | None,
    cw: dict[int, float] | None,
    warmup_epochs: float = 0.0,
    weight_decay: float = 0.0,
    patience: int | None = None,
    augment: Any = None,
    stop_when: StopWhen | None = None,
) -> PhaseResult:
    """Compile and fit one phase; best weights (by balanced metric) are restored.

    ``warmup_epochs`` ramps the learning rate linearly from 0 before the cosine decay (a
    from-scratch network's first steps, with BatchNorm statistics still settling, diverge
    at the full rate); ``weight_decay`` > 0 switches Adam to AdamW; ``augment`` maps each
    training batch (see ``online_augmenter``); ``stop_when`` as in ``make_epoch_callback``.
    """
    steps_per_epoch = max(1, int(np.ceil(len(x) / params.train.batch_size)))
    optimizer = make_optimizer(lr, steps_per_epoch, epochs, warmup_epochs, weight_decay)
    model.compile(optimizer=optimizer, loss=make_loss(params))
    monitor = params.train.monitor
    cb = make_epoch_callback(
        x_val,
        y_val,
        len(params.base.classes),
        monitor,
        patience or params.train.patience,
        phase,
        offset,
        tracker,
        params.train.batch_size,
        stop_when,
    )
    import tensorflow as tf

    t0 = time.perf_counter()
    strategy = tf.distribute.get_strategy()
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        fit_distributed(
            model,
            x,
            y,
            strategy=strategy,
            batch_size=params.train.batch_size,
            epochs=epochs,
            class_weight=cw,
            callback=cb,
            seed=params.base.seed + offset,
        )
    else:
        model.fit(
            batches(x, y, params.train.batch_size, seed=params.base.seed + offset, augment=augment),
            epochs=epochs,
            class_weight=cw,
            shuffle=False,  # `batches` reshuffles every epoch itself
            verbose=0,
            callbacks=[cb],
        )
    cb.result.seconds = time.perf_counter() - t0
    cb.result.samples = len(x) * len(cb.result.history)
    return cb.result


def online_augmenter(p: AugmentParams, seed: int) -> Any:
    """Random shift, rotation, zoom, flip, brightness and contrast for training batches.

    Runs in the input pipeline, not in the saved model: every epoch sees new views, and
    inference never pays for (or depends on) layers that only matter in training. The
    ranges are the ``augment`` section's, so both kinds of augmentation share one meaning.

    Weighed and not adopted (docs/performance.md): composing the four geometric layers
    into one ``keras.ops.image.affine_transform`` gave the pipeline 2.1x the images/s
    and ``fit`` 1.14x, but its 5-fold subject CV fell from 0.397 to 0.377 balanced
    accuracy and no longer beat the pixel baseline (+0.033, CI -0.011 to +0.074): within
    fold noise, but the default keeps the augmentation its CV claim was measured with.
    """
    import keras
    from keras import layers

    steps: list[Any] = []
    if p.shift:
        steps.append(layers.RandomTranslation(p.shift, p.shift, fill_mode="constant", seed=seed))
    if p.rotation_deg:
        steps.append(layers.RandomRotation(p.rotation_deg / 360, fill_mode="constant", seed=seed))
    if p.zoom:
        steps.append(layers.RandomZoom(p.zoom, fill_mode="constant", seed=seed))
    if p.horizontal_flip:
        steps.append(layers.RandomFlip("horizontal", seed=seed))
    if p.brightness:
        steps.append(layers.RandomBrightness(p.brightness, value_range=(0, 255), seed=seed))
    if p.contrast:
        steps.append(layers.RandomContrast(p.contrast, seed=seed))
    if not steps:
        return None
    pipeline = keras.Sequential(steps, name="online_augment")
    return lambda images: pipeline(images, training=True)
