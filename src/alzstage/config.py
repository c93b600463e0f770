"""Typed pipeline parameters and project paths.

``params.yaml`` is the single source of truth for every stage. It is parsed once into
pydantic models so that a typo or a wrong type fails *before* any work starts, with a
message naming the key (``train.epochs``) and the allowed values, instead of surfacing
as a stack trace twenty minutes into training.

Every default below is the value the shipped ``params.yaml`` holds
(``tests/test_config.py`` compares them key by key): a key left out of a params file
means what the repository's file says, not a second opinion kept here.

The section models live in :mod:`alzstage.params` (``base``, ``data``: the data stages',
``model``: the model stages' and compute), the paths in :mod:`alzstage.paths`; this module
holds the root model and the loaders and is where every caller imports them from, so the
models stay the single source of defaults (``tests/test_config.py`` holds params.yaml to
them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator

from alzstage.errors import ConfigError  # defined there and importable from here
from alzstage.params.base import (
    BaseParams,
    _Section,
)
from alzstage.params.data import (
    DATASET_NAME_PATTERN,
    HF_LABEL_NAMES,
    MULTI_SOURCE_KINDS,
    SOURCE_ID_PATTERN,
    AugmentParams,
    DataParams,
    DemoParams,
    NeuroParams,
    NeuroPreprocessParams,
    NiftiQCParams,
    SplitParams,
    ValidateParams,
)
from alzstage.params.model import (
    ORDINAL_FOCAL_MESSAGE,
    BrainParams,
    ComputeParams,
    CVParams,
    EvaluateParams,
    ModelParams,
    PromoteParams,
    ScratchParams,
    TrainParams,
)
from alzstage.paths import (
    PARAMS_FILE,
    Paths,
    project_root,
    tracking_home,
)

# The params API, one import away: every section model, the paths and the loaders.
__all__ = [
    "DATASET_NAME_PATTERN",
    "HF_LABEL_NAMES",
    "MULTI_SOURCE_KINDS",
    "ORDINAL_FOCAL_MESSAGE",
    "PARAMS_FILE",
    "REQUIRED_SECTIONS",
    "SOURCE_ID_PATTERN",
    "AugmentParams",
    "BaseParams",
    "BrainParams",
    "CVParams",
    "ComputeParams",
    "ConfigError",
    "DataParams",
    "DemoParams",
    "EvaluateParams",
    "ModelParams",
    "NeuroParams",
    "NeuroPreprocessParams",
    "NiftiQCParams",
    "Params",
    "Paths",
    "PromoteParams",
    "ScratchParams",
    "SplitParams",
    "TrainParams",
    "ValidateParams",
    "load_params",
    "parse_params",
    "project_root",
    "tracking_home",
]


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
