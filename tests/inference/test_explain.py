"""Grad-CAM: it must point at the region that actually drives the class.

A tiny convnet is trained for a few seconds on synthetic slices where class 1 is "a
bright square somewhere in the top-left quadrant" and class 0 is noise; its Grad-CAM for
class 1 must put most heat in that quadrant, on the square.
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from alzstage.inference.gradcam import gradcam, overlay, select_gallery  # noqa: E402

SIZE = 32


def _images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise slices; class 1 gets a bright 6x6 square in the top-left quadrant."""
    x = rng.integers(0, 70, (n, SIZE, SIZE)).astype(np.uint8)
    y = np.arange(n) % 2
    corners = rng.integers(1, SIZE // 2 - 7, (n, 2))
    for i in np.flatnonzero(y == 1):
        r, c = corners[i]
        x[i, r : r + 6, c : c + 6] = 230
    return x, y, corners


def _chain_model(seed: int = 0) -> keras.Model:
    """Same shape as the project's network: preprocess -> nested backbone -> Sequential head."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    b_in = keras.Input((SIZE, SIZE, 1))
    h = layers.Conv2D(8, 3, padding="same", activation="relu")(b_in)
    h = layers.MaxPooling2D(2)(h)
    h = layers.Conv2D(16, 3, padding="same", activation="relu")(h)
    backbone = keras.Model(b_in, h, name="backbone")
    head = keras.Sequential(
        [layers.GlobalAveragePooling2D(), layers.Dense(2, activation="softmax")], name="head"
    )
    inp = keras.Input((SIZE, SIZE, 1), name="image")
    out = head(backbone(layers.Rescaling(1 / 255.0, name="preprocess")(inp)))
    return keras.Model(inp, out)


@pytest.fixture(scope="module")
def trained() -> keras.Model:
    rng = np.random.default_rng(0)
    x, y, _ = _images(256, rng)
    model = _chain_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(x[..., None].astype("float32"), y, epochs=12, batch_size=32, verbose=0)
    acc = (model.predict(x[..., None].astype("float32"), verbose=0).argmax(1) == y).mean()
    assert acc > 0.95, f"fixture model failed to learn the toy task (train acc {acc:.2f})"
    return model


def test_gradcam_highlights_the_discriminative_square(trained: keras.Model) -> None:
    rng = np.random.default_rng(1)
    x, y, corners = _images(16, rng)
    pos = np.flatnonzero(y == 1)
    maps = gradcam(trained, x[pos], class_index=1)
    assert maps.shape == (len(pos), SIZE, SIZE)
    assert maps.min() >= 0.0 and np.isclose(maps.max(), 1.0)
    half = SIZE // 2
    for m, (r, c) in zip(maps, corners[pos], strict=True):
        assert m[:half, :half].sum() / m.sum() > 0.6
        peak = np.unravel_index(m.argmax(), m.shape)
        assert r - 4 <= peak[0] <= r + 9 and c - 4 <= peak[1] <= c + 9, (peak, (r, c))


def test_gradcam_class_index_forms_and_output_size(trained: keras.Model) -> None:
    rng = np.random.default_rng(2)
    x, _, _ = _images(3, rng)
    pred_maps = gradcam(trained, x)  # None: the predicted class
    preds = trained.predict(x[..., None].astype("float32"), verbose=0).argmax(1)
    np.testing.assert_allclose(pred_maps, gradcam(trained, x, class_index=preds), atol=1e-6)
    single = gradcam(trained, x[0])  # one (H, W) image
    assert single.shape == (1, SIZE, SIZE)
    big = np.kron(x[:1], np.ones((2, 2), np.uint8))  # images larger than the model input
    assert gradcam(trained, big).shape == (1, 2 * SIZE, 2 * SIZE)


def test_gradcam_on_project_network_structure() -> None:
    from alzstage.config import ModelParams
    from alzstage.model.network import build_network

    net = build_network(ModelParams(weights="none", input_size=(64, 64), dense_units=8), 4, 0)
    imgs = np.random.default_rng(0).integers(0, 256, (2, 64, 64), dtype=np.uint8)
    maps = gradcam(net.model, imgs, class_index=2)
    assert maps.shape == (2, 64, 64)
    assert np.all((maps >= 0) & (maps <= 1))


def test_gradcam_refuses_a_model_it_cannot_replay() -> None:
    layers = keras.layers
    inp = keras.Input((SIZE, SIZE, 1))
    b_in = keras.Input((SIZE, SIZE, 1))
    backbone = keras.Model(b_in, layers.Conv2D(4, 3, padding="same")(b_in), name="backbone")
    feats = layers.GlobalAveragePooling2D()(backbone(inp))
    skip = layers.GlobalAveragePooling2D()(inp)  # a branch around the backbone
    out = layers.Dense(2, activation="softmax")(layers.Concatenate()([feats, skip]))
    model = keras.Model(inp, out)
    with pytest.raises(ValueError, match="gradcam"):
        gradcam(model, np.zeros((1, SIZE, SIZE), np.uint8))


def test_overlay_leaves_cold_regions_untouched() -> None:
    img = np.arange(64, dtype=np.uint8).reshape(8, 8)
    heat = np.zeros((8, 8))
    heat[:2, :2] = 1.0
    out = overlay(img, heat)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[4:, 4:], np.repeat(img[4:, 4:, None], 3, axis=-1))
    assert out[0, 0, 0] > out[0, 0, 2]  # hot = red end of the colour map
    assert overlay(img, np.zeros((4, 4))).shape == (8, 8, 3)  # map is resized to the image


def test_select_gallery_prefers_confident_cases_from_distinct_subjects() -> None:
    y = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 0, 0, 1, 1, 0])
    conf = np.array([0.9, 0.95, 0.6, 0.8, 0.7, 0.99])
    groups = np.array(["a", "a", "b", "c", "d", "e"])
    rows = select_gallery(y, pred, conf, 2, per_kind=2, groups=groups)
    assert rows[0] == (0, [1, 2], [3])  # 1 and 0 share subject a: b is shown instead of 0
    assert rows[1] == (1, [4], [5])
    assert select_gallery(y, pred, conf, 2, per_kind=2)[0][1] == [1, 0]
