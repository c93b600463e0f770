"""The base of every params section (frozen, no unknown keys) and the ``base`` section."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
