"""The time-to-target harness compares what it says it compares.

The reference method must really be the plain recipe (``image_dataset_from_directory``,
nothing cached, augmentation layers inside the model, plain ``fit`` with class weights),
and both methods must read exactly the same images. Timing is never asserted here.
Fixtures are tiny generated JPEGs in a Kaggle-shaped zip, never the real archive.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pytest.importorskip("tensorflow")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_time_to_target as ttt
from _flops import flat_layers, layer_costs
from _machine import cpu_description, flags_text
from test_train import backbone_weights

from alzstage.config import parse_params
from alzstage.data.images import load_batch

# Keras warns that a plain `fit` on a dataset ignores shuffle=True: that is the plain recipe.
pytestmark = pytest.mark.filterwarnings("ignore:`shuffle=True` was passed")

CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]
TINY = {"base.image_size": [32, 32], "model.input_size": [32, 32], "model.dense_units": 8}


def kaggle_zip(target: Path, per_class: int = 8) -> Path:
    """``Alzheimer_s Dataset/{train,test}/<Class>/*.jpg``: random 32x32 grayscale slices."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(target, "w") as zf:
        for cls in CLASSES:
            for i in range(per_class):
                split = "test" if i >= per_class - 2 else "train"
                buf = target.parent / "slice.jpg"
                Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(buf)
                zf.write(buf, f"Alzheimer_s Dataset/{split}/{cls}/{cls}{i}.jpg")
    return target


def harness_args(archive: Path, **overrides: object) -> argparse.Namespace:
    args = {
        "archive": archive,
        "max_epochs": 3,
        "weights": None,
        "limit": None,
        "seed": 0,
        "target": None,
        "stratified_target": None,
        "reference_lr": None,
        "intra": None,
        "inter": None,
        "bootstrap": 100,
        "reference_max_epochs": None,
        "sustain": None,
        "repeats": 1,
    }
    return argparse.Namespace(**{**args, **overrides})


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The harness's own preparation (download, validate, split, class trees) of a tiny zip."""
    work = tmp_path_factory.mktemp("ttt")
    archive = kaggle_zip(work / "tiny.zip")
    spec = ttt.build_spec(harness_args(archive), "subject", work, TINY)
    # any score reaches it, and one epoch is enough: training stops after epoch 1
    return {**spec, "target": 0.0, "sustain": 1}


@pytest.fixture(scope="module")
def runs(spec: dict) -> dict:
    """Each method once, in this process, on the same prepared split."""
    return {
        "alzstage": ttt.run_alzstage(spec, "scratch"),
        "reference": ttt.run_reference(spec, "scratch"),
    }


def dataset_ops(ds: object) -> Counter:
    """Op types of a tf.data pipeline's graph, functions (map bodies) included."""
    import tensorflow as tf

    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(ds._as_serialized_graph().numpy())
    ops = [n.op for n in graph.node]
    ops += [n.op for f in graph.library.function for n in f.node_def]
    return Counter(ops)


# --------------------------------------------------------------------------- the reference is plain


def test_the_reference_pipeline_is_image_dataset_from_directory_with_nothing_added(
    spec: dict,
) -> None:
    # given the same call written out by hand, as the reference project writes it
    import keras

    bare = keras.utils.image_dataset_from_directory(
        spec["trees"]["train"],
        class_names=CLASSES,
        color_mode="grayscale",
        image_size=(32, 32),
        batch_size=32,
        seed=42,
        verbose=False,
    )
    # when the harness builds the reference's training dataset
    ds = ttt.reference_dataset(spec["trees"]["train"], CLASSES, (32, 32), 32, shuffle=True, seed=42)
    # then its pipeline has the same ops as the bare call, and no cache anywhere
    assert dataset_ops(ds) == dataset_ops(bare)
    assert not [op for op in dataset_ops(ds) if "Cache" in op]


def test_the_reference_model_holds_the_augmentation_layers_before_the_same_network(
    spec: dict,
) -> None:
    # given alzstage's network for the from-scratch recipe
    import keras

    params = parse_params(spec["params"]["scratch"])
    net = ttt.whole_network(params, "scratch")
    # when the reference wraps it
    model = ttt.reference_model(net.model, (32, 32), seed=0)
    # then the augmentation layers come first, inside the model, then the very same network
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds[1:4] == ["RandomRotation", "RandomTranslation", "RandomFlip"]
    assert model.layers[4] is net.model
    fresh = ttt.whole_network(params, "scratch").model
    assert [type(lyr).__name__ for lyr in flat_layers(net.model)] == [
        type(lyr).__name__ for lyr in flat_layers(fresh)
    ]
    assert net.model.count_params() == fresh.count_params()
    # and they act in training only: at inference the model is the network
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 1)).astype("float32")
    np.testing.assert_allclose(model(x, training=False), net.model(x, training=False), rtol=1e-5)
    assert isinstance(model, keras.Model)


def test_the_reference_trains_with_plain_fit_on_that_dataset_with_class_weights(
    spec: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a spy on keras.Model.fit that still trains
    import keras

    calls: list[tuple] = []
    fit = keras.Model.fit

    def spy(self: keras.Model, *args: object, **kwargs: object) -> object:
        calls.append((self, args, kwargs))
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy)
    # when the reference method runs
    result = ttt.run_reference(spec, "scratch")
    # then fit ran once, on the directory dataset, with balanced class weights, nothing else
    ((model, args, kwargs),) = calls
    assert set(kwargs) == {"epochs", "class_weight", "callbacks", "verbose"}
    assert [type(lyr).__name__ for lyr in model.layers][1:4] == [
        "RandomRotation",
        "RandomTranslation",
        "RandomFlip",
    ]
    assert not [op for op in dataset_ops(args[0]) if "Cache" in op]
    y = np.array([CLASSES.index(r["label"]) for r in spec["rows"]["train"]])
    counts = np.bincount(y, minlength=len(CLASSES))
    expected = {
        c: len(y) / ((counts > 0).sum() * n) for c, n in zip(CLASSES, counts, strict=True) if n
    }
    assert kwargs["class_weight"] == pytest.approx(
        {CLASSES.index(c): w for c, w in expected.items()}
    )
    assert result["class_weight"] == pytest.approx(expected)


# --------------------------------------------------------------------------- same images


def test_both_methods_read_the_same_files_in_every_split(runs: dict) -> None:
    # given one run of each method on the same prepared split
    alz, ref = runs["alzstage"], runs["reference"]
    # then the content hashes of what each read agree, split by split, and the harness says so
    assert alz["digests"] == ref["digests"]
    assert ttt.same_images([alz, ref])
    assert alz["test_images"] == ref["test_images"]


def test_the_class_trees_hold_exactly_the_split_rows_with_identical_pixels(spec: dict) -> None:
    for split in ttt.SPLITS:
        rows = spec["rows"][split]
        # when the reference lists its directory and alzstage its rows
        ds = ttt.reference_dataset(
            spec["trees"][split], CLASSES, (32, 32), 8, shuffle=False, seed=0
        )
        # then the same files with the same labels...
        assert sorted(ds.file_paths) == sorted(r["tree_path"] for r in rows)
        assert sorted(ttt.dataset_files(ds)) == sorted((r["tree_path"], r["label"]) for r in rows)
        # ...which decode to the same arrays, image by image
        ours = load_batch([r["path"] for r in rows], (32, 32))
        theirs = load_batch([r["tree_path"] for r in rows], (32, 32))
        assert hashlib.sha256(ours).hexdigest() == hashlib.sha256(theirs).hexdigest()


def test_a_method_that_read_other_images_is_caught(runs: dict) -> None:
    other = {**runs["reference"], "digests": {**runs["reference"]["digests"], "val": "x"}}
    assert not ttt.same_images([runs["alzstage"], other])


# --------------------------------------------------------------------------- stopping


def test_each_method_stops_at_the_first_epoch_that_reaches_the_target(runs: dict) -> None:
    for result in runs.values():
        assert result["reached"] and result["epochs_to_target"] == 1
        assert result["epochs_run"] == 1
        assert result["time_to_target_seconds"] == result["epochs"][0]["elapsed_seconds"]
        assert result["ci_unit"] == "subject"
        assert result["train_flops_per_image"] > 0


def test_a_sustained_target_waits_for_the_mean_of_the_last_epochs() -> None:
    clock = ttt.TargetClock("balanced_accuracy", 0.45, sustain=3)
    # a lucky first epoch alone is not enough, nor two epochs
    assert not clock.record(0.50, 1.0)
    assert not clock.record(0.40, 1.0)
    # the third epoch: mean(0.50, 0.40, 0.44) = 0.447 < 0.45, still not
    assert not clock.record(0.44, 1.0)
    # the fourth: mean(0.40, 0.44, 0.52) = 0.453 >= 0.45
    assert clock.record(0.52, 1.0)
    assert clock.reached is not None and clock.reached["epoch"] == 4


def test_the_subject_protocol_sustains_its_target_over_three_epochs(spec: dict) -> None:
    # the fixture overrides it; build_spec's default for the subject protocol is 3
    assert ttt.SUSTAIN["subject"] == 3 and ttt.SUSTAIN["stratified"] == 1


def test_alzstage_stops_through_train_models_own_hook_not_a_patch(spec: dict) -> None:
    # given a stop_when that says "reached" at the first epoch
    seen: list[dict] = []

    def stop_when(row: dict) -> bool:
        seen.append(row)
        return True

    from alzstage.train.recipe import train_model

    params = parse_params(spec["params"]["scratch"])
    x = load_batch([r["path"] for r in spec["rows"]["train"]], params.model.input_size)
    xv = load_batch([r["path"] for r in spec["rows"]["val"]], params.model.input_size)
    y = ttt.labels_of(spec["rows"]["train"], params.base.classes)
    yv = ttt.labels_of(spec["rows"]["val"], params.base.classes)
    # when training runs with it
    _, summary = train_model(params, x, y, xv, yv, stop_when=stop_when)
    # then training ended after that epoch, and the summary says so
    assert len(seen) == 1 and seen[0]["epoch"] == 1
    assert summary["scratch_epochs"] == 1 and summary["stopped_at_target_epoch"] == 1


def test_repeats_move_only_the_training_seed(spec: dict) -> None:
    moved = ttt.with_training_seed(spec, 2)
    for recipe, raw in moved["params"].items():
        assert raw["base"]["seed"] == spec["params"][recipe]["base"]["seed"] + 2
    assert moved["rows"] == spec["rows"] and moved["trees"] == spec["trees"]


def test_an_unreachable_target_runs_to_the_cap_and_reports_no_time(spec: dict) -> None:
    result = ttt.run_alzstage({**spec, "target": 2.0}, "scratch")
    assert not result["reached"] and result["time_to_target_seconds"] is None
    assert result["epochs_run"] == spec["max_epochs"] == 3


def test_the_transfer_recipe_stops_in_its_head_phase_and_keeps_the_whole_network(
    tmp_path: Path,
) -> None:
    # given a tiny MobileNetV2 with "pretrained" weights from a file
    archive = kaggle_zip(tmp_path / "tiny.zip")
    args = harness_args(archive, weights=backbone_weights())
    sets = {**TINY, "model.backbone": "mobilenetv2"}
    spec = {**ttt.build_spec(args, "subject", tmp_path, sets), "target": 0.0, "sustain": 1}
    # when alzstage's transfer recipe runs to a target every epoch reaches
    result = ttt.run_alzstage(spec, "transfer")
    # then it stopped after the first head epoch and still scored the full network on test
    assert result["reached"] and result["epochs_run"] == 1
    assert result["test_images"] == len(spec["rows"]["test"])
    assert result["train_flops_per_image"] is None  # no whole-network step to count


# --------------------------------------------------------------------------- pure parts


def test_harness_params_stop_only_at_the_target_or_the_cap(tmp_path: Path) -> None:
    scratch = parse_params(
        ttt.harness_params(tmp_path / "a.zip", "subject", "scratch", 7, None, {})
    )
    assert scratch.recipe == "scratch"
    assert scratch.train.scratch.epochs == scratch.train.scratch.patience == 7
    assert scratch.split.strategy == "subject" and scratch.data.source == "archive"
    transfer = parse_params(
        ttt.harness_params(tmp_path / "a.zip", "stratified", "transfer", 20, "imagenet", {})
    )
    assert transfer.recipe == "transfer" and transfer.augment.views >= 1
    assert transfer.train.epochs + transfer.train.fine_tune_epochs == 20
    assert transfer.train.patience == 20


def test_limit_keeps_whole_subjects_and_about_the_share_of_each_split() -> None:
    rows = [
        {"path": f"{s}/{c}/{g}-{k}", "label": c, "subject": f"{c}{s}{g}", "split": s}
        for s, n in (("train", 10), ("val", 4), ("test", 4))
        for c in ("A", "B")
        for g in range(n)
        for k in range(8)
    ]
    df = pd.DataFrame(rows)
    cut = ttt.limit_split(df, limit=40, seed=0)
    # whole subjects only, every split and class still present
    sizes = cut.groupby("subject").size()
    assert (sizes == 8).all()
    assert set(zip(cut["split"], cut["label"], strict=True)) == set(
        zip(df["split"], df["label"], strict=True)
    )
    assert 40 <= (cut["split"] == "train").sum() <= 56
    assert ttt.limit_split(df, limit=None, seed=0) is df


def test_ratios_flag_a_lower_bound_when_the_reference_never_reached_the_target() -> None:
    def result(name: str, reached: bool, seconds: float, ips: float) -> dict:
        return {
            "name": name,
            "reached": reached,
            "time_to_target_seconds": seconds if reached else None,
            "seconds_run": seconds,
            "images_per_second": ips,
            "balanced_accuracy": 0.5,
        }

    both = ttt.ratios(
        [result("alzstage-scratch", True, 100, 60), result("reference-scratch", True, 500, 30)]
    )
    assert both["scratch"]["time_to_target"] == 5.0
    assert not both["scratch"]["time_to_target_is_lower_bound"]
    assert both["scratch"]["images_per_second"] == 2.0
    capped = ttt.ratios(
        [result("alzstage-scratch", True, 100, 60), result("reference-scratch", False, 300, 30)]
    )
    assert capped["scratch"]["time_to_target"] == 3.0
    assert capped["scratch"]["time_to_target_is_lower_bound"]
    # medians over repeats: alzstage 100, 120, 300 -> 120; reference 500, 600, 700 -> 600
    repeated = ttt.ratios(
        [result("alzstage-scratch", True, t, 60) for t in (100, 300, 120)]
        + [result("reference-scratch", True, t, 30) for t in (600, 500, 700)]
    )
    assert repeated["scratch"]["time_to_target"] == 5.0
    assert repeated["scratch"]["repeats"] == [3, 3]
    missed = ttt.ratios(
        [result("alzstage-scratch", False, 100, 60), result("reference-scratch", True, 300, 30)]
    )
    assert "time_to_target" not in missed["scratch"]


def test_cpu_flags_come_from_cpuinfo() -> None:
    info = "model name\t: Test CPU\nflags\t\t: fpu avx2 fma avx512f avx512_bf16\n"
    cpu = cpu_description(info)
    assert cpu["model"] == "Test CPU"
    assert cpu["flags"]["avx2"] and cpu["flags"]["avx512_bf16"] and not cpu["flags"]["amx_tile"]
    assert flags_text(cpu) == "AVX2, AVX-512 (bf16), no AMX"


def test_flops_follow_the_layer_shapes_and_the_first_layer_has_no_input_gradient() -> None:
    import keras

    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", name="c1")(inp)
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", name="c2")(x)
    out = keras.layers.Dense(3, name="d")(keras.layers.Flatten()(x))
    c1, c2, d = layer_costs(keras.Model(inp, out))
    assert c1.forward == 2 * 8 * 8 * 4 * 9 * 1 and c1.train == 2 * c1.forward
    assert c2.forward == 2 * 4 * 4 * 6 * 9 * 4 and c2.train == 3 * c2.forward
    assert d.shape == (96, 3) and d.forward == 2 * 96 * 3
