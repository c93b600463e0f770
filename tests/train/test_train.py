"""Training learns for real, selects on balanced metrics, distributes, and never half-writes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from conftest import free_port

from alzstage.config import AugmentParams, Params
from alzstage.train.activation_cache import ActivationCache
from alzstage.train.fit import online_augmenter
from alzstage.train.losses import class_weights
from alzstage.train.recipe import save_model_atomic, train_model

# What a training subprocess puts on sys.path to import this module's helpers: this
# folder and tests/ (for conftest).
HELPER_PATHS = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))]
CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]


def backbone_weights(seed: int = 0) -> str:
    """A MobileNetV2 (include_top=False, 32x32) weights file with seeded random values.

    Stands in for pretrained weights (ImageNet, RadImageNet) in tests of the transfer
    recipe's machinery; the file is written once per seed and shared across processes.
    """
    import keras

    target = Path(tempfile.gettempdir()) / f"alzstage-test-mobilenetv2-32-s{seed}.weights.h5"
    if not target.exists():
        keras.utils.set_random_seed(seed)
        net = keras.applications.MobileNetV2(
            include_top=False, weights=None, input_shape=(32, 32, 3)
        )
        tmp = target.with_name(f".{os.getpid()}.{target.name}")
        net.save_weights(tmp)
        os.replace(tmp, target)
    return str(target)


def tiny_params(**train) -> Params:
    """The transfer recipe on a tiny MobileNetV2 with "pretrained" weights from a file."""
    return Params.model_validate(
        {
            "base": {"seed": 0, "image_size": [32, 32], "classes": CLASSES[:2]},
            "data": {"demo": {"subjects_per_class": [1, 1]}},
            "model": {
                "backbone": "mobilenetv2",
                "weights": backbone_weights(),
                "input_size": [32, 32],
                "dense_units": 16,
                "dropout": 0.0,
            },
            "train": {
                "epochs": 6,
                "batch_size": 16,
                "learning_rate": 0.01,
                "fine_tune_epochs": 0,
                "patience": 6,
                **train,
            },
        }
    )


def scratch_params(**scratch) -> Params:
    """The from-scratch recipe (the offline default) on a two-stage compact ResNet."""
    return Params.model_validate(
        {
            "base": {"seed": 0, "image_size": [32, 32], "classes": CLASSES[:2]},
            "data": {"demo": {"subjects_per_class": [1, 1]}},
            "model": {
                "weights": "none",
                "input_size": [32, 32],
                "dense_units": 16,
                "dropout": 0.0,
                "widths": [8, 16],
                "blocks": [1, 1],
            },
            "train": {
                "batch_size": 16,
                "scratch": {"epochs": 6, "learning_rate": 0.01, "warmup_epochs": 1, **scratch},
            },
        }
    )


def separable(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 1 has a bright square in the top-left quadrant; class 0 does not."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, (n, 32, 32)).astype(np.uint8)
    y = np.arange(n) % 2
    x[y == 1, 2:14, 2:14] = 230
    return x, y


def test_trivially_separable_set_is_learned():
    x, y = separable(96, 0)
    xv, yv = separable(32, 1)
    model, summary = train_model(scratch_params(), x, y, xv, yv)
    assert summary["scratch_best_val_balanced_accuracy"] >= 0.95, summary
    probs = model.predict(xv[..., None].astype("float32"), verbose=0)
    assert (probs.argmax(axis=1) == yv).mean() >= 0.95
    assert summary["temperature"] > 0
    assert [h["epoch"] for h in summary["history"]] == list(range(1, len(summary["history"]) + 1))


def test_scratch_recipe_learns_with_every_layer_trained():
    """The offline default: no frozen random trunk; every layer moves, and it learns."""
    import keras

    x, y = separable(96, 0)
    xv, yv = separable(32, 1)
    params = scratch_params()
    assert params.recipe == "scratch" and params.model.resolved_backbone == "resnet_compact"
    keras.utils.set_random_seed(params.base.seed)
    from alzstage.model.network import build_network

    initial = build_network(params.model, 2, params.base.seed).model.get_weights()
    model, summary = train_model(params, x, y, xv, yv)
    assert summary["recipe"] == "scratch" and summary["parameters"] > 0
    assert summary["scratch_best_val_balanced_accuracy"] >= 0.95, summary
    assert (
        model.predict(xv[..., None].astype("float32"), verbose=0).argmax(1) == yv
    ).mean() >= 0.95
    trainable = [w for w in model.weights if w.trainable]
    assert len(trainable) > 0
    assert all(not w.path.endswith(("moving_mean", "moving_variance")) for w in trainable)
    # Every convolution kernel changed from its initial value: nothing was frozen.
    kernels = [
        (w, i)
        for i, w in enumerate(model.weights)
        if w.path.endswith("kernel") and len(w.shape) == 4
    ]
    assert kernels
    for w, i in kernels:
        assert not np.allclose(w.numpy(), initial[i]), f"{w.path} did not train"


def test_transfer_recipe_with_random_weights_is_refused():
    with pytest.raises(ValueError, match=r"freezes the backbone, but model\.weights is none"):
        Params.model_validate({"model": {"weights": "none"}, "train": {"recipe": "transfer"}})


def test_recipe_follows_the_weights_when_auto(tmp_path):
    assert Params.model_validate({}).recipe == "scratch"
    weights = tmp_path / "w.weights.h5"
    p = Params.model_validate({"model": {"weights": str(weights)}})
    assert p.recipe == "transfer" and p.model.resolved_backbone == "resnet50"


def test_focal_loss_and_fine_tune_phase_run():
    x, y = separable(64, 2)
    xv, yv = separable(16, 3)
    params = tiny_params(loss="focal", epochs=2, fine_tune_from="final_block", fine_tune_epochs=1)
    _, summary = train_model(params, x, y, xv, yv)
    phases = [h["phase"] for h in summary["history"]]
    assert phases.count("fine_tune") == 1 and phases.count("head") >= 1
    assert summary["cut_cache_mb"] > 0


def test_activation_cache_reuses_and_invalidates(tmp_path):
    """A training-only change hits the disk cache; trunk weights or input bytes miss it."""
    x, y = separable(32, 0)
    xv, yv = separable(16, 1)
    ft = {"epochs": 1, "fine_tune_from": "final_block", "fine_tune_epochs": 1}

    def statuses(params, xs=x) -> list[str]:
        cache = ActivationCache(tmp_path, max_entries=20)
        _, summary = train_model(params, xs, y, xv, yv, cache=cache)
        assert summary["activation_cache"] == cache.events
        return [e["status"] for e in cache.events]

    _, uncached = train_model(tiny_params(**ft), x, y, xv, yv)
    first = ActivationCache(tmp_path, max_entries=20)
    _, cached = train_model(tiny_params(**ft), x, y, xv, yv, cache=first)
    assert [e["status"] for e in first.events] == ["miss", "miss"]
    # Same tensors either way: the loss curve is identical with and without the cache.
    assert [h["loss"] for h in cached["history"]] == pytest.approx(
        [h["loss"] for h in uncached["history"]], rel=1e-5
    )
    assert statuses(tiny_params(learning_rate=0.003, **ft)) == ["hit", "hit"]
    # Another weights file = other trunk weights; other bytes = other views.
    base = tiny_params(**ft)
    other_trunk = base.model_copy(
        update={"model": base.model.model_copy(update={"weights": backbone_weights(seed=1)})}
    )
    assert statuses(other_trunk) == ["miss", "miss"]
    flipped = np.ascontiguousarray(x[:, :, ::-1])
    assert statuses(tiny_params(**ft), flipped) == ["miss", "hit"]
    assert len(list(tmp_path.glob("*.npy"))) == 5


def test_activation_cache_recomputes_damaged_entries_and_evicts(tmp_path):
    calls: list[int] = []

    def compute(a: np.ndarray) -> np.ndarray:
        calls.append(len(a))
        return a.astype("float32") * 2

    cache = ActivationCache(tmp_path, max_entries=2)
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(cache.get_or_compute("t", "w", a, compute), a * 2.0)
    cache.path(cache.key("w", a)).write_bytes(b"not an npy file")
    np.testing.assert_array_equal(cache.get_or_compute("t", "w", a, compute), a * 2.0)
    assert calls == [3, 3] and cache.events[-1]["status"] == "miss"
    assert cache.events[-2]["status"].startswith("unreadable")
    for i in range(3):
        cache.get_or_compute("t", f"w{i}", a, compute)
    assert len(list(tmp_path.glob("*.npy"))) == 2
    assert not list(tmp_path.glob(".*tmp*"))


def test_tf_task_tags_each_worker(monkeypatch):
    from alzstage.tracking import tf_task

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert tf_task() is None
    cluster = '{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, '
    monkeypatch.setenv("TF_CONFIG", cluster + '"task": {"type": "worker", "index": 1}}')
    assert tf_task() == "worker:1"
    monkeypatch.setenv("TF_CONFIG", "not json")
    assert tf_task() is None


def test_class_weights_match_sklearn():
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0] * 50 + [1] * 30 + [2] * 15 + [3] * 5)
    ours = class_weights(y, CLASSES, "balanced")
    theirs = compute_class_weight("balanced", classes=np.arange(4), y=y)
    np.testing.assert_allclose([ours[i] for i in range(4)], theirs)


def test_class_weight_cap_bounds_only_the_rare_classes():
    """A one-subject class must not get a weight that swamps every other class."""
    y = np.array([0] * 52 + [1] * 36 + [2] * 14 + [3] * 1)
    raw = class_weights(y, CLASSES, "balanced")
    capped = class_weights(y, CLASSES, "balanced", max_weight=5.0)
    assert raw[3] == pytest.approx(103 / 4) and capped[3] == 5.0
    assert [capped[i] for i in range(3)] == [raw[i] for i in range(3)]
    assert class_weights(y, CLASSES, {"NonDemented": 9.0}, max_weight=5.0)[0] == 9.0


def test_two_logical_cpus_run_mirrored_strategy(tmp_path):
    """The training loop runs unchanged under MirroredStrategy over 2 logical CPU devices."""
    script = textwrap.dedent(
        """
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import json, sys
        sys.path[:0] = %r
        from test_train import separable, tiny_params
        from alzstage.train.recipe import train_model
        x, y = separable(32, 0); xv, yv = separable(16, 1)
        _, s = train_model(tiny_params(epochs=1), x, y, xv, yv)
        print(json.dumps({"strategy": s["strategy"], "replicas": s["replicas"]}))
        """
    ) % (HELPER_PATHS,)
    env = {**os.environ, "ALZSTAGE_MIRROR_CPUS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert '"strategy": "MirroredStrategy"' in last and '"replicas": 2' in last


def test_distributed_loop_matches_keras_fit():
    """The custom loop used under MultiWorkerMirroredStrategy is ``fit``'s arithmetic.

    Same initial weights, same batch order, class weights: after two epochs the weights
    agree with plain ``model.fit``. A mistake in the loss scaling, the class weighting or
    the optimizer step would move them apart.
    """
    import keras
    import tensorflow as tf

    from alzstage.train.distribute import fit_distributed

    rng = np.random.default_rng(0)
    x = rng.normal(size=(70, 6)).astype("float32")  # 70 = 4 full batches of 16 + 6
    y = (x[:, 0] + x[:, 1] > 0.5).astype("int64")
    cw = {0: 0.7, 1: 1.9}

    def model() -> keras.Model:
        keras.utils.set_random_seed(3)
        m = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(8, activation="relu"),
                keras.layers.Dense(2, activation="softmax"),
            ]
        )
        m.compile(keras.optimizers.Adam(0.05), keras.losses.SparseCategoricalCrossentropy())
        return m

    reference = model()
    reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, class_weight=cw, verbose=0)
    ours = model()
    seen: list[dict] = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(dict(logs or {}))

    fit_distributed(
        ours,
        x,
        y,
        strategy=tf.distribute.get_strategy(),
        batch_size=16,
        epochs=2,
        class_weight=cw,
        callback=Record(),
        seed=0,
        shuffle=False,
    )
    assert len(seen) == 2 and seen[1]["loss"] < seen[0]["loss"]
    assert int(ours.optimizer.iterations) == int(reference.optimizer.iterations) == 10
    for a, b in zip(ours.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    untrained = model()
    assert not all(
        np.allclose(a, b) for a, b in zip(ours.get_weights(), untrained.get_weights(), strict=True)
    )


@pytest.mark.integration
def test_two_workers_train_in_lockstep_under_tf_config(tmp_path):
    """Two processes, one TF_CONFIG cluster on 127.0.0.1: both phases train in sync.

    This is the multi-node recipe of docs/team.md on one machine. Keras 3 ``fit`` stops
    here (keras-team/keras#20585); ``train_model`` must finish on both workers with
    identical weights, because synchronous data-parallel training keeps them identical.
    """
    script = textwrap.dedent(
        """
        import hashlib, json, sys
        sys.path[:0] = %r
        from test_train import separable, tiny_params
        from alzstage.train.recipe import train_model
        x, y = separable(48, 0); xv, yv = separable(16, 1)
        params = tiny_params(epochs=2, fine_tune_from="final_block", fine_tune_epochs=1)
        model, s = train_model(params, x, y, xv, yv)
        digest = hashlib.sha256(b"".join(w.tobytes() for w in model.get_weights())).hexdigest()
        print("RESULT " + json.dumps({
            "strategy": s["strategy"], "replicas": s["replicas"], "weights": digest,
            "phases": [h["phase"] for h in s["history"]],
            "losses": [h["loss"] for h in s["history"]],
        }))
        """
    ) % (HELPER_PATHS,)
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config), "TF_CPP_MIN_LOG_LEVEL": "2"}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=600)
        finally:
            for other in procs:
                if other.poll() is None and proc.returncode is None:
                    other.kill()
        assert proc.returncode == 0, err[-3000:]
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
        results.append(json.loads(line[7:]))
    first, second = results
    assert first["strategy"] == "MultiWorkerMirroredStrategy" and first["replicas"] == 2
    assert first["phases"] == ["head", "head", "fine_tune"]
    assert all(np.isfinite(first["losses"]))
    assert first["losses"] == second["losses"], (first, second)
    assert first["weights"] == second["weights"]


def test_failed_save_leaves_no_model_and_no_temp(tmp_path):
    class Exploding:
        def save(self, path):
            with open(path, "wb") as f:
                f.write(b"half a model")
            raise KeyboardInterrupt("killed mid-save")

    target = tmp_path / "models" / "model.keras"
    with pytest.raises(KeyboardInterrupt):
        save_model_atomic(Exploding(), target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_killed_training_process_leaves_previous_model(tmp_path):
    """SIGKILL mid-fit: the stage output is the previous complete file, untouched."""
    target = tmp_path / "model.keras"
    target.write_bytes(b"previous good model")
    script = textwrap.dedent(
        """
        import sys, pathlib
        sys.path[:0] = %r
        from test_train import separable, tiny_params
        from alzstage.train.recipe import save_model_atomic, train_model
        x, y = separable(64, 0); xv, yv = separable(16, 1)
        print("training", flush=True)
        model, _ = train_model(tiny_params(epochs=500, patience=500), x, y, xv, yv)
        save_model_atomic(model, pathlib.Path(%r))
        """
    ) % (HELPER_PATHS, str(target))
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "training"
    import time

    time.sleep(8)
    proc.kill()
    proc.wait(timeout=30)
    assert target.read_bytes() == b"previous good model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]


def test_temp_file_of_a_killed_save_is_removed_on_the_next_run(tmp_path):
    """SIGKILL mid-save leaves .model.<pid>.tmp.keras; the next run removes it, not others'."""
    from alzstage.train.recipe import remove_stale_temps

    # given a process killed while its temp file was half written
    target = tmp_path / "model.keras"
    script = (
        "import os, signal, sys; "
        "open(os.path.join(sys.argv[1], f'.model.{os.getpid()}.tmp.keras'), 'wb').write(b'half'); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=False)
    assert killed.returncode == -9
    stale = [p.name for p in tmp_path.glob(".model.*.tmp.keras")]
    assert len(stale) == 1
    # and a save in progress in a live process, and an unrelated model's temp file
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f".model.{alive.pid}.tmp.keras"
        busy.write_bytes(b"being written")
        other = tmp_path / ".other.1.tmp.keras"
        other.write_bytes(b"not ours")

        # when the next run starts
        removed = remove_stale_temps(target)

        # then only the dead process's file is gone
        assert [p.name for p in removed] == stale
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([busy.name, other.name])
    finally:
        alive.kill()
        alive.wait()


def test_a_model_saved_twice_is_the_same_bytes(tmp_path):
    """DVC hashes model.keras: a save time or a memory address in it would change dvc.lock."""
    import time
    import zipfile

    import keras

    from alzstage.train.recipe import canonical_keras

    # given: a trained model saved once
    x, y = separable(32, 0)
    model, _ = train_model(scratch_params(epochs=1), x, y, *separable(16, 1))
    first, second = tmp_path / "a" / "model.keras", tmp_path / "b" / "model.keras"
    save_model_atomic(model, first)

    # when: it is saved again, past the zip format's 2-second date resolution
    time.sleep(2.1)
    save_model_atomic(model, second)

    # then: the same bytes, and the file loads to the model's predictions
    assert first.read_bytes() == second.read_bytes()
    xs = x[:8, ..., None].astype("float32")
    loaded = keras.models.load_model(second, compile=False)
    np.testing.assert_array_equal(model.predict(xs, verbose=0), loaded.predict(xs, verbose=0))

    # given: the same file as another process writes it, its shared objects numbered by
    # other memory addresses (Keras uses id())
    with zipfile.ZipFile(first) as z:
        entries = {name: z.read(name) for name in z.namelist()}
    config = entries["config.json"].decode()
    assert '"shared_object_id": 1' in config  # the model has shared objects to renumber
    other = tmp_path / "other.keras"
    with zipfile.ZipFile(other, "w") as z:
        for name, data in entries.items():
            if name == "config.json":
                data = re.sub(
                    r'"shared_object_id": (\d+)',
                    lambda m: f'"shared_object_id": {140737488355328 + 7919 * int(m[1])}',
                    config,
                ).encode()
            z.writestr(name, data)

    # when: it is made canonical
    canonical_keras(other)

    # then: it is the first file, byte for byte
    assert other.read_bytes() == first.read_bytes()


def test_save_removes_stale_temp_files_too(tmp_path):
    class Saves:
        def save(self, path):
            import zipfile

            with zipfile.ZipFile(path, "w") as f:
                f.writestr("metadata.json", '{"date_saved": "now"}')

    pid = int(  # a process that has ended
        subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    (tmp_path / f".model.{pid}.tmp.keras").write_bytes(b"half")
    save_model_atomic(Saves(), tmp_path / "model.keras")
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]


# --------------------------------------------------------------------------- online augmentation


def _augment_params(**overrides: object) -> AugmentParams:
    zero = {"rotation_deg": 0, "shift": 0, "zoom": 0, "horizontal_flip": False}
    return AugmentParams(**{**zero, "brightness": 0, "contrast": 0, **overrides})


def _ramp_batch(n: int = 16) -> np.ndarray:
    """(n, 12, 10, 1) float32 images whose columns differ, so a flip is visible."""
    row = np.linspace(10, 240, 10, dtype=np.float32)
    return np.broadcast_to(row, (n, 12, 10)).copy()[..., None]


def test_online_augmentation_is_off_when_every_range_is_zero() -> None:
    assert online_augmenter(_augment_params(), seed=0) is None


def test_flip_alone_gives_each_image_or_its_mirror_and_both_occur() -> None:
    # given an augmenter that may only flip horizontally
    images = _ramp_batch(32)
    out = np.asarray(online_augmenter(_augment_params(horizontal_flip=True), seed=0)(images))
    # then every output is the image or its left-right mirror, exactly (pixel centres map
    # onto pixel centres), and a batch of 32 gets some of each
    same = np.all(np.isclose(out, images, atol=1e-3), axis=(1, 2, 3))
    mirrored = np.all(np.isclose(out, images[:, :, ::-1], atol=1e-3), axis=(1, 2, 3))
    assert np.all(same | mirrored) and same.any() and mirrored.any()


def test_shift_alone_moves_content_by_at_most_the_configured_fraction() -> None:
    # given a single bright column in the middle and shifts of at most 20% (2 of 10 pixels)
    images = np.zeros((64, 12, 10, 1), np.float32)
    images[:, :, 5] = 200.0
    out = np.asarray(online_augmenter(_augment_params(shift=0.2), seed=1)(images))
    # then the column's centre of mass moves by at most 2 pixels, in both directions
    cols = out[..., 0].sum(axis=1)
    centre = (cols * np.arange(10)).sum(axis=1) / cols.sum(axis=1)
    assert np.all(np.abs(centre - 5) <= 2.0 + 1e-3)
    assert (centre < 4.9).any() and (centre > 5.1).any()


def test_augmented_pixels_stay_in_range_and_the_same_seed_repeats_the_draws() -> None:
    params = AugmentParams()  # every default range on
    images = _ramp_batch(8)
    first = np.asarray(online_augmenter(params, seed=3)(images))
    again = np.asarray(online_augmenter(params, seed=3)(images))
    assert first.shape == images.shape and first.dtype == np.float32
    assert first.min() >= 0.0 and first.max() <= 255.0
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, images)  # something did change
