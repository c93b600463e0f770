"""Typed contracts for the JSON files one stage writes and another reads.

A stage that reads another stage's output parses it through one of these types, so a
missing or mistyped key fails at the read with the file and the key named, instead of a
``KeyError`` deep inside, or a silent fallback that tags a model with an empty string.
Each type says which stage writes its file; the error names the stage to run again.

* :class:`TrainRun`: ``models/train_run.json`` (train writes; evaluate and promote read);
* :class:`SplitReport`: the fields of ``reports/split.json`` that evaluate reads (split
  writes); the rest of the report stays as it is, for the model card and the headline;
* :class:`MetricsReport`: the fields of ``reports/metrics.json`` that promote reads
  (evaluate writes); the rest of the report passes through untouched.

Only the keys a reader uses are declared: a report may carry more, and gains nothing
from being re-typed here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict
from pydantic import ValidationError as PydanticValidationError

from alzstage.errors import ArtifactError, MissingInputError
from alzstage.files import json_text, write_json

_A = TypeVar("_A", bound="Artifact")  # typing.Self needs Python 3.11; 3.10 is supported


class Artifact(BaseModel):
    """A stage output read by a later stage: :meth:`read` it, :meth:`write` it."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    #: The stage that writes the file: the one to run again when it is missing or stale.
    written_by: ClassVar[str]

    @classmethod
    def read(cls: type[_A], path: Path) -> _A:
        """Parse ``path``; a missing file or key is an :class:`AlzstageError` naming both."""
        path = Path(path)
        rerun = f"run `alzstage {cls.written_by}` (or `dvc repro {cls.written_by}`)"
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise MissingInputError(f"{path}: not found; {rerun} first") from None
        try:
            return cls.model_validate_json(text)
        except PydanticValidationError as e:
            raise ArtifactError(f"{path}: {_problems(e)}; {rerun} again") from None

    @classmethod
    def check(cls: type[_A], data: dict[str, Any], path: Path) -> _A:
        """Validate ``data`` before it is written to ``path`` (a writer's own contract check)."""
        try:
            return cls.model_validate_json(json_text(data))
        except PydanticValidationError as e:
            raise ArtifactError(f"{path}: not written, {_problems(e)}") from None

    def write(self, path: Path) -> Path:
        """Write the file (atomically, as every stage output)."""
        write_json(path, self.model_dump(mode="json"))
        return Path(path)


def _problems(e: PydanticValidationError) -> str:
    """One line: each offending key with what is wrong with it."""
    parts = []
    for err in e.errors(include_url=False):
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "missing":
            parts.append(f"key {key!r} is missing")
        else:
            parts.append(f"key {key!r}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


class TrainRun(Artifact):
    """``models/train_run.json``: where the train stage logged the model, and what it ran."""

    written_by: ClassVar[str] = "train"

    run_id: str
    #: Where the logged pyfunc lives (promote registers this one).
    model_uri: str
    runs_uri: str
    #: Fitted on the validation split; ``None`` means the probabilities are uncalibrated.
    temperature: float | None
    input_size: tuple[int, int]
    #: What promote tags on the registry version: the recipe that actually trained.
    recipe: str
    backbone: str
    weights: str


class SplitReport(Artifact):
    """The fields of ``reports/split.json`` that evaluate copies into its report.

    Read from the file (a declared dependency), never from ``params.split``: the split
    that ran, not the one params would run now.
    """

    model_config = ConfigDict(extra="allow")
    written_by: ClassVar[str] = "split"

    strategy: str
    leaky: bool
    fingerprint: str
    warning: str
    subject_ids: str
    dataset: str
    data_source: str


class MetricsReport(Artifact):
    """The fields of ``reports/metrics.json`` that promote tags on the registry version."""

    model_config = ConfigDict(extra="allow")
    written_by: ClassVar[str] = "evaluate"

    balanced_accuracy: float
    macro_f1: float
    accuracy: float
    split_fingerprint: str
    split_strategy: str
    split_leaky: bool
    dataset: str
    data_source: str
