"""The params sections of the model stages: model, train, cv, brain, evaluate, promote,
and compute (the Dask cluster every stage may use).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from alzstage.params.base import _Section


class ModelParams(_Section):
    # ``auto``: ResNet50 when pretrained weights are given (the transfer recipe), the compact
    # ResNet when they are not (the from-scratch recipe); see ``resolved_backbone``.
    backbone: Literal[
        "auto",
        "resnet_compact",
        "resnet50",
        "resnet101",
        "mobilenetv2",
        "efficientnetb0",
        "densenet121",
    ] = "auto"
    weights: str = "none"
    input_size: tuple[Annotated[int, Field(ge=32)], Annotated[int, Field(ge=32)]] = (56, 48)
    dense_units: int = Field(default=128, ge=1)
    dropout: float = Field(default=0.3, ge=0, lt=1)
    # resnet_compact only: channels and basic blocks per stage (each stage after the first
    # halves the resolution). ResNet-18 is [64, 128, 256, 512] x [2, 2, 2, 2].
    widths: list[Annotated[int, Field(ge=4, le=1024)]] = Field(
        default_factory=lambda: [16, 32, 64, 128], min_length=1, max_length=6
    )
    blocks: list[Annotated[int, Field(ge=1, le=8)]] = Field(
        default_factory=lambda: [1, 1, 1, 1], min_length=1, max_length=6
    )

    @model_validator(mode="after")
    def _stages_match(self) -> ModelParams:
        if len(self.widths) != len(self.blocks):
            raise ValueError(
                f"model.widths ({len(self.widths)} stages) and model.blocks "
                f"({len(self.blocks)} stages) need one entry per stage each"
            )
        return self

    @property
    def resolved_backbone(self) -> str:
        """The backbone actually built: ``auto`` picks by whether weights are pretrained."""
        if self.backbone != "auto":
            return self.backbone
        return "resnet_compact" if self.weights == "none" else "resnet50"

    @field_validator("weights")
    @classmethod
    def _weights_value(cls, v: str) -> str:
        if v in ("imagenet", "none"):
            return v
        if not v.strip():
            raise ValueError("must be 'imagenet', 'none' or a path to a weights file")
        return v


class ScratchParams(_Section):
    """The from-scratch recipe: every layer trains, one phase, warm-up then cosine decay.

    A randomly initialised trunk has nothing worth freezing (issue 14 measured a frozen
    random ResNet50 at chance on new brains), so nothing is frozen and the schedule is the
    one from-scratch CNNs need: a short linear warm-up, cosine decay, decoupled weight
    decay, on-the-fly augmentation and early stopping on validation balanced accuracy
    (each choice measured on the real archive: docs/models.md).
    """

    epochs: int = Field(default=30, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    warmup_epochs: float = Field(default=2.0, ge=0)
    weight_decay: float = Field(default=1e-3, ge=0)
    patience: int = Field(default=10, ge=1)
    # Random shift/rotation/zoom/flip/brightness/contrast of every batch, from the augment
    # section's ranges: a new view each epoch instead of the few materialised ones. On at the
    # default 56x48, where it is what made the 5-fold CV beat the pixel baseline; at 112x96
    # it destabilised training (docs/models.md).
    online_augment: bool = True


ORDINAL_FOCAL_MESSAGE = (
    "train.loss: focal is a softmax loss and does not apply to train.head: ordinal (which "
    "trains on its own cumulative cross-entropy); set train.loss: cross_entropy or "
    "train.head: softmax"
)


class TrainParams(_Section):
    # auto: ``scratch`` when model.weights is none, ``transfer`` (the reference project's
    # two-phase ResNet50 recipe) when pretrained weights are given.
    recipe: Literal["auto", "scratch", "transfer"] = "auto"
    scratch: ScratchParams = Field(default_factory=ScratchParams)
    epochs: int = Field(default=8, ge=1)
    batch_size: int = Field(default=64, ge=1)
    learning_rate: float = Field(default=1e-3, gt=0)
    fine_tune_from: str | None = "final_block"
    fine_tune_epochs: int = Field(default=3, ge=0)
    fine_tune_learning_rate: float = Field(default=1e-4, gt=0)
    class_weight: Literal["balanced", "none"] | dict[str, float] = "balanced"
    # A class with one or two training subjects gets a huge ``balanced`` weight (25.75 for
    # the archive's ModerateDemented under the subject split), which can make the whole
    # model predict that class; the cap keeps it strong but bounded. null = no cap.
    max_class_weight: float | None = Field(default=5.0, gt=0)
    monitor: Literal["val_balanced_accuracy", "val_macro_f1"] = "val_balanced_accuracy"
    # Frozen-trunk activations on disk (.cache/alzstage/activations), keyed by the trunk's
    # weight values and the exact input bytes, so only a change that alters them recomputes.
    cache_activations: bool = True
    activation_cache_entries: int = Field(default=4, ge=1)
    patience: int = Field(default=3, ge=1)
    loss: Literal["cross_entropy", "focal"] = "cross_entropy"
    focal_gamma: float = Field(default=2.0, ge=0)
    # ordinal: a CORN head (Shi et al. 2021) that uses the order of base.classes; the model
    # still outputs class probabilities, so everything after training is unchanged.
    head: Literal["softmax", "ordinal"] = "softmax"

    @model_validator(mode="after")
    def _loss_fits_head(self) -> TrainParams:
        if self.head == "ordinal" and self.loss == "focal":
            raise ValueError(ORDINAL_FOCAL_MESSAGE)
        return self


class CVParams(_Section):
    """Subject-level K-fold cross-validation (``dvc repro cv/dvc.yaml``).

    ``folds`` lists the fold ids, [0, 1, ..., K-1]: the CV pipeline's ``foreach`` reads
    this very list, so K is written once and dvc.yaml cannot disagree with it.
    """

    folds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    # Validation subjects (early stopping, temperature) carved out of each fold's
    # training subjects, as a fraction of its images, per class.
    val_size: float = Field(default=0.15, gt=0, lt=0.5)
    bootstrap: int = Field(default=1000, ge=100)
    # Repeats of the K-fold CV, each with new folds (fold seed base.seed + repeat): the
    # pooled CI then reflects the method, not one draw of folds. Each cv_fold stage
    # trains one model per repeat.
    repeats: int = Field(default=3, ge=1, le=20)

    @field_validator("folds")
    @classmethod
    def _fold_ids(cls, v: list[int]) -> list[int]:
        if len(v) < 2 or v != list(range(len(v))):
            raise ValueError(
                f"must be the fold ids 0..K-1 with K >= 2, e.g. [0, 1, 2, 3, 4]; got {v}"
            )
        return v


class BrainParams(_Section):
    """The brain-level model (``alzstage.model.brain``): one stage and a conformal set
    per brain from its slices. Fitted by ``train`` (and inside every CV fold) on training
    brains; the sets are calibrated on validation brains."""

    # pool: the fixed mean-log-probability rule (the reference); logistic: a regularised
    # logistic regression over the pooled log-probabilities and the atrophy features.
    aggregator: Literal["pool", "logistic"] = "logistic"
    features: list[Literal["cnn", "morphometry"]] = Field(
        default_factory=lambda: ["cnn"], min_length=1
    )
    C: float = Field(default=1.0, gt=0)  # inverse L2 strength of the logistic aggregator
    max_class_weight: float | None = Field(default=5.0, gt=0)  # cap on balanced weights
    confidence: float = Field(default=0.9, gt=0, lt=1)  # conformal set coverage
    mondrian: bool = False  # class-conditional (Mondrian) coverage instead of marginal


class EvaluateParams(_Section):
    low_confidence: float = Field(default=0.5, gt=0, lt=1)


class PromoteParams(_Section):
    model_name: str = Field(default="alzstage", min_length=1)
    metric: Literal["balanced_accuracy", "macro_f1", "accuracy"] = "balanced_accuracy"
    min_improvement: float = 0.0
    allow_leaky: bool = False


_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*([kKMGT]i?B|B)?\s*$")


class ComputeParams(_Section):
    """Where per-volume preprocessing and batch prediction run (alzstage.compute).

    None of these change a result, only where and how fast it is made: a changed value
    re-runs ``download``, which then reuses every cached volume (docs/scale.md).
    """

    # An existing Dask scheduler (tcp://10.0.0.5:8786); null: a LocalCluster per stage.
    scheduler: str | None = None
    workers: int | None = Field(default=None, ge=1)  # LocalCluster processes; null: one per core
    memory_limit: str = "4GiB"  # per LocalCluster worker; Dask restarts a worker past it
    retries: int = Field(default=2, ge=0, le=20)  # reruns of a task whose worker died

    @field_validator("scheduler")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[a-z][a-z0-9+]*://\S+$", v):
            raise ValueError(
                f"scheduler must be a Dask scheduler address such as tcp://10.0.0.5:8786, "
                f"or null for a local cluster (got {v!r})"
            )
        return v

    @field_validator("memory_limit")
    @classmethod
    def _size(cls, v: str) -> str:
        if not _SIZE.match(v):
            raise ValueError(f"memory_limit must be a size such as 4GiB or 3500MB (got {v!r})")
        return v
