"""The ``train`` stage: pick the recipe, train, calibrate, save.

Two recipes share one phase runner (``train/fit.py``):

- **scratch** (``model.weights: none``, the offline default): a compact ResNet from
  random weights, every layer trained in one phase with online augmentation
  (:func:`train_from_scratch`);
- **transfer** (pretrained weights): the frozen trunk runs once per image and two
  phases train the head and the backbone's tail on cached activations
  (``train/transfer.py``).

``train_model`` then calibrates on validation and summarises (``_finish``). Where
training runs is ``train/distribute.py``; how arrays become batches is ``train/feed.py``;
class weights and the loss are ``train/losses.py``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from alzstage.artifacts import AugmentedSet, TrainReport
from alzstage.config import Params, Paths
from alzstage.data.pixels import load_split_images
from alzstage.files import write_csv
from alzstage.result import StageResult
from alzstage.train.activation_cache import ActivationCache
from alzstage.train.distribute import select_strategy
from alzstage.train.feed import predict_array
from alzstage.train.fit import PhaseResult, StopWhen, fit_phase, online_augmenter
from alzstage.train.losses import class_weights
from alzstage.train.transfer import train_transfer

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


def set_seeds(seed: int) -> None:
    import keras

    keras.utils.set_random_seed(seed)


def train_model(
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    tracker: StageRun | None = None,
    cache: ActivationCache | None = None,
    stop_when: StopWhen | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train on uint8 (N, H, W) images; returns the full Keras model and a summary.

    With ``cache``, the frozen trunk's activations are loaded from disk when the trunk
    weights and the input bytes are unchanged (see ``activation_cache``), so a sweep over
    training params pays for the frozen forward pass once. ``stop_when`` sees each
    epoch's validation row and ends training when it returns True (a time-to-target run
    stops at its target; see ``fit.make_epoch_callback``).
    """
    set_seeds(params.base.seed)
    strategy = select_strategy()
    cw = class_weights(
        y, params.base.classes, params.train.class_weight, params.train.max_class_weight
    )
    summary = _describe(params, strategy)
    t_start = time.perf_counter()
    if params.recipe == "scratch":
        from alzstage.model.network import build_network

        with strategy.scope():
            net = build_network(
                params.model, len(params.base.classes), params.base.seed, params.train.head
            )
            summary["parameters"] = int(net.model.count_params())
            phase = train_from_scratch(net, x, y, x_val, y_val, params, tracker, cw, stop_when)
        summary["build_seconds"] = 0.0
        summary["feature_seconds"] = 0.0
        return _finish(params, net.model, summary, t_start, {"scratch": phase}, x_val, y_val, cw)
    model, phases, trained, val_in = train_transfer(
        params, x, y, x_val, y_val, tracker, cw, strategy, cache, summary, stop_when
    )
    # Calibrate on validation: ``trained`` on ``val_in`` is the whole network on x_val.
    return _finish(params, model, summary, t_start, phases, val_in, y_val, cw, trained)


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


def train_from_scratch(
    net: Any,
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    params: Params,
    tracker: StageRun | None,
    cw: dict[int, float] | None,
    stop_when: StopWhen | None = None,
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
        stop_when=stop_when,
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
    reached = [name for name, ph in phases.items() if ph.reached_target]
    if reached:  # only with a caller's ``stop_when``: it ended training early
        summary["stopped_at_target_epoch"] = len(history)
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
    """Keras insists on a ``.keras`` suffix, so the temp file gets one too.

    The saved file is made canonical (:func:`canonical_keras`) before it is renamed into
    place, so the same weights always give the same bytes under DVC.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp.keras")
    try:
        model.save(tmp)
        canonical_keras(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def canonical_keras(path: Path) -> None:
    """Rewrite a ``.keras`` zip in place without what changes from one save to the next.

    Keras stamps ``metadata.json`` with the save time (``date_saved``), numbers shared
    objects in ``config.json`` by their memory address (``id()``), and dates the weights
    file in the zip with the current time. None of it is read back on load, and each of
    it made two trainings to identical weights hash differently in ``dvc.lock``. The ids
    are renumbered in order of appearance (sharing is kept); entries get one fixed date.
    When the model was saved is in its MLflow run.
    """
    import json
    import zipfile

    with zipfile.ZipFile(path) as zin:
        entries = [(info, zin.read(info)) for info in zin.infolist()]
    with zipfile.ZipFile(path, "w") as zout:
        for info, data in entries:
            if info.filename == "metadata.json":
                meta = json.loads(data)
                meta.pop("date_saved", None)
                data = json.dumps(meta).encode()
            elif info.filename == "config.json":
                data = json.dumps(_renumber_shared(json.loads(data), {})).encode()
            entry = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = info.compress_type
            entry.external_attr = info.external_attr
            entry.create_system = info.create_system
            zout.writestr(entry, data)


def _renumber_shared(node: Any, ids: dict[int, int]) -> Any:
    """Replace every ``shared_object_id`` by 1, 2, ... in order of first appearance."""
    if isinstance(node, dict):
        if "shared_object_id" in node:
            node["shared_object_id"] = ids.setdefault(node["shared_object_id"], len(ids) + 1)
        for value in node.values():
            _renumber_shared(value, ids)
    elif isinstance(node, list):
        for value in node:
            _renumber_shared(value, ids)
    return node


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


def is_timing(key: str) -> bool:
    """A figure of this machine and its load, not of the model (``train_seconds``, ...).

    Kept out of the stage's DVC outputs (``reports/train.json``, ``train_history.csv``),
    where it made every re-run of identical training hash differently; MLflow has them.
    """
    return key.endswith(("_seconds", "images_per_second"))


def run_train(params: Params, paths: Paths, tracker: StageRun | None) -> StageResult:
    remove_stale_temps(paths.model_file)  # left by a run killed while saving
    augmented = AugmentedSet.read(paths.augmented)
    x, y = augmented.images, augmented.labels
    x_val, y_val, _ = load_split_images(paths, params, "val")
    cache = (
        ActivationCache(paths.activation_cache, params.train.activation_cache_entries)
        if params.train.cache_activations
        else None
    )
    model, summary = train_model(params, x, y, x_val, y_val, tracker, cache)
    save_model_atomic(model, paths.model_file)
    history = pd.DataFrame(summary.pop("history"), columns=HISTORY_COLUMNS)
    hist_file = write_csv(
        paths.plots / "train_history.csv",
        history.drop(columns=[c for c in history if is_timing(c)]),
    )
    summary["n_train_samples"] = len(x)
    summary["n_val"] = len(x_val)
    timeless = {k: v for k, v in summary.items() if not is_timing(k)}
    TrainReport.check(timeless, paths.train_report).write(paths.train_report)
    # Every figure, timings included, goes to MLflow (epoch times too, logged per epoch).
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
