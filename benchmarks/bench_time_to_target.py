"""Time to target quality, MLPerf-style: alzstage's recipes vs the reference method, same data.

Each method trains until its validation score reaches the target and stops there (or at
``--max-epochs``). The figure is the wall clock from the first image read to the end of
the epoch that reached the target, validation scoring included, as MLPerf counts it;
interpreter start and the TensorFlow import are not counted, for any method. Each method
runs in its own fresh process (``_child.run_child``), so peak RSS is its own.

    python benchmarks/bench_time_to_target.py \\
        --archive ../shared/datasets/alzheimers-dataset-4-class-of-images.zip \\
        --protocol subject stratified --work .cache/ttt --json-out bench_ttt.json
    python benchmarks/bench_time_to_target.py --from-json bench_ttt.json   # re-print
    python benchmarks/bench_roofline.py --ttt-json bench_ttt.json            # vs the peak

Methods, on exactly the same train/val/test images (alzstage's own ``download``,
``validate`` and ``split`` stage code over the archive, in a project under ``--work``):

- ``alzstage-scratch``: ``train_model`` with params.yaml's recipe (compact ResNet from
  random weights, every layer trains): decode once, the ``augment`` stage's views
  (``augment.views``), batches sliced from uint8 arrays, online augmentation in the
  input pipeline, alzstage's schedule and capped class weights.
- ``reference-scratch``: the reference project's method on the same network
  (``build_network``): ``keras.utils.image_dataset_from_directory`` over a class-folder
  copy of the split, augmentation layers inside the model, plain ``model.fit`` with
  balanced (uncapped) class weights, Adam at a constant rate and batch 32; nothing cached.
- with ``--weights`` (``imagenet`` or a ResNet50 notop file): ``alzstage-transfer`` (the
  two-phase recipe: head epochs, then fine-tuning the final block on cached activations,
  at least one materialised view) and ``reference-transfer`` (final block + head
  trainable throughout, every layer recomputed, as ``bench_train`` measures it).

Protocols: ``stratified`` (slice-level, LEAKY: target val accuracy >= 0.95, the
reference project's headline) and ``subject`` (subject-disjoint: target val balanced
accuracy ``--target``, 0.40: the default recipe's pooled 5-fold CV balanced accuracy on
new brains, docs/models.md). Patience is raised to the cap, so only the target or the
cap ends a run; the cap is also alzstage's cosine-decay length (``train.scratch.epochs``).
Test metrics are scored after the clock stops, on the model as it is when training
stopped (alzstage at the cap: its best validation epoch, which its recipe restores),
with percentile-bootstrap CIs over subjects (``evaluate.build_report``). Both children
hash the files they read; the harness stops if the methods saw different images.

alzstage stops through ``train_model``'s own ``stop_when`` hook (``stop_at_target``);
the reference through a Keras callback that scores its own decode of the val images.
On the subject protocol the target must hold on average over 3 consecutive epochs
(``--sustain``): one epoch's score on 24 val subjects crossed 0.45 after one epoch by
chance. ``--repeats N`` trains each method N times (training seed + i) and reports
medians, as MLPerf does. ``--set KEY=VALUE`` overrides params.yaml for every method (a
technique to weigh: ``--set train.batch_size=64``). ``--limit N`` keeps about N training
images (and the same share of val and test, whole subjects at a time): the scaling curve
(1,000 / 2,500 / all), or with a couple of epochs a smoke run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _child import run_child
from _machine import flags_text, framework_info, machine_info, params_text, set_threads

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")
# protocol -> (split.strategy, metric the target applies to, default target)
PROTOCOLS = {
    "stratified": ("stratified", "accuracy", 0.95),
    # 0.40: the default recipe's pooled 5-fold subject-CV balanced accuracy (0.397).
    "subject": ("subject", "balanced_accuracy", 0.40),
}
# protocol -> epochs a target must hold on average (``TargetClock.sustain``): one epoch's
# balanced accuracy on 24 val subjects can cross 0.45 by chance after one epoch (seen).
SUSTAIN = {"stratified": 1, "subject": 3}
METHODS = {  # name -> (method, recipe, label)
    "alzstage-scratch": ("alzstage", "scratch", "alzstage, from scratch"),
    "reference-scratch": ("reference", "scratch", "reference method, same network"),
    "alzstage-transfer": ("alzstage", "transfer", "alzstage, ResNet50 transfer"),
    "reference-transfer": ("reference", "transfer", "reference method, same ResNet50"),
}
# The reference project's optimiser: Adam at a constant rate (Keras's default for the
# network trained from scratch; 1e-4 for fine-tuning pretrained weights, as bench_train).
REFERENCE_LR = {"scratch": 1e-3, "transfer": 1e-4}
# The reference project's batch: image_dataset_from_directory's default. alzstage's own
# (train.batch_size, 64) is one of the techniques it weighs, so it is not imposed here.
REFERENCE_BATCH = 32
# The reference project's augmentation layers (bench_train's baseline): inside the model.
REFERENCE_AUGMENT = {"rotation": 8 / 360, "translation": 0.05, "flip": "horizontal"}


# --------------------------------------------------------------------------- params


def set_key(raw: dict, dotted: str, value: Any) -> None:
    """``raw["train"]["scratch"]["epochs"] = value`` for ``train.scratch.epochs``."""
    *parents, last = dotted.split(".")
    node = raw
    for key in parents:
        if node.get(key) is None:  # absent, or an empty section (``evaluate:``)
            node[key] = {}
        node = node[key]
    node[last] = value


def harness_params(
    archive: Path, strategy: str, recipe: str, max_epochs: int, weights: str | None, sets: dict
) -> dict:
    """params.yaml as committed, pointed at the archive, stopping only at target or cap.

    Patience is raised to ``max_epochs`` so that only the target (or the cap) ends a run;
    ``train.scratch.epochs`` = ``max_epochs`` also sets the length of the cosine decay.
    The transfer recipe keeps its head epochs (capped) and fine-tunes for the rest, on
    at least one materialised view per image: its frozen features are computed once, so
    it cannot augment online (params.yaml, ``augment.views``).
    """
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in {
        "data.source": "archive",
        "data.path": str(archive),
        "data.sha256": None,
        "data.name": None,
        "split.strategy": strategy,
        "train.recipe": recipe,
    }.items():
        set_key(raw, key, value)
    if recipe == "scratch":
        set_key(raw, "model.weights", "none")
        set_key(raw, "train.scratch.epochs", max_epochs)
        set_key(raw, "train.scratch.patience", max_epochs)
    else:
        head = min(int(raw["train"]["epochs"]), max_epochs)
        set_key(raw, "model.weights", weights)
        set_key(raw, "train.epochs", head)
        set_key(raw, "train.fine_tune_epochs", max_epochs - head)
        set_key(raw, "train.patience", max_epochs)
        set_key(raw, "augment.views", max(1, int(raw["augment"]["views"])))
    for key, value in sets.items():
        set_key(raw, key, value)
    return raw


def parse_sets(items: list[str]) -> dict:
    """``--set train.scratch.learning_rate=0.002`` pairs; values are read as YAML."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"--set {item!r}: expected KEY=VALUE, e.g. train.batch_size=64")
        out[key] = yaml.safe_load(value)
    return out


# --------------------------------------------------------------------------- data (parent)


def prepare_project(raw: dict, root: Path) -> None:
    """alzstage's ``download`` and ``validate`` stage code in a project at ``root``.

    Kept between runs with ``--work``: a validated manifest already there is reused.
    """
    from alzstage.config import Paths, parse_params
    from alzstage.data.download import run_download
    from alzstage.data.validate import run_validate

    paths = Paths(root)
    if paths.validated_manifest.exists():
        return
    params = parse_params(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_download(params, paths)
        run_validate(params, paths)


def split_rows(raw: dict, root: Path) -> Any:
    """alzstage's decode and split stages over the validated manifest; split.csv as a frame."""
    from alzstage.artifacts import read_split
    from alzstage.config import Paths, parse_params
    from alzstage.data.decode import run_decode
    from alzstage.data.split_stage import run_split

    paths = Paths(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the leaky-protocol warning: the table says it
        run_decode(parse_params(raw), paths)
        run_split(parse_params(raw), paths)
    return read_split(paths.split_file)


def limit_split(df: Any, limit: int | None, seed: int) -> Any:
    """About ``limit`` training images, and the same share of val and test.

    Whole subjects are kept (per split and class, in a seeded random order, until the
    share is reached; at least one each), so the subject-bootstrap CIs keep their meaning
    and the subject protocol stays subject-disjoint.
    """
    import numpy as np
    import pandas as pd

    n_train = int((df["split"] == "train").sum())
    if not limit or limit >= n_train:
        return df
    share = limit / max(n_train, 1)
    rng = np.random.default_rng(seed)
    keys = df["subject"].where(df["subject"] != "", "row:" + df["path"])
    keep = []
    for _, part in df.groupby(["split", "label"], sort=True):
        subjects = sorted(set(keys[part.index]))
        quota, taken = max(1, round(share * len(part))), 0
        for i in rng.permutation(len(subjects)):
            if taken >= quota:
                break
            rows = part[keys[part.index] == subjects[i]]
            keep.append(rows)
            taken += len(rows)
    return pd.concat(keep).sort_values("path", kind="stable").reset_index(drop=True)


def write_class_trees(df: Any, raw_dir: Path, dest: Path, classes: list[str]) -> dict:
    """``dest/<split>/<Class>/<file>`` for the reference method; rows with both paths.

    Files are hard-linked (copied across file systems): the same bytes alzstage decodes.
    Every class folder exists, empty or not, so ``class_names`` matches in every split.
    """
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for split in SPLITS:
        for cls in classes:
            (dest / split / cls).mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(df.itertuples(index=False)):
        src = raw_dir / r.path
        target = dest / r.split / r.label / f"{i:05d}-{Path(r.path).name}"
        try:
            os.link(src, target)
        except OSError:
            shutil.copy2(src, target)
        rows[r.split].append(
            {
                "path": str(src),
                "tree_path": str(target),
                "label": r.label,
                "subject": r.subject,
                "subject_source": r.subject_source,
            }
        )
    return rows


def file_set_digest(files: list[tuple[str, str]]) -> str:
    """One hash of a set of (path, label): sorted label + content hash of each file."""
    lines = sorted(
        f"{label}\t{hashlib.sha256(Path(p).read_bytes()).hexdigest()}" for p, label in files
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# --------------------------------------------------------------------------- timing


@dataclass
class TargetClock:
    """Per-epoch validation scores against the target, timed from the first image read."""

    metric: str
    target: float
    #: Reached when the mean of the last ``sustain`` epochs' scores is >= target: with
    #: 24 val subjects one epoch's balanced accuracy moves by +-0.05 on noise alone.
    sustain: int = 1
    t0: float = field(default_factory=time.perf_counter)
    epochs: list[dict] = field(default_factory=list)
    reached: dict | None = None

    def record(self, value: float, epoch_seconds: float, phase: str = "fit") -> bool:
        """Log one epoch's score; True once the target is reached."""
        row = {
            "epoch": len(self.epochs) + 1,
            "phase": phase,
            self.metric: value,
            "epoch_seconds": epoch_seconds,
            "elapsed_seconds": time.perf_counter() - self.t0,
        }
        self.epochs.append(row)
        recent = [e[self.metric] for e in self.epochs[-self.sustain :]]
        if self.reached is None and len(recent) == self.sustain:
            row[f"{self.metric}_mean_{self.sustain}"] = sum(recent) / self.sustain
            if row[f"{self.metric}_mean_{self.sustain}"] >= self.target:
                self.reached = row
        return self.reached is not None

    def steady_images_per_second(self, samples_per_epoch: int) -> tuple[float, str]:
        """Training images/s over the last phase's epochs, without its first (tracing) one.

        One phase for the whole-network methods; the transfer recipe's head epochs on
        pooled features and its fine-tune epochs differ by orders of magnitude, so the
        last phase that ran (the one training the most layers) is the one reported.
        """
        if not self.epochs:
            return float("nan"), ""
        phase = self.epochs[-1]["phase"]
        seconds = [e["epoch_seconds"] for e in self.epochs if e["phase"] == phase]
        seconds = seconds[1:] or seconds
        return samples_per_epoch * len(seconds) / sum(seconds), phase

    def summary(self, samples_per_epoch: int) -> dict:
        """Time and epochs to target, and training images/s (validation not counted)."""
        ips, phase = self.steady_images_per_second(samples_per_epoch)
        first = self.epochs[0]["epoch_seconds"] if self.epochs else float("nan")
        return {
            "reached": self.reached is not None,
            "time_to_target_seconds": self.reached and self.reached["elapsed_seconds"],
            "epochs_to_target": self.reached and self.reached["epoch"],
            "epochs_run": len(self.epochs),
            "seconds_run": self.epochs[-1]["elapsed_seconds"] if self.epochs else 0.0,
            "best_val": max((e[self.metric] for e in self.epochs), default=float("nan")),
            "samples_per_epoch": samples_per_epoch,
            "images_per_second": ips,
            "images_per_second_phase": phase,
            "first_epoch_seconds": first,
            "epochs": self.epochs,
        }


def stop_at_target(clock: TargetClock) -> Any:
    """``train_model``'s ``stop_when``: record alzstage's own scored epoch, True at target.

    alzstage scores each epoch itself (``fit.make_epoch_callback``); its row is read, so no
    extra prediction runs and the epoch time is alzstage's own.
    """

    def stop_when(row: dict) -> bool:
        return clock.record(row[f"val_{clock.metric}"], row["epoch_seconds"], row["phase"])

    return stop_when


# --------------------------------------------------------------------------- children


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def labels_of(rows: list, classes: list[str]) -> Any:
    """Class indices of split rows (dicts) or of (file, class) pairs."""
    import numpy as np

    names = [r["label"] if isinstance(r, dict) else r[1] for r in rows]
    return np.array([classes.index(c) for c in names], dtype=np.int64)


def score_test(rows: list[dict], probs: Any, classes: list[str], seed: int, n: int) -> dict:
    """Accuracy, balanced accuracy and macro-F1 on test, CIs by subject (evaluate's code)."""
    import numpy as np

    from alzstage.evaluate.report import build_report

    report = build_report(
        labels_of(rows, classes),
        np.asarray(probs, dtype=np.float64),
        classes,
        temperature=None,
        temperature_source="none: training stops at the target, before calibration",
        subjects=np.array([r["subject"] for r in rows]),
        subject_ids=",".join(sorted({r["subject_source"] for r in rows})),
        seed=seed,
        n_resamples=n,
    )
    ci = report["ci"]
    out = {"test_images": len(rows), "test_subjects": ci["n_units"], "ci_unit": ci["unit"]}
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
        out[name] = report[name]
        out[f"{name}_ci"] = [ci[name]["low"], ci[name]["high"]] if ci[name] else None
    return out


def whole_network(params: Any, recipe: str) -> Any:
    """``build_network`` with what trains at every step of a whole-network method.

    From scratch every layer trains; for transfer the final block and the head train
    (BatchNorm stays frozen, as ``build_network`` leaves it for pretrained weights).
    """
    from alzstage.model.network import FINAL_BLOCK, build_network, split_backbone

    net = build_network(params.model, len(params.base.classes), params.base.seed)
    if recipe == "scratch":
        net.set_trainable(None)
    else:
        _, tail = split_backbone(net.backbone, FINAL_BLOCK[params.model.resolved_backbone])
        net.set_trainable(tail.layers)
    return net


def train_flops(params: Any, recipe: str) -> int:
    """Training FLOPs per image of a whole-network step (counted on a fresh build)."""
    from _flops import flops_summary

    return flops_summary(whole_network(params, recipe).model)["train_flops_per_image"]


def run_alzstage(spec: dict, recipe: str) -> dict:
    """alzstage's train stage path: decode, materialised views, ``train_model``."""
    import keras  # noqa: F401  (imported before the clock starts, as in the reference)

    from alzstage.config import parse_params
    from alzstage.data.augment import build_views
    from alzstage.data.images import load_batch
    from alzstage.train.recipe import predict_array, train_model

    params = parse_params(spec["params"][recipe])
    classes, rows, size = params.base.classes, spec["rows"], params.model.input_size
    clock = TargetClock(spec["metric"], spec["target"], spec["sustain"])
    x = load_batch([r["path"] for r in rows["train"]], size)
    x, y, _ = build_views(
        x, labels_of(rows["train"], classes), params.augment, params.base.seed, len(classes)
    )
    xv = load_batch([r["path"] for r in rows["val"]], size)
    model, _ = train_model(
        params, x, y, xv, labels_of(rows["val"], classes), stop_when=stop_at_target(clock)
    )
    probs = predict_array(model, load_batch([r["path"] for r in rows["test"]], size), 64)
    return {
        **clock.summary(len(x)),
        # The transfer recipe trains a head on pooled features, then the tail on cached
        # activations: no whole-network step to count.
        "train_flops_per_image": train_flops(params, recipe) if recipe == "scratch" else None,
        **score_test(rows["test"], probs, classes, params.base.seed, spec["n_resamples"]),
        "digests": {s: file_set_digest([(r["path"], r["label"]) for r in rows[s]]) for s in SPLITS},
    }


def reference_dataset(
    directory: str, classes: list[str], size: Any, batch_size: int, *, shuffle: bool, seed: int
) -> Any:
    """The reference input pipeline: decode and resize every epoch, nothing added or cached."""
    import keras

    return keras.utils.image_dataset_from_directory(
        directory,
        labels="inferred",
        label_mode="int",
        class_names=classes,
        color_mode="grayscale",
        image_size=tuple(size),
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        verbose=False,
    )


def reference_model(network: Any, size: Any, seed: int) -> Any:
    """The network with the reference project's augmentation layers in front, inside it."""
    import keras
    from keras import layers

    inp = keras.Input((*size, 1), name="image")
    x = layers.RandomRotation(REFERENCE_AUGMENT["rotation"], seed=seed)(inp)
    t = REFERENCE_AUGMENT["translation"]
    x = layers.RandomTranslation(t, t, seed=seed)(x)
    x = layers.RandomFlip(REFERENCE_AUGMENT["flip"], seed=seed)(x)
    return keras.Model(inp, network(x), name="reference")


def dataset_files(ds: Any) -> list[tuple[str, str]]:
    """(file, class folder) of every file an ``image_dataset_from_directory`` reads."""
    return [(p, Path(p).parent.name) for p in ds.file_paths]


def reference_epoch_callback(val_ds: Any, y_val: Any, n_classes: int, clock: TargetClock) -> Any:
    """Time each epoch, then score validation (the reference's own decode) and stop at target."""
    import keras

    from alzstage.model.metrics import summary_metrics

    class ScoreAndStop(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seconds = time.perf_counter() - self.t
            pred = self.model.predict(val_ds, verbose=0).argmax(axis=1)
            if clock.record(summary_metrics(y_val, pred, n_classes)[clock.metric], seconds):
                self.model.stop_training = True

    return ScoreAndStop()


def fit_reference(model: Any, train_ds: Any, epochs: int, class_weight: dict, cb: Any) -> None:
    """Plain ``model.fit`` on the directory dataset with class weights; nothing else."""
    model.fit(train_ds, epochs=epochs, class_weight=class_weight, callbacks=[cb], verbose=0)


def run_reference(spec: dict, recipe: str) -> dict:
    """The reference project's method on the same network and the same images."""
    import keras

    from alzstage.config import parse_params
    from alzstage.train.losses import class_weights

    params = parse_params(spec["params"][recipe])
    classes, seed, bs = params.base.classes, params.base.seed, REFERENCE_BATCH
    size = params.model.input_size
    keras.utils.set_random_seed(seed)
    clock = TargetClock(spec["metric"], spec["target"], spec["sustain"])
    trees = spec["trees"]
    train_ds = reference_dataset(trees["train"], classes, size, bs, shuffle=True, seed=seed)
    val_ds = reference_dataset(trees["val"], classes, size, bs, shuffle=False, seed=seed)
    seen = {"train": dataset_files(train_ds), "val": dataset_files(val_ds)}
    # Balanced weights from the folder counts, uncapped: the plain recipe.
    cw = class_weights(labels_of(seen["train"], classes), classes, "balanced")
    model = reference_model(whole_network(params, recipe).model, size, seed)
    model.compile(
        keras.optimizers.Adam(spec["reference_lr"][recipe]), "sparse_categorical_crossentropy"
    )
    cb = reference_epoch_callback(val_ds, labels_of(seen["val"], classes), len(classes), clock)
    fit_reference(model, train_ds, spec["reference_max_epochs"], cw or {}, cb)
    result = reference_result(spec, params, model, seen)
    return {
        **clock.summary(len(seen["train"])),
        "train_flops_per_image": train_flops(params, recipe),
        **result,
        "class_weight": {classes[k]: v for k, v in (cw or {}).items()},
    }


def reference_result(spec: dict, params: Any, model: Any, seen: dict) -> dict:
    """After the clock: test scores (decoded the reference's way) and the files read."""
    classes = params.base.classes
    by_tree = {r["tree_path"]: r for r in spec["rows"]["test"]}
    test_ds = reference_dataset(
        spec["trees"]["test"], classes, params.model.input_size, 64, shuffle=False, seed=0
    )
    seen = {**seen, "test": dataset_files(test_ds)}
    rows = [by_tree[p] for p in test_ds.file_paths]
    probs = model.predict(test_ds, verbose=0)
    return {
        **score_test(rows, probs, classes, params.base.seed, spec["n_resamples"]),
        "digests": {s: file_set_digest(seen[s]) for s in SPLITS},
    }


def child(name: str, spec: dict) -> dict:
    """One method in this (fresh) process; the figures plus what they depend on."""
    set_threads(spec["intra"], spec["inter"])
    method, recipe, label = METHODS[name]
    load_before = os.getloadavg()[0]
    run = run_alzstage if method == "alzstage" else run_reference
    result = run(spec, recipe)
    return {
        "name": name,
        "label": label,
        "recipe": recipe,
        **result,
        "peak_rss_mb": peak_rss_mb(),
        "load_average": [load_before, os.getloadavg()[0]],
        "framework": framework_info(),
    }


# --------------------------------------------------------------------------- parent


def protocol_target(args: argparse.Namespace, protocol: str) -> tuple[str, str, float]:
    strategy, metric, default = PROTOCOLS[protocol]
    given = args.target if protocol == "subject" else args.stratified_target
    return strategy, metric, default if given is None else given


def build_spec(args: argparse.Namespace, protocol: str, work: Path, sets: dict) -> dict:
    """Split the archive the protocol's way, cut it for ``--limit``, write the trees."""
    from alzstage.config import Paths

    strategy, metric, target = protocol_target(args, protocol)
    raw = {
        recipe: harness_params(args.archive, strategy, recipe, args.max_epochs, args.weights, sets)
        for recipe in ("scratch", "transfer")
        if recipe == "scratch" or args.weights
    }
    project = work / "project"
    prepare_project(raw["scratch"], project)
    df = limit_split(split_rows(raw["scratch"], project), args.limit, args.seed)
    classes = raw["scratch"]["base"]["classes"]
    tree = work / protocol / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    rows = write_class_trees(df, Paths(project).raw, tree, classes)
    return {
        "protocol": protocol,
        "metric": metric,
        "target": target,
        "params": raw,
        "rows": rows,
        "trees": {s: str(tree / s) for s in SPLITS},
        "max_epochs": args.max_epochs,
        "reference_max_epochs": args.reference_max_epochs or args.max_epochs,
        "sustain": args.sustain or SUSTAIN[protocol],
        "reference_lr": {k: args.reference_lr or v for k, v in REFERENCE_LR.items()},
        "intra": args.intra,
        "inter": args.inter,
        "n_resamples": args.bootstrap,
    }


def split_counts(rows: dict) -> dict:
    return {
        s: {"images": len(rows[s]), "subjects": len({r["subject"] for r in rows[s]})}
        for s in SPLITS
    }


def ratios(results: list[dict]) -> dict:
    """Reference over alzstage, per recipe, over the repeats' medians.

    Time to target: a run that never reached it counts as its whole run time, so the
    ratio is then a lower bound (``time_to_target_is_lower_bound``). images/s the other
    way up; left out when alzstage's last phase was the transfer recipe's head on pooled
    features, because no step of the reference's is like it.
    """
    import statistics

    out = {}
    for recipe in ("scratch", "transfer"):
        alz = [r for r in results if r["name"] == f"alzstage-{recipe}"]
        ref = [r for r in results if r["name"] == f"reference-{recipe}"]
        if not alz or not ref:
            continue
        entry: dict[str, Any] = {"repeats": [len(alz), len(ref)]}
        if alz[0].get("images_per_second_phase") != "head":
            entry["images_per_second"] = statistics.median(
                r["images_per_second"] for r in alz
            ) / statistics.median(r["images_per_second"] for r in ref)
        if all(r["reached"] for r in alz):
            alz_time = statistics.median(r["time_to_target_seconds"] for r in alz)
            ref_time = statistics.median(
                r["time_to_target_seconds"] if r["reached"] else r["seconds_run"] for r in ref
            )
            entry["time_to_target"] = ref_time / alz_time
            entry["time_to_target_is_lower_bound"] = not all(r["reached"] for r in ref)
        entry["test_balanced_accuracy_difference"] = statistics.median(
            r["balanced_accuracy"] for r in alz
        ) - statistics.median(r["balanced_accuracy"] for r in ref)
        out[recipe] = entry
    return out


def same_images(results: list[dict]) -> bool:
    """Did every method read the same files (by content) in every split?"""
    return all(len({r["digests"][s] for r in results}) == 1 for s in SPLITS)


def write_json(target: Path | None, body: dict) -> None:
    """The run so far, written to a temporary file and renamed over ``target``."""
    if target is None:
        return
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, default=str))
    tmp.replace(target)


def run_protocol(args: argparse.Namespace, protocol: str, work: Path, body: dict) -> None:
    """Every method on one protocol's split, each in a fresh process; JSON after each.

    ``--repeats N`` trains every method N times, with training seeds ``base.seed`` + 0..N-1
    (initialisation, shuffling, augmentation) on the same split, as MLPerf repeats runs.
    """
    spec = build_spec(args, protocol, work, parse_sets(args.set))
    entry = body["protocols"][protocol] = {
        "metric": spec["metric"],
        "target": spec["target"],
        "sustain": spec["sustain"],
        "counts": split_counts(spec["rows"]),
        "reference_lr": spec["reference_lr"],
        "results": [],
    }
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    for repeat in range(args.repeats):
        spec_file = work / f"{protocol}.{repeat}.json"
        spec_file.write_text(json.dumps(with_training_seed(spec, repeat)))
        for name in methods(args):
            argv = [__file__, "--_child", name, "--_spec", str(spec_file)]
            entry["results"].append({**run_child(argv, env, name), "repeat": repeat})
            entry["ratios"] = ratios(entry["results"])
            entry["same_images"] = same_images(entry["results"])
            write_json(args.json_out, body)
            if not entry["same_images"]:
                sys.exit(f"{protocol}: the methods read different images; see the JSON digests")


def with_training_seed(spec: dict, repeat: int) -> dict:
    """The spec with ``base.seed`` moved by ``repeat``: same split, new training draw."""
    out = json.loads(json.dumps(spec))
    for raw in out["params"].values():
        raw["base"]["seed"] = int(raw["base"]["seed"]) + repeat
    return out


def methods(args: argparse.Namespace) -> list[str]:
    names = [n for n in METHODS if args.weights or METHODS[n][1] == "scratch"]
    return [n for n in names if not args.only or n in args.only]


def ci_text(r: dict, name: str) -> str:
    lo, hi = r[f"{name}_ci"] or (float("nan"), float("nan"))
    return f"{r[name]:.3f} ({lo:.3f}-{hi:.3f})"


def ips_text(r: dict) -> str:
    """images/s, naming the phase when it is not the only one (the transfer recipe)."""
    phase = r.get("images_per_second_phase", "fit")
    named = "" if phase in ("fit", "scratch") else f" ({phase.replace('_', '-')} epochs)"
    return f"{r['images_per_second']:.1f}{named}"


def result_row(r: dict) -> str:
    ttt = (
        f"{r['time_to_target_seconds']:.0f}"
        if r["reached"]
        else f"not reached (> {r['seconds_run']:.0f})"
    )
    epochs = f"{r['epochs_to_target']}" if r["reached"] else f"- ({r['epochs_run']} run)"
    flops = r.get("train_flops_per_image")
    gflops = f"{r['images_per_second'] * flops / 1e9:.1f}" if flops else "-"
    return (
        f"| {r['label']}{seed_text(r)} | {ttt} | {epochs} | {r['best_val']:.3f} | "
        f"{r['samples_per_epoch']:,} | "
        f"{ips_text(r)} | {r['first_epoch_seconds']:.0f} | {gflops} | "
        f"{r['peak_rss_mb']:,.0f} | {ci_text(r, 'accuracy')} | {ci_text(r, 'balanced_accuracy')} "
        f"| {ci_text(r, 'macro_f1')} |"
    )


def seed_text(r: dict) -> str:
    return f" (repeat {r['repeat']})" if r.get("repeat") else ""


def ratio_lines(results: list[dict]) -> list[str]:
    lines = []
    for recipe, q in ratios(results).items():
        if "time_to_target" in q:
            bound = "at least " if q["time_to_target_is_lower_bound"] else ""
            ttt = f"alzstage reaches the target {bound}{q['time_to_target']:.2f}x sooner"
            if q["repeats"] != [1, 1]:
                ttt += f" (medians over {q['repeats'][0]} and {q['repeats'][1]} runs)"
        else:
            ttt = "alzstage did not reach the target: no time-to-target ratio"
        ips = q.get("images_per_second")
        ips_text = f"{ips:.2f}x the reference's" if ips else "not comparable (head epochs only)"
        lines.append(
            f"- {recipe}: {ttt}; images/s {ips_text}; test balanced accuracy alzstage minus "
            f"reference {q['test_balanced_accuracy_difference']:+.3f}"
        )
    return lines


def sustain_text(sustain: int) -> str:
    return f" (mean of {sustain} consecutive epochs)" if sustain > 1 else ""


def print_report(body: dict) -> None:
    """One markdown table per protocol, with the machine and the ratios."""
    m, args = body["machine"], body["args"]
    if args.get("limit"):
        print(
            f"\nSUBSET (--limit {args['limit']}): about {args['limit']:,} training images, "
            "whole subjects; fewer val subjects make the target noisier."
        )
    fw = next((r["framework"] for p in body["protocols"].values() for r in p["results"]), {})
    print(
        f"\nCPU: {m['cpu']['model']} ({flags_text(m['cpu'])}), {m['cores']} cores "
        f"({m['cores_usable']} usable); load average at start {m['load_average'][0]:.2f}; "
        f"TensorFlow {fw.get('tensorflow')}, Keras {fw.get('keras')}; threads intra-op "
        f"{fw.get('intra_op_threads')}, inter-op {fw.get('inter_op_threads')} (0 = TensorFlow's "
        f"choice); commit {m['commit']}"
    )
    print(params_text(m.get("params")))
    for protocol, entry in body["protocols"].items():
        c = entry["counts"]
        leaky = (
            " (LEAKY: slices of one brain in train, val and test)"
            if protocol == "stratified"
            else ""
        )
        print(
            f"\n### {protocol}{leaky}: target val {entry['metric']} >= {entry['target']}"
            + sustain_text(entry.get("sustain", 1))
            + "\n\n"
            + ", ".join(
                f"{s} {c[s]['images']:,} images / {c[s]['subjects']} subjects" for s in SPLITS
            )
            + f"; at most {args['max_epochs']} epochs; same images for every method: "
            + ("yes" if entry.get("same_images") else "NO")
            + "\n"
        )
        print(
            "| method | time to target s | epochs to target | best val | samples per epoch "
            "| images/s (steady) | first epoch s | train GFLOP/s | peak RSS MB "
            "| test accuracy (95% CI) | test balanced accuracy (95% CI) | test macro-F1 (95% CI) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in entry["results"]:
            print(result_row(r))
        print()
        for line in ratio_lines(entry["results"]):
            print(line)
        loads = [f"{r['load_average'][0]:.1f}-{r['load_average'][1]:.1f}" for r in entry["results"]]
        print(f"- load average per method (start-end): {', '.join(loads)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archive", type=Path, help="Kaggle-layout zip")
    ap.add_argument("--protocol", nargs="+", choices=sorted(PROTOCOLS), default=["subject"])
    ap.add_argument("--target", type=float, help="subject protocol: val balanced accuracy (0.40)")
    ap.add_argument("--stratified-target", type=float, help="stratified: val accuracy (0.95)")
    ap.add_argument("--max-epochs", type=int, default=30, help="cap; also the cosine length")
    ap.add_argument("--weights", help="imagenet or a ResNet50 notop file: adds the transfer recipe")
    ap.add_argument("--reference-lr", type=float, help="override the reference's Adam rate")
    ap.add_argument(
        "--reference-max-epochs",
        type=int,
        help="the reference's own cap (default --max-epochs); its rate is constant, so a "
        "longer run only gives it more time to reach the target",
    )
    ap.add_argument(
        "--sustain",
        type=int,
        help="epochs the target must hold on average (default: subject 3, stratified 1)",
    )
    ap.add_argument("--repeats", type=int, default=1, help="runs per method, training seed +i")
    ap.add_argument("--limit", type=int, help="about N training images (whole subjects)")
    ap.add_argument("--only", nargs="+", choices=sorted(METHODS), help="methods to run")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="params override, every method",
    )
    ap.add_argument("--intra", type=int, help="TensorFlow intra-op threads (default: its choice)")
    ap.add_argument("--inter", type=int, help="TensorFlow inter-op threads (default: its choice)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="subject-bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    ap.add_argument(
        "--work",
        type=Path,
        help="keep the unpacked, validated archive here; reused as is when present "
        "(use a new directory for another archive)",
    )
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--from-json", type=Path, help="print the report of a saved run; runs nothing")
    ap.add_argument("--_child", choices=sorted(METHODS), help=argparse.SUPPRESS)
    ap.add_argument("--_spec", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        spec = json.loads(args._spec.read_text())
        print("RESULT " + json.dumps(child(args._child, spec), default=float))
        return
    if args.from_json:
        if not args.from_json.is_file():
            ap.error(f"--from-json {args.from_json}: no such file; give a file --json-out wrote")
        print_report(json.loads(args.from_json.read_text()))
        return
    if not args.archive:
        ap.error("--archive is required")
    args.archive = args.archive.resolve()
    body = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(REPO),
        "protocols": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work.resolve() if args.work else Path(tmp)
        for protocol in args.protocol:
            run_protocol(args, protocol, work, body)
    body["load_average_end"] = list(os.getloadavg())
    write_json(args.json_out, body)
    print_report(body)


if __name__ == "__main__":
    main()
