"""One brain's slices in, one brain-level answer out: stage, probabilities, conformal set.

Users ask about a brain, not a slice. Whichever way the slices arrive (a NIfTI volume cut
into the training format, a folder of one brain's JPEG/PNG slices, an API upload, the
MLflow pyfunc with ``params={"brain": True}``), the answer is made here, the same way:

1. the network's calibrated slice probabilities and each slice's atrophy measurements
   (:func:`~alzstage.data.morphometry.slice_morphometry`) form a one-brain
   :class:`~alzstage.model.brain.BrainTable`. The measurements are taken on the slice
   *as given* (full size), never on the network's input: the CSF fraction loses most of
   its signal at 56x48 (docs/models.md), and the decode stage measured the training
   slices at full size too;
2. the brain model stored with the network (``meta["brain_model"]``, fitted by
   ``train``) gives the brain's probabilities and, when it was calibrated, its conformal
   set ("VeryMildDemented or MildDemented (90%)").

A model logged before the brain model existed has none: the fixed pooling rule then
gives the stage, with no set, and every answer says so (:data:`NO_BRAIN_MODEL`). The
pooled rule's stage is always kept beside the brain model's, as the reference a reader
can compare with.

Pure numpy on top of :mod:`alzstage.model.brain`: no Keras, no files, so the pyfunc,
``predict`` and the API give the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from alzstage.data.morphometry import MORPH_FEATURES, slice_morphometry
from alzstage.inference.prediction import NO_BRAIN_MODEL, NO_BRAIN_MODEL_NOTE, scored
from alzstage.model.brain import BrainModel, brain_table
from alzstage.model.conformal import describe_set

__all__ = ["NO_BRAIN_MODEL", "NO_BRAIN_MODEL_NOTE", "BrainAnswer", "brain_answer"]


def brain_model_from_meta(meta: dict[str, Any]) -> BrainModel | None:
    """The brain model a pyfunc's ``meta.json`` carries; None for a model logged before
    brain models existed (or one whose entry is not a brain model)."""
    stored = meta.get("brain_model")
    if not stored:
        return None
    try:
        model = BrainModel.from_dict(stored)
    except (KeyError, TypeError, ValueError):
        return None
    return model if list(model.classes) == list(meta.get("classes", model.classes)) else None


def morphometry_rows(grays: Sequence[np.ndarray]) -> np.ndarray:
    """(n, len(MORPH_FEATURES)) atrophy measurements of 2-D slices, each at its own size."""
    rows = [slice_morphometry(np.asarray(g)) for g in grays]
    return np.array([[r[f] for f in MORPH_FEATURES] for r in rows], dtype=np.float64).reshape(
        len(rows), len(MORPH_FEATURES)
    )


@dataclass(frozen=True)
class BrainAnswer:
    """One brain's stage from the brain model, its set, and the pooled reference."""

    classes: list[str]
    probabilities: np.ndarray  # (k,) the brain model's (the pooled rule's without one)
    pooled: np.ndarray  # (k,) the fixed pooling rule's, the reference
    rule: str  # the pooling rule of ``pooled``
    members: list[str] | None  # the conformal set; None: no calibrated brain model
    set_confidence: float | None
    brain_model: str  # the aggregator, or NO_BRAIN_MODEL
    n_slices: int  # slices the answer rests on
    csf_fraction: float  # the brain's mean CSF fraction (what the brain model reads)

    @property
    def stage_index(self) -> int:
        return int(np.argmax(self.probabilities))

    @property
    def stage(self) -> str:
        return self.classes[self.stage_index]

    @property
    def pooled_stage(self) -> str:
        return self.classes[int(np.argmax(self.pooled))]

    @property
    def has_brain_model(self) -> bool:
        return self.brain_model != NO_BRAIN_MODEL

    @property
    def set_text(self) -> str | None:
        """``"VeryMildDemented or MildDemented (90%)"``; None without a calibrated model."""
        if self.members is None or self.set_confidence is None:
            return None
        return describe_set(self.members, self.set_confidence)

    def fields(self, low_confidence: float) -> dict[str, Any]:
        """The brain-level fields of a :class:`~alzstage.inference.prediction.VolumePrediction`."""
        return {
            **scored(self.classes, self.probabilities, low_confidence),
            "prediction_set": self.members,
            "set_confidence": self.set_confidence,
            "set_text": self.set_text,
            "brain_model": self.brain_model,
            "pooled_stage": self.pooled_stage,
            "pooled_probabilities": {
                c: float(v) for c, v in zip(self.classes, self.pooled, strict=True)
            },
            "n_slices_used": self.n_slices,
            "csf_fraction": round(self.csf_fraction, 6),
        }


def brain_answer(
    brain: BrainModel | None,
    classes: Sequence[str],
    slice_probs: np.ndarray,
    grays: Sequence[np.ndarray],
    rule: str = "mean_log",
) -> BrainAnswer:
    """The brain-level answer for one brain's usable slices.

    ``slice_probs`` (n, k) are the network's calibrated probabilities and ``grays`` the
    same n slices as 2-D arrays at the size they came in (for the atrophy measurements).
    ``rule`` is the fixed pooling rule of the reference (``neuro.aggregate``); without a
    brain model it also gives the stage. Raises ValueError for no slices or a brain
    model stored for other classes.
    """
    from alzstage.model.metrics import pool_slices

    classes = list(classes)
    probs = np.asarray(slice_probs, dtype=np.float64).reshape(-1, len(classes))
    if len(probs) == 0:
        raise ValueError("brain_answer: no usable slice; a brain needs at least one")
    if len(grays) != len(probs):
        raise ValueError(
            f"brain_answer: {len(probs)} probability rows but {len(grays)} slices; "
            "give one of each per slice"
        )
    morph = morphometry_rows(grays)
    csf = float(morph[:, MORPH_FEATURES.index("morph_csf_fraction")].mean())
    pooled = pool_slices(probs, rule)
    if brain is None:
        return BrainAnswer(
            classes, pooled, pooled, rule, None, None, NO_BRAIN_MODEL, len(probs), csf
        )
    if list(brain.classes) != classes:
        raise ValueError(
            f"the stored brain model is for classes {brain.classes}, the network for "
            f"{classes}; re-run `alzstage train`"
        )
    table = brain_table(np.full(len(probs), "brain"), probs, morph)
    p = brain.predict_proba(table)[0]
    sets = brain.sets(table)
    members = None if sets is None else [c for c, k in zip(classes, sets[0], strict=True) if k]
    return BrainAnswer(
        classes=classes,
        probabilities=np.asarray(p, dtype=np.float64),
        pooled=pooled,
        rule=rule,
        members=members,
        set_confidence=None if sets is None else float(brain.confidence),
        brain_model=brain.aggregator,
        n_slices=len(probs),
        csf_fraction=csf,
    )
