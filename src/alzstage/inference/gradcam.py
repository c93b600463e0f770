"""Grad-CAM: where in the slice the network looked when it chose a stage.

A test-set number cannot tell a model that reads the hippocampus and ventricles from one
that reads the skull outline, the scanner's text overlay or the slice position. Grad-CAM
(Selvaraju et al., 2017) weights the last convolutional feature maps by the gradient of
the class score and shows which region drove the decision, so a reviewer can see the
difference in a minute.

The project's model is a chain ``preprocess -> backbone (nested keras Model) -> head``;
the backbone's output *is* its last convolutional block's activation (``include_top=
False``, no pooling), so the gradient is taken there and the head is replayed on it. The
replay is checked against the model's own output, so a model of a different shape fails
loudly instead of producing a plausible but wrong map.

Public API (reused by the web UI): :func:`gradcam` and :func:`overlay`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BATCH = 16


# --------------------------------------------------------------------------- model surgery


def _rank(layer: Any) -> int:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):
        return -1


def _split_chain(model: Any) -> tuple[list[Any], Any, list[Any]]:
    """(layers before, the conv block producing feature maps, layers after) of ``model``.

    Nested case: the last top-level sub-model with a 4-D output is the backbone. Flat
    case: the last top-level layer with a 4-D output, with everything before it wrapped
    in one functional model. Sequential blocks after it are unrolled so the final
    softmax Dense can be split into logits.
    """
    import keras

    top = [lyr for lyr in model.layers if not isinstance(lyr, keras.layers.InputLayer)]
    nested = [i for i, lyr in enumerate(top) if isinstance(lyr, keras.Model) and _rank(lyr) == 4]
    if nested:
        i = nested[-1]
        before, conv = top[:i], top[i]
    else:
        conv_idx = [i for i, lyr in enumerate(top) if _rank(lyr) == 4]
        if not conv_idx:
            raise ValueError(
                "gradcam: the model has no layer with a 4-D (convolutional) output to explain"
            )
        i = conv_idx[-1]
        before, conv = [], keras.Model(model.inputs, top[i].output)
    after: list[Any] = []
    for lyr in top[i + 1 :]:
        if isinstance(lyr, keras.Sequential):
            after.extend(lyr.layers)
        else:
            after.append(lyr)
    if not after:
        raise ValueError("gradcam: no classifier layers after the convolutional block")
    return before, conv, after


def _is_softmax_dense(layer: Any) -> bool:
    import keras

    act = getattr(layer, "activation", None)
    return isinstance(layer, keras.layers.Dense) and getattr(act, "__name__", "") == "softmax"


def _cam_batch(
    chain: tuple[list[Any], Any, list[Any]], x: np.ndarray, class_index: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cams at feature-map resolution, probabilities, class explained) for one batch."""
    import tensorflow as tf

    before, conv, after = chain
    h = tf.convert_to_tensor(x, dtype=tf.float32)
    for lyr in before:
        h = lyr(h, training=False)
    # The feature maps are computed outside the tape: only the head is differentiated.
    # Inside it, TF also ran the backbone's convolution gradients (Conv2DBackpropFilter),
    # wasted work that crashed in oneDNN (free(): invalid size) in one evaluate run.
    fmap = conv(h, training=False)
    with tf.GradientTape() as tape:
        tape.watch(fmap)
        z = fmap
        for lyr in after[:-1]:
            z = lyr(z, training=False)
        last = after[-1]
        if _is_softmax_dense(last):
            # The pre-softmax score, as in the paper: the softmax gradient vanishes for a
            # confident prediction and would show nothing exactly where we look most.
            logits = tf.matmul(z, last.kernel) + last.bias
            probs = tf.nn.softmax(logits)
        elif hasattr(last, "log_probabilities"):
            # The ordinal (CORN) head: its exact log-probabilities, not log of clipped
            # probabilities, whose gradient is zero for a class below the clip.
            logits = last.log_probabilities(z)
            probs = tf.exp(logits)
        else:
            probs = last(z, training=False)
            logits = tf.math.log(tf.clip_by_value(probs, 1e-12, 1.0))
        target = (
            tf.argmax(probs, axis=1, output_type=tf.int32)
            if class_index is None
            else tf.convert_to_tensor(class_index, dtype=tf.int32)
        )
        score = tf.reduce_sum(tf.gather(logits, target, axis=1, batch_dims=1))
    grads = tape.gradient(score, fmap)
    alpha = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(alpha * fmap, axis=-1))
    return cam.numpy(), probs.numpy(), target.numpy()


def _resize(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import tensorflow as tf

    if maps.shape[1:3] == tuple(size):
        return maps.astype(np.float64)
    out = tf.image.resize(maps[..., None].astype(np.float32), size, method="bilinear")
    return out.numpy()[..., 0].astype(np.float64)


def _normalise(maps: np.ndarray) -> np.ndarray:
    """Scale each map to [0, 1] by its own maximum; an all-zero map stays zero."""
    peak = maps.reshape(len(maps), -1).max(axis=1) if len(maps) else np.zeros(0)
    scale = np.where(peak > 1e-12, peak, 1.0)[:, None, None]
    return np.clip(maps / scale, 0.0, 1.0)


def gradcam(
    model: Any,
    images_uint8_HW: np.ndarray,
    class_index: int | Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Grad-CAM heatmaps (N, H, W) in [0, 1] for grayscale uint8 images (N, H, W) or (H, W).

    ``class_index``: None explains each image's predicted class; an int explains that
    class for all images; a sequence gives one class per image. Images are resized to
    the model's input for the forward pass and the maps are returned at the images' own
    size, ready for :func:`overlay`. Raises ValueError when the model is not a chain this
    function can replay exactly.
    """
    from alzstage.data.images import to_model_array

    arr = np.asarray(images_uint8_HW)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"gradcam: expected (N, H, W) or (H, W) images, got shape {arr.shape}")
    n, out_h, out_w = arr.shape
    if n == 0:
        return np.zeros((0, out_h, out_w))
    in_h, in_w = (int(d) for d in model.input_shape[1:3])
    if (out_h, out_w) != (in_h, in_w):
        arr = np.stack([to_model_array(a, (in_h, in_w)) for a in arr])
    x = arr[..., None].astype(np.float32)
    if class_index is None:
        targets = None
    else:
        targets = np.broadcast_to(np.asarray(class_index, dtype=np.int64), (n,))
    chain = _split_chain(model)
    cams, probs = [], []
    for start in range(0, n, BATCH):
        sl = slice(start, start + BATCH)
        try:
            cam, p, _ = _cam_batch(chain, x[sl], None if targets is None else targets[sl])
        except (TypeError, ValueError) as exc:  # a layer that needs more than one input
            raise ValueError(
                f"gradcam: cannot replay the model as a chain of layers ({exc}); expected "
                "preprocess -> backbone -> head"
            ) from exc
        cams.append(cam)
        probs.append(p)
    expected = np.asarray(model.predict(x, batch_size=BATCH, verbose=0))
    if not np.allclose(np.concatenate(probs), expected, atol=1e-4):
        raise ValueError(
            "gradcam: replaying the layers after the convolutional block does not reproduce "
            "the model's output; the model is not a preprocess -> backbone -> head chain"
        )
    return _normalise(_resize(np.concatenate(cams), (out_h, out_w)))


# --------------------------------------------------------------------------- drawing


def _jet(h: np.ndarray) -> np.ndarray:
    """A jet-like colour map (blue -> cyan -> yellow -> red), values in [0, 1], no matplotlib."""
    h = np.clip(h, 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0])  # red, green, blue peaks at h = 3/4, 1/2, 1/4
    return np.clip(1.5 - np.abs(4.0 * h - centres), 0.0, 1.0)


def overlay(image_uint8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB uint8 (H, W, 3): the image tinted by the heatmap in proportion to its heat.

    Cold regions keep the original pixels (the anatomy stays readable); only where the
    map is hot does the colour take over, up to ``alpha``.
    """
    img = np.asarray(image_uint8)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    base = np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img[..., :3]
    base = base.astype(np.float64)
    heat = np.asarray(heatmap, dtype=np.float64)
    if heat.shape != base.shape[:2]:
        heat = _resize(heat[None], base.shape[:2])[0]
    heat = np.clip(heat, 0.0, 1.0)
    weight = alpha * heat[..., None]
    out = base * (1.0 - weight) + 255.0 * _jet(heat) * weight
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- gallery


def select_gallery(
    y: np.ndarray,
    pred: np.ndarray,
    confidence: np.ndarray,
    n_classes: int,
    per_kind: int = 2,
    groups: np.ndarray | None = None,
) -> list[tuple[int, list[int], list[int]]]:
    """Per true class: (class, most confident right indices, most confident wrong indices).

    The most confident cases are the informative ones: a confident right answer shows
    what the model relies on, a confident mistake shows what misleads it. With
    ``groups`` (subjects) each subject is shown at most once per cell group while others
    remain, so the gallery is not two near-identical neighbouring slices of one brain.
    """
    y, pred = np.asarray(y), np.asarray(pred)
    order = np.argsort(-np.asarray(confidence), kind="stable")
    keys = np.arange(len(y)).astype(str) if groups is None else np.asarray(groups).astype(str)

    def pick(candidates: np.ndarray) -> list[int]:
        chosen: list[int] = []
        seen: set[str] = set()
        for i in candidates:  # distinct subjects first, then repeats if too few
            if keys[i] not in seen:
                chosen.append(int(i))
                seen.add(keys[i])
            if len(chosen) == per_kind:
                return chosen
        rest = [int(i) for i in candidates if int(i) not in chosen]
        return chosen + rest[: per_kind - len(chosen)]

    rows = []
    for k in range(n_classes):
        mine = order[y[order] == k]
        rows.append((k, pick(mine[pred[mine] == k]), pick(mine[pred[mine] != k])))
    return rows


def write_gallery(
    model: Any,
    images: np.ndarray,
    y: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    target: Path,
    per_kind: int = 2,
    groups: np.ndarray | None = None,
) -> list[int]:
    """Render the Grad-CAM gallery PNG; returns the (sorted) rows it shows.

    Rows are true classes; the left columns are right predictions, the right columns
    wrong ones, each explained for the class the model predicted.
    """
    from matplotlib.figure import Figure

    from alzstage.files import atomic_path

    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    selection = select_gallery(y, pred, conf, len(classes), per_kind, groups)
    chosen = sorted({i for _, r, w in selection for i in (*r, *w)})
    maps = dict(zip(chosen, gradcam(model, images[chosen]), strict=True)) if chosen else {}
    n_cols = 2 * per_kind
    fig = Figure(figsize=(2.1 * n_cols, 2.4 * len(classes) + 0.6), layout="constrained")
    axes = fig.subplots(len(classes), n_cols, squeeze=False)
    for k, right, wrong in selection:
        cells = [(i, True) for i in right] + [None] * (per_kind - len(right))
        cells += [(i, False) for i in wrong] + [None] * (per_kind - len(wrong))
        for j, cell in enumerate(cells):
            ax = axes[k][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"true: {classes[k]}", fontsize=8)
            if cell is None:
                kind = "right" if j < per_kind else "wrong"
                ax.text(0.5, 0.5, f"no {kind}\nprediction", ha="center", va="center", fontsize=7)
                continue
            i, ok = cell
            ax.imshow(overlay(images[i], maps[i]))
            mark = "right" if ok else "WRONG"
            # An all-zero map means no positive evidence for the class: say so, or the
            # reader takes the untinted slice for a map that found nothing of interest.
            empty = "" if maps[i].max() > 0 else " (empty map)"
            ax.set_title(f"{mark}: {classes[pred[i]]}\np={conf[i]:.2f}{empty}", fontsize=7)
    fig.suptitle(
        f"Grad-CAM (predicted class); columns 1-{per_kind} right, {per_kind + 1}-{n_cols} wrong",
        fontsize=9,
    )
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return chosen


# --------------------------------------------------------------------------- overlay files


def unique_png(out_dir: Path, stem: str, taken: set[str]) -> Path:
    """``<stem>.gradcam.png``, or ``<stem>.gradcam-2.png``... if that name is already used.

    Used means on disk *or* earlier in this batch (``a/x.jpg`` and ``b/x.jpg``), so an
    existing overlay or another input's overlay is never overwritten.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"
    n = 1
    while True:
        name = f"{safe}.gradcam.png" if n == 1 else f"{safe}.gradcam-{n}.png"
        if name not in taken and not (out_dir / name).exists():
            taken.add(name)
            return out_dir / name
        n += 1


def overlay_writer(out_dir: Path) -> Callable[[str, np.ndarray], str]:
    """Write RGB overlays as ``<stem>.gradcam.png`` PNGs in ``out_dir``, never overwriting;
    each call returns the path it wrote."""
    from PIL import Image

    taken: set[str] = set()

    def write(stem: str, rgb: np.ndarray) -> str:
        out_dir.mkdir(parents=True, exist_ok=True)
        target = unique_png(out_dir, stem, taken)
        Image.fromarray(rgb).save(target, format="PNG")
        return str(target)

    return write
