"""alzstage.inference.ood: the input check fitted on training images, and the leak guard.

Fitted here exactly as the train stage fits it (``fit_from_split`` on a split.csv over
generated JPEGs); new subjects of the same generator must pass, blank, tiny, noise and
photograph-like images must not.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, demo_slices, split_frame
from PIL import Image, ImageDraw

from alzstage.artifacts import write_split
from alzstage.data.images import to_model_array
from alzstage.errors import AlzstageError
from alzstage.inference.ood import (
    SEEN_THRESHOLD,
    InputCheckSpec,
    InputGuard,
    fit_from_split,
    image_features,
)


def photo_like(seed: int, size: tuple[int, int] = (240, 320)) -> np.ndarray:
    """A generated non-brain picture: sky gradient, hill, sun, clutter, sensor noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    im = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(im)
    for y in range(h):
        c = int(120 + 100 * y / h)
        draw.line([(0, y), (w, y)], fill=(c // 2, c // 2 + 40, min(255, c + 60)))
    draw.polygon(
        [(0, h * 0.6), (w * 0.3, h * 0.45), (w * 0.7, h * 0.55), (w, h * 0.5), (w, h), (0, h)],
        fill=(40, 120, 40),
    )
    draw.ellipse([w * 0.7, h * 0.1, w * 0.85, h * 0.3], fill=(250, 230, 120))
    for _ in range(30):
        x, y = rng.uniform(0, w), rng.uniform(h * 0.6, h)
        box = [x, y, x + rng.uniform(5, 30), y + rng.uniform(5, 30)]
        draw.rectangle(box, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    gray = np.asarray(im.convert("L"), dtype=np.float32) + rng.normal(0, 8, (h, w))
    return np.clip(gray, 0, 255).astype(np.uint8)


def filled_blob() -> np.ndarray:
    """A uniform bright ellipse on black: brain-shaped (r ~0.9 with the mean slice), no tissue."""
    im = Image.new("L", (176, 208))
    ImageDraw.Draw(im).ellipse([20, 15, 156, 195], fill=200)
    return np.asarray(im)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[InputGuard, list[Path]]:
    """The check fitted as the train stage fits it: train rows of a split.csv under raw/."""
    from alzstage.data.demo import generate_demo

    raw = tmp_path_factory.mktemp("raw")
    records = generate_demo(
        raw / "images",
        classes=CLASSES,
        subjects_per_class=[3, 3, 3, 3],
        slices_per_subject=6,
        image_size=(208, 176),
        seed=0,
    )
    paths = [r.path.relative_to(raw).as_posix() for r in records]
    # every third file is a test image, never fitted on
    splits = ["test" if i % 3 == 0 else "train" for i in range(len(paths))]
    split_file = raw / "split.csv"
    write_split(split_frame(paths, "x", splits), split_file)
    spec, thumbs = fit_from_split(split_file, raw, (112, 96))
    train_files = [raw / p for p, s in zip(paths, splits, strict=True) if s == "train"]
    return InputGuard(spec, thumbs), train_files


@pytest.fixture(scope="module")
def new_subjects(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    """Slices of subjects the check never saw (another seed), as their JPEGs decode."""
    return demo_slices(tmp_path_factory.mktemp("new"), per_class=2, slices=6, seed=77)


def test_fit_records_what_it_was_fitted_on(fitted: tuple[InputGuard, list[Path]]) -> None:
    guard, train_files = fitted
    spec = guard.spec
    assert spec.n_images == len(train_files) == 48
    assert spec.sizes == {"208x176": 48} and spec.network_input == (112, 96)
    assert spec.min_side == 48  # half the network's shorter side
    assert guard.n_thumbnails == 48
    # the JSON stored in meta.json reads back to the same check
    again = InputCheckSpec.model_validate_json(spec.model_dump_json())
    assert again == spec


def test_new_subjects_pass_at_their_size_and_resized(
    fitted: tuple[InputGuard, list[Path]], new_subjects: list[np.ndarray]
) -> None:
    guard, _ = fitted
    # given slices of unseen subjects, as exported and as resized by a client
    resized = [to_model_array(g, size) for g in new_subjects for size in ((112, 96), (128, 128))]
    darker = [(g * 0.6).astype(np.uint8) for g in new_subjects]
    # when they are checked
    checks = guard.check(new_subjects + resized + darker)
    # then none is out of distribution, and none counts as seen in training
    assert [c.reason for c in checks if c.out_of_distribution] == []
    assert not any(c.seen_in_training for c in checks)
    assert max(c.training_correlation for c in checks) < SEEN_THRESHOLD


@pytest.mark.parametrize(
    ("name", "image", "words"),
    [
        ("blank", np.zeros((208, 176), np.uint8), ["contrast 0", "foreground fraction 0"]),
        ("white", np.full((208, 176), 255, np.uint8), ["contrast 0", "border brightness 1"]),
        ("tiny", np.full((1, 1), 128, np.uint8), ["1x1 pixels", "208x176"]),
        (
            "noise",
            np.random.default_rng(0).integers(0, 256, (208, 176), dtype=np.uint8),
            ["foreground fraction", "border brightness", "mean correlation"],
        ),
        ("photo", photo_like(0), ["aspect", "border brightness", "mean correlation"]),
        ("photo_slice_sized", photo_like(1, (208, 176)), ["border brightness"]),
        ("blob", filled_blob(), ["foreground texture"]),
    ],
)
def test_non_brain_images_are_flagged_with_every_reason(
    fitted: tuple[InputGuard, list[Path]], name: str, image: np.ndarray, words: list[str]
) -> None:
    guard, _ = fitted
    (check,) = guard.check([image])
    assert check.out_of_distribution, name
    assert check.reason.startswith("not like the training MRI slices: ")
    for w in words:
        assert w in check.reason, (name, w, check.reason)
    assert not check.seen_in_training


def test_size_rule_uses_the_native_size_not_the_decoded_one(
    fitted: tuple[InputGuard, list[Path]], new_subjects: list[np.ndarray]
) -> None:
    guard, _ = fitted
    # a slice decoded shrunk from a 4160x3520 export is judged at 4160x3520 (fine)...
    big, small = guard.check([new_subjects[0]] * 2, [(4160, 3520), (40, 34)])
    assert not big.out_of_distribution
    # ...and one whose file is 40x34 is too small, whatever array it arrives as
    assert small.out_of_distribution and "34x40 pixels (WxH)" in small.reason


def test_training_slices_and_their_copies_are_seen_in_training(
    fitted: tuple[InputGuard, list[Path]],
) -> None:
    guard, train_files = fitted
    with Image.open(train_files[5]) as im:
        gray = np.asarray(im.convert("L"))
    # the file as decoded, and a network-size copy of it, are both that training slice
    checks = guard.check([gray, to_model_array(gray, (112, 96))])
    for c in checks:
        assert c.seen_in_training and c.training_correlation >= 0.999
        assert not c.out_of_distribution  # seen, but a perfectly valid input


def test_features_are_size_free(new_subjects: list[np.ndarray]) -> None:
    g = new_subjects[0]
    a, b = image_features(g), image_features(to_model_array(g, (416, 352)))
    for k in ("contrast", "foreground_fraction", "border_brightness", "foreground_texture"):
        assert a[k] == pytest.approx(b[k], abs=0.03), k


def test_a_damaged_stored_check_is_a_model_error() -> None:
    with pytest.raises(AlzstageError, match=r"input_check.*re-run `alzstage train`"):
        InputGuard.from_meta({"input_check": {"n_images": 0}}, None)
    assert InputGuard.from_meta({"classes": CLASSES}, None) is None  # older model: none


def test_fitting_needs_training_rows(tmp_path: Path) -> None:
    split_file = tmp_path / "split.csv"
    write_split(split_frame(["a.jpg"], "x", ["test"]), split_file)
    with pytest.raises(AlzstageError, match="no training images"):
        fit_from_split(split_file, tmp_path, (112, 96))


POSES = {
    "turned 90": lambda g: np.rot90(g, 1),
    "turned 180": lambda g: np.rot90(g, 2),
    "turned 270": lambda g: np.rot90(g, 3),
    "upside down": np.flipud,
}


def test_turned_and_upside_down_slices_are_flagged_saying_so(
    fitted: tuple[InputGuard, list[Path]], new_subjects: list[np.ndarray]
) -> None:
    guard, _ = fitted
    for pose, turn in POSES.items():
        # given unseen subjects' slices turned or upside down
        turned = [np.ascontiguousarray(turn(g)) for g in new_subjects]
        # when they are checked
        checks = guard.check(turned)
        # then every one is flagged, and the reason says what is wrong and what to do
        assert all(c.out_of_distribution for c in checks), pose
        for c in checks:
            assert "orientation" in c.reason and "send the slice upright" in c.reason


def test_a_left_right_mirrored_slice_passes(
    fitted: tuple[InputGuard, list[Path]], new_subjects: list[np.ndarray]
) -> None:
    # a mirrored axial slice is anatomically plausible (radiological vs neurological view)
    guard, _ = fitted
    mirrored = [np.ascontiguousarray(np.fliplr(g)) for g in new_subjects]
    assert [c.reason for c in guard.check(mirrored) if c.out_of_distribution] == []


def scanner_grain(gray: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """The slice as a noisier scanner would give it: Gaussian grain inside the head."""
    rng = np.random.default_rng(seed)
    noisy = gray + rng.normal(0, sigma, gray.shape) * (gray > 20)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def test_slices_from_a_grainier_scanner_than_training_are_flagged(
    fitted: tuple[InputGuard, list[Path]], new_subjects: list[np.ndarray]
) -> None:
    # given a check fitted on the smooth synthetic slices, and unseen subjects' slices
    # with the grain of a real scanner added (the way the real archive differs)
    guard, _ = fitted
    grainy = [scanner_grain(g, 15, i) for i, g in enumerate(new_subjects)]
    # when both are checked
    plain, flagged = guard.check(new_subjects), guard.check(grainy)
    # then the plain ones pass and every grainy one is flagged, naming the cause
    assert not any(c.out_of_distribution for c in plain)
    assert all(c.out_of_distribution for c in flagged)
    for c in flagged:
        assert "fine texture" in c.reason and "scanner or dataset" in c.reason


def test_a_check_stored_before_the_orientation_rule_still_works(
    fitted: tuple[InputGuard, list[Path]], new_subjects: list[np.ndarray]
) -> None:
    # given the check as a model trained before issue 24 stored it (no new rules)
    guard, _ = fitted
    old = guard.spec.model_dump(mode="json")
    for key in ("bounds", "training_ranges"):
        old[key] = {k: v for k, v in old[key].items() if k not in ("orientation", "fine_texture")}
    old_guard = InputGuard(InputCheckSpec.model_validate(old), None)
    # when a turned slice is checked, then it is judged by the old rules only
    (check,) = old_guard.check([np.ascontiguousarray(np.rot90(new_subjects[0], 2))])
    assert not check.out_of_distribution


ARCHIVE = os.environ.get("ALZSTAGE_REAL_ARCHIVE")


@pytest.mark.skipif(not ARCHIVE, reason="set ALZSTAGE_REAL_ARCHIVE to the Kaggle archive's zip")
def test_real_archive_slices_are_flagged_by_a_check_fitted_on_synthetic_ones(
    fitted: tuple[InputGuard, list[Path]],
) -> None:
    """Opt-in: 50 real slices of the archive (read from the zip, never written out)
    against the check fitted on the demo generator's slices."""
    import io
    import random
    import zipfile

    guard, _ = fitted
    with zipfile.ZipFile(str(ARCHIVE)) as z:
        names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
        grays = []
        for n in random.Random(0).sample(names, 50):
            with Image.open(io.BytesIO(z.read(n))) as im:
                grays.append(np.asarray(im.convert("L")))
    flagged = [c for c in guard.check(grays) if c.out_of_distribution]
    assert len(flagged) >= 45, [c.reason for c in guard.check(grays)][:3]
