"""The ``promote`` stage: register the new model and move ``champion`` only on evidence.

A challenger replaces the champion only if it is better on the configured metric *and*
both were scored on the same test split (same fingerprint): comparing numbers from
different test sets, or from a leaky split against an honest one, is not evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alzstage import tracking
from alzstage.config import Params, Paths
from alzstage.files import read_json, write_json
from alzstage.result import StageResult


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(
    challenger: dict[str, Any],
    champion: dict[str, Any] | None,
    metric: str,
    min_improvement: float,
    allow_leaky: bool,
) -> Decision:
    """Pure decision from the two models' registry tags (strings, as MLflow stores them)."""
    if challenger.get("split_leaky") == "True" and not allow_leaky:
        return Decision(
            False,
            "challenger was evaluated on a leaky (slice-level) split; set "
            "promote.allow_leaky: true to allow it to become champion",
        )
    if champion is None:
        return Decision(True, "no champion yet")
    if champion.get("split_fingerprint") != challenger.get("split_fingerprint"):
        return Decision(
            False,
            "champion and challenger were evaluated on different test splits "
            f"({champion.get('split_fingerprint', '?')[:12]} vs "
            f"{challenger.get('split_fingerprint', '?')[:12]}); not comparable",
        )
    try:
        new, old = float(challenger[metric]), float(champion[metric])
    except (KeyError, ValueError):
        return Decision(False, f"champion has no {metric!r} tag; promote by hand if intended")
    if new > old + min_improvement:
        return Decision(True, f"{metric} {new:.4f} > champion {old:.4f} + {min_improvement}")
    return Decision(
        False, f"{metric} {new:.4f} does not beat champion {old:.4f} + {min_improvement}"
    )


def run_promote(params: Params, paths: Paths) -> StageResult:
    p = params.promote
    train_run = read_json(paths.train_run)
    metrics = read_json(paths.metrics)
    tags = {
        "balanced_accuracy": str(metrics["balanced_accuracy"]),
        "macro_f1": str(metrics["macro_f1"]),
        "accuracy": str(metrics["accuracy"]),
        "split_fingerprint": str(metrics.get("split_fingerprint", "")),
        "split_strategy": str(metrics.get("split_strategy", "")),
        "split_leaky": str(metrics.get("split_leaky", "")),
        "train_run_id": train_run["run_id"],
    }
    mv = tracking.register(train_run["model_uri"], p.model_name, tags)
    tracking.set_alias(p.model_name, tracking.ALIAS_CHALLENGER, mv.version)
    champ = tracking.get_alias_version(p.model_name, tracking.ALIAS_CHAMPION)
    decision = decide(
        tags, dict(champ.tags) if champ else None, p.metric, p.min_improvement, p.allow_leaky
    )
    if decision.promote:
        tracking.set_alias(p.model_name, tracking.ALIAS_CHAMPION, mv.version)
    report = {
        "model_name": p.model_name,
        "version": int(mv.version),
        "promoted": decision.promote,
        "reason": decision.reason,
        "metric": p.metric,
        "challenger_value": float(tags[p.metric]),
        "champion_version_before": int(champ.version) if champ else None,
        "champion_version": int(mv.version)
        if decision.promote
        else (int(champ.version) if champ else None),
        "model_uri": tracking.alias_uri(p.model_name, tracking.ALIAS_CHAMPION),
    }
    write_json(paths.promotion, report)
    verdict = "promoted to champion" if decision.promote else "kept as challenger"
    return StageResult(
        metrics={"promoted": float(decision.promote), "version": float(mv.version)},
        artifacts=[paths.promotion],
        tags={"registry.version": str(mv.version), "registry.promoted": str(decision.promote)},
        summary=f"{p.model_name} v{mv.version} {verdict}: {decision.reason}",
    )


def set_alias_by_hand(params: Params, version: int, alias: str) -> str:
    tracking.set_alias(params.promote.model_name, alias, version)
    return f"{params.promote.model_name} v{version} is now @{alias}"
