"""The ``alzstage`` command line: one command per pipeline stage, plus predict and serve.

The stage commands come from the registry (:mod:`alzstage.stages`); ``promote`` adds
options to set an alias by hand.

Nothing heavy is imported at module level: TensorFlow, MLflow and great-expectations load
inside the command that needs them, so ``alzstage --help`` answers instantly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from alzstage.stages import BY_NAME, STAGES, Stage

if TYPE_CHECKING:  # pragma: no cover
    from alzstage.config import Params, Paths

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

app = typer.Typer(
    help="alzstage: reproducible, leakage-aware Alzheimer's-stage classification from brain MRI.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _load() -> tuple[Params, Paths]:
    from alzstage.config import ConfigError, Paths, load_params

    try:
        paths = Paths()
        return load_params(paths.root / "params.yaml"), paths
    except ConfigError as exc:
        _fail(str(exc))
        raise  # unreachable; keeps type checkers happy


def _run_stage(stage: Stage, **options: Any) -> None:
    """Validate params, open the stage's MLflow run, run it, log what it returned."""
    params, paths = _load()
    from alzstage import tracking
    from alzstage.errors import AlzstageError

    try:
        with tracking.stage_run(stage.name, params, paths.root, list(stage.params)) as run:
            result = stage.run(params, paths, run, **options)
            run.log_metrics(result.metrics)
            if result.tags:
                run.set_tags(result.tags)
            for art in result.artifacts:
                run.log_artifact(art)
    except AlzstageError as exc:  # written for a person: the message, no traceback
        _fail(f"{stage.name}: {exc}", code=1)
    except FileNotFoundError as exc:  # an earlier stage's output is not there (yet)
        _fail(
            f"{stage.name}: {exc.filename or exc}: not found; run the stages before it first "
            f"(`dvc repro {stage.name}`)",
            code=1,
        )
    typer.echo(f"[{stage.name}] {result.summary}".rstrip())


def _stage_command(stage: Stage) -> Callable[..., None]:
    """The typer command of a registry stage: no options, or --fold for a per-fold stage."""
    if stage.per_fold:

        def command(fold: Annotated[int, typer.Option(help="fold id, one of cv.folds")]) -> None:
            _run_stage(stage, fold=fold)

    else:

        def command() -> None:
            _run_stage(stage)

    command.__doc__ = stage.help
    return command


# Every stage's command, from the registry; promote also sets aliases by hand (below).
for _stage in STAGES:
    if _stage.name != "promote":
        app.command(_stage.command)(_stage_command(_stage))


@app.command(help=BY_NAME["promote"].help)
def promote(
    version: Annotated[
        int | None, typer.Option(help="Set an alias on this version by hand.")
    ] = None,
    alias: Annotated[
        str | None, typer.Option(help="Alias to set with --version (default: champion).")
    ] = None,
) -> None:
    if version is None and alias is not None:
        _fail(f"--alias {alias!r} needs --version: alzstage promote --version 3 --alias champion")
    if version is not None:
        alias = "champion" if alias is None else alias
        params, paths = _load()
        from alzstage import tracking
        from alzstage.errors import AlzstageError
        from alzstage.model.promote import set_alias_by_hand

        tracking.configure(paths.root)
        try:
            typer.echo(set_alias_by_hand(params, paths, version, alias))
        except AlzstageError as exc:  # the configured dataset cannot be named yet
            _fail(str(exc), code=1)
        return
    _run_stage(BY_NAME["promote"])


@app.command()
def predict(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Image files (JPEG/PNG), NIfTI volumes (.nii/.nii.gz), folders or glob patterns."
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(help="Version number, alias, models:/ URI or local path. Default: champion."),
    ] = None,
    output: Annotated[str, typer.Option("--format", "-f", help="table, json or csv")] = "table",
    gradcam: Annotated[
        Path | None,
        typer.Option(
            "--gradcam",
            help="Also write a Grad-CAM overlay PNG per image into this folder "
            "(<stem>.gradcam.png; existing files are never overwritten).",
        ),
    ] = None,
) -> None:
    """Predict the stage of each image with calibrated probabilities; batches get a summary.

    A NIfTI volume is registered to MNI152, cut into the training slice format, and gets
    one subject-level stage pooled from its slices (neuro.aggregate); JSON output adds
    the per-slice probabilities and QC, --gradcam the most informative slices.
    """
    if output not in ("table", "json", "csv"):
        _fail(f"--format must be one of table, json, csv (got {output!r})")
    if gradcam is not None and gradcam.exists() and not gradcam.is_dir():
        _fail(f"--gradcam {gradcam}: exists and is not a folder; give a folder to write PNGs into")
    params, paths = _load()
    from alzstage import tracking
    from alzstage.errors import AlzstageError, ModelNotFound
    from alzstage.model.predict import (
        LoadedModel,
        choose_model,
        expand_inputs,
        missing_champion_hint,
        predict_files,
        summarize,
    )

    try:
        files = expand_inputs(inputs)
    except FileNotFoundError as exc:
        _fail(str(exc))
    if not files:
        _fail(
            "no image files found in the given inputs (expected .jpg, .jpeg, .png, .nii or .nii.gz)"
        )
    # Read-only: name the store explicitly instead of tracking.configure(), which would
    # create an experiment and repoint MLflow for the whole process.
    store = tracking.tracking_uri(paths.root)
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or store
    choice = None
    try:
        # Default: the champion of the dataset params.yaml configures, said on stderr so
        # that JSON and CSV on stdout stay clean.
        choice = choose_model(model, params, paths)
        uri = choice.uri
        typer.echo(f"model: {choice.reason}", err=True)
        loaded = LoadedModel(
            uri,
            params.base.classes,
            params.model.input_size,
            tracking_uri=store,
            registry_uri=registry,
        )
    except ModelNotFound as exc:
        hint = choice and missing_champion_hint(choice, params.promote.model_name, store, registry)
        _fail(f"{exc}; {hint}" if hint else str(exc), code=1)
    except AlzstageError as exc:  # unknown dataset, unreadable model
        _fail(str(exc), code=1)
    threshold = params.evaluate.low_confidence
    from alzstage.neuro.volume import is_volume_path

    volumes = [f for f in files if is_volume_path(f)]
    images = [f for f in files if not is_volume_path(f)]
    details: list[dict] = []
    try:
        df = predict_files(loaded, images, threshold, gradcam_dir=gradcam) if images else None
        if volumes:
            import pandas as pd

            from alzstage.model.subject import predict_volume_files

            vdf, details = predict_volume_files(loaded, volumes, params, threshold, gradcam)
            df = vdf if df is None else pd.concat([df.assign(kind="image"), vdf])
            order = {str(f): i for i, f in enumerate(files)}
            df = df.sort_values("file", key=lambda s: s.map(order)).reset_index(drop=True)
    except ValueError as exc:  # Grad-CAM on a model that is not preprocess -> backbone -> head
        _fail(f"--gradcam: {exc}", code=1)
    assert df is not None
    summary = summarize(df, loaded.classes, threshold)
    batch = len(df) > 1
    if output == "json":
        doc = {
            "model": uri,
            "model_name": loaded.info.name,
            "model_version": loaded.info.version,
            "model_choice": choice.reason,
            "dataset": loaded.info.dataset,
            "recipe": loaded.info.recipe,
            "synthetic_demo": loaded.info.synthetic_demo,
            "provenance": loaded.info.provenance,
            "predictions": json.loads(df.to_json(orient="records")),
            "summary": summary,
        }
        if volumes:
            doc["volumes"] = json.loads(json.dumps(details, default=_json_number))
        typer.echo(json.dumps(doc, indent=2))
    elif output == "csv":
        typer.echo(df.to_csv(index=False), nl=False)
        typer.echo(f"# model {loaded.info.label}: {loaded.info.provenance}", err=True)
        if batch:  # stdout stays one clean CSV table; the summary is for the person
            typer.echo(f"# summary: {json.dumps(summary)}", err=True)
    else:
        from rich.console import Console
        from rich.table import Table

        console = Console()
        table = Table(title=f"alzstage predictions ({loaded.info.label})")
        table.add_column("file", overflow="fold")
        table.add_column("stage", overflow="fold")
        for col in ["confidence", *loaded.classes]:
            table.add_column(col)
        errors, notes = [], []
        for _, r in df.iterrows():
            shown = Path(r["file"]).name
            if r.get("kind") == "volume" and not r.get("error"):
                shown += f" (volume: {int(r['n_slices'])} slices, {r['aggregate']})"
            if r.get("error"):
                table.add_row(shown, "[red]unreadable[/red]", "", *[""] * len(loaded.classes))
                errors.append(r["error"])
                continue
            if r.get("out_of_distribution") is True:  # no stage: alzstage.model.ood
                ood = "[yellow]out of distribution[/yellow]"
                table.add_row(shown, ood, "", *[""] * len(loaded.classes))
                notes.append(f"{shown}: out of distribution, no stage: {r['ood_reason']}")
                continue
            flag = " [yellow](low)[/yellow]" if r["low_confidence"] else ""
            seen = r.get("seen_in_training") is True
            table.add_row(
                shown,
                r["stage"] + (" [cyan](seen in training)[/cyan]" if seen else ""),
                f"{r['confidence']:.3f}{flag}",
                *[f"{r[c]:.3f}" for c in loaded.classes],
            )
        console.print(table)
        style = "bold red" if loaded.info.synthetic_demo else "dim"
        console.print(f"model {loaded.info.label}: {loaded.info.provenance}", style=style)
        for err in errors:  # in full below the table, where a long path does not wrap
            console.print(f"[red]error:[/red] {err}", highlight=False)
        for note in notes:
            console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
        for d in details:
            if "error" in d:
                continue
            where = ", ".join(
                f"{i} (z={d['slices'][i]['z_mm']:g} mm)" for i in d["informative_slices"]
            )
            console.print(
                f"{Path(d['file']).name}: registration score {d['qc']['registration_score']:.2f}; "
                f"most informative slices for {d['stage']}: {where or 'none'}",
                highlight=False,
            )
        if batch:
            stats = Table(title="batch summary", show_footer=False)
            for col in ("stage", "images", "share", "mean probability"):
                stats.add_column(col)
            for c in loaded.classes:
                stats.add_row(
                    c,
                    str(summary["stage_counts"][c]),
                    f"{summary['stage_fractions'][c]:.0%}",
                    f"{summary['mean_probabilities'][c]:.3f}",
                )
            console.print(stats)
            if summary["mean_confidence"] is not None:
                console.print(
                    f"mean confidence {summary['mean_confidence']:.3f}; "
                    f"{summary['n_low_confidence']} of {summary['n_predicted']} below "
                    f"{threshold} (evaluate.low_confidence)"
                )
        if gradcam is not None:
            console.print(f"Grad-CAM overlays written to {gradcam}")
    if df["error"].astype(bool).any():
        raise typer.Exit(1)


def _json_number(o: object) -> object:
    """numpy scalars in QC records -> plain numbers for JSON."""
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@app.command()
def serve(
    host: Annotated[
        str,
        typer.Option(help="Interface to bind. The default keeps the API on this machine."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=1, max=65535)] = 8000,
    model: Annotated[
        str | None,
        typer.Option(help="Version number, alias, models:/ URI or local path. Default: champion."),
    ] = None,
    max_upload_mb: Annotated[
        float, typer.Option(help="Largest accepted image file in MiB; larger gets 413.", min=0.001)
    ] = 20.0,
    max_request_mb: Annotated[
        float, typer.Option(help="Largest request body in MiB; larger gets 413.", min=0.001)
    ] = 200.0,
    max_files: Annotated[int, typer.Option(help="Most images in one request.", min=1)] = 64,
    max_volume_mb: Annotated[
        float,
        typer.Option(help="Largest accepted NIfTI volume file in MiB; larger gets 413.", min=0.001),
    ] = 128.0,
    max_pixels: Annotated[
        int, typer.Option(help="Decompression-bomb guard: most pixels per image.", min=1)
    ] = 4096 * 4096,
    max_request_pixels: Annotated[
        int,
        typer.Option(
            help="Most decoded pixels of all images in one request; files past it get 413.",
            min=1,
        ),
    ] = 4 * 4096 * 4096,
    max_concurrent: Annotated[
        int, typer.Option(help="Prediction requests that run at once.", min=1)
    ] = 2,
    max_queued: Annotated[
        int,
        typer.Option(help="Prediction requests that wait for a slot; more get 503.", min=0),
    ] = 8,
    allow_origin: Annotated[
        list[str] | None,
        typer.Option(help="Another origin whose pages may POST (repeatable)."),
    ] = None,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(help="A Host name to accept on loopback besides localhost (repeatable)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the web page at / and the REST API (POST /predict, /predict/volume, /docs)."""
    params, paths = _load()
    import uvicorn

    from alzstage.errors import AlzstageError
    from alzstage.serve.app import ServeSettings, create_app

    limits = {
        "max_file_bytes": int(max_upload_mb * 2**20),
        "max_request_bytes": int(max_request_mb * 2**20),
        "max_files": max_files,
        "max_pixels": max_pixels,
        "max_volume_bytes": int(max_volume_mb * 2**20),
        "max_request_pixels": max_request_pixels,
        "max_concurrent": max_concurrent,
        "max_queued": max_queued,
        "allowed_origins": tuple(allow_origin or ()),
        "allowed_hosts": tuple(allow_host or ()),
    }
    try:
        settings = ServeSettings.for_project(params, paths, model, **limits)
    except AlzstageError as exc:
        _fail(str(exc), code=1)
    if host not in LOOPBACK:
        typer.secho(
            f"warning: binding {host} exposes an unauthenticated API to the network; "
            "put it behind an authenticating proxy",
            fg=typer.colors.YELLOW,
            err=True,
        )
    typer.echo(
        f"alzstage: serving {settings.model_choice} at http://{host}:{port}/ (API docs: /docs)"
    )
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)


@app.command("check-params")
def check_params() -> None:
    """Validate params.yaml and print the resolved values."""
    params, _ = _load()
    typer.echo(json.dumps(params.model_dump(by_alias=True, mode="json"), indent=2))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
