"""The ordinal (CORN) head: decoding, its loss, the model it builds, and training with it."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from test_train import CLASSES, backbone_weights  # noqa: E402

from alzstage.config import (  # noqa: E402
    REQUIRED_SECTIONS,
    ConfigError,
    ModelParams,
    Params,
    parse_params,
)
from alzstage.model.network import build_network, corn_class_probabilities  # noqa: E402
from alzstage.train.losses import (  # noqa: E402
    cumulative_from_probs,
    make_loss,
    ordinal_cumulative_bce,
)
from alzstage.train.recipe import train_model  # noqa: E402

SIZE = 32
COMPACT = {
    "weights": "none",
    "input_size": (SIZE, SIZE),
    "dense_units": 8,
    "dropout": 0.0,
    "widths": [8, 16],
    "blocks": [1, 1],
}


def per_sample_loss(y: list[int], probs: list[list[float]]) -> np.ndarray:
    out = ordinal_cumulative_bce(np.asarray(y), np.asarray(probs, np.float32))
    return keras.ops.convert_to_numpy(out)


def ordinal_params(**train: object) -> Params:
    """The from-scratch recipe on a two-stage compact ResNet, four classes, ordinal head."""
    return Params.model_validate(
        {
            "base": {"seed": 0, "image_size": [SIZE, SIZE], "classes": CLASSES},
            "data": {"demo": {"subjects_per_class": [1, 1, 1, 1]}},
            "model": COMPACT,
            "train": {
                "head": "ordinal",
                "batch_size": 16,
                "scratch": {"epochs": 2, "learning_rate": 0.01, "warmup_epochs": 0},
                **train,
            },
        }
    )


# --------------------------------------------------------------------------- decoding


def test_decoded_probabilities_are_non_negative_and_sum_to_one() -> None:
    # given logits from mild to extreme, including ones whose sigmoid saturates
    logits = np.random.default_rng(0).normal(0, 8, (200, 3))

    # when they are decoded
    probs = corn_class_probabilities(logits)

    # then every row is a probability vector over the four classes
    assert probs.shape == (200, 4)
    assert np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)


def test_cumulative_probabilities_never_rise_with_the_stage() -> None:
    # given any logits, even ones that ask for a later stage more than an earlier one
    logits = np.random.default_rng(1).normal(0, 4, (200, 3))

    # when the class probabilities are turned back into P(y > k)
    cumulative = cumulative_from_probs(corn_class_probabilities(logits))

    # then P(y > 0) >= P(y > 1) >= P(y > 2): rank-consistent by construction
    assert cumulative.shape == (200, 3)
    assert np.all(np.diff(cumulative, axis=1) <= 1e-12)


def test_known_logits_give_the_probabilities_computed_by_hand() -> None:
    # given logits whose conditional probabilities are 1/2, 1/2, 1/2 and 3/4, 1/2, 1/4
    logits = np.array([[0.0, 0.0, 0.0], [np.log(3), 0.0, -np.log(3)]])

    # when they are decoded
    probs = corn_class_probabilities(logits)

    # then P(y > k) are the running products, and p_k their differences
    # row 0: P(y>k) = .5, .25, .125; row 1: .75, .375, .09375
    np.testing.assert_allclose(probs[0], [0.5, 0.25, 0.125, 0.125], atol=1e-12)
    np.testing.assert_allclose(probs[1], [0.25, 0.375, 0.28125, 0.09375], atol=1e-12)
    np.testing.assert_allclose(cumulative_from_probs(probs)[1], [0.75, 0.375, 0.09375])


def test_the_keras_layer_decodes_like_the_numpy_helper() -> None:
    # given the registered layer the ordinal head ends with, and logits far into the tails
    from alzstage.model.network import CornProbabilities

    logits = np.random.default_rng(2).normal(0, 6, (50, 3)).astype(np.float32)

    # when both decode
    layer_probs = keras.ops.convert_to_numpy(CornProbabilities()(logits))

    # then they agree, and the layer's probabilities are strictly positive
    np.testing.assert_allclose(layer_probs, corn_class_probabilities(logits), atol=1e-6)
    assert np.all(layer_probs > 0)


# --------------------------------------------------------------------------- loss


def test_loss_is_lower_for_the_right_class_than_for_a_distant_wrong_one() -> None:
    # given a prediction confident in the first stage
    probs = [[0.85, 0.1, 0.04, 0.01]] * 3

    # when it is scored against the first, the second and the last stage
    right, near, far = per_sample_loss([0, 1, 3], probs)

    # then the further the true stage, the larger the loss
    assert right < near < far


def test_loss_matches_a_hand_computation() -> None:
    # given three classes, two samples and their true stages
    probs = [[0.2, 0.5, 0.3], [0.7, 0.2, 0.1]]
    y = [1, 2]

    # when the per-sample loss is computed
    loss = per_sample_loss(y, probs)

    # then it is the BCE summed over thresholds k = 0, 1:
    # y=1: -log P(y>0) - log P(y<=1) = -log .8 - log .7; y=2: -log .3 - log .1
    want = [-np.log(0.8) - np.log(0.7), -np.log(0.3) - np.log(0.1)]
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_loss_honours_sample_weights_as_keras_applies_them() -> None:
    # given the loss as compile gets it from make_loss, and per-sample weights
    loss_fn = make_loss(ordinal_params())
    probs = np.array([[0.2, 0.5, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]], np.float32)
    y = np.array([1, 0])
    weights = np.array([2.0, 0.5], np.float32)

    # when a compiled model reduces it (as fit does with class_weight)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Identity()])
    model.compile(loss=loss_fn)
    reduced = model.evaluate(probs, y, sample_weight=weights, verbose=0)

    # then it is the weighted per-sample loss averaged over the batch
    per_sample = keras.ops.convert_to_numpy(ordinal_cumulative_bce(y, probs))
    np.testing.assert_allclose(float(reduced), np.mean(per_sample * weights), rtol=1e-5)


def test_focal_loss_with_the_ordinal_head_names_both_keys() -> None:
    # given the focal loss asked for with the ordinal head
    raw = {"train": {"head": "ordinal", "loss": "focal"}}

    # when params.yaml is parsed, or a loss made from params that skipped validation
    with pytest.raises(ConfigError) as parsed:
        parse_params({s: raw.get(s, {}) for s in REQUIRED_SECTIONS})
    unchecked = ordinal_params().model_copy(
        update={"train": ordinal_params().train.model_copy(update={"loss": "focal"})}
    )
    with pytest.raises(ConfigError) as made:
        make_loss(unchecked)

    # then one line says which keys clash and what to set
    for message in (str(parsed.value), str(made.value)):
        assert "\n" not in message
        assert "train.loss: focal" in message and "train.head: ordinal" in message
        assert "train.loss: cross_entropy" in message


def test_an_unknown_head_is_refused_naming_train_head() -> None:
    # given a head the project does not have
    raw = {s: {} for s in REQUIRED_SECTIONS} | {"train": {"head": "coral"}}

    # when params.yaml is parsed
    with pytest.raises(ConfigError) as info:
        parse_params(raw)

    # then the message names the key and the allowed values
    message = str(info.value)
    assert "\n" not in message
    assert "train.head" in message and "'softmax'" in message and "'ordinal'" in message


# --------------------------------------------------------------------------- model


def test_ordinal_model_outputs_class_probabilities_and_reloads_identically(tmp_path) -> None:
    # given a network built with the ordinal head
    net = build_network(ModelParams(**COMPACT), n_classes=4, seed=0, head="ordinal")
    x = np.random.default_rng(3).uniform(0, 255, (5, SIZE, SIZE, 1)).astype("float32")

    # when it predicts, and is saved and loaded as a .keras file
    before = net.model.predict(x, verbose=0)
    net.model.save(tmp_path / "ordinal.keras")
    after = keras.models.load_model(tmp_path / "ordinal.keras", compile=False).predict(x, verbose=0)

    # then it gives one probability row per image, and the reloaded model the same rows
    assert before.shape == (5, 4)
    assert np.all(before >= 0)
    np.testing.assert_allclose(before.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(before, after)
    assert net.head.get_layer("logits").units == 3


def test_gradcam_explains_the_ordinal_model() -> None:
    # given an ordinal network and two images
    from alzstage.inference.gradcam import gradcam

    net = build_network(ModelParams(**COMPACT), n_classes=4, seed=0, head="ordinal")
    imgs = np.random.default_rng(4).integers(0, 256, (2, SIZE, SIZE), dtype=np.uint8)

    # when Grad-CAM explains the last stage, whatever the prediction
    maps = gradcam(net.model, imgs, class_index=3)

    # then it replays the head exactly (else it raises) and gives maps in [0, 1]
    assert maps.shape == (2, SIZE, SIZE)
    assert np.all((maps >= 0) & (maps <= 1))


def test_scratch_recipe_trains_the_ordinal_head() -> None:
    # given a tiny random four-class set
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (48, SIZE, SIZE)).astype(np.uint8)
    y = np.arange(48) % 4
    xv, yv = x[:16], y[:16]

    # when the project's training runs two epochs with the ordinal head
    model, summary = train_model(ordinal_params(), x, y, xv, yv)

    # then it finishes, calibrates, and the model outputs class probabilities
    assert len(summary["history"]) == 2
    assert np.isfinite(summary["history"][-1]["loss"])
    assert summary["temperature"] > 0
    probs = model.predict(xv[..., None].astype("float32"), verbose=0)
    assert probs.shape == (16, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_transfer_recipe_trains_the_ordinal_head() -> None:
    # given the transfer recipe on a tiny MobileNetV2 with "pretrained" weights
    params = Params.model_validate(
        {
            "base": {"seed": 0, "image_size": [SIZE, SIZE], "classes": CLASSES},
            "data": {"demo": {"subjects_per_class": [1, 1, 1, 1]}},
            "model": {
                "backbone": "mobilenetv2",
                "weights": backbone_weights(),
                "input_size": [SIZE, SIZE],
                "dense_units": 8,
                "dropout": 0.0,
            },
            "train": {"head": "ordinal", "epochs": 1, "batch_size": 16, "fine_tune_epochs": 0},
        }
    )
    rng = np.random.default_rng(6)
    x = rng.integers(0, 256, (32, SIZE, SIZE)).astype(np.uint8)
    y = np.arange(32) % 4

    # when the head phase trains on cached pooled features
    model, summary = train_model(params, x, y, x[:8], y[:8])

    # then it runs, and the full model ends in the ordinal head
    assert [h["phase"] for h in summary["history"]] == ["head"]
    assert model.output_shape == (None, 4)
