"""Typed pipeline parameters and project paths.

``params.yaml`` is the single source of truth for every stage. It is parsed once into
pydantic models so that a typo or a wrong type fails *before* any work starts, with a
message naming the key (``train.epochs``) and the allowed values, instead of surfacing
as a stack trace twenty minutes into training.

Every default below is the value the shipped ``params.yaml`` holds
(``tests/test_config.py`` compares them key by key): a key left out of a params file
means what the repository's file says, not a second opinion kept here.

Why one module of about 600 lines: every params section is here so that the pydantic
models are the single source of defaults (``tests/test_config.py`` holds params.yaml
to them); each section is a small independent class.
"""

from __future__ import annotations

import os
import re
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alzstage.errors import ConfigError  # defined there, importable from here as before

PARAMS_FILE = "params.yaml"


# --------------------------------------------------------------------------- paths


def project_root(start: Path | None = None) -> Path:
    """The repository root: the nearest parent holding ``dvc.yaml`` (or ``params.yaml``).

    ``ALZSTAGE_ROOT`` wins when set, which lets tests and cluster jobs run from elsewhere.
    """
    env = os.environ.get("ALZSTAGE_ROOT")
    if env:
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").exists() or (candidate / PARAMS_FILE).exists():
            return candidate
    return here


def tracking_home(root: Path) -> Path:
    """Where ``mlflow.db`` and ``mlruns/`` live for a checkout.

    ``dvc exp run`` executes in throw-away copies under ``<repo>/.dvc/tmp/exps/...``; runs
    logged there must land in the main repo's store, not vanish with the copy.
    """
    parts = root.resolve().parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root.resolve()


class Paths:
    """Every file a stage reads or writes, in one place, relative to the project root."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or project_root()).resolve()
        r = self.root
        self.raw = r / "data" / "raw"
        self.raw_images = self.raw / "images"
        self.raw_manifest = self.raw / "manifest.csv"
        self.raw_volumes = self.raw / "volumes.csv"  # per-volume QC, data.source: nifti only
        self.interim = r / "data" / "interim"
        self.validated_manifest = self.interim / "manifest.csv"
        self.processed = r / "data" / "processed"
        self.pixels = self.processed / "pixels"  # every image decoded once (decode stage)
        self.split_file = self.processed / "split.csv"
        self.augmented = self.processed / "augmented"
        self.models = r / "models"
        self.model_file = self.models / "model.keras"
        self.train_run = self.models / "train_run.json"
        self.brain_model = self.models / "brain_model.json"
        self.reports = r / "reports"
        self.figures = self.reports / "figures"
        self.plots = self.reports / "plots"
        self.validation_report = self.reports / "validation.json"
        self.validation_dir = self.reports / "validation"
        self.quarantine = self.validation_dir / "quarantine.csv"
        self.volume_qc = self.validation_dir / "volumes.csv"
        self.quarantine_volumes = self.validation_dir / "quarantine_volumes.csv"
        # Great Expectations Data Docs: not a DVC output (GX stamps every page and folder
        # with the run's time, so they never hash alike twice); logged to MLflow instead.
        self.data_docs = self.reports / "validation_docs"
        self.split_report = self.reports / "split.json"
        self.train_report = self.reports / "train.json"
        self.metrics = self.reports / "metrics.json"  # evaluate's detail
        self.headline = self.reports / "headline.json"  # the run's `dvc metrics show` row
        self.promotion = self.reports / "promotion.json"
        # Subject k-fold cross-validation (cv/dvc.yaml)
        self.cv_folds = self.processed / "cv" / "folds.csv"
        self.cv_reports = self.reports / "cv"
        self.cache = r / ".cache" / "alzstage"
        # Shared by `dvc exp run` copies, like mlflow.db: a queued sweep reuses it.
        self.activation_cache = tracking_home(r) / ".cache" / "alzstage" / "activations"
        # Preprocessed NIfTI volumes by content (data.source: nifti), shared the same way.
        self.volume_cache = tracking_home(r) / ".cache" / "alzstage" / "volumes"


# --------------------------------------------------------------------------- params


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _canonical(name: str) -> str:
    """``Mild_Demented`` / ``mild demented`` / ``MildDemented`` all become ``milddemented``."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


_ImageSide = Annotated[int, Field(ge=32, le=1024)]


class BaseParams(_Section):
    seed: int = Field(default=42, ge=0)  # numpy seeds must be non-negative
    image_size: tuple[_ImageSide, _ImageSide] = (208, 176)
    classes: list[str] = Field(
        default_factory=lambda: [
            "NonDemented",
            "VeryMildDemented",
            "MildDemented",
            "ModerateDemented",
        ],
        min_length=2,
    )
    class_aliases: dict[str, str] = Field(default_factory=dict)

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, v: list[str]) -> list[str]:
        keys = [_canonical(c) for c in v]
        if len(set(keys)) != len(keys):
            raise ValueError(f"class names must be unique (ignoring case and separators): {v}")
        return v

    @model_validator(mode="after")
    def _aliases_point_to_classes(self) -> BaseParams:
        for alias, target in self.class_aliases.items():
            if target not in self.classes:
                raise ValueError(
                    f"class_aliases[{alias!r}] = {target!r} is not one of classes {self.classes}"
                )
        return self

    def canonical_label(self, raw: str) -> str | None:
        """Map a folder or label name onto a configured class, or None when unknown.

        Matching ignores case, spaces, ``_`` and ``-`` so the spellings used by different
        mirrors of the same dataset line up without a hand-written alias for each.
        """
        if raw in self.classes:
            return raw
        if raw in self.class_aliases:
            return self.class_aliases[raw]
        key = _canonical(raw)
        for c in self.classes:
            if _canonical(c) == key:
                return c
        for alias, target in self.class_aliases.items():
            if _canonical(alias) == key:
                return target
        return None

    @property
    def height(self) -> int:
        return self.image_size[0]

    @property
    def width(self) -> int:
        return self.image_size[1]


class DemoParams(_Section):
    subjects_per_class: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [26, 22, 18, 14]
    )
    slices_per_subject: int = Field(default=8, ge=1, le=30)  # the MNI band holds 30 slices


# Label names of the Hugging Face parquet export in label-id order (ids are alphabetical).
# Used only when a parquet file carries no ClassLabel names in its schema metadata.
HF_LABEL_NAMES = ["Mild_Demented", "Moderate_Demented", "Non_Demented", "Very_Mild_Demented"]


def _check_sha256(v: str | None, name: str = "") -> str | None:
    """A pin that is not 64 hex digits is a copy-paste slip; catch it before downloading."""
    if v is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", v):
        where = f"{name!r}: " if name else ""
        raise ValueError(f"{where}sha256 must be 64 hex digits or null")
    return v.lower() if v else v


# Letters, digits, '-', '_' and '.': what MLflow accepts in a registered model name and what
# reads well in ``models:/alzstage-<dataset>@champion``.
DATASET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class DataParams(_Section):
    source: Literal["demo", "archive", "folder", "kaggle", "huggingface", "nifti"] = "demo"
    # The dataset's name in the registry (one champion per dataset). null: ``demo`` for the
    # demo source, else ``<source>-<fingerprint of the image hashes>`` (data/identity.py).
    name: str | None = Field(default=None, pattern=DATASET_NAME_PATTERN)
    path: str | None = None
    # source: nifti. A CSV in data.path with columns subject, file, label (docs/neuro.md).
    subjects_csv: str = Field(default="subjects.csv", min_length=1)
    sha256: str | None = None
    max_extract_bytes: int = Field(default=8 * 1024**3, gt=0)
    max_compression_ratio: float = Field(default=200.0, gt=1)
    # source: kaggle (``owner/dataset`` or ``owner/dataset/versions/N`` to pin a version)
    kaggle_dataset: str = Field(
        default="tourist55/alzheimers-dataset-4-class-of-images", pattern=r"^[^/\s]+/[^/\s]+"
    )
    # source: huggingface. Files are fetched from
    # ``<hf_endpoint>/datasets/<hf_repo>/resolve/<hf_revision>/data/<file>``.
    hf_endpoint: str = "https://huggingface.co"
    hf_repo: str = "Falah/Alzheimer_MRI"
    hf_revision: str = Field(default="daac24f9597236b45837d82f7eb9c9ad1f8c60c8", min_length=1)
    hf_files: dict[str, str | None] = Field(
        default_factory=lambda: {
            "train-00000-of-00001-c08a401c53fe5312.parquet": None,
            "test-00000-of-00001-44110b9df98c5585.parquet": None,
        }
    )
    hf_label_names: list[str] = Field(default_factory=lambda: list(HF_LABEL_NAMES), min_length=1)
    demo: DemoParams = Field(default_factory=DemoParams)

    @field_validator("sha256")
    @classmethod
    def _sha256_hex(cls, v: str | None) -> str | None:
        return _check_sha256(v)

    @field_validator("hf_files")
    @classmethod
    def _hf_sha256_hex(cls, v: dict[str, str | None]) -> dict[str, str | None]:
        for name, digest in v.items():
            if "/" in name or "\\" in name or name in ("", ".", ".."):
                raise ValueError(f"{name!r}: give a bare file name (it is looked up under data/)")
            _check_sha256(digest, name)
        return v

    @model_validator(mode="after")
    def _demo_name_reserved(self) -> DataParams:
        # The demo label marks a model as trained on synthetic images; real data must not
        # share its registry entry or its champion.
        if self.name == "demo" and self.source != "demo":
            raise ValueError(
                f"data.name 'demo' is reserved for data.source: demo (source is {self.source!r})"
            )
        return self

    @model_validator(mode="after")
    def _path_needed(self) -> DataParams:
        if self.source in ("archive", "folder", "nifti") and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        if self.source == "huggingface" and not self.hf_files:
            raise ValueError("data.hf_files must list at least one parquet file ({name: sha256})")
        return self


def _ordered_pair(v: tuple[float, float], what: str) -> tuple[float, float]:
    if not v[0] < v[1]:
        raise ValueError(f"{what} must be [low, high] with low < high, got {list(v)}")
    return v


class NeuroPreprocessParams(_Section):
    """How a NIfTI volume becomes Kaggle-like axial slices (alzstage.neuro)."""

    registration_resolution: int = Field(default=2, ge=1, le=4)  # MNI152 grid, mm
    # Speed against fidelity (docs/neuro.md#speed-and-fidelity; the settings before them:
    # [4, 2, 1], 0.25, 0.001, true, 1, sample).
    registration_shrink_factors: tuple[Annotated[int, Field(ge=1, le=8)], ...] = (4, 2)
    registration_sampling: float = Field(default=0.1, gt=0, le=1)  # full-grid metric sampling
    registration_min_step: float = Field(default=0.01, gt=0, le=1)  # optimiser stop, ~mm
    registration_gradient_filter: bool = False  # ITK's gradient images (slow) vs at the samples
    foreground_stride: int = Field(default=2, ge=1, le=4)  # Otsu threshold from every n-th voxel
    tissue_kmeans: Literal["histogram", "sample"] = "histogram"
    clip_percentiles: tuple[
        Annotated[float, Field(ge=0, le=100)], Annotated[float, Field(ge=0, le=100)]
    ] = (0.5, 99.5)
    normalise: Literal["zscore", "minmax"] = "zscore"
    brain_mask: Literal["template", "otsu", "both"] = "both"
    tissue_segmentation: bool = True
    z_range_mm: tuple[
        Annotated[float, Field(ge=-72, le=110)], Annotated[float, Field(ge=-72, le=110)]
    ] = (-18.0, 40.0)
    n_slices: int = Field(default=32, ge=1, le=128)
    max_volume_mb: float = Field(default=1024.0, gt=0)  # decompressed size guard

    @field_validator("clip_percentiles")
    @classmethod
    def _clip_order(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _ordered_pair(v, "clip_percentiles")

    @field_validator("z_range_mm")
    @classmethod
    def _z_order(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _ordered_pair(v, "z_range_mm")

    @field_validator("registration_shrink_factors")
    @classmethod
    def _pyramid(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(a < b for a, b in pairwise(v)):
            raise ValueError(
                "registration_shrink_factors must be one or more factors, coarse to fine "
                f"(e.g. [4, 2]), got {list(v)}"
            )
        return v


class NeuroParams(_Section):
    preprocess: NeuroPreprocessParams = Field(default_factory=NeuroPreprocessParams)
    aggregate: Literal["mean_log", "mean", "vote"] = "mean_log"
    gradcam_slices: int = Field(default=4, ge=0, le=128)


class NiftiQCParams(_Section):
    """Per-volume quality rules for NIfTI inputs (validate stage and predict)."""

    voxel_size_mm: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (
        0.5,
        3.0,
    )
    min_brain_ml: float = Field(default=500.0, ge=0)
    min_registration_score: float = Field(default=0.5, ge=0, le=1)

    @field_validator("voxel_size_mm")
    @classmethod
    def _voxel_order(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not v[0] <= v[1]:
            raise ValueError(f"voxel_size_mm must be [min, max] with min <= max, got {list(v)}")
        return v


class ValidateParams(_Section):
    on_failure: Literal["fail", "quarantine"] = "fail"
    min_per_class: int = Field(default=1, ge=0)
    expected_mode: Literal["L", "RGB", "any"] = "L"
    check_size: bool = True
    blank_std_threshold: float = Field(default=1.0, ge=0)
    nifti: NiftiQCParams = Field(default_factory=NiftiQCParams)


class SplitParams(_Section):
    strategy: Literal["subject", "stratified", "source"] = "subject"
    test_size: float = Field(default=0.2, gt=0, lt=1)
    val_size: float = Field(default=0.15, gt=0, lt=1)
    group_threshold: float = Field(default=0.97, gt=0, le=1)
    thumb_size: int = Field(default=32, ge=8, le=128)
    near_duplicate_threshold: float = Field(default=0.99, gt=0, le=1)
    tiny_class_policy: Literal["share_subjects", "train_only", "drop"] = "share_subjects"
    min_subjects_per_class: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _train_keeps_some_data(self) -> SplitParams:
        # Checked here, not in the split stage, so `check-params` refuses it at once.
        if self.test_size + self.val_size >= 1:
            raise ValueError(
                f"split.test_size ({self.test_size}) + split.val_size ({self.val_size}) = "
                f"{self.test_size + self.val_size:g} leaves nothing to train on; "
                "lower one of them so that the sum is below 1"
            )
        return self


class AugmentParams(_Section):
    views: int = Field(default=0, ge=0, le=16)
    rotation_deg: float = Field(default=8.0, ge=0, le=45)
    shift: float = Field(default=0.05, ge=0, le=0.3)
    zoom: float = Field(default=0.05, ge=0, le=0.3)
    horizontal_flip: bool = True
    brightness: float = Field(default=0.1, ge=0, le=0.5)
    contrast: float = Field(default=0.1, ge=0, le=0.5)
    oversample: Literal["none", "balance"] = "none"
    preview_count: int = Field(default=6, ge=0, le=32)


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


class Params(_Section):
    base: BaseParams = Field(default_factory=BaseParams)
    data: DataParams = Field(default_factory=DataParams)
    validate_: ValidateParams = Field(default_factory=ValidateParams, alias="validate")
    split: SplitParams = Field(default_factory=SplitParams)
    augment: AugmentParams = Field(default_factory=AugmentParams)
    model: ModelParams = Field(default_factory=ModelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    promote: PromoteParams = Field(default_factory=PromoteParams)
    cv: CVParams = Field(default_factory=CVParams)
    brain: BrainParams = Field(default_factory=BrainParams)
    neuro: NeuroParams = Field(default_factory=NeuroParams)
    compute: ComputeParams = Field(default_factory=ComputeParams)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @property
    def recipe(self) -> str:
        """``scratch`` or ``transfer``: ``train.recipe`` with ``auto`` resolved."""
        if self.train.recipe != "auto":
            return self.train.recipe
        return "scratch" if self.model.weights == "none" else "transfer"

    @model_validator(mode="after")
    def _recipe_fits_weights(self) -> Params:
        # The transfer recipe freezes the trunk; frozen random weights are noise features
        # (balanced accuracy at chance in issue 14), so that combination is refused.
        if self.train.recipe == "transfer" and self.model.weights == "none":
            raise ValueError(
                "train.recipe: transfer freezes the backbone, but model.weights is none "
                "(random weights); set train.recipe: scratch (or auto), or give pretrained "
                "weights in model.weights"
            )
        if self.recipe == "transfer" and self.model.resolved_backbone == "resnet_compact":
            raise ValueError(
                "model.backbone: resnet_compact has no pretrained weights; use it with "
                "model.weights: none, or pick a keras.applications backbone such as resnet50"
            )
        return self

    @model_validator(mode="after")
    def _class_weight_keys(self) -> Params:
        cw = self.train.class_weight
        if isinstance(cw, dict):
            unknown = sorted(set(cw) - set(self.base.classes))
            if unknown:
                raise ValueError(
                    f"train.class_weight has unknown classes {unknown}; "
                    f"allowed: {self.base.classes}"
                )
        if len(self.data.demo.subjects_per_class) != len(self.base.classes):
            raise ValueError(
                "data.demo.subjects_per_class needs one count per class in base.classes "
                f"({len(self.base.classes)}), got {len(self.data.demo.subjects_per_class)}"
            )
        return self


REQUIRED_SECTIONS = (
    "base",
    "data",
    "validate",
    "split",
    "augment",
    "model",
    "train",
    "evaluate",
    "promote",
    "neuro",
)


def _format_error(err: ValidationError, source: str) -> str:
    """One line per problem: ``params.yaml: train.epochs: ... (got 'x')``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p != "validate_") or "<root>"
        loc = loc.replace("validate_", "validate")
        msg = e["msg"]
        ctx = e.get("ctx") or {}
        if e["type"] == "literal_error" and "expected" in ctx:
            msg = f"must be one of {ctx['expected']}"
        elif e["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; see params.yaml in the repository for the keys)"
        elif e["type"] == "value_error":  # our validators' messages already name the values
            msg = msg.removeprefix("Value error, ")
        # A cross-field rule's input is the whole section: its message names the values.
        quiet = e["type"] in ("missing", "extra_forbidden") or isinstance(e.get("input"), dict)
        got = "" if quiet else f" (got {e.get('input')!r})"
        lines.append(f"{source}: {loc}: {msg}{got}")
    return "; ".join(lines)


def parse_params(raw: dict[str, Any], source: str = PARAMS_FILE) -> Params:
    """Validate a params mapping; raises ConfigError naming every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    missing = [s for s in REQUIRED_SECTIONS if s not in raw]
    if missing:
        raise ConfigError(
            f"{source}: missing section(s) {missing}; every section of {list(REQUIRED_SECTIONS)}"
            " must be present (an empty mapping {} takes the defaults)"
        )
    cleaned = {k: ({} if v is None else v) for k, v in raw.items()}
    try:
        return Params.model_validate(cleaned)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


_CACHE: dict[tuple[str, float], Params] = {}


def load_params(path: Path | None = None) -> Params:
    """Load and validate ``params.yaml`` once per process."""
    path = path or project_root() / PARAMS_FILE
    if not path.exists():
        raise ConfigError(f"{path}: not found; run from the repository root or set ALZSTAGE_ROOT")
    key = (str(path.resolve()), path.stat().st_mtime)
    if key not in _CACHE:
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        _CACHE[key] = parse_params(raw, source=str(path.name))
    return _CACHE[key]
