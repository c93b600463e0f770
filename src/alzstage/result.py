"""What a stage hands back to the CLI layer, which logs it to MLflow.

Stage modules stay free of MLflow so their logic is testable without a tracking store;
the CLI wraps each stage in one tracked run and logs this result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class StageResult:
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    summary: str = ""
