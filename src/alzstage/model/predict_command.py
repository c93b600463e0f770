"""``alzstage predict`` end to end: inputs and a model in, predictions out, then shown.

The command line only parses its options, calls :func:`run_predict` and prints one
rendering of the result: :func:`json_document`, :func:`csv_text` (with
:func:`csv_notes` for the person) or :func:`print_table`. All three show the same
:mod:`alzstage.model.prediction` objects that the REST API returns.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from alzstage.errors import InputError, ModelError, ModelNotFound
from alzstage.model.prediction import (
    ModelRef,
    Prediction,
    Summary,
    VolumePrediction,
    records,
    summarize,
    volume_details,
)

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

    from alzstage.config import Params, Paths


@dataclass(frozen=True)
class PredictionRun:
    """What one ``alzstage predict`` produced: the model, one result per input, a summary."""

    model: ModelRef
    label: str  # "alzstage-demo v3 (@champion)" or the path, for titles
    choice: str  # why this model (ModelChoice.reason)
    classes: list[str]
    predictions: list[Prediction]
    summary: Summary
    gradcam_dir: Path | None = None

    @property
    def volumes(self) -> list[VolumePrediction]:
        return [p for p in self.predictions if isinstance(p, VolumePrediction)]


def run_predict(
    inputs: list[str],
    model_ref: str | None,
    params: Params,
    paths: Paths,
    gradcam_dir: Path | None = None,
    announce: Callable[[str], None] = print,
) -> PredictionRun:
    """Expand the inputs, load the model ``--model`` names (by default the configured
    dataset's champion, announced so that JSON and CSV output stay clean) and predict.

    Raises :class:`~alzstage.errors.InputError` for inputs that name no file, and
    :class:`~alzstage.errors.ModelError` (or ``DatasetUnknown``) when there is no model
    to use; a file that cannot be read is a result with an ``error``, not an exception.
    """
    from alzstage.model.predict import (
        LoadedModel,
        choose_model,
        expand_inputs,
        missing_champion_hint,
        predict_paths,
        store_uris,
    )

    try:
        files = expand_inputs(inputs)
    except FileNotFoundError as exc:
        raise InputError(str(exc)) from None
    if not files:
        raise InputError(
            "no image files found in the given inputs (expected .jpg, .jpeg, .png, .nii or .nii.gz)"
        )
    tracking_uri, registry_uri = store_uris(paths.root)
    choice = choose_model(model_ref, params, paths)
    announce(f"model: {choice.reason}")
    try:
        model = LoadedModel(
            choice.uri,
            params.base.classes,
            params.model.input_size,
            tracking_uri=tracking_uri,
            registry_uri=registry_uri,
        )
    except ModelNotFound as exc:
        hint = missing_champion_hint(choice, params.promote.model_name, tracking_uri, registry_uri)
        raise ModelNotFound(f"{exc}; {hint}" if hint else str(exc)) from None
    try:
        predictions = predict_paths(model, files, params, gradcam_dir)
    except ValueError as exc:  # Grad-CAM on a model that is not preprocess -> backbone -> head
        raise ModelError(f"--gradcam: {exc}") from None
    return PredictionRun(
        model=model.info.ref,
        label=model.info.label,
        choice=choice.reason,
        classes=list(model.classes),
        predictions=predictions,
        summary=summarize(predictions, model.classes, params.evaluate.low_confidence),
        gradcam_dir=gradcam_dir,
    )


# --------------------------------------------------------------------------- renderings


def json_document(run: PredictionRun) -> str:
    """The model, one record per input (:func:`~alzstage.model.prediction.records`), the
    summary and, when there are volumes, their per-slice details."""
    ref, gradcam = run.model, run.gradcam_dir is not None
    doc = {
        "model": ref.uri,
        "model_name": ref.name,
        "model_version": ref.version,
        "model_choice": run.choice,
        "dataset": ref.dataset,
        "recipe": ref.recipe,
        "synthetic_demo": ref.synthetic_demo,
        "provenance": ref.provenance,
        "predictions": records(run.predictions, run.classes, gradcam),
        "summary": run.summary.model_dump(mode="json"),
    }
    if run.volumes:
        doc["volumes"] = volume_details(run.volumes, gradcam)
    return json.dumps(doc, indent=2)


def csv_text(run: PredictionRun) -> str:
    """The records as one CSV table (a header, then a line per input)."""
    import pandas as pd

    rows = records(run.predictions, run.classes, run.gradcam_dir is not None)
    return pd.DataFrame(rows).to_csv(index=False)


def csv_notes(run: PredictionRun) -> list[str]:
    """What a person reads next to the CSV (stderr): the model and, for a batch, the summary."""
    notes = [f"# model {run.label}: {run.model.provenance}"]
    if len(run.predictions) > 1:
        notes.append(f"# summary: {json.dumps(run.summary.model_dump(mode='json'))}")
    return notes


def print_table(run: PredictionRun) -> None:
    """A table per input on the terminal, each problem in full below it, then the batch."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    classes = run.classes
    table = Table(title=f"alzstage predictions ({run.label})")
    table.add_column("file", overflow="fold")
    table.add_column("stage", overflow="fold")
    for col in ["confidence", *classes]:
        table.add_column(col)
    no_numbers = [""] * (1 + len(classes))
    errors, notes = [], []
    for p in run.predictions:
        shown = Path(p.filename).name
        if isinstance(p, VolumePrediction) and not p.error:
            shown += f" (volume: {p.n_slices} slices, {p.aggregate})"
        if p.error:
            table.add_row(shown, "[red]unreadable[/red]", *no_numbers)
            errors.append(p.error)
        elif p.out_of_distribution_flag:  # no stage: alzstage.model.ood
            table.add_row(shown, "[yellow]out of distribution[/yellow]", *no_numbers)
            notes.append(f"{shown}: out of distribution, no stage: {getattr(p, 'ood_reason', '')}")
        else:
            assert p.stage is not None and p.confidence is not None and p.probabilities
            flag = " [yellow](low)[/yellow]" if p.low_confidence else ""
            seen = " [cyan](seen in training)[/cyan]" if p.seen_in_training_flag else ""
            table.add_row(
                shown,
                p.stage + seen,
                f"{p.confidence:.3f}{flag}",
                *[f"{p.probabilities[c]:.3f}" for c in classes],
            )
    console.print(table)
    style = "bold red" if run.model.synthetic_demo else "dim"
    console.print(f"model {run.label}: {run.model.provenance}", style=style)
    for err in errors:  # in full below the table, where a long path does not wrap
        console.print(f"[red]error:[/red] {err}", highlight=False)
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    for v in run.volumes:
        if not v.error:
            z = {s.index: s.z_mm for s in v.slices or []}
            where = ", ".join(f"{i} (z={z[i]:g} mm)" for i in v.informative_slices)
            console.print(
                f"{Path(v.filename).name}: registration score {v.registration_score:.2f}; "
                f"most informative slices for {v.stage}: {where or 'none'}",
                highlight=False,
            )
    if len(run.predictions) > 1:
        _print_summary(console, run.summary, classes)
    if run.gradcam_dir is not None:
        console.print(f"Grad-CAM overlays written to {run.gradcam_dir}")


def _print_summary(console: Console, s: Summary, classes: list[str]) -> None:
    from rich.table import Table

    stats = Table(title="batch summary", show_footer=False)
    for col in ("stage", "images", "share", "mean probability"):
        stats.add_column(col)
    for c in classes:
        stats.add_row(
            c,
            str(s.stage_counts[c]),
            f"{s.stage_fractions[c]:.0%}",
            f"{s.mean_probabilities[c]:.3f}",
        )
    console.print(stats)
    if s.mean_confidence is not None:
        console.print(
            f"mean confidence {s.mean_confidence:.3f}; {s.n_low_confidence} of "
            f"{s.n_predicted} below {s.low_confidence_threshold} (evaluate.low_confidence)"
        )
