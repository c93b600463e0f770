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
    """Validate params, check the stage can run (preflight), open its MLflow run, run it,
    log what it returned."""
    params, paths = _load()
    from alzstage import preflight, tracking
    from alzstage.errors import AlzstageError

    def inputs_complete() -> None:  # after abandoned runs are failed, before the run opens
        preflight.check_inputs(stage, paths.root, tracking.last_run)

    try:
        store = None if tracking.is_server_store(paths.root) else tracking.store_file(paths.root)
        outputs = preflight.stage_outputs(stage.name, options.get("fold"))
        preflight.check_writable(stage.name, paths.root, outputs, store)
        with tracking.stage_run(
            stage.name, params, paths.root, list(stage.params), before_start=inputs_complete
        ) as run:
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
        from alzstage.promote import set_alias_by_hand

        try:
            tracking.configure(paths.root)
            typer.echo(set_alias_by_hand(params, paths, version, alias))
        except AlzstageError as exc:  # the dataset cannot be named yet, a damaged store
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
    brain: Annotated[
        bool,
        typer.Option(
            "--brain",
            help="Each input is the folder of ONE brain's slices (JPEG/PNG): one brain-level "
            "stage with its conformal set, plus the per-slice table. Slices unlike the "
            "training slices are left out and listed.",
        ),
    ] = False,
    batch_output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Batch mode for many inputs: predict on the compute engine (params.yaml "
            "compute: local worker processes or a Dask scheduler) and write one row per input, "
            "in input order, to this .csv or .parquet file; memory stays flat (docs/scale.md).",
        ),
    ] = None,
) -> None:
    """Predict the stage of each image with calibrated probabilities; batches get a summary.

    A NIfTI volume is registered to MNI152, cut into the training slice format, and gets
    one brain-level stage from its slices: the brain model stored with the network, with
    its conformal set ("VeryMildDemented or MildDemented (90%)"), the fixed pooling rule
    (neuro.aggregate) beside it. --brain DIR does the same for a folder of one brain's
    slices. JSON output adds the per-slice probabilities and QC, --gradcam the most
    informative slices.
    """
    # 1. Options that are wrong whatever the inputs: refused before anything loads.
    if output not in ("table", "json", "csv"):
        _fail(f"--format must be one of table, json, csv (got {output!r})")
    if gradcam is not None and gradcam.exists() and not gradcam.is_dir():
        _fail(f"--gradcam {gradcam}: exists and is not a folder; give a folder to write PNGs into")
    params, paths = _load()
    from alzstage.errors import AlzstageError, InputError
    from alzstage.inference import command

    # 2. Many inputs to a file: the batch mode on the compute engine.
    if batch_output is not None:
        _predict_batch(inputs, model, batch_output, gradcam, brain, params, paths)
        return
    # 3. Predict; the model is said on stderr, so that JSON and CSV on stdout stay clean.
    try:
        run = command.run_predict(
            inputs, model, params, paths, gradcam, announce=_to_stderr, brain=brain
        )
    except InputError as exc:  # no such input
        _fail(str(exc))
    except AlzstageError as exc:  # no model, unknown dataset, unreadable model, Grad-CAM
        _fail(str(exc), code=1)
    # 4. Print in the asked format; a file that failed makes the exit code 1.
    _print_run(run, output)
    if run.summary.n_errors:
        raise typer.Exit(1)


def _to_stderr(line: str) -> None:
    typer.echo(line, err=True)


def _print_run(run: Any, output: str) -> None:
    """``predict``'s results on stdout as a table, JSON or CSV (notes go to stderr)."""
    from alzstage.inference import command

    if output == "json":
        typer.echo(command.json_document(run))
    elif output == "csv":  # stdout stays one clean CSV table; the notes are for the person
        typer.echo(command.csv_text(run), nl=False)
        for note in command.csv_notes(run):
            typer.echo(note, err=True)
    else:
        command.print_table(run)


def _predict_batch(
    inputs: list[str],
    model: str | None,
    output: Path,
    gradcam: Path | None,
    brain: bool,
    params: Params,
    paths: Paths,
) -> None:
    """``predict --output FILE``: the batch mode (alzstage.inference.batch)."""
    from alzstage.errors import AlzstageError, InputError
    from alzstage.inference.batch import run_batch_predict

    if gradcam is not None or brain:
        what = "--gradcam" if gradcam is not None else "--brain"
        _fail(f"{what} does not combine with --output (batch mode); predict without --output")
    try:
        summary = run_batch_predict(inputs, model, params, paths, output, announce=_to_stderr)
    except InputError as exc:
        _fail(str(exc))
    except AlzstageError as exc:
        _fail(str(exc), code=1)
    typer.echo(summary.line())
    if summary.n_errors:
        raise typer.Exit(1)


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
        typer.Option(help="Another origin whose pages may POST (repeatable).", metavar="ORIGIN"),
    ] = None,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            help="A Host name to accept on loopback besides localhost (repeatable).",
            metavar="HOST",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the web page at / and the REST API (POST /predict, /predict/volume,
    /predict/brain, /docs)."""
    params, paths = _load()
    import uvicorn

    from alzstage.errors import AlzstageError
    from alzstage.serve.app import ServeSettings, create_app

    # 1. The command line's limits, in the units ServeSettings keeps (bytes, tuples).
    mib = 2**20
    limits = {
        **{"max_file_bytes": int(max_upload_mb * mib), "max_files": max_files},
        **{"max_request_bytes": int(max_request_mb * mib), "max_pixels": max_pixels},
        **{"max_volume_bytes": int(max_volume_mb * mib), "max_queued": max_queued},
        **{"max_request_pixels": max_request_pixels, "max_concurrent": max_concurrent},
        **{"allowed_origins": tuple(allow_origin or ()), "allowed_hosts": tuple(allow_host or ())},
    }
    # 2. The model (by default the configured dataset's champion) and params.yaml's values.
    try:
        settings = ServeSettings.for_project(params, paths, model, **limits)
    except AlzstageError as exc:
        _fail(str(exc), code=1)
    # 3. Say what is served where (and warn off the network), then serve until stopped.
    _announce_serving(settings.model_choice, host, port)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)


def _announce_serving(model_choice: str, host: str, port: int) -> None:
    """The one line ``serve`` starts with, after a warning when bound off loopback."""
    if host not in LOOPBACK:
        typer.secho(
            f"warning: binding {host} exposes an unauthenticated API to the network; "
            "put it behind an authenticating proxy",
            fg=typer.colors.YELLOW,
            err=True,
        )
    typer.echo(f"alzstage: serving {model_choice} at http://{host}:{port}/ (API docs: /docs)")


@app.command("check-params")
def check_params() -> None:
    """Validate params.yaml and print the resolved values."""
    params, _ = _load()
    typer.echo(json.dumps(params.model_dump(by_alias=True, mode="json"), indent=2))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
