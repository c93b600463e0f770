"""Scored test splits the evaluate tests share: slices, a report, a baselines body."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alzstage.evaluate.report import build_report, json_safe

CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]
REPO = Path(__file__).resolve().parents[2]


def make_slices(n_subjects: int = 12, slices: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    y_subj = np.arange(n_subjects) % 4
    y = np.repeat(y_subj, slices)
    subjects = np.repeat([f"s{i}" for i in range(n_subjects)], slices)
    logits = rng.normal(0, 1, (len(y), 4))
    logits[np.arange(len(y)), y] += 1.5
    logits *= 4  # over-confident
    p = np.exp(logits - logits.max(1, keepdims=True))
    return y, p / p.sum(1, keepdims=True), subjects


def make_report(subjects=True, **kw) -> dict:
    y, p, s = make_slices()
    return build_report(
        y,
        p,
        CLASSES,
        temperature=kw.pop("temperature", 2.0),
        temperature_source="validation",
        subjects=s if subjects else None,
        subject_ids="given",
        seed=0,
        n_resamples=kw.pop("n_resamples", 200),
    )


def make_baselines(pixel_beaten: bool) -> dict:
    """A baselines.json body: the network beats majority, and the pixel model or not."""
    from alzstage.evaluate.baselines import compare_with_baselines

    y = np.repeat(np.arange(4), 6)
    subjects = np.repeat([f"s{i}" for i in range(8)], 3)
    network = y.copy()
    network[::2] = 0  # right on half the slices of each class but NonDemented
    pixel = y if not pixel_beaten else (y + 1) % 4
    return json_safe(
        compare_with_baselines(
            y,
            network,
            {"majority": np.zeros_like(y), "pixel": pixel},
            subjects,
            CLASSES,
            seed=0,
            n_resamples=200,
        )
    )


# The keys reports/metrics.json has always had (older readers depend on them).
LEGACY_KEYS = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "per_class",
    "confusion_matrix",
    "n_test",
)
