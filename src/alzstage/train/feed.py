"""How uint8 image arrays become training batches, one batch at a time.

Shared by the single-process feed (:func:`batches`, for Keras ``fit``) and the
multi-worker loop (``alzstage.train.distribute.fit_distributed``): both draw their index
batches from :func:`epoch_batches`, so a cluster and a single process see the same
batches in the same order.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def as_network_input(x: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) images become float32 (N, H, W, 1); anything else passes through."""
    if x.dtype == np.uint8 and x.ndim == 3:
        return x[..., None].astype(np.float32)
    return x


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    augment: Any = None,
) -> Any:
    """A ``tf.data`` pipeline of (x, y) batches sliced from the arrays on the fly.

    ``fit`` on the arrays themselves would copy them whole (see ``predict_array``); this
    reads one batch at a time, reshuffled every epoch from ``seed``, so the training
    arrays are held once. ``augment`` (float32 batch -> batch) runs in the pipeline.
    """
    import tensorflow as tf

    next_epoch = epoch_batches(len(x), batch_size, seed, shuffle)

    def gen() -> Any:
        for idx in next_epoch():
            yield as_network_input(x[idx]), y[idx]

    steps = -(-len(x) // batch_size)
    ds = tf.data.Dataset.from_generator(gen, output_signature=batch_specs(x, y))
    if augment is not None:
        ds = ds.map(lambda xb, yb: (augment(xb), yb), num_parallel_calls=1)
    return ds.apply(tf.data.experimental.assert_cardinality(steps)).prefetch(2)


def epoch_batches(n: int, batch_size: int, seed: int, shuffle: bool) -> Any:
    """Index batches for one epoch per call: order ``seed + epoch``, sorted within a batch.

    Both feeds (``batches`` and ``distribute.fit_distributed``) draw from this, so every worker of a
    cluster, and a single process, sees the same batches in the same order.
    """
    epoch = [0]

    def one_epoch() -> Any:
        order = np.random.default_rng(seed + epoch[0]).permutation(n) if shuffle else np.arange(n)
        epoch[0] += 1
        for start in range(0, n, batch_size):
            yield np.sort(order[start : start + batch_size])

    return one_epoch


def batch_specs(x: np.ndarray, y: np.ndarray) -> tuple[Any, Any]:
    """``tf.data`` signatures of (network input, label) batches sliced from ``x``, ``y``."""
    import tensorflow as tf

    sample = as_network_input(x[:1])
    return (
        tf.TensorSpec((None, *sample.shape[1:]), tf.as_dtype(sample.dtype)),
        tf.TensorSpec((None,), tf.as_dtype(y.dtype)),
    )


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
