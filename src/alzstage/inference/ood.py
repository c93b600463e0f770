"""Is this input like the training images? The out-of-distribution check and leak guard.

A classifier answers for any pixels: a 1x1 grey PNG got ModerateDemented at 0.88, a
black frame MildDemented. Softmax confidence does not catch this (random weights and a
trained network are both confidently wrong off-distribution), so the check looks at the
*input*, against numbers measured on the model's own training images at train time and
stored with the model (``input_check`` in its ``meta.json``):

* **size**: the shorter side is at least half the network's input (upscaling more than
  2x invents the detail the model looks at) and the aspect ratio within 1.5x of the
  training images';
* **contrast**: the 1st-99th percentile spread, at least a third of the training
  minimum (a blank or constant image has none);
* **foreground fraction**: the share of pixels above a tenth of the 99th percentile.
  MRI slices are a brain on black: about half the frame (Kaggle 0.47-0.53);
* **border brightness**: the outer ring relative to the 99th percentile. Slices have a
  black border (Kaggle 0.00); photographs, scans of paper and noise do not;
* **foreground texture**: the coefficient of variation inside the foreground. Grey
  matter, white matter and CSF give 0.3-0.55; a filled blob has almost none;
* **correlation with the training mean slice** on 32x32 thumbnails: a real slice
  correlates 0.87-0.97 with the Kaggle mean, noise and photographs about 0;
* **orientation**: how much better the thumbnail correlates with the training mean
  slice as it is than with that mean turned by 90, 180 or 270 degrees or upside down.
  Upright Kaggle training slices: 0.03-0.10; its 1,022 test slices down to -0.0042 (the
  round top of the head fits any pose); the same slices turned or upside down -0.09 to
  0.004. Below ``ORIENTATION_SLACK`` (0.005) under 0 (or under the training minimum,
  if that is lower) is flagged: on 300 Kaggle test slices, 297, 298, 296 and 297 of
  300 turned by 90, 180, 270 degrees and upside down, none upright. A slice whose
  anatomy fits the training mean no better upright than turned is flagged too (real
  archive slices under the synthetic demo model's check). A left-right mirror is
  *allowed*: axial slices are near-symmetric and both display conventions
  (radiological and neurological) are in use, so no mirrored pose is tested (1 of 300
  mirrored Kaggle slices is flagged, a round top slice);
* **fine texture**: the pixel-scale grain inside the brain (:func:`alzstage.data.
  image_features.fine_texture`), at most 1.25x the training maximum: scans from a
  noisier scanner or another dataset than the model saw are flagged (a smooth
  synthetic slice 0.013, the real archive 0.02). Only an upper bound: shrinking lowers it.

Each bound is the training range (0.5th-99.5th percentile) widened by a margin stated
next to it, so that the slices of a new subject, a network-size export or a darker
scanner still pass; what gets flagged is far outside. Fitted on the 3,296 training
slices of the Kaggle archive's subject split: none of its 1,056 test and 768 validation
slices was flagged, nor 300 test slices each resized to 112x96, squashed to 128x128,
rotated 15 degrees, darkened to 60% or padded into 256x256; every noise image, generated
photograph, blank, 1x1 and filled-blob image was (``docs/threat-model.md``).

The **leak guard** asks a different question: was this very slice (or a near copy) in
the training set? It reuses the split stage's thumbnail correlation
(:func:`alzstage.data.split.correlation_rows` / :func:`~alzstage.data.split.most_correlated`)
against the 32x32 thumbnails of every training image, stored with the model. At
``SEEN_THRESHOLD`` = 0.99 (the split's ``near_duplicate_threshold``) none of the 1,824
subject-split Kaggle test and validation slices matched (max 0.983), 16% of the Kaggle
source-split test slices did (its known duplicates), and every training slice and
re-encoded or resized copy did (>= 0.9999).

Everything here is pure array logic, except :func:`fit_from_files`, which decodes the
training files (the train stage reads the same measurements from the decode stage's
store instead: :func:`fit_from_pixels`), and :meth:`InputGuard.load`, which reads what
was stored.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alzstage.data.image_features import FEATURES, THUMB_SIZE, image_features, thumbnail
from alzstage.data.similarity import correlation_rows, most_correlated
from alzstage.errors import AlzstageError

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.artifacts import PixelStore

SEEN_THRESHOLD = 0.99
#: Every feature the check can bound: the per-image ones, then those that compare a
#: thumbnail with the training mean slice (``mean_correlation``, ``orientation``).
CHECK_FEATURES = (*FEATURES, "orientation")
# The poses of the training mean slice that an upright slice must match less well than
# the mean itself. No left-right mirror: a mirrored axial slice is anatomically plausible.
POSES = {
    "turned 90 degrees": lambda m: np.rot90(m, 1),
    "turned 180 degrees": lambda m: np.rot90(m, 2),
    "turned 270 degrees": lambda m: np.rot90(m, 3),
    "upside down": lambda m: np.flipud(m),
}
# The top slices of a head are round: upright and turned fit the mean about equally
# (Kaggle test slices down to -0.0042), while turned slices fall to -0.09 (see above).
ORIENTATION_SLACK = 0.005
#: What an operator or client can do about each rule that fails (after its numbers).
ADVICE = {
    "orientation": "it matches the training slices better turned or upside down than as "
    "sent: send the slice upright as exported, or it is not the anatomy the model saw",
    "fine_texture": "grainier than any training slice: a scanner or dataset the model "
    "was not trained on",
}
THUMBNAILS_FILE = "training_thumbnails.npz"


# --------------------------------------------------------------------------- contract


class Bound(BaseModel):
    """Allowed range of one feature; ``None`` on a side means unbounded there."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    low: float | None = None
    high: float | None = None


class InputCheckSpec(BaseModel):
    """What is stored with a model: the bounds and what they were fitted on (JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    version: int = 1
    n_images: int = Field(ge=1)
    sizes: dict[str, int] = Field(description="HxW of the training images -> count.")
    network_input: tuple[int, int]
    min_side: int = Field(ge=1)
    bounds: dict[str, Bound]
    training_ranges: dict[str, tuple[float, float]] = Field(
        description="0.5th and 99.5th percentile of each feature on the training images."
    )
    mean_thumbnail: list[list[float]] = Field(description="Mean 32x32 training thumbnail.")
    seen_threshold: float = SEEN_THRESHOLD


@dataclass(frozen=True)
class InputCheck:
    """The verdict for one input: usable or not, and whether training saw it."""

    out_of_distribution: bool
    reason: str  # every failed rule, "; "-joined; "" when in distribution
    seen_in_training: bool
    training_correlation: float  # highest correlation with a training thumbnail

    def as_dict(self) -> dict[str, Any]:
        return {
            "out_of_distribution": self.out_of_distribution,
            "ood_reason": self.reason,
            "seen_in_training": self.seen_in_training,
            "training_correlation": round(self.training_correlation, 6),
        }


# --------------------------------------------------------------------------- features


def mean_correlations(thumbs: np.ndarray, mean_thumbnail: np.ndarray) -> np.ndarray:
    """Correlation of each 32x32 thumbnail with the training mean slice."""
    template = correlation_rows(np.asarray(mean_thumbnail, dtype=np.float32)[None])[0]
    return correlation_rows(thumbs) @ template


def template_features(thumbs: np.ndarray, mean_thumbnail: np.ndarray) -> dict[str, np.ndarray]:
    """``mean_correlation`` and ``orientation`` of each 32x32 thumbnail.

    ``orientation`` is the correlation with the mean slice minus the best correlation
    with one of its :data:`POSES`: positive when the thumbnail is upright like the
    training slices. Thumbnails are square, so a turned portrait slice's thumbnail is
    the turned thumbnail of the upright slice and the comparison is fair.
    """
    mean = np.asarray(mean_thumbnail, dtype=np.float32)
    upright = mean_correlations(thumbs, mean)
    turned = np.stack([mean_correlations(thumbs, pose(mean)) for pose in POSES.values()])
    return {"mean_correlation": upright, "orientation": upright - turned.max(axis=0)}


# --------------------------------------------------------------------------- fitting


def _bounds(ranges: dict[str, tuple[float, float]]) -> dict[str, Bound]:
    """Training ranges widened into the rules (the margins the module docstring gives)."""
    r = ranges
    out = {
        # Within 1.5x of the training shapes: a square export passes, a 4:3 photo fails.
        "aspect": Bound(low=r["aspect"][0] / 1.5, high=r["aspect"][1] * 1.5),
        # A third of the dullest training slice: darker scanners pass, constant images fail.
        "contrast": Bound(low=r["contrast"][0] / 3),
        # Half the smallest brain up to halfway to a full frame.
        "foreground_fraction": Bound(
            low=r["foreground_fraction"][0] / 2,
            high=r["foreground_fraction"][1] + (1 - r["foreground_fraction"][1]) / 2,
        ),
        "border_brightness": Bound(high=r["border_brightness"][1] + 0.15),
        "foreground_texture": Bound(
            low=r["foreground_texture"][0] / 1.5, high=r["foreground_texture"][1] * 2
        ),
        # 0.3 below the least typical training slice (rotated or padded slices still pass).
        "mean_correlation": Bound(low=r["mean_correlation"][0] - 0.3),
    }
    if "orientation" in r:  # no pose beats upright by more than ORIENTATION_SLACK
        out["orientation"] = Bound(low=min(0.0, r["orientation"][0]) - ORIENTATION_SLACK)
    if "fine_texture" in r:  # measured by the decode stage since issue 24
        out["fine_texture"] = Bound(high=r["fine_texture"][1] * 1.25)
    return out


def fit_reference(
    features: Sequence[dict[str, float]],
    thumbs: np.ndarray,
    sizes: Sequence[tuple[int, int]],
    network_input: tuple[int, int],
) -> InputCheckSpec:
    """Fit the check on the training images' features, thumbnails and (H, W) sizes."""
    if len(features) == 0:
        raise AlzstageError("no training images to fit the input check on; re-run the split stage")
    mean = np.asarray(thumbs, dtype=np.float32).mean(axis=0)
    # A feature the features lack (a pixel store written before it existed) is not fitted.
    names = [k for k in FEATURES[:-1] if all(k in f for f in features)]
    table = {k: np.array([f[k] for f in features], dtype=np.float64) for k in names}
    for k, v in template_features(thumbs, mean).items():
        table[k] = v.astype(np.float64)
    ranges = {
        k: (float(np.percentile(v, 0.5)), float(np.percentile(v, 99.5))) for k, v in table.items()
    }
    counts: dict[str, int] = {}
    for h, w in sizes:
        counts[f"{h}x{w}"] = counts.get(f"{h}x{w}", 0) + 1
    smallest = min(min(s) for s in sizes)
    return InputCheckSpec(
        n_images=len(features),
        sizes=counts,
        network_input=(int(network_input[0]), int(network_input[1])),
        min_side=max(1, min(smallest, *network_input) // 2),
        bounds=_bounds(ranges),
        training_ranges={k: (round(lo, 6), round(hi, 6)) for k, (lo, hi) in ranges.items()},
        mean_thumbnail=np.round(mean, 2).tolist(),
    )


def _describe(path: Path) -> tuple[dict[str, float], np.ndarray, tuple[int, int]]:
    from alzstage.data.images import decode_slice

    # Any format Pillow reads: these are the project's own validated training files.
    gray = decode_slice(path, max_pixels=2**31, formats=None).gray
    return image_features(gray), thumbnail(gray), (int(gray.shape[0]), int(gray.shape[1]))


def fit_from_files(
    files: Sequence[Path], network_input: tuple[int, int]
) -> tuple[InputCheckSpec, np.ndarray]:
    """Decode the training files once (threads) and fit: (spec, uint8 thumbnails (N, 32, 32)).

    Only per-image features and thumbnails are kept, so memory does not grow with the
    image size (a few KB per image).
    """
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        described = list(pool.map(_describe, [Path(f) for f in files]))
    if not described:
        raise AlzstageError("no training images to fit the input check on; re-run the split stage")
    features = [d[0] for d in described]
    thumbs = np.stack([d[1] for d in described])
    sizes = [d[2] for d in described]
    return fit_reference(features, thumbs, sizes, network_input), thumbs


def training_paths(split_file: Path) -> list[str]:
    """The ``train`` rows' paths of ``split.csv``: the originals, not the augmented views.

    Validation images are left out: they steer early stopping and calibration but are
    not learned from, so "seen in training" means the images the weights were fitted to.
    """
    from alzstage.artifacts import read_split

    split = read_split(split_file)
    return split.loc[split["split"] == "train", "path"].tolist()


def fit_from_split(
    split_file: Path, raw_dir: Path, network_input: tuple[int, int]
) -> tuple[InputCheckSpec, np.ndarray]:
    """:func:`fit_from_files` on the :func:`training_paths` of ``split.csv`` under ``raw_dir``."""
    files = [Path(raw_dir) / p for p in training_paths(split_file)]
    return fit_from_files(files, network_input)


def fit_from_pixels(
    split_file: Path, store: PixelStore, network_input: tuple[int, int]
) -> tuple[InputCheckSpec, np.ndarray]:
    """:func:`fit_from_split` from what the decode stage measured: no file is opened.

    The store holds each image's :func:`image_features`, native size and 32x32
    :func:`thumbnail`, measured on the full-size file exactly as :func:`_describe` does.
    """
    rows = training_paths(split_file)
    features, sizes = store.input_features_for(rows)
    thumbs = store.thumbnails_for(rows, THUMB_SIZE)
    return fit_reference(features, thumbs, sizes, network_input), thumbs


# --------------------------------------------------------------------------- checking


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def failed_rules(
    features: dict[str, float], size: tuple[int, int], spec: InputCheckSpec
) -> list[str]:
    """A sentence per rule that ``features`` of an (H, W) image break; [] when none."""
    h, w = size
    if min(h, w) < spec.min_side:
        sizes = ", ".join(spec.sizes)
        return [
            f"image is {w}x{h} pixels (WxH), smaller than {spec.min_side} px on a side; the "
            f"model was trained on HxW {sizes}: send the slice at its exported resolution"
        ]
    out = []
    for name in CHECK_FEATURES:
        b = spec.bounds.get(name)
        if b is None or name not in features:
            continue
        v = features[name]
        lo, hi = spec.training_ranges.get(name, (float("nan"), float("nan")))
        too_low = b.low is not None and v < b.low
        too_high = b.high is not None and v > b.high
        if too_low or too_high:
            limit = f"below {_fmt(b.low or 0)}" if too_low else f"above {_fmt(b.high or 0)}"
            advice = f": {ADVICE[name]}" if name in ADVICE else ""
            out.append(
                f"{name.replace('_', ' ')} {_fmt(v)} is {limit} "
                f"(training images: {_fmt(lo)} to {_fmt(hi)}){advice}"
            )
    return out


def check_features(
    features: dict[str, float], size: tuple[int, int], spec: InputCheckSpec
) -> tuple[bool, str]:
    """(out of distribution?, reason) for one image's features and its native size."""
    reasons = failed_rules(features, size, spec)
    if reasons:
        return True, "not like the training MRI slices: " + "; ".join(reasons)
    return False, ""


class InputGuard:
    """The stored check and training thumbnails of one model, applied to new images.

    The thin stateful wrapper over the functions above (like MONAI's metric classes):
    built once per loaded model, then ``check`` per batch.
    """

    def __init__(self, spec: InputCheckSpec, training_thumbnails: np.ndarray | None) -> None:
        self.spec = spec
        self._mean = np.asarray(spec.mean_thumbnail, dtype=np.float32)
        thumbs = (
            np.zeros((0, THUMB_SIZE, THUMB_SIZE), dtype=np.uint8)
            if training_thumbnails is None
            else np.asarray(training_thumbnails)
        )
        self._pool = correlation_rows(thumbs)

    @property
    def n_thumbnails(self) -> int:
        """Training thumbnails the leak guard compares against (0: guard off)."""
        return len(self._pool)

    @classmethod
    def from_meta(cls, meta: dict[str, Any], thumbnails_file: Path | None) -> InputGuard | None:
        """The guard of a model whose ``meta.json`` holds ``input_check``; None if it has none.

        Models trained before the check existed have none: they are served unchecked,
        and the results say so (``out_of_distribution`` is null).
        """
        raw = meta.get("input_check")
        if raw is None:
            return None
        try:
            spec = InputCheckSpec.model_validate(raw)
        except ValidationError as exc:
            raise AlzstageError(
                f"meta.json input_check: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}; "
                "re-run `alzstage train` to store a fresh one"
            ) from None
        thumbs = load_thumbnails_file(thumbnails_file) if thumbnails_file else None
        return cls(spec, thumbs)

    def check(
        self, grays: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]] | None = None
    ) -> list[InputCheck]:
        """One verdict per uint8 (H, W) image; ``sizes`` are the native (H, W) when
        ``grays`` were downscaled while decoding (default: the arrays' own shapes)."""
        if len(grays) == 0:
            return []
        sizes = list(sizes) if sizes is not None else [g.shape[:2] for g in grays]
        thumbs = np.stack([thumbnail(g) for g in grays])
        template = template_features(thumbs, self._mean)
        best, _ = most_correlated(correlation_rows(thumbs), self._pool)
        out = []
        for i, (g, size, b) in enumerate(zip(grays, sizes, best, strict=True)):
            features = image_features(g)
            features.update({k: float(v[i]) for k, v in template.items()})
            ood, reason = check_features(features, (int(size[0]), int(size[1])), self.spec)
            corr = max(float(b), 0.0) if len(self._pool) else 0.0
            out.append(
                InputCheck(
                    out_of_distribution=ood,
                    reason=reason,
                    seen_in_training=bool(len(self._pool)) and corr >= self.spec.seen_threshold,
                    training_correlation=corr,
                )
            )
        return out


def save_thumbnails_file(path: Path, thumbs: np.ndarray) -> None:
    """The training thumbnails as uint8 in a compressed ``.npz`` (about 1 KB per image)."""
    np.savez_compressed(path, thumbnails=np.asarray(thumbs, dtype=np.uint8))


def load_thumbnails_file(path: Path) -> np.ndarray:
    try:
        with np.load(path) as data:
            thumbs = np.asarray(data["thumbnails"], dtype=np.uint8)
    except (OSError, KeyError, ValueError) as exc:
        raise AlzstageError(
            f"{path}: the model's training thumbnails cannot be read ({exc}); re-run "
            "`alzstage train` to store fresh ones"
        ) from None
    if thumbs.ndim != 3 or thumbs.shape[1:] != (THUMB_SIZE, THUMB_SIZE):
        raise AlzstageError(
            f"{path}: training thumbnails have shape {thumbs.shape}, expected "
            f"(n, {THUMB_SIZE}, {THUMB_SIZE}); re-run `alzstage train`"
        )
    return thumbs
