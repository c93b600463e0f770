"""Where training runs: the tf.distribute strategy, and the multi-worker training loop.

:func:`select_strategy` picks one strategy for a laptop CPU, a multi-GPU box or a
``TF_CONFIG`` cluster, so the training code itself does not branch on hardware. Keras 3
``fit`` cannot train under MultiWorkerMirroredStrategy with more than one worker, so
``train.fit_phase`` hands that case to :func:`fit_distributed`, a loop over
``strategy.run`` that keeps ``fit``'s arithmetic. :func:`synchronize_batchnorm` makes
trainable BatchNorm use the global batch's statistics when there are several replicas.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from alzstage.train.feed import as_network_input, batch_specs, epoch_batches


def select_strategy() -> Any:
    """MirroredStrategy over every visible GPU (or several logical devices), else default.

    The same training code then runs on a laptop CPU, a multi-GPU box or, with
    ``TF_CONFIG`` set, a MultiWorkerMirroredStrategy cluster (where ``fit_phase`` swaps
    Keras ``fit`` for ``fit_distributed``: keras-team/keras#20585).
    """
    import tensorflow as tf

    if os.environ.get("TF_CONFIG"):
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    cpus = tf.config.list_logical_devices("CPU")
    if os.environ.get("ALZSTAGE_MIRROR_CPUS") and len(cpus) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in cpus])
    return tf.distribute.get_strategy()


def distributed_batches(
    strategy: Any,
    x: np.ndarray,
    y: np.ndarray,
    weights: np.ndarray,
    batch_size: int,
    seed: int,
    shuffle: bool,
) -> Any:
    """Each global batch split across every replica of every worker, as a distributed set.

    Every worker draws the same epoch order (same seed) and feeds only its own replicas'
    parts; each sample's weight is scaled by 1/len(batch), so the summed replica losses
    are the class-weighted mean over the global batch.
    """
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    next_epoch = epoch_batches(len(x), batch_size, seed, shuffle)

    def dataset_fn(ctx: Any) -> Any:
        local = replicas // ctx.num_input_pipelines
        first = ctx.input_pipeline_id * local

        def pieces() -> Any:
            for idx in next_epoch():
                scale = np.float32(1.0 / len(idx))
                parts = np.array_split(idx, replicas)
                for r in range(first, first + local):
                    part = parts[r]
                    yield as_network_input(x[part]), y[part], weights[part] * scale

        signature = (*batch_specs(x, y), tf.TensorSpec((None,), tf.float32))
        return tf.data.Dataset.from_generator(pieces, output_signature=signature).prefetch(2)

    return strategy.distribute_datasets_from_function(dataset_fn)


def fit_distributed(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    strategy: Any,
    batch_size: int,
    epochs: int,
    class_weight: dict[int, float] | None,
    callback: Any,
    seed: int,
    shuffle: bool = True,
) -> None:
    """``model.fit`` for a compiled model, as a custom loop under ``strategy``.

    Keras 3 ``fit`` stops under MultiWorkerMirroredStrategy with more than one worker
    ("Attempt to convert a value (PerReplica...)", keras-team/keras#20585); a loop over
    ``strategy.run`` does not. It keeps what ``fit`` does here: ``batch_size`` is the
    global batch, each is split across every replica of every worker, the loss is the
    class-weighted mean over the global batch (Keras's ``sum_over_batch_size``), the
    compiled optimizer and its schedule step once per global batch, and the callback
    sees the same hooks and ``logs["loss"]``. Every worker reshuffles with the same seed,
    so all hold the same data order and take their own slice of each batch.
    """
    import keras
    import tensorflow as tf

    weights = np.ones(len(x), np.float32)
    if class_weight:
        weights = np.array([class_weight.get(int(c), 1.0) for c in y], np.float32)
    loss_obj = model.loss
    per_sample = loss_obj.call if isinstance(loss_obj, keras.losses.Loss) else loss_obj
    optimizer = model.optimizer
    if not optimizer.built:  # variables made now, under the strategy, not in a step
        optimizer.build(model.trainable_variables)
    batches = distributed_batches(strategy, x, y, weights, batch_size, seed, shuffle)

    def replica_step(xb: Any, yb: Any, wb: Any) -> Any:
        with tf.GradientTape() as tape:
            probs = model(xb, training=True)
            loss = tf.reduce_sum(per_sample(yb, probs) * wb)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    @tf.function
    def train_step(xb: Any, yb: Any, wb: Any) -> Any:
        per_replica = strategy.run(replica_step, args=(xb, yb, wb))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    callback.set_model(model)
    model.stop_training = False
    callback.on_train_begin()
    for epoch in range(epochs):
        callback.on_epoch_begin(epoch)
        total, steps = 0.0, 0
        for xb, yb, wb in batches:
            total += float(train_step(xb, yb, wb))
            steps += 1
        callback.on_epoch_end(epoch, {"loss": total / max(steps, 1)})
        if model.stop_training:
            break
    callback.on_train_end()


def synchronize_batchnorm(model: Any, enabled: bool) -> list[Any]:
    """Switch trainable BatchNorm layers of ``model`` to cross-replica statistics."""
    import keras

    if not enabled:
        return []
    layers = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]
    for layer in layers:
        layer.synchronized = True
    return layers
