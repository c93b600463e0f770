"""What the model card prints: the context ``card.md.j2`` is rendered with.

:func:`alzstage.evaluate.card.card_context` fills it from the reports. Every figure is
already formatted as the card prints it (``"0.722"``, ``"n/a"``, ``"+0.375"``) and every
choice the card makes is taken (a ``None`` section is left out, a verdict is a kind), so
the template holds the words and the layout, and nothing here holds a sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Row = list[str]  # one table row, every cell as printed


@dataclass(frozen=True)
class Figure:
    """One figure and its 95% interval, as printed (``n/a`` when missing)."""

    value: str
    ci: str = ""


@dataclass(frozen=True)
class ModelFacts:
    classes: list[str]
    backbone: str
    weights: str
    input_size: str  # "128x128"
    recipe: str
    temperature: str
    temperature_source: str
    model_md5: str
    seed: str


@dataclass(frozen=True)
class DataFacts:
    source: str
    reference: str
    n_images: str
    subject_ids: str
    fingerprint: str
    strategy: str
    leaky: bool
    test_size: str
    val_size: str
    split_rows: list[Row]  # images / subjects per split and class; empty: no counts


@dataclass(frozen=True)
class Performance:
    n_test: str
    method: str
    n_resamples: str
    n_units: str
    unit: str
    seed: str
    balanced_accuracy: Figure
    macro_f1: Figure
    accuracy: Figure
    kappa: str
    roc_auc: str
    pr_auc: str
    class_rows: list[Row]


@dataclass(frozen=True)
class SubjectLevel:
    aggregation: str
    n_subjects: str
    subject_ids: str
    balanced_accuracy: Figure
    macro_f1: Figure
    accuracy: Figure
    kappa: str
    per_class: str  # "NonDemented 3, VeryMildDemented 3, ..."


@dataclass(frozen=True)
class BrainVerdict:
    """The brain model against one other predictor, on the main classes."""

    what: str
    kind: Literal["beats", "worse", "includes 0", "no interval"]
    difference: str = ""
    ci: str = ""


@dataclass(frozen=True)
class Conformal:
    available: bool
    reason: str = ""
    chosen: str = ""
    nominal: str = ""
    coverage: str = ""
    n: str = ""
    mean_set_size: str = ""
    calibration_brains: str = ""


@dataclass(frozen=True)
class Binary:
    n_brains: str
    sensitivity: Figure
    specificity: Figure
    roc_auc: Figure


@dataclass(frozen=True)
class BrainLevel:
    scored: bool
    reason: str = ""
    aggregator: str = ""
    features: str = ""
    n_brains: str = ""
    n_resamples: str = ""
    main: str = ""
    rows: list[Row] | None = None
    verdicts: list[BrainVerdict] | None = None
    conformal: Conformal | None = None
    binary: Binary | None = None


@dataclass(frozen=True)
class Baselines:
    n_test: str
    fitted: bool  # False for pooled out-of-fold predictions: no n_train to name
    n_train: str
    n_pixels: str
    method: str
    n_units: str
    unit: str
    n_resamples: str
    level: str  # "95%"
    rows: list[Row]
    verdicts: list[str]


@dataclass(frozen=True)
class Calibration:
    temperature: str
    source: str
    n_bins: str
    rows: list[Row]


@dataclass(frozen=True)
class Limitations:
    """The caveats that follow from this particular run's data, split and model."""

    few_threshold: int
    few_subjects: str  # "ModerateDemented (1)"; "" when every class has enough
    absent: str
    auc_skipped: str
    pseudo_ids: bool
    no_subject_ids: bool
    no_pretrained_weights: bool
    demo_data: bool
    calibrated: bool
    temperature: str
    temperature_bound: Literal["top", "bottom", ""]
    search_range: str


@dataclass(frozen=True)
class CardContext:
    """Everything the template prints; ``None`` leaves a section out."""

    notice: str
    leakage: str  # the caveat; "" for a subject-disjoint split
    split_warning: str
    pixel_verdict: str  # "" unless the network does not beat the pixel baseline
    model: ModelFacts
    data: DataFacts
    performance: Performance
    subject: SubjectLevel | None
    brain: BrainLevel | None
    baselines: Baselines | None
    calibration: Calibration | None
    limitations: Limitations
