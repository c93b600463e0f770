"""The network: grayscale input → backbone (ResNet50 by default) → small classifier head.

The model is kept in three named parts (``preprocess``, ``backbone``, ``head``) so that
training can cut it at any block boundary, compute the frozen part once, and train only
the tail on cached activations — the same function, a fraction of the compute.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from alzstage.config import ModelParams
from alzstage.errors import AlzstageError

# keras.applications constructors and how each expects its pixels.
BACKBONES: dict[str, tuple[str, str]] = {
    "resnet_compact": ("build_compact_resnet", "gray"),  # ours, not keras.applications
    "resnet50": ("ResNet50", "caffe"),
    "resnet101": ("ResNet101", "caffe"),
    "mobilenetv2": ("MobileNetV2", "tf"),
    "efficientnetb0": ("EfficientNetB0", "none"),  # rescales inside the model
    "densenet121": ("DenseNet121", "torch"),
}
# The file keras.utils.get_file caches ImageNet weights under ($KERAS_HOME or ~/.keras)/models.
IMAGENET_NOTOP_FILES = {
    "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "resnet101": "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "densenet121": "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "efficientnetb0": "efficientnetb0_notop.h5",
}
# Default fine-tuning cut: the first layer of the backbone's final block.
FINAL_BLOCK = {
    "resnet50": "conv5_block1_1_conv",
    "resnet101": "conv5_block1_1_conv",
    "mobilenetv2": "block_16_expand",
    "efficientnetb0": "block7a_expand_conv",
    "densenet121": "conv5_block1_0_bn",
    "resnet_compact": "stage4_block1_1_conv",
}


@keras.saving.register_keras_serializable(package="alzstage")
class GrayscaleToBackbone(layers.Layer):
    """Replicate a 1-channel 0-255 image to 3 channels and apply the backbone's scaling.

    Living inside the model means a saved model carries its own preprocessing: a caller
    feeds raw grayscale pixels and cannot forget (or duplicate) the normalisation.
    """

    CAFFE_MEAN = (103.939, 116.779, 123.68)
    TORCH_MEAN = (0.485, 0.456, 0.406)
    TORCH_STD = (0.229, 0.224, 0.225)

    def __init__(self, mode: str = "caffe", **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, x):  # type: ignore[no-untyped-def]
        x = ops.cast(x, "float32")
        x = ops.concatenate([x, x, x], axis=-1)
        if self.mode == "caffe":
            return x - ops.convert_to_tensor(self.CAFFE_MEAN, dtype="float32")
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "gray":  # one channel in [-1, 1]: a network of our own needs no RGB
            return x[..., :1] / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(self.TORCH_MEAN, dtype="float32")
            std = ops.convert_to_tensor(self.TORCH_STD, dtype="float32")
            return (x / 255.0 - mean) / std
        return x

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}


def corn_class_probabilities(logits: np.ndarray) -> np.ndarray:
    """(n, K-1) CORN logits -> (n, K) class probabilities (numpy twin of CornProbabilities).

    CORN (Shi et al. 2021, "Deep neural networks for rank-consistent ordinal regression
    based on conditional probabilities"): logit k scores s_k = P(y > k | y > k-1), so
    P(y > k) = prod_{j<=k} s_j can only fall with k (rank-consistent by construction), and
    p_0 = 1 - P(y > 0), p_k = P(y > k-1) - P(y > k), p_{K-1} = P(y > K-2).
    """
    z = np.asarray(logits, dtype=np.float64)
    s = 1.0 / (1.0 + np.exp(-z))
    above = np.cumprod(s, axis=1)  # P(y > k), k = 0..K-2
    ones, zeros = np.ones((len(z), 1)), np.zeros((len(z), 1))
    return np.concatenate([ones, above], axis=1) - np.concatenate([above, zeros], axis=1)


@keras.saving.register_keras_serializable(package="alzstage")
class CornProbabilities(layers.Layer):
    """The ordinal head's output: K-1 CORN logits in, K class probabilities out.

    ``train.head: ordinal`` puts this after a Dense(K-1) so that the model still outputs
    the (n, K) class probability vector: temperature scaling, evaluation, the pyfunc and
    Grad-CAM need no second code path. See :func:`corn_class_probabilities` for the
    decoding (Shi et al. 2021). Computed in log space, each p_k is a product of sigmoids
    rather than a difference, so it is positive and exact far into the tails.
    """

    def log_probabilities(self, logits):  # type: ignore[no-untyped-def]
        """log p_k for every class, stable for any logits (Grad-CAM explains these)."""
        z = ops.cast(logits, "float32")
        log_above = ops.cumsum(ops.log_sigmoid(z), axis=-1)  # log P(y > k)
        log_not_next = ops.log_sigmoid(-z)  # log P(y = k | y > k-1)
        first = log_not_next[..., :1]
        middle = log_above[..., :-1] + log_not_next[..., 1:]
        last = log_above[..., -1:]
        return ops.concatenate([first, middle, last], axis=-1)

    def call(self, logits):  # type: ignore[no-untyped-def]
        return ops.exp(self.log_probabilities(logits))

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (*input_shape[:-1], input_shape[-1] + 1)


def keras_cache_file(backbone: str) -> Path:
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    return home / "models" / IMAGENET_NOTOP_FILES.get(backbone, f"{backbone}_notop.h5")


def _basic_block(x: keras.KerasTensor, width: int, stride: int, name: str) -> keras.KerasTensor:
    """ResNet's basic block (two 3x3 convs, He et al. 2016), projection shortcut on change."""
    h = layers.Conv2D(width, 3, stride, padding="same", use_bias=False, name=f"{name}_1_conv")(x)
    h = layers.BatchNormalization(momentum=0.9, name=f"{name}_1_bn")(h)
    h = layers.ReLU(name=f"{name}_1_relu")(h)
    h = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_2_conv")(h)
    h = layers.BatchNormalization(momentum=0.9, name=f"{name}_2_bn")(h)
    shortcut = x
    if stride != 1 or x.shape[-1] != width:
        shortcut = layers.Conv2D(width, 1, stride, use_bias=False, name=f"{name}_0_conv")(x)
        shortcut = layers.BatchNormalization(momentum=0.9, name=f"{name}_0_bn")(shortcut)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([h, shortcut]))


def build_compact_resnet(params: ModelParams) -> keras.Model:
    """A small ResNet of basic blocks for training from scratch on a CPU.

    ResNet50 has 23.5 M weights for ImageNet's 1,000 classes; a few thousand grayscale
    slices of four classes neither need nor can train that many from random weights on
    two cores. Stem: one stride-2 3x3 conv. Stage k halves the resolution (k > 0) and has
    ``widths[k]`` channels in ``blocks[k]`` basic blocks. [32, 64, 128, 256] x 1 is
    1.2 M weights; the output is the last block's feature map (no pooling), so Grad-CAM
    and the head treat it like a ``keras.applications`` trunk.
    """
    h, w = params.input_size
    inp = keras.Input((h, w, 1), name="gray")
    x = layers.Conv2D(params.widths[0], 3, 2, padding="same", use_bias=False, name="stem_conv")(inp)
    x = layers.BatchNormalization(momentum=0.9, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage, (width, n_blocks) in enumerate(zip(params.widths, params.blocks, strict=True)):
        for block in range(n_blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(x, width, stride, f"stage{stage + 1}_block{block + 1}")
    return keras.Model(inp, x, name="resnet_compact")


def build_backbone(params: ModelParams) -> keras.Model:
    """The backbone with the requested weights, or a clear error."""
    if params.resolved_backbone == "resnet_compact":
        if params.weights != "none":
            raise AlzstageError(
                "model.backbone: resnet_compact has no pretrained weights; set "
                "model.weights: none or choose a keras.applications backbone"
            )
        return build_compact_resnet(params)
    ctor_name, _ = BACKBONES[params.resolved_backbone]
    ctor = getattr(keras.applications, ctor_name)
    h, w = params.input_size
    shape = (h, w, 3)
    if params.weights == "none":
        return ctor(include_top=False, weights=None, input_shape=shape)
    if params.weights == "imagenet":
        try:
            return ctor(include_top=False, weights="imagenet", input_shape=shape)
        except Exception as exc:
            raise AlzstageError(
                f"model.weights: 'imagenet' could not be loaded for {params.resolved_backbone} "
                f"({exc}). Keras looks for the cached file "
                f"{keras_cache_file(params.resolved_backbone)}; copy it "
                "there, set model.weights to a local weights file, or set model.weights: none"
            ) from None
    path = Path(params.weights).expanduser()
    if not path.exists():
        raise AlzstageError(
            f"model.weights: {path} does not exist; give a .weights.h5/.h5 file saved from a "
            f"{ctor_name}(include_top=False) backbone, or use 'imagenet' or 'none'"
        )
    model = ctor(include_top=False, weights=None, input_shape=shape)
    # Keras warns and keeps fresh random weights for layers it cannot match; for us that
    # would be a silent fallback, so any such warning is an error.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(str(path))
        except Exception as exc:
            raise AlzstageError(
                f"model.weights: {path} does not fit {ctor_name}(include_top=False, "
                f"input_shape={shape}) ({exc})"
            ) from None
    partial = [
        str(w.message)
        for w in caught
        if "weights" in str(w.message).lower() or "skipping" in str(w.message).lower()
    ]
    if partial:
        raise AlzstageError(
            f"model.weights: {path} only partly fits {ctor_name}(include_top=False): "
            f"{partial[0][:200]}"
        )
    return model


@dataclass
class Network:
    """The full model plus handles on its parts, for cut-and-cache training."""

    model: keras.Model
    preprocess: layers.Layer
    backbone: keras.Model
    head: keras.Sequential
    freeze_bn: bool = True

    def set_trainable(self, trainable: list[layers.Layer] | None) -> None:
        """Make exactly ``trainable`` (None = every layer) of the backbone trainable."""
        self.backbone.trainable = True
        keep = None if trainable is None else {id(lyr) for lyr in trainable}
        for layer in self.backbone.layers:
            wanted = keep is None or id(layer) in keep
            if isinstance(layer, layers.BatchNormalization) and self.freeze_bn:
                wanted = False
            layer.trainable = wanted


def _output_layers(n_classes: int, head: str, init: keras.initializers.Initializer) -> list:
    """The head's last layers: softmax over K, or CORN's K-1 logits decoded to K (ordinal)."""
    if head == "softmax":
        return [
            layers.Dense(n_classes, activation="softmax", kernel_initializer=init, name="probs")
        ]
    if head == "ordinal":
        return [
            layers.Dense(n_classes - 1, kernel_initializer=init, name="logits"),
            CornProbabilities(name="probs"),
        ]
    raise ValueError(f"train.head: must be 'softmax' or 'ordinal', got {head!r}")


def build_network(params: ModelParams, n_classes: int, seed: int, head: str = "softmax") -> Network:
    """Assemble preprocessing, backbone and head (``head``: train.head, softmax or ordinal).

    With pretrained weights every BatchNorm layer is frozen for good: re-estimating its
    statistics on a few thousand slices with small batches hurts more than it helps. With
    ``weights: none`` there are no statistics worth protecting, so BatchNorm trains with
    the layers it belongs to, with a shorter memory (momentum 0.9) because a CPU run
    takes only a few hundred steps.
    """
    h, w = params.input_size
    backbone = build_backbone(params)
    freeze_bn = params.weights != "none"
    for layer in backbone.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = not freeze_bn
            if not freeze_bn:
                layer.momentum = 0.9
    _, mode = BACKBONES[params.resolved_backbone]
    preprocess = GrayscaleToBackbone(mode=mode, name="preprocess")
    init = keras.initializers.GlorotUniform(seed=seed)
    classifier = keras.Sequential(
        [
            layers.GlobalAveragePooling2D(name="pool"),
            layers.Dropout(params.dropout, seed=seed, name="dropout_1"),
            layers.Dense(
                params.dense_units, activation="relu", kernel_initializer=init, name="dense"
            ),
            layers.Dropout(params.dropout, seed=seed + 1, name="dropout_2"),
            *_output_layers(n_classes, head, init),
        ],
        name="head",
    )
    inputs = keras.Input((h, w, 1), name="image")
    outputs = classifier(backbone(preprocess(inputs)))
    model = keras.Model(inputs, outputs, name=f"alzstage_{params.resolved_backbone}")
    return Network(
        model=model, preprocess=preprocess, backbone=backbone, head=classifier, freeze_bn=freeze_bn
    )


def resolve_cut(backbone_name: str, fine_tune_from: str | None) -> str | None:
    """Layer name where trainable layers start; None = head only, 'all' = whole backbone."""
    if fine_tune_from in (None, "", "none"):
        return None
    if fine_tune_from == "final_block":
        return FINAL_BLOCK[backbone_name]
    return fine_tune_from


def split_backbone(backbone: keras.Model, layer_name: str) -> tuple[keras.Model, keras.Model]:
    """(frozen trunk, trainable tail) of the backbone, cut just before ``layer_name``."""
    if layer_name == "all":
        raise ValueError("'all' has no cut; train the whole model instead")
    try:
        layer = backbone.get_layer(layer_name)
    except ValueError:
        names = [lyr.name for lyr in backbone.layers if lyr.name.endswith("_1_conv")][-6:]
        raise ValueError(
            f"train.fine_tune_from: no layer {layer_name!r} in {backbone.name}; use 'final_block',"
            f" 'all', none, or a layer name such as {names}"
        ) from None
    cut = layer.input
    try:
        trunk = keras.Model(backbone.input, cut, name="trunk")
        tail = keras.Model(cut, backbone.output, name="tail")
    except ValueError as exc:
        raise ValueError(
            f"train.fine_tune_from: cutting at {layer_name!r} splits a residual connection "
            f"({exc}); choose the first layer of a block, e.g. 'final_block'"
        ) from None
    return trunk, tail
