"""``alzstage predict`` end to end: inputs and a model in, predictions out, then shown.

The command line only parses its options, calls :func:`run_predict` and prints one
rendering of the result: :func:`json_document`, :func:`csv_text` (with
:func:`csv_notes` for the person) or :func:`print_table`. All three show the same
:mod:`alzstage.inference.prediction` objects that the REST API returns.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from alzstage.errors import AlzstageError, InputError, ModelNotFound
from alzstage.inference.prediction import (
    NO_BRAIN_MODEL_NOTE,
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
    from alzstage.inference.loading import LoadedModel
    from alzstage.inference.predict import ModelChoice


# Past this many inputs the interactive mode suggests batch mode (predict --output).
LARGE_BATCH = 5000


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
    brain: bool = False,
) -> PredictionRun:
    """Expand the inputs, load the model ``--model`` names (by default the configured
    dataset's champion, announced so that JSON and CSV output stay clean) and predict.

    With ``brain`` each input is the folder of one brain's slices and gets one
    brain-level result (stage, conformal set, per-slice table) instead of one per file.

    Raises :class:`~alzstage.errors.InputError` for inputs that name no file (or, with
    ``brain``, a folder without slices), and :class:`~alzstage.errors.AlzstageError`
    when there is no model to use; a file that cannot be read is a
    result with an ``error`` (a brain's: a left-out slice), not an exception.
    """
    from alzstage.inference.predict import brain_files, predict_brain_folders, predict_paths

    # 1. The inputs, checked before the model loads: a wrong path fails in a second.
    brains: list[tuple[Path, list[Path]]] = []
    files: list[Path] = []
    if brain:
        brains = [(Path(folder), brain_files(Path(folder))) for folder in inputs]
    else:
        files = _input_files(inputs, announce)
    # 2. The model --model names, by default the configured dataset's champion.
    choice, model = _load_model(model_ref, params, paths, announce)
    # 3. Predict; a file that cannot be read is a result with an error, not an exception.
    try:
        if brain:
            predictions: list[Prediction] = list(
                predict_brain_folders(model, brains, params, gradcam_dir)
            )
        else:
            predictions = predict_paths(model, files, params, gradcam_dir)
    except ValueError as exc:  # Grad-CAM on a model that is not preprocess -> backbone -> head
        what = "--gradcam" if gradcam_dir is not None else model.info.label
        raise AlzstageError(f"{what}: {exc}") from None
    # 4. The results with their summary, for one of the renderings below.
    return PredictionRun(
        model=model.info.ref,
        label=model.info.label,
        choice=choice.reason,
        classes=list(model.classes),
        predictions=predictions,
        summary=summarize(predictions, model.classes, params.evaluate.low_confidence),
        gradcam_dir=gradcam_dir,
    )


def _input_files(inputs: list[str], announce: Callable[[str], None]) -> list[Path]:
    """The files the inputs name (folders and globs expanded); none is the user's mistake."""
    from alzstage.inference.predict import expand_inputs

    try:
        files = expand_inputs(inputs)
    except FileNotFoundError as exc:
        raise InputError(str(exc)) from None
    if not files:
        raise InputError(
            "no image files found in the given inputs (expected .jpg, .jpeg, .png, .nii or .nii.gz)"
        )
    if len(files) > LARGE_BATCH:
        announce(
            f"note: {len(files):,} inputs are held in memory until printed; "
            "--output results.csv (or .parquet) streams them from the compute engine"
        )
    return files


def _load_model(
    model_ref: str | None, params: Params, paths: Paths, announce: Callable[[str], None]
) -> tuple[ModelChoice, LoadedModel]:
    """The model ``--model`` names, announced; a missing champion says how to make one."""
    from alzstage.inference.loading import LoadedModel
    from alzstage.inference.predict import choose_model, missing_champion_hint, store_uris

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
    return choice, model


# --------------------------------------------------------------------------- renderings


def json_document(run: PredictionRun) -> str:
    """The model, one record per input (:func:`~alzstage.inference.prediction.records`), the
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
    for kind, key in (("volume", "volumes"), ("brain", "brains")):
        chosen = [v for v in run.volumes if v.kind == kind]
        if chosen:
            doc[key] = volume_details(chosen, gradcam)
    return json.dumps(doc, indent=2)


def csv_text(run: PredictionRun) -> str:
    """The records as one CSV table (a header, then a line per input)."""
    import pandas as pd

    rows = records(run.predictions, run.classes, run.gradcam_dir is not None)
    return pd.DataFrame(rows).to_csv(index=False)


def csv_notes(run: PredictionRun) -> list[str]:
    """What a person reads next to the CSV (stderr): the model and, for a batch, the summary."""
    notes = [f"# model {run.label}: {run.model.provenance}"]
    notes += [f"# {brain_lines(v)[0]}" for v in run.volumes if not v.error]
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
            shown += f" ({p.kind}: {p.n_slices_used} of {p.n_slices} slices, {p.brain_model})"
        if p.error:
            table.add_row(shown, "[red]unreadable[/red]", *no_numbers)
            errors.append(p.error)
        elif p.out_of_distribution_flag:  # no stage: alzstage.inference.ood
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
            _print_brain(console, v, classes)
    if len(run.predictions) > 1:
        _print_summary(console, run.summary, classes)
    if run.gradcam_dir is not None:
        console.print(f"Grad-CAM overlays written to {run.gradcam_dir}")


def brain_lines(v: VolumePrediction) -> list[str]:
    """The brain-level answer in words: stage and set, the pooled reference, where the
    answer looked (a volume's informative slices), and the slices left out."""
    name = Path(v.filename).name
    if v.no_brain_model:
        how = f"{NO_BRAIN_MODEL_NOTE} ({v.aggregate})"
    else:
        how = f"brain model {v.brain_model}; fixed pooling rule {v.aggregate}: {v.pooled_stage}"
    lines = [
        f"{name}: brain stage {v.stage}; set {v.set_text or 'none (no calibrated brain model)'}"
        f"; {how}"
    ]
    where = ", ".join(
        f"{s.index} (z={s.z_mm:g} mm)" if s.z_mm is not None else Path(s.filename or "").name
        for i in v.informative_slices
        for s in v.slices or []
        if s.index == i
    )
    reg = "" if v.registration_score is None else f"registration score {v.registration_score:.2f}; "
    lines.append(f"{name}: {reg}most informative slices for {v.stage}: {where or 'none'}")
    for s in v.slices or []:
        if s.left_out:  # an unreadable file's reason already starts with its path
            why = s.left_out.removeprefix(f"{s.filename}: ")
            lines.append(f"{name}: left out {Path(s.filename or str(s.index)).name}: {why}")
    return lines


def _print_brain(console: Console, v: VolumePrediction, classes: list[str]) -> None:
    """The brain-level lines; a brain's files also get their per-slice table."""
    from rich.table import Table

    first, *rest = brain_lines(v)
    console.print(first, style="bold", highlight=False)
    for line in rest:
        console.print(line, highlight=False)
    if v.kind != "brain":
        return
    table = Table(title=f"slices of {Path(v.filename).name} (* most informative)")
    table.add_column("slice", overflow="fold")
    table.add_column("stage", overflow="fold")
    for col in ["confidence", *classes]:
        table.add_column(col)
    for s in v.slices or []:
        shown = Path(s.filename or str(s.index)).name + (" *" if s.informative else "")
        if s.probabilities is None or s.confidence is None:
            why = "out of distribution" if s.out_of_distribution else "unreadable"
            table.add_row(shown, f"[yellow]left out: {why}[/yellow]", *[""] * (1 + len(classes)))
            continue
        probs = [f"{s.probabilities[c]:.3f}" for c in classes]
        table.add_row(shown, s.stage or "", f"{s.confidence:.3f}", *probs)
    console.print(table)


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
