"""How a stage output is read and written: the machinery behind :mod:`alzstage.artifacts`.

* :class:`Artifact`: a JSON file, a pydantic model (strict, frozen, no unknown keys
  unless the type allows them) that names the stage writing it;
* :class:`CsvContract`: a CSV file, its :class:`Column` s with their types and allowed
  values.

Both fail at the read, in one line naming the file, the key or column, and the stage to
run again (:func:`rerun`). The files themselves are declared in :mod:`alzstage.artifacts`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict
from pydantic import ValidationError as PydanticValidationError

from alzstage.errors import AlzstageError
from alzstage.files import json_text, write_csv, write_json

if TYPE_CHECKING:
    import pandas as pd

_A = TypeVar("_A", bound="Artifact")  # typing.Self needs Python 3.11; 3.10 is supported


def rerun(stage: str) -> str:
    """How to run ``stage`` again: its ``alzstage`` command and its ``dvc repro`` target.

    The cross-validation stages live in ``cv/dvc.yaml``; their commands use dashes.
    """
    command = stage.replace("_", "-") + (" --fold <i>" if stage == "cv_fold" else "")
    target = "cv/dvc.yaml" if stage.startswith("cv_") else stage
    return f"run `alzstage {command}` (or `dvc repro {target}`)"


class Artifact(BaseModel):
    """A stage output read by a later stage: :meth:`read` it, :meth:`write` it."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    #: The stage that writes the file: the one to run again when it is missing or stale.
    written_by: ClassVar[str]

    @classmethod
    def read(cls: type[_A], path: Path) -> _A:
        """Parse ``path``; a missing file or key is an :class:`AlzstageError` naming both."""
        path = Path(path)
        how = rerun(cls.written_by)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise AlzstageError(f"{path}: not found; {how} first") from None
        try:
            return cls.model_validate_json(text)
        except PydanticValidationError as e:
            raise AlzstageError(f"{path}: {_problems(e)}; {how} again") from None

    @classmethod
    def check(cls: type[_A], data: dict[str, Any], path: Path) -> _A:
        """Validate ``data`` before it is written to ``path`` (a writer's own contract check)."""
        try:
            return cls.model_validate_json(json_text(data))
        except PydanticValidationError as e:
            raise AlzstageError(f"{path}: not written, {_problems(e)}") from None

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


# --------------------------------------------------------------------------- CSV files


@dataclass(frozen=True)
class Column:
    """One column of a CSV contract.

    ``str`` columns keep every value as text (subject ``'007'`` stays ``'007'``; an empty
    cell is ``''``); ``int`` columns hold whole numbers in every row; ``float`` columns
    hold numbers, an empty cell being a missing measurement (NaN). ``allowed`` lists the
    only values a ``str`` column may take (empty: any).
    """

    name: str
    dtype: type = str
    required: bool = True
    allowed: tuple[str, ...] = ()


@dataclass(frozen=True)
class CsvContract:
    """The columns of one CSV file one stage writes and another reads."""

    #: The stage that writes the file: the one to run again when it breaks its contract.
    written_by: str
    columns: tuple[Column, ...]

    @property
    def names(self) -> list[str]:
        """Every declared column, in file order."""
        return [c.name for c in self.columns]

    #: Numbers parsed by pandas' CSV reader, as pandas wrote them (bit for bit), and
    #: undeclared columns inferred; else every cell is read as text, then typed.
    native_numbers: bool = False

    def _rerun(self) -> str:
        return rerun(self.written_by)

    def read(self, path: Path) -> pd.DataFrame:
        """The file as a frame of the declared types; undeclared columns stay text
        (unless :attr:`native_numbers`)."""
        import pandas as pd

        path = Path(path)
        text = [c.name for c in self.columns if c.dtype is str]
        dtype: Any = dict.fromkeys(text, str) if self.native_numbers else str
        try:
            df = pd.read_csv(path, dtype=dtype, keep_default_na=False)
        except FileNotFoundError:
            raise AlzstageError(f"{path}: not found; {self._rerun()} first") from None
        except pd.errors.EmptyDataError:
            raise AlzstageError(f"{path}: empty (no header); {self._rerun()} again") from None
        return self._typed(df, path, f"{self._rerun()} again")

    def check(self, df: pd.DataFrame, path: Path) -> pd.DataFrame:
        """``df`` as the file would be read back; an error says why it may not be written."""
        return self._typed(df, path, None)

    def frame(self, rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
        """Rows (dicts) as a frame in file order: how tests build the file's fixtures."""
        import pandas as pd

        df = pd.DataFrame(list(rows), columns=self._present(rows[0].keys() if rows else ()))
        return self.check(df, Path(f"<{self.written_by} rows>"))

    def text(self, df: pd.DataFrame, path: Path) -> str:
        """The exact CSV text: declared columns in file order, ``\\n`` line endings."""
        self.check(df, path)
        return df[self._present(df.columns)].to_csv(index=False, lineterminator="\n")

    def write(self, df: pd.DataFrame, path: Path) -> Path:
        """Check ``df`` and write its declared columns, in file order, atomically."""
        self.check(df, path)
        return write_csv(path, df[self._present(df.columns)])

    def _present(self, have: Any) -> list[str]:
        have = set(have)
        return [c.name for c in self.columns if c.required or c.name in have]

    def _typed(self, df: pd.DataFrame, path: Path, fix: str | None) -> pd.DataFrame:
        """``df`` with its declared columns typed; ``fix`` None marks a writer's own check."""
        import pandas as pd

        def refuse(problem: str) -> AlzstageError:
            if fix is None:
                return AlzstageError(f"{path}: not written, {problem}")
            return AlzstageError(f"{path}: {problem}; {fix}")

        missing = [c.name for c in self.columns if c.required and c.name not in df.columns]
        if missing:
            raise refuse(f"no column {', '.join(missing)}")
        out = df.copy()
        for col in self.columns:
            if col.name not in out.columns:
                continue
            values = out[col.name]
            if col.dtype is str:
                values = values.where(values.notna(), "").astype(str)
                bad = ~values.isin(col.allowed) if col.allowed else None
                allowed = f"one of {list(col.allowed)}"
            else:
                blank = values.isna() | (values.astype(str).str.strip() == "")
                # blanks as NaN first: a column of whole numbers then comes back as int64
                values = pd.to_numeric(values.where(~blank), errors="coerce")
                bad = values.isna() & ~blank
                if col.dtype is int:
                    bad |= blank | (values % 1 != 0)
                    values = values.where(~bad, 0).astype("int64")
                allowed = "a whole number" if col.dtype is int else "a number or empty"
            if bad is not None and bad.any():
                rows = bad.to_numpy().nonzero()[0]
                more = f" (and {len(rows) - 1} more rows)" if len(rows) > 1 else ""
                raise refuse(
                    f"column {col.name} is {df[col.name].iloc[rows[0]]!r} in row "
                    f"{rows[0] + 1}{more}, must be {allowed}"
                )
            out[col.name] = values
        return out
