"""The ``promote`` stage: register the new model and move ``champion`` only on evidence.

Each dataset has its own registered model, ``<promote.model_name>-<dataset>``, and so its
own champion (``tracking.registered_name``): a model trained on the synthetic demo images
is never compared with, or kept in place of, one trained on real scans. Within a dataset,
a challenger replaces the champion only if it is better on the configured metric *and*
both were scored on the same test split (same fingerprint): comparing numbers from
different test sets, or from a leaky split against an honest one, is not evidence.

Promote is idempotent and serialised: one registry version per training run, and one
promote at a time on a machine (a file lock), so a retried or doubled promote cannot
register the same model twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alzstage import tracking
from alzstage.artifacts import MetricsReport, TrainRun
from alzstage.config import Params, Paths
from alzstage.data.identity import configured_dataset
from alzstage.errors import AlzstageError
from alzstage.files import write_json
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


def version_tags(
    train_run: TrainRun, run_id: str, metrics: MetricsReport, dataset: str
) -> dict[str, str]:
    """The registry tags of the new version: its evidence, and what predict and serve show."""
    return {
        "balanced_accuracy": str(metrics.balanced_accuracy),
        "macro_f1": str(metrics.macro_f1),
        "accuracy": str(metrics.accuracy),
        "split_fingerprint": metrics.split_fingerprint,
        "split_strategy": metrics.split_strategy,
        "split_leaky": str(metrics.split_leaky),
        "train_run_id": run_id,
        # What predict, serve and the page show about the model they use.
        "dataset": dataset,
        "data_source": metrics.data_source,
        "recipe": train_run.recipe,
        "backbone": train_run.backbone,
        "weights": train_run.weights,
    }


def _register_and_decide(
    params: Params, paths: Paths, name: str, model_uri: str, tags: dict[str, str]
) -> tuple[Any, bool, Any, Decision]:
    """``(version, registered now, champion before, decision)``, aliases moved, under the lock.

    One promote at a time (:func:`tracking.registry_lock`), and one version per training
    run (:func:`tracking.register_once`): promote run twice, or twice at once, for the
    same run leaves the same single version and the same aliases.
    """
    p = params.promote
    with tracking.registry_lock(paths.root):
        mv, new = tracking.register_once(model_uri, name, tags, key="train_run_id")
        tracking.set_alias(name, tracking.ALIAS_CHALLENGER, mv.version)
        champ = tracking.get_alias_version(name, tracking.ALIAS_CHAMPION)
        if champ is not None and str(champ.version) == str(mv.version):
            decision = Decision(True, "already champion: this training run was promoted before")
        else:
            champ_tags = dict(champ.tags) if champ else None
            decision = decide(tags, champ_tags, p.metric, p.min_improvement, p.allow_leaky)
        if decision.promote:
            tracking.set_alias(name, tracking.ALIAS_CHAMPION, mv.version)
    return mv, new, champ, decision


def run_promote(params: Params, paths: Paths) -> StageResult:
    p = params.promote
    train_run = TrainRun.read(paths.train_run)
    metrics = MetricsReport.read(paths.metrics)
    dataset = metrics.dataset
    if not dataset:
        raise AlzstageError(
            f"{paths.metrics} names no dataset, so there is no champion to compare with; "
            "re-run `alzstage split` and `alzstage evaluate` (or `dvc repro`)"
        )
    name = tracking.registered_name(p.model_name, dataset)
    # The MLflow run that wrote this model file (train_run.json holds no MLflow id).
    trained = tracking.trained_model(train_run.model_md5, tracking.tracking_uri(paths.root))
    tags = version_tags(train_run, trained.run_id, metrics, dataset)
    mv, new, champ, decision = _register_and_decide(params, paths, name, trained.model_uri, tags)
    report = {
        "model_name": name,
        "dataset": dataset,
        "version": int(mv.version),
        "promoted": decision.promote,
        "reason": decision.reason,
        "metric": p.metric,
        "challenger_value": float(tags[p.metric]),
        "champion_version_before": int(champ.version) if champ else None,
        "champion_version": int(mv.version)
        if decision.promote
        else (int(champ.version) if champ else None),
        "model_uri": tracking.champion_uri(p.model_name, dataset),
    }
    write_json(paths.promotion, report)
    verdict = "promoted to champion" if decision.promote else "kept as challenger"
    if not new:
        verdict = f"(registered before, for run {trained.run_id}) {verdict}"
    if tags["data_source"] == "demo":
        verdict += " (synthetic demo data)"
    return StageResult(
        metrics={"promoted": float(decision.promote), "version": float(mv.version)},
        artifacts=[paths.promotion],
        tags={
            "registry.name": name,
            "registry.version": str(mv.version),
            "registry.promoted": str(decision.promote),
        },
        summary=f"{name} v{mv.version} {verdict}: {decision.reason}",
    )


def set_alias_by_hand(params: Params, paths: Paths, version: int, alias: str) -> str:
    """Set ``alias`` on a version of the configured dataset's registered model."""
    dataset = configured_dataset(params, paths)
    name = tracking.registered_name(params.promote.model_name, dataset.name)
    tracking.set_alias(name, alias, version)
    return f"{name} v{version} is now @{alias} (dataset {dataset.name}: {dataset.why})"
