"""Model construction, weight loading and the cut-and-cache training shortcut."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from alzstage.config import ModelParams  # noqa: E402
from alzstage.errors import AlzstageError  # noqa: E402
from alzstage.model import network as build  # noqa: E402
from alzstage.train.losses import class_weights  # noqa: E402

SMALL_SCRATCH = {"input_size": (32, 32), "dense_units": 8, "dropout": 0.0}
SMALL = {"backbone": "resnet50", "input_size": (32, 32), "dense_units": 8, "dropout": 0.0}


def test_weights_path_loads_the_given_file(tmp_path):
    donor = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    file = tmp_path / "backbone.weights.h5"
    donor.save_weights(file)
    loaded = build.build_backbone(ModelParams(weights=str(file), **SMALL))
    fresh = build.build_backbone(ModelParams(weights="none", **SMALL))
    name = "conv5_block3_3_conv"
    want = donor.get_layer(name).get_weights()[0]
    assert np.array_equal(loaded.get_layer(name).get_weights()[0], want)
    assert not np.array_equal(fresh.get_layer(name).get_weights()[0], want)


def test_weights_path_missing_names_param(tmp_path):
    with pytest.raises(AlzstageError, match=r"model\.weights: .*nope\.h5 does not exist"):
        build.build_backbone(ModelParams(weights=str(tmp_path / "nope.h5"), **SMALL))


def test_weights_file_of_wrong_architecture_is_refused(tmp_path):
    other = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    file = tmp_path / "mobilenet.weights.h5"
    other.save_weights(file)
    with pytest.raises(AlzstageError, match="does not fit ResNet50"):
        build.build_backbone(ModelParams(weights=str(file), **SMALL))


def test_unreachable_imagenet_names_param_and_cache_file(tmp_path, monkeypatch):
    from keras.src.applications import resnet

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: no network")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(resnet.file_utils, "get_file", offline)
    with pytest.raises(AlzstageError) as err:
        build.build_backbone(ModelParams(weights="imagenet", **SMALL))
    msg = str(err.value)
    assert "model.weights" in msg
    assert str(tmp_path / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5") in msg


def test_preprocess_layer_round_trips_through_save(tmp_path):
    net = build.build_network(ModelParams(**SMALL), n_classes=3, seed=1)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 1)).astype("float32")
    before = net.model.predict(x, verbose=0)
    net.model.save(tmp_path / "m.keras")
    after = keras.models.load_model(tmp_path / "m.keras").predict(x, verbose=0)
    np.testing.assert_allclose(before, after, atol=1e-6)
    assert before.shape == (2, 3)
    np.testing.assert_allclose(before.sum(axis=1), 1.0, atol=1e-5)


def test_cached_tail_training_matches_full_model_gradients():
    """Training the tail on cached trunk activations = training the full frozen-trunk model."""
    import tensorflow as tf

    net = build.build_network(ModelParams(**SMALL), n_classes=4, seed=3)
    trunk, tail = build.split_backbone(net.backbone, build.FINAL_BLOCK["resnet50"])
    net.set_trainable(tail.layers)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (4, 32, 32, 1)).astype("float32")
    y = np.array([0, 1, 2, 3])
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    cached = trunk(net.preprocess(x), training=False)
    variables = [v for v in tail.trainable_variables] + net.head.trainable_variables
    assert variables, "the tail must have trainable weights"

    with tf.GradientTape() as tape:
        full_loss = loss_fn(y, net.model(x, training=True))
    full_grads = tape.gradient(full_loss, variables)
    with tf.GradientTape() as tape:
        tail_loss = loss_fn(y, net.head(tail(cached, training=True), training=True))
    tail_grads = tape.gradient(tail_loss, variables)

    np.testing.assert_allclose(float(full_loss), float(tail_loss), rtol=1e-5)
    for a, b in zip(full_grads, tail_grads, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_cut_through_residual_is_refused():
    net = build.build_network(ModelParams(**SMALL), n_classes=2, seed=0)
    with pytest.raises(ValueError, match="residual connection"):
        build.split_backbone(net.backbone, "conv5_block2_2_conv")
    with pytest.raises(ValueError, match="no layer 'nonsense'"):
        build.split_backbone(net.backbone, "nonsense")


def test_balanced_class_weights_ignore_absent_classes():
    y = np.array([0, 0, 0, 1])
    cw = class_weights(y, ["a", "b", "c"], "balanced")
    assert cw == {0: pytest.approx(4 / 6), 1: pytest.approx(2.0), 2: 0.0}
    assert class_weights(y, ["a", "b", "c"], "none") is None
    assert class_weights(y, ["a", "b", "c"], {"b": 3.0}) == {0: 1.0, 1: 3.0, 2: 1.0}


def test_compact_resnet_is_a_trunk_with_a_4d_output_and_trains_batchnorm():
    """The from-scratch backbone plugs into the same preprocess -> backbone -> head chain."""
    params = ModelParams(weights="none", widths=[8, 16, 32], blocks=[1, 2, 1], **SMALL_SCRATCH)
    assert params.resolved_backbone == "resnet_compact"
    net = build.build_network(params, n_classes=4, seed=0)
    assert net.backbone.name == "resnet_compact"
    # stem /2, then stages 2 and 3 /2 each: 32 -> 16 -> 8 -> 4
    assert tuple(net.backbone.output.shape[1:]) == (4, 4, 32)
    assert len([n for n in (lyr.name for lyr in net.backbone.layers) if n.endswith("_add")]) == 4
    bns = [lyr for lyr in net.backbone.layers if isinstance(lyr, keras.layers.BatchNormalization)]
    assert bns and all(b.trainable for b in bns) and not net.freeze_bn
    out = net.model(np.zeros((2, 32, 32, 1), "float32"))
    assert tuple(out.shape) == (2, 4)


def test_compact_resnet_refuses_pretrained_weights():
    with pytest.raises(ValueError, match="resnet_compact has no pretrained weights"):
        from alzstage.config import Params

        Params.model_validate({"model": {"backbone": "resnet_compact", "weights": "imagenet"}})


def test_widths_and_blocks_need_one_entry_per_stage():
    with pytest.raises(ValueError, match="one entry per stage"):
        ModelParams(widths=[8, 16], blocks=[1])
