"""The ``train`` stage: class-weighted two-phase transfer learning with cut-and-cache.

With the backbone frozen up to a cut, its activations do not change between epochs, so
they are computed once per training view and only the layers after the cut are trained
on them. This is mathematically the same model and gradients as running the frozen
layers at every step (BatchNorm is in inference mode and the frozen part has no
dropout), at a fraction of the cost on a CPU.

Phase 1 trains the head on pooled backbone features. Phase 2 (optional) unfreezes from
``train.fine_tune_from`` at a lower learning rate and trains that tail on cached
activations at the cut. The frozen activations also persist on disk
(``.cache/alzstage/activations``, keyed by trunk weights and input bytes), so a re-run
that changes only training params skips the frozen forward pass altogether.

``train_model`` reads as its phases: ``_build``, ``_cut_and_cache``, ``_fit_head``,
``_fine_tune``, then ``_finish`` (calibration and the summary). Where training runs (the
strategy and the multi-worker loop) is ``model/distribute.py``; how arrays become
batches is ``model/feed.py``.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from alzstage.config import AugmentParams, Params, Paths
from alzstage.errors import DataError
from alzstage.files import write_json
from alzstage.model.activation_cache import ActivationCache, model_digest
from alzstage.model.distribute import fit_distributed, select_strategy, synchronize_batchnorm
from alzstage.model.feed import as_network_input, batches
from alzstage.model.inputs import load_batch
from alzstage.model.metrics import summary_metrics
from alzstage.result import StageResult

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.tracking import StageRun

HISTORY_COLUMNS = [
    "epoch",
    "phase",
    "loss",
    "val_loss",
    "val_accuracy",
    "val_balanced_accuracy",
    "val_macro_f1",
    "learning_rate",
    "epoch_seconds",
]


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


def set_seeds(seed: int) -> None:
    import keras

    keras.utils.set_random_seed(seed)


@dataclass
class PhaseResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best: float = -1.0
    seconds: float = 0.0
    samples: int = 0


def _make_callback(
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    monitor: str,
    patience: int,
    phase: str,
    offset: int,
    tracker: StageRun | None,
    batch_size: int,
) -> Any:
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
) -> PhaseResult:
    """Compile and fit one phase; best weights (by balanced metric) are restored.

    ``warmup_epochs`` ramps the learning rate linearly from 0 before the cosine decay (a
    from-scratch network's first steps, with BatchNorm statistics still settling, diverge
    at the full rate); ``weight_decay`` > 0 switches Adam to AdamW; ``augment`` maps each
    training batch (see ``online_augmenter``).
    """
    import keras

    steps_per_epoch = max(1, int(np.ceil(len(x) / params.train.batch_size)))
    warmup = round(warmup_epochs * steps_per_epoch)
    steps = max(1, steps_per_epoch * epochs - warmup)
    if warmup:
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=steps, alpha=0.01, warmup_target=lr, warmup_steps=warmup
        )
    else:
        schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps, alpha=0.1)
    optimizer = (
        keras.optimizers.AdamW(schedule, weight_decay=weight_decay)
        if weight_decay
        else keras.optimizers.Adam(schedule)
    )
    model.compile(optimizer=optimizer, loss=make_loss(params))
    monitor = params.train.monitor
    cb = _make_callback(
        x_val,
        y_val,
        len(params.base.classes),
        monitor,
        patience or params.train.patience,
        phase,
        offset,
        tracker,
        params.train.batch_size,
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


def predict_array(model: Any, x: np.ndarray, batch: int, chunk_batches: int = 32) -> np.ndarray:
    """``model.predict`` over ``x`` in chunks, written into one preallocated array.

    Keras copies a NumPy input to ``predict`` or ``fit`` whole, about twice: a 1.3 GB
    array of cached activations peaked at 4.7 GB. Chunks bound that copy (and the
    float32 version of uint8 images) to ``chunk_batches`` batches.
    """
    step = batch * chunk_batches
    out: np.ndarray | None = None
    for start in range(0, len(x), step):
        part = np.asarray(
            model.predict(as_network_input(x[start : start + step]), batch_size=batch, verbose=0)
        )
        if out is None:
            out = np.empty((len(x), *part.shape[1:]), dtype=part.dtype)
        out[start : start + len(part)] = part
    if out is None:
        raise ValueError("predict_array: no samples to predict")
    return out


def online_augmenter(p: AugmentParams, seed: int) -> Any:
    """Random shift, rotation, zoom, flip, brightness and contrast for training batches.

    Runs in the input pipeline, not in the saved model: every epoch sees new views, and
    inference never pays for (or depends on) layers that only matter in training. The
    ranges are the ``augment`` section's, so both kinds of augmentation share one meaning.
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


def _frozen_forward(
    fn: Any,
    x: np.ndarray,
    x_val: np.ndarray,
    batch: int,
    cache: ActivationCache | None,
    what: str,
) -> tuple[np.ndarray, np.ndarray]:
    """``fn`` over the uint8 train and val images, through the disk cache when given."""

    def run(images: np.ndarray) -> np.ndarray:
        return predict_array(fn, images, batch)

    if cache is None:
        return run(x), run(x_val)
    import keras

    from alzstage.model import build

    digest = model_digest(
        fn,
        {
            "what": what,
            "keras": keras.__version__,
            # The preprocessing layer has no weights; its code is part of the function.
            "build_py": hashlib.sha256(Path(build.__file__).read_bytes()).hexdigest(),
        },
    )
    return (
        cache.get_or_compute("train", digest, x, run),
        cache.get_or_compute("val", digest, x_val, run),
    )


def train_model(
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    tracker: StageRun | None = None,
    cache: ActivationCache | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train on uint8 (N, H, W) images; returns the full Keras model and a summary.

    With ``cache``, the frozen trunk's activations are loaded from disk when the trunk
    weights and the input bytes are unchanged (see ``activation_cache``), so a sweep over
    training params pays for the frozen forward pass once.
    """
    set_seeds(params.base.seed)
    strategy = select_strategy()
    cw = class_weights(
        y, params.base.classes, params.train.class_weight, params.train.max_class_weight
    )
    summary = _describe(params, strategy)
    t_start = time.perf_counter()
    if params.recipe == "scratch":
        return _scratch(params, x, y, x_val, y_val, tracker, cw, strategy, summary, t_start)
    with strategy.scope():
        # Build the network with its backbone frozen, and find where fine-tuning cuts it.
        net, cut = _build(params)
        fine_tune = cut is not None and params.train.fine_tune_epochs > 0
        # Run the frozen layers once per image (or load them from the disk cache).
        t0 = time.perf_counter()
        frozen = _cut_and_cache(net, cut if fine_tune else None, x, x_val, params, cache)
        summary["feature_seconds"] = time.perf_counter() - t0
        summary["build_seconds"] = t0 - t_start
        if frozen.cut_train is not None:
            summary["cut_cache_mb"] = (frozen.cut_train.nbytes + frozen.cut_val.nbytes) / 2**20
        if cache is not None:
            summary["activation_cache"] = [dict(e) for e in cache.events]
        # Phase 1: the head on pooled features.
        head, trained, val_in = _fit_head(net, frozen, y, y_val, params, tracker, cw)
        phases = {"head": head}
        # Phase 2 (optional): the backbone's tail from the cut, at the lower rate.
        if fine_tune:
            offset = len(head.history)
            phases["fine_tune"], trained, val_in = _fine_tune(
                net, cut, frozen, x, x_val, y, y_val, params, tracker, cw, offset, strategy
            )
    summary["parameters"] = int(net.model.count_params())
    # Calibrate on validation: ``trained`` on ``val_in`` is the whole network on x_val.
    return _finish(params, net.model, summary, t_start, phases, val_in, y_val, cw, trained)


def _describe(params: Params, strategy: Any) -> dict[str, Any]:
    """The summary's first keys: where training runs and what it trains."""
    return {
        # tf.distribute.MultiWorkerMirroredStrategy's class is CollectiveAllReduceStrategy.
        "strategy": type(strategy).__name__.replace(
            "CollectiveAllReduceStrategy", "MultiWorkerMirroredStrategy"
        ),
        "replicas": int(strategy.num_replicas_in_sync),
        "recipe": params.recipe,
        "backbone": params.model.resolved_backbone,
    }


def _scratch(
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    tracker: StageRun | None,
    cw: dict[int, float] | None,
    strategy: Any,
    summary: dict[str, Any],
    t_start: float,
) -> tuple[Any, dict[str, Any]]:
    """The from-scratch recipe: build, one phase with every layer trained, calibrate."""
    from alzstage.model.build import build_network

    with strategy.scope():
        net = build_network(params.model, len(params.base.classes), params.base.seed)
        summary["parameters"] = int(net.model.count_params())
        phase = train_from_scratch(net, x, y, x_val, y_val, params, tracker, cw)
    summary["build_seconds"] = 0.0
    summary["feature_seconds"] = 0.0
    return _finish(params, net.model, summary, t_start, {"scratch": phase}, x_val, y_val, cw)


def _build(params: Params) -> tuple[Any, str | None]:
    """The network with its backbone frozen, and where fine-tuning cuts it (None: nowhere)."""
    from alzstage.model.build import build_network, resolve_cut

    net = build_network(params.model, len(params.base.classes), params.base.seed)
    cut = resolve_cut(params.model.resolved_backbone, params.train.fine_tune_from)
    net.backbone.trainable = False
    return net, cut


@dataclass
class FrozenFeatures:
    """What the frozen part of the network gives the two phases, computed once."""

    #: Pooled backbone features of the train and val images: phase 1's inputs.
    pooled_train: np.ndarray
    pooled_val: np.ndarray
    #: Activations at the cut and the backbone layers after it: phase 2's inputs and the
    #: part it trains. None unless a tail below ``all`` is fine-tuned.
    cut_train: np.ndarray | None = None
    cut_val: np.ndarray | None = None
    tail: Any = None


def _cut_and_cache(
    net: Any,
    cut: str | None,
    x: np.ndarray,
    x_val: np.ndarray,
    params: Params,
    cache: ActivationCache | None,
) -> FrozenFeatures:
    """Run the frozen layers over the images once (through ``cache`` when given).

    ``cut`` is where phase 2 will unfreeze (None when it will not run); at a cut inside
    the backbone the activations there are kept, and the pooled features are the frozen
    tail on them, so the trunk runs once per image for both phases.
    """
    import keras

    from alzstage.model.build import split_backbone

    bs = params.train.batch_size
    inp = keras.Input((*x.shape[1:], 1))
    pool = net.head.get_layer("pool")
    if cut is None or cut == "all":
        features = keras.Model(inp, pool(net.backbone(net.preprocess(inp))))
        return FrozenFeatures(*_frozen_forward(features, x, x_val, bs, cache, "pooled"))
    trunk, tail = split_backbone(net.backbone, cut)
    trunk_fn = keras.Model(inp, trunk(net.preprocess(inp)))
    a_train, a_val = _frozen_forward(trunk_fn, x, x_val, bs, cache, f"cut:{cut}")
    cut_in = keras.Input(a_train.shape[1:])
    pooled = keras.Model(cut_in, pool(tail(cut_in)))
    return FrozenFeatures(
        predict_array(pooled, a_train, bs), predict_array(pooled, a_val, bs), a_train, a_val, tail
    )


def _fit_head(
    net: Any,
    frozen: FrozenFeatures,
    y: np.ndarray,
    y_val: np.ndarray,
    params: Params,
    tracker: StageRun | None,
    cw: dict[int, float] | None,
) -> tuple[PhaseResult, Any, np.ndarray]:
    """Phase 1: the backbone frozen, the head trained on pooled features.

    Returns the phase, the head as a model on pooled features, and its val inputs.
    """
    import keras

    head_in = keras.Input(frozen.pooled_train.shape[1:])
    h = head_in
    for layer in net.head.layers[1:]:
        h = layer(h)
    head_model = keras.Model(head_in, h)
    phase = fit_phase(
        head_model,
        frozen.pooled_train,
        y,
        frozen.pooled_val,
        y_val,
        lr=params.train.learning_rate,
        epochs=params.train.epochs,
        params=params,
        phase="head",
        offset=0,
        tracker=tracker,
        cw=cw,
    )
    return phase, head_model, frozen.pooled_val


def _fine_tune(
    net: Any,
    cut: str,
    frozen: FrozenFeatures,
    x: np.ndarray,
    x_val: np.ndarray,
    y: np.ndarray,
    y_val: np.ndarray,
    params: Params,
    tracker: StageRun | None,
    cw: dict[int, float] | None,
    offset: int,
    strategy: Any,
) -> tuple[PhaseResult, Any, np.ndarray]:
    """Phase 2: unfreeze from ``cut`` and train that tail (and the head) at the lower rate.

    Returns the phase, the trained part as a model, and its val inputs (the cut's
    activations, or the images when ``cut`` is ``all``).
    """
    import keras

    if cut == "all":
        net.set_trainable(None)
        tail_model, a_train, a_val = net.model, x, x_val
    else:
        net.set_trainable(frozen.tail.layers)
        tail_in = keras.Input(frozen.cut_train.shape[1:])
        tail_model = keras.Model(tail_in, net.head(frozen.tail(tail_in)))
        a_train, a_val = frozen.cut_train, frozen.cut_val
    # Trainable BatchNorm (weights: none) normalises with batch statistics; with
    # several replicas each sees only its slice of the batch, so its moving
    # averages would drift apart per worker. Synchronised, the statistics are the
    # global batch's: the same arithmetic as one device, the same weights on all.
    synced = synchronize_batchnorm(net.backbone, strategy.num_replicas_in_sync > 1)
    phase = fit_phase(
        tail_model,
        a_train,
        y,
        a_val,
        y_val,
        lr=params.train.fine_tune_learning_rate,
        epochs=params.train.fine_tune_epochs,
        params=params,
        phase="fine_tune",
        offset=offset,
        tracker=tracker,
        cw=cw,
    )
    for layer in synced:
        layer.synchronized = False  # a plain layer in the saved model
    return phase, tail_model, a_val


def train_from_scratch(
    net: Any,
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    params: Params,
    tracker: StageRun | None,
    cw: dict[int, float] | None,
) -> PhaseResult:
    """Every layer trainable, one phase: the recipe for ``model.weights: none``."""
    sp = params.train.scratch
    net.set_trainable(None)
    augment = online_augmenter(params.augment, params.base.seed) if sp.online_augment else None
    return fit_phase(
        net.model,
        x,
        y,
        x_val,
        y_val,
        lr=sp.learning_rate,
        epochs=sp.epochs,
        params=params,
        phase="scratch",
        offset=0,
        tracker=tracker,
        cw=cw,
        warmup_epochs=sp.warmup_epochs,
        weight_decay=sp.weight_decay,
        patience=sp.patience,
        augment=augment,
    )


def _finish(
    params: Params,
    model: Any,
    summary: dict[str, Any],
    t_start: float,
    phases: dict[str, PhaseResult],
    f_val: np.ndarray,
    y_val: np.ndarray,
    cw: dict[int, float] | None,
    head_model: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """Calibrate on validation and summarise the phases; shared by both recipes.

    ``head_model`` on ``f_val`` must equal the full model on the val images: the transfer
    recipe passes its trained tail and the cached val activations, the scratch recipe the
    model itself and the images.
    """
    classes = params.base.classes
    bs = params.train.batch_size
    head_model = model if head_model is None else head_model
    history = [row for ph in phases.values() for row in ph.history]
    summary["train_seconds"] = time.perf_counter() - t_start
    # Temperature scaling on the validation split: calibrated probabilities are what
    # predict returns; argmax (and so every accuracy figure) is unchanged.
    from alzstage.model.calibration import (
        apply_temperature,
        expected_calibration_error,
        fit_temperature,
    )

    t0 = time.perf_counter()
    # The frozen trunk's val activations are at hand: the trained part of the network
    # on them is the whole network on the val images, without a second trunk pass.
    val_probs = predict_array(head_model, f_val, bs).astype(np.float64)
    temperature = fit_temperature(val_probs, y_val)
    summary["temperature"] = temperature
    summary["val_ece_before"] = expected_calibration_error(val_probs, y_val)

    summary["val_ece_after"] = expected_calibration_error(
        apply_temperature(val_probs, temperature), y_val
    )
    summary["calibration_seconds"] = time.perf_counter() - t0
    summary["history"] = history
    summary["class_weight"] = {classes[k]: v for k, v in (cw or {}).items()}
    for name, ph in phases.items():
        summary[f"{name}_epochs"] = len(ph.history)
        summary[f"{name}_best_{params.train.monitor}"] = ph.best
        summary[f"{name}_images_per_second"] = ph.samples / ph.seconds if ph.seconds else 0.0
        # Steady state: the first epoch also pays for tracing the training step.
        steady = [h["epoch_seconds"] for h in ph.history[1:]] or [ph.seconds]
        n_per_epoch = ph.samples / max(len(ph.history), 1)
        summary[f"{name}_steady_images_per_second"] = n_per_epoch / (sum(steady) / len(steady))
    return model, summary


def save_model_atomic(model: Any, target: Path) -> None:
    """Keras insists on a ``.keras`` suffix, so the temp file gets one too."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp.keras")
    try:
        model.save(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete ``.<stem>.<pid>.tmp.keras`` files beside ``target`` whose process is gone.

    A SIGKILL during ``model.save`` leaves the half-written temp file behind (nothing in
    the process runs to remove it); the next run removes it. A temp file of a process
    that still runs (another worker saving right now) is left alone. Returns the removed.
    """
    removed = []
    for tmp in target.parent.glob(f".{target.stem}.*.tmp.keras"):
        pid = tmp.name.removeprefix(f".{target.stem}.").removesuffix(".tmp.keras")
        if not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def load_rows(
    rows: pd.DataFrame, params: Params, paths: Paths, where: str, why_empty: str
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Images at network size and class indices for ``rows`` (path, label) of a split table.

    Shared by the single split and the CV folds, so both feed identical pixels.
    """
    if rows.empty:
        raise DataError(f"{where}; {why_empty}, or the split stage needs re-running")
    index = {c: i for i, c in enumerate(params.base.classes)}
    y = rows["label"].map(index).to_numpy(np.int64)
    x = load_batch([paths.raw / p for p in rows["path"]], params.model.input_size)
    return x, y, rows


def load_split_images(
    paths: Paths, params: Params, which: str
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    split = pd.read_csv(paths.split_file, dtype=str, keep_default_na=False)
    rows = split[split["split"] == which].reset_index(drop=True)
    where = f"{paths.split_file}: no rows with split == {which!r}"
    return load_rows(
        rows, params, paths, where, "the dataset is too small for split.val_size / split.test_size"
    )


def run_train(params: Params, paths: Paths, tracker: StageRun | None) -> StageResult:
    remove_stale_temps(paths.model_file)  # left by a run killed while saving
    data = np.load(paths.augmented / "train.npz")
    x, y = data["images"], data["labels"]
    x_val, y_val, _ = load_split_images(paths, params, "val")
    cache = (
        ActivationCache(paths.activation_cache, params.train.activation_cache_entries)
        if params.train.cache_activations
        else None
    )
    model, summary = train_model(params, x, y, x_val, y_val, tracker, cache)
    save_model_atomic(model, paths.model_file)
    history = pd.DataFrame(summary.pop("history"), columns=HISTORY_COLUMNS)
    paths.plots.mkdir(parents=True, exist_ok=True)
    hist_file = paths.plots / "train_history.csv"
    history.to_csv(hist_file, index=False)
    summary["n_train_samples"] = len(x)
    summary["n_val"] = len(x_val)
    write_json(paths.train_report, summary)
    metrics = {k: float(v) for k, v in summary.items() if isinstance(v, (int, float))}
    return StageResult(
        metrics=metrics,
        artifacts=[paths.train_report, hist_file],
        # The resolved recipe and backbone (params hold ``auto``): what was actually trained.
        tags={"train.recipe": summary["recipe"], "model.backbone": summary["backbone"]},
        summary=(
            f"{summary['recipe']} recipe ({summary['backbone']}, {summary['parameters']:,} "
            f"weights): trained on {len(x)} samples in {summary['train_seconds']:.1f}s"
        ),
    )
