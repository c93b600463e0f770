"""The transfer recipe (``model.weights`` = imagenet or a file): cut-and-cache, two phases.

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

:func:`train_transfer` reads as its phases: ``build_frozen``, ``cut_and_cache``,
``fit_head``, ``fine_tune``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alzstage.config import Params
from alzstage.train.activation_cache import ActivationCache, model_digest
from alzstage.train.distribute import synchronize_batchnorm
from alzstage.train.feed import predict_array
from alzstage.train.fit import PhaseResult, StopWhen, fit_phase

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.tracking import StageRun


def train_transfer(
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    tracker: StageRun | None,
    cw: dict[int, float] | None,
    strategy: Any,
    cache: ActivationCache | None,
    summary: dict[str, Any],
    stop_when: StopWhen | None = None,
) -> tuple[Any, dict[str, PhaseResult], Any, np.ndarray]:
    """Both phases; returns the full model, the phases, and the trained part with its val inputs.

    The trained part on its val inputs equals the full network on the val images (the
    frozen trunk's val activations are at hand), so calibration needs no second trunk pass.
    """
    t_start = time.perf_counter()
    with strategy.scope():
        # Build the network with its backbone frozen, and find where fine-tuning cuts it.
        net, cut = build_frozen(params)
        fine_tune_on = cut is not None and params.train.fine_tune_epochs > 0
        # Run the frozen layers once per image (or load them from the disk cache).
        t0 = time.perf_counter()
        frozen = cut_and_cache(net, cut if fine_tune_on else None, x, x_val, params, cache)
        summary["feature_seconds"] = time.perf_counter() - t0
        summary["build_seconds"] = t0 - t_start
        if frozen.cut_train is not None:
            summary["cut_cache_mb"] = (frozen.cut_train.nbytes + frozen.cut_val.nbytes) / 2**20
        if cache is not None:
            summary["activation_cache"] = [dict(e) for e in cache.events]
        # Phase 1: the head on pooled features.
        head, trained, val_in = fit_head(net, frozen, y, y_val, params, tracker, cw, stop_when)
        phases = {"head": head}
        # Phase 2 (optional, and not once a caller's target is reached): the backbone's
        # tail from the cut, at the lower rate.
        if fine_tune_on and not head.reached_target:
            offset = len(head.history)
            phases["fine_tune"], trained, val_in = fine_tune(
                net,
                cut,
                frozen,
                x,
                x_val,
                y,
                y_val,
                params,
                tracker,
                cw,
                offset,
                strategy,
                stop_when,
            )
    summary["parameters"] = int(net.model.count_params())
    return net.model, phases, trained, val_in


def build_frozen(params: Params) -> tuple[Any, str | None]:
    """The network with its backbone frozen, and where fine-tuning cuts it (None: nowhere)."""
    from alzstage.model.network import build_network, resolve_cut

    net = build_network(params.model, len(params.base.classes), params.base.seed, params.train.head)
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


def cut_and_cache(
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

    from alzstage.model.network import split_backbone

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


def fit_head(
    net: Any,
    frozen: FrozenFeatures,
    y: np.ndarray,
    y_val: np.ndarray,
    params: Params,
    tracker: StageRun | None,
    cw: dict[int, float] | None,
    stop_when: StopWhen | None = None,
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
        stop_when=stop_when,
    )
    return phase, head_model, frozen.pooled_val


def fine_tune(
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
    stop_when: StopWhen | None = None,
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
        stop_when=stop_when,
    )
    for layer in synced:
        layer.synchronized = False  # a plain layer in the saved model
    return phase, tail_model, a_val


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

    from alzstage.model import network as build

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
