"""Subject-level prediction from a NIfTI volume: slices in, one stage out.

A volume is preprocessed into the training slice format (:mod:`alzstage.neuro`), every
slice goes through the same model as an uploaded JPEG, and the slice probabilities are
pooled into one stage with ``neuro.aggregate`` (:func:`alzstage.model.metrics.pool_slices`;
mean log-probability by default, the rule the evaluate stage's subject-level metrics use).

Grad-CAM is drawn on the *most informative* slices: those that give the subject's stage
the highest probability, i.e. the slices whose evidence the pooled decision rests on.
They explain the subject's stage, not each slice's own argmax, so a reader sees why the
volume got its label.

Shared by ``alzstage predict`` and the REST API, so both give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alzstage.model.explain import overlay_writer
from alzstage.model.inputs import ImageReadError, to_model_array
from alzstage.model.prediction import SlicePrediction, VolumePrediction, failed, scored

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.config import NeuroParams, NiftiQCParams, Params
    from alzstage.model.predict import LoadedModel
    from alzstage.neuro.preprocess import Preprocessed


@dataclass
class PredictedVolume:
    """One volume's slices, their probabilities, the pooled ones and what explains them:
    the arrays a :class:`~alzstage.model.prediction.VolumePrediction` is made from."""

    file: str
    classes: list[str]
    rule: str
    probabilities: np.ndarray  # (k,) pooled
    slice_probabilities: np.ndarray  # (n, k)
    z_mm: np.ndarray  # (n,) MNI z of each slice
    slices: np.ndarray  # uint8 (n, H, W) in the training image format
    informative: list[int]  # slice indices, most informative first
    overlays: dict[int, np.ndarray] = field(default_factory=dict)  # slice -> RGB Grad-CAM
    qc: dict[str, Any] = field(default_factory=dict)

    @property
    def stage_index(self) -> int:
        return int(np.argmax(self.probabilities))

    @property
    def stage(self) -> str:
        return self.classes[self.stage_index]

    @property
    def confidence(self) -> float:
        return float(self.probabilities[self.stage_index])


def informative_slices(slice_probs: np.ndarray, stage: int, n: int) -> list[int]:
    """The ``n`` slices that give ``stage`` the highest probability (ties: lower index)."""
    p = np.asarray(slice_probs)[:, stage]
    order = np.lexsort((np.arange(len(p)), -p))
    return [int(i) for i in order[: max(0, n)]]


def preprocess_for_prediction(
    source: Path | bytes,
    neuro: NeuroParams,
    qc: NiftiQCParams,
    image_size: tuple[int, int],
    name: str,
) -> Preprocessed:
    """Preprocess a volume with the ``validate.nifti`` rules enforced (fail fast).

    Separate from :func:`predict_preprocessed` so a server can run this CPU-heavy part
    outside the lock that serialises model calls.
    """
    from alzstage.neuro.preprocess import preprocess_volume
    from alzstage.neuro.qc import volume_rules

    return preprocess_volume(
        source, neuro.preprocess, image_size, name=name, rules=volume_rules(qc)
    )


def predict_preprocessed(
    model: LoadedModel, pre: Preprocessed, neuro: NeuroParams, name: str, gradcam: bool = True
) -> PredictedVolume:
    """Predict every slice, pool them, and explain the most informative slices."""
    from alzstage.model.metrics import pool_slices

    arrays = np.stack([to_model_array(s, model.size) for s in pre.slices])
    probs = np.asarray(model.predict(arrays), dtype=np.float64)
    pooled = pool_slices(probs, neuro.aggregate)
    stage = int(np.argmax(pooled))
    chosen = informative_slices(probs, stage, neuro.gradcam_slices)
    overlays: dict[int, np.ndarray] = {}
    if gradcam and chosen:
        from alzstage.model.explain import gradcam as gradcam_maps
        from alzstage.model.explain import overlay

        maps = gradcam_maps(model.keras_model, arrays[chosen], class_index=stage)
        overlays = {i: overlay(pre.slices[i], m) for i, m in zip(chosen, maps, strict=True)}
    return PredictedVolume(
        file=name,
        classes=list(model.classes),
        rule=neuro.aggregate,
        probabilities=pooled,
        slice_probabilities=probs,
        z_mm=np.asarray(pre.z_mm, dtype=np.float64),
        slices=pre.slices,
        informative=chosen,
        overlays=overlays,
        qc=pre.qc,
    )


def predict_volume(
    model: LoadedModel,
    source: Path | bytes,
    params: Params,
    name: str | None = None,
    gradcam: bool = True,
) -> PredictedVolume:
    """Preprocess, predict every slice, pool, and explain the most informative slices.

    Raises :class:`~alzstage.neuro.errors.VolumeError` (an ``ImageReadError``) when the
    volume breaks a ``validate.nifti`` rule or cannot be preprocessed.
    """
    name = name or str(source if isinstance(source, Path) else "upload")
    pre = preprocess_for_prediction(
        source, params.neuro, params.validate_.nifti, params.base.image_size, name
    )
    return predict_preprocessed(model, pre, params.neuro, name, gradcam)


def volume_prediction(
    pred: PredictedVolume,
    index: int,
    name: str,
    low_confidence: float,
    slice_image: Callable[[np.ndarray], str] | None = None,
    overlay_to: Callable[[int, np.ndarray], str] | None = None,
) -> VolumePrediction:
    """The typed result of a predicted volume, with every slice's own stage.

    ``slice_image`` stores each slice's pixels (the API: a data URL; the CLI: none) and
    ``overlay_to`` each informative slice's Grad-CAM (a data URL, or a PNG file), called
    most informative first.
    """
    overlays = {} if overlay_to is None else pred.overlays
    cams = {i: overlay_to(i, overlays[i]) for i in pred.informative if i in overlays}
    slices = []
    for i, (z, p) in enumerate(zip(pred.z_mm, pred.slice_probabilities, strict=True)):
        own = scored(pred.classes, p, low_confidence)
        slices.append(
            SlicePrediction(
                index=i,
                z_mm=round(float(z), 2),
                stage=own["stage"],
                confidence=own["confidence"],
                probabilities=own["probabilities"],
                informative=i in pred.informative,
                image=None if slice_image is None else slice_image(pred.slices[i]),
                gradcam=cams.get(i),
            )
        )
    return VolumePrediction(
        index=index,
        filename=name,
        status=200,
        **scored(pred.classes, pred.probabilities, low_confidence),
        aggregate=pred.rule,
        n_slices=len(pred.slices),
        registration_score=pred.qc.get("registration_score"),
        qc={k: v for k, v in pred.qc.items() if isinstance(v, (int, float, str))},
        slices=slices,
    )


def volume_stem(path: Path) -> str:
    """``sub-01`` for ``sub-01.nii.gz`` or ``sub-01.nii``: the name overlays are given."""
    stem = path.name
    for suffix in (".gz", ".nii"):
        stem = stem.removesuffix(suffix).removesuffix(suffix.upper())
    return stem


def _slice_files(
    write: Callable[[str, np.ndarray], str], stem: str
) -> Callable[[int, np.ndarray], str]:
    """Write slice ``k``'s overlay as ``<stem>.sNNN.gradcam.png``."""
    return lambda k, rgb: write(f"{stem}.s{k:03d}", rgb)


def predict_volume_files(
    model: LoadedModel,
    files: list[Path],
    params: Params,
    low_confidence: float,
    gradcam_dir: Path | None = None,
) -> list[VolumePrediction]:
    """One result per volume, in order; a volume that fails gets its error and the
    others continue.

    With ``gradcam_dir``, each informative slice's overlay is written there as
    ``<volume>.sNNN.gradcam.png`` (never overwriting) and named in its slice's ``gradcam``.
    """
    write = None if gradcam_dir is None else overlay_writer(gradcam_dir)
    results = []
    for i, f in enumerate(files):
        try:
            pred = predict_volume(model, Path(f), params, str(f), gradcam=write is not None)
        except ImageReadError as exc:
            results.append(failed(i, str(f), exc, VolumePrediction))
            continue
        overlay_to = None if write is None else _slice_files(write, volume_stem(Path(f)))
        results.append(volume_prediction(pred, i, str(f), low_confidence, None, overlay_to))
    return results
