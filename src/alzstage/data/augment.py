"""The ``augment`` stage: materialise K augmented views of the *training* split only.

Augmenting after the split (never before) keeps augmented copies of a test brain out of
training. Views are written once, decoded and resized to the model's input size, so
training never decodes a JPEG and the frozen part of the network can be computed once
per view and cached (see ``alzstage.train.recipe``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from alzstage.artifacts import AugmentedSet, PixelStore, read_split
from alzstage.config import AugmentParams, Params, Paths
from alzstage.errors import AlzstageError
from alzstage.files import atomic_path
from alzstage.result import StageResult


def augment_image(img: np.ndarray, rng: np.random.Generator, p: AugmentParams) -> np.ndarray:
    """One random affine + intensity perturbation of a uint8 (H, W) slice."""
    from PIL import Image

    h, w = img.shape
    angle = math.radians(rng.uniform(-p.rotation_deg, p.rotation_deg))
    scale = 1.0 + rng.uniform(-p.zoom, p.zoom)
    tx, ty = rng.uniform(-p.shift, p.shift) * w, rng.uniform(-p.shift, p.shift) * h
    flip = p.horizontal_flip and rng.random() < 0.5
    # Inverse affine about the image centre (PIL maps output → input coordinates).
    cx, cy = w / 2.0, h / 2.0
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    a, b = cos, sin
    d, e = -sin, cos
    c = cx - a * (cx + tx) - b * (cy + ty)
    f = cy - d * (cx + tx) - e * (cy + ty)
    out = Image.fromarray(img).transform(
        (w, h), Image.Transform.AFFINE, (a, b, c, d, e, f), resample=Image.Resampling.BILINEAR
    )
    arr = np.asarray(out, dtype=np.float32)
    if flip:
        arr = arr[:, ::-1]
    gain = 1.0 + rng.uniform(-p.contrast, p.contrast)
    bias = rng.uniform(-p.brightness, p.brightness) * 255.0
    mean = arr.mean()
    arr = (arr - mean) * gain + mean + bias
    return np.clip(arr, 0, 255).astype(np.uint8)


def plan_views(labels: np.ndarray, p: AugmentParams, n_classes: int) -> np.ndarray:
    """Source index of every augmented view to make (originals are kept separately).

    ``oversample: balance`` adds extra views of minority classes until every class has as
    many samples as the largest, so class balance comes from new pixels, not repeats.
    """
    base = np.repeat(np.arange(len(labels)), p.views)
    if p.oversample == "none" or len(labels) == 0:
        return base
    counts = np.bincount(labels, minlength=n_classes) * (1 + p.views)
    target = counts.max()
    extra = []
    for c in range(n_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) == 0:
            continue
        need = int(target - counts[c])
        extra.append(np.resize(idx, need))
    return np.concatenate([base, *extra]) if extra else base


def build_views(
    images: np.ndarray, labels: np.ndarray, p: AugmentParams, seed: int, n_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, source index) of originals followed by their augmented views."""
    plan = plan_views(labels, p, n_classes)
    views = np.empty((len(plan), *images.shape[1:]), dtype=np.uint8)
    for k, src in enumerate(plan):
        # A per-view generator keyed by (seed, k) keeps each view identical run to run,
        # whatever order or parallelism produced the others.
        rng = np.random.default_rng([seed, int(k)])
        views[k] = augment_image(images[src], rng, p)
    all_images = np.concatenate([images, views])
    all_labels = np.concatenate([labels, labels[plan]])
    source = np.concatenate([np.arange(len(images)), plan])
    return all_images, all_labels, source


def preview_indices(labels: np.ndarray, count: int) -> list[int]:
    """Originals to preview, taken round-robin over classes so every class is seen."""
    by_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    picked: list[int] = []
    while len(picked) < count and any(by_class):
        for idx in by_class:
            if idx and len(picked) < count:
                picked.append(int(idx.pop(len(idx) // 2)))
    return picked


def preview_grid(
    images: np.ndarray, source: np.ndarray, n_orig: int, picks: list[int]
) -> np.ndarray:
    """Rows of [original | its augmented views] for a person to eyeball."""
    rows = []
    for i in picks:
        views = np.flatnonzero((source == i) & (np.arange(len(source)) >= n_orig))[:3]
        tiles = [images[i], *[images[v] for v in views]]
        while len(tiles) < 4:
            tiles.append(np.zeros_like(images[i]))
        rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0) if rows else np.zeros((1, 1), np.uint8)


def run_augment(params: Params, paths: Paths) -> StageResult:
    from PIL import Image

    split = read_split(paths.split_file)
    train = split[split["split"] == "train"].reset_index(drop=True)
    classes = params.base.classes
    unknown = sorted(set(train["label"]) - set(classes))
    if unknown:
        raise AlzstageError(
            f"{paths.split_file}: labels {unknown} are not in base.classes {classes}; "
            "re-run `dvc repro` from download after changing the class list"
        )
    labels = train["label"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    images = PixelStore.read(paths.pixels).images_for(train["path"], params.model.input_size)
    all_images, all_labels, source = build_views(
        images, labels, params.augment, params.base.seed, len(classes)
    )
    # The whole directory is swapped in at the end: no stale file from an earlier run
    # survives, and a killed run leaves the previous complete output.
    AugmentedSet(
        images=all_images,
        labels=all_labels,
        source=source,
        paths=train["path"].to_numpy(str),
        subjects=train["subject"].to_numpy(str),
    ).write(paths.augmented)
    artifacts: list[Path] = []
    if params.augment.preview_count:
        picks = preview_indices(labels, params.augment.preview_count)
        grid = preview_grid(all_images, source, len(images), picks)
        fig = paths.figures / "augment_preview.png"
        fig.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(fig) as tmp:
            Image.fromarray(grid).save(tmp, format="PNG")
        artifacts.append(fig)
    counts = np.bincount(all_labels, minlength=len(classes))
    metrics = {"n_train_originals": float(len(images)), "n_train_total": float(len(all_images))}
    metrics.update({f"n_{c}": float(n) for c, n in zip(classes, counts, strict=True)})
    return StageResult(
        metrics=metrics,
        artifacts=artifacts,
        summary=(
            f"{len(images)} training slices -> {len(all_images)} samples "
            f"({params.augment.views} views each, oversample={params.augment.oversample})"
        ),
    )
