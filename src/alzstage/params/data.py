"""The params sections of the data stages: data (sources), neuro, validate, split, augment."""

from __future__ import annotations

import re
from itertools import pairwise
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from alzstage.params.base import _Section


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


# ``data.source: multi`` takes its images from the entries of ``data.sources``; each entry
# is one of these kinds (nifti is not yet: its per-volume QC table is one per data/raw).
MULTI_SOURCE_KINDS = ("demo", "archive", "folder", "kaggle", "huggingface")
SOURCE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class DataParams(_Section):
    source: Literal["demo", "archive", "folder", "kaggle", "huggingface", "nifti", "multi"] = "demo"
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
    # source: multi. One mapping per source: ``id`` (its folder under data/raw), ``source``
    # (its kind) and any other key of this section, which overrides the value above; path
    # and sha256 name one file, so they are not inherited.
    sources: list[dict[str, Any]] = Field(default_factory=list)

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

    @model_validator(mode="after")
    def _sources_fit(self) -> DataParams:
        if self.sources and self.source != "multi":
            raise ValueError(
                f"data.sources is read only when data.source is multi (it is {self.source!r}); "
                "set data.source: multi, or empty data.sources"
            )
        if self.source == "multi":
            if not self.sources:
                raise ValueError(
                    "data.source multi needs data.sources: a list of {id, source, ...}"
                )
            self.entries()  # every entry checked now, not at download
        return self

    def entries(self) -> list[tuple[str, DataParams]]:
        """``(id, params)`` of each ``data.sources`` entry: this section with its keys applied.

        Why inherit: the archive limits, class folders and pins are usually shared, so an
        entry names only what differs (``{id: kaggle128, source: folder, path: ...}``).
        """
        inherited = self.model_dump(exclude={"sources", "name", "source", "path", "sha256"})
        out: list[tuple[str, DataParams]] = []
        seen: set[str] = set()
        for i, entry in enumerate(self.sources):
            where = f"data.sources[{i}]"
            sid = str(entry.get("id", ""))
            if not re.fullmatch(SOURCE_ID_PATTERN, sid):
                raise ValueError(
                    f"{where}: id must be a folder name of letters, digits, '.', '_' or '-' "
                    f"(got {entry.get('id')!r})"
                )
            if sid.lower() in seen:
                raise ValueError(f"{where}: id {sid!r} is used twice; give each source its own")
            seen.add(sid.lower())
            if entry.get("source") not in MULTI_SOURCE_KINDS:
                raise ValueError(
                    f"{where} ({sid}): source must be one of {list(MULTI_SOURCE_KINDS)} "
                    f"(got {entry.get('source')!r})"
                )
            reserved = sorted({"name", "sources"} & set(entry))
            if reserved:
                raise ValueError(f"{where} ({sid}): {reserved[0]} is set for data as a whole")
            fields = {k: v for k, v in entry.items() if k != "id"}
            try:
                out.append((sid, DataParams.model_validate({**inherited, **fields})))
            except ValidationError as err:
                e = err.errors()[0]
                loc = ".".join(str(p) for p in e["loc"])
                loc = f"{loc}: " if loc else ""  # a rule across keys names them itself
                msg = e["msg"].removeprefix("Value error, ")
                if e["type"] == "extra_forbidden":
                    msg = "unknown key (an entry takes the keys of data, plus id)"
                raise ValueError(f"{where} ({sid}): {loc}{msg}") from None
        return out


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
