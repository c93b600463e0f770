"""Brain-level prediction: a NIfTI volume, or a folder of one brain's slices, gives one
stage and its conformal set.

A volume is preprocessed into the training slice format (:mod:`alzstage.neuro`); a
folder (or an API upload) of one brain's JPEG/PNG slices is decoded as ``predict``
decodes any slice, and the input check leaves out the files unlike the training slices
(listed, with why). Every slice goes through the same model as an uploaded JPEG, and
:func:`alzstage.inference.brain.brain_answer` turns the brain's slices into one
stage: the brain model stored with the network, on the slices' probabilities and their
full-size atrophy measurements, with its conformal set. The fixed pooling rule
``neuro.aggregate`` (:func:`alzstage.model.metrics.pool_slices`) stays beside it as
the reference (``pooled_stage``), and gives the stage for a model stored without a
brain model.

Grad-CAM is drawn on the *most informative* slices: those that give the brain's stage
the highest probability, i.e. the slices whose evidence the decision rests on. They
explain the brain's stage, not each slice's own argmax, so a reader sees why the brain
got its label.

Shared by ``alzstage predict`` and the REST API, so both give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alzstage.data.images import display_image, to_model_array
from alzstage.errors import ImageReadError
from alzstage.inference.brain import BrainAnswer, brain_answer
from alzstage.inference.gradcam import overlay_writer
from alzstage.inference.prediction import SlicePrediction, VolumePrediction, failed, scored

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.config import NeuroParams, NiftiQCParams, Params
    from alzstage.data.images import DecodedImage
    from alzstage.inference.loading import LoadedModel
    from alzstage.inference.ood import InputCheck
    from alzstage.neuro.preprocess import Preprocessed


@dataclass
class PredictedVolume:
    """One volume's slices, their probabilities, the brain-level answer and what explains
    it: the arrays a :class:`~alzstage.inference.prediction.VolumePrediction` is made from."""

    file: str
    classes: list[str]
    rule: str
    brain: BrainAnswer  # the brain model's stage and set, with the pooled reference
    slice_probabilities: np.ndarray  # (n, k)
    z_mm: np.ndarray  # (n,) MNI z of each slice
    slices: np.ndarray  # uint8 (n, H, W) in the training image format
    informative: list[int]  # slice indices, most informative first
    overlays: dict[int, np.ndarray] = field(default_factory=dict)  # slice -> RGB Grad-CAM
    qc: dict[str, Any] = field(default_factory=dict)

    @property
    def probabilities(self) -> np.ndarray:
        """(k,) the brain-level probabilities (the brain model's)."""
        return self.brain.probabilities

    @property
    def pooled(self) -> np.ndarray:
        """(k,) the fixed pooling rule's probabilities, the reference."""
        return self.brain.pooled

    @property
    def stage_index(self) -> int:
        return self.brain.stage_index

    @property
    def stage(self) -> str:
        return self.brain.stage

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
    """Predict every slice, give the brain its stage and set, explain the most
    informative slices.

    The atrophy measurements are taken on ``pre.slices`` (uint8 at the training image
    size, 208x176), the images the decode stage measured the training brains on, not
    on the network's smaller input.
    """
    arrays = np.stack([to_model_array(s, model.size) for s in pre.slices])
    probs = np.asarray(model.predict(arrays), dtype=np.float64)
    answer = brain_answer(
        model.brain_model, model.classes, probs, list(pre.slices), neuro.aggregate
    )
    chosen = informative_slices(probs, answer.stage_index, neuro.gradcam_slices)
    overlays: dict[int, np.ndarray] = {}
    if gradcam and chosen:
        overlays = dict(
            zip(chosen, _overlays(model, arrays[chosen], pre.slices[chosen], answer), strict=True)
        )
    return PredictedVolume(
        file=name,
        classes=list(model.classes),
        rule=neuro.aggregate,
        brain=answer,
        slice_probabilities=probs,
        z_mm=np.asarray(pre.z_mm, dtype=np.float64),
        slices=pre.slices,
        informative=chosen,
        overlays=overlays,
        qc=pre.qc,
    )


def _overlays(
    model: LoadedModel, arrays: np.ndarray, display: Sequence[np.ndarray], answer: BrainAnswer
) -> list[np.ndarray]:
    """Grad-CAM of the brain's stage on each network input, drawn on its display image."""
    from alzstage.inference.gradcam import gradcam as gradcam_maps
    from alzstage.inference.gradcam import overlay

    maps = gradcam_maps(model.keras_model, arrays, class_index=answer.stage_index)
    return [overlay(d, m) for d, m in zip(display, maps, strict=True)]


def predict_volume(
    model: LoadedModel,
    source: Path | bytes,
    params: Params,
    name: str | None = None,
    gradcam: bool = True,
) -> PredictedVolume:
    """Preprocess, predict every slice, pool, and explain the most informative slices.

    Raises :class:`~alzstage.errors.VolumeError` (an ``ImageReadError``) when the
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
        kind="volume",
        **pred.brain.fields(low_confidence),
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


# --------------------------------------------------------------------------- one brain's files


def predict_brain_slices(
    model: LoadedModel,
    decoded: Sequence[tuple[int, str, DecodedImage]],
    unreadable: Sequence[tuple[int, str, str]],
    name: str,
    neuro: NeuroParams,
    low_confidence: float,
    *,
    index: int = 0,
    slice_image: Callable[[np.ndarray], str] | None = None,
    overlay_to: Callable[[int, np.ndarray], str] | None = None,
    lock: AbstractContextManager[Any] | None = None,
) -> VolumePrediction:
    """One brain from its slice files: ``decoded`` ``(index, file, image)`` and the
    files that could not be read, ``(index, file, why)``.

    Files the input check judges out of distribution are left out of the brain (a
    non-MRI image would otherwise move the brain's stage) and, like unreadable ones,
    listed among the slices with why. The atrophy measurements are taken on the decoded
    images (their own size, up to twice ``DISPLAY_MAX_SIDE``), not on the network input.
    ``overlay_to(index, rgb)`` stores the Grad-CAM of the brain's stage on each
    informative slice; ``lock`` is held around the model calls only (the server shares
    one model).
    """
    grays = [image.gray for *_, image in decoded]
    checks = model.check(grays, [(image.height, image.width) for *_, image in decoded])
    left = {i: SlicePrediction(index=i, filename=f, left_out=why) for i, f, why in unreadable}
    usable: list[tuple[int, str, np.ndarray, InputCheck | None]] = []
    for (i, f, image), check in zip(decoded, checks, strict=True):
        if check is not None and check.out_of_distribution:
            reason = f"out of distribution: {check.reason}"
            left[i] = SlicePrediction(
                index=i, filename=f, out_of_distribution=True, left_out=reason
            )
        else:
            usable.append((i, f, image.gray, check))
    n = len(decoded) + len(unreadable)
    if not usable:
        return _no_usable_slice(index, name, n, left)
    arrays = np.stack([to_model_array(g, model.size) for _, _, g, _ in usable])
    with lock or nullcontext():
        probs = np.asarray(model.predict(arrays), dtype=np.float64)
    answer = brain_answer(
        model.brain_model, model.classes, probs, [g for _, _, g, _ in usable], neuro.aggregate
    )
    chosen = informative_slices(probs, answer.stage_index, neuro.gradcam_slices)
    cams: dict[int, str] = {}
    if overlay_to is not None and chosen:
        with lock or nullcontext():
            pictures = _overlays(
                model, arrays[chosen], [display_image(usable[j][2]) for j in chosen], answer
            )
        cams = {
            usable[j][0]: overlay_to(usable[j][0], rgb)
            for j, rgb in zip(chosen, pictures, strict=True)
        }
    slices = dict(left)
    for j, ((i, f, gray, check), p) in enumerate(zip(usable, probs, strict=True)):
        own = scored(model.classes, p, low_confidence)
        own.pop("low_confidence")
        slices[i] = SlicePrediction(
            index=i,
            filename=f,
            **own,
            informative=j in chosen,
            out_of_distribution=None if check is None else False,
            image=None if slice_image is None else slice_image(display_image(gray)),
            gradcam=cams.get(i),
        )
    return VolumePrediction(
        index=index,
        filename=name,
        status=200,
        kind="brain",
        **answer.fields(low_confidence),
        aggregate=answer.rule,
        n_slices=n,
        slices=[slices[i] for i in sorted(slices)],
    )


def _no_usable_slice(
    index: int, name: str, n: int, left: dict[int, SlicePrediction]
) -> VolumePrediction:
    """A brain none of whose files could be used: one line saying why and what to do."""
    ood = sum(bool(s.out_of_distribution) for s in left.values())
    first = left[min(left)].left_out if left else ""
    error = (
        f"{name}: none of its {n} slice file(s) can be used ({ood} out of distribution, "
        f"{n - ood} unreadable; e.g. {first}); give the folder of one brain's axial MRI "
        "slices, as exported (JPEG/PNG)"
    )
    return VolumePrediction(index=index, filename=name, status=422, kind="brain", error=error)
