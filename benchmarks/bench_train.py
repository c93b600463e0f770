"""Train-stage throughput: the reference project's Keras recipe vs alzstage, same data.

Both runs see the same training and validation images, the same input size, batch size,
epoch count and trainable layers (ResNet50 final block + head). Each runs in its own
subprocess so peak RSS is measured cleanly; one harness invocation runs all of them.

    python benchmarks/bench_train.py \
        --archive ../shared/datasets/alzheimers-dataset-4-class-of-images.zip \
        --limit 5000 --repeat 3 --json-out bench_train.json
    python benchmarks/bench_train.py --from-json bench_train.json   # re-print the report

The baseline is the reference method written straight in Keras 3, with no tricks:
``image_dataset_from_directory`` decodes every epoch, augmentation layers run inside the
model, the frozen layers are recomputed at every step, plain ``model.fit`` with class
weights, for ``epochs + fine-tune-epochs`` epochs with the final block trainable
(``--baseline-epochs`` measures fewer and projects the rest from the steady epoch time,
marked as projected). alzstage decodes once, materialises augmented views (the
``augment`` stage), runs the frozen trunk once, trains the head on pooled features and
then the final block on cached activations (``train`` stage). It runs twice: ``cold``
computes the frozen activations, ``warm`` finds them in the on-disk activation cache, as
a re-run that changes only training params does.

Three ratios, because they answer different questions: images/s per fine-tune epoch
(the like-for-like step speed), wall clock of the stage (what a user waits for), and
samples/s over the stage (counts alzstage's materialised views, so about twice the
wall-clock ratio with ``--views 1``). Both models are scored on half of the archive's
test/, subject-disjoint from the half alzstage selects its epoch on, so a speed-up that
cost accuracy would show.

This machine's speed drifts from run to run (the baseline alone moved between 54 and 102
images/s across runs); ``--repeat 3`` runs three rounds and reports medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from _child import run_child

CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]


def _subject_halves(files: list[tuple[Path, str]], cap: int, seed: int) -> tuple[list, list]:
    """Split the archive's test/ into a validation and an evaluation set, subject-disjoint.

    alzstage selects its best epoch on the validation set, so accuracy is scored on the
    other half; slices of one brain never straddle the two (pseudo-subjects, as the
    ``split`` stage finds them). Each half holds about ``cap`` images, class-stratified.
    """
    import numpy as np

    from alzstage.config import SplitParams
    from alzstage.data.similarity import load_thumbnails, pseudo_subjects

    sp = SplitParams()
    labels = np.array([c for _, c in files])
    groups = pseudo_subjects(
        load_thumbnails([p for p, _ in files], sp.thumb_size), labels, sp.group_threshold
    )
    rng = np.random.default_rng(seed)
    halves: tuple[list, list] = ([], [])
    share = min(1.0, cap / max(len(files) / 2, 1))
    for cls in CLASSES:
        ids = sorted(set(groups[labels == cls].tolist()))
        target = round((labels == cls).sum() * share / 2) if share < 1 else len(files)
        taken = [0, 0]
        for g in rng.permutation(ids):
            rows = np.flatnonzero(groups == g)
            side = int(taken[1] < taken[0])
            if taken[side] >= target:
                side = 1 - side
                if taken[side] >= target:
                    continue
            halves[side].extend(files[i] + (str(g),) for i in rows)
            taken[side] += len(rows)
    return halves


def prepare(archive: Path, work: Path, limit: int, seed: int) -> dict:
    """Unpack; a class-stratified sample of the archive's train/; test/ split into val/eval."""
    import numpy as np

    with zipfile.ZipFile(archive) as zf:
        zf.extractall(work / "unpacked")
    root = next((work / "unpacked").rglob("train")).parent
    rng = np.random.default_rng(seed)
    files = [(p, c) for c in CLASSES for p in sorted((root / "train" / c).glob("*.jpg"))]
    train = [files[i] for i in sorted(rng.permutation(len(files))[:limit])]
    test = [(p, c) for c in CLASSES for p in sorted((root / "test" / c).glob("*.jpg"))]
    val, evaluation = _subject_halves(test, max(limit // 4, 8), seed)
    tree = work / "tree"
    for p, c in train:
        (tree / c).mkdir(parents=True, exist_ok=True)
        (tree / c / p.name).symlink_to(p)
    return {
        "train": [(str(p), c) for p, c in train],
        "val": [(str(p), c) for p, c, _ in val],
        "eval": [(str(p), c, g) for p, c, g in evaluation],
        "tree": str(tree),
    }


def score(spec: dict, probs: Any) -> dict:
    """Balanced accuracy on the evaluation half, with a subject-level bootstrap 95% CI."""
    import numpy as np

    from alzstage.model.metrics import bootstrap_ci, summary_metrics

    y = np.array([CLASSES.index(c) for _, c, _ in spec["eval"]])
    pred = np.asarray(probs).argmax(axis=1)
    groups = np.array([g for _, _, g in spec["eval"]])
    ci = bootstrap_ci(y, pred, len(CLASSES), groups=groups, n_resamples=2000, seed=0)
    lo, hi = ci.intervals["balanced_accuracy"] or (float("nan"), float("nan"))
    m = summary_metrics(y, pred, len(CLASSES))
    return {
        "eval_images": len(y),
        "eval_subjects": ci.n_units,
        "balanced_accuracy": m["balanced_accuracy"],
        "balanced_accuracy_ci": [lo, hi],
        "macro_f1": m["macro_f1"],
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_baseline(spec: dict) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    h, w = spec["input_size"]
    bs, epochs = spec["batch_size"], spec["baseline_epochs"]
    keras.utils.set_random_seed(0)
    ds = keras.utils.image_dataset_from_directory(
        spec["tree"],
        labels="inferred",
        label_mode="int",
        class_names=CLASSES,
        color_mode="grayscale",
        image_size=(h, w),
        batch_size=bs,
        shuffle=True,
        seed=0,
    )
    y = np.array([CLASSES.index(c) for _, c in spec["train"]])
    counts = np.bincount(y, minlength=len(CLASSES))
    cw = {i: len(y) / (len(CLASSES) * n) if n else 0.0 for i, n in enumerate(counts)}
    inp = keras.Input((h, w, 1))
    x = keras.layers.RandomRotation(8 / 360)(inp)
    x = keras.layers.RandomTranslation(0.05, 0.05)(x)
    x = keras.layers.RandomFlip("horizontal")(x)
    x = keras.layers.Concatenate()([x, x, x])
    x = keras.applications.resnet50.preprocess_input(x)
    base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(h, w, 3))
    trainable = False
    for layer in base.layers:
        trainable = trainable or layer.name == "conv5_block1_1_conv"
        layer.trainable = trainable and not isinstance(layer, keras.layers.BatchNormalization)
    x = base(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.3)(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    out = keras.layers.Dense(len(CLASSES), activation="softmax")(x)
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy")
    times: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.t)

    t0 = time.perf_counter()
    model.fit(ds, epochs=epochs, class_weight=cw, verbose=0, callbacks=[Timer()])
    wall = time.perf_counter() - t0
    # Scored outside the timed stage, decoded the way the baseline decodes for training.
    paths = [p for p, _, _ in spec["eval"]]
    ev = tf.data.Dataset.from_tensor_slices(paths).map(
        lambda f: tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(f), channels=1), (h, w))
    )
    accuracy = score(spec, model.predict(ev.batch(bs), verbose=0))
    n = len(spec["train"])
    steady = times[1:] or times
    epoch_s = sum(steady) / len(steady)
    full = spec["epochs"] + spec["fine_tune_epochs"]
    # Fewer epochs measured than the stage runs: the rest cost one steady epoch each.
    stage_wall = wall + (full - epochs) * epoch_s
    return {
        "method": "baseline (reference recipe)",
        "epochs_run": epochs,
        "projected": full != epochs,
        "samples_per_epoch": n,
        "epoch_seconds": epoch_s,
        "stage_seconds": stage_wall,
        "images_per_second": n / epoch_s,
        "stage_images_per_second": n * full / stage_wall,
        "peak_rss_mb": peak_rss_mb(),
        **accuracy,
    }


def run_alzstage(spec: dict, warm: bool) -> dict:
    import numpy as np

    from alzstage.config import Params
    from alzstage.data.augment import build_views
    from alzstage.data.images import load_batch
    from alzstage.train.activation_cache import ActivationCache
    from alzstage.train.feed import predict_array
    from alzstage.train.recipe import train_model

    params = Params.model_validate(
        {
            "model": {"weights": "none", "input_size": spec["input_size"]},
            "augment": {"views": spec["views"]},
            "train": {
                "epochs": spec["epochs"],
                "batch_size": spec["batch_size"],
                "fine_tune_from": "final_block",
                "fine_tune_epochs": spec["fine_tune_epochs"],
                "patience": 1000,  # no early stopping: every method runs every epoch
            },
        }
    )
    cache = ActivationCache(Path(spec["cache_dir"]))
    t0 = time.perf_counter()
    x = load_batch([p for p, _ in spec["train"]], params.model.input_size)
    y = np.array([CLASSES.index(c) for _, c in spec["train"]])
    xv = load_batch([p for p, _ in spec["val"]], params.model.input_size)
    yv = np.array([CLASSES.index(c) for _, c in spec["val"]])
    x_all, y_all, _ = build_views(x, y, params.augment, 0, len(CLASSES))
    prep = time.perf_counter() - t0
    model, summary = train_model(params, x_all, y_all, xv, yv, cache=cache)
    wall = time.perf_counter() - t0
    xe = load_batch([p for p, _, _ in spec["eval"]], params.model.input_size)
    accuracy = score(spec, predict_array(model, xe, spec["batch_size"]))
    statuses = [e["status"] for e in cache.events]
    if warm != (statuses == ["hit", "hit"]):
        raise SystemExit(f"activation cache {statuses} in the {'warm' if warm else 'cold'} run")
    n = len(x_all)
    ips = summary["fine_tune_steady_images_per_second"]
    epochs = spec["epochs"] + spec["fine_tune_epochs"]
    return {
        "method": f"alzstage, {'warm' if warm else 'cold'} activation cache",
        "epochs_run": epochs,
        "projected": False,
        "samples_per_epoch": n,
        "epoch_seconds": n / ips if ips else float("nan"),
        "stage_seconds": wall,
        "images_per_second": ips,
        "stage_images_per_second": n * epochs / wall,
        "decode_augment_seconds": prep,
        "frozen_forward_seconds": summary["feature_seconds"],
        "head_epoch_seconds": n / summary["head_steady_images_per_second"],
        "peak_rss_mb": peak_rss_mb(),
        **accuracy,
    }


def median_result(runs: list[dict]) -> dict:
    """One method over several rounds: the median of each figure, the rounds kept too."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            out[key] = statistics.median(r[key] for r in runs)
    if "balanced_accuracy" in out:  # the interval shown is the median round's own
        mid = min(runs, key=lambda r: abs(r["balanced_accuracy"] - out["balanced_accuracy"]))
        out["balanced_accuracy_ci"] = mid["balanced_accuracy_ci"]
    out["rounds"] = runs
    return out


def write_json(args: argparse.Namespace, results: list[dict]) -> None:
    """The results so far, written to a temporary file and renamed over ``--json-out``."""
    tmp = args.json_out.with_name(args.json_out.name + ".tmp")
    body = {
        "args": vars(args) | {"archive": str(args.archive), "json_out": str(args.json_out)},
        "load_average": os.getloadavg()[0],
        "rounds_done": len(results[0].get("rounds", [])),
        "results": results,
    }
    tmp.write_text(json.dumps(body, indent=2, default=str))
    tmp.replace(args.json_out)


def accuracy_text(r: dict) -> str:
    if "balanced_accuracy_ci" not in r:  # runs saved before the harness scored accuracy
        return "not measured"
    lo, hi = r["balanced_accuracy_ci"]
    return f"{r['balanced_accuracy']:.3f} ({lo:.3f}-{hi:.3f})"


CHILDREN = {
    "baseline": lambda spec: run_baseline(spec),
    "alzstage-cold": lambda spec: run_alzstage(spec, warm=False),
    "alzstage-warm": lambda spec: run_alzstage(spec, warm=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archive", type=Path, help="Kaggle-layout zip")
    ap.add_argument("--limit", type=int, default=1000, help="training images to sample")
    ap.add_argument("--epochs", type=int, default=8, help="head epochs (train.epochs)")
    ap.add_argument("--fine-tune-epochs", type=int, default=3, help="train.fine_tune_epochs")
    ap.add_argument(
        "--baseline-epochs",
        type=int,
        help="epochs the baseline really runs (default: all); the rest are projected",
    )
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--input-size", type=int, nargs=2, default=[112, 96])
    ap.add_argument("--views", type=int, default=1)
    ap.add_argument("--skip-warm", action="store_true", help="no warm-cache alzstage run")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of (baseline, cold, warm); the table shows medians, the JSON every round",
    )
    ap.add_argument("--json-out", type=Path)
    ap.add_argument(
        "--from-json", type=Path, help="print the report of an earlier --json-out; runs nothing"
    )
    ap.add_argument("--_child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--_spec", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        spec = json.loads(args._spec.read_text())
        print("RESULT " + json.dumps(CHILDREN[args._child](spec)))
        return
    if args.from_json:
        if not args.from_json.is_file():
            ap.error(f"--from-json {args.from_json}: no such file; give a file --json-out wrote")
        saved = json.loads(args.from_json.read_text())
        print_report(argparse.Namespace(**saved["args"]), saved["results"], saved["load_average"])
        return
    if not args.archive:
        ap.error("--archive is required")
    full = args.epochs + args.fine_tune_epochs
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = prepare(args.archive.resolve(), work, args.limit, seed=0)
        spec.update(
            epochs=args.epochs,
            fine_tune_epochs=args.fine_tune_epochs,
            baseline_epochs=min(args.baseline_epochs or full, full),
            batch_size=args.batch_size,
            input_size=list(args.input_size),
            views=args.views,
            cache_dir=str(work / "activations"),
        )
        (work / "spec.json").write_text(json.dumps(spec))
        rounds: list[list[dict]] = []
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        for _ in range(args.repeat):
            results = []
            # Each round's cold run starts from an empty activation cache.
            shutil.rmtree(work / "activations", ignore_errors=True)
            for child in CHILDREN:
                if args.skip_warm and child == "alzstage-warm":
                    continue
                argv = [__file__, "--_child", child, "--_spec", str(work / "spec.json")]
                results.append(run_child(argv, env, child))
            rounds.append(results)
            if args.json_out:  # each finished round is kept, even if a later one fails
                write_json(
                    args, [median_result([r[i] for r in rounds]) for i in range(len(results))]
                )
    results = [median_result([r[i] for r in rounds]) for i in range(len(rounds[0]))]
    if args.json_out:
        write_json(args, results)
    print_report(args, results, os.getloadavg()[0])


def print_report(args: argparse.Namespace, results: list[dict], load: float) -> None:
    """The markdown table (medians) and, for several rounds, each round's ratios."""
    rounds = [list(rd) for rd in zip(*(r.get("rounds", [r]) for r in results), strict=True)]
    base = results[0]
    full = args.epochs + args.fine_tune_epochs
    print(
        f"\n{base['samples_per_epoch']} train images, {args.epochs} head + "
        f"{args.fine_tune_epochs} fine-tune epochs (baseline: {full} epochs, final block "
        f"trainable throughout), input {args.input_size}, batch {args.batch_size}, views "
        f"{args.views}; {len(rounds)} round(s); load avg {load:.1f}\n"
    )
    print(
        "| method | samples per epoch | images/s per fine-tune epoch (vs baseline) "
        "| train stage s (wall-clock speed-up) | stage samples/s (vs baseline) | peak RSS MB "
        "| eval balanced accuracy (95% CI) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        stage = f"{r['stage_seconds']:.0f}" + (" (projected)" if r["projected"] else "")
        print(
            f"| {r['method']} | {r['samples_per_epoch']} | {r['images_per_second']:.1f} "
            f"({r['images_per_second'] / base['images_per_second']:.1f}x) | "
            f"{stage} ({base['stage_seconds'] / r['stage_seconds']:.1f}x) | "
            f"{r['stage_images_per_second']:.1f} "
            f"({r['stage_images_per_second'] / base['stage_images_per_second']:.1f}x) | "
            f"{r['peak_rss_mb']:.0f} | {accuracy_text(r)} |"
        )
    ev = results[0]
    print(
        "\nSame epoch count for every method. With augment.views > 0 an alzstage epoch holds "
        "each image and its materialised views, so its stage samples/s counts more samples "
        "than the wall-clock ratio does; the wall-clock column is what a user waits for."
    )
    if "eval_images" in ev:
        print(
            f"Accuracy: the evaluation half of the archive's test/ ({ev['eval_images']} images, "
            f"{ev['eval_subjects']} pseudo-subjects, disjoint from the validation half that "
            "alzstage selects its epoch on); CI: percentile bootstrap over subjects. The "
            "archive's test/ holds other slices of the train/ subjects, so this compares the "
            "two methods with each other; it is not a generalisation estimate."
        )
    if len(rounds) > 1:
        print(f"\nMedians of {len(rounds)} rounds. Each round against its own baseline:")
        for i, r in enumerate(results[1:], start=1):

            def ratios(key: str, inverse: bool = False, i: int = i) -> str:
                vals = [rd[i][key] / rd[0][key] for rd in rounds]
                return ", ".join(f"{1 / v if inverse else v:.1f}x" for v in vals)

            print(
                f"- {r['method']}: per fine-tune epoch {ratios('images_per_second')}; "
                f"wall clock {ratios('stage_seconds', inverse=True)}; "
                f"stage samples/s {ratios('stage_images_per_second')}"
            )
        for i, r in enumerate(results):
            accs = "; ".join(accuracy_text(rd[i]) for rd in rounds)
            print(f"- {r['method']}, balanced accuracy per round: {accs}")


if __name__ == "__main__":
    main()
